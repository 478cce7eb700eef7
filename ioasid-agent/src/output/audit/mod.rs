//! The audit log: one JSON line per incoherent-DMA decision, appended to a file.
//!
//! Every sink (the file or stdout, syslog, the `--record` file) has its own writer thread and
//! bounded queue: a slow or hung sink delays no other sink and no decision. A record a sink
//! cannot take (its queue full, a write failing) is dropped there, counted in
//! `ioasid_audit_records_dropped_total{sink}` and logged, never lost silently. A quarter of each
//! queue is kept for records of enforced decisions (denials, storm actions). One process's flood
//! of requests is aggregated past a burst (per pid: 100 records, then 20 a second): the rest of
//! its records become one `incoherent-dma-aggregated` record a second with their counts
//! (`ioasid_audit_records_aggregated_total`), so no flood pushes out another VM's records.
//! Shutdown waits for each sink a bounded time. The same records can be replayed against another
//! policy (`ioasid-agent replay`), since each carries everything the policy looked at.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use prometheus::{IntCounter, IntCounterVec};

pub use crate::engine::record::*;
use crate::util::time::rfc3339;

pub const DEFAULT_AUDIT_PATH: &str = "/var/log/ioasid/audit.jsonl";
/// Records queued per sink.
const QUEUE: usize = 4096;
/// Of which this many are kept for records of enforced decisions.
const RESERVED: usize = QUEUE / 4;
/// Per process: records written before its flood is aggregated, and the rate after that.
const FLOOD_BURST: f64 = 100.0;
const FLOOD_RATE: f64 = 20.0;
/// Processes whose flood state is kept (the oldest idle ones go first past it).
const FLOOD_PIDS: usize = 4096;

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
    /// The record of an enforced decision (a denial, a storm's action): it may use the room
    /// each queue keeps for such records.
    fn enforced(&self) -> bool {
        self.warning()
    }
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

impl Auditable for AggregatedRecord {
    fn event(&self) -> RecordKind {
        self.event
    }
    fn warning(&self) -> bool {
        self.decisions.keys().any(|k| k.starts_with("denied"))
    }
}

/// One process's records aggregated over a second of its flood: how many of each decision and
/// outcome (`denied/blocked`, ...), instead of one record each.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct AggregatedRecord {
    /// `incoherent-dma-aggregated`.
    pub event: RecordKind,
    /// RFC 3339, UTC: when the summary was written.
    pub time: String,
    pub host: String,
    pub vm: String,
    pub pid: u32,
    /// Records aggregated into this one.
    pub count: u64,
    /// `decision/outcome` -> records.
    pub decisions: BTreeMap<String, u64>,
    /// The first and last aggregated record's time.
    pub first: String,
    pub last: String,
    pub reason: String,
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

/// One sink's side in the log: its queue (None once closed), how full it is, and its thread's
/// end.
struct SinkQueue {
    name: &'static str,
    tx: Option<SyncSender<Arc<Queued>>>,
    queued: Arc<AtomicUsize>,
    done: Receiver<()>,
}

/// Where each flooding process stands: its tokens, and what has been aggregated since the last
/// summary.
struct Flood {
    tokens: f64,
    at: Instant,
    vm: String,
    count: u64,
    decisions: BTreeMap<String, u64>,
    first: String,
    last: String,
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
        let r = match r {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Err(std::io::Error::new(e.kind(), "the receiver is not reading (its queue is full)"))
            }
            r => r,
        };
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

/// What one writer thread writes to.
enum Target {
    Log(Sink),
    Syslog(Syslog, std::os::unix::net::UnixDatagram),
}

impl Target {
    fn deliver(&mut self, q: &Queued) -> std::io::Result<()> {
        match self {
            Target::Syslog(target, sock) => sock.send_to(&target.message(q), &target.socket).map(|_| ()),
            Target::Log(sink) => {
                let mut line = Vec::with_capacity(q.line.len() + 1);
                line.extend_from_slice(&q.line);
                line.push(b'\n');
                sink.write(&line)
            }
        }
    }
}

/// Starts one sink's writer thread; its queue and end are the caller's.
fn spawn_sink(
    name: &'static str,
    shown: String,
    mut target: Target,
    lost: IntCounter,
) -> Result<SinkQueue, std::io::Error> {
    let (tx, rx) = mpsc::sync_channel::<Arc<Queued>>(QUEUE);
    let (done_tx, done) = mpsc::channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let in_queue = Arc::clone(&queued);
    std::thread::Builder::new().name(format!("audit-{name}")).spawn(move || {
        let mut state = Episode { failing: false };
        while let Ok(q) = rx.recv() {
            let r = target.deliver(&q);
            in_queue.fetch_sub(1, Ordering::Relaxed);
            state.outcome(r, &lost, &shown);
        }
        let _ = done_tx.send(());
    })?;
    Ok(SinkQueue { name, tx: Some(tx), queued, done })
}

