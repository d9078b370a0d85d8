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
    /// Whether the file has the opt-out and attempt tables (older files do not).
    compliance_tables: bool,
}

impl SqliteSnapshot {
    /// Open the file at `path` read-only, if it exists.
    pub fn open(path: &Path) -> Result<SqliteSnapshot, StoreError> {
        if !path.exists() {
            return Ok(SqliteSnapshot {
                conn: None,
                ledger: Ledger::rebuild(Vec::new(), Vec::new()),
                compliance_tables: false,
            });
        }
        let conn = schema::open_reader(path)?;
        let ledger = schema::load_ledger(&conn)?;
        let tables: i64 = conn.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN ('opt_outs', 'attempts', 'consents', 'suspensions')",
            [],
            |r| r.get(0),
        )?;
        Ok(SqliteSnapshot {
            conn: Some(Mutex::new(conn)),
            ledger,
            compliance_tables: tables == 4,
        })
    }

    fn read<R: Default>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        match &self.conn {
            Some(conn) if self.compliance_tables => {
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
        let found = self.read(queries::all_suspensions);
        Box::pin(std::future::ready(found))
    }

    fn get_consent(&self, id: &str) -> StoreFuture<'static, Option<ConsentRecord>> {
        let found = self.read(|conn| queries::get_consent(conn, id));
        Box::pin(std::future::ready(found))
    }

    fn opt_outs(&self, phone_number: &str) -> StoreFuture<'static, Vec<OptOut>> {
        let found = self.read(|conn| queries::opt_outs_of(conn, phone_number));
        Box::pin(std::future::ready(found))
    }

    fn attempts(
        &self,
        scope: &AttemptScope,
        phone_number: &str,
        since: i64,
    ) -> StoreFuture<'static, Vec<i64>> {
        let found =
            self.read(|conn| queries::attempt_times(conn, scope.key(), phone_number, since));
        Box::pin(std::future::ready(found))
    }
}
