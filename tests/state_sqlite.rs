//! The `StateStore` conformance suite against the SQLite backend, and what is SQLite's own: the
//! bounded queue into its writer.

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use callgate::state::sqlite::{SqliteOptions, SqliteStore, Synchronous};
use callgate::state::{AdmitOutcome, CallEvent, EventOutcome, RelayToken, StateStore, StoreError};
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

/// The suite again, with upstream ids merged from memory into their table once two binds have
/// gathered, one entry a transaction: the contract holds while merges run.
mod merging_every_two_binds {
    use super::*;

    struct Merging {
        dir: tempfile::TempDir,
    }

    impl Backend for Merging {
        fn open(&self) -> Arc<dyn StateStore> {
            let options = SqliteOptions {
                merge_upstream_ids_at: 2,
                ..SqliteOptions::default()
            };
            Arc::new(SqliteStore::open_with(&self.dir.path().join("state.db"), options).unwrap())
        }
    }

    conformance_suite!(Merging {
        dir: tempfile::tempdir().unwrap()
    });
}

/// What `call_keys` holds (the upstream id and reservation of each entry's row), and the bound
/// `up_to`, read from the file beside the store.
fn merged(path: &std::path::Path) -> (Vec<(String, String)>, i64) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT c.call_id, c.reservation_id FROM call_keys k JOIN calls c ON c.rowid = k.row
             ORDER BY c.call_id",
        )
        .unwrap();
    let entries = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let up_to = conn
        .query_row("SELECT up_to FROM call_keys_merged", [], |r| r.get(0))
        .unwrap();
    (entries, up_to)
}

/// The writer merges a chunk after each batch it answers: admit calls left unbound (`f0`, `f1`,
/// ...) until the merges cover row `up_to`, within a bound (the caller asserts it).
async fn admit_until_merged(store: &SqliteStore, path: &std::path::Path, up_to: i64) {
    for i in 0..200 {
        if merged(path).1 >= up_to {
            return;
        }
        assert_eq!(
            store
                .admit(request("a", &format!("f{i}"), 1))
                .await
                .unwrap(),
            AdmitOutcome::Admitted
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Upstream ids are found whether their bind is still in memory or merged into `call_keys`, and
/// after a late bind (its row below what a merge covers, so it goes straight into the table);
/// they stay unique either way; a restart, and a file as a crash in the middle of a merge leaves
/// it (some chunks in, `up_to` not moved), find them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_ids_are_found_in_memory_merged_bound_late_and_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let options = SqliteOptions {
        merge_upstream_ids_at: 4,
        ..SqliteOptions::default()
    };
    let object = |call: &str| serde_json::json!({"id": call, "status": "queued"});
    let bind = |store: &SqliteStore, id: String| {
        let call = format!("call-{id}");
        let bound = store.bind("a", &id, &call, object(&call).into(), NOW + 1, NOW);
        async move { bound.await?.await }
    };
    let store = SqliteStore::open_with(&path, options.clone()).unwrap();
    // r00 is admitted first and bound last.
    let ids: Vec<String> = (0..30).map(|i| format!("r{i:02}")).collect();
    for id in &ids {
        assert_eq!(
            store.admit(request("a", id, 1)).await.unwrap(),
            AdmitOutcome::Admitted
        );
    }
    for id in &ids[1..] {
        bind(&store, id.clone()).await.unwrap();
    }
    let found = async |store: &SqliteStore, ids: &[String]| {
        for id in ids {
            let call = store.get_call("a", &format!("call-{id}")).await.unwrap();
            assert_eq!(call.map(|c| c.reservation_id).as_ref(), Some(id), "{id}");
            // Another tenant's id is not found.
            assert!(
                store
                    .get_call("b", &format!("call-{id}"))
                    .await
                    .unwrap()
                    .is_none()
            );
        }
    };
    found(&store, &ids[1..]).await;
    store.check_consistency(NOW).await.unwrap();
    let (entries, up_to) = merged(&path);
    assert!(
        up_to > 0 && entries.len() >= 4,
        "merged: {}, up to {up_to}",
        entries.len()
    );
    assert!(
        entries.len() < 29,
        "some still in memory: {}",
        entries.len()
    );
    // The late bind: r00's row is below what the merges cover.
    bind(&store, ids[0].clone()).await.unwrap();
    let (entries, _) = merged(&path);
    assert!(entries.contains(&("call-r00".into(), "r00".into())));
    found(&store, &ids).await;
    // An upstream id is bound once, whether merged (r01's) or in memory (r29's, the last bound
    // before r00), and a call keeps its id when bound again.
    assert_eq!(
        store.admit(request("a", "dup", 1)).await.unwrap(),
        AdmitOutcome::Admitted
    );
    for taken in ["call-r01", "call-r29", "call-r00"] {
        let twice = store
            .bind("a", "dup", taken, object(taken).into(), NOW + 1, NOW)
            .await
            .unwrap();
        assert!(twice.await.is_err(), "{taken}");
    }
    bind(&store, ids[5].clone()).await.unwrap();
    store.check_consistency(NOW).await.unwrap();
    drop(store);

    // A restart.
    let store = SqliteStore::open_with(&path, options.clone()).unwrap();
    found(&store, &ids).await;
    store.check_consistency(NOW).await.unwrap();
    drop(store);

    // A crash in the middle of a merge: half the entries above `up_to`'s earlier value merged,
    // `up_to` not moved, the bound the merge would set beside it (as the chunks' commits leave
    // them; the rows were not renumbered, so the entries are used as they are).
    assert!(merged(&path).1 >= 10);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "UPDATE call_keys_merged SET merging_up_to = up_to, merging_anchor = anchor,
             up_to = 10, anchor = (SELECT reservation_id FROM calls WHERE rowid = 10);
         DELETE FROM call_keys WHERE row > 10 AND row % 2 = 0;",
    )
    .unwrap();
    drop(conn);
    let store = SqliteStore::open_with(&path, options).unwrap();
    found(&store, &ids).await;
    assert_eq!(merged(&path).1, 10, "not indexed afresh");
    store.check_consistency(NOW).await.unwrap();
    // New binds merge the rest in again.
    for i in 0..12 {
        let id = format!("s{i:02}");
        assert_eq!(
            store.admit(request("a", &id, 1)).await.unwrap(),
            AdmitOutcome::Admitted
        );
        bind(&store, id).await.unwrap();
    }
    found(&store, &ids).await;
    store.check_consistency(NOW).await.unwrap();
}

