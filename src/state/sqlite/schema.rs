//! The file's layout, how its connections are opened, and the counters rebuilt from it.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use crate::state::accounting::{Ledger, Spend};
use crate::state::{Period, StoreError};

/// The calls table's columns. `call_id` (the upstream's id) is found through `call_keys` and the
/// bind index in memory ([`super::call_index`]), which also keep it unique; the table has no
/// index on it (a column `UNIQUE` would index an admission's NULL, and the bind would move it).
const CALLS_COLUMNS: &str = "(
    reservation_id   TEXT PRIMARY KEY,
    tenant           TEXT NOT NULL,
    call_id          TEXT,
    token_hash       TEXT NOT NULL,
    status           TEXT NOT NULL,
    object           TEXT,
    live             INTEGER NOT NULL,
    hold             INTEGER NOT NULL,
    charged          INTEGER NOT NULL DEFAULT 0,
    price            INTEGER NOT NULL,
    increment_secs   INTEGER NOT NULL,
    max_duration     INTEGER NOT NULL,
    duration         INTEGER,
    lease_expires_at INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    tenant_webhook   TEXT
)";

/// Every column of the calls table, in order (copied as they are when the table is rebuilt).
const CALLS_COLUMN_NAMES: &str = "reservation_id, tenant, call_id, token_hash, status, object, live, \
     hold, charged, price, increment_secs, max_duration, duration, lease_expires_at, created_at, \
     updated_at, tenant_webhook";

