//! The embedded backend: SQLite in WAL mode, in one file.
//!
//! One writer thread owns the connection. Operations arrive on a channel; the thread takes all
//! that are waiting (up to a batch), runs each in its own savepoint inside one transaction,
//! commits once, and only then answers each caller (group commit). So an admission is durable
//! before its call is forwarded, many admissions share one fsync, and since the thread is the only
//! writer, each operation is atomic with respect to every other. The async runtime never blocks:
//! callers await a oneshot answer.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::*;

type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
type Op = Box<dyn FnOnce(&Connection) -> (bool, Reply) + Send>;

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 256;

/// Durability of each commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync on every commit: survives power loss.
    #[default]
    Full,
    /// WAL default: survives a process crash (`kill -9`), may lose the last commits on power loss.
    Normal,
}

/// See the module docs.
pub struct SqliteStore {
    ops: mpsc::UnboundedSender<Op>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS calls (
    reservation_id   TEXT PRIMARY KEY,
    tenant           TEXT NOT NULL,
    call_id          TEXT UNIQUE,
    token_hash       TEXT NOT NULL UNIQUE,
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
);
CREATE INDEX IF NOT EXISTS calls_live ON calls(live, tenant);
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
";

const RECORD_COLUMNS: &str = "reservation_id, tenant, call_id, status, object, live, hold, charged, \
     duration, max_duration, lease_expires_at, created_at, updated_at, tenant_webhook, price, increment_secs";

/// How a call is charged, as fixed at admission.
#[derive(Debug, Clone, Copy)]
struct Pricing {
    price: i64,
    increment: i64,
}

/// How a call ended.
struct Ending<'a> {
    status: &'a str,
    duration: Option<i64>,
    /// Charge the whole hold (the lease ran out: the call may have run to its limit).
    full_hold: bool,
}

fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(CallRecord, Pricing)> {
    let object: Option<String> = row.get(4)?;
    Ok((
        CallRecord {
            reservation_id: row.get(0)?,
            tenant: row.get(1)?,
            call_id: row.get(2)?,
            status: row.get(3)?,
            object: object.and_then(|s| serde_json::from_str(&s).ok()),
            live: row.get::<_, i64>(5)? == 1,
            hold: row.get(6)?,
            charged: row.get(7)?,
            duration: row.get(8)?,
            max_duration: row.get(9)?,
            lease_expires_at: row.get(10)?,
            created_at: row.get(11)?,
            updated_at: row.get(12)?,
            tenant_webhook: row.get(13)?,
        },
        Pricing {
            price: row.get(14)?,
            increment: row.get(15)?,
        },
    ))
}

fn load_record(
    conn: &Connection,
    clause: &str,
    key: &str,
) -> Result<Option<(CallRecord, Pricing)>, StoreError> {
    let sql = format!("SELECT {RECORD_COLUMNS} FROM calls WHERE {clause}");
    Ok(conn.query_row(&sql, [key], record_from_row).optional()?)
}