/// A late bind writes its row and its `call_keys` entry: both or neither, also inside a batch
/// (here a held transaction), where the bind has no savepoint from the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_bind_that_fails_leaves_its_row_unbound() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let object = |call: &str| serde_json::json!({"id": call, "status": "queued"});
    let bind = |store: &SqliteStore, id: &str, call: &str| {
        let bound = store.bind("a", id, call, object(call).into(), NOW + 1, NOW);
        async move { bound.await?.await }
    };
    let merging = SqliteOptions {
        merge_upstream_ids_at: 2,
        ..SqliteOptions::default()
    };
    // r00 stays unbound while the others are bound and merged past it.
    let store = SqliteStore::open_with(&path, merging.clone()).unwrap();
    for i in 0..10 {
        let id = format!("r{i:02}");
        assert_eq!(
            store.admit(request("a", &id, 1)).await.unwrap(),
            AdmitOutcome::Admitted
        );
        if i > 0 {
            bind(&store, &id, &format!("call-{id}")).await.unwrap();
        }
    }
    drop(store);
    assert!(merged(&path).1 > 1, "r00's row is covered by the merges");
    // The entry of the late bind below cannot be written.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON call_keys
             WHEN (SELECT call_id FROM calls WHERE rowid = NEW.row) = 'call-bad'
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
        )
        .unwrap();
    let held = SqliteOptions {
        lazy_sync: Duration::from_secs(60),
        ..merging
    };
    let store = SqliteStore::open_with(&path, held.clone()).unwrap();
    assert_eq!(
        store.admit(request("a", "r10", 1)).await.unwrap(),
        AdmitOutcome::Admitted
    );
    // Queued and held: the late bind after it runs in the same transaction.
    let _held = store
        .bind(
            "a",
            "r10",
            "call-r10",
            object("call-r10").into(),
            NOW + 1,
            NOW,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let failed = tokio::time::timeout(Duration::from_secs(10), bind(&store, "r00", "call-bad"));
    assert!(failed.await.expect("answered").is_err());
    assert!(store.get_call("a", "call-bad").await.unwrap().is_none());
    // Its row was left unbound: it binds to another id (held too: the stop commits it).
    let _held = store
        .bind(
            "a",
            "r00",
            "call-r00",
            object("call-r00").into(),
            NOW + 1,
            NOW,
        )
        .await
        .unwrap();
    let listed = store.list_calls("a", 20, None).await.unwrap();
    let r00 = listed.iter().find(|c| c.reservation_id == "r00").unwrap();
    assert_eq!(r00.call_id.as_deref(), Some("call-r00"));
    drop(store);
    let store = SqliteStore::open_with(&path, held).unwrap();
    for id in ["r00", "r05", "r10"] {
        let call = store.get_call("a", &format!("call-{id}")).await.unwrap();
        assert_eq!(call.map(|c| c.reservation_id).as_deref(), Some(id));
    }
    store.check_consistency(NOW).await.unwrap();
}

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
                ..SqliteOptions::default()
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

/// One process owns a state file: a second store on it is refused (the counters of two would
/// drift apart), and the file is free again once the first has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_owns_a_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let first = SqliteStore::open(&path, Synchronous::Full).unwrap();
    let again = path.clone();
    let second = tokio::task::spawn_blocking(move || SqliteStore::open(&again, Synchronous::Full))
        .await
        .unwrap();
    match second {
        Err(StoreError::Backend(message)) => assert!(message.contains("in use"), "{message}"),
        Err(other) => panic!("unexpected {other:?}"),
        Ok(_) => panic!("a second store opened the same file"),
    }
    drop(first);
    let third = tokio::task::spawn_blocking(move || SqliteStore::open(&path, Synchronous::Full))
        .await
        .unwrap();
    assert!(third.is_ok());
}

