//! The audit log: one JSON line per incoherent-DMA decision, appended to a file.
//!
//! Records go through a bounded queue to a writer task that appends and syncs each line; if the
//! queue is full the record is dropped, counted in `ioasid_audit_records_dropped_total` and
//! logged, never lost silently. The same records can be replayed against another policy
//! (`ioasid-agent replay`), since each carries everything the policy looked at.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::Serialize;
use tokio::sync::mpsc;

use prometheus::IntCounter;

pub use crate::engine::record::*;
use crate::util::time::rfc3339;

pub const DEFAULT_AUDIT_PATH: &str = "/var/log/ioasid/audit.jsonl";
const QUEUE: usize = 4096;

/// Where records go: a file (reopened when rotated or removed), or stdout (`--audit-log -`,
/// for container log pipelines).
enum Sink {
    File { path: PathBuf, file: std::fs::File },
    Stdout,
}

impl Sink {
    /// Opens `path` (creating directories), or stdout for `-`.
    fn open(path: &Path) -> Result<Self, AuditError> {
        let open_err = |source| AuditError::Open { path: path.to_path_buf(), source };
        if path.as_os_str() == "-" {
            return Ok(Sink::Stdout);
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        Ok(Sink::File { path: path.to_path_buf(), file: open_append(path).map_err(open_err)? })
    }

    /// Appends one line (with its newline) and syncs it.
    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(line).and_then(|()| out.flush())
            }
            Sink::File { path, file } => {
                // Rotated (renamed) or deleted: records go to the file the path names now.
                if !names_same_file(path, file) {
                    match open_append(path) {
                        Ok(f) => {
                            *file = f;
                            tracing::info!(path = %path.display(), "audit log reopened (rotated or removed)");
                        }
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "reopening the audit log")
                        }
                    }
                }
                append(file, line)
            }
        }
    }
}

/// A record kind the log takes: what syslog needs to know of it without reading it back.
pub trait Auditable: Serialize {
    fn event(&self) -> RecordKind;
    /// Sent to syslog at severity warning (denials, storms), else notice.
    fn warning(&self) -> bool;
}

impl Auditable for AuditRecord {
    fn event(&self) -> RecordKind {
        self.event
    }
    fn warning(&self) -> bool {
        self.decision == Decision::Denied
    }
}

impl Auditable for StormRecord {
    fn event(&self) -> RecordKind {
        self.event
    }
    fn warning(&self) -> bool {
        true
    }
}

impl Auditable for BlastRecord {
    fn event(&self) -> RecordKind {
        self.event
    }
    fn warning(&self) -> bool {
        false
    }
}

/// Every record on the wire: its format version and unique id first, then the record's own
/// fields (serialised, never pasted).
#[derive(Serialize)]
struct Envelope<'a, T: Serialize> {
    schema: u32,
    id: String,
    #[serde(flatten)]
    record: &'a T,
}

/// One record queued for the sinks: its JSON line and what syslog says of it.
struct Queued {
    line: Vec<u8>,
    event: RecordKind,
    warning: bool,
}

/// A copy of every record to the local syslog daemon (`--audit-syslog /dev/log`): RFC 5424
/// messages over a datagram socket, facility authpriv, severity warning for denials and storms
/// and notice otherwise, APP-NAME `ioasid-agent`, MSGID the record's `event`, the JSON record as
/// MSG. Sent to the path each time, so a restarted syslog daemon is found again.
pub struct Syslog {
    pub socket: PathBuf,
    /// HOSTNAME of the messages: the node.
    pub host: String,
}

const FACILITY_AUTHPRIV: u8 = 10;

impl Syslog {
    fn message(&self, q: &Queued) -> Vec<u8> {
        let pri = FACILITY_AUTHPRIV * 8 + if q.warning { 4 } else { 5 };
        // RFC 5424 HOSTNAME, APP-NAME and MSGID are printable US-ASCII without spaces.
        let field = |s: &str, max: usize| -> String {
            let f: String = s.chars().filter(|c| c.is_ascii_graphic()).take(max).collect();
            if f.is_empty() {
                "-".into()
            } else {
                f
            }
        };
        let head = format!(
            "<{pri}>1 {} {} ioasid-agent {} {} - ",
            rfc3339(SystemTime::now()),
            field(&self.host, 255),
            std::process::id(),
            field(q.event.label(), 32)
        );
        let mut msg = head.into_bytes();
        msg.extend_from_slice(&q.line);
        msg
    }
}

