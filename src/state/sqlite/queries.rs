//! Every statement the store runs, each prepared once per connection: through the statement
//! cache (`prepare_cached`), or, for those every call runs on the writer, held ([`Db`]).

use std::cell::RefCell;

use rusqlite::{Connection, OptionalExtension, PrepFlags, Statement, params};
use serde_json::Value;

use crate::state::accounting::{Pricing, Spend};
use crate::state::{
    AdmitRequest, CallRecord, ConsentRecord, IdempotencyBegin, IdempotencyClaim, OptOut,
    StoreError, StoredResponse, Suspension,
};

/// `SELECT` of a call's columns (as [`record_from_row`] reads them) `WHERE` the clause.
macro_rules! select_calls {
    ($clause:literal $(,)?) => {
        concat!(
            "SELECT reservation_id, tenant, call_id, status, object, live, hold, charged, duration, ",
            "max_duration, lease_expires_at, created_at, updated_at, tenant_webhook, price, increment_secs ",
            "FROM calls WHERE ",
            $clause
        )
    };
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
            increment_secs: row.get(15)?,
        },
    ))
}

/// One call and its pricing, by reservation id (by upstream id: [`super::call_index`] finds the
/// reservation).
pub fn load_call(
    conn: &Connection,
    reservation_id: &str,
) -> Result<Option<(CallRecord, Pricing)>, StoreError> {
    let mut stmt = conn.prepare_cached(select_calls!("reservation_id = ?1"))?;
    Ok(stmt
        .query_row([reservation_id], record_from_row)
        .optional()?)
}

/// The stored hash of a reservation's relay token secret.
pub fn token_hash(conn: &Connection, reservation_id: &str) -> Result<Option<String>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT token_hash FROM calls WHERE reservation_id = ?1")?;
    Ok(stmt.query_row([reservation_id], |r| r.get(0)).optional()?)
}

/// The reservation whose relay token (issued before tokens named their reservation) hashes so.
pub fn reservation_of_token(conn: &Connection, hash: &str) -> Result<Option<String>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT reservation_id FROM calls WHERE token_hash = ?1")?;
    Ok(stmt.query_row([hash], |r| r.get(0)).optional()?)
}

/// The writer's connection (a `Db` derefs to it), with the statements every call runs (its
/// admission, its bind, its batch's `BEGIN` and `COMMIT`) prepared once, on first use, and held.
/// Through the connection's statement cache each use hashed the statement's text twice, copied
/// it into a new key and cleared its bindings: about 1 100 instructions a use, three uses a call
/// (docs/benchmarks.md).
pub struct Db<'c> {
    conn: &'c Connection,
    insert_call: RefCell<Option<Statement<'c>>>,
    bind_state: RefCell<Option<Statement<'c>>>,
    bind_call: RefCell<Option<Statement<'c>>>,
    begin: RefCell<Option<Statement<'c>>>,
    commit: RefCell<Option<Statement<'c>>>,
}

impl<'c> Db<'c> {
    pub fn new(conn: &'c Connection) -> Self {
        Db {
            conn,
            insert_call: RefCell::default(),
            bind_state: RefCell::default(),
            bind_call: RefCell::default(),
            begin: RefCell::default(),
            commit: RefCell::default(),
        }
    }

    /// Open the writer's transaction. IMMEDIATE: the write lock first (see the writer).
    pub fn begin(&self) -> rusqlite::Result<()> {
        self.with(&self.begin, "BEGIN IMMEDIATE", |stmt| stmt.execute([]))
            .map(|_| ())
    }

    /// Commit the writer's transaction.
    pub fn commit(&self) -> rusqlite::Result<()> {
        self.with(&self.commit, "COMMIT", |stmt| stmt.execute([]))
            .map(|_| ())
    }