/// Closing the store makes what was queued durable, refuses later work, and resolves once the
/// store has let go of the file: the log is folded into it and removed (the writer's connection
/// closes last, after the read-only ones), and the lock file is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_store_folds_the_log_and_frees_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    // Lazy writes are held up to 5 s: long enough that the bind below is still held, in the
    // writer's open transaction, when the store closes.
    let options = SqliteOptions {
        lazy_sync: Duration::from_secs(5),
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open_with(&path, options).unwrap();
    assert_eq!(
        store.admit(request("a", "r1", 1)).await.unwrap(),
        AdmitOutcome::Admitted
    );
    // A read leaves an idle read-only connection open (before the bind: a read commits what is
    // held).
    assert!(store.get_call("a", "nope").await.unwrap().is_none());
    let _bound = store
        .bind(
            "a",
            "r1",
            "c1",
            serde_json::json!({"id": "c1"}).into(),
            NOW + 60,
            NOW,
        )
        .await
        .unwrap();
    assert!(path.with_extension("db-wal").exists());

    store.close().await.unwrap();
    assert!(
        !path.with_extension("db-wal").exists(),
        "the log is still there after close"
    );
    assert!(matches!(
        store.admit(request("a", "r2", 1)).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        store.get_call("a", "c1").await,
        Err(StoreError::Closed)
    ));
    store.close().await.unwrap();

    // The lock file is free: taking it does not wait (the store's own open would wait for it).
    let lock = std::fs::File::open(path.with_extension("db.lock")).unwrap();
    lock.try_lock().unwrap();
    drop(lock);
    let again = SqliteStore::open(&path, Synchronous::Full).unwrap();
    assert_eq!(again.usage("a", NOW).await.unwrap().slots, 1);
    assert!(again.get_call("a", "c1").await.unwrap().is_some());
    again.check_consistency(NOW).await.unwrap();
}

/// Forged relay tokens are answered from a read-only connection: they never wait for, or take
/// room in front of, the writer (here held up behind another process's write lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_relay_tokens_never_reach_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store: Arc<dyn StateStore> = Arc::new(SqliteStore::open(&path, Synchronous::Full).unwrap());
    let (token, stored) = RelayToken::issue("r0");
    let mut req = request("a", "r0", 10);
    req.token_hash = stored;
    assert_eq!(store.admit(req).await.unwrap(), AdmitOutcome::Admitted);
    let blocker = rusqlite::Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let stuck = tokio::spawn(store.admit(request("a", "r1", 10)));
    let (_, secret) = token.split_once('.').unwrap();
    for forged in [format!("r0.{}", "0".repeat(64)), format!("r9.{secret}")] {
        let forged = RelayToken::parse(&forged).unwrap();
        let event = CallEvent {
            call_id: Some("c0".into()),
            status: "completed".into(),
            duration: Some(1),
            is_final: true,
        };
        let outcome = tokio::time::timeout(
            Duration::from_secs(2),
            store.record_event(&forged, event, NOW),
        )
        .await
        .expect("answered without the writer")
        .unwrap();
        assert_eq!(outcome, EventOutcome::UnknownToken);
    }
    blocker.execute_batch("COMMIT").unwrap();
    assert_eq!(stuck.await.unwrap().unwrap(), AdmitOutcome::Admitted);
    assert_eq!(store.usage("a", NOW).await.unwrap().slots, 2);
    store.check_consistency(NOW).await.unwrap();
}

/// The write-ahead log starts over after each checkpoint: under writes without pause it stays
/// bounded, however long they go on (it once grew by 400 MB in six seconds of load). The
/// checkpointer thread folds it from 1 000 pages on; a writer that outruns it folds it itself
/// from 4 000 pages (16.5 MB with the frames' headers) on, after each commit, unless the
/// checkpointer's round holds the log at that moment: then it grows by what is committed until
/// that round ends (a slow disk's syncs included), hence the margin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_stays_bounded_under_continuous_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store: Arc<dyn StateStore> =
        Arc::new(SqliteStore::open(&path, Synchronous::Normal).unwrap());
    // Each bind is awaited after the next admission, which commits it (alone, it would be held
    // for the next operation up to LAZY_SYNC).
    let mut previous: Option<callgate::state::Queued> = None;
    for i in 0..4_000 {
        let id = format!("r{i:05}");
        let mut req = request("a", &id, 1);
        req.account_max_concurrent = 10_000;
        assert_eq!(store.admit(req).await.unwrap(), AdmitOutcome::Admitted);
        if let Some(bound) = previous.take() {
            bound.await.unwrap();
        }
        let bound = store
            .bind(
                "a",
                &id,
                &format!("c{i:05}"),
                serde_json::json!({"id": i}).into(),
                NOW + 1,
                NOW,
            )
            .await
            .unwrap();
        previous = Some(bound);
    }
    previous.unwrap().await.unwrap();
    let wal = std::fs::metadata(dir.path().join("state.db-wal"))
        .unwrap()
        .len();
    assert!(wal < 32 << 20, "the log is {wal} bytes");
    store.check_consistency(NOW).await.unwrap();
    // Every call and its bind is there after a restart (from the file and what the log holds).
    drop(store);
    let store: Arc<dyn StateStore> =
        Arc::new(SqliteStore::open(&path, Synchronous::Normal).unwrap());
    assert_eq!(store.usage("a", NOW).await.unwrap().slots, 4_000);
    for i in [0, 1_999, 3_999] {
        let call = store.get_call("a", &format!("c{i:05}")).await.unwrap();
        assert!(call.is_some(), "call c{i:05} is not in the file");
    }
    store.check_consistency(NOW).await.unwrap();
}

