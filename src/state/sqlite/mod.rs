//! The embedded backend: SQLite in WAL mode, in one file, with the live counters in memory.
//!
//! - [`writer`]: one thread owns the read-write connection and the counters; it runs every change
//!   and group-commits whatever is waiting. Admission decides from the counters in O(1) and
//!   records one row. A checkpoint thread, on a connection of its own that never writes a row,
//!   folds the write-ahead log into the file.
//! - [`schema`]: the layout, the connections, the counters rebuilt from the file at start.
//! - [`queries`]: every statement, prepared once per connection.
//! - [`call_index`]: calls by upstream id: the latest binds in memory, merged into the
//!   `call_keys` table in sorted chunks, so that a bind writes no random index page.
//! - Reads (a call, a tenant's calls, idempotency look-ups, quiet calls) run on read-only
//!   connections of their own: they see the last commit and never wait behind one. Usage is read
//!   from the counters.
//!
//! What a crash (`kill -9`, power loss with `synchronous = "full"`) leaves behind, step by step:
//!
//! | crash ...                                  | the file holds                   | at restart                                 |
//! |--------------------------------------------|----------------------------------|--------------------------------------------|
//! | before the admission's commit              | nothing of it                    | nothing taken; the caller got no answer    |
//! | after its commit, before its sync          | after `kill -9`, a pending call (slot and hold); after a power loss, nothing of it or the pending call | the call was never forwarded: the pending call is settled at the full hold when its lease ends, or nothing was taken |
//! | after its sync, before the upstream answered | a pending call: slot and hold  | settled at the full hold when its lease ends (`max_duration` + upstream timeout + grace), or by its events |
//! | after the answer, before the bind's commit | the same pending call            | the first event (found by its relay token) binds the call id and settles it; else the lease as above |
//! | after the bind's commit, before its sync    | the bound call after `kill -9`; after a power loss, the pending call above | as the row above it, or as the row below |
//! | after the bind's sync                      | the bound call                   | events, reconciliation or the lease settle it |
//!
//! The bind is queued before the answer is sent but not waited for: the request path waits for
//! one commit and one sync (the admission's). The bind needs neither a commit nor a sync of its
//! own: the writer holds it in an open transaction that the next admission commits and syncs, or
//! commits and syncs it at most [`writer::LAZY_SYNC`] after it ran, so a call costs one commit and
//! one sync. (A reader that must see it asks the writer to commit what it holds.) An idempotency
//! claim and its stored answer likewise ride on the commits around them; a key whose request was cut short by a crash stays `in flight` (a retry
//! is refused, never placed twice) until its TTL ends.

mod call_index;
mod queries;
mod schema;
mod snapshot;
mod writer;

pub use snapshot::SqliteSnapshot;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rusqlite::Connection;
use serde_json::Value;

use self::call_index::CallIndex;
use self::writer::{Urgency, When, Writer, Writes};
use super::accounting::{self, Ending, Ledger, Pricing};
use super::*;

/// Durability of each commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Every write is synced before its caller is told it is done (a write nobody waits for,
    /// within 10 ms): survives power loss.
    #[default]
    Full,
    /// WAL default: survives a process crash (`kill -9`), may lose the last commits on power loss.
    Normal,
}

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    pub synchronous: Synchronous,
    /// Operations that may wait for the writer; past that, new work is refused (`Busy`).
    pub queue_capacity: usize,
    /// The longest a write nobody waits for (a bind) waits for its commit, then for its sync
    /// ([`writer::LAZY_SYNC`]; tests lengthen it to see what shares a commit).
    pub lazy_sync: std::time::Duration,
    /// Binds gathered in memory before they are merged into the upstream-id table
    /// ([`call_index::MERGE_AT`]; tests merge after a few).
    pub merge_upstream_ids_at: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: Synchronous::Full,
            queue_capacity: 4096,
            lazy_sync: writer::LAZY_SYNC,
            merge_upstream_ids_at: call_index::MERGE_AT,
        }
    }
}

/// See the module docs.
pub struct SqliteStore {
    writer: Writer,
    /// Upstream ids: recent binds in memory, the rest in `call_keys`.
    index: Arc<CallIndex>,
    readers: Arc<Readers>,
    /// The file predates relay tokens that name their reservation and has an index on token
    /// hashes: tokens issued then are still found by their hash.
    legacy_tokens: bool,
    /// Every runtime opt-out by number, loaded at start and kept by the writer: the request path
    /// looks a number up without a query.
    opt_outs: Arc<RwLock<OptOuts>>,
}

