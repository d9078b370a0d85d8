//! The one writer: a thread that owns the read-write connection and the live counters.
//!
//! Operations arrive on a bounded queue. The thread takes all that are waiting (up to a batch),
//! runs each in its own savepoint inside one transaction (one alone needs none, nor does one
//! that writes with a single statement: see [`Writes`]), commits once,
//! and only then answers the operations that wrote (group commit): an admission is on disk before
//! its call is forwarded, and many admissions share one fsync. A batch of binds alone is not
//! committed at once but held open for the next batch, at most [`LAZY_SYNC`] (see [`run`]): a
//! bind and the next admission share one commit. Operations that wrote nothing (a refused
//! admission, a look-up) are answered at once. Since the thread is the only writer and the only
//! one that changes the counters, each operation is atomic with respect to every other.
//!
//! With `synchronous = "full"` SQLite commits to the log without a sync, and the writer syncs
//! the log itself (`fdatasync`) before it answers a batch with an operation that waits for it.
//! An operation that needs to be durable but that nobody waits on (the bind, [`When::Lazy`])
//! needs no sync of its own: its batch is answered by the next sync, which the next admission
//! brings, or at the latest [`LAZY_SYNC`] after its commit (which is itself at most
//! [`LAZY_SYNC`] after it ran). So a call costs one sync, not two, even alone. Writes answered
//! at once ([`When::Now`]) are synced the same way. A commit is visible to readers (and the
//! counters changed) before it is durable, but nobody is told an operation is done before it is.
//!
//! The log is folded into the file (checkpointed) mostly by a thread of its own
//! (`callgate-checkpoint`, on a connection of its own), not inside a commit: SQLite's automatic
//! checkpoint runs in the commit that passes the log's size, before its batch is answered, and
//! stops the writer for the whole copy and two syncs (at one connection about one call in 150
//! waited 1 to 5 ms for it). Once the log holds [`schema::CHECKPOINT_PAGES`] that it has not
//! copied, the writer wakes the checkpointer, which copies what is committed while the writer
//! goes on (SQLite syncs the log first, and the file only after a round that copied all of the
//! log, before the log may start over). It cannot finish alone: each of its rounds
//! copies what was committed when it began, and the log starts over only once all of it is in
//! the file (else it would grow without bound; it once grew by 400 MB in 6 s). So after a commit,
//! once its batch is answered, the writer folds the rest itself when the checkpointer has left
//! fewer than [`FINISH_PAGES`] (a short copy and the syncs), or, if it commits too fast for that
//! to happen, when the log reaches [`schema::WRITER_CHECKPOINT_PAGES`] (a copy of what the
//! checkpointer has not copied: a stall, as every checkpoint was before, but rarer); its next
//! transaction starts the log over, which is then overwritten in place (a commit's sync has no
//! file size to flush). [`fold_steps`] decides.
//!
//! A failed sync stops the writer, as PostgreSQL stops: after a failed `fdatasync` the kernel
//! may have dropped the pages it could not write, so a later sync's success would prove
//! nothing. The operations it covered are answered with the error, every later one with
//! `Closed`, and the gateway stops admitting calls until it is restarted on a sound disk (the
//! file then holds what did reach it, and the counters are rebuilt from it). A checkpoint that
//! cannot write or sync the file stops it the same way, and then neither connection folds the
//! log into the file when it closes: SQLite replays the log at the next start.
//!
//! An operation changes the counters after its SQL succeeded; should one fail part-way (its
//! savepoint rolled back), the counters are rebuilt from the file, as after a failed commit,
//! which rolls the whole batch back. (A failed commit is a failing disk: the operations in it are
//! answered with the error, and those not reached are dropped, their callers told `Closed`.)
//!
//! One process owns the file: the counters are only exact if no other writes it. A lock file
//! (`<file>.lock`) held while the writer runs makes a second gateway on the same file fail to
//! start instead of silently drifting.
//!
//! The queue is bounded: new work (admissions, idempotency claims) is refused with
//! [`StoreError::Busy`] when it is full, while work that finishes calls (binds, releases,
//! settlements) waits for room, so nothing already admitted is ever dropped while the gateway
//! runs.
//!
//! At the end of a graceful stop, [`Writer::close`] stops the writer: what is queued is committed
//! and synced, and later work, or work still waiting for room (only what outlived the shutdown's
//! grace period), is refused with [`StoreError::Closed`]; the calls it concerned are recovered as
//! after a crash (their events or leases). The writer's connection closes last, so it folds the
//! log into the file and removes it, and the process exits after that.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot, watch};

use super::call_index::CallIndex;
use super::queries::Db;
use super::{queries, schema};
use crate::metrics::{STORE_BATCH, STORE_SYNC, STORE_WAIT};
use crate::state::StoreError;
use crate::state::accounting::Ledger;

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 512;

/// When an operation's caller is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Once the batch is committed (and, with `synchronous = "full"`, synced): the operation
    /// wrote, and its caller waits for it.
    Committed,
    /// At once: the operation wrote nothing, or what it wrote needs no sync before its caller
    /// goes on (the next sync carries it, at the latest [`LAZY_SYNC`] after its commit).
    Now,
    /// Once the batch is durable, but it needs neither a commit nor a sync of its own: the next
    /// batch that is not all lazy commits it, or a commit [`LAZY_SYNC`] after it ran; the next
    /// batch that needs a sync carries it, or a sync [`LAZY_SYNC`] after its commit. With
    /// `synchronous = "normal"`, once committed.
    Lazy,
}