/// With `synchronous = "full"` a bind needs no sync of its own (nobody on the request path waits
/// for it): it rides on the next admission's, and with none coming it is synced and answered
/// at most `LAZY_SYNC` after its commit. Either way it is answered, and on the file after a
/// restart. (Which sync answered the second bind, the admission's or the timer's, the test
/// cannot see; that each is answered at all, it can.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_is_synced_by_the_next_admission_or_after_a_quiet_moment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store: Arc<dyn StateStore> = Arc::new(SqliteStore::open(&path, Synchronous::Full).unwrap());
    let bind = |id: &'static str| {
        store.bind(
            "a",
            id,
            &format!("call-{id}"),
            serde_json::json!({"id": id, "status": "queued"}).into(),
            NOW + 1,
            NOW,
        )
    };
    let within = |f| tokio::time::timeout(Duration::from_secs(10), f);
    // Alone: answered by the quiet moment's sync.
    assert_eq!(
        store.admit(request("a", "r1", 1)).await.unwrap(),
        AdmitOutcome::Admitted
    );
    within(bind("r1").await.unwrap())
        .await
        .expect("the bind was never answered")
        .unwrap();
    // Followed by an admission: answered with it.
    assert_eq!(
        store.admit(request("a", "r2", 1)).await.unwrap(),
        AdmitOutcome::Admitted
    );
    let bound = bind("r2").await.unwrap();
    assert_eq!(
        store.admit(request("a", "r3", 1)).await.unwrap(),
        AdmitOutcome::Admitted
    );
    within(bound)
        .await
        .expect("the bind was never answered")
        .unwrap();
    drop(store);
    let again = SqliteStore::open(&path, Synchronous::Full).unwrap();
    for id in ["r1", "r2"] {
        let call = again.get_call("a", &format!("call-{id}")).await.unwrap();
        assert_eq!(call.map(|c| c.reservation_id), Some(id.to_string()));
    }
    again.check_consistency(NOW).await.unwrap();
}

/// A bind nobody waits for is held in an open transaction for the next operation (here held
/// for a minute, so that nothing else commits it): a reader that asks for the calls gets it at
/// once, because asking commits what is held; and a failing operation in a later batch undoes
/// only its own writes, never the held bind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_bind_is_committed_for_a_reader_and_survives_a_failing_operation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store: Arc<dyn StateStore> = Arc::new(
        SqliteStore::open_with(
            &path,
            SqliteOptions {
                synchronous: Synchronous::Full,
                lazy_sync: Duration::from_secs(60),
                ..SqliteOptions::default()
            },
        )
        .unwrap(),
    );
    let within = |f| tokio::time::timeout(Duration::from_secs(10), f);
    for id in ["r1", "r2"] {
        assert_eq!(
            store.admit(request("a", id, 1)).await.unwrap(),
            AdmitOutcome::Admitted
        );
    }
    let bind = |id: &str, call: &str| {
        store.bind(
            "a",
            id,
            call,
            serde_json::json!({"id": call, "status": "queued"}).into(),
            NOW + 1,
            NOW,
        )
    };
    // A failing bind (no such reservation) alone in its transaction: rolled back whole (no
    // savepoint), and the writer goes on.
    let failed = bind("nope", "call-nope").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(10), failed)
            .await
            .expect("answered")
            .is_err()
    );
    // Queued, held, not committed: nothing waits for it. A reader asking for the calls gets it.
    let _held = bind("r1", "call-r1").await.unwrap();
    let listed = within(store.list_calls("a", 10, None))
        .await
        .expect("the reader waited for the held transaction's deadline")
        .unwrap();
    let r1 = listed.iter().find(|c| c.reservation_id == "r1").unwrap();
    assert_eq!(r1.call_id.as_deref(), Some("call-r1"));
    // Held again; a failing bind after it is refused, its writes undone, the held bind kept.
    // The bind has no savepoint of its own: one that fails at its one write (an upstream id
    // already bound) is backed out by SQLite, one that fails before (no such reservation) wrote
    // nothing.
    let _held = bind("r2", "call-r2").await.unwrap();
    // Long enough for the writer to have run it alone and held it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for (id, call) in [("r2", "call-r1"), ("nope", "call-nope")] {
        let failed = bind(id, call).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(10), failed)
                .await
                .expect("answered")
                .is_err()
        );
    }
    // And both are on the file: a new store (the first one's writer commits and syncs what it
    // holds when it stops) finds them by their upstream ids.
    drop(store);
    let again = SqliteStore::open(&path, Synchronous::Full).unwrap();
    for id in ["r1", "r2"] {
        let call = again.get_call("a", &format!("call-{id}")).await.unwrap();
        assert_eq!(call.map(|c| c.reservation_id), Some(id.to_string()));
    }
    again.check_consistency(NOW).await.unwrap();
}