/// Runtime opt-outs by number.
type OptOuts = HashMap<String, Vec<OptOut>>;

/// Read-only connections, opened on demand and kept for reuse.
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// `true` once the store is closed: no new reads, and no connection kept. Every read holds it
    /// shared for as long as it has a connection, so that closing waits for reads in progress
    /// (each bounded by the busy timeout): the writer's connection must be the last to close.
    gate: RwLock<bool>,
}

/// Read-only connections kept open between reads.
const IDLE_READERS: usize = 4;

impl Readers {
    fn read<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> StoreFuture<'static, R> {
        let readers = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                // Declared before the connection: released after it is kept or closed.
                let closed = readers.gate.read().unwrap_or_else(|p| p.into_inner());
                if *closed {
                    return Err(StoreError::Closed);
                }
                let idle = readers.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
                let conn = match idle {
                    Some(conn) => conn,
                    None => schema::open_reader(&readers.path)?,
                };
                let result = f(&conn);
                let mut idle = readers.idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < IDLE_READERS {
                    idle.push(conn);
                }
                result
            })
            .await
            .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))?
        })
    }
}

impl SqliteStore {
    /// Open (or create) the database at `path` with the default queue, and start the writer.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(
            path,
            SqliteOptions {
                synchronous,
                ..SqliteOptions::default()
            },
        )
    }

    /// Open (or create) the database at `path`, rebuild the counters from it, start the writer.
    pub fn open_with(path: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        let lock = schema::lock(path)?;
        let conn = schema::open_writer(path)?;
        let legacy_tokens = schema::has_token_index(&conn)?;
        let mut opt_outs = OptOuts::new();
        for entry in queries::all_opt_outs(&conn)? {
            opt_outs
                .entry(entry.phone_number.clone())
                .or_default()
                .push(entry);
        }
        let log = match options.synchronous {
            Synchronous::Full => Some(schema::open_log(&conn)?),
            Synchronous::Normal => None,
        };
        let index = Arc::new(CallIndex::load(&conn, options.merge_upstream_ids_at)?);
        let writer = Writer::start(
            conn,
            options.queue_capacity,
            lock,
            log,
            options.lazy_sync,
            index.clone(),
        )?;
        let readers = Arc::new(Readers {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
            gate: RwLock::new(false),
        });
        // Without a runtime (tools that only read the file) the filter stays unfilled: every
        // look-up reads the table, as before it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(fill_filter(
                Arc::downgrade(&index),
                Arc::downgrade(&readers),
            ));
        }
        Ok(SqliteStore {
            writer,
            index,
            legacy_tokens,
            opt_outs: Arc::new(RwLock::new(opt_outs)),
            readers,
        })
    }

    fn release_op(&self, reservation_id: &str) -> StoreFuture<'static, ()> {
        let id = reservation_id.to_string();
        Box::pin(self.writer.run(Urgency::Wait, move |conn, ledger| {
            if let Some((tenant, hold, live)) = queries::delete_pending(conn, &id)?
                && live
            {
                ledger.release(&tenant, hold);
            }
            Ok(((), When::Committed))
        }))
    }
}

/// Fill the filter of upstream ids (see `call_index`) from `call_keys` on a read-only connection,
/// a chunk a step, off the writer's thread (on a file of five million calls the fill takes
/// seconds, which the writer's batches would have waited for); again whenever the filter is made
/// again, larger. It ends when the store closes or is dropped (it holds neither the index nor
/// the readers, whose idle connections a dropped store closes, between steps).
async fn fill_filter(index: std::sync::Weak<CallIndex>, readers: std::sync::Weak<Readers>) {
    // After a failed step: a second, doubled up to a minute while it keeps failing.
    let mut backoff = std::time::Duration::from_secs(1);
    loop {
        let (Some(index), Some(readers)) = (index.upgrade(), readers.upgrade()) else {
            return;
        };
        if !index.wants_fill() {
            drop((index, readers));
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            continue;
        }
        match readers.read(move |conn| index.fill_step(conn)).await {
            Ok(()) => backoff = std::time::Duration::from_secs(1),
            Err(StoreError::Closed) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_s = backoff.as_secs(), "state store: cannot read upstream ids into their filter; look-ups read the table meanwhile");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(60));
            }
        }
    }
}

/// A [`StateStore`] future that resolves once its operation is queued, with a [`Queued`] that
/// resolves once the operation is durable.
fn queued_in_order(
    queued: impl Future<Output = Result<writer::Answer<()>, StoreError>> + Send + 'static,
) -> StoreFuture<'static, Queued> {
    Box::pin(async move { Ok(Box::pin(queued.await?.into_future()) as Queued) })
}

