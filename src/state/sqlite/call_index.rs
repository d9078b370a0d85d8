//! The upstream-id index: recent binds in memory, merged into the `call_keys` table in sorted
//! chunks.
//!
//! Upstream ids are random: a b-tree keyed by them takes each bind on a leaf of its own, so a
//! commit of eight binds wrote eight leaves of it (half of what a commit wrote at saturation), and
//! more of them as the file grows (docs/benchmarks.md, "Where a commit's pages go"). Here a bind
//! writes only its call's row (which it rewrites anyway); the index learns it in memory, and
//! once [`MERGE_AT`] binds have gathered, the writer merges them into `call_keys` in key order,
//! [`MERGE_CHUNK`] a transaction, after it has answered a batch. Binds that share a leaf then
//! share its write.
//!
//! An entry of `call_keys` is small, so that a merge's binds share leaves: the upstream id's
//! 64-bit hash ([`key`], XXH3) and its call's rowid, about 17 bytes a cell against 80 with the
//! id and the reservation as text (the table before, `call_ids`). Once the table has many more
//! leaves than a merge has binds, each bind dirties a leaf of its own (docs/benchmarks.md, "The
//! budget for 0.5x measured"); a fifth of the leaves is five times the binds per leaf. A look-up
//! reads the rows its hash names and keeps the one whose upstream id is the one asked for, so two
//! ids of one hash are both found, and an entry whose row no longer has its id (a row renumbered)
//! finds nothing.
//!
//! What is durable: the calls row holds its upstream id from the bind's commit on. `call_keys`
//! holds every bound call whose row is at or below `call_keys_merged.up_to` (a rowid, with the
//! reservation of that row as its `anchor`: a `VACUUM` may renumber rows, and then `call_keys` is
//! made afresh); the rows above it are read back into memory at start. A running merge keeps the
//! bound it will set beside it (`merging_up_to`, `merging_anchor`), since its entries lie above
//! `up_to`: a start checks both rows. A merge moves `up_to`
//! only in the transaction of its last chunk, and a bind of a row at or below the bound the
//! running merge will set (a call whose upstream answered late) goes straight into `call_keys`,
//! in the bind's transaction. So a crash at any point leaves every bound call in `call_keys` or
//! above `up_to`; a chunk merged again after a crash finds its entries there, the same.
//!
//! Memory holds what `call_keys` would: an entry is the key and the row, 16 bytes in a sorted
//! set (29 with the set's nodes, measured), not the id and the reservation as text (195 with
//! their allocations and a hash map), so that [`MERGE_AT`] binds gather in about the memory
//! 16 384 took before (3.7 MiB against 3.0, and a merge's sorted copy of the ids besides) and a
//! merge is eight times as dense. The set is in key order: a merge takes its chunks
//! from it as they are, with no sorted copy. A look-up there, as in `call_keys`, reads the rows
//! its key names; readers take a hit only if the row they read has that upstream id (a bind still
//! in the writer's open transaction is not found, as before); entries leave memory only after the
//! chunk that merged them is committed.

use std::collections::{BTreeSet, HashSet};
use std::ops::Bound;
use std::sync::Mutex;

use fastbloom::BloomFilter;
use rusqlite::functions::FunctionFlags;
use rusqlite::{Connection, OptionalExtension, params};

use crate::state::StoreError;

/// Binds gathered in memory before a merge starts (eight seconds or more of binds at saturation;
/// about 4 MiB of memory). A start reads back the bound rows above `up_to`: about this many, and
/// after a crash in a merge, the merge's and the binds since (93 000 rows read back, the gateway
/// answered 0.135 s after it was started, as with 6 400). A
/// merge writes each leaf of `call_keys` it lands on once, so the more binds it holds, the fewer
/// leaves a bind costs once the table is large. On a file of 5 million calls (`call_keys` of
/// 24 000 leaves), against a fresh file, the writer wrote 0.7 more pages a call and read 1.8 more
/// with merges of 16 384; with 131 072, 0.1 more written and 1.1 more read, most of them the
/// look-up that a new id is free (docs/benchmarks.md, "A file of five million calls").
pub const MERGE_AT: usize = 128 * 1024;

/// Entries merged per transaction.
pub const MERGE_CHUNK: usize = 512;

/// The fewest keys the filter of upstream ids ([`KeyFilter`]) is sized for: 262 144, about
/// 307 KiB at one false positive in a hundred. A file with more calls sizes it by them.
pub const FILTER_MIN_KEYS: usize = 1 << 18;

/// Entries of `call_keys` the filter reads in one step of its fill (a few milliseconds on a
/// read-only connection).
const FILL_CHUNK: i64 = 8192;

/// See the module docs.
pub struct CallIndex {
    state: Mutex<State>,
    /// [`MERGE_AT`], and the chunk: [`MERGE_CHUNK`], or less for a smaller `merge_at` (tests).
    merge_at: usize,
    chunk: usize,
    /// [`FILL_CHUNK`] (less in tests).
    fill_chunk: i64,
}

/// Bound calls not yet merged (or in the merge that runs): the upstream id's [`key`] and the
/// call's row, as `call_keys` has them, in key order.
type Recent = BTreeSet<(i64, i64)>;

struct State {
    recent: Recent,
    /// The largest row added to `recent` (or read back): the largest it holds whenever it holds
    /// any, since a merge takes the entries at or below its bound, and no entry is added at or
    /// below it while it runs. A merge starts with it as its bound.
    max_row: i64,
    /// A merge runs: it merges the entries of `recent` at or below `covered_up_to` (which were all
    /// of them when it started: a later bind of a row it covers goes to the table), in key order,
    /// and has merged those up to this one (`None`: none yet).
    merging: Option<Option<(i64, i64)>>,
    /// What the merges cover: `up_to`, or what the running merge sets it to when it ends (with
    /// the reservation of that row). A bound row at or below it goes straight into `call_keys`.
    covered_up_to: i64,
    merging_anchor: Option<Box<str>>,
    /// Binds added to memory so far (see [`CallIndex::additions`]).
    additions: u64,
    /// A reload failed: what memory holds may include binds that were rolled back. Nothing is
    /// merged until a reload succeeds.
    stale: bool,
    /// Every key of `call_keys` and of memory, once filled: a look-up of a key it does not hold
    /// reads nothing from the table.
    filter: KeyFilter,
    /// Look-ups that read `call_keys` (for tests).
    #[cfg(test)]
    table_lookups: u64,
}