/// A state file from before consents and suspensions had tables: the dry run's read-only
/// snapshot still reads the opt-outs it does have.
#[tokio::test]
async fn a_snapshot_of_an_older_file_reads_the_tables_it_has() {
    use callgate::state::sqlite::SqliteSnapshot;
    use callgate::state::{OptOut, StateView};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let store = SqliteStore::open(&path, Synchronous::Full).unwrap();
        let entry = OptOut {
            phone_number: "+14155551234".into(),
            tenant: None,
            source: "admin".into(),
            created_at: NOW,
        };
        assert!(store.add_opt_out(entry).await.unwrap());
    }
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("DROP TABLE consents; DROP TABLE suspensions;")
        .unwrap();
    drop(conn);
    let snapshot = SqliteSnapshot::open(&path).unwrap();
    let found = snapshot.opt_outs("+14155551234").await.unwrap();
    assert_eq!(found.len(), 1);
    assert!(snapshot.suspensions().await.unwrap().is_empty());
}

/// `VACUUM` may renumber the calls' rows: the row `up_to` names is then no longer the one it was,
/// and binds not yet merged could fall below it. The store notices (the row's reservation is kept
/// beside `up_to`) and indexes every upstream id in `call_keys` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_ids_survive_rows_renumbered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let open = |merge_at: usize| {
        let options = SqliteOptions {
            merge_upstream_ids_at: merge_at,
            ..SqliteOptions::default()
        };
        SqliteStore::open_with(&path, options).unwrap()
    };
    let object = |call: &str| serde_json::json!({"id": call, "status": "queued"});
    let bind = |store: &SqliteStore, id: String| {
        let call = format!("call-{id}");
        let bound = store.bind("a", &id, &call, object(&call).into(), NOW + 1, NOW);
        async move { bound.await?.await }
    };
    let ids: Vec<String> = (0..30).map(|i| format!("r{i:02}")).collect();
    let store = open(4);
    // Six rows that go away, for the renumbering to close up.
    let gone = ["g0", "g1", "g2", "g3", "g4", "g5"].map(String::from);
    for id in gone.iter().chain(&ids) {
        assert_eq!(
            store.admit(request("a", id, 1)).await.unwrap(),
            AdmitOutcome::Admitted
        );
    }
    for id in &gone {
        store.release(id).await.unwrap();
    }
    for id in &ids[..10] {
        bind(&store, id.clone()).await.unwrap();
    }
    drop(store);
    // The rest stay in memory: no merge starts before 1 000.
    let store = open(1000);
    for id in &ids[10..] {
        bind(&store, id.clone()).await.unwrap();
    }
    drop(store);
    let (_, up_to) = merged(&path);
    assert!(up_to > 0);
    // Renumbered as a VACUUM may: the rows close up over the six that went.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "BEGIN; CREATE TABLE t AS SELECT * FROM calls ORDER BY rowid; DELETE FROM calls;
         INSERT INTO calls SELECT * FROM t ORDER BY rowid; DROP TABLE t; COMMIT;",
    )
    .unwrap();
    let below: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM calls c WHERE rowid <= ?1 AND call_id IS NOT NULL
             AND NOT EXISTS (SELECT 1 FROM call_keys k WHERE k.row = c.rowid)",
            [up_to],
            |r| r.get(0),
        )
        .unwrap();
    assert!(below > 0, "binds not merged are now below up_to");
    drop(conn);
    let store = open(4);
    for id in &ids {
        let call = store.get_call("a", &format!("call-{id}")).await.unwrap();
        assert_eq!(call.map(|c| c.reservation_id).as_ref(), Some(id), "{id}");
    }
    store.check_consistency(NOW).await.unwrap();
    drop(store);
    assert_eq!(merged(&path).0.len(), ids.len());
}

/// Files of two older layouts: upstream ids in `call_ids`, keyed by the id as text, and that
/// table beside the partial index `calls_call_id` (which a version from before the table makes
/// again when it writes to the file). Either is indexed in `call_keys` once, from the calls (not
/// from `call_ids`, which holds a stale entry here, as a version that changed a binding may leave
/// it), and the old table, its bound and the index are dropped.
#[tokio::test]
async fn a_file_with_upstream_ids_as_text_moves_them_into_call_keys() {
    for with_index in [false, true] {
        moved_into_call_keys(with_index).await;
    }
}

