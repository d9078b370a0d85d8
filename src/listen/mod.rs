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
pub use head_timeout::HeadTimeout;

/// How long a connection may take over a request head, and wait idle between requests.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From a request head's first byte to its end (slow clients are cut off).
    pub header_read: Duration,
    /// An idle keep-alive connection's life between requests.
    pub keepalive_idle: Duration,
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
    timeouts: Timeouts,
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
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(service.clone());
                match &tls {
                    None => {
                        let stream = HeadTimeout::new(stream, header_timeout);
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        let conn = graceful.watch(conn.into_owned());
                        tokio::spawn(async move {
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
                        tokio::spawn(async move {
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
                            let stream = HeadTimeout::new(stream, header_timeout);
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