/// A random id for this agent's records (the kernel's UUID generator; the clock as a fallback).
fn instance_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|u| u.trim().to_string())
        .unwrap_or_else(|_| format!("{:x}-{}", crate::host::sys::monotonic_ns(), std::process::id()))
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("opening audit log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Logs a failing or recovering sink once per episode (a full disk fails every record).
struct Episode {
    failing: bool,
}

impl Episode {
    fn outcome(&mut self, r: std::io::Result<()>, lost: &IntCounter, what: &str) {
        match r {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!(sink = what, "audit sink writable again");
            }
            Ok(()) => {}
            Err(e) => {
                // Counted every time, logged once per episode.
                lost.inc();
                if !self.failing {
                    self.failing = true;
                    tracing::error!(sink = what, error = %e, "writing audit records: they are being dropped there (ioasid_audit_records_dropped_total)");
                }
            }
        }
    }
}

/// The writer thread's side: the sinks, in order.
struct Writer {
    sink: Sink,
    shown: String,
    syslog: Option<(Syslog, std::os::unix::net::UnixDatagram)>,
    lost: IntCounter,
    file_state: Episode,
    syslog_state: Episode,
}

impl Writer {
    fn deliver(&mut self, q: Queued) {
        if let Some((target, sock)) = &self.syslog {
            let sent = sock.send_to(&target.message(&q), &target.socket).map(|_| ());
            let what = format!("syslog {}", target.socket.display());
            self.syslog_state.outcome(sent, &self.lost, &what);
        }
        let mut line = q.line;
        line.push(b'\n');
        let written = self.sink.write(&line);
        self.file_state.outcome(written, &self.lost, &self.shown);
    }
}

#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Queued>,
    /// `ioasid_audit_records_dropped_total`.
    dropped: IntCounter,
    /// This agent's id (random per start) and the next record's number: each record's `id` is
    /// `INSTANCE-N`, unique across hosts and restarts; a gap in N is a record lost.
    instance: std::sync::Arc<str>,
    seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl AuditLog {
    /// Opens (creating directories) and starts the writer task. Fails now if the file cannot be
    /// opened, rather than losing records later.
    pub fn start(path: &Path, dropped: IntCounter) -> Result<Self, AuditError> {
        Self::start_with(path, dropped, None)
    }

    /// As `start`, also sending every record to syslog.
    pub fn start_with(path: &Path, dropped: IntCounter, syslog: Option<Syslog>) -> Result<Self, AuditError> {
        let sink = Sink::open(path)?;
        let syslog = match syslog {
            Some(target) => Some((
                target,
                std::os::unix::net::UnixDatagram::unbound()
                    .map_err(|source| AuditError::Open { path: path.to_path_buf(), source })?,
            )),
            None => None,
        };
        let mut writer = Writer {
            sink,
            shown: path.display().to_string(),
            syslog,
            lost: dropped.clone(),
            file_state: Episode { failing: false },
            syslog_state: Episode { failing: false },
        };
        let (tx, mut rx) = mpsc::channel::<Queued>(QUEUE);
        tokio::task::spawn_blocking(move || {
            while let Some(q) = rx.blocking_recv() {
                writer.deliver(q);
            }
        });
        Ok(Self {
            tx,
            dropped,
            instance: instance_id().into(),
            seq: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1)),
        })
    }

    /// Logs the decision and queues the record.
    pub fn record(&self, rec: AuditRecord) {
        tracing::info!(
            vm = %crate::util::text::escape(&rec.vm), pid = rec.pid, rule = %rec.rule, decision = %rec.decision,
            mechanism = %rec.mechanism, outcome = %rec.outcome, "incoherent-DMA enable"
        );
        self.record_quiet(rec);
    }

    /// Queues the record without a log line (a second sink, e.g. `--record`).
    pub fn record_quiet(&self, rec: AuditRecord) {
        self.write(&rec);
    }

    /// Queues any record as one JSON line, led by its `schema` and its unique `id`.
    pub fn write<T: Auditable>(&self, rec: &T) {
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let envelope = Envelope { schema: SCHEMA, id: format!("{}-{n}", self.instance), record: rec };
        let line = match serde_json::to_vec(&envelope) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "serializing an audit record");
                return;
            }
        };
        let q = Queued { line, event: rec.event(), warning: rec.warning() };
        if let Err(e) = self.tx.try_send(q) {
            let n = self.dropped.get();
            self.dropped.inc();
            if crate::util::log_at_powers_of_two(n) {
                tracing::error!(dropped_total = n + 1, error = %e, "audit queue full: record dropped");
            }
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    crate::host::files::open_append(path)
}

/// Whether `path` still names the open `file` (same device and inode).
fn names_same_file(path: &Path, file: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), file.metadata()) {
        (Ok(p), Ok(f)) => p.dev() == f.dev() && p.ino() == f.ino(),
        _ => false,
    }
}

/// Appends one whole line and syncs it. A failed write is cut back off the file, so a partial
/// line never glues itself to the next record.
fn append(file: &mut std::fs::File, line: &[u8]) -> std::io::Result<()> {
    let before = file.metadata()?.len();
    let r = file.write_all(line).and_then(|()| file.sync_data());
    if r.is_err() {
        let _ = file.set_len(before);
    }
    r
}

#[cfg(test)]
mod tests;