    /// Run `f` on the statement held in `slot`, prepared from `sql` the first time.
    fn with<T>(
        &self,
        slot: &RefCell<Option<Statement<'c>>>,
        sql: &str,
        f: impl FnOnce(&mut Statement<'c>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let mut slot = slot.borrow_mut();
        let stmt = match slot.take() {
            Some(stmt) => slot.insert(stmt),
            // Long-lived, as the cache marks its statements: SQLite keeps it out of the
            // connection's small fast-allocation pool.
            None => slot.insert(
                self.conn
                    .prepare_with_flags(sql, PrepFlags::SQLITE_PREPARE_PERSISTENT)?,
            ),
        };
        f(stmt)
    }
}

impl std::ops::Deref for Db<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

/// Record an admitted call: live, pending, holding its slot and hold.
pub fn insert_call(db: &Db, req: &AdmitRequest) -> Result<(), StoreError> {
    db.with(
        &db.insert_call,
        "INSERT INTO calls (reservation_id, tenant, token_hash, status, live, hold, price, increment_secs,
                            max_duration, lease_expires_at, created_at, updated_at, tenant_webhook)
         VALUES (?1, ?2, ?3, 'pending', 1, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10)",
        |stmt| {
            stmt.execute(params![
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
            ])
        },
    )?;
    Ok(())
}

/// Record a tenant's spend as the counters have it.
pub fn store_spend(conn: &Connection, tenant: &str, spend: &Spend) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO budgets (tenant, period, timezone, period_start, spent) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(tenant) DO UPDATE SET period = ?2, timezone = ?3, period_start = ?4, spent = ?5",
    )?;
    stmt.execute(params![
        tenant,
        spend.period.as_str(),
        spend.timezone,
        spend.period_start,
        spend.spent
    ])?;
    Ok(())
}

/// What a bind needs of a reservation.
pub struct BindState {
    pub status: String,
    pub live: bool,
    pub lease_expires_at: i64,
    pub row: i64,
    /// The upstream id it is bound to already, if any.
    pub call_id: Option<String>,
}

/// What a bind needs of a reservation: its status, liveness, lease, row and upstream id.
pub fn bind_state(db: &Db, reservation_id: &str) -> Result<Option<BindState>, StoreError> {
    Ok(db
        .with(
            &db.bind_state,
            "SELECT status, live, lease_expires_at, rowid, call_id FROM calls WHERE reservation_id = ?1",
            |stmt| {
                stmt.query_row([reservation_id], |r| {
                    Ok(BindState {
                        status: r.get(0)?,
                        live: r.get::<_, i64>(1)? == 1,
                        lease_expires_at: r.get(2)?,
                        row: r.get(3)?,
                        call_id: r.get(4)?,
                    })
                })
                .optional()
            },
        )?)
}

/// Run a transaction-control statement (`BEGIN`, `SAVEPOINT`, `RELEASE`, `ROLLBACK`) through
/// the statement cache: parsed once, not once per operation.
pub fn control(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Run `f`, which writes more than once, in a savepoint of its own inside the writer's
/// transaction: its writes land together or not at all (for an operation that runs without the
/// writer's savepoint, `Writes::OneStatement`, and writes twice only sometimes).
pub fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    control(conn, "SAVEPOINT inner")?;
    let done = f();
    if conn.is_autocommit() {
        // SQLite rolled the whole transaction back (a failing disk): the writer fails the batch.
        return done;
    }
    let ended = match &done {
        Ok(_) => control(conn, "RELEASE inner"),
        Err(_) => control(conn, "ROLLBACK TO inner").and_then(|()| control(conn, "RELEASE inner")),
    };
    if let Err(e) = ended {
        // The savepoint could not be ended as it should: undo the whole transaction rather
        // than commit writes whose operation failed (or answer a failure for writes that
        // stay). The writer then fails the batch, as for a failing disk.
        let _ = control(conn, "ROLLBACK");
        return Err(done.err().unwrap_or_else(|| e.into()));
    }
    done
}

/// Bind a reservation to the upstream's call; `row` is its row, as [`bind_state`] read it in
/// the same transaction (found by rowid: no second look-up of the reservation id's index).
pub fn bind_call(
    db: &Db,
    row: i64,
    call_id: &str,
    object: &str,
    status: &str,
    lease_expires_at: i64,
    now: i64,
) -> Result<(), StoreError> {
    db.with(
        &db.bind_call,
        "UPDATE calls SET call_id = ?2, object = ?3, status = ?4, lease_expires_at = ?5, updated_at = ?6
         WHERE rowid = ?1",
        |stmt| stmt.execute(params![row, call_id, object, status, lease_expires_at, now]),
    )?;
    Ok(())
}