/// The longest a committed write waits for a sync when no operation that waits for one follows.
pub const LAZY_SYNC: std::time::Duration = std::time::Duration::from_millis(10);

/// Whether an operation may be refused when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// New work: refused with `Busy` when the queue is full.
    Shed,
    /// Finishing work: waits for room.
    Wait,
}

type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// A queued operation: it runs, then says when to answer (`None`: it failed, undo its writes).
type Job = Box<dyn FnOnce(&Db<'_>, &mut Ledger) -> (Option<When>, Reply) + Send>;
/// What an operation writes, which says whether it needs a savepoint of its own in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// Any number of statements: it runs in a savepoint, undone alone if it fails.
    Several,
    /// One statement at most, its last (reads before it are free), and the counters changed
    /// only after it: no savepoint. If it fails there is nothing of it to undo: SQLite backs out
    /// a statement that fails (or, on a failing disk, the whole transaction, and the batch fails
    /// with it). An operation that writes more than once only sometimes (a late bind) runs those
    /// writes in a savepoint of its own (`queries::in_savepoint`).
    OneStatement,
}

/// An operation in the queue: its sequence number, when it was submitted, the operation, and
/// what it writes.
type Queued = (u64, Instant, Job, Writes);

/// The result of a queued operation, when it is given.
pub struct Answer<R>(oneshot::Receiver<Result<R, StoreError>>);

impl<R> std::future::IntoFuture for Answer<R>
where
    R: Send + 'static,
{
    type Output = Result<R, StoreError>;
    type IntoFuture = std::pin::Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.0.await.map_err(|_| StoreError::Closed)? })
    }
}

/// The queue into the writer thread, and what it has committed.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Queued>,
    /// The sequence number of the last operation queued; locked while queueing so that queue
    /// order is sequence order.
    queued: Arc<Mutex<u64>>,
    /// The sequence number of the last operation committed.
    committed: watch::Receiver<u64>,
    /// The live counters, changed only by the writer thread, read by anyone.
    ledger: Arc<Mutex<Ledger>>,
    /// The writer holds lazy operations in an open transaction (see [`run`]).
    holding: Arc<AtomicBool>,
    /// The highest sequence number a reader waits to see committed: no transaction holding it
    /// is held.
    wanted: Arc<AtomicU64>,
    /// Raised by [`Writer::close`]: the writer takes no new operations once it sees it.
    closing: Arc<AtomicBool>,
    /// Set once the writer thread has closed its connection and let go of the lock file:
    /// `true` if it ended cleanly, `false` if it stopped on a failing disk (see the module docs).
    stopped: watch::Receiver<Option<bool>>,
}

