//! The accept loop: HTTP/1.1 and HTTP/2 (TLS when configured) on one listener, each connection
//! in its own task; on stop, no new connections, and those open drain within the grace period.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::tls::ReloadableTls;

mod head_timeout;
pub use head_timeout::{HeadTimeout, PRESSED_WAIT, Pressure};

/// How many connections a listener holds, how long one may take over a request head, and how
/// long it may wait idle between requests.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// From a request head's first byte to its end (slow clients are cut off).
    pub header_read: Duration,
    /// An idle keep-alive connection's life between requests.
    pub keepalive_idle: Duration,
    /// Open connections at most; past it a new one gets a `503` and is closed.
    pub max_connections: usize,
}

/// What a connection past the cap is told before it is closed.
fn refusal() -> String {
    let body = r#"{"error":{"code":"gateway_overloaded","message":"the gateway holds as many connections as it may; retry shortly","request_id":""}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Serve `service` on `listener` until `stopped` fires, then drain.
pub async fn serve(
    listener: TcpListener,
    service: tower::util::BoxCloneService<
        http::Request<hyper::body::Incoming>,
        http::Response<crate::error::Body>,
        std::convert::Infallible,
    >,
    tls: Option<Arc<ReloadableTls>>,
    timeouts: ConnectionLimits,
    grace: Duration,
    mut stopped: oneshot::Receiver<()>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper's one timer covers the idle wait; the head's own limit is `HeadTimeout`'s.
        .header_read_timeout(timeouts.keepalive_idle);
    let header_timeout = timeouts.header_read;
    let open = Arc::new(tokio::sync::Semaphore::new(timeouts.max_connections.max(1)));
    // Within a tenth of the cap, idle and trickling connections make room for new ones.
    let pressure = Pressure {
        open: open.clone(),
        reserve: (timeouts.max_connections / 10).max(1),
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Past the connection cap: told so, and closed (not queued, not left hanging).
                let Ok(permit) = open.clone().try_acquire_owned() else {
                    tokio::spawn(async move {
                        use tokio::io::AsyncWriteExt;
                        let mut stream = stream;
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            stream.write_all(refusal().as_bytes()),
                        )
                        .await;
                    });
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(service.clone());
                match &tls {
                    None => {
                        let stream = HeadTimeout::new(stream, header_timeout)
                            .with_pressure(pressure.clone());
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        let conn = graceful.watch(conn.into_owned());
                        tokio::spawn(async move {
                            let _permit = permit;
                            if let Err(e) = conn.await {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        });
                    }
                    Some(tls) => {
                        // The handshake runs in the connection's task, bounded like a header
                        // read, so a slow client cannot stall the accept loop.
                        let acceptor = tls.acceptor();
                        let watcher = graceful.watcher();
                        let builder = builder.clone();
                        let pressure = pressure.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            let stream = match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!("TLS handshake timed out");
                                    return;
                                }
                            };
                            let stream = HeadTimeout::new(stream, header_timeout)
                                .with_pressure(pressure);
                            let conn = builder.serve_connection(TokioIo::new(stream), service);
                            if let Err(e) = watcher.watch(conn.into_owned()).await {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        });
                    }
                }
            }
            _ = &mut stopped => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period elapsed with connections still open");
    }
}