/// Learn a call's upstream id from its first event (its bind was never recorded); returns its
/// row if it had none.
pub fn set_call_id(
    conn: &Connection,
    reservation_id: &str,
    call_id: &str,
) -> Result<Option<i64>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "UPDATE calls SET call_id = ?2 WHERE reservation_id = ?1 AND call_id IS NULL RETURNING rowid",
    )?;
    Ok(stmt
        .query_row(params![reservation_id, call_id], |r| r.get(0))
        .optional()?)
}

/// Forget a reservation the upstream never accepted; returns its tenant, hold and liveness.
pub fn delete_pending(
    conn: &Connection,
    reservation_id: &str,
) -> Result<Option<(String, i64, bool)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "DELETE FROM calls WHERE reservation_id = ?1 AND call_id IS NULL RETURNING tenant, hold, live",
    )?;
    Ok(stmt
        .query_row([reservation_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? == 1))
        })
        .optional()?)
}

/// Mark a call settled.
pub fn settle_call(
    conn: &Connection,
    reservation_id: &str,
    charge: i64,
    status: &str,
    duration: Option<i64>,
    now: i64,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "UPDATE calls SET live = 0, hold = 0, charged = ?2, status = ?3, duration = COALESCE(?4, duration),
                          updated_at = ?5 WHERE reservation_id = ?1",
    )?;
    stmt.execute(params![reservation_id, charge, status, duration, now])?;
    Ok(())
}

/// A live call's new status.
pub fn set_status(
    conn: &Connection,
    reservation_id: &str,
    status: &str,
    now: i64,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "UPDATE calls SET status = ?2, updated_at = ?3 WHERE reservation_id = ?1",
    )?;
    stmt.execute(params![reservation_id, status, now])?;
    Ok(())
}

/// The upstream's latest call object.
pub fn set_object(
    conn: &Connection,
    reservation_id: &str,
    object: &Value,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached("UPDATE calls SET object = ?2 WHERE reservation_id = ?1")?;
    stmt.execute(params![reservation_id, object.to_string()])?;
    Ok(())
}