impl Writer {
    /// Start the writer thread on `conn`, with room for `capacity` waiting operations.
    /// `log`: the file the writer syncs (`synchronous = "full"`, see the module docs), or none.
    /// `lazy_sync`: the longest a lazy operation waits for its commit and sync ([`LAZY_SYNC`]).
    pub fn start(
        mut conn: Connection,
        capacity: usize,
        lock: std::fs::File,
        log: Option<std::fs::File>,
        lazy_sync: std::time::Duration,
        index: Arc<CallIndex>,
    ) -> Result<Writer, StoreError> {
        let ledger = Arc::new(Mutex::new(schema::load_ledger(&conn)?));
        let (queue, rx) = mpsc::channel(capacity.max(1));
        let (committed_tx, committed) = watch::channel(0);
        let thread_ledger = ledger.clone();
        let holding = Arc::new(AtomicBool::new(false));
        let wanted = Arc::new(AtomicU64::new(0));
        let (thread_holding, thread_wanted) = (holding.clone(), wanted.clone());
        let closing = Arc::new(AtomicBool::new(false));
        let thread_closing = closing.clone();
        let (stopped_tx, stopped) = watch::channel(None);
        // A timer, to wait for the queue no longer than a commit or a sync is due.
        let timer = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| StoreError::Backend(format!("cannot start the store's timer: {e}")))?;
        let log = log.map(|file| Log {
            file,
            synced: metrics::histogram!(STORE_SYNC),
        });
        let (fold, checkpointer) = Fold::start(&mut conn)?;
        let failed = fold.failed.clone();
        std::thread::Builder::new()
            .name("callgate-sqlite".into())
            .spawn(move || {
                run(
                    &conn,
                    rx,
                    thread_ledger,
                    committed_tx,
                    Disk { log, fold, index },
                    timer,
                    Hold {
                        lazy_sync,
                        holding: thread_holding,
                        wanted: thread_wanted,
                        closing: thread_closing,
                    },
                );
                // The checkpointer stops once the writer has (its wake-up channel is closed), and
                // its connection closes before the writer's: the last to close folds the log into
                // the file and removes it, as one connection did. The file is free for another
                // process once both have.
                let _ = checkpointer.join();
                drop(conn);
                drop(lock);
                stopped_tx.send_replace(Some(!failed.load(Ordering::SeqCst)));
            })
            .map_err(|e| StoreError::Backend(format!("cannot start the store thread: {e}")))?;
        Ok(Writer {
            queue,
            queued: Arc::new(Mutex::new(0)),
            committed,
            ledger,
            holding,
            wanted,
            closing,
            stopped,
        })
    }

    /// Wait until everything queued before this call is committed and synced.
    pub fn flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        // Queued after everything queued so far, and answered once it is synced, which syncs
        // all before it.
        self.run(Urgency::Wait, |_, _| Ok(((), When::Committed)))
    }

    /// Stop the writer for good: what is queued before this call is committed and synced, later
    /// operations are refused ([`StoreError::Closed`]), those still waiting for room in a full
    /// queue included, and this resolves once the writer thread has closed its connection (the
    /// last to close folds the log into the file and removes it) and let go of the lock file.
    /// An error if the writer had stopped on a failing disk (the log is then kept for the next
    /// start to replay). Closing twice waits the same way.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.closing.store(true, Ordering::SeqCst);
        // Wakes the writer if it sleeps; it sees the flag after this batch and takes no more.
        // `Closed`: it saw the flag first, and what was queued before it still drains.
        let flushed = match self.flush().await {
            Err(StoreError::Closed) => Ok(()),
            other => other,
        };
        let mut stopped = self.stopped.clone();
        let clean = match stopped.wait_for(Option::is_some).await {
            Ok(ended) => *ended == Some(true),
            // The thread panicked (its sender dropped without an end).
            Err(_) => false,
        };
        if !clean {
            return Err(StoreError::Backend(
                "the store's writer had stopped on a failing disk; the log is kept and replayed at the next start".into(),
            ));
        }
        flushed
    }

    /// The live counters.
    pub fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `f` and wait for its result, which `f` says when to give.
    pub fn run<R: Send + 'static>(
        &self,
        urgency: Urgency,
        f: impl FnOnce(&Db<'_>, &mut Ledger) -> Result<(R, When), StoreError> + Send + 'static,
    ) -> impl Future<Output = Result<R, StoreError>> + Send + 'static {
        self.run_as(urgency, Writes::Several, f)
    }

    /// [`Writer::run`] for an operation that says what it writes.
    pub fn run_as<R: Send + 'static>(
        &self,
        urgency: Urgency,
        writes: Writes,
        f: impl FnOnce(&Db<'_>, &mut Ledger) -> Result<(R, When), StoreError> + Send + 'static,
    ) -> impl Future<Output = Result<R, StoreError>> + Send + 'static {
        let queued = self.submit_as(urgency, writes, f);
        async move { queued.await?.await }
    }

    /// Queue `f`: the future resolves once it is queued, in order (at once, unless the queue is
    /// full: `f` is queued by this call when there is room), with a future of its result.
    pub fn submit<R: Send + 'static>(
        &self,
        urgency: Urgency,
        f: impl FnOnce(&Db<'_>, &mut Ledger) -> Result<(R, When), StoreError> + Send + 'static,
    ) -> impl Future<Output = Result<Answer<R>, StoreError>> + Send + 'static {
        self.submit_as(urgency, Writes::Several, f)
    }

    /// [`Writer::submit`] for an operation that says what it writes.
    pub fn submit_as<R: Send + 'static>(
        &self,
        urgency: Urgency,
        writes: Writes,
        f: impl FnOnce(&Db<'_>, &mut Ledger) -> Result<(R, When), StoreError> + Send + 'static,
    ) -> impl Future<Output = Result<Answer<R>, StoreError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn, ledger| match f(conn, ledger) {
            Ok((value, when)) => (
                Some(when),
                Box::new(move |commit: Result<(), StoreError>| {
                    let _ = tx.send(commit.map(|()| value));
                }),
            ),
            Err(e) => (
                None,
                Box::new(move |_| {
                    let _ = tx.send(Err(e));
                }),
            ),
        });
        // The wait counts from here, room in a full queue included.
        let since = Instant::now();
        // The writer is cloned only when the operation has to wait for room in the queue.
        let waiting = match self.try_queue(since, job, writes) {
            Ok(()) => Ok(None),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(StoreError::Closed),
            Err(mpsc::error::TrySendError::Full(_)) if urgency == Urgency::Shed => {
                Err(StoreError::Busy)
            }
            Err(mpsc::error::TrySendError::Full(job)) => Ok(Some((self.clone(), job))),
        };
        async move {
            if let Some((writer, job)) = waiting? {
                writer.queue_waiting(since, job, writes).await?
            }
            Ok(Answer(rx))
        }
    }

    fn try_queue(
        &self,
        since: Instant,
        job: Job,
        writes: Writes,
    ) -> Result<(), mpsc::error::TrySendError<Job>> {
        let mut seq = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        let permit = match self.queue.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Full(())) => {
                return Err(mpsc::error::TrySendError::Full(job));
            }
            Err(mpsc::error::TrySendError::Closed(())) => {
                return Err(mpsc::error::TrySendError::Closed(job));
            }
        };
        *seq += 1;
        permit.send((*seq, since, job, writes));
        Ok(())
    }

    async fn queue_waiting(
        &self,
        since: Instant,
        job: Job,
        writes: Writes,
    ) -> Result<(), StoreError> {
        let permit = self.queue.reserve().await.map_err(|_| StoreError::Closed)?;
        let mut seq = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        *seq += 1;
        permit.send((*seq, since, job, writes));
        Ok(())
    }

    /// Wait until everything queued before this call is committed (read-your-writes for the
    /// read-only connections). Waits for at most the batches already queued.
    pub async fn committed_up_to_now(&self) -> Result<(), StoreError> {
        let target = *self.queued.lock().unwrap_or_else(|p| p.into_inner());
        let mut committed = self.committed.clone();
        // Say what is wanted, then look whether the writer holds a transaction: the writer
        // raises its flag, then looks at what is wanted before it holds one (both in sequential
        // consistency), so either it sees this reader and does not hold, or this reader sees
        // the flag and asks for the commit.
        if *committed.borrow() < target {
            self.wanted.fetch_max(target, Ordering::SeqCst);
        }
        if *committed.borrow() < target && self.holding.load(Ordering::SeqCst) {
            // A no-op that is not lazy commits the held transaction at once rather than when it
            // is due. If the queue is full, the batches in it commit it.
            match self.submit(Urgency::Shed, |_, _| Ok(((), When::Now))).await {
                Ok(_) | Err(StoreError::Busy) => {}
                Err(e) => return Err(e),
            }
        }
        committed
            .wait_for(|c| *c >= target)
            .await
            .map(|_| ())
            .map_err(|_| StoreError::Closed)
    }
}

