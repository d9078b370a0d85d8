//! The stores' own metrics, read from the process's recorder with nothing else recording (a
//! test binary of its own). SQLite: an admission's wait is timed once, with one sync, a bind
//! (which nobody waits for) is synced but not counted as a wait, and each transaction is counted.
//! Redis: its waited writes are timed the same way, on a `redis-server` of the test's own.

use std::time::Duration;

use callgate::state::redis::{RedisOptions, RedisStore};
use callgate::state::sqlite::{SqliteOptions, SqliteStore, Synchronous};
use callgate::state::{AdmitOutcome, StateStore};

#[allow(unused_macros)]
mod conformance;
mod redis_support;

/// The value of a series `name` with no labels, 0 when absent.
fn value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admissions_are_timed_with_their_sync_and_binds_are_not_waited_for() {
    let metrics = callgate::metrics::install();
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("state.db"), Synchronous::Full).unwrap();
    let count = |name: &str| value(&metrics.render(), &format!("{name}_count"));
    let sum = |name: &str| value(&metrics.render(), &format!("{name}_sum"));
    let (wait, sync, batch) = (
        callgate::metrics::STORE_WAIT,
        callgate::metrics::STORE_SYNC,
        callgate::metrics::STORE_BATCH,
    );
    // The writer records a wait just after it answers, so the counts are read until they reach
    // what is expected (or 10 s pass, and the last reading is shown).
    let counts = || (count(wait), count(sync), count(batch));
    let reach = |expected: (f64, f64, f64)| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while counts() != expected && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(counts(), expected);
    };
    reach((0.0, 0.0, 0.0)).await;

    let admitted = store
        .admit(conformance::request("a", "r1", 1))
        .await
        .unwrap();
    assert_eq!(admitted, AdmitOutcome::Admitted);
    reach((1.0, 1.0, 1.0)).await;
    // A sanity bound: the wait holds the sync it waited for. (It cannot show on its own that the
    // wait was taken after the sync: in a debug build the commit before it may outlast it.)
    assert!(sum(wait) >= sum(sync), "{} < {}", sum(wait), sum(sync));

    // The bind: its own transaction and, with nothing after it, its own sync (at most
    // LAZY_SYNC later); no wait, since no request waits for it.
    let bound = store
        .bind(
            "a",
            "r1",
            "call-r1",
            serde_json::json!({"id": "call-r1", "status": "queued"}).into(),
            conformance::NOW + 1,
            conformance::NOW,
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), bound)
        .await
        .expect("the bind was never answered")
        .unwrap();
    reach((1.0, 2.0, 2.0)).await;

    // With the bind held until the next operation (for a minute at most here, so that nothing
    // else commits it), an admission, its bind and the next admission take two transactions and
    // two syncs, not three: the bind shares the second admission's commit.
    drop(store);
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_with(
        &dir.path().join("state.db"),
        SqliteOptions {
            lazy_sync: Duration::from_secs(60),
            ..SqliteOptions::default()
        },
    )
    .unwrap();
    let admit = |id: &str| store.admit(conformance::request("a", id, 1));
    assert_eq!(admit("r1").await.unwrap(), AdmitOutcome::Admitted);
    let bound = store
        .bind(
            "a",
            "r1",
            "call-r1",
            serde_json::json!({"id": "call-r1", "status": "queued"}).into(),
            conformance::NOW + 1,
            conformance::NOW,
        )
        .await
        .unwrap();
    // Long enough for the writer to have run the bind alone (and held it).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(admit("r2").await.unwrap(), AdmitOutcome::Admitted);
    tokio::time::timeout(Duration::from_secs(10), bound)
        .await
        .expect("the bind was not answered with the admission's sync")
        .unwrap();
    reach((3.0, 4.0, 4.0)).await;
    // Operations per transaction: 1 + 1 before, then 1 and 2.
    assert_eq!(sum(batch), 5.0);
    drop(store);

    // Redis: admissions and releases are waits (their round trips), the bind is not, and there
    // are no syncs or transactions of the gateway's own.
    let server = redis_support::RedisServer::start();
    let redis = RedisStore::open(RedisOptions {
        url: server.url(),
        cluster: false,
        prefix: "callgate".into(),
        timeout: Duration::from_secs(5),
    })
    .unwrap();
    let admitted = redis
        .admit(conformance::request("a", "r9", 1))
        .await
        .unwrap();
    assert_eq!(admitted, AdmitOutcome::Admitted);
    reach((4.0, 4.0, 4.0)).await;
    let bound = redis
        .bind(
            "a",
            "r9",
            "call-r9",
            serde_json::json!({"id": "call-r9", "status": "queued"}).into(),
            conformance::NOW + 1,
            conformance::NOW,
        )
        .await
        .unwrap();
    bound.await.unwrap();
    // A call the upstream refused: its admission, then its release.
    let admitted = redis
        .admit(conformance::request("a", "r10", 1))
        .await
        .unwrap();
    assert_eq!(admitted, AdmitOutcome::Admitted);
    redis.release("r10").await.unwrap();
    reach((6.0, 4.0, 4.0)).await;
}