/// Live calls whose lease ended by `now` (the partial index on lease end finds them).
pub fn lapsed_calls(conn: &Connection, now: i64) -> Result<Vec<(CallRecord, Pricing)>, StoreError> {
    let mut stmt = conn.prepare_cached(select_calls!("live = 1 AND lease_expires_at <= ?1",))?;
    let rows = stmt
        .query_map([now], record_from_row)?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Live bound calls not updated since `quiet_since`, oldest first.
pub fn quiet_calls(
    conn: &Connection,
    quiet_since: i64,
    lapsing_by: i64,
    limit: usize,
) -> Result<Vec<CallRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(select_calls!(
        "live = 1 AND call_id IS NOT NULL AND (updated_at <= ?1 OR lease_expires_at <= ?3) \
         ORDER BY lease_expires_at > ?3, \
         CASE WHEN lease_expires_at <= ?3 THEN lease_expires_at ELSE updated_at END LIMIT ?2",
    ))?;
    let rows = stmt
        .query_map(
            params![quiet_since, limit as i64, lapsing_by],
            record_from_row,
        )?
        .map(|r| r.map(|r| r.0))
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// A tenant's bound calls, newest first, before the reservation id `before`.
pub fn list_calls(
    conn: &Connection,
    tenant: &str,
    limit: usize,
    before: Option<&str>,
) -> Result<Vec<CallRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(select_calls!(
        "tenant = ?1 AND call_id IS NOT NULL AND reservation_id < ?2 ORDER BY reservation_id DESC LIMIT ?3",
    ))?;
    let rows = stmt
        .query_map(
            params![tenant, before.unwrap_or("\u{10FFFF}"), limit as i64],
            record_from_row,
        )?
        .map(|r| r.map(|r| r.0))
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// What an idempotency key's record says to a request with `body_hash` at `now`; `None`: no
/// record, or an expired one.
pub fn idempotency_state(
    conn: &Connection,
    tenant: &str,
    key: &str,
    body_hash: &str,
    now: i64,
) -> Result<Option<IdempotencyBegin>, StoreError> {
    type Row = (
        String,
        String,
        Option<i64>,
        Option<Vec<u8>>,
        Option<String>,
        i64,
    );
    let mut stmt = conn.prepare_cached(
        "SELECT body_hash, state, status, body, content_type, expires_at FROM idempotency
         WHERE tenant = ?1 AND key = ?2",
    )?;
    let row: Option<Row> = stmt
        .query_row(params![tenant, key], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .optional()?;
    Ok(match row {
        Some((hash, state, status, body, content_type, expires)) if expires > now => {
            Some(if hash != body_hash {
                IdempotencyBegin::Conflict
            } else if state == "done" {
                IdempotencyBegin::Replay(StoredResponse {
                    status: status.unwrap_or(200) as u16,
                    body: body.unwrap_or_default(),
                    content_type: content_type.unwrap_or_else(|| "application/json".into()),
                })
            } else {
                IdempotencyBegin::InFlight
            })
        }
        _ => None,
    })
}

/// Claim a key for a request now in flight.
pub fn claim_idempotency(
    conn: &Connection,
    tenant: &str,
    key: &str,
    body_hash: &str,
    now: i64,
    expires_at: i64,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "INSERT OR REPLACE INTO idempotency (tenant, key, body_hash, state, created_at, expires_at)
         VALUES (?1, ?2, ?3, 'in_flight', ?4, ?5)",
    )?;
    stmt.execute(params![tenant, key, body_hash, now, expires_at])?;
    Ok(())
}

/// Keep the answer for a key: its claim's record becomes the answer, or (the claim was lost to
/// a failed commit) the answer is recorded afresh.
pub fn complete_idempotency(
    conn: &Connection,
    tenant: &str,
    key: &str,
    claim: &IdempotencyClaim,
    response: &StoredResponse,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO idempotency (tenant, key, body_hash, state, status, body, content_type, created_at, expires_at)
         VALUES (?1, ?2, ?3, 'done', ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT(tenant, key) DO UPDATE SET state = 'done', status = ?4, body = ?5, content_type = ?6",
    )?;
    stmt.execute(params![
        tenant,
        key,
        claim.body_hash,
        response.status,
        response.body,
        response.content_type,
        claim.created_at,
        claim.expires_at
    ])?;
    Ok(())
}

/// Give a claimed key up.
pub fn abandon_idempotency(conn: &Connection, tenant: &str, key: &str) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "DELETE FROM idempotency WHERE tenant = ?1 AND key = ?2 AND state = 'in_flight'",
    )?;
    stmt.execute(params![tenant, key])?;
    Ok(())
}

/// Forget expired idempotency records.
pub fn purge_idempotency(conn: &Connection, now: i64) -> Result<usize, StoreError> {
    let mut stmt = conn.prepare_cached("DELETE FROM idempotency WHERE expires_at <= ?1")?;
    Ok(stmt.execute([now])?)
}

/// The scope column of an opt-out: `*` for every tenant (no tenant id can be `*`).
fn opt_out_scope(tenant: Option<&str>) -> &str {
    tenant.unwrap_or("*")
}

/// Record an opt-out; `false` if one of its scope was there.
pub fn insert_opt_out(conn: &Connection, entry: &OptOut) -> Result<bool, StoreError> {
    let mut stmt = conn.prepare_cached(
        "INSERT OR IGNORE INTO opt_outs (phone_number, scope, source, created_at) VALUES (?1, ?2, ?3, ?4)",
    )?;
    let scope = opt_out_scope(entry.tenant.as_deref());
    Ok(stmt.execute(params![
        entry.phone_number,
        scope,
        entry.source,
        entry.created_at
    ])? == 1)
}

/// Remove an opt-out; `false` if there was none.
pub fn delete_opt_out(
    conn: &Connection,
    phone_number: &str,
    tenant: Option<&str>,
) -> Result<bool, StoreError> {
    let mut stmt =
        conn.prepare_cached("DELETE FROM opt_outs WHERE phone_number = ?1 AND scope = ?2")?;
    Ok(stmt.execute(params![phone_number, opt_out_scope(tenant)])? == 1)
}

fn opt_out_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OptOut> {
    let scope: String = r.get(1)?;
    Ok(OptOut {
        phone_number: r.get(0)?,
        tenant: (scope != "*").then_some(scope),
        source: r.get(2)?,
        created_at: r.get(3)?,
    })
}