/// What the writer does to the disk besides its commits: the log it syncs, if it syncs it
/// itself, and how the log is folded into the file.
struct Disk {
    log: Option<Log>,
    fold: Fold,
    /// Upstream ids: the writer merges them into their table (see `call_index`).
    index: Arc<CallIndex>,
}

/// How the log is folded into the file (see the module docs): the log's length after the last
/// commit, and the checkpointer thread's wake-up.
struct Fold {
    /// Pages in the log after the writer's last commit (SQLite's WAL hook).
    pages: Arc<AtomicI64>,
    /// Pages of the log the checkpointer has copied into the file (0: none, or all of them, and
    /// the log starts over).
    copied: Arc<AtomicI64>,
    /// A checkpoint failed to write or sync the file (see [`fold`]).
    failed: Arc<AtomicBool>,
    /// Wakes the checkpointer (one wake-up waits at most; closed when the writer stops).
    wake: std::sync::mpsc::SyncSender<()>,
}

impl Fold {
    /// Hook the writer's connection and start the checkpointer thread on a connection of its own
    /// (its handle returned with the fold).
    fn start(conn: &mut Connection) -> Result<(Fold, std::thread::JoinHandle<()>), StoreError> {
        let pages = Arc::new(AtomicI64::new(0));
        let hooked = pages.clone();
        conn.wal_hook(Some(
            move |_: &mut rusqlite::hooks::Wal, n: std::ffi::c_int| {
                hooked.store(i64::from(n), Ordering::Relaxed);
                Ok(())
            },
        ))?;
        let folder = schema::open_checkpointer(&schema::file_path(conn)?)?;
        let (wake, woken) = std::sync::mpsc::sync_channel(1);
        let fold = Fold {
            pages,
            copied: Arc::new(AtomicI64::new(0)),
            failed: Arc::new(AtomicBool::new(false)),
            wake,
        };
        let (log, copied, failed) = (fold.pages.clone(), fold.copied.clone(), fold.failed.clone());
        let checkpointer = std::thread::Builder::new()
            .name("callgate-checkpoint".into())
            .spawn(move || checkpoint_when_woken(&folder, &woken, &log, &copied, &failed))
            .map_err(|e| StoreError::Backend(format!("cannot start the checkpoint thread: {e}")))?;
        Ok((fold, checkpointer))
    }

    /// After a commit (its batch answered): wake the checkpointer once the log holds
    /// [`schema::CHECKPOINT_PAGES`] it has not copied; fold the rest of the log here once the
    /// checkpointer has copied all but [`FINISH_PAGES`] of it, or when the log has grown past
    /// what the checkpointer keeps up with. `false`: a checkpoint could not write or sync the
    /// file, and the writer must stop as after a failed sync of the log.
    fn after_commit(&self, conn: &Connection) -> bool {
        let (wake, fold_here) = fold_steps(
            self.pages.load(Ordering::Relaxed),
            self.copied.load(Ordering::Relaxed),
        );
        if wake {
            // Full: it is already woken.
            let _ = self.wake.try_send(());
        }
        if fold_here && let Some((log, done)) = fold(conn, &self.failed) {
            if done >= log {
                // All of it is in the file: the next transaction starts the log over.
                self.pages.store(0, Ordering::Relaxed);
                self.copied.store(0, Ordering::Relaxed);
            } else {
                // A reader still needs the rest: the next commit tries again.
                self.copied.store(done, Ordering::Relaxed);
            }
        }
        !self.failed.load(Ordering::SeqCst)
    }
}

/// One passive checkpoint on `conn` (it copies what the log held when it began, and syncs the
/// file if that is all of it): the log's length and the pages of it now in the file, or `None`
/// if another connection is checkpointing or it failed. A failure to write or sync the file
/// raises `failed`: the kernel may have dropped pages it could not write, and a later
/// checkpoint's successful sync would not prove them on disk (the log would then start over
/// without them), so the gateway stops admitting calls until it is restarted, as after a failed
/// sync of the log; at restart SQLite replays the log, which was not started over.
fn fold(conn: &Connection, failed: &AtomicBool) -> Option<(i64, i64)> {
    if failed.load(Ordering::SeqCst) {
        return None;
    }
    match conn.wal_checkpoint_v2(None::<&str>, rusqlite::wal::CheckpointMode::PASSIVE) {
        Ok((log, done)) => Some((i64::from(log), i64::from(done))),
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => None,
        Err(e) => {
            if e.sqlite_error_code() == Some(rusqlite::ErrorCode::SystemIoFailure) {
                failed.store(true, Ordering::SeqCst);
                tracing::error!(error = %e, "state store: a checkpoint cannot write the file; the writer stops, and no call is admitted until the gateway is restarted on a sound disk");
            } else {
                tracing::warn!(error = %e, "state store: cannot fold the log into the file");
            }
            None
        }
    }
}

