//! The upstream-id index: recent binds in memory, merged into the `call_ids` table in sorted
//! chunks.
//!
//! Upstream ids are random: a b-tree keyed by them takes each bind on a leaf of its own, so a
//! commit of eight binds wrote eight leaves of it (half of what a commit wrote at saturation), and
//! more of them as the file grows (docs/benchmarks.md, "Where a commit's pages go"). Here a bind
//! writes only its call's row (which it rewrites anyway); the index learns it in memory, and
//! once [`MERGE_AT`] binds have gathered, the writer merges them into `call_ids` in key order,
//! [`MERGE_CHUNK`] a transaction, after it has answered a batch. Binds that share a leaf then
//! share its write.
//!
//! What is durable: the calls row holds its upstream id from the bind's commit on. `call_ids`
//! holds every bound call whose row is at or below `call_ids_merged.up_to` (a rowid, with the
//! reservation of that row as its `anchor`: a `VACUUM` may renumber rows, and then `call_ids` is
//! made afresh); the rows above it are read back into memory at start. A merge moves `up_to`
//! only in the transaction of its last chunk, and a bind of a row at or below the bound the
//! running merge will set (a call whose upstream answered late) goes straight into `call_ids`,
//! in the bind's transaction. So a crash at any point leaves every bound call in `call_ids` or
//! above `up_to`; a chunk merged again after a crash finds its entries there, the same.
//!
//! Readers take a hit in memory only if the row they read has that upstream id (a bind still in
//! the writer's open transaction is not found, as before); entries leave memory only after the
//! chunk that merged them is committed.

use std::collections::HashMap;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use crate::state::StoreError;

/// Binds gathered in memory before a merge starts (a second or two of binds at saturation; peak
/// RSS there rose by about 5 MiB with the map and a merge's sorted copy).
pub const MERGE_AT: usize = 16 * 1024;

/// Entries merged per transaction.
pub const MERGE_CHUNK: usize = 512;

/// See the module docs.
pub struct CallIndex {
    state: Mutex<State>,
    /// [`MERGE_AT`], and the chunk: [`MERGE_CHUNK`], or less for a smaller `merge_at` (tests).
    merge_at: usize,
    chunk: usize,
}

/// Bound calls not yet merged (or in the merge that runs): upstream id → reservation id, row.
type Recent = foldhash::HashMap<Box<str>, (Box<str>, i64)>;

#[derive(Default)]
struct State {
    recent: Recent,
    /// The running merge's upstream ids (their reservations are in `recent` until merged), in
    /// key order, and how many are merged.
    merging: Vec<Box<str>>,
    merged: usize,
    /// What the merges cover: `up_to`, or what the running merge sets it to when it ends (with
    /// the reservation of that row). A bound row at or below it goes straight into `call_ids`.
    covered_up_to: i64,
    merging_anchor: Option<Box<str>>,
    /// Binds added to memory so far (see [`CallIndex::additions`]).
    additions: u64,
    /// A reload failed: what memory holds may include binds that were rolled back. Nothing is
    /// merged until a reload succeeds.
    stale: bool,
}

impl CallIndex {
    /// The index as the file has it (the writer's connection, at start or after a rollback).
    pub fn load(conn: &Connection, merge_at: usize) -> Result<CallIndex, StoreError> {
        let merge_at = merge_at.max(1);
        let index = CallIndex {
            state: Mutex::default(),
            merge_at,
            chunk: MERGE_CHUNK.min(merge_at.div_ceil(4)),
        };
        index.reload(conn)?;
        Ok(index)
    }

    /// Forget what memory holds and read it back from the file: the bound rows above `up_to`.
    pub fn reload(&self, conn: &Connection) -> Result<(), StoreError> {
        let read = read_back(conn);
        let mut state = self.lock();
        let additions = state.additions;
        match read {
            Ok((recent, up_to)) => {
                *state = State {
                    recent,
                    covered_up_to: up_to,
                    additions,
                    ..State::default()
                };
                Ok(())
            }
            Err(e) => {
                state.stale = true;
                Err(e)
            }
        }
    }

