//! The audit trail: one JSON line per decision on `POST /v1/calls`, per settlement and per admin
//! action, written before the answer leaves.
//!
//! - `[audit] path = "..."` (a file, appended to) or `"stdout"`; off when unset. Each line is
//!   written with one `write` (it survives a crash of the process); `fsync = "always"` also
//!   syncs each line to disk (it survives power loss), `"never"` (the default) leaves that to the
//!   system.
//! - Tamper evidence: every line carries `prev`, the SHA-256 (hex) of the previous line's bytes
//!   (64 zeros for the first), continuing across restarts in the same file.
//!   `callgate audit verify FILE` checks the chain and names the first broken line.
//! - `SIGHUP` reopens the file (logrotate's convention): the chain continues from the last line
//!   of whatever file is then at the path (64 zeros in a new one).
//! - Never a full number, a key or unredacted metadata: destinations are masked by the stages
//!   that record them; keys and metadata are not fields.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// When each line is synced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// After every line: a line survives power loss.
    Always,
    /// Left to the system: a line survives a crash of the process.
    #[default]
    Never,
}

/// `[audit]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// A file to append to, or `"stdout"`; none: no audit trail.
    pub path: Option<String>,
    pub fsync: Fsync,
}

enum Sink {
    Stdout,
    File { file: File, path: PathBuf },
}

struct Writer {
    sink: Sink,
    /// SHA-256 (hex) of the last line written.
    prev: String,
    fsync: Fsync,
}

/// See the module docs.
pub struct Audit {
    writer: Option<Mutex<Writer>>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("on", &self.writer.is_some())
            .finish()
    }
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn sha256_hex(bytes: &[u8]) -> String {
    crate::hexstr::lower(Sha256::digest(bytes))
}

/// The hash of the last line of the file at `path` (the chain continues from it), or the genesis
/// value for an empty or new file.
fn last_hash(file: &mut File) -> std::io::Result<String> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(GENESIS.to_string());
    }
    // Read back far enough to hold the last whole line (lines are well under 64 KiB).
    let start = len.saturating_sub(64 * 1024);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let trimmed = tail.strip_suffix(b"\n").unwrap_or(&tail);
    let last = match trimmed.iter().rposition(|&b| b == b'\n') {
        Some(i) => &trimmed[i + 1..],
        None => trimmed,
    };
    file.seek(SeekFrom::End(0))?;
    Ok(sha256_hex(last))
}

fn open_sink(path: &str) -> std::io::Result<(Sink, String)> {
    if path == "stdout" {
        return Ok((Sink::Stdout, GENESIS.to_string()));
    }
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    let prev = last_hash(&mut file)?;
    Ok((
        Sink::File {
            file,
            path: PathBuf::from(path),
        },
        prev,
    ))
}

impl Audit {
    /// No audit trail.
    pub fn off() -> Audit {
        Audit { writer: None }
    }

    /// Open the trail the settings name (none: off).
    pub fn open(settings: &AuditSettings) -> std::io::Result<Audit> {
        let Some(path) = &settings.path else {
            return Ok(Audit::off());
        };
        let (sink, prev) = open_sink(path)?;
        Ok(Audit {
            writer: Some(Mutex::new(Writer {
                sink,
                prev,
                fsync: settings.fsync,
            })),
        })
    }

    /// Whether lines are written.
    pub fn is_on(&self) -> bool {
        self.writer.is_some()
    }

    /// Reopen the file at the same path (after logrotate moved it), continuing the chain from
    /// its last line.
    pub fn reopen(&self) -> std::io::Result<()> {
        let Some(writer) = &self.writer else {
            return Ok(());
        };
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Sink::File { path, .. } = &w.sink {
            let path = path.display().to_string();
            let (sink, prev) = open_sink(&path)?;
            w.sink = sink;
            w.prev = prev;
        }
        Ok(())
    }

    /// Write one record (`kind` and `fields`), with the time and the chain; an error is logged
    /// (the trail never fails a request).
    pub fn record(&self, kind: &str, fields: Map<String, Value>) {
        let Some(writer) = &self.writer else {
            return;
        };
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut line = Map::new();
        line.insert(
            "time".into(),
            Value::String(jiff::Timestamp::now().to_string()),
        );
        line.insert("type".into(), Value::String(kind.to_string()));
        line.extend(fields);
        line.insert("prev".into(), Value::String(w.prev.clone()));
        let mut bytes = serde_json::to_vec(&Value::Object(line)).unwrap_or_default();
        let hash = sha256_hex(&bytes);
        bytes.push(b'\n');
        let fsync = w.fsync;
        let written = match &mut w.sink {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(&bytes).and_then(|_| out.flush())
            }
            Sink::File { file, .. } => file.write_all(&bytes).and_then(|_| match fsync {
                Fsync::Always => file.sync_data(),
                Fsync::Never => Ok(()),
            }),
        };
        match written {
            Ok(()) => w.prev = hash,
            Err(e) => tracing::error!(error = %e, "audit line not written"),
        }
    }
}

impl Audit {
    /// A call's accounting ended: by an event, reconciliation, its lease, or an operator.
    pub fn settlement(&self, record: &crate::state::CallRecord, by: &str) {
        if !self.is_on() {
            return;
        }
        let mut line = Map::new();
        line.insert("tenant".into(), record.tenant.clone().into());
        line.insert(
            "call_id".into(),
            record.call_id.clone().map_or(Value::Null, Into::into),
        );
        line.insert("reservation".into(), record.reservation_id.clone().into());
        line.insert("status".into(), record.status.clone().into());
        line.insert("charge".into(), record.charged.into());
        line.insert(
            "duration".into(),
            record.duration.map_or(Value::Null, Into::into),
        );
        line.insert("by".into(), by.into());
        self.record("settlement", line);
    }

    /// An operator's action on the admin API.
    pub fn admin(&self, action: &str, mut fields: Map<String, Value>) {
        fields.insert("action".into(), action.into());
        self.record("admin", fields);
    }
}

/// Check the chain of the audit file at `path`: `Ok(lines)` when every line's `prev` is the
/// SHA-256 of the line before it; otherwise the 1-based number of the first broken line and why.
pub fn verify(path: &Path) -> Result<usize, (usize, String)> {
    let text =
        std::fs::read(path).map_err(|e| (0, format!("cannot read {}: {e}", path.display())))?;
    let mut prev = GENESIS.to_string();
    let mut count = 0;
    // Every line ends with a newline: the piece after the last one is empty.
    let body = text.strip_suffix(b"\n").unwrap_or(&text);
    if body.is_empty() {
        return Ok(0);
    }
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        let n = i + 1;
        let value: Value =
            serde_json::from_slice(line).map_err(|e| (n, format!("line {n} is not JSON: {e}")))?;
        let claimed = value.get("prev").and_then(Value::as_str).unwrap_or("");
        if claimed != prev {
            return Err((
                n,
                format!(
                    "line {n} does not follow line {}: the chain is broken there (line {} was changed, or lines were removed or inserted)",
                    n - 1,
                    n - 1
                ),
            ));
        }
        prev = sha256_hex(line);
        count += 1;
    }
    Ok(count)
}