/// The tenant's spend in the period containing `now`, resetting it first if a new period began.
fn current_spend(conn: &Connection, tenant: &str, now: i64) -> Result<(i64, i64), StoreError> {
    let row: Option<(String, String, i64, i64)> = conn
        .query_row(
            "SELECT period, timezone, period_start, spent FROM budgets WHERE tenant = ?1",
            [tenant],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((period, tz, start, spent)) = row else {
        return Ok((0, 0));
    };
    let current = Period::parse(&period).start(&tz, now);
    if current > start {
        conn.execute(
            "UPDATE budgets SET period_start = ?2, spent = 0 WHERE tenant = ?1",
            params![tenant, current],
        )?;
        return Ok((0, current));
    }
    Ok((spent, start))
}

/// End a live call's accounting: charge, free the slot and the hold.
fn settle(
    conn: &Connection,
    record: &CallRecord,
    pricing: Pricing,
    ending: Ending<'_>,
    now: i64,
) -> Result<i64, StoreError> {
    let Ending {
        status,
        duration,
        full_hold,
    } = ending;
    let charge = if full_hold {
        record.hold
    } else {
        charge_for(
            duration.unwrap_or(0),
            pricing.increment,
            pricing.price,
            record.hold,
        )
    };
    current_spend(conn, &record.tenant, now)?;
    conn.execute(
        "INSERT INTO budgets (tenant, period, timezone, period_start, spent) VALUES (?1, 'none', 'UTC', 0, ?2)
         ON CONFLICT(tenant) DO UPDATE SET spent = spent + ?2",
        params![record.tenant, charge],
    )?;
    conn.execute(
        "UPDATE calls SET live = 0, hold = 0, charged = ?2, status = ?3, duration = COALESCE(?4, duration),
                          updated_at = ?5 WHERE reservation_id = ?1",
        params![record.reservation_id, charge, status, duration, now],
    )?;
    Ok(charge)
}

impl SqliteStore {
    /// Open (or create) the database at `path` and start the writer thread.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(
            None,
            "synchronous",
            match synchronous {
                Synchronous::Full => "FULL",
                Synchronous::Normal => "NORMAL",
            },
        )?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("callgate-sqlite".into())
            .spawn(move || writer(conn, rx))
            .map_err(|e| StoreError(format!("cannot start the store thread: {e}")))?;
        Ok(SqliteStore { ops: tx })
    }

    fn release_op(&self, reservation_id: &str) -> StoreFuture<'static, ()> {
        let id = reservation_id.to_string();
        self.run(move |conn| {
            conn.execute(
                "DELETE FROM calls WHERE reservation_id = ?1 AND call_id IS NULL",
                [&id],
            )?;
            Ok(())
        })
    }

    fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> StoreFuture<'static, R> {
        let (tx, rx) = oneshot::channel();
        let op: Op = Box::new(move |conn| {
            let result = f(conn);
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |commit| {
                let _ = tx.send(commit.and(result));
            });
            (ok, reply)
        });
        let sent = self.ops.send(op);
        Box::pin(async move {
            sent.map_err(|_| StoreError("closed".into()))?;
            rx.await.map_err(|_| StoreError("closed".into()))?
        })
    }
}

fn writer(mut conn: Connection, mut ops: mpsc::UnboundedReceiver<Op>) {
    while let Some(first) = ops.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut tx = match conn.transaction() {
            Ok(tx) => tx,
            Err(e) => {
                tracing::error!(error = %e, "state store: cannot begin a transaction");
                for op in batch {
                    // Run nothing; answer every caller with the error.
                    let (_, reply) = op_failed(op, &e.to_string());
                    reply(Err(StoreError(e.to_string())));
                }
                continue;
            }
        };
        let mut replies = Vec::with_capacity(batch.len());
        for op in batch {
            let reply = match tx.savepoint() {
                Ok(mut sp) => {
                    let (ok, reply) = op(&sp);
                    if !ok {
                        let _ = sp.rollback();
                    }
                    let _ = sp.commit();
                    reply
                }
                Err(e) => op_failed(op, &e.to_string()).1,
            };
            replies.push(reply);
        }
        let committed = tx.commit().map_err(|e| {
            tracing::error!(error = %e, "state store: commit failed");
            StoreError(e.to_string())
        });
        for reply in replies {
            reply(committed.clone());
        }
    }
}

/// An operation that could not run: its reply carries the error.
fn op_failed(_op: Op, error: &str) -> (bool, Reply) {
    let error = error.to_string();
    (
        false,
        Box::new(move |_| tracing::error!(%error, "state store operation failed")),
    )
}