    /// How many binds have been added to memory: an operation that fails after it added one
    /// (its savepoint rolled back) has memory read back from the file.
    pub fn additions(&self) -> u64 {
        self.lock().additions
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reservation bound to `call_id`, if memory has it (it may not be committed yet: check
    /// the row).
    pub fn recent(&self, call_id: &str) -> Option<String> {
        self.lock().recent.get(call_id).map(|(r, _)| r.to_string())
    }

    /// The reservation `call_id` is bound to, in memory or in `call_ids` (as `conn` sees it).
    pub fn find(&self, conn: &Connection, call_id: &str) -> Result<Option<String>, StoreError> {
        if let Some(found) = self.recent(call_id) {
            return Ok(Some(found));
        }
        let mut stmt =
            conn.prepare_cached("SELECT reservation_id FROM call_ids WHERE call_id = ?1")?;
        Ok(stmt.query_row([call_id], |r| r.get(0)).optional()?)
    }

    /// Whether `call_id` is free for `reservation_id`: no other reservation has it.
    pub fn is_free(
        &self,
        conn: &Connection,
        call_id: &str,
        reservation_id: &str,
    ) -> Result<bool, StoreError> {
        Ok(self
            .find(conn, call_id)?
            .is_none_or(|other| other == reservation_id))
    }

    /// Refuse `call_id` if another reservation has it. The writer calls this before it writes the
    /// row.
    pub fn check_free(
        &self,
        conn: &Connection,
        call_id: &str,
        reservation_id: &str,
    ) -> Result<(), StoreError> {
        if self.is_free(conn, call_id, reservation_id)? {
            Ok(())
        } else {
            Err(StoreError::Refused(format!(
                "upstream call id {call_id} is already bound to another call"
            )))
        }
    }

    /// Whether a bind of the row `rowid` is late: at or below what the merges cover, so that
    /// [`CallIndex::add`] writes it to `call_ids` rather than to memory.
    pub fn covers(&self, rowid: i64) -> bool {
        rowid <= self.lock().covered_up_to
    }

    /// Index a bind whose row (`rowid`) the writer has just written, in its transaction: in
    /// memory, or in `call_ids` if the row is at or below what the merges cover (see
    /// [`CallIndex::covers`]: then it is a second write of the operation, which needs a
    /// savepoint).
    pub fn add(
        &self,
        conn: &Connection,
        call_id: &str,
        reservation_id: &str,
        rowid: i64,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        if rowid <= state.covered_up_to {
            drop(state);
            insert(conn, call_id, reservation_id)?;
            return Ok(());
        }
        state
            .recent
            .insert(call_id.into(), (reservation_id.into(), rowid));
        state.additions += 1;
        Ok(())
    }

    /// Whether a merge has work: one is running, or enough binds have gathered.
    pub fn wants_merge(&self) -> bool {
        let state = self.lock();
        state.stale || !state.merging.is_empty() || state.recent.len() >= self.merge_at
    }

    /// One step of the merge, in a transaction of its own (the writer calls this with none open,
    /// after it has answered a batch): start one if enough binds have gathered, then merge the
    /// next chunk. Its commit is synced with the writer's next.
    pub fn merge_step(&self, conn: &Connection) -> Result<(), StoreError> {
        if self.lock().stale {
            self.reload(conn)?;
        }
        let starting = {
            let state = self.lock();
            (state.merging.is_empty() && state.recent.len() >= self.merge_at)
                .then(|| state.recent.keys().cloned().collect::<Vec<_>>())
        };
        // Sorted with the lock released: readers look binds up meanwhile. Only this thread (the
        // writer's) changes what memory holds.
        let starting = starting.map(|mut entries| {
            entries.sort_unstable();
            entries
        });
        let (chunk, merged, last) = {
            let mut state = self.lock();
            if let Some(entries) = starting {
                let top = state.recent.values().max_by_key(|(_, row)| *row).cloned();
                // From now on a bind of a row this merge covers goes straight to the table.
                if let Some((reservation, row)) = top {
                    state.covered_up_to = row;
                    state.merging_anchor = Some(reservation);
                }
                state.merging = entries;
                state.merged = 0;
            }
            if state.merging.is_empty() {
                return Ok(());
            }
            let end = (state.merged + self.chunk).min(state.merging.len());
            // Only this thread changes `recent`, and it keeps what a merge holds until merged.
            let chunk: Vec<(Box<str>, Box<str>)> = state.merging[state.merged..end]
                .iter()
                .filter_map(|call| {
                    let (reservation, _) = state.recent.get(call)?;
                    Some((call.clone(), reservation.clone()))
                })
                .collect();
            let merged = end - state.merged;
            let last = (end == state.merging.len())
                .then(|| (state.covered_up_to, state.merging_anchor.clone()));
            (chunk, merged, last)
        };
        let written = (|| -> Result<(), StoreError> {
            conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            // One statement for the chunk, not one look-up in the statement cache per entry.
            let mut insert = conn.prepare_cached(INSERT)?;
            for (call_id, reservation_id) in &chunk {
                insert.execute(params![call_id, reservation_id])?;
            }
            drop(insert);
            if let Some((up_to, anchor)) = &last {
                conn.prepare_cached("UPDATE call_ids_merged SET up_to = ?1, anchor = ?2")?
                    .execute(params![up_to, anchor.as_deref()])?;
            }
            conn.prepare_cached("COMMIT")?.execute([])?;
            Ok(())
        })();
        if let Err(e) = written {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            return Err(e);
        }
        let mut state = self.lock();
        for (call_id, _) in &chunk {
            state.recent.remove(call_id);
        }
        state.merged += merged;
        if last.is_some() {
            state.merging = Vec::new();
            state.merged = 0;
        }
        Ok(())
    }

    /// Bound calls memory holds (for the consistency check and tests).
    pub fn in_memory(&self) -> Vec<(String, String)> {
        self.lock()
            .recent
            .iter()
            .map(|(c, (r, _))| (c.to_string(), r.to_string()))
            .collect()
    }
}

/// Index `call_id` as `reservation_id`'s. The bind checked that no other reservation has it, so
/// an entry already there for another is stale, and replaced.
fn insert(conn: &Connection, call_id: &str, reservation_id: &str) -> Result<(), StoreError> {
    conn.prepare_cached(INSERT)?
        .execute(params![call_id, reservation_id])?;
    Ok(())
}

/// An entry of `call_ids`; one that an older version left stale is replaced.
const INSERT: &str = "INSERT INTO call_ids (call_id, reservation_id) VALUES (?1, ?2)
     ON CONFLICT (call_id) DO UPDATE SET reservation_id = excluded.reservation_id
     WHERE reservation_id IS NOT excluded.reservation_id";

/// The bound rows above `up_to`, and `up_to`.
fn read_back(conn: &Connection) -> Result<(Recent, i64), StoreError> {
    let up_to = merged_up_to(conn)?;
    let mut stmt = conn.prepare_cached(
        "SELECT call_id, reservation_id, rowid FROM calls WHERE rowid > ?1 AND call_id IS NOT NULL",
    )?;
    let recent = stmt
        .query_map([up_to], |r| {
            Ok((
                r.get::<_, String>(0)?.into_boxed_str(),
                (r.get::<_, String>(1)?.into_boxed_str(), r.get(2)?),
            ))
        })?
        .collect::<Result<Recent, _>>()?;
    Ok((recent, up_to))
}

fn merged_up_to(conn: &Connection) -> Result<i64, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT up_to FROM call_ids_merged")?;
    Ok(stmt.query_row([], |r| r.get(0)).optional()?.unwrap_or(0))
}

/// Make `call_ids` hold every bound call, once, for a file from before it, one an older version
/// wrote to since (it keeps the old index, `calls_call_id`), or one whose rows were renumbered
/// (`VACUUM` may renumber a table's rowids; the row `up_to` names is no longer its `anchor`): make
/// `call_ids` afresh from the bound calls (an older version may have changed a binding), set
/// `up_to` to the last bound row, drop the old index. One transaction.
pub fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let old_index: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'index' AND name = 'calls_call_id')",
        [],
        |r| r.get(0),
    )?;
    let in_place: Option<bool> = conn
        .query_row(
            "SELECT up_to = 0 OR (SELECT rowid FROM calls WHERE reservation_id = anchor) IS up_to
             FROM call_ids_merged",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if in_place == Some(true) && !old_index {
        return Ok(());
    }
    if in_place == Some(false) {
        tracing::warn!(
            "state file: the calls were renumbered (a VACUUM?); copying every upstream id into call_ids again"
        );
    } else if old_index {
        tracing::info!("state file: copying upstream ids into call_ids once");
    }
    let started = std::time::Instant::now();
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         DELETE FROM call_ids;
         INSERT OR IGNORE INTO call_ids (call_id, reservation_id)
             SELECT call_id, reservation_id FROM calls WHERE call_id IS NOT NULL ORDER BY call_id;
         DELETE FROM call_ids_merged;
         INSERT INTO call_ids_merged (up_to, anchor)
             SELECT COALESCE(MAX(rowid), 0), NULL FROM calls WHERE call_id IS NOT NULL;
         UPDATE call_ids_merged
             SET anchor = (SELECT reservation_id FROM calls WHERE rowid = up_to);
         DROP INDEX IF EXISTS calls_call_id;
         COMMIT;",
    )
    .inspect_err(|_| {
        let _ = conn.execute_batch("ROLLBACK");
    })?;
    // A new file (or one from before the partial index, whose rebuild logged itself) is quiet.
    if in_place.is_some() || old_index {
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "state file: upstream ids copied into call_ids"
        );
    }
    Ok(())
}