/// Pages the checkpointer has not copied yet below which the writer folds the rest of the log
/// itself after a commit: a short copy (the pages since the checkpointer's round began) and the
/// syncs of the log and the file, so that the log starts over. The checkpointer alone cannot
/// finish while the writer commits: each of its rounds copies only what was committed when it
/// began.
const FINISH_PAGES: i64 = 128;

/// What to do after a commit, with `pages` in the log of which the checkpointer has `copied`:
/// wake the checkpointer, and fold the log on the writer's thread. A `copied` past `pages` is
/// from before the log started over: nothing of this log is copied.
fn fold_steps(pages: i64, copied: i64) -> (bool, bool) {
    let copied = if copied > pages { 0 } else { copied };
    let wake = pages - copied >= schema::CHECKPOINT_PAGES;
    let finish = copied > 0 && pages - copied < FINISH_PAGES;
    (wake, finish || pages >= schema::WRITER_CHECKPOINT_PAGES)
}

/// The checkpointer thread: on each wake-up, fold what the log holds into the file (SQLite's
/// passive checkpoint: the writer goes on meanwhile). `pages`: the log's length after the writer's
/// last commit; publishes how much of it it copied in `copied` (0 once all of it is). Stops when
/// the writer does, or when a checkpoint fails to write the file (`failed`, see [`fold`]).
fn checkpoint_when_woken(
    conn: &Connection,
    woken: &std::sync::mpsc::Receiver<()>,
    pages: &AtomicI64,
    copied: &AtomicI64,
    failed: &AtomicBool,
) {
    while woken.recv().is_ok() && !failed.load(Ordering::SeqCst) {
        // A wake-up sent while the last round ran may find less to copy than a round is for.
        if !fold_steps(
            pages.load(Ordering::Relaxed),
            copied.load(Ordering::Relaxed),
        )
        .0
        {
            continue;
        }
        // `done`: the pages the log held when the round began (fewer if a reader still needs
        // some); the writer may have added more since.
        if let Some((_, done)) = fold(conn, failed) {
            let all = pages.load(Ordering::Relaxed) <= done;
            // All of it: the writer's next transaction starts the log over.
            copied.store(if all { 0 } else { done }, Ordering::Relaxed);
        }
    }
    if failed.load(Ordering::SeqCst) {
        keep_the_log_on_close(conn);
    }
}

/// After a failed sync or checkpoint, closing `conn` must not fold the log into the file either
/// (see [`fold`]): SQLite replays it at the next start.
fn keep_the_log_on_close(conn: &Connection) {
    let _ = conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    );
}

/// The log the writer syncs (`synchronous = "full"`), and the histogram of its syncs.
struct Log {
    file: std::fs::File,
    synced: metrics::Histogram,
}

/// Sync the log, or say why it could not be.
fn sync(log: &Log) -> Result<(), StoreError> {
    let started = Instant::now();
    let synced = log.file.sync_data();
    log.synced.record(started.elapsed());
    synced.map_err(|e| {
        tracing::error!(error = %e, "state store: cannot sync the log; the writer stops, and no call is admitted until the gateway is restarted on a sound disk");
        StoreError::Backend(format!("cannot sync the state file's log: {e}"))
    })
}

/// Sync the log and answer `replies` with the outcome; `false`: the sync failed, the writer
/// must stop.
fn sync_and_answer(log: &Log, replies: impl IntoIterator<Item = Reply>) -> bool {
    let synced = sync(log);
    answer(replies, &synced);
    synced.is_ok()
}

/// Answer every reply with `result`.
fn answer(replies: impl IntoIterator<Item = Reply>, result: &Result<(), StoreError>) {
    for reply in replies {
        reply(result.clone());
    }
}

/// The counters as the file has them, after a rollback.
fn rebuild(conn: &Connection, counters: &mut Ledger) {
    match schema::load_ledger(conn) {
        Ok(rebuilt) => *counters = rebuilt,
        Err(e) => tracing::error!(error = %e, "state store: cannot rebuild the counters"),
    }
}

/// The upstream ids in memory as the file has them, after a rollback of binds memory holds (if
/// that fails, nothing is merged until it succeeds: see `call_index`).
fn reload_index(conn: &Connection, index: &CallIndex) {
    if let Err(e) = index.reload(conn) {
        tracing::error!(error = %e, "state store: cannot read the upstream ids back into memory");
    }
}

/// How long the writer may hold lazy operations in an open transaction, and the flag it raises
/// while it does.
struct Hold {
    lazy_sync: std::time::Duration,
    holding: Arc<AtomicBool>,
    /// See [`Writer::committed_up_to_now`].
    wanted: Arc<AtomicU64>,
    /// See [`Writer::close`].
    closing: Arc<AtomicBool>,
}