/// Tables and indexes, after `CREATE TABLE IF NOT EXISTS calls` [`CALLS_COLUMNS`]. Runtime
/// opt-outs are keyed by number and scope (`*` for every tenant, else the tenant id); attempts by
/// scope (a tenant id, or `#account`), number and reservation id. Calls are found by reservation
/// id (primary key; relay tokens name it), upstream id (`call_keys`: reads, reconciliation),
/// tenant (listing) and lease end (the sweeper); nothing on the request path counts them: the live counters do.
/// Every index costs a page write per commit, so there is none that is not needed (files made
/// before 0.2 keep a unique index on `token_hash`: harmless).
const SCHEMA: &str = "
DROP INDEX IF EXISTS calls_live;
CREATE TABLE IF NOT EXISTS call_keys (
    key INTEGER NOT NULL,
    row INTEGER NOT NULL,
    PRIMARY KEY (key, row)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS call_keys_merged (
    up_to          INTEGER NOT NULL,
    anchor         TEXT,
    merging_up_to  INTEGER,
    merging_anchor TEXT
);
CREATE INDEX IF NOT EXISTS calls_tenant ON calls(tenant, reservation_id);
CREATE INDEX IF NOT EXISTS calls_lease ON calls(lease_expires_at) WHERE live = 1;
CREATE TABLE IF NOT EXISTS budgets (
    tenant       TEXT PRIMARY KEY,
    period       TEXT NOT NULL,
    timezone     TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    spent        INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
    tenant       TEXT NOT NULL,
    key          TEXT NOT NULL,
    body_hash    TEXT NOT NULL,
    state        TEXT NOT NULL,
    status       INTEGER,
    body         BLOB,
    content_type TEXT,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    PRIMARY KEY (tenant, key)
);
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency(expires_at);
CREATE TABLE IF NOT EXISTS opt_outs (
    phone_number TEXT NOT NULL,
    scope        TEXT NOT NULL,
    source       TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (phone_number, scope)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attempts (
    scope        TEXT NOT NULL,
    phone_number TEXT NOT NULL,
    attempt_id   TEXT NOT NULL,
    at           INTEGER NOT NULL,
    PRIMARY KEY (scope, phone_number, attempt_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS attempts_at ON attempts(at);
CREATE TABLE IF NOT EXISTS consents (
    id           TEXT PRIMARY KEY,
    tenant       TEXT NOT NULL,
    phone_number TEXT NOT NULL,
    record       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS consents_number ON consents(phone_number);
CREATE TABLE IF NOT EXISTS suspensions (
    region TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
";

/// Pages in the write-ahead log from which the checkpointer thread folds it into the file (4 MB;
/// see [`super::writer`]). A longer log was measured (docs/benchmarks.md, "One commit per call, a
/// longer log"): 10 000 pages help a small file (one connection's p99 4.9 → 3.8 ms, saturation
/// +6%), but with 100 000 calls in the file each checkpoint copies thousands of scattered pages:
/// one connection's p99 9 → 36 ms, saturation's 28 → 70 ms. A production file holds every call,
/// so the short log stays.
pub const CHECKPOINT_PAGES: i64 = 1000;

/// Pages in the log from which the writer folds it itself, when the checkpointer has not caught up
/// (a writer that commits without pause for longer than a checkpoint takes).
pub const WRITER_CHECKPOINT_PAGES: i64 = 4 * CHECKPOINT_PAGES;

/// The writer's page cache, KiB (1 000 pages). 4 MiB was faster than 8 once the file had grown:
/// after a split of an index page, SQLite's commit walks every page in the cache
/// (`balance_nonroot`'s temporary page number raises the cache's largest key; see
/// docs/benchmarks.md, "... the page cache's full scans"), and the upstream-id index's random keys
/// split a page every few commits (before binds were merged into it in sorted chunks,
/// [`super::call_index`]). Measured after 20 s at saturation (about 200 000 calls), five
/// interleaved rounds of 4 MiB against 8 MiB: the writer's user time per call 21.6 against
/// 26.5 µs, all of the gateway's CPU per call −8%, for 0.28 more page reads per call (from the
/// kernel's page cache). 2 MiB did not beat 4.
const WRITER_CACHE_KIB: i64 = 4 * 1024;

/// Prepared statements kept per connection: every statement the store runs fits.
const STATEMENT_CACHE: usize = 64;

/// Open (or create) the file for the writer: WAL, the schema.
pub fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    create_parent(path)?;
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // SQLite itself never syncs a commit: with `full`, the writer syncs the log after a commit
    // that someone waits for, before it answers them, and any other write within
    // `writer::LAZY_SYNC` (see `writer`), so that a bind rides on the next admission's sync. A
    // checkpoint still syncs the log before it copies it into the file and the file after, and
    // a restarted log's header is synced before any frame after it, as SQLite does at NORMAL.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // The writer's page cache: the recent end of every index and the inner pages stay in
    // memory instead of being read back each commit (sized by the full scans above).
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
    // No automatic checkpoint: it would run inside the commit, before the writer answers, and
    // stop the writer for the whole copy. The checkpointer thread folds the log, and the writer
    // finishes what it could not (see `writer`), so that the log starts over: overwritten in
    // place, a commit's sync has no file size to flush.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    migrate_call_id_constraint(&conn)?;
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS calls {CALLS_COLUMNS};"
    ))?;
    conn.execute_batch(SCHEMA)?;
    super::call_index::migrate(&conn)?;
    Ok(conn)
}

/// Open a connection for the checkpointer thread: it only folds the log into the file. With
/// `synchronous = "normal"` SQLite syncs the log before it copies it, and the file once a
/// checkpoint has copied all of the log, before the log may start over.
pub fn open_checkpointer(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(conn)
}

/// Files made before the upstream id's index was partial have `call_id TEXT UNIQUE`, a
/// constraint SQLite cannot drop: the calls table is rebuilt once, in one transaction, with
/// every row as it was (the indexes are made again by [`SCHEMA`], and the legacy index on
/// `token_hash`, if the file has one, with them). It needs free space for a second copy of the
/// table while it runs; the old table's pages are then free in the file for later calls.
fn migrate_call_id_constraint(conn: &Connection) -> Result<(), StoreError> {
    if !has_call_id_constraint(conn)? {
        return Ok(());
    }
    let legacy_tokens = has_token_index(conn)?;
    let started = std::time::Instant::now();
    tracing::info!(
        "state file: rebuilding the calls table once, for a partial index of upstream ids"
    );
    let token_index = if legacy_tokens {
        "CREATE UNIQUE INDEX calls_token_hash ON calls(token_hash);"
    } else {
        ""
    };
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         CREATE TABLE calls_rebuilt {CALLS_COLUMNS};
         INSERT INTO calls_rebuilt ({CALLS_COLUMN_NAMES}) SELECT {CALLS_COLUMN_NAMES} FROM calls;
         DROP TABLE calls;
         ALTER TABLE calls_rebuilt RENAME TO calls;
         {token_index}
         COMMIT;"
    ))
    .inspect_err(|_| {
        let _ = conn.execute_batch("ROLLBACK");
    })?;
    // The copy went through the log: fold it into the file and give the log's space back now,
    // rather than keep a log the size of the table until the gateway stops.
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "state file: calls table rebuilt"
    );
    Ok(())
}