/// Where the index and the calls' rows disagree: a bound call neither in memory nor in
/// `call_ids`, an entry of either that its row does not have, a bound row at or below `up_to`
/// that `call_ids` does not hold (a restart would not find it).
pub fn differences(conn: &Connection, index: &CallIndex) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    let recent: HashMap<String, String> = index.in_memory().into_iter().collect();
    let mut stmt = conn.prepare(
        "SELECT c.call_id, c.reservation_id, i.reservation_id, c.rowid > m.up_to
         FROM calls c LEFT JOIN call_ids i ON i.call_id = c.call_id, call_ids_merged m
         WHERE c.call_id IS NOT NULL",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, bool>(3)?,
        ))
    })?;
    for row in rows {
        let (call_id, reservation, indexed, above) = row?;
        let held = recent.get(&call_id);
        if indexed.is_none() && held.is_none() {
            out.push(format!(
                "upstream id {call_id} ({reservation}) is not indexed"
            ));
        }
        for other in indexed.iter().chain(held) {
            if *other != reservation {
                out.push(format!(
                    "upstream id {call_id} is indexed to {other}, its row is {reservation}"
                ));
            }
        }
        // What a restart would find: the rows above `up_to` are read back into memory.
        if !above && indexed.is_none() {
            out.push(format!(
                "upstream id {call_id} is at or below up_to but not in call_ids"
            ));
        }
    }
    let entries: i64 = conn.query_row("SELECT COUNT(*) FROM call_ids", [], |r| r.get(0))?;
    let unbound: i64 = conn.query_row(
        "SELECT COUNT(*) FROM call_ids i LEFT JOIN calls c ON c.reservation_id = i.reservation_id
         WHERE c.call_id IS NOT i.call_id",
        [],
        |r| r.get(0),
    )?;
    if unbound > 0 {
        out.push(format!(
            "{unbound} of {entries} entries in call_ids have no such bound row"
        ));
    }
    for (call_id, reservation) in &recent {
        let row: Option<Option<String>> = conn
            .query_row(
                "SELECT call_id FROM calls WHERE reservation_id = ?1",
                [reservation],
                |r| r.get(0),
            )
            .optional()?;
        if row.flatten().as_deref() != Some(call_id) {
            out.push(format!(
                "memory binds {call_id} to {reservation}, its row does not"
            ));
        }
    }
    Ok(out)
}
