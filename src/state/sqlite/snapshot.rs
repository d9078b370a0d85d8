//! A read-only view of a state file, for `callgate check-request`: it opens no writer, takes no
//! lock, changes nothing, and works while a gateway runs on the file (WAL: it reads the last
//! commit) or when the file does not exist yet (everything is empty then).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::Connection;

use super::{queries, schema};
use crate::state::accounting::Ledger;
use crate::state::{
    AttemptScope, ConsentRecord, OptOut, StateView, StoreError, StoreFuture, Suspension, Usage,
};

/// See the module docs.
pub struct SqliteSnapshot {
    /// `None`: no file yet.
    conn: Option<Mutex<Connection>>,
    ledger: Ledger,
    /// The compliance tables the file has (older files lack some).
    tables: Vec<String>,
}

impl SqliteSnapshot {
    /// Open the file at `path` read-only, if it exists.
    pub fn open(path: &Path) -> Result<SqliteSnapshot, StoreError> {
        if !path.exists() {
            return Ok(SqliteSnapshot {
                conn: None,
                ledger: Ledger::rebuild(Vec::new(), Vec::new()),
                tables: Vec::new(),
            });
        }
        let conn = schema::open_reader(path)?;
        let ledger = schema::load_ledger(&conn)?;
        let tables = conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' \
                 AND name IN ('opt_outs', 'attempts', 'consents', 'suspensions')",
            )?
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(SqliteSnapshot {
            conn: Some(Mutex::new(conn)),
            ledger,
            tables,
        })
    }

    /// `f` on the file, or nothing found where the file has no `table` yet.
    fn read<R: Default>(
        &self,
        table: &str,
        f: impl FnOnce(&Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        match &self.conn {
            Some(conn) if self.tables.iter().any(|t| t == table) => {
                f(&conn.lock().unwrap_or_else(|p| p.into_inner()))
            }
            _ => Ok(R::default()),
        }
    }
}

impl StateView for SqliteSnapshot {
    fn usage(&self, tenant: &str, now: i64) -> StoreFuture<'static, Usage> {
        let usage = self.ledger.usage(tenant, now);
        Box::pin(std::future::ready(Ok(usage)))
    }

    fn suspensions(&self) -> StoreFuture<'static, Vec<Suspension>> {
        let found = self.read("suspensions", queries::all_suspensions);
        Box::pin(std::future::ready(found))
    }

    fn get_consent(&self, id: &str) -> StoreFuture<'static, Option<ConsentRecord>> {
        let found = self.read("consents", |conn| queries::get_consent(conn, id));
        Box::pin(std::future::ready(found))
    }

    fn opt_outs(&self, phone_number: &str) -> StoreFuture<'static, Vec<OptOut>> {
        let found = self.read("opt_outs", |conn| queries::opt_outs_of(conn, phone_number));
        Box::pin(std::future::ready(found))
    }

    fn attempts(
        &self,
        scope: &AttemptScope,
        phone_number: &str,
        since: i64,
    ) -> StoreFuture<'static, Vec<i64>> {
        let found = self.read("attempts", |conn| {
            queries::attempt_times(conn, scope.key(), phone_number, since)
        });
        Box::pin(std::future::ready(found))
    }
}