#[derive(Clone)]
pub struct AuditLog {
    sinks: Arc<Mutex<Vec<SinkQueue>>>,
    /// `ioasid_audit_records_dropped_total{sink}`.
    dropped: IntCounterVec,
    /// `ioasid_audit_records_aggregated_total`.
    aggregated: IntCounter,
    floods: Arc<Mutex<HashMap<u32, Flood>>>,
    /// The node, for aggregated records.
    host: Arc<str>,
    /// This agent's id (random per start) and the next record's number: each record's `id` is
    /// `INSTANCE-N`, unique across hosts and restarts; a gap in N is a record lost.
    instance: Arc<str>,
    seq: Arc<AtomicU64>,
}

/// The counters an audit log keeps.
#[derive(Clone)]
pub struct AuditCounters {
    pub dropped: IntCounterVec,
    pub aggregated: IntCounter,
}

impl AuditLog {
    /// Opens (creating directories) and starts the writer. Fails now if the file cannot be
    /// opened, rather than losing records later.
    pub fn start(path: &Path, counters: AuditCounters) -> Result<Self, AuditError> {
        Self::start_with(path, counters, None, None)
    }

    /// As `start`, also sending every record to syslog; `name` is the file sink's `sink` label
    /// (`file` or `stdout` unless given, e.g. `record`).
    pub fn start_with(
        path: &Path,
        counters: AuditCounters,
        syslog: Option<Syslog>,
        name: Option<&'static str>,
    ) -> Result<Self, AuditError> {
        let open_err = |source| AuditError::Open { path: path.to_path_buf(), source };
        let sink = Sink::open(path)?;
        let name = name.unwrap_or(if matches!(sink, Sink::Stdout) { "stdout" } else { "file" });
        let host = syslog.as_ref().map_or_else(crate::host::sys::hostname, |s| s.host.clone());
        let mut sinks = vec![spawn_sink(
            name,
            path.display().to_string(),
            Target::Log(sink),
            counters.dropped.with_label_values(&[name]),
        )
        .map_err(open_err)?];
        if let Some(target) = syslog {
            // Never blocks: a syslog daemon that does not read loses its records, counted.
            let sock = std::os::unix::net::UnixDatagram::unbound().map_err(open_err)?;
            sock.set_nonblocking(true).map_err(open_err)?;
            let shown = format!("syslog {}", target.socket.display());
            let lost = counters.dropped.with_label_values(&["syslog"]);
            sinks.push(spawn_sink("syslog", shown, Target::Syslog(target, sock), lost).map_err(open_err)?);
        }
        for s in &sinks {
            counters.dropped.with_label_values(&[s.name]);
        }
        Ok(Self {
            sinks: Arc::new(Mutex::new(sinks)),
            dropped: counters.dropped,
            aggregated: counters.aggregated,
            floods: Arc::new(Mutex::new(HashMap::new())),
            host: host.into(),
            instance: instance_id().into(),
            seq: Arc::new(AtomicU64::new(1)),
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

    /// Queues the record without a log line (a second sink, e.g. `--record`), unless its
    /// process floods: then it is counted into that process's next aggregated record.
    pub fn record_quiet(&self, rec: AuditRecord) {
        if self.flooding(&rec) {
            self.aggregated.inc();
            return;
        }
        self.write(&rec);
    }

    /// Whether `rec`'s process is past its burst (then `rec` is counted into its flood).
    fn flooding(&self, rec: &AuditRecord) -> bool {
        let mut floods = self.floods.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if floods.len() >= FLOOD_PIDS && !floods.contains_key(&rec.pid) {
            // Past the bound, forget the process quiet longest among those with nothing
            // aggregated (the others' counts are written at the next flush, then they go).
            if let Some(pid) =
                floods.iter().filter(|(_, f)| f.count == 0).min_by_key(|(_, f)| f.at).map(|(p, _)| *p)
            {
                floods.remove(&pid);
            }
        }
        let f = floods.entry(rec.pid).or_insert_with(|| Flood {
            tokens: FLOOD_BURST,
            at: now,
            vm: rec.vm.clone(),
            count: 0,
            decisions: BTreeMap::new(),
            first: String::new(),
            last: String::new(),
        });
        f.tokens = (f.tokens + now.duration_since(f.at).as_secs_f64() * FLOOD_RATE).min(FLOOD_BURST);
        f.at = now;
        if f.tokens >= 1.0 {
            f.tokens -= 1.0;
            return false;
        }
        if f.count == 0 {
            f.first = rec.time.clone();
            f.vm = rec.vm.clone();
        }
        f.count += 1;
        f.last = rec.time.clone();
        *f.decisions.entry(format!("{}/{}", rec.decision, rec.outcome)).or_insert(0) += 1;
        true
    }

    /// Writes one aggregated record per process whose records were aggregated since the last
    /// call (the actor calls it every second), and forgets processes whose burst is whole again.
    pub fn flush_aggregated(&self) {
        let summaries: Vec<AggregatedRecord> = {
            let mut floods = self.floods.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let out = floods
                .iter_mut()
                .filter(|(_, f)| f.count > 0)
                .map(|(pid, f)| AggregatedRecord {
                    event: RecordKind::IncoherentDmaAggregated,
                    time: rfc3339(SystemTime::now()),
                    host: self.host.to_string(),
                    vm: f.vm.clone(),
                    pid: *pid,
                    count: std::mem::take(&mut f.count),
                    decisions: std::mem::take(&mut f.decisions),
                    first: std::mem::take(&mut f.first),
                    last: std::mem::take(&mut f.last),
                    reason: format!(
                        "a flood of requests from one process: past {FLOOD_BURST} records (then {FLOOD_RATE} a second) its records are counted here"
                    ),
                })
                .collect();
            floods.retain(|_, f| {
                f.count > 0 || (f.tokens + now.duration_since(f.at).as_secs_f64() * FLOOD_RATE) < FLOOD_BURST
            });
            out
        };
        for s in summaries {
            tracing::warn!(vm = %crate::util::text::escape(&s.vm), pid = s.pid, count = s.count, "incoherent-DMA requests aggregated: one process floods");
            self.write(&s);
        }
    }

    /// Queues any record as one JSON line, led by its `schema` and its unique `id`, to every
    /// sink that has room for it.
    pub fn write<T: Auditable>(&self, rec: &T) {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let envelope = Envelope { schema: SCHEMA, id: format!("{}-{n}", self.instance), record: rec };
        let line = match serde_json::to_vec(&envelope) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "serializing an audit record");
                return;
            }
        };
        let q = Arc::new(Queued { line, event: rec.event(), warning: rec.warning() });
        let room = if rec.enforced() { QUEUE } else { QUEUE - RESERVED };
        let sinks = self.sinks.lock().unwrap_or_else(|e| e.into_inner());
        for s in sinks.iter() {
            let why = match &s.tx {
                None => Some("the log is closed"),
                Some(_) if s.queued.load(Ordering::Relaxed) >= room => Some("queue full"),
                Some(tx) => {
                    s.queued.fetch_add(1, Ordering::Relaxed);
                    match tx.try_send(Arc::clone(&q)) {
                        Ok(()) => None,
                        Err(TrySendError::Full(_)) => {
                            s.queued.fetch_sub(1, Ordering::Relaxed);
                            Some("queue full")
                        }
                        Err(TrySendError::Disconnected(_)) => {
                            s.queued.fetch_sub(1, Ordering::Relaxed);
                            Some("its writer stopped")
                        }
                    }
                }
            };
            if let Some(why) = why {
                let lost = self.dropped.with_label_values(&[s.name]);
                let n = lost.get();
                lost.inc();
                if crate::util::log_at_powers_of_two(n) {
                    tracing::error!(sink = s.name, dropped_total = n + 1, why, "audit record dropped");
                }
            }
        }
    }

    /// Closes every sink and waits up to `within` for them to write what is queued; a sink
    /// that does not finish in time (a hung device) is left behind, said and counted.
    pub fn close(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut sinks = self.sinks.lock().unwrap_or_else(|e| e.into_inner());
        for s in sinks.iter_mut() {
            s.tx = None;
        }
        for s in sinks.iter() {
            let left = deadline.saturating_duration_since(Instant::now());
            if s.done.recv_timeout(left).is_err() {
                let unwritten = s.queued.load(Ordering::Relaxed);
                self.dropped.with_label_values(&[s.name]).inc_by(unwritten as u64);
                tracing::error!(sink = s.name, unwritten, "an audit sink did not finish within {within:?} at shutdown: its queued records are lost (counted)");
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
