//! The floor of callgate's stack, for `bench/load.sh`: a reverse proxy on the same runtime
//! (tokio, one request thread beside nothing else, as callgate with SQLite), the same HTTP server
//! (hyper-util's auto builder, HTTP/1) and the same upstream client (hyper-util's pooled client,
//! `TCP_NODELAY` both ways), with the same allocator, and nothing else: no policy, no state, no
//! trace or metrics. It reads the body whole, swaps the `Authorization` header and forwards, as
//! callgate does. What callgate spends beyond it is its own work.
//!
//! `cargo run --release --example bare_proxy -- LISTEN_ADDR UPSTREAM_URL`

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type Upstream = Client<HttpConnector, Full<Bytes>>;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: bare_proxy LISTEN_ADDR UPSTREAM_URL");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR: an address and port");
    let upstream: Uri = upstream.parse().expect("UPSTREAM_URL: a URL");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(serve(listen, upstream));
}

async fn serve(listen: SocketAddr, upstream: Uri) {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Upstream = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .pool_timer(TokioTimer::new())
        .build(http);
    let listener = TcpListener::bind(listen).await.expect("bind");
    let base = upstream.to_string().trim_end_matches('/').to_string();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (client, base) = (client.clone(), base.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req| forward(client.clone(), base.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .http1()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    client: Upstream,
    base: String,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (mut parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("{base}{path}").parse::<Uri>() else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    parts.uri = uri;
    parts.headers.remove(header::HOST);
    parts.headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer upstream-key"),
    );
    let Ok(answer) = client
        .request(Request::from_parts(parts, Full::new(body)))
        .await
    else {
        return Ok(status(StatusCode::BAD_GATEWAY));
    };
    let (parts, body) = answer.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Ok(status(StatusCode::BAD_GATEWAY));
    };
    Ok(Response::from_parts(parts, Full::new(body)))
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = code;
    r
}
