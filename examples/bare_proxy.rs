//! The floor of callgate's stack, for `bench/load.sh`: a reverse proxy built as callgate's
//! request path is, and doing nothing else (no policy, no state, no writer or checkpoint thread,
//! no trace, metrics or audit, no connection cap or head timeout):
//! - the runtime: tokio with callgate's request threads (one per core but one, at least one, as
//!   with SQLite);
//! - the server: hyper-util's auto builder, with hyper's timer and idle timeout, `TCP_NODELAY`;
//! - the upstream client: hyper-util's pooled client (32 idle connections, 90 s), `TCP_NODELAY`;
//! - the allocator: jemalloc;
//! - a request as callgate sends it: the body read whole, a new request with the account key,
//!   `user-agent`, `accept`, `x-request-id` and `content-type`; the answer read whole and relayed
//!   with its status and content type only.
//!
//! What callgate spends beyond it is its own work.
//! `cargo build --release --example bare_proxy`, then `bare_proxy LISTEN_ADDR UPSTREAM_URL [WORK]`.
//!
//! `WORK` (default 0), `REQ` or `REQ+SIDE` in microseconds, makes each request also spend that
//! much CPU before it is forwarded (each thread's own clock, `CLOCK_THREAD_CPUTIME_ID`: time it
//! is preempted does not count): `REQ` on the request thread, as callgate's policy stages do, and
//! `SIDE` on a thread of its own that the request waits for, as callgate's admission waits for
//! its store's writer thread. `bench/budget.sh` uses it to measure how much work per request a
//! proxy on this stack may do and still reach a given share of nginx's rate on this machine.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

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
        eprintln!("usage: bare_proxy LISTEN_ADDR UPSTREAM_URL [REQ_US[+SIDE_US]]");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR: an address and port");
    let upstream: Uri = upstream.parse().expect("UPSTREAM_URL: a URL");
    let work = Work::new(&args.next().unwrap_or_default());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores.saturating_sub(1).max(1))
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(serve(listen, upstream, work));
}

/// What each request spends before it is forwarded.
#[derive(Clone)]
struct Work {
    /// On the request thread.
    request: Duration,
    /// On the side thread, and its queue (none without side work).
    side: Option<(
        Duration,
        std::sync::mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
    )>,
}

impl Work {
    /// From `REQ` or `REQ+SIDE`, microseconds (empty: none).
    fn new(spec: &str) -> Work {
        let us = |s: &str| {
            let us: f64 = s
                .parse()
                .expect("WORK: REQ_US or REQ_US+SIDE_US, e.g. 6.5+5.5");
            Duration::from_nanos((us * 1000.0) as u64)
        };
        let (request, side) = match spec.split_once('+') {
            Some((r, s)) => (us(r), us(s)),
            None if spec.is_empty() => (Duration::ZERO, Duration::ZERO),
            None => (us(spec), Duration::ZERO),
        };
        let side = (!side.is_zero()).then(|| {
            let (tx, rx) = std::sync::mpsc::channel::<tokio::sync::oneshot::Sender<()>>();
            std::thread::Builder::new()
                .name("bare-side".into())
                .spawn(move || {
                    while let Ok(done) = rx.recv() {
                        spend(side);
                        let _ = done.send(());
                    }
                })
                .expect("side thread");
            (side, tx)
        });
        Work { request, side }
    }

    async fn run(&self) {
        spend(self.request);
        if let Some((_, queue)) = &self.side {
            let (done, wait) = tokio::sync::oneshot::channel();
            if queue.send(done).is_ok() {
                let _ = wait.await;
            }
        }
    }
}

async fn serve(listen: SocketAddr, upstream: Uri, work: Work) {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Upstream = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(32)
        .pool_timer(TokioTimer::new())
        .build(http);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(60));
    let listener = TcpListener::bind(listen).await.expect("bind");
    let base = upstream.to_string().trim_end_matches('/').to_string();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (client, base, builder) = (client.clone(), base.clone(), builder.clone());
        let work = work.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (client, base, work) = (client.clone(), base.clone(), work.clone());
                async move {
                    work.run().await;
                    forward(client, base, req).await
                }
            });
            let _ = builder
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
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut sent = Request::builder()
        .method(parts.method)
        .uri(format!("{base}{path}"))
        .header(header::AUTHORIZATION, "Bearer upstream-key")
        .header(header::USER_AGENT, "bare_proxy")
        .header(header::ACCEPT, "application/json")
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(id) = parts.headers.get("x-request-id") {
        sent = sent.header("x-request-id", id);
    }
    let Ok(sent) = sent.body(Full::new(body)) else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    let Ok(answer) = client.request(sent).await else {
        return Ok(status(StatusCode::BAD_GATEWAY));
    };
    let (parts, body) = answer.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Ok(status(StatusCode::BAD_GATEWAY));
    };
    let mut out = Response::new(Full::new(body));
    *out.status_mut() = parts.status;
    let content_type = parts.headers.get(header::CONTENT_TYPE).cloned();
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("application/json")),
    );
    Ok(out)
}

/// Spend `work` of this thread's CPU time (nothing for zero).
fn spend(work: Duration) {
    if work.is_zero() {
        return;
    }
    let start = thread_cpu();
    let mut x = 0u64;
    while thread_cpu().saturating_sub(start) < work {
        for i in 0..64u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
    }
}

/// This thread's CPU time so far.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to write; the clock id is a constant.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = code;
    r
}