/// A transaction left open with only lazy operations in it (see [`run`]).
struct Held {
    /// Their replies, answered once the transaction is committed and synced.
    replies: Vec<Reply>,
    /// The sequence number of the last operation in it.
    last: u64,
    /// Operations in it.
    operations: usize,
    /// The connection's change count when it began.
    changes_before: u64,
    /// When it must be committed: `lazy_sync` after its first operation ran.
    due: Instant,
}

/// The writer thread's loop.
///
/// A batch of only lazy operations (binds) is not committed at once: its transaction is held
/// open for the next batch, at most `lazy_sync`, so that a bind and the admission after it share
/// one commit, one set of written pages (a call's row, the ends of the indexes they both touch)
/// and one sync. Nothing waits on a lazy operation, so the request path is not delayed; a reader
/// that must see it asks for the commit ([`Writer::committed_up_to_now`] queues a no-op while one
/// is held, and any operation that is not lazy commits the transaction). A crash before that
/// commit leaves what a crash before the bind's own commit did (see the module `sqlite`'s
/// table); so does a failure of the batch that continues the transaction (a failing disk): the
/// held binds are answered with the error, and the calls' events or leases recover them.
///
/// A batch of one operation in a new transaction needs no savepoint: if it fails, the whole
/// transaction is rolled back.
fn run(
    conn: &Connection,
    mut queue: mpsc::Receiver<Queued>,
    ledger: Arc<Mutex<Ledger>>,
    committed: watch::Sender<u64>,
    disk: Disk,
    timer: tokio::runtime::Runtime,
    hold: Hold,
) {
    let Disk { log, fold, index } = disk;
    let index = &*index;
    let Hold {
        lazy_sync,
        holding,
        wanted,
        closing,
    } = hold;
    // Taken once: the recorder is installed before the store is opened.
    let (wait_histogram, batch_histogram) = (
        metrics::histogram!(STORE_WAIT),
        metrics::histogram!(STORE_BATCH),
    );
    let db = Db::new(conn);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // Replies of lazy operations committed but not yet synced.
    let mut unsynced: Vec<Reply> = Vec::new();
    // When the oldest commit not yet synced must be: none while everything committed is synced.
    let mut sync_due: Option<Instant> = None;
    let mut held: Option<Held> = None;
    let mut queue_closed = false;
    loop {
        if !queue_closed && closing.load(Ordering::SeqCst) {
            // No new operations: those already queued are still received, then the queue
            // reports itself empty and closed and the loop ends below.
            queue.close();
            queue_closed = true;
        }
        // The earlier of the sync and the held transaction's commit, if either is due.
        let due = sync_due
            .into_iter()
            .chain(held.as_ref().map(|h| h.due))
            .min();
        let received = match due {
            Some(due) => {
                let next = timer.block_on(async {
                    let due = tokio::time::Instant::from_std(due);
                    tokio::time::timeout_at(due, queue.recv_many(&mut batch, MAX_BATCH)).await
                });
                match next {
                    Ok(received) => received,
                    Err(_due) => {
                        // Whatever is due: the held transaction's commit, then the sync.
                        holding.store(false, Ordering::SeqCst);
                        if let Some(held) = held.take()
                            && commit_held(
                                &db,
                                &ledger,
                                index,
                                &committed,
                                &log,
                                &batch_histogram,
                                held,
                                &mut unsynced,
                            )
                        {
                            sync_due = Some(Instant::now());
                        }
                        if let Some(log) = &log
                            && sync_due.is_some_and(|due| due <= Instant::now())
                        {
                            if !sync_and_answer(log, unsynced.drain(..)) {
                                return stop_on_a_failing_disk(conn, &fold);
                            }
                            sync_due = None;
                        }
                        merge_upstream_ids(conn, index);
                        if !fold.after_commit(conn) {
                            return stop_after_a_failed_checkpoint(conn, &fold, &log, unsynced);
                        }
                        continue;
                    }
                }
            }
            None => queue.blocking_recv_many(&mut batch, MAX_BATCH),
        };
        if received == 0 {
            break;
        }
        let last = batch.last().map(|(seq, _, _, _)| *seq).unwrap_or(0);
        // The transaction this batch runs in: the held one, or a new one.
        holding.store(false, Ordering::SeqCst);
        let (changes_before, mut lazy, mut operations, hold_due) = match held.take() {
            Some(held) => (
                held.changes_before,
                held.replies,
                held.operations,
                Some(held.due),
            ),
            None => (conn.total_changes(), Vec::new(), 0, None),
        };
        operations += received;
        let single = hold_due.is_none() && received == 1;
        // The one operation of a `single` batch failed and was rolled back with its transaction.
        let mut rolled_back_alone = false;
        let mut waiting = Vec::with_capacity(batch.len());
        // When each of `waiting` was submitted, for the wait's histogram.
        let mut waiting_since = Vec::with_capacity(batch.len());
        // Every operation in the batch is lazy: the transaction may be held.
        let mut all_lazy = true;
        let outcome = (|| -> Result<(), rusqlite::Error> {
            let control = |sql: &str| queries::control(conn, sql);
            if hold_due.is_none() {
                // IMMEDIATE: take the write lock first, waiting (busy timeout) for any other
                // process that holds it. A deferred transaction whose first operation reads
                // could not wait for it later: SQLite answers "database is locked" at once to a
                // reader that wants to write.
                db.begin()?;
            }
            for (_, queued_at, job, writes) in batch.drain(..) {
                // An operation that writes with one statement needs no savepoint: SQLite backs
                // out a statement that fails.
                let savepoint = !single && writes == Writes::Several;
                if savepoint {
                    control("SAVEPOINT op")?;
                }
                // Locked per operation, so that readers of the counters never wait out a commit.
                let mut counters = ledger.lock().unwrap_or_else(|p| p.into_inner());
                let additions = index.additions();
                let (when, reply) = job(&db, &mut counters);
                if when.is_none() {
                    if single {
                        // Alone in its transaction: undone with the transaction (unless SQLite
                        // rolled it back already: a failing disk).
                        if !conn.is_autocommit() {
                            control("ROLLBACK")?;
                        }
                        rolled_back_alone = true;
                    } else if savepoint {
                        control("ROLLBACK TO op")?;
                    } else if conn.is_autocommit() {
                        // SQLite rolled the whole transaction back for its failure (a failing
                        // disk): the batch fails with it.
                        drop(counters);
                        reply(Ok(()));
                        return Err(rusqlite::Error::SqliteFailure(
                            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                            Some("the transaction was rolled back".into()),
                        ));
                    }
                    // An operation that settles several calls may have changed counters before
                    // the failure: take them from the file.
                    rebuild(conn, &mut counters);
                    // And binds it added to memory (few operations fail after adding one).
                    if index.additions() != additions {
                        reload_index(conn, index);
                    }
                }
                drop(counters);
                if savepoint {
                    control("RELEASE op")?;
                }
                all_lazy &= when == Some(When::Lazy);
                match when {
                    Some(When::Committed) => {
                        waiting.push(reply);
                        waiting_since.push(queued_at);
                    }
                    Some(When::Lazy) => lazy.push(reply),
                    None | Some(When::Now) => reply(Ok(())),
                }
            }
            Ok(())
        })();
        // Held for the next batch (see above), unless it is due: nothing is answered or
        // published yet.
        let may_hold = outcome.is_ok()
            && all_lazy
            && !conn.is_autocommit()
            && hold_due.is_none_or(|due| Instant::now() < due);
        if may_hold && raise_hold(&holding, &wanted, *committed.borrow()) {
            held = Some(Held {
                replies: lazy,
                last,
                operations,
                changes_before,
                due: hold_due.unwrap_or_else(|| Instant::now() + lazy_sync),
            });
            continue;
        }
        let result = match outcome {
            Ok(()) if rolled_back_alone => Ok(()),
            // SQLite rolled the transaction back itself (an operation went on past an error
            // that does that): nothing of it is on the file.
            Ok(()) if conn.is_autocommit() => Err(roll_back(
                conn,
                &ledger,
                index,
                "the transaction was rolled back",
            )),
            Ok(()) => commit(&db, &ledger, index),
            Err(e) => {
                // Jobs not reached are dropped with their replies: their callers see `Closed`.
                batch.clear();
                Err(roll_back(conn, &ledger, index, e))
            }
        };
        committed.send_replace(last);
        batch_histogram.record(operations as f64);
        match (&log, result) {
            (Some(log), Ok(())) => {
                unsynced.append(&mut lazy);
                let wrote = conn.total_changes() != changes_before;
                if (wrote || !unsynced.is_empty()) && sync_due.is_none() {
                    sync_due = Some(Instant::now() + lazy_sync);
                }
                let overdue = sync_due.is_some_and(|due| due <= Instant::now());
                if !waiting.is_empty() || overdue {
                    if !sync_and_answer(log, waiting.drain(..).chain(unsynced.drain(..))) {
                        return stop_on_a_failing_disk(conn, &fold);
                    }
                    sync_due = None;
                }
            }
            (_, result) => answer(waiting.into_iter().chain(lazy), &result),
        }
        // Every operation waited for is answered by now (after the sync, with one): how long
        // each took, submission to answer.
        for since in waiting_since {
            wait_histogram.record(since.elapsed());
        }
        merge_upstream_ids(conn, index);
        if !fold.after_commit(conn) {
            return stop_after_a_failed_checkpoint(conn, &fold, &log, unsynced);
        }
    }
    // The queue is closed: commit what is held, sync what is not yet.
    holding.store(false, Ordering::SeqCst);
    if let Some(held) = held.take()
        && commit_held(
            &db,
            &ledger,
            index,
            &committed,
            &log,
            &batch_histogram,
            held,
            &mut unsynced,
        )
    {
        sync_due = Some(Instant::now());
    }
    if let Some(log) = &log
        && (sync_due.is_some() || !unsynced.is_empty())
        && !sync_and_answer(log, unsynced)
    {
        stop_on_a_failing_disk(conn, &fold);
    }
}