async fn moved_into_call_keys(with_index: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let object = |call: &str| serde_json::json!({"id": call, "status": "queued"});
    {
        let store = SqliteStore::open(&path, Synchronous::Full).unwrap();
        for id in ["r1", "r2", "r3"] {
            assert_eq!(
                store.admit(request("a", id, 1)).await.unwrap(),
                AdmitOutcome::Admitted
            );
        }
        for id in ["r1", "r2"] {
            let call = format!("call-{id}");
            let queued = store
                .bind("a", id, &call, object(&call).into(), NOW + 1, NOW)
                .await
                .unwrap();
            queued.await.unwrap();
        }
    }
    // The older layout, as that version made it.
    let index = if with_index {
        "CREATE UNIQUE INDEX calls_call_id ON calls(call_id) WHERE call_id IS NOT NULL;"
    } else {
        ""
    };
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(&format!(
        "DROP TABLE call_keys; DROP TABLE call_keys_merged;
         CREATE TABLE call_ids (call_id TEXT PRIMARY KEY, reservation_id TEXT NOT NULL) WITHOUT ROWID;
         INSERT INTO call_ids VALUES ('call-r1', 'r3');
         CREATE TABLE call_ids_merged (up_to INTEGER NOT NULL, anchor TEXT);
         INSERT INTO call_ids_merged VALUES (2, 'r2');
         {index}"
    ))
    .unwrap();
    drop(conn);
    let store = SqliteStore::open(&path, Synchronous::Full).unwrap();
    for id in ["r1", "r2"] {
        let call = store.get_call("a", &format!("call-{id}")).await.unwrap();
        assert_eq!(call.map(|c| c.reservation_id), Some(id.to_string()));
    }
    store.check_consistency(NOW).await.unwrap();
    let twice = store
        .bind("a", "r3", "call-r1", object("call-r1").into(), NOW + 1, NOW)
        .await
        .unwrap();
    assert!(twice.await.is_err());
    drop(store);
    let (entries, up_to) = merged(&path);
    assert_eq!(
        entries,
        [
            ("call-r1".into(), "r1".into()),
            ("call-r2".into(), "r2".into())
        ]
    );
    // The last bound row: r3 is not bound.
    assert_eq!(up_to, 2);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let old: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_schema WHERE name IN ('calls_call_id', 'call_ids')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(old, 0);
    // The older version's bound went with its table: that version, started on the file again,
    // makes its `call_ids` afresh from the calls.
    let bound: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_schema WHERE name = 'call_ids_merged'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(bound, 0);
}

/// A merge whose first chunk cannot be written (here every entry is refused) is forgotten, as if
/// it had not started: the file has no bound for it, so a bind of a row it would have covered
/// stays in memory instead of going to `call_keys` unrecorded (where it would be refused here),
/// and every bind is found after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_whose_first_chunk_fails_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let options = SqliteOptions {
        merge_upstream_ids_at: 2,
        ..SqliteOptions::default()
    };
    let object = |call: &str| serde_json::json!({"id": call, "status": "queued"});
    let bind = |store: &SqliteStore, id: &str| {
        let call = format!("call-{id}");
        let bound = store.bind("a", id, &call, object(&call).into(), NOW + 1, NOW);
        async move { bound.await?.await }
    };
    let store = SqliteStore::open_with(&path, options.clone()).unwrap();
    for i in 0..6 {
        assert_eq!(
            store
                .admit(request("a", &format!("r{i}"), 1))
                .await
                .unwrap(),
            AdmitOutcome::Admitted
        );
    }
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON call_keys
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
        )
        .unwrap();
    // r5's and r4's rows (6 and 5) start a merge up to row 6, whose first chunk fails.
    bind(&store, "r5").await.unwrap();
    bind(&store, "r4").await.unwrap();
    // Row 2 is below that bound: it is bound in memory, not refused by the table.
    bind(&store, "r1").await.unwrap();
    store.check_consistency(NOW).await.unwrap();
    drop(store);
    assert_eq!(merged(&path), (vec![], 0));
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("DROP TRIGGER refuse;")
        .unwrap();
    let store = SqliteStore::open_with(&path, options).unwrap();
    for id in ["r5", "r4", "r1"] {
        let call = store.get_call("a", &format!("call-{id}")).await.unwrap();
        assert_eq!(call.map(|c| c.reservation_id).as_deref(), Some(id), "{id}");
    }
    store.check_consistency(NOW).await.unwrap();
}

/// Going back one version and forward again: the older version, started on a file this one
/// wrote, makes its `call_ids` and binds a call this version's `call_keys` does not hold, below
/// the bound this version had merged to. This version, started again, sees `call_ids` and indexes
/// every bound call afresh: the call bound meanwhile is found, and its id stays unique.
#[tokio::test]
async fn a_file_the_older_version_wrote_to_again_is_indexed_afresh() {
    // The version before this one (`call_ids`), and the one before it (the partial index).
    for with_table in [true, false] {
        indexed_afresh(with_table).await;
    }
}