/// A Bloom filter of upstream ids' keys: those of `call_keys` and of memory, and, once a key is
/// in it, until it is made again (a key rolled back or renumbered away stays: a false positive,
/// one look-up in the table). A bind's look-up that its id is free is of a new id almost always: with the filter
/// filled it reads no page of the table, which otherwise is a random leaf of a b-tree as large
/// as the calls (1.1 pages read per call on a file of five million, from the disk once the file
/// outgrows the memory the kernel gives it).
///
/// It is filled on a read-only connection, off the writer's thread (`SqliteStore` runs the
/// fill), [`FILL_CHUNK`] entries of `call_keys` a step in key order; until then look-ups read the
/// table. A key the table learns meanwhile is put
/// in it as it is learnt ([`CallIndex::add`]: memory, or a late bind's entry; a merge moves keys
/// from memory to the table), so the fill, which started after the filter was made, misses none.
/// Past the keys it was sized for it is made again, twice as large, by the writer between batches
/// ([`CallIndex::regrow`]), and filled again.
struct KeyFilter {
    bloom: BloomFilter,
    /// Keys it is sized for.
    capacity: usize,
    /// Keys put in it (read and added; a key put in twice counts twice).
    inserted: usize,
    /// The fill: `None` once it has read all of `call_keys`; else the last entry read
    /// (`Some(None)`: none yet).
    fill: Option<Option<(i64, i64)>>,
    /// Counts the times it was made again: a step of the fill that read the table before the
    /// filter it fills was made (with a view of the file from before) is not applied to it.
    generation: u64,
    /// When it was made, and the entries its fill has read (for the log).
    made: std::time::Instant,
    read: usize,
}

impl KeyFilter {
    /// An empty filter for `capacity` keys, to be filled from the table.
    fn new(capacity: usize, generation: u64) -> KeyFilter {
        let capacity = capacity.max(1);
        KeyFilter {
            bloom: BloomFilter::with_false_pos(0.01).expected_items(capacity),
            capacity,
            inserted: 0,
            fill: Some(None),
            generation,
            made: std::time::Instant::now(),
            read: 0,
        }
    }

    /// Put `key` in; `inserted` counts the keys that were not in it already (a key read back
    /// again after a rollback, or read by the fill after it was learnt, does not count twice).
    fn insert(&mut self, key: i64) {
        if !self.bloom.insert_hash(key as u64) {
            self.inserted += 1;
        }
    }

    /// Whether the table may hold `key`: always, until the fill has read all of it.
    fn may_hold(&self, key: i64) -> bool {
        self.fill.is_some() || self.bloom.contains_hash(key as u64)
    }
}

/// A chunk of `call_keys` read for the fill of the filter of this generation, from this position.
struct FillChunk {
    generation: u64,
    after: Option<(i64, i64)>,
    entries: Vec<(i64, i64)>,
}

impl State {
    fn new(filter: KeyFilter) -> State {
        State {
            recent: Recent::new(),
            max_row: 0,
            merging: None,
            covered_up_to: 0,
            merging_anchor: None,
            additions: 0,
            stale: false,
            filter,
            #[cfg(test)]
            table_lookups: 0,
        }
    }
}

impl CallIndex {
    /// The index as the file has it (the writer's connection, at start or after a rollback).
    pub fn load(conn: &Connection, merge_at: usize) -> Result<CallIndex, StoreError> {
        CallIndex::load_sized(conn, merge_at, FILTER_MIN_KEYS)
    }

    /// [`CallIndex::load`], with the filter sized for at least `filter_min` keys: more if the file
    /// has more calls (its largest rowid, a bound on its bound calls), with a quarter to spare.
    fn load_sized(
        conn: &Connection,
        merge_at: usize,
        filter_min: usize,
    ) -> Result<CallIndex, StoreError> {
        let merge_at = merge_at.max(1);
        let rows: i64 = conn.query_row("SELECT COALESCE(MAX(rowid), 0) FROM calls", [], |r| {
            r.get(0)
        })?;
        let rows = usize::try_from(rows).unwrap_or(0);
        let index = CallIndex {
            state: Mutex::new(State::new(KeyFilter::new(
                filter_min.max(rows.saturating_add(rows / 4)),
                0,
            ))),
            merge_at,
            chunk: MERGE_CHUNK.min(merge_at.div_ceil(4)),
            fill_chunk: FILL_CHUNK,
        };
        index.reload(conn)?;
        Ok(index)
    }