impl StateStore for SqliteStore {
    fn admit(&self, req: AdmitRequest) -> StoreFuture<'_, AdmitOutcome> {
        self.run(move |conn| {
            let (tenant_slots, holds): (i64, i64) = conn.query_row(
                "SELECT COUNT(*), COALESCE(SUM(hold), 0) FROM calls WHERE live = 1 AND tenant = ?1",
                [&req.tenant],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if let Some(limit) = req.tenant_max_concurrent
                && tenant_slots >= i64::from(limit)
            {
                return Ok(AdmitOutcome::TenantSlotsFull { limit });
            }
            let account_slots: i64 =
                conn.query_row("SELECT COUNT(*) FROM calls WHERE live = 1", [], |r| r.get(0))?;
            if account_slots >= i64::from(req.account_max_concurrent) {
                return Ok(AdmitOutcome::AccountSlotsFull {
                    limit: req.account_max_concurrent,
                });
            }
            if let Some(budget) = &req.budget {
                let start = budget.period.start(&budget.timezone, req.now);
                conn.execute(
                    "INSERT INTO budgets (tenant, period, timezone, period_start, spent) VALUES (?1, ?2, ?3, ?4, 0)
                     ON CONFLICT(tenant) DO UPDATE SET period = ?2, timezone = ?3",
                    params![req.tenant, budget.period.as_str(), budget.timezone, start],
                )?;
                let (spent, _) = current_spend(conn, &req.tenant, req.now)?;
                let available = budget.credits - spent - holds;
                if req.hold > available {
                    return Ok(AdmitOutcome::InsufficientCredits {
                        needed: req.hold,
                        available: available.max(0),
                    });
                }
            }
            conn.execute(
                "INSERT INTO calls (reservation_id, tenant, token_hash, status, live, hold, price, increment_secs,
                                    max_duration, lease_expires_at, created_at, updated_at, tenant_webhook)
                 VALUES (?1, ?2, ?3, 'pending', 1, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10)",
                params![
                    req.reservation_id,
                    req.tenant,
                    req.token_hash,
                    req.hold,
                    req.price,
                    req.increment_secs,
                    req.max_duration,
                    req.lease_expires_at,
                    req.now,
                    req.tenant_webhook
                ],
            )?;
            Ok(AdmitOutcome::Admitted)
        })
    }

    fn bind(
        &self,
        reservation_id: &str,
        call_id: &str,
        object: Value,
        lease_expires_at: i64,
        now: i64,
    ) -> StoreFuture<'_, ()> {
        let (reservation_id, call_id) = (reservation_id.to_string(), call_id.to_string());
        self.run(move |conn| {
            let status = object
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("queued")
                .to_string();
            // An event may have arrived (even settled the call) before the upstream's answer did:
            // keep its status then, and never revive a settled call's lease.
            conn.execute(
                "UPDATE calls SET call_id = ?2, object = ?3,
                        status = CASE WHEN status = 'pending' THEN ?4 ELSE status END,
                        lease_expires_at = CASE WHEN live = 1 THEN ?5 ELSE lease_expires_at END,
                        updated_at = ?6
                 WHERE reservation_id = ?1",
                params![
                    reservation_id,
                    call_id,
                    object.to_string(),
                    status,
                    lease_expires_at,
                    now
                ],
            )?;
            Ok(())
        })
    }

    fn release(&self, reservation_id: &str) -> StoreFuture<'_, ()> {
        self.release_op(reservation_id)
    }

    fn release_detached(&self, reservation_id: &str) {
        let fut = self.release_op(reservation_id);
        let id = reservation_id.to_string();
        // The operation is queued by the call above; awaiting only observes the result.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(e) = fut.await {
                    tracing::error!(reservation = %id, error = %e, "release failed");
                }
            });
        }
    }

    fn record_event(
        &self,
        token_hash: &str,
        event: CallEvent,
        now: i64,
    ) -> StoreFuture<'_, EventOutcome> {
        let token_hash = token_hash.to_string();
        self.run(move |conn| {
            let Some((record, pricing)) = load_record(conn, "token_hash = ?1", &token_hash)? else {
                return Ok(EventOutcome::UnknownToken);
            };
            if let (Some(bound), Some(named)) = (&record.call_id, &event.call_id)
                && bound != named
            {
                return Ok(EventOutcome::CallMismatch);
            }
            let settled = apply_event(conn, &record, pricing, &event, None, now)?;
            let (record, _) = load_record(conn, "reservation_id = ?1", &record.reservation_id)?
                .ok_or_else(|| StoreError("call vanished".into()))?;
            Ok(EventOutcome::Applied {
                record: Box::new(record),
                settled,
            })
        })
    }

    fn apply_upstream_state(
        &self,
        call_id: &str,
        event: CallEvent,
        object: Option<Value>,
        now: i64,
    ) -> StoreFuture<'_, Option<CallRecord>> {
        let call_id = call_id.to_string();
        self.run(move |conn| {
            let Some((record, pricing)) = load_record(conn, "call_id = ?1", &call_id)? else {
                return Ok(None);
            };
            apply_event(conn, &record, pricing, &event, object, now)?;
            Ok(load_record(conn, "reservation_id = ?1", &record.reservation_id)?.map(|r| r.0))
        })
    }

    fn expire_leases(&self, now: i64) -> StoreFuture<'_, Vec<CallRecord>> {
        self.run(move |conn| {
            let sql = format!(
                "SELECT {RECORD_COLUMNS} FROM calls WHERE live = 1 AND lease_expires_at <= ?1"
            );
            let mut stmt = conn.prepare(&sql)?;
            let lapsed: Vec<(CallRecord, Pricing)> = stmt
                .query_map([now], record_from_row)?
                .collect::<Result<_, _>>()?;
            let mut out = Vec::with_capacity(lapsed.len());
            for (record, pricing) in lapsed {
                let ending = Ending {
                    status: "expired",
                    duration: None,
                    full_hold: true,
                };
                settle(conn, &record, pricing, ending, now)?;
                if let Some((r, _)) =
                    load_record(conn, "reservation_id = ?1", &record.reservation_id)?
                {
                    out.push(r);
                }
            }
            Ok(out)
        })
    }

    fn quiet_calls(&self, quiet_since: i64, limit: usize) -> StoreFuture<'_, Vec<CallRecord>> {
        self.run(move |conn| {
            let sql = format!(
                "SELECT {RECORD_COLUMNS} FROM calls WHERE live = 1 AND call_id IS NOT NULL AND updated_at <= ?1
                 ORDER BY updated_at LIMIT ?2"
            );
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt
                .query_map(params![quiet_since, limit as i64], record_from_row)?
                .map(|r| r.map(|r| r.0))
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn get_call(&self, tenant: &str, call_id: &str) -> StoreFuture<'_, Option<CallRecord>> {
        let (tenant, call_id) = (tenant.to_string(), call_id.to_string());
        self.run(move |conn| {
            Ok(load_record(conn, "call_id = ?1", &call_id)?
                .map(|r| r.0)
                .filter(|r| r.tenant == tenant))
        })
    }

    fn list_calls(
        &self,
        tenant: &str,
        limit: usize,
        before: Option<String>,
    ) -> StoreFuture<'_, Vec<CallRecord>> {
        let tenant = tenant.to_string();
        self.run(move |conn| {
            let sql = format!(
                "SELECT {RECORD_COLUMNS} FROM calls WHERE tenant = ?1 AND call_id IS NOT NULL AND reservation_id < ?2
                 ORDER BY reservation_id DESC LIMIT ?3"
            );
            let mut stmt = conn.prepare(&sql)?;
            let before = before.unwrap_or_else(|| "\u{10FFFF}".to_string());
            let rows = stmt
                .query_map(params![tenant, before, limit as i64], record_from_row)?
                .map(|r| r.map(|r| r.0))
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn usage(&self, tenant: &str, now: i64) -> StoreFuture<'_, Usage> {
        let tenant = tenant.to_string();
        self.run(move |conn| {
            let (slots, holds): (i64, i64) = conn.query_row(
                "SELECT COUNT(*), COALESCE(SUM(hold), 0) FROM calls WHERE live = 1 AND tenant = ?1",
                [&tenant],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let (spent, period_start) = current_spend(conn, &tenant, now)?;
            Ok(Usage {
                slots,
                holds,
                spent,
                period_start,
            })
        })
    }

    fn idempotency_begin(
        &self,
        tenant: &str,
        key: &str,
        body_hash: &str,
        now: i64,
        expires_at: i64,
    ) -> StoreFuture<'_, IdempotencyBegin> {
        let (tenant, key, body_hash) = (tenant.to_string(), key.to_string(), body_hash.to_string());
        self.run(move |conn| {
            type Row = (String, String, Option<i64>, Option<Vec<u8>>, Option<String>, i64);
            let row: Option<Row> = conn
                .query_row(
                    "SELECT body_hash, state, status, body, content_type, expires_at FROM idempotency
                     WHERE tenant = ?1 AND key = ?2",
                    params![tenant, key],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
                )
                .optional()?;
            match row {
                Some((hash, state, status, body, content_type, expires)) if expires > now => {
                    if hash != body_hash {
                        Ok(IdempotencyBegin::Conflict)
                    } else if state == "done" {
                        Ok(IdempotencyBegin::Replay(StoredResponse {
                            status: status.unwrap_or(200) as u16,
                            body: body.unwrap_or_default(),
                            content_type: content_type.unwrap_or_else(|| "application/json".into()),
                        }))
                    } else {
                        Ok(IdempotencyBegin::InFlight)
                    }
                }
                _ => {
                    conn.execute(
                        "INSERT OR REPLACE INTO idempotency (tenant, key, body_hash, state, created_at, expires_at)
                         VALUES (?1, ?2, ?3, 'in_flight', ?4, ?5)",
                        params![tenant, key, body_hash, now, expires_at],
                    )?;
                    Ok(IdempotencyBegin::Proceed)
                }
            }
        })
    }

    fn idempotency_complete(
        &self,
        tenant: &str,
        key: &str,
        response: StoredResponse,
    ) -> StoreFuture<'_, ()> {
        let (tenant, key) = (tenant.to_string(), key.to_string());
        self.run(move |conn| {
            conn.execute(
                "UPDATE idempotency SET state = 'done', status = ?3, body = ?4, content_type = ?5
                 WHERE tenant = ?1 AND key = ?2",
                params![
                    tenant,
                    key,
                    response.status,
                    response.body,
                    response.content_type
                ],
            )?;
            Ok(())
        })
    }

    fn idempotency_abandon(&self, tenant: &str, key: &str) -> StoreFuture<'_, ()> {
        let (tenant, key) = (tenant.to_string(), key.to_string());
        self.run(move |conn| {
            conn.execute(
                "DELETE FROM idempotency WHERE tenant = ?1 AND key = ?2 AND state = 'in_flight'",
                params![tenant, key],
            )?;
            Ok(())
        })
    }

    fn purge_idempotency(&self, now: i64) -> StoreFuture<'_, usize> {
        self.run(move |conn| {
            Ok(conn.execute("DELETE FROM idempotency WHERE expires_at <= ?1", [now])?)
        })
    }
}

/// Apply an event (or the upstream's answer) to a call; returns whether it settled the call.
fn apply_event(
    conn: &Connection,
    record: &CallRecord,
    pricing: Pricing,
    event: &CallEvent,
    object: Option<Value>,
    now: i64,
) -> Result<bool, StoreError> {
    if let Some(object) = object {
        conn.execute(
            "UPDATE calls SET object = ?2 WHERE reservation_id = ?1",
            params![record.reservation_id, object.to_string()],
        )?;
    }
    if !record.live {
        // Already settled (final event, reconciliation or lease): the first ending counts.
        return Ok(false);
    }
    if event.is_final {
        let ending = Ending {
            status: &event.status,
            duration: event.duration,
            full_hold: false,
        };
        settle(conn, record, pricing, ending, now)?;
        return Ok(true);
    }
    conn.execute(
        "UPDATE calls SET status = ?2, updated_at = ?3 WHERE reservation_id = ?1",
        params![record.reservation_id, event.status, now],
    )?;
    Ok(false)
}
