//! Work that outlives the request that started it (the detached half of a call request, binds,
//! releases, idempotent answers, webhook deliveries), tracked so that a graceful shutdown waits
//! for it (bounded by `server.shutdown_grace_ms`) before the state store is closed and the
//! process exits.

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

static TRACKER: LazyLock<TaskTracker> = LazyLock::new(TaskTracker::new);

/// Spawn `future` on the current runtime, tracked.
pub fn spawn<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    TRACKER.spawn(future)
}

/// Spawn `future` on `handle`'s runtime, tracked.
pub fn spawn_on<F>(future: F, handle: &tokio::runtime::Handle) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    TRACKER.spawn_on(future, handle)
}

/// Attempts [`retry`] makes: about a minute in all (250 ms between the first two, doubling to
/// 4 s).
const ATTEMPTS: u32 = 12;

/// When [`retry`] makes its first attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum First {
    /// At once.
    Now,
    /// After the first wait (the caller has just failed once).
    AfterWait,
}

/// Keep trying `attempt` until it succeeds, with backoff, for about a minute; log `gave_up` if
/// it never does. For work the store could not do now and must not be dropped (a release, a
/// bind, an idempotent answer), while the store may be away.
pub async fn retry<F, Fut, E>(first: First, gave_up: &'static str, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    for n in 0..ATTEMPTS {
        if n > 0 || first == First::AfterWait {
            tokio::time::sleep(Duration::from_millis(250 << n.min(4))).await;
        }
        match attempt().await {
            Ok(()) => return,
            Err(e) => tracing::debug!(error = %e, attempt = n + 1, "retrying: {gave_up}"),
        }
    }
    tracing::error!("{gave_up}");
}

/// Tracked work not finished yet.
pub fn pending() -> usize {
    TRACKER.len()
}

/// Wait up to `grace` for the tracked work to finish; whether it all did. New work may still be
/// spawned meanwhile (a delivery's retry, a release) and is waited for too.
pub async fn drain(grace: Duration) -> bool {
    TRACKER.close();
    let done = tokio::time::timeout(grace, TRACKER.wait()).await.is_ok();
    // Reopen: in tests, several gateways share one process.
    TRACKER.reopen();
    done
}