    /// Forget what memory holds and read it back from the file: the bound rows above `up_to`.
    pub fn reload(&self, conn: &Connection) -> Result<(), StoreError> {
        let read = read_back(conn);
        let mut state = self.lock();
        match read {
            Ok((recent, up_to)) => {
                // The filter keeps what it holds (a key rolled back stays in it, harmlessly), and
                // learns what memory holds now.
                for &(key, _) in &recent {
                    state.filter.insert(key);
                }
                state.max_row = recent.iter().map(|&(_, row)| row).max().unwrap_or(0);
                state.recent = recent;
                state.merging = None;
                state.covered_up_to = up_to;
                state.merging_anchor = None;
                state.stale = false;
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

    /// The reservation `call_id` is bound to, in memory or in `call_keys` (as `conn` sees it).
    pub fn find(&self, conn: &Connection, call_id: &str) -> Result<Option<String>, StoreError> {
        let key = key(call_id);
        // The rows its key names in memory (none allocated for none), then, if none of them has
        // the id, in the table, unless the filter says it has none: two plain look-ups (see
        // `ROWS`).
        let (held, in_table) = {
            let state = self.lock();
            let held: Vec<i64> = state
                .recent
                .range((key, i64::MIN)..=(key, i64::MAX))
                .map(|&(_, row)| row)
                .collect();
            (held, state.filter.may_hold(key))
        };
        if let Some(found) = bound_in(conn, held, call_id)? {
            return Ok(Some(found));
        }
        if !in_table {
            return Ok(None);
        }
        #[cfg(test)]
        {
            self.lock().table_lookups += 1;
        }
        let rows = conn
            .prepare_cached(ROWS)?
            .query_map([key], |r| r.get::<_, i64>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        bound_in(conn, rows, call_id)
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
    /// [`CallIndex::add`] writes it to `call_keys` rather than to memory.
    pub fn covers(&self, rowid: i64) -> bool {
        rowid <= self.lock().covered_up_to
    }

    /// Index a bind whose row (`rowid`) the writer has just written, in its transaction: in
    /// memory, or in `call_keys` if the row is at or below what the merges cover (see
    /// [`CallIndex::covers`]: then it is a second write of the operation, which needs a
    /// savepoint).
    pub fn add(&self, conn: &Connection, call_id: &str, rowid: i64) -> Result<(), StoreError> {
        let key = key(call_id);
        let mut state = self.lock();
        // Past its capacity the filter goes on taking keys (more false positives, never a false
        // negative) until the writer makes it again between batches ([`CallIndex::regrow`]).
        state.filter.insert(key);
        if rowid <= state.covered_up_to {
            drop(state);
            conn.prepare_cached(INSERT)?.execute(params![key, rowid])?;
            return Ok(());
        }
        state.recent.insert((key, rowid));
        state.max_row = state.max_row.max(rowid);
        state.additions += 1;
        Ok(())
    }

    /// Whether the filter has entries of `call_keys` left to read.
    pub fn wants_fill(&self) -> bool {
        self.lock().filter.fill.is_some()
    }

    /// Past its capacity, make the filter again twice as large, with what memory holds, to be
    /// filled from the table again. The writer calls this with no transaction open: a key a late
    /// bind wrote to the table in an open transaction is in the old filter only, and a fill that
    /// read the file before that transaction committed would leave the new one without it.
    pub fn regrow(&self) {
        let mut state = self.lock();
        if state.filter.inserted < state.filter.capacity {
            return;
        }
        let mut larger = KeyFilter::new(
            state.filter.capacity.saturating_mul(2),
            state.filter.generation + 1,
        );
        for &(key, _) in &state.recent {
            larger.insert(key);
        }
        state.filter = larger;
    }

    /// One step of the filter's fill: the next [`FILL_CHUNK`] entries of `call_keys`, in key
    /// order, as `conn` sees the file (a read-only connection, or the writer's with no
    /// transaction open: it must see every entry committed before the filter was made).
    pub fn fill_step(&self, conn: &Connection) -> Result<(), StoreError> {
        let read = self.fill_read(conn)?;
        self.fill_apply(read);
        Ok(())
    }

    /// The next chunk of the fill as `conn` sees it, with the filter and the position it was
    /// read for (`None`: nothing left to read).
    fn fill_read(&self, conn: &Connection) -> Result<Option<FillChunk>, StoreError> {
        let (generation, after) = {
            let state = self.lock();
            match state.filter.fill {
                Some(after) => (state.filter.generation, after),
                None => return Ok(None),
            }
        };
        // After the entry read last (the smallest key with no row before it: rows are positive).
        let (key, row) = after.unwrap_or((i64::MIN, i64::MIN));
        let entries = conn
            .prepare_cached(
                "SELECT key, row FROM call_keys WHERE (key, row) > (?1, ?2)
                 ORDER BY key, row LIMIT ?3",
            )?
            .query_map(params![key, row, self.fill_chunk], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<Result<Vec<(i64, i64)>, _>>()?;
        Ok(Some(FillChunk {
            generation,
            after,
            entries,
        }))
    }

    /// Put a chunk read by [`CallIndex::fill_read`] in the filter, unless the filter was made
    /// again since, or another step applied it; returns whether it was put in.
    fn fill_apply(&self, read: Option<FillChunk>) -> bool {
        let Some(FillChunk {
            generation,
            after,
            entries,
        }) = read
        else {
            return false;
        };
        let mut state = self.lock();
        let filter = &mut state.filter;
        if filter.generation != generation || filter.fill != Some(after) {
            // Made again meanwhile: its fill starts over, with a view of the file from after.
            return false;
        }
        for &(key, _) in &entries {
            filter.insert(key);
        }
        filter.read += entries.len();
        filter.fill = match entries.last() {
            Some(&last) if entries.len() as i64 == self.fill_chunk => Some(Some(last)),
            _ => None,
        };
        if filter.fill.is_none() && filter.read > 0 {
            tracing::info!(
                upstream_ids = filter.read,
                capacity = filter.capacity,
                elapsed_ms = filter.made.elapsed().as_millis() as u64,
                "state file: upstream ids' filter filled"
            );
        }
        true
    }

    /// Look-ups that read `call_keys` so far (those the filter did not answer).
    #[cfg(test)]
    fn table_lookups(&self) -> u64 {
        self.lock().table_lookups
    }

    /// Whether a merge has work: one is running, or enough binds have gathered.
    pub fn wants_merge(&self) -> bool {
        let state = self.lock();
        state.stale || state.merging.is_some() || state.recent.len() >= self.merge_at
    }

    /// One step of the merge, in a transaction of its own (the writer calls this with none open,
    /// after it has answered a batch): start one if enough binds have gathered, then merge the
    /// next chunk. Its commit is synced with the writer's next.
    pub fn merge_step(&self, conn: &Connection) -> Result<(), StoreError> {
        if self.lock().stale {
            self.reload(conn)?;
        }
        // A merge starts with the largest row memory holds as its bound (and that row's reservation
        // as the bound's anchor, read from the file: every entry of memory is committed when the
        // writer merges).
        let top = {
            let state = self.lock();
            (state.merging.is_none() && state.recent.len() >= self.merge_at)
                .then_some(state.max_row)
        };
        let starting = match top {
            Some(row) => {
                let anchor: String = conn
                    .prepare_cached("SELECT reservation_id FROM calls WHERE rowid = ?1")?
                    .query_row([row], |r| r.get(0))?;
                Some((row, anchor.into_boxed_str()))
            }
            None => None,
        };
        let (chunk, first, last, before) = {
            let mut state = self.lock();
            // What the merges covered before this one started: put back if its first chunk is
            // not written (then nothing of it is in the file).
            let before = starting
                .is_some()
                .then(|| (state.covered_up_to, state.merging_anchor.clone()));
            if let Some((row, anchor)) = starting {
                // From now on a bind of a row this merge covers goes straight to the table.
                state.covered_up_to = row;
                state.merging_anchor = Some(anchor);
                state.merging = Some(None);
            }
            let Some(after) = state.merging else {
                return Ok(());
            };
            // The next chunk: the merge's entries after the last one merged, in key order, past
            // the binds that came after the merge started (above its bound).
            let covered = state.covered_up_to;
            let ours = |&&(_, row): &&(i64, i64)| row <= covered;
            let from = after.map_or(Bound::Unbounded, Bound::Excluded);
            let chunk: Vec<(i64, i64)> = state
                .recent
                .range((from, Bound::Unbounded))
                .filter(ours)
                .take(self.chunk)
                .copied()
                .collect();
            let is_last = chunk.last().is_none_or(|&end| {
                !state
                    .recent
                    .range((Bound::Excluded(end), Bound::Unbounded))
                    .any(|entry| ours(&entry))
            });
            let bound = (state.covered_up_to, state.merging_anchor.clone());
            let first = after.is_none().then(|| bound.clone());
            let last = is_last.then_some(bound);
            (chunk, first, last, before)
        };
        let written = (|| -> Result<(), StoreError> {
            conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            // One statement for the chunk, not one look-up in the statement cache per entry.
            let mut insert = conn.prepare_cached(INSERT)?;
            for (key, row) in &chunk {
                insert.execute(params![key, row])?;
            }
            drop(insert);
            // The bound this merge will set, with its first chunk: its entries lie at or below
            // it, and a start checks that its row was not renumbered either (see `migrate`).
            if let Some((up_to, anchor)) = &first {
                conn.prepare_cached(
                    "UPDATE call_keys_merged SET merging_up_to = ?1, merging_anchor = ?2",
                )?
                .execute(params![up_to, anchor.as_deref()])?;
            }
            if let Some((up_to, anchor)) = &last {
                conn.prepare_cached(
                    "UPDATE call_keys_merged
                     SET up_to = ?1, anchor = ?2, merging_up_to = NULL, merging_anchor = NULL",
                )?
                .execute(params![up_to, anchor.as_deref()])?;
            }
            conn.prepare_cached("COMMIT")?.execute([])?;
            Ok(())
        })();
        if let Err(e) = written {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            // A merge whose first chunk is not written is forgotten, as if it had not started:
            // the file does not have its bound, so a bind of a row it would cover stays in
            // memory (and joins the next merge) rather than going to the table unrecorded.
            if let Some((covered_up_to, anchor)) = before {
                let mut state = self.lock();
                state.covered_up_to = covered_up_to;
                state.merging_anchor = anchor;
                state.merging = None;
            }
            return Err(e);
        }
        let mut state = self.lock();
        for entry in &chunk {
            state.recent.remove(entry);
        }
        state.merging = match last {
            Some(_) => None,
            None => Some(chunk.last().copied()),
        };
        Ok(())
    }

    /// The entries memory holds, key and row (for the consistency check and tests).
    pub fn in_memory(&self) -> Vec<(i64, i64)> {
        self.lock().recent.iter().copied().collect()
    }
}

/// The key of an upstream id in `call_keys`: its XXH3 64-bit hash, a fixed function of its
/// bytes (the file keeps it), as SQLite's signed integer.
fn key(call_id: &str) -> i64 {
    xxhash_rust::xxh3::xxh3_64(call_id.as_bytes()) as i64
}

/// [`key`] as an SQL function, while `migrate` indexes the calls.
const KEY_FUNCTION: &str = "callgate_call_key";

/// An entry of `call_keys` (a chunk merged again after a crash finds it there).
const INSERT: &str = "INSERT OR IGNORE INTO call_keys (key, row) VALUES (?1, ?2)";

/// The rows an upstream id's key names (in the primary key's order). No `ORDER BY`, and no join
/// with the calls: with either, SQLite's planner marks the key's parameter as one whose value may
/// change the plan, and `sqlite3_clear_bindings`, which rusqlite's statement cache calls when a
/// statement is put back, then expires the statement: it was prepared again at every use, and the
/// writer's instructions per request doubled (docs/benchmarks.md, "Upstream ids keyed by hash").
const ROWS: &str = "SELECT row FROM call_keys WHERE key = ?1";

/// The reservation of a row, if it has the upstream id.
const BOUND: &str = "SELECT reservation_id FROM calls WHERE rowid = ?1 AND call_id = ?2";

/// The reservation of the first of `rows` that has the upstream id `call_id`. Most look-ups (a
/// bind's, of a new id) have no row to read: no second statement for them.
fn bound_in(
    conn: &Connection,
    rows: Vec<i64>,
    call_id: &str,
) -> Result<Option<String>, StoreError> {
    for row in rows {
        if let Some(found) = conn
            .prepare_cached(BOUND)?
            .query_row(params![row, call_id], |r| r.get(0))
            .optional()?
        {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// The bound rows above `up_to`, and `up_to`.
fn read_back(conn: &Connection) -> Result<(Recent, i64), StoreError> {
    let up_to = merged_up_to(conn)?;
    let mut stmt = conn.prepare_cached(
        "SELECT call_id, rowid FROM calls WHERE rowid > ?1 AND call_id IS NOT NULL",
    )?;
    let recent = stmt
        .query_map([up_to], |r| Ok((key(r.get_ref(0)?.as_str()?), r.get(1)?)))?
        .collect::<Result<Recent, _>>()?;
    Ok((recent, up_to))
}

fn merged_up_to(conn: &Connection) -> Result<i64, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT up_to FROM call_keys_merged")?;
    Ok(stmt.query_row([], |r| r.get(0)).optional()?.unwrap_or(0))
}

/// Make `call_keys` hold every bound call, once, for a file from before it (with `call_ids`, the
/// table of upstream ids as text, or the older index `calls_call_id`, which a version from before
/// both makes again), or one whose rows were renumbered (`VACUUM` may renumber a table's rowids;
/// the row `up_to` names is no longer its `anchor`, or the row `merging_up_to` names is no longer
/// `merging_anchor`): make `call_keys` afresh from the bound calls
/// (an older version may have changed a binding), set `up_to` to the last bound row, drop the old
/// table and index. One transaction. The older version's `call_ids_merged` is dropped with its
/// table: that version, started on the file again, makes `call_ids` afresh from the calls, and
/// this one, started after it, sees `call_ids` and makes `call_keys` afresh.
pub fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let exists = |kind: &str, name: &str| -> Result<bool, StoreError> {
        Ok(conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = ?1 AND name = ?2)",
            [kind, name],
            |r| r.get(0),
        )?)
    };
    let old_index = exists("index", "calls_call_id")?;
    let old_table = exists("table", "call_ids")?;
    // Every entry is at or below `up_to`, or at or below the bound a merge that stopped half-way
    // would have set: neither row may have been renumbered.
    let in_place: Option<bool> = conn
        .query_row(
            "SELECT (up_to = 0 OR (SELECT rowid FROM calls WHERE reservation_id = anchor) IS up_to)
                 AND (merging_up_to IS NULL
                      OR (SELECT rowid FROM calls WHERE reservation_id = merging_anchor)
                         IS merging_up_to)
             FROM call_keys_merged",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if in_place == Some(true) && !old_index && !old_table {
        return Ok(());
    }
    if in_place == Some(false) {
        tracing::warn!(
            "state file: the calls were renumbered (a VACUUM?); indexing every upstream id again"
        );
    } else if old_index || old_table {
        tracing::info!("state file: indexing upstream ids by their hash once");
    }
    let started = std::time::Instant::now();
    let made = (|| -> Result<usize, StoreError> {
        // In key order, from SQLite's sorter (which spills to a temporary file for a large
        // file), so that the table is written leaf after leaf.
        conn.create_scalar_function(
            KEY_FUNCTION,
            1,
            FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
            |ctx| Ok(key(&ctx.get::<String>(0)?)),
        )?;
        conn.execute_batch("BEGIN IMMEDIATE; DELETE FROM call_keys;")?;
        let made = conn.execute(
            &format!(
                "INSERT OR IGNORE INTO call_keys (key, row)
                 SELECT {KEY_FUNCTION}(call_id), rowid FROM calls WHERE call_id IS NOT NULL
                 ORDER BY 1, 2"
            ),
            [],
        )?;
        // The older version's own bound goes with its table: should that version be started
        // on the file again, it finds none, and makes its `call_ids` afresh from the calls.
        conn.execute_batch(
            "DELETE FROM call_keys_merged;
             INSERT INTO call_keys_merged (up_to, anchor)
                 SELECT COALESCE(MAX(rowid), 0), NULL FROM calls WHERE call_id IS NOT NULL;
             UPDATE call_keys_merged
                 SET anchor = (SELECT reservation_id FROM calls WHERE rowid = up_to);
             DROP INDEX IF EXISTS calls_call_id;
             DROP TABLE IF EXISTS call_ids;
             DROP TABLE IF EXISTS call_ids_merged;
             COMMIT;",
        )?;
        Ok(made)
    })();
    // Removing a function expires the connection's prepared statements: harmless here, since
    // the store opens the file with this before it prepares any.
    let _ = conn.remove_function(KEY_FUNCTION, 1);
    let made = made.inspect_err(|_| {
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
    })?;
    // A new file (or one from before the partial index, whose rebuild logged itself) is quiet.
    if in_place.is_some() || old_index || old_table {
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            upstream_ids = made,
            "state file: upstream ids indexed"
        );
    }
    Ok(())
}

/// Where the index and the calls' rows disagree: a bound call neither in memory nor in
/// `call_keys`, an entry of memory that its row does not have, an entry of `call_keys` whose row
/// does not have that key or that lies above both `up_to` and the running merge's bound (a start
/// would not check its row), a bound row at or below `up_to` that `call_keys` does not hold (a
/// restart would not find it), an upstream id on two rows.
pub fn differences(conn: &Connection, index: &CallIndex) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    let recent: HashSet<(i64, i64)> = index.in_memory().into_iter().collect();
    let mut stmt = conn.prepare(
        "SELECT c.call_id, c.reservation_id, c.rowid, c.rowid > m.up_to
         FROM calls c, call_keys_merged m WHERE c.call_id IS NOT NULL",
    )?;
    let mut entry = conn.prepare("SELECT 1 FROM call_keys WHERE key = ?1 AND row = ?2")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, bool>(3)?,
        ))
    })?;
    for row in rows {
        let (call_id, reservation, rowid, above) = row?;
        let indexed = entry.exists(params![key(&call_id), rowid])?;
        let held = recent.contains(&(key(&call_id), rowid));
        if !indexed && !held {
            out.push(format!(
                "upstream id {call_id} ({reservation}) is not indexed"
            ));
        }
        // What a restart would find: the rows above `up_to` are read back into memory.
        if !above && !indexed {
            out.push(format!(
                "upstream id {call_id} is at or below up_to but not in call_keys"
            ));
        }
    }
    let mut entries = conn
        .prepare("SELECT k.key, c.call_id FROM call_keys k LEFT JOIN calls c ON c.rowid = k.row")?;
    let (mut total, mut unbound) = (0, 0);
    for found in entries.query_map([], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?))
    })? {
        let (k, call_id) = found?;
        total += 1;
        if call_id.is_none_or(|call_id| key(&call_id) != k) {
            unbound += 1;
        }
    }
    if unbound > 0 {
        out.push(format!(
            "{unbound} of {total} entries in call_keys have no such bound row"
        ));
    }
    let above: i64 = conn.query_row(
        "SELECT COUNT(*) FROM call_keys, call_keys_merged m
         WHERE row > MAX(m.up_to, COALESCE(m.merging_up_to, m.up_to))",
        [],
        |r| r.get(0),
    )?;
    if above > 0 {
        out.push(format!(
            "{above} entries in call_keys lie above up_to and the running merge's bound"
        ));
    }
    let mut twice = conn.prepare(
        "SELECT call_id, COUNT(*) FROM calls WHERE call_id IS NOT NULL
         GROUP BY call_id HAVING COUNT(*) > 1",
    )?;
    for found in twice.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (call_id, rows) = found?;
        out.push(format!("upstream id {call_id} is bound to {rows} calls"));
    }
    // A filled filter holds every key of the table and of memory.
    let filter_misses = {
        let state = index.lock();
        match state.filter.fill {
            Some(_) => 0,
            None => {
                let mut keys = conn.prepare("SELECT key FROM call_keys")?;
                let table = keys
                    .query_map([], |r| r.get::<_, i64>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                table
                    .iter()
                    .chain(recent.iter().map(|(key, _)| key))
                    .filter(|&&key| !state.filter.may_hold(key))
                    .count()
            }
        }
    };
    if filter_misses > 0 {
        out.push(format!(
            "the filter of upstream ids misses {filter_misses} keys of call_keys and memory"
        ));
    }
    for &(k, row) in &recent {
        let bound: Option<Option<String>> = conn
            .query_row("SELECT call_id FROM calls WHERE rowid = ?1", [row], |r| {
                r.get(0)
            })
            .optional()?;
        if bound.flatten().is_none_or(|call_id| key(&call_id) != k) {
            out.push(format!(
                "memory holds key {k} for row {row}, whose upstream id does not have it"
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use rusqlite::StatementStatus;

    use super::*;

    /// A look-up finds the row its key names only if that row has the id; it runs its statements
    /// as prepared, never prepared again (see [`ROWS`]: with an `ORDER BY` after `key = ?`, or a
    /// join with the calls, it was prepared again at every use).
    #[test]
    fn a_look_up_is_not_prepared_again() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::schema::open_writer(&dir.path().join("state.db")).unwrap();
        let index = CallIndex::load(&conn, MERGE_AT).unwrap();
        conn.execute_batch(
            "INSERT INTO calls (reservation_id, tenant, call_id, token_hash, status, live, hold,
                 price, increment_secs, max_duration, lease_expires_at, created_at, updated_at)
             VALUES ('r1', 'a', 'call-1', 'h', 'queued', 1, 0, 0, 1, 60, 0, 0, 0)",
        )
        .unwrap();
        // call-1's entry, and one for call-2 that names call-1's row (as two ids of one hash
        // would, or a row renumbered): call-2 is not found there.
        for call in ["call-1", "call-2"] {
            conn.prepare_cached(INSERT)
                .unwrap()
                .execute(params![key(call), 1])
                .unwrap();
        }
        for _ in 0..4 {
            assert_eq!(index.find(&conn, "call-1").unwrap().as_deref(), Some("r1"));
            assert_eq!(index.find(&conn, "call-2").unwrap(), None);
            assert_eq!(index.find(&conn, "call-3").unwrap(), None);
        }
        for sql in [ROWS, BOUND] {
            let stmt = conn.prepare_cached(sql).unwrap();
            assert_eq!(stmt.get_status(StatementStatus::RePrepare), 0, "{sql}");
        }
    }

    /// An admitted call `r{i}` at rowid `i`, not bound.
    fn admitted(conn: &Connection, i: i64) {
        conn.execute(
            "INSERT INTO calls (rowid, reservation_id, tenant, token_hash, status, live, hold,
                 price, increment_secs, max_duration, lease_expires_at, created_at, updated_at)
             VALUES (?1, 'r' || ?1, 'a', 'h', 'pending', 1, 0, 0, 1, 60, 0, 0, 0)",
            [i],
        )
        .unwrap();
    }

    /// Bind `r{i}` to upstream id `call-{i}`, as the writer does: its row, then the index.
    fn bind(conn: &Connection, index: &CallIndex, i: i64) {
        let call_id = format!("call-{i}");
        conn.execute(
            "UPDATE calls SET call_id = ?2 WHERE rowid = ?1",
            params![i, call_id],
        )
        .unwrap();
        index.add(conn, &call_id, i).unwrap();
    }

    fn call_keys(conn: &Connection) -> Vec<(i64, i64)> {
        conn.prepare("SELECT key, row FROM call_keys ORDER BY key, row")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// A merge takes the entries memory held when it started, in key order, one chunk a step; a
    /// bind that comes while it runs stays in memory if its row is above the merge's bound, and
    /// goes straight to the table if the merge covers it. Every id is found all along.
    #[test]
    fn a_merge_takes_what_memory_held_when_it_started_and_binds_meanwhile_go_where_they_belong() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::schema::open_writer(&dir.path().join("state.db")).unwrap();
        for i in 1..=7 {
            admitted(&conn, i);
        }
        // Four entries (chunks of one): rows 1, 2, 3 and 5; row 4's upstream answers late.
        let index = CallIndex::load(&conn, 4).unwrap();
        for i in [1, 2, 3, 5] {
            bind(&conn, &index, i);
        }
        let found = |i: i64| index.find(&conn, &format!("call-{i}")).unwrap();
        assert!(index.wants_merge());
        index.merge_step(&conn).unwrap();
        assert_eq!(call_keys(&conn).len(), 1, "one chunk a step");
        assert!(index.covers(5) && !index.covers(6));
        // Its first chunk wrote the bound it will set.
        let merging: (i64, String) = conn
            .query_row(
                "SELECT merging_up_to, merging_anchor FROM call_keys_merged",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((merging.0, merging.1.as_str()), (5, "r5"));
        // The merge's walk in key order passes row 6's entry (above its bound) on its way.
        let first_key = [1, 2, 3, 5]
            .map(|i| key(&format!("call-{i}")))
            .into_iter()
            .min();
        assert!(Some(key("call-6")) > first_key);
        // While it runs: row 6 is above its bound (memory), row 4 below it (the table).
        bind(&conn, &index, 6);
        bind(&conn, &index, 4);
        assert_eq!(call_keys(&conn).len(), 2);
        for i in 1..=6 {
            assert_eq!(found(i), Some(format!("r{i}")), "call-{i} mid-merge");
        }
        let mut steps = 1;
        while index.wants_merge() {
            index.merge_step(&conn).unwrap();
            steps += 1;
        }
        assert_eq!(
            steps, 4,
            "one step for each of the four entries it started with"
        );
        let mut merged: Vec<(i64, i64)> = (1..=5).map(|i| (key(&format!("call-{i}")), i)).collect();
        merged.sort_unstable();
        assert_eq!(call_keys(&conn), merged);
        assert_eq!(index.in_memory(), vec![(key("call-6"), 6)]);
        let (up_to, anchor): (i64, String) = conn
            .query_row("SELECT up_to, anchor FROM call_keys_merged", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((up_to, anchor.as_str()), (5, "r5"));
        for i in 1..=6 {
            assert_eq!(found(i), Some(format!("r{i}")), "call-{i} after the merge");
        }
        assert_eq!(found(7), None);
        assert_eq!(differences(&conn, &index).unwrap(), Vec::<String>::new());
        // What a start reads back: the row above `up_to`, as memory has it.
        let reloaded = CallIndex::load(&conn, 4).unwrap();
        assert_eq!(reloaded.in_memory(), vec![(key("call-6"), 6)]);
    }

    /// A chunk that cannot be written (the file locked by another connection) is tried again at
    /// the next step; a reload in the middle of a merge (as after a rollback) forgets the merge,
    /// and the next one takes every bound row above `up_to` again: the entries the first wrote
    /// are found in the table and kept once.
    #[test]
    fn a_chunk_not_written_is_tried_again_and_a_reload_starts_the_merge_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let conn = super::super::schema::open_writer(&path).unwrap();
        conn.busy_timeout(std::time::Duration::ZERO).unwrap();
        for i in 1..=5 {
            admitted(&conn, i);
        }
        let index = CallIndex::load(&conn, 4).unwrap();
        for i in 1..=4 {
            bind(&conn, &index, i);
        }
        index.merge_step(&conn).unwrap();
        assert_eq!(call_keys(&conn).len(), 1);
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        assert!(index.merge_step(&conn).is_err());
        assert_eq!(call_keys(&conn).len(), 1);
        assert_eq!(index.in_memory().len(), 3);
        assert!(index.covers(4), "a later chunk that fails keeps the merge");
        other.execute_batch("ROLLBACK").unwrap();
        index.merge_step(&conn).unwrap();
        assert_eq!(call_keys(&conn).len(), 2);
        // `up_to` is still 0: memory is read back as all four bound rows.
        index.reload(&conn).unwrap();
        assert_eq!(index.in_memory().len(), 4);
        assert!(!index.covers(1));
        bind(&conn, &index, 5);
        while index.wants_merge() {
            index.merge_step(&conn).unwrap();
        }
        assert_eq!(call_keys(&conn).len(), 5);
        assert!(index.in_memory().is_empty());
        let up_to: (i64, String, Option<i64>) = conn
            .query_row(
                "SELECT up_to, anchor, merging_up_to FROM call_keys_merged",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((up_to.0, up_to.1.as_str(), up_to.2), (5, "r5", None));
        for i in 1..=5 {
            assert_eq!(
                index.find(&conn, &format!("call-{i}")).unwrap(),
                Some(format!("r{i}"))
            );
        }
        assert_eq!(differences(&conn, &index).unwrap(), Vec::<String>::new());
    }

    /// Bind rows `rows` and merge them all into `call_keys`.
    fn bound_and_merged(conn: &Connection, rows: impl IntoIterator<Item = i64>) {
        let index = CallIndex::load(conn, 1).unwrap();
        for i in rows {
            bind(conn, &index, i);
        }
        while index.wants_merge() {
            index.merge_step(conn).unwrap();
        }
        assert!(index.in_memory().is_empty());
    }

    fn fill(index: &CallIndex, conn: &Connection) -> usize {
        let mut steps = 0;
        while index.wants_fill() {
            index.fill_step(conn).unwrap();
            steps += 1;
        }
        steps
    }

    /// Until the filter is filled every look-up that memory does not answer reads the table;
    /// once filled, a look-up of an id no call has (a bind's, almost always) reads nothing, and
    /// every id the table or memory has is still found.
    #[test]
    fn a_filled_filter_answers_for_new_ids_without_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::schema::open_writer(&dir.path().join("state.db")).unwrap();
        for i in 1..=6 {
            admitted(&conn, i);
        }
        bound_and_merged(&conn, 1..=4);
        // A start: four entries in the table, none in memory.
        let index = CallIndex::load(&conn, MERGE_AT).unwrap();
        bind(&conn, &index, 5);
        assert!(index.wants_fill());
        assert_eq!(index.find(&conn, "call-new").unwrap(), None);
        assert_eq!(index.table_lookups(), 1, "not filled: the table is read");
        assert_eq!(fill(&index, &conn), 1);
        for i in 1..=5 {
            assert_eq!(
                index.find(&conn, &format!("call-{i}")).unwrap(),
                Some(format!("r{i}"))
            );
        }
        let before = index.table_lookups();
        for id in ["call-new", "call-6", "call-7", "another"] {
            assert!(index.is_free(&conn, id, "r6").unwrap());
        }
        assert_eq!(index.table_lookups(), before, "new ids read no table");
        assert!(!index.is_free(&conn, "call-1", "r6").unwrap());
        assert!(!index.is_free(&conn, "call-5", "r6").unwrap());
        assert_eq!(differences(&conn, &index).unwrap(), Vec::<String>::new());
    }

    /// The fill reads the table a chunk a step while binds go on: a key the table learns behind
    /// the fill's position (a late bind's entry) or memory learns is in the filter all the same.
    /// Past the keys it was sized for, the filter is made again twice as large and filled again,
    /// and finds everything.
    #[test]
    fn the_fill_misses_no_key_learnt_while_it_runs_and_a_full_filter_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::schema::open_writer(&dir.path().join("state.db")).unwrap();
        for i in 1..=12 {
            admitted(&conn, i);
        }
        // Row 10's upstream answers late: the merges cover it (up_to 11) before it is bound.
        bound_and_merged(&conn, (1..=9).chain([11]));
        let mut index = CallIndex::load_sized(&conn, MERGE_AT, 4).unwrap();
        index.fill_chunk = 3;
        assert_eq!(index.lock().filter.capacity, 15, "sized by the file's rows");
        // Row 10 is bound once the fill has passed where its key goes (or read all the table).
        let passed = |index: &CallIndex| match index.lock().filter.fill {
            None => true,
            Some(None) => false,
            Some(Some((at, _))) => at > key("call-10"),
        };
        while !passed(&index) {
            index.fill_step(&conn).unwrap();
        }
        bind(&conn, &index, 10);
        assert!(index.covers(10), "a late bind: its entry goes to the table");
        bind(&conn, &index, 12);
        fill(&index, &conn);
        let lookups = index.table_lookups();
        for i in 1..=12 {
            assert!(
                !index
                    .is_free(&conn, &format!("call-{i}"), "r-other")
                    .unwrap(),
                "call-{i}"
            );
        }
        assert_eq!(index.table_lookups(), lookups + 11, "the ids the table has");
        assert_eq!(differences(&conn, &index).unwrap(), Vec::<String>::new());
        // Bind past its capacity: made again (unfilled: the table is read), then filled.
        for i in 13..=40 {
            admitted(&conn, i);
            bind(&conn, &index, i);
            index.regrow();
        }
        assert!(index.lock().filter.capacity >= 30);
        assert!(index.wants_fill(), "made again: to be filled again");
        // A chunk read for the filter before it was made again is not put in it: that view of
        // the file may lack entries the table learnt before the new filter was made.
        let generation = index.lock().filter.generation;
        let stale = index.fill_read(&conn).unwrap();
        for i in 41..=100 {
            admitted(&conn, i);
            bind(&conn, &index, i);
            index.regrow();
        }
        assert!(index.lock().filter.generation > generation);
        assert!(!index.fill_apply(stale));
        assert_eq!(index.lock().filter.fill, Some(None));
        let lookups = index.table_lookups();
        assert!(index.is_free(&conn, "call-new", "r-other").unwrap());
        assert_eq!(index.table_lookups(), lookups + 1);
        fill(&index, &conn);
        for i in 1..=100 {
            assert!(
                !index
                    .is_free(&conn, &format!("call-{i}"), "r-other")
                    .unwrap(),
                "call-{i}"
            );
        }
        let lookups = index.table_lookups();
        assert!(index.is_free(&conn, "call-new", "r-other").unwrap());
        assert_eq!(index.table_lookups(), lookups);
        assert_eq!(differences(&conn, &index).unwrap(), Vec::<String>::new());
    }

    /// A late bind's entry written to the table in a transaction still open when the filter
    /// passes its capacity stays in the filter: it is made again only once the transaction has
    /// ended, so a fill on another connection that read the file before the commit fills the old
    /// filter, not the new one.
    #[test]
    fn a_late_bind_in_an_open_transaction_survives_the_filter_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let conn = super::super::schema::open_writer(&path).unwrap();
        for i in 1..=12 {
            admitted(&conn, i);
        }
        bound_and_merged(&conn, (1..=9).chain([11]));
        let index = CallIndex::load_sized(&conn, MERGE_AT, 4).unwrap();
        let reader = super::super::schema::open_reader(&path).unwrap();
        fill(&index, &reader);
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        bind(&conn, &index, 10);
        assert!(index.covers(10), "a late bind: its entry goes to the table");
        for i in 13..=40 {
            admitted(&conn, i);
            bind(&conn, &index, i);
        }
        // A fill on the other connection meanwhile, then the commit: the id is found.
        let generation = index.lock().filter.generation;
        fill(&index, &reader);
        conn.execute_batch("COMMIT").unwrap();
        assert!(!index.is_free(&conn, "call-10", "r-other").unwrap());
        // The writer makes it again between batches, and it is filled again.
        index.regrow();
        assert_eq!(index.lock().filter.generation, generation + 1);
        fill(&index, &reader);
        for i in (1..=11).chain(13..=40) {
            assert!(
                !index
                    .is_free(&conn, &format!("call-{i}"), "r-other")
                    .unwrap(),
                "call-{i}"
            );
        }
        assert_eq!(differences(&conn, &index).unwrap(), Vec::<String>::new());
    }

    /// Memory holds keys, not ids: an entry whose key is the id's but whose row has another id
    /// (as two ids of one hash would have) finds nothing, and the consistency check names an
    /// entry whose row does not have its key.
    #[test]
    fn an_entry_in_memory_counts_only_if_its_row_has_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::schema::open_writer(&dir.path().join("state.db")).unwrap();
        for i in 1..=2 {
            admitted(&conn, i);
        }
        let index = CallIndex::load(&conn, MERGE_AT).unwrap();
        bind(&conn, &index, 2);
        index.lock().recent.insert((key("call-9"), 2));
        index.lock().recent.insert((key("call-1"), 2));
        bind(&conn, &index, 1);
        assert_eq!(index.find(&conn, "call-1").unwrap().as_deref(), Some("r1"));
        assert_eq!(index.find(&conn, "call-2").unwrap().as_deref(), Some("r2"));
        assert_eq!(index.find(&conn, "call-9").unwrap(), None);
        assert!(index.is_free(&conn, "call-9", "r3").unwrap());
        assert!(!index.is_free(&conn, "call-1", "r3").unwrap());
        let differences = differences(&conn, &index).unwrap();
        assert_eq!(differences.len(), 2, "{differences:?}");
        assert!(
            differences
                .iter()
                .all(|d| d.starts_with("memory holds key") && d.contains("for row 2")),
            "{differences:?}"
        );
    }
}