/// End a live call's accounting: charge, free the slot and the hold.
fn settle(
    conn: &Connection,
    ledger: &mut Ledger,
    record: &CallRecord,
    pricing: Pricing,
    status: &str,
    ending: Ending,
    now: i64,
) -> Result<(), StoreError> {
    let charge = accounting::settlement_charge(ending, pricing, record.hold);
    let duration = match ending {
        Ending::Final { duration } => duration,
        Ending::Expired | Ending::Stated { .. } => None,
    };
    let spend = ledger.spend_after(&record.tenant, charge, now);
    queries::store_spend(conn, &record.tenant, &spend)?;
    queries::settle_call(conn, &record.reservation_id, charge, status, duration, now)?;
    ledger.settle(&record.tenant, record.hold, spend);
    Ok(())
}

/// A call by its upstream id, as `conn` sees it.
fn find_by_upstream(
    conn: &Connection,
    index: &CallIndex,
    call_id: &str,
) -> Result<Option<(CallRecord, Pricing)>, StoreError> {
    let Some(reservation_id) = index.find(conn, call_id)? else {
        return Ok(None);
    };
    // A bind memory has but `conn` does not see yet (still in the writer's open transaction).
    Ok(queries::load_call(conn, &reservation_id)?
        .filter(|(record, _)| record.call_id.as_deref() == Some(call_id)))
}

/// Apply an event (or the upstream's answer) to a call; returns whether it settled the call.
#[allow(clippy::too_many_arguments)]
fn apply_event(
    conn: &Connection,
    ledger: &mut Ledger,
    index: &CallIndex,
    record: &CallRecord,
    pricing: Pricing,
    event: &CallEvent,
    object: Option<&Value>,
    now: i64,
) -> Result<bool, StoreError> {
    if let Some(object) = object {
        queries::set_object(conn, &record.reservation_id, object)?;
    }
    if record.call_id.is_none()
        && let Some(call_id) = &event.call_id
    {
        // The bind was lost (a crash between the answer and its commit): learn the id here,
        // unless another call has it (an upstream fault): then the event still applies.
        if index.is_free(conn, call_id, &record.reservation_id)? {
            if let Some(row) = queries::set_call_id(conn, &record.reservation_id, call_id)? {
                index.add(conn, call_id, row)?;
            }
        } else {
            tracing::warn!(reservation = %record.reservation_id, call_id = %call_id,
                "an event names an upstream id bound to another call; the id is not learned");
        }
    }
    if !record.live {
        // Already settled (final event, reconciliation or lease): the first ending counts.
        return Ok(false);
    }
    if event.is_final {
        let ending = Ending::Final {
            duration: event.duration,
        };
        settle(conn, ledger, record, pricing, &event.status, ending, now)?;
        return Ok(true);
    }
    queries::set_status(conn, &record.reservation_id, &event.status, now)?;
    Ok(false)
}

/// The writer's half of [`StateStore::record_event`], for a reservation whose token was checked.
fn apply_relayed_event(
    conn: &Connection,
    ledger: &mut Ledger,
    index: &CallIndex,
    reservation_id: &str,
    event: &CallEvent,
    now: i64,
) -> Result<(EventOutcome, When), StoreError> {
    let Some((record, pricing)) = queries::load_call(conn, reservation_id)? else {
        return Ok((EventOutcome::UnknownToken, When::Now));
    };
    if let (Some(bound), Some(named)) = (&record.call_id, &event.call_id)
        && bound != named
    {
        return Ok((EventOutcome::CallMismatch, When::Now));
    }
    let settled = apply_event(conn, ledger, index, &record, pricing, event, None, now)?;
    let (record, _) = queries::load_call(conn, &record.reservation_id)?
        .ok_or_else(|| StoreError::Backend("call vanished".into()))?;
    let outcome = EventOutcome::Applied {
        record: Box::new(record),
        settled,
    };
    Ok((outcome, When::Committed))
}