/// Whether the calls table has the column constraint `call_id UNIQUE` of older files.
fn has_call_id_constraint(conn: &Connection) -> Result<bool, StoreError> {
    let mut indexes =
        conn.prepare("SELECT name FROM pragma_index_list('calls') WHERE origin = 'u'")?;
    let names: Vec<String> = indexes
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut columns = conn.prepare("SELECT name FROM pragma_index_info(?1)")?;
    for name in names {
        let indexed: Vec<String> = columns
            .query_map([&name], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if indexed == ["call_id"] {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The writer's log (`<file>-wal`, next to the file SQLite resolved, symbolic links followed),
/// opened for the writer's syncs. SQLite opened it with the writer's connection, and keeps that
/// file (restarted in place, never replaced: the writer's connection holds a shared lock on the
/// file, so no other connection closing can delete it) while the connection is open; a sync
/// through any descriptor of it flushes what SQLite wrote through its own.
pub fn open_log(conn: &Connection) -> Result<std::fs::File, StoreError> {
    let mut log = std::ffi::OsString::from(file_path(conn)?);
    log.push("-wal");
    let log = PathBuf::from(log);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", log.display())))
}

/// The path of the file `conn` is open on, as SQLite resolved it.
pub fn file_path(conn: &Connection) -> Result<PathBuf, StoreError> {
    conn.path()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| StoreError::Backend("the state file has no path".into()))
}

fn create_parent(path: &Path) -> Result<(), StoreError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Backend(format!("cannot create {}: {e}", dir.display())))?;
    }
    Ok(())
}

/// Take the file for this process: an exclusive lock on `<file>.lock`, held until the returned
/// handle is dropped. Waits up to [`LOCK_WAIT`] for a gateway that is stopping to let go.
pub fn lock(path: &Path) -> Result<std::fs::File, StoreError> {
    create_parent(path)?;
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", lock_path.display())))?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Backend(format!(
                    "{} is in use by another callgate process (one process owns a state file)",
                    path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::Backend(format!(
                    "cannot lock {}: {e}",
                    lock_path.display()
                )));
            }
        }
    }
}

/// How long [`lock`] waits for another process to let the file go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Open a read-only connection to the file (WAL: it reads the last commit, never waits for one).
pub fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Whether the file has the unique index on relay token hashes of files made before tokens named
/// their reservation.
pub fn has_token_index(conn: &Connection) -> Result<bool, StoreError> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_index_info(?1)")?;
    let mut indexes = conn.prepare("SELECT name FROM pragma_index_list('calls')")?;
    let names: Vec<String> = indexes
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for name in names {
        let columns: Vec<String> = stmt
            .query_map([&name], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if columns == ["token_hash"] {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Each tenant's live calls, read through the partial index of live calls. Left to itself, the
/// planner walks `calls_tenant` for the grouping, every call the file ever had: 1.9 s at start on
/// a file of five million settled calls, against 0.1 ms (docs/benchmarks.md, "A filter of
/// upstream ids").
const LIVE_BY_TENANT: &str = "SELECT tenant, COUNT(*), COALESCE(SUM(hold), 0)
     FROM calls INDEXED BY calls_lease WHERE live = 1 GROUP BY tenant";

/// The live counters as the file has them: each tenant's live calls, and its stored spend.
pub fn load_ledger(conn: &Connection) -> Result<Ledger, StoreError> {
    let mut live = conn.prepare_cached(LIVE_BY_TENANT)?;
    let live: Vec<(String, i64, i64)> = live
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut spends =
        conn.prepare_cached("SELECT tenant, period, timezone, period_start, spent FROM budgets")?;
    let spends: Vec<(String, Spend)> = spends
        .query_map([], |r| {
            let period: String = r.get(1)?;
            Ok((
                r.get(0)?,
                Spend::new(Period::parse(&period), r.get(2)?, r.get(3)?, r.get(4)?),
            ))
        })?
        .collect::<Result<_, _>>()?;
    Ok(Ledger::rebuild(live, spends))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start's count of live calls reads the live calls only, whatever the file holds.
    #[test]
    fn the_live_calls_are_counted_from_their_own_index() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("state.db")).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {LIVE_BY_TENANT}"))
            .unwrap()
            .query_map([], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|step| step.contains("USING INDEX calls_lease")),
            "{plan:?}"
        );
        assert!(
            !plan.iter().any(|step| step.contains("calls_tenant")),
            "{plan:?}"
        );
        conn.execute_batch(
            "INSERT INTO calls (reservation_id, tenant, token_hash, status, live, hold, price,
                 increment_secs, max_duration, lease_expires_at, created_at, updated_at)
             VALUES ('r1', 'a', 'h1', 'queued', 1, 5, 0, 1, 60, 0, 0, 0),
                    ('r2', 'a', 'h2', 'completed', 0, 0, 0, 1, 60, 0, 0, 0),
                    ('r3', 'b', 'h3', 'queued', 1, 7, 0, 1, 60, 0, 0, 0)",
        )
        .unwrap();
        let live: Vec<(String, i64, i64)> = conn
            .prepare(LIVE_BY_TENANT)
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(live, vec![("a".to_string(), 1, 5), ("b".to_string(), 1, 7)]);
    }
}
