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
    /// Open connections at most; past it a new one waits for a place (up to [`ADMIT_WAIT`]),
    /// then gets a `503` and is closed.
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

/// How long a connection that arrives at the cap may wait for a place: longer than the pressure
/// rule takes to close a connection that idles or trickles ([`PRESSED_WAIT`], checked every half
/// of it, so up to one and a half times it).
pub const ADMIT_WAIT: Duration = Duration::from_millis(PRESSED_WAIT.as_millis() as u64 * 2);

type Service = tower::util::BoxCloneService<
    http::Request<hyper::body::Incoming>,
    http::Response<crate::error::Body>,
    std::convert::Infallible,
>;

/// What every connection of a listener is served with.
#[derive(Clone)]
struct Serving {
    builder: hyper_util::server::conn::auto::Builder<TokioExecutor>,
    service: Service,
    tls: Option<Arc<ReloadableTls>>,
    header_timeout: Duration,
    pressure: Pressure,
}

impl Serving {
    /// Serve one connection in a task of its own, holding its place (`permit`) until it ends.
    fn spawn(
        &self,
        stream: tokio::net::TcpStream,
        permit: tokio::sync::OwnedSemaphorePermit,
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        let _ = stream.set_nodelay(true);
        let Serving {
            builder,
            service,
            tls,
            header_timeout,
            pressure,
        } = self.clone();
        let service = TowerToHyperService::new(service);
        tokio::spawn(async move {
            let _permit = permit;
            let ended = match tls {
                None => {
                    let stream = HeadTimeout::new(stream, header_timeout).with_pressure(pressure);
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
                Some(tls) => {
                    // The handshake runs in the connection's task, bounded like a header read,
                    // so a slow client cannot stall the accept loop.
                    let acceptor = tls.acceptor();
                    let stream =
                        match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
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
                    let stream = HeadTimeout::new(stream, header_timeout).with_pressure(pressure);
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

/// Tell a connection past the cap so, and close it.
fn refuse(stream: tokio::net::TcpStream) {
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let mut stream = stream;
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            stream.write_all(refusal().as_bytes()),
        )
        .await;
    });
}

/// Serve `service` on `listener` until `stopped` fires, then drain.
///
/// At most `max_connections` are served at once. Within a tenth of the cap, connections that
/// idle or trickle a request head for [`PRESSED_WAIT`] are closed to make room (see
/// [`HeadTimeout`]). A connection that arrives at the cap waits for a place, first come first
/// served, up to [`ADMIT_WAIT`], in a waiting room of a tenth of the cap; when the room is full,
/// or no place frees in time, or the listener stops meanwhile, it is told
/// `503 gateway_overloaded` and closed. So clients that hold connections open without using
/// them cannot keep new clients out.
pub async fn serve(
    listener: TcpListener,
    service: Service,
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
    let open = Arc::new(tokio::sync::Semaphore::new(timeouts.max_connections.max(1)));
    let tenth = (timeouts.max_connections / 10).max(1);
    let waiting = Arc::new(tokio::sync::Semaphore::new(tenth));
    // Tells connections still waiting for a place that the listener is stopping.
    let (stopping, stop_seen) = tokio::sync::watch::channel(false);
    let serving = Serving {
        builder,
        service,
        tls,
        header_timeout: timeouts.header_read,
        // Within a tenth of the cap, idle and trickling connections make room for new ones.
        pressure: Pressure {
            open: open.clone(),
            reserve: tenth,
        },
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
                if let Ok(permit) = open.clone().try_acquire_owned() {
                    serving.spawn(stream, permit, graceful.watcher());
                    continue;
                }
                // At the cap: wait for a place in the waiting room, or be told and closed.
                let Ok(seat) = waiting.clone().try_acquire_owned() else {
                    refuse(stream);
                    continue;
                };
                let (open, serving) = (open.clone(), serving.clone());
                let (watcher, mut stop_seen) = (graceful.watcher(), stop_seen.clone());
                tokio::spawn(async move {
                    let _seat = seat;
                    tokio::select! {
                        placed = tokio::time::timeout(ADMIT_WAIT, open.acquire_owned()) => match placed {
                            Ok(Ok(permit)) => serving.spawn(stream, permit, watcher),
                            _ => refuse(stream),
                        },
                        // Stopping: told now rather than let in to a draining listener.
                        _ = stop_seen.wait_for(|stopped| *stopped) => refuse(stream),
                    }
                });
            }
            _ = &mut stopped => break,
        }
    }
    let _ = stopping.send(true);
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period elapsed with connections still open");
    }
}
