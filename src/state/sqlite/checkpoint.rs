//! Folding the write-ahead log back into the file, on a thread of its own.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its threshold, on the
//! writer's thread: every few hundred commits one of them would copy thousands of pages (about
//! half of all the writer's page writes) while admissions wait. Here a second connection runs a
//! `PASSIVE` checkpoint every [`INTERVAL`], which never blocks the writer or the readers; the
//! writer keeps a far automatic threshold only as a backstop.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::Connection;

use crate::state::StoreError;

/// How often the log is folded into the file.
const INTERVAL: Duration = Duration::from_millis(200);

/// Start the checkpointer; it stops (after a last checkpoint) when the returned sender is dropped.
pub fn start(path: &Path) -> Result<mpsc::Sender<()>, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("callgate-sqlite-checkpoint".into())
        .spawn(move || {
            loop {
                match stopped.recv_timeout(INTERVAL) {
                    Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => checkpoint(&conn),
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        checkpoint(&conn);
                        break;
                    }
                }
            }
        })
        .map_err(|e| StoreError::Backend(format!("cannot start the checkpoint thread: {e}")))?;
    Ok(stop)
}

fn checkpoint(conn: &Connection) {
    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    });
    match result {
        Ok((log, folded)) => tracing::trace!(log, folded, "checkpoint"),
        Err(e) => tracing::warn!(error = %e, "state store: checkpoint failed"),
    }
}