async fn indexed_afresh(with_table: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let object = |call: &str| serde_json::json!({"id": call, "status": "queued"});
    let options = SqliteOptions {
        merge_upstream_ids_at: 1,
        ..SqliteOptions::default()
    };
    {
        let store = SqliteStore::open_with(&path, options.clone()).unwrap();
        for id in ["r1", "r2", "r3"] {
            assert_eq!(
                store.admit(request("a", id, 1)).await.unwrap(),
                AdmitOutcome::Admitted
            );
        }
        for id in ["r1", "r3"] {
            let call = format!("call-{id}");
            let queued = store
                .bind("a", id, &call, object(&call).into(), NOW + 1, NOW)
                .await
                .unwrap();
            queued.await.unwrap();
        }
        // Unbound rows after r3 until r3's row is merged.
        admit_until_merged(&store, &path, 3).await;
    }
    let (_, up_to) = merged(&path);
    assert_eq!(up_to, 3, "r3's row is merged");
    // The older version's bind of r2 (row 2, below up_to): its row, and its `call_ids` entry or
    // the partial index that version makes again.
    let older = if with_table {
        "CREATE TABLE call_ids (call_id TEXT PRIMARY KEY, reservation_id TEXT NOT NULL) WITHOUT ROWID;
         INSERT INTO call_ids VALUES ('call-r2', 'r2');"
    } else {
        "CREATE UNIQUE INDEX calls_call_id ON calls(call_id) WHERE call_id IS NOT NULL;"
    };
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(&format!(
        "{older}
         UPDATE calls SET call_id = 'call-r2', status = 'queued' WHERE reservation_id = 'r2';"
    ))
    .unwrap();
    drop(conn);
    let store = SqliteStore::open_with(&path, options).unwrap();
    for id in ["r1", "r2", "r3"] {
        let call = store.get_call("a", &format!("call-{id}")).await.unwrap();
        assert_eq!(call.map(|c| c.reservation_id), Some(id.to_string()), "{id}");
    }
    store.check_consistency(NOW).await.unwrap();
    assert_eq!(
        store.admit(request("a", "r4", 1)).await.unwrap(),
        AdmitOutcome::Admitted
    );
    let twice = store
        .bind("a", "r4", "call-r2", object("call-r2").into(), NOW + 1, NOW)
        .await
        .unwrap();
    assert!(twice.await.is_err(), "call-r2 is bound to r2");
    drop(store);
    assert_eq!(merged(&path).0.len(), 3);
}