/// Every opt-out.
pub fn all_opt_outs(conn: &Connection) -> Result<Vec<OptOut>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT phone_number, scope, source, created_at FROM opt_outs")?;
    let rows = stmt.query_map([], opt_out_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A number's opt-outs.
pub fn opt_outs_of(conn: &Connection, phone_number: &str) -> Result<Vec<OptOut>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT phone_number, scope, source, created_at FROM opt_outs WHERE phone_number = ?1",
    )?;
    let rows = stmt.query_map([phone_number], opt_out_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The times of a number's attempts in a scope after `since`, oldest first.
pub fn attempt_times(
    conn: &Connection,
    scope: &str,
    phone_number: &str,
    since: i64,
) -> Result<Vec<i64>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT at FROM attempts WHERE scope = ?1 AND phone_number = ?2 AND at > ?3 ORDER BY at",
    )?;
    let rows = stmt.query_map(params![scope, phone_number, since], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Count an attempt.
pub fn insert_attempt(
    conn: &Connection,
    scope: &str,
    phone_number: &str,
    attempt_id: &str,
    at: i64,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "INSERT OR IGNORE INTO attempts (scope, phone_number, attempt_id, at) VALUES (?1, ?2, ?3, ?4)",
    )?;
    stmt.execute(params![scope, phone_number, attempt_id, at])?;
    Ok(())
}

/// Forget an attempt.
pub fn delete_attempt(
    conn: &Connection,
    scope: &str,
    phone_number: &str,
    attempt_id: &str,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "DELETE FROM attempts WHERE scope = ?1 AND phone_number = ?2 AND attempt_id = ?3",
    )?;
    stmt.execute(params![scope, phone_number, attempt_id])?;
    Ok(())
}

/// Forget attempts made before `before`.
pub fn purge_attempts(conn: &Connection, before: i64) -> Result<usize, StoreError> {
    let mut stmt = conn.prepare_cached("DELETE FROM attempts WHERE at < ?1")?;
    Ok(stmt.execute([before])?)
}

/// Store a consent record (new, or revoked).
pub fn put_consent(conn: &Connection, record: &ConsentRecord) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "INSERT OR REPLACE INTO consents (id, tenant, phone_number, record) VALUES (?1, ?2, ?3, ?4)",
    )?;
    let json = serde_json::to_string(record).map_err(|e| StoreError::Backend(e.to_string()))?;
    stmt.execute(params![record.id, record.tenant, record.phone_number, json])?;
    Ok(())
}

fn consent_from_json(json: String) -> rusqlite::Result<ConsentRecord> {
    serde_json::from_str(&json).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// A consent record by id.
pub fn get_consent(conn: &Connection, id: &str) -> Result<Option<ConsentRecord>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT record FROM consents WHERE id = ?1")?;
    Ok(stmt
        .query_row([id], |r| consent_from_json(r.get(0)?))
        .optional()?)
}

/// A number's consent records.
pub fn consents_of(
    conn: &Connection,
    phone_number: &str,
) -> Result<Vec<ConsentRecord>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT record FROM consents WHERE phone_number = ?1")?;
    let rows = stmt.query_map([phone_number], |r| consent_from_json(r.get(0)?))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Record a suspension, replacing the region's.
pub fn put_suspension(conn: &Connection, s: &Suspension) -> Result<(), StoreError> {
    let mut stmt =
        conn.prepare_cached("INSERT OR REPLACE INTO suspensions (region, record) VALUES (?1, ?2)")?;
    let json = serde_json::to_string(s).map_err(|e| StoreError::Backend(e.to_string()))?;
    stmt.execute(params![s.region, json])?;
    Ok(())
}

/// Lift a region's suspension.
pub fn delete_suspension(conn: &Connection, region: &str) -> Result<bool, StoreError> {
    let mut stmt = conn.prepare_cached("DELETE FROM suspensions WHERE region = ?1")?;
    Ok(stmt.execute([region])? == 1)
}

/// Every suspension.
pub fn all_suspensions(conn: &Connection) -> Result<Vec<Suspension>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT record FROM suspensions ORDER BY region")?;
    let rows = stmt.query_map([], |r| {
        let json: String = r.get(0)?;
        serde_json::from_str(&json).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
