//! The `StateStore` conformance suite against the SQLite backend, and what is SQLite's own: the
//! bounded queue into its writer.

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use callgate::state::sqlite::{SqliteOptions, SqliteStore, Synchronous};
use callgate::state::{AdmitOutcome, StateStore, StoreError};
use conformance::{Backend, NOW, request};

/// A store in a file of its own; opening it again is a restart.
struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    fn new() -> Self {
        Sqlite {
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

impl Backend for Sqlite {
    fn open(&self) -> Arc<dyn StateStore> {
        Arc::new(SqliteStore::open(&self.dir.path().join("state.db"), Synchronous::Full).unwrap())
    }
}

conformance_suite!(Sqlite::new());

/// With the writer held up (another process holds the file's write lock), new work beyond the
/// queue's capacity is refused with `Busy`, nothing of it taken; once the writer moves again,
/// every queued admission completes and the counters match the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_new_work_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store: Arc<dyn StateStore> = Arc::new(
        SqliteStore::open_with(
            &path,
            SqliteOptions {
                synchronous: Synchronous::Full,
                queue_capacity: 8,
            },
        )
        .unwrap(),
    );
    let blocker = rusqlite::Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let tasks: Vec<_> = (0..40)
        .map(|i| store.admit(request("a", &format!("r{i:02}"), 1)))
        .map(tokio::spawn)
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    blocker.execute_batch("COMMIT").unwrap();
    let (mut admitted, mut busy) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(AdmitOutcome::Admitted) => admitted += 1,
            Err(StoreError::Busy) => busy += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(busy > 0, "nothing was refused");
    assert!(admitted > 0 && admitted <= 16, "{admitted} admitted");
    assert_eq!(admitted + busy, 40);
    let usage = store.usage("a", NOW).await.unwrap();
    assert_eq!(usage.slots, admitted);
    store.check_consistency(NOW).await.unwrap();
    // Reopened, the file agrees.
    drop(store);
    let again = SqliteStore::open(&path, Synchronous::Full).unwrap();
    assert_eq!(again.usage("a", NOW).await.unwrap().slots, admitted);
}
