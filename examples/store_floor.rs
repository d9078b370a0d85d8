//! What a durable record of a call costs in SQLite on this machine, in CPU per call (user and
//! system time of the whole process, `getrusage`), for docs/benchmarks.md ("The budget for 0.5x
//! measured, and the floor of a durable record"):
//!
//! - `floor 1 row`: the least any SQLite store could do for an admission that is on disk before
//!   the call is forwarded: one row per call (a version 7 UUID key and 150 bytes, in a
//!   `WITHOUT ROWID` table: one b-tree), `BATCH` calls to a transaction, the log synced once a
//!   transaction. The writer's settings: WAL, `synchronous = NORMAL` and an `fdatasync` of the
//!   log after each commit (what callgate does at `full`), checkpoints every 1 000 pages.
//! - `floor 2 rows`: the same and the bind (the upstream's id and 60 bytes, a second b-tree keyed
//!   by the call's own id, so that it too is written in order; a look-up by upstream id is kept
//!   elsewhere, as callgate keeps it in memory), in the next transaction, as callgate's group
//!   commit carries a call's bind after its admission.
//! - `callgate's store`: callgate's SQLite store itself (`SqliteStore`, `synchronous = full`),
//!   `BATCH` tasks each admitting and binding calls one after another on one runtime thread, as
//!   the request thread does: the admission waited for, the bind queued. Its writer thread's
//!   share is printed apart.
//!
//! `cargo build --release --example store_floor`, then `store_floor [DIR] [CALLS] [BATCH] [ONLY]`
//! (a fresh temporary directory in DIR, `.` by default: put it on the state's file system;
//! 100 000 calls; 16; ONLY `floor` or `store` runs one part, e.g. under a profiler).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use callgate::state::sqlite::{SqliteStore, Synchronous};
use callgate::state::{AdmitOutcome, AdmitRequest, Answered, StateStore};
use rusqlite::{Connection, params};

// callgate's allocator, so that callgate's store is measured as it runs in the gateway.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| ".".to_string());
    let calls: u64 = args.next().map_or(100_000, |n| n.parse().expect("CALLS"));
    let batch: u64 = args.next().map_or(16, |n| n.parse().expect("BATCH"));
    let only = args.next().unwrap_or_default();
    assert!(batch > 0, "BATCH: at least 1");
    // Whole batches (and as many calls for each of callgate's store's tasks).
    let calls = (calls / batch).max(1) * batch;
    let tmp = tempfile::tempdir_in(&dir).expect("a temporary directory in DIR");
    println!(
        "{calls} calls, {batch} to a transaction (callgate's store: {batch} tasks), in {}",
        tmp.path().display()
    );
    for rows in [1, 2].into_iter().filter(|_| only != "store") {
        let path = tmp.path().join(format!("floor{rows}.db"));
        let (cpu, wall) = measure(|| floor(&path, calls, batch, rows == 2));
        report(
            &format!("floor {rows} row{}", if rows == 2 { "s" } else { "" }),
            calls,
            cpu,
            wall,
        );
    }
    if only == "floor" {
        return;
    }
    let path = tmp.path().join("callgate.db");
    let mut writer = Duration::ZERO;
    let (cpu, wall) = measure(|| writer = callgate_store(&path, calls, batch));
    report("callgate's store", calls, cpu, wall);
    println!(
        "  of which its writer and checkpoint threads {:.1} us per call",
        writer.as_secs_f64() * 1e6 / calls as f64
    );
}

/// The CPU time (user and system) of this process's thread named `name`.
fn thread_cpu(name: &str) -> Duration {
    // SAFETY: `sysconf` reads a constant of the system.
    let tick = 1.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // The fields after the command's closing parenthesis; utime and stime are 14th and 15th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 12 {
            total +=
                (f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0)) * tick;
        }
    }
    Duration::from_secs_f64(total)
}

fn report(what: &str, calls: u64, cpu: Duration, wall: Duration) {
    println!(
        "{what:<17} {:>6.1} us CPU per call, {:>8.0} calls/s",
        cpu.as_secs_f64() * 1e6 / calls as f64,
        calls as f64 / wall.as_secs_f64()
    );
}

/// The process's CPU time (user and system) and the wall time of `f`.
fn measure(f: impl FnOnce()) -> (Duration, Duration) {
    let (c0, w0) = (process_cpu(), Instant::now());
    f();
    (process_cpu() - c0, w0.elapsed())
}