impl StateStore for SqliteStore {
    fn admit(&self, req: AdmitRequest) -> StoreFuture<'static, AdmitOutcome> {
        // Without a budget an admission writes its row and nothing else (no spend to store), so
        // it needs no savepoint of its own; with one, it may write the spend as well.
        let writes = if req.budget.is_none() {
            Writes::OneStatement
        } else {
            Writes::Several
        };
        Box::pin(
            self.writer
                .run_as(Urgency::Shed, writes, move |conn, ledger| {
                    let plan = ledger.plan_admit(&req);
                    if plan.outcome != AdmitOutcome::Admitted {
                        let outcome = plan.outcome.clone();
                        ledger.apply_admit(&req, plan);
                        return Ok((outcome, When::Now));
                    }
                    queries::insert_call(conn, &req)?;
                    if plan.spend_changed {
                        queries::store_spend(conn, &req.tenant, &plan.spend)?;
                    }
                    ledger.apply_admit(&req, plan);
                    Ok((AdmitOutcome::Admitted, When::Committed))
                }),
        )
    }

    fn bind(
        &self,
        _tenant: &str,
        reservation_id: &str,
        call_id: &str,
        answered: Answered,
        lease_expires_at: i64,
        now: i64,
    ) -> StoreFuture<'static, Queued> {
        let (reservation_id, call_id) = (reservation_id.to_string(), call_id.to_string());
        let Answered {
            object,
            status: answered,
        } = answered;
        // One write, the row's, and its upstream id in memory; a late bind (see `call_index`)
        // writes an entry in `call_keys` too, in a savepoint of its own. So no savepoint for the
        // operation: a savepoint copies every page the bind touches that the batch had already
        // changed (the sub-journal), which is most of them.
        let index = self.index.clone();
        let queued = self
            .writer
            .submit_as(Urgency::Wait, Writes::OneStatement, move |conn, _| {
                let Some(current) = queries::bind_state(conn, &reservation_id)? else {
                    return Err(StoreError::Backend(format!(
                        "no reservation {reservation_id} to bind"
                    )));
                };
                // A call's upstream id never changes once known (from its bind or an event).
                if let Some(bound) = current.call_id.filter(|bound| *bound != call_id) {
                    return Err(StoreError::Refused(format!(
                        "reservation {reservation_id} is bound to upstream id {bound}, not {call_id}"
                    )));
                }
                index.check_free(conn, &call_id, &reservation_id)?;
                let status = accounting::status_after_bind(&current.status, &answered);
                let lease = accounting::lease_after_bind(
                    current.live,
                    current.lease_expires_at,
                    lease_expires_at,
                );
                let bind = || {
                    queries::bind_call(conn, current.row, &call_id, &object, status, lease, now)?;
                    index.add(conn, &call_id, current.row)
                };
                if index.covers(current.row) {
                    queries::in_savepoint(conn, bind)?;
                } else {
                    bind()?;
                }
                // Nobody on the request path waits for it: its sync rides on the next admission's.
                Ok(((), When::Lazy))
            });
        queued_in_order(queued)
    }

    fn release(&self, reservation_id: &str) -> StoreFuture<'static, ()> {
        self.release_op(reservation_id)
    }

    fn release_detached(&self, reservation_id: &str) {
        // Queued by this call when there is room; otherwise the task below waits for room.
        let fut = self.release_op(reservation_id);
        let id = reservation_id.to_string();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            crate::tasks::spawn_on(
                async move {
                    if let Err(e) = fut.await {
                        tracing::error!(reservation = %id, error = %e, "release failed");
                    }
                },
                &handle,
            );
        }
    }

    fn record_event(
        &self,
        token: &RelayToken,
        event: CallEvent,
        now: i64,
    ) -> StoreFuture<'static, EventOutcome> {
        // Who holds a token is checked on a read-only connection first: forged or stale tokens
        // (the relay route is open to the internet) never take room in the writer's queue.
        let legacy_tokens = self.legacy_tokens;
        let check = {
            let token = token.clone();
            self.readers.read(move |conn| {
                let reservation = if token.is_legacy() {
                    match legacy_tokens {
                        true => queries::reservation_of_token(conn, &token.secret_hash)?,
                        false => None,
                    }
                } else {
                    queries::token_hash(conn, &token.reservation_id)?
                        .filter(|hash| token.matches(hash))
                        .map(|_| token.reservation_id.clone())
                };
                Ok(reservation)
            })
        };
        let (writer, index) = (self.writer.clone(), self.index.clone());
        Box::pin(async move {
            let Some(reservation_id) = check.await? else {
                return Ok(EventOutcome::UnknownToken);
            };
            writer
                .run(Urgency::Wait, move |conn, ledger| {
                    apply_relayed_event(conn, ledger, &index, &reservation_id, &event, now)
                })
                .await
        })
    }

    fn apply_upstream_state(
        &self,
        tenant: &str,
        call_id: &str,
        event: CallEvent,
        object: Option<Value>,
        now: i64,
    ) -> StoreFuture<'static, Option<(CallRecord, bool)>> {
        let (tenant, call_id) = (tenant.to_string(), call_id.to_string());
        let index = self.index.clone();
        Box::pin(self.writer.run(Urgency::Wait, move |conn, ledger| {
            let Some((record, pricing)) = find_by_upstream(conn, &index, &call_id)?
                .filter(|(record, _)| record.tenant == tenant)
            else {
                return Ok((None, When::Now));
            };
            let object = object.as_ref();
            let settled = apply_event(conn, ledger, &index, &record, pricing, &event, object, now)?;
            let record = queries::load_call(conn, &record.reservation_id)?.map(|r| (r.0, settled));
            Ok((record, When::Committed))
        }))
    }

    fn settle_stated(
        &self,
        tenant: &str,
        call_id: &str,
        charge: i64,
        now: i64,
    ) -> StoreFuture<'static, Option<(CallRecord, bool)>> {
        let (tenant, call_id) = (tenant.to_string(), call_id.to_string());
        let index = self.index.clone();
        Box::pin(self.writer.run(Urgency::Wait, move |conn, ledger| {
            let Some((record, pricing)) = find_by_upstream(conn, &index, &call_id)?
                .filter(|(record, _)| record.tenant == tenant)
            else {
                return Ok((None, When::Now));
            };
            if !record.live {
                return Ok((Some((record, false)), When::Now));
            }
            let ending = Ending::Stated { charge };
            settle(conn, ledger, &record, pricing, "released", ending, now)?;
            let record = queries::load_call(conn, &record.reservation_id)?.map(|r| (r.0, true));
            Ok((record, When::Committed))
        }))
    }

    fn adjust_spend(
        &self,
        tenant: &str,
        terms: Option<BudgetTerms>,
        delta: i64,
        now: i64,
    ) -> StoreFuture<'static, Usage> {
        let tenant = tenant.to_string();
        Box::pin(self.writer.run(Urgency::Wait, move |conn, ledger| {
            let spend = ledger.adjust_spend(&tenant, terms.as_ref(), delta, now);
            queries::store_spend(conn, &tenant, &spend)?;
            Ok((ledger.usage(&tenant, now), When::Committed))
        }))
    }

    fn expire_leases(&self, now: i64) -> StoreFuture<'static, Vec<CallRecord>> {
        Box::pin(self.writer.run(Urgency::Wait, move |conn, ledger| {
            let lapsed = queries::lapsed_calls(conn, now)?;
            let mut out = Vec::with_capacity(lapsed.len());
            for (record, pricing) in lapsed {
                let status = accounting::EXPIRED;
                settle(conn, ledger, &record, pricing, status, Ending::Expired, now)?;
                if let Some((r, _)) = queries::load_call(conn, &record.reservation_id)? {
                    out.push(r);
                }
            }
            let when = if out.is_empty() {
                When::Now
            } else {
                When::Committed
            };
            Ok((out, when))
        }))
    }

    fn quiet_calls(
        &self,
        quiet_since: i64,
        lapsing_by: i64,
        limit: usize,
    ) -> StoreFuture<'static, Vec<CallRecord>> {
        self.readers
            .read(move |conn| queries::quiet_calls(conn, quiet_since, lapsing_by, limit))
    }

    fn get_call(&self, tenant: &str, call_id: &str) -> StoreFuture<'static, Option<CallRecord>> {
        let (tenant, call_id) = (tenant.to_string(), call_id.to_string());
        let readers = self.readers.clone();
        let writer = self.writer.clone();
        let index = self.index.clone();
        Box::pin(async move {
            // What the counters already show (an event's settlement) is committed first, so
            // that the call reads as its usage does.
            writer.committed_up_to_now().await?;
            let committed = {
                let (call_id, index) = (call_id.clone(), index.clone());
                readers.read(move |conn| find_by_upstream(conn, &index, &call_id))
            };
            let found = match committed.await? {
                Some((record, _)) => Some(record),
                // Not committed yet (its bind may be queued): ask the writer, which has run
                // everything queued before this.
                None => {
                    writer
                        .run(Urgency::Shed, move |conn, _| {
                            let record = find_by_upstream(conn, &index, &call_id)?;
                            Ok((record.map(|r| r.0), When::Now))
                        })
                        .await?
                }
            };
            Ok(found.filter(|r| r.tenant == tenant))
        })
    }

    fn list_calls(
        &self,
        tenant: &str,
        limit: usize,
        before: Option<String>,
    ) -> StoreFuture<'static, Vec<CallRecord>> {
        let tenant = tenant.to_string();
        let readers = self.readers.clone();
        let writer = self.writer.clone();
        Box::pin(async move {
            // A tenant lists the calls it was answered about: wait for the binds queued so far.
            writer.committed_up_to_now().await?;
            readers
                .read(move |conn| queries::list_calls(conn, &tenant, limit, before.as_deref()))
                .await
        })
    }

    fn usage(&self, tenant: &str, now: i64) -> StoreFuture<'static, Usage> {
        let usage = self.writer.ledger().usage(tenant, now);
        Box::pin(std::future::ready(Ok(usage)))
    }

    fn idempotency_begin(
        &self,
        tenant: &str,
        key: &str,
        body_hash: &str,
        now: i64,
        expires_at: i64,
    ) -> StoreFuture<'static, IdempotencyBegin> {
        let (tenant, key, body_hash) = (tenant.to_string(), key.to_string(), body_hash.to_string());
        let lookup = {
            let (tenant, key, body_hash) = (tenant.clone(), key.clone(), body_hash.clone());
            self.readers
                .read(move |conn| queries::idempotency_state(conn, &tenant, &key, &body_hash, now))
        };
        let writer = self.writer.clone();
        Box::pin(async move {
            if let Some(state) = lookup.await? {
                return Ok(state);
            }
            // New to the committed file: claim it in the writer, which sees every claim.
            writer
                .run(Urgency::Shed, move |conn, _| {
                    if let Some(state) =
                        queries::idempotency_state(conn, &tenant, &key, &body_hash, now)?
                    {
                        return Ok((state, When::Now));
                    }
                    queries::claim_idempotency(conn, &tenant, &key, &body_hash, now, expires_at)?;
                    // The admission that follows commits the claim with it.
                    Ok((IdempotencyBegin::Proceed, When::Now))
                })
                .await
        })
    }

    fn idempotency_complete(
        &self,
        tenant: &str,
        key: &str,
        claim: IdempotencyClaim,
        response: StoredResponse,
    ) -> StoreFuture<'static, Queued> {
        let (tenant, key) = (tenant.to_string(), key.to_string());
        let queued = self.writer.submit(Urgency::Wait, move |conn, _| {
            queries::complete_idempotency(conn, &tenant, &key, &claim, &response)?;
            // Like the bind, stored before the answer is sent but not waited for.
            Ok(((), When::Lazy))
        });
        queued_in_order(queued)
    }

    fn idempotency_abandon(&self, tenant: &str, key: &str) -> StoreFuture<'static, ()> {
        let (tenant, key) = (tenant.to_string(), key.to_string());
        Box::pin(self.writer.run(Urgency::Wait, move |conn, _| {
            queries::abandon_idempotency(conn, &tenant, &key)?;
            Ok(((), When::Committed))
        }))
    }

    fn purge_idempotency(&self, now: i64) -> StoreFuture<'static, usize> {
        Box::pin(self.writer.run(Urgency::Wait, move |conn, _| {
            let purged = queries::purge_idempotency(conn, now)?;
            let when = if purged == 0 {
                When::Now
            } else {
                When::Committed
            };
            Ok((purged, when))
        }))
    }

    fn add_opt_out(&self, entry: OptOut) -> StoreFuture<'static, bool> {
        let opt_outs = self.opt_outs.clone();
        Box::pin(self.writer.run(Urgency::Wait, move |conn, _| {
            if !queries::insert_opt_out(conn, &entry)? {
                return Ok((false, When::Now));
            }
            let mut map = opt_outs.write().unwrap_or_else(|p| p.into_inner());
            map.entry(entry.phone_number.clone())
                .or_default()
                .push(entry);
            Ok((true, When::Committed))
        }))
    }

    fn remove_opt_out(
        &self,
        phone_number: &str,
        tenant: Option<&str>,
    ) -> StoreFuture<'static, bool> {
        let opt_outs = self.opt_outs.clone();
        let (number, tenant) = (phone_number.to_string(), tenant.map(str::to_string));
        Box::pin(self.writer.run(Urgency::Wait, move |conn, _| {
            if !queries::delete_opt_out(conn, &number, tenant.as_deref())? {
                return Ok((false, When::Now));
            }
            let mut map = opt_outs.write().unwrap_or_else(|p| p.into_inner());
            if let Some(entries) = map.get_mut(&number) {
                entries.retain(|e| e.tenant != tenant);
                if entries.is_empty() {
                    map.remove(&number);
                }
            }
            Ok((true, When::Committed))
        }))
    }

    fn opt_outs(&self, phone_number: &str) -> StoreFuture<'static, Vec<OptOut>> {
        let map = self.opt_outs.read().unwrap_or_else(|p| p.into_inner());
        let found = map.get(phone_number).cloned().unwrap_or_default();
        Box::pin(std::future::ready(Ok(found)))
    }

    fn take_attempt(
        &self,
        cap: &AttemptCap,
        attempt_id: &str,
        now: i64,
    ) -> StoreFuture<'static, AttemptOutcome> {
        let (cap, id) = (cap.clone(), attempt_id.to_string());
        Box::pin(self.writer.run(Urgency::Shed, move |conn, _| {
            let since = now - cap.longest_window();
            let times = queries::attempt_times(conn, cap.scope.key(), &cap.phone_number, since)?;
            let outcome = cap.verdict(&times, now);
            if outcome == AttemptOutcome::Taken {
                queries::insert_attempt(conn, cap.scope.key(), &cap.phone_number, &id, now)?;
            }
            // The admission that follows commits the attempt with it (and a crash before that
            // commit placed no call).
            Ok((outcome, When::Now))
        }))
    }

    fn return_attempt(
        &self,
        scope: &AttemptScope,
        phone_number: &str,
        attempt_id: &str,
    ) -> StoreFuture<'static, ()> {
        let (scope, number, id) = (
            scope.key().to_string(),
            phone_number.to_string(),
            attempt_id.to_string(),
        );
        Box::pin(self.writer.run(Urgency::Wait, move |conn, _| {
            queries::delete_attempt(conn, &scope, &number, &id)?;
            Ok(((), When::Committed))
        }))
    }

    fn attempts(
        &self,
        scope: &AttemptScope,
        phone_number: &str,
        since: i64,
    ) -> StoreFuture<'static, Vec<i64>> {
        let (scope, number) = (scope.key().to_string(), phone_number.to_string());
        let readers = self.readers.clone();
        let writer = self.writer.clone();
        Box::pin(async move {
            // Attempts ride on the next commit: wait for those counted so far.
            writer.committed_up_to_now().await?;
            readers
                .read(move |conn| queries::attempt_times(conn, &scope, &number, since))
                .await
        })
    }

    fn purge_attempts(&self, now: i64) -> StoreFuture<'static, usize> {
        Box::pin(self.writer.run(Urgency::Wait, move |conn, _| {
            let purged = queries::purge_attempts(conn, now - MAX_ATTEMPT_WINDOW_US)?;
            let when = if purged == 0 {
                When::Now
            } else {
                When::Committed
            };
            Ok((purged, when))
        }))
    }

    fn purge_calls(&self, _now: i64) -> StoreFuture<'static, usize> {
        // Every call stays in the file: nothing to forget.
        Box::pin(std::future::ready(Ok(0)))
    }

    fn suspend(&self, suspension: Suspension) -> StoreFuture<'static, ()> {
        Box::pin(self.writer.run(Urgency::Wait, move |conn, _| {
            queries::put_suspension(conn, &suspension)?;
            Ok(((), When::Committed))
        }))
    }

    fn lift_suspension(&self, region: &str) -> StoreFuture<'static, bool> {
        let region = region.to_string();
        Box::pin(self.writer.run(Urgency::Wait, move |conn, _| {
            let lifted = queries::delete_suspension(conn, &region)?;
            Ok((lifted, if lifted { When::Committed } else { When::Now }))
        }))
    }

    fn suspensions(&self) -> StoreFuture<'static, Vec<Suspension>> {
        let writer = self.writer.clone();
        let readers = self.readers.clone();
        Box::pin(async move {
            writer.committed_up_to_now().await?;
            readers.read(queries::all_suspensions).await
        })
    }

    fn add_consent(&self, record: ConsentRecord) -> StoreFuture<'static, ()> {
        Box::pin(self.writer.run(Urgency::Shed, move |conn, _| {
            queries::put_consent(conn, &record)?;
            Ok(((), When::Committed))
        }))
    }

    fn get_consent(&self, id: &str) -> StoreFuture<'static, Option<ConsentRecord>> {
        let id = id.to_string();
        let writer = self.writer.clone();
        let readers = self.readers.clone();
        Box::pin(async move {
            // A record registered or revoked a moment ago is read as it is now.
            writer.committed_up_to_now().await?;
            readers
                .read(move |conn| queries::get_consent(conn, &id))
                .await
        })
    }

    fn revoke_consent(
        &self,
        id: &str,
        now: i64,
        by: &str,
    ) -> StoreFuture<'static, Option<ConsentRecord>> {
        let (id, by) = (id.to_string(), by.to_string());
        Box::pin(self.writer.run(Urgency::Wait, move |conn, _| {
            let Some(mut record) = queries::get_consent(conn, &id)? else {
                return Ok((None, When::Now));
            };
            if record.revoked_at.is_some() {
                return Ok((Some(record), When::Now));
            }
            record.revoked_at = Some(now);
            record.revoked_by = Some(by);
            queries::put_consent(conn, &record)?;
            Ok((Some(record), When::Committed))
        }))
    }

    fn revoke_consents_for(
        &self,
        phone_number: &str,
        tenant: Option<&str>,
        now: i64,
        by: &str,
    ) -> StoreFuture<'static, Vec<ConsentRecord>> {
        let (number, tenant, by) = (
            phone_number.to_string(),
            tenant.map(str::to_string),
            by.to_string(),
        );
        Box::pin(self.writer.run(Urgency::Wait, move |conn, _| {
            let mut revoked = Vec::new();
            for mut record in queries::consents_of(conn, &number)? {
                let theirs = tenant.as_deref().is_none_or(|t| t == record.tenant);
                if record.revoked_at.is_none() && theirs {
                    record.revoked_at = Some(now);
                    record.revoked_by = Some(by.clone());
                    queries::put_consent(conn, &record)?;
                    revoked.push(record);
                }
            }
            let when = if revoked.is_empty() {
                When::Now
            } else {
                When::Committed
            };
            Ok((revoked, when))
        }))
    }

    fn flush(&self) -> StoreFuture<'static, ()> {
        Box::pin(self.writer.flush())
    }

    fn close(&self) -> StoreFuture<'static, ()> {
        // The read-only connections close first (reads in progress are waited for), so that the
        // writer's is the last connection to the file: the last to close folds the log into the
        // file and removes it.
        let (readers, writer) = (self.readers.clone(), self.writer.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut closed = readers.gate.write().unwrap_or_else(|p| p.into_inner());
                *closed = true;
                readers
                    .idle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
            })
            .await
            .map_err(|e| StoreError::Backend(format!("close task failed: {e}")))?;
            writer.close().await
        })
    }

    fn check_consistency(&self, now: i64) -> StoreFuture<'static, ()> {
        let index = self.index.clone();
        Box::pin(self.writer.run(Urgency::Wait, move |conn, ledger| {
            let records = schema::load_ledger(conn)?;
            let mut differences = ledger.differences(&records, now);
            differences.extend(call_index::differences(conn, &index)?);
            if differences.is_empty() {
                Ok(((), When::Now))
            } else {
                Err(StoreError::Inconsistent(differences.join("; ")))
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store opened on a runtime fills its filter of upstream ids from the file in the
    /// background, on a read-only connection: the ids bound before the start are found through
    /// it, and the index agrees with the rows.
    #[tokio::test]
    async fn a_store_fills_its_filter_of_upstream_ids_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let conn = schema::open_writer(&path).unwrap();
            for i in 1..=3 {
                conn.execute(
                    "INSERT INTO calls (rowid, reservation_id, tenant, call_id, token_hash, status,
                         live, hold, price, increment_secs, max_duration, lease_expires_at,
                         created_at, updated_at)
                     VALUES (?1, 'r' || ?1, 'a', 'call-' || ?1, 'h' || ?1, 'completed', 0, 0, 0,
                         1, 60, 0, 0, 0)",
                    [i],
                )
                .unwrap();
            }
            // No bound on record: the next start indexes the bound calls in `call_keys`.
            conn.execute_batch("DELETE FROM call_keys_merged").unwrap();
        }
        let store = SqliteStore::open(&path, Synchronous::Normal).unwrap();
        for _ in 0..200 {
            if !store.index.wants_fill() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(!store.index.wants_fill(), "filled within 10 s");
        let reader = schema::open_reader(&path).unwrap();
        for i in 1..=3 {
            assert_eq!(
                store.index.find(&reader, &format!("call-{i}")).unwrap(),
                Some(format!("r{i}"))
            );
        }
        assert_eq!(store.index.find(&reader, "call-new").unwrap(), None);
        assert_eq!(
            call_index::differences(&reader, &store.index).unwrap(),
            Vec::<String>::new()
        );
        drop(reader);
        store.close().await.unwrap();
    }
}