/// Once a batch is answered (or a held one committed): the next chunk of upstream ids, in a
/// transaction of its own, synced with the next commit, and the filter of upstream ids made
/// again if it is full (see `call_index`: both with no transaction open).
fn merge_upstream_ids(conn: &Connection, index: &CallIndex) {
    if !conn.is_autocommit() {
        return;
    }
    index.regrow();
    if index.wants_merge()
        && let Err(e) = index.merge_step(conn)
    {
        tracing::warn!(error = %e, "state store: cannot merge upstream ids; tried again after the next batch");
    }
}

/// The writer stops for a failed sync or checkpoint: neither connection may fold the log into the
/// file when it closes (see [`fold`]); SQLite replays the log at the next start.
fn stop_on_a_failing_disk(conn: &Connection, fold: &Fold) {
    fold.failed.store(true, Ordering::SeqCst);
    keep_the_log_on_close(conn);
}

/// A checkpoint could not write the file: answer the writes already committed once the log is
/// synced (the log itself is sound), then stop as on a failing disk. Later operations find the
/// queue closed.
fn stop_after_a_failed_checkpoint(
    conn: &Connection,
    fold: &Fold,
    log: &Option<Log>,
    unsynced: Vec<Reply>,
) {
    match log {
        Some(log) => {
            sync_and_answer(log, unsynced);
        }
        None => answer(unsynced, &Ok(())),
    }
    stop_on_a_failing_disk(conn, fold);
}