fn process_cpu() -> Duration {
    // SAFETY: an all-zero `rusage` is valid, and `getrusage` writes a whole one.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is valid for the call to write.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn floor(path: &std::path::Path, calls: u64, batch: u64, bind: bool) {
    let conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
    conn.execute_batch(
        "CREATE TABLE calls (id TEXT PRIMARY KEY, row BLOB NOT NULL) WITHOUT ROWID;
         CREATE TABLE binds (id TEXT PRIMARY KEY, call_id TEXT NOT NULL, row BLOB NOT NULL) WITHOUT ROWID;",
    )
    .unwrap();
    // Written before the log exists, so that it can be opened for the syncs.
    conn.execute_batch("BEGIN IMMEDIATE; COMMIT;").unwrap();
    let log = std::fs::OpenOptions::new()
        .write(true)
        .open(path.with_extension("db-wal"))
        .expect("the log");
    let (admission, bound) = (vec![7u8; 150], vec![9u8; 60]);
    let mut pending: Vec<String> = Vec::new();
    // One more transaction at the end for the last batch's binds.
    let starts = (0..calls)
        .step_by(batch as usize)
        .chain(bind.then_some(calls));
    for start in starts {
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        let mut insert = conn
            .prepare_cached("INSERT INTO calls (id, row) VALUES (?1, ?2)")
            .unwrap();
        let mut binding = conn
            .prepare_cached("INSERT INTO binds (id, call_id, row) VALUES (?1, ?2, ?3)")
            .unwrap();
        // The binds of the previous batch's calls ride in this one, as the gateway's do.
        for id in pending.drain(..) {
            let call_id = format!("call_{}", uuid::Uuid::new_v4().simple());
            binding.execute(params![id, call_id, bound]).unwrap();
        }
        for _ in start..(start + batch).min(calls) {
            let id = uuid::Uuid::now_v7().to_string();
            insert.execute(params![id, admission]).unwrap();
            if bind {
                pending.push(id);
            }
        }
        conn.execute_batch("COMMIT").unwrap();
        // SAFETY: the log's descriptor is open for the call.
        assert_eq!(unsafe { libc::fdatasync(log.as_raw_fd()) }, 0);
    }
}

/// Runs the calls through callgate's store; returns its writer thread's CPU time.
fn callgate_store(path: &std::path::Path, calls: u64, tasks: u64) -> Duration {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let store: Arc<dyn StateStore> = Arc::new(SqliteStore::open(path, Synchronous::Full).unwrap());
    rt.block_on(async {
        let each = calls / tasks;
        let workers: Vec<_> = (0..tasks)
            .map(|t| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut last = None;
                    for i in 0..each {
                        let id = uuid::Uuid::now_v7().to_string();
                        let outcome = store.admit(request(&id, t * each + i)).await.unwrap();
                        assert_eq!(outcome, AdmitOutcome::Admitted);
                        let answered = Answered::from(serde_json::json!({
                            "id": format!("call_{}", uuid::Uuid::new_v4().simple()),
                            "status": "queued", "phone_number": "+14155551234",
                            "from_number": "+18005551234", "agent_id": "agent_abc123",
                            "max_duration": 600, "record": true,
                            "created_at": "2026-01-01T00:00:00Z",
                        }));
                        let call_id = format!("call_{}", uuid::Uuid::new_v4().simple());
                        let queued = store.bind("bench", &id, &call_id, answered, 2_000_000_000, 0);
                        last = Some(queued.await.unwrap());
                    }
                    if let Some(durable) = last {
                        durable.await.unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
    });
    // The names as the kernel keeps them (15 bytes).
    thread_cpu("callgate-sqlite") + thread_cpu("callgate-checkp")
}

fn request(id: &str, i: u64) -> AdmitRequest {
    AdmitRequest {
        reservation_id: id.to_string(),
        tenant: "bench".to_string(),
        token_hash: format!("{i:064x}"),
        tenant_max_concurrent: None,
        account_max_concurrent: u32::MAX,
        budget: None,
        hold: 10,
        price: 1,
        increment_secs: 60,
        max_duration: 600,
        lease_expires_at: 2_000_000_000,
        now: 0,
        tenant_webhook: Some("https://hooks.example.com/calls".to_string()),
    }
}