/// A merge that stopped half-way (a crash) left entries above `up_to`, below the bound it would
/// have set; a `VACUUM` then renumbered the rows above `up_to` only (released calls there closed
/// up), so `up_to`'s own row is unchanged. The start notices by the merge's bound, kept beside
/// `up_to` with its reservation, and indexes every upstream id afresh: no entry names a row that
/// does not have its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_stopped_half_way_and_rows_renumbered_above_up_to_are_indexed_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let options = SqliteOptions {
        merge_upstream_ids_at: 4,
        ..SqliteOptions::default()
    };
    let object = |call: &str| serde_json::json!({"id": call, "status": "queued"});
    // Rows 1-12 bound, 13-15 released later, 16-30 bound.
    let bound: Vec<String> = (0..12)
        .map(|i| format!("a{i:02}"))
        .chain((0..15).map(|i| format!("b{i:02}")))
        .collect();
    let gone = ["g0", "g1", "g2"];
    {
        let store = SqliteStore::open_with(&path, options.clone()).unwrap();
        for id in bound[..12]
            .iter()
            .map(String::as_str)
            .chain(gone)
            .chain(bound[12..].iter().map(String::as_str))
        {
            assert_eq!(
                store.admit(request("a", id, 1)).await.unwrap(),
                AdmitOutcome::Admitted
            );
        }
        for id in gone {
            store.release(id).await.unwrap();
        }
        for id in &bound {
            let call = format!("call-{id}");
            let queued = store
                .bind("a", id, &call, object(&call).into(), NOW + 1, NOW)
                .await
                .unwrap();
            queued.await.unwrap();
        }
        // Unbound rows after row 30 until the binds are merged up to row 24 at least (the last
        // three may stay in memory: fewer than a merge starts at).
        admit_until_merged(&store, &path, 24).await;
    }
    let (_, up_to) = merged(&path);
    assert!(up_to >= 24, "merged past the released rows: {up_to}");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "UPDATE call_keys_merged SET merging_up_to = up_to, merging_anchor = anchor,
             up_to = 10, anchor = (SELECT reservation_id FROM calls WHERE rowid = 10);
         DELETE FROM call_keys WHERE row > 10 AND row % 2 = 0;",
    )
    .unwrap();
    let entries_above = |conn: &rusqlite::Connection| -> Vec<(i64, Option<String>)> {
        let mut stmt = conn
            .prepare(
                "SELECT k.row, c.call_id FROM call_keys k LEFT JOIN calls c ON c.rowid = k.row
                 WHERE k.row > 10 ORDER BY k.row",
            )
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let before = entries_above(&conn);
    conn.execute_batch(
        "BEGIN; CREATE TABLE t AS SELECT * FROM calls WHERE rowid > 10 ORDER BY rowid;
         DELETE FROM calls WHERE rowid > 10;
         INSERT INTO calls SELECT * FROM t ORDER BY rowid; DROP TABLE t; COMMIT;",
    )
    .unwrap();
    // The rows above 10 closed up over the three released: entries left there name rows that
    // hold other calls now, and `up_to`'s row is the same.
    let after = entries_above(&conn);
    assert!(
        before.iter().zip(&after).any(|(b, a)| b.1 != a.1),
        "{before:?} {after:?}"
    );
    let anchor_row: i64 = conn
        .query_row(
            "SELECT rowid FROM calls WHERE reservation_id = (SELECT anchor FROM call_keys_merged)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(anchor_row, 10);
    drop(conn);
    let store = SqliteStore::open_with(&path, options).unwrap();
    for id in &bound {
        let call = store.get_call("a", &format!("call-{id}")).await.unwrap();
        assert_eq!(call.map(|c| c.reservation_id).as_ref(), Some(id), "{id}");
    }
    store.check_consistency(NOW).await.unwrap();
}

/// A file from before the upstream id's index was partial has `call_id TEXT UNIQUE`, which
/// indexes every admission's NULL: the calls table is rebuilt once when the store opens, with
/// every call as it was (and, in files from before relay tokens named their reservation, the
/// unique index on token hashes); the upstream id is still unique.
#[tokio::test]
async fn a_file_with_the_old_call_id_constraint_is_rebuilt_with_its_calls() {
    // The layouts: `call_id TEXT UNIQUE` alone, and with `token_hash TEXT NOT NULL UNIQUE`.
    for legacy_tokens in [false, true] {
        rebuilt_with_its_calls(legacy_tokens).await;
    }
}

async fn rebuilt_with_its_calls(legacy_tokens: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let bound = |id: &str| serde_json::json!({"id": format!("call-{id}"), "status": "queued"});
    {
        let store = SqliteStore::open(&path, Synchronous::Full).unwrap();
        for id in ["r1", "r2", "r3"] {
            assert_eq!(
                store.admit(request("a", id, 1)).await.unwrap(),
                AdmitOutcome::Admitted
            );
        }
        for id in ["r1", "r2"] {
            let call = format!("call-{id}");
            let queued = store
                .bind("a", id, &call, bound(id).into(), NOW + 1, NOW)
                .await
                .unwrap();
            queued.await.unwrap();
        }
    }
    // The old layout, made from the new one: the same rows, the old column constraints.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let sql: String = conn
        .query_row(
            "SELECT sql FROM sqlite_schema WHERE name = 'calls'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let mut old = sql
        .replacen("CREATE TABLE calls", "CREATE TABLE calls_old", 1)
        .replacen("call_id          TEXT,", "call_id          TEXT UNIQUE,", 1);
    if legacy_tokens {
        old = old.replacen(
            "token_hash       TEXT NOT NULL,",
            "token_hash       TEXT NOT NULL UNIQUE,",
            1,
        );
    }
    assert_eq!(
        old.matches(" UNIQUE,").count(),
        1 + usize::from(legacy_tokens),
        "{old}"
    );
    conn.execute_batch(&format!(
        "BEGIN; {old}; INSERT INTO calls_old SELECT * FROM calls; DROP TABLE calls;
         DROP TABLE call_keys; DROP TABLE call_keys_merged;
         ALTER TABLE calls_old RENAME TO calls;
         CREATE INDEX calls_tenant ON calls(tenant, reservation_id);
         CREATE INDEX calls_lease ON calls(lease_expires_at) WHERE live = 1; COMMIT;"
    ))
    .unwrap();
    let unique = |conn: &rusqlite::Connection| -> Vec<(String, String, i64)> {
        let mut stmt = conn
            .prepare("SELECT name, origin, partial FROM pragma_index_list('calls') WHERE \"unique\" = 1 ORDER BY name")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let constraints = unique(&conn)
        .iter()
        .filter(|(_, origin, _)| origin == "u")
        .count();
    assert_eq!(constraints, 1 + usize::from(legacy_tokens));
    drop(conn);

    let store = SqliteStore::open(&path, Synchronous::Full).unwrap();
    for id in ["r1", "r2"] {
        let call = store.get_call("a", &format!("call-{id}")).await.unwrap();
        assert_eq!(call.map(|c| c.reservation_id), Some(id.to_string()));
    }
    assert_eq!(store.usage("a", NOW).await.unwrap().slots, 3);
    store.check_consistency(NOW).await.unwrap();
    // An upstream id is still bound to one call only.
    let twice = store
        .bind("a", "r3", "call-r1", bound("r1").into(), NOW + 1, NOW)
        .await
        .unwrap();
    assert!(twice.await.is_err());
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let indexes = unique(&conn);
    assert!(
        !indexes.iter().any(|(_, origin, _)| origin == "u"),
        "{indexes:?}"
    );
    // Upstream ids are in their table, not in an index of the calls.
    assert!(
        !indexes.iter().any(|(name, _, _)| name == "calls_call_id"),
        "{indexes:?}"
    );
    let (entries, up_to) = merged(&path);
    assert_eq!(
        entries,
        [
            ("call-r1".into(), "r1".into()),
            ("call-r2".into(), "r2".into())
        ]
    );
    // The last bound row: r3 is not bound.
    assert_eq!(up_to, 2);
    // The unique index on token hashes is kept where the file had one.
    assert_eq!(
        indexes.contains(&("calls_token_hash".to_string(), "c".to_string(), 0)),
        legacy_tokens,
        "{indexes:?}"
    );
}