/// Raise the flag that says a transaction is held, unless a reader waits for an operation after
/// `committed` (see [`Writer::committed_up_to_now`]): `true` if it may be held.
fn raise_hold(holding: &AtomicBool, wanted: &AtomicU64, committed: u64) -> bool {
    holding.store(true, Ordering::SeqCst);
    if wanted.load(Ordering::SeqCst) > committed {
        holding.store(false, Ordering::SeqCst);
        return false;
    }
    true
}

/// Commit the held transaction (it is due, or the queue closed). Its replies join `unsynced`,
/// and `true` says a sync is due now; without a log, or if the commit failed, they are answered.
#[allow(clippy::too_many_arguments)]
fn commit_held(
    db: &Db<'_>,
    ledger: &Mutex<Ledger>,
    index: &CallIndex,
    committed: &watch::Sender<u64>,
    log: &Option<Log>,
    batches: &metrics::Histogram,
    held: Held,
    unsynced: &mut Vec<Reply>,
) -> bool {
    let result = commit(db, ledger, index);
    committed.send_replace(held.last);
    batches.record(held.operations as f64);
    match (log, result) {
        (Some(_), Ok(())) => {
            unsynced.extend(held.replies);
            true
        }
        (_, result) => {
            answer(held.replies, &result);
            false
        }
    }
}

/// Commit the open transaction; if that fails (a failing disk), roll it back.
fn commit(db: &Db<'_>, ledger: &Mutex<Ledger>, index: &CallIndex) -> Result<(), StoreError> {
    db.commit().map_err(|e| roll_back(db, ledger, index, e))
}

/// The batch could not be committed (`why`): roll back what is left of its transaction, rebuild
/// the counters from the file, and give the error its operations are answered with.
fn roll_back(
    conn: &Connection,
    ledger: &Mutex<Ledger>,
    index: &CallIndex,
    why: impl std::fmt::Display,
) -> StoreError {
    tracing::error!(error = %why, "state store: the batch could not be committed; rebuilding the counters from the file");
    if !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    rebuild(conn, &mut ledger.lock().unwrap_or_else(|p| p.into_inner()));
    reload_index(conn, index);
    StoreError::Backend(why.to_string())
}

#[cfg(test)]
mod tests {
    use super::{FINISH_PAGES, fold_steps};
    use crate::state::sqlite::schema::{CHECKPOINT_PAGES, WRITER_CHECKPOINT_PAGES};

    #[test]
    fn a_short_log_is_left_alone() {
        assert_eq!(fold_steps(0, 0), (false, false));
        assert_eq!(fold_steps(CHECKPOINT_PAGES - 1, 0), (false, false));
    }

    #[test]
    fn the_checkpointer_is_woken_for_each_log_length_it_has_not_copied() {
        assert_eq!(fold_steps(CHECKPOINT_PAGES, 0), (true, false));
        // It copied the first 1 000 pages; 600 more are not worth a round yet.
        assert_eq!(
            fold_steps(CHECKPOINT_PAGES + 600, CHECKPOINT_PAGES),
            (false, false)
        );
        assert_eq!(
            fold_steps(2 * CHECKPOINT_PAGES, CHECKPOINT_PAGES),
            (true, false)
        );
    }

    #[test]
    fn the_writer_finishes_a_log_the_checkpointer_has_almost_copied() {
        let copied = CHECKPOINT_PAGES + 40;
        assert_eq!(fold_steps(copied + FINISH_PAGES - 1, copied), (false, true));
        assert_eq!(fold_steps(copied + FINISH_PAGES, copied), (false, false));
        // Nothing copied yet: not the checkpointer's remainder, the whole log.
        assert_eq!(fold_steps(FINISH_PAGES - 1, 0), (false, false));
    }

    #[test]
    fn a_count_from_before_the_log_started_over_counts_as_nothing_copied() {
        // The checkpointer published 1 500 of the old log after the writer had folded it.
        assert_eq!(fold_steps(10, 1_500), (false, false));
        assert_eq!(fold_steps(CHECKPOINT_PAGES, 1_500), (true, false));
    }

    #[test]
    fn the_writer_folds_a_log_the_checkpointer_does_not_keep_up_with() {
        assert_eq!(
            fold_steps(WRITER_CHECKPOINT_PAGES, WRITER_CHECKPOINT_PAGES - 300),
            (false, true)
        );
        assert_eq!(fold_steps(WRITER_CHECKPOINT_PAGES, 0), (true, true));
    }
}
