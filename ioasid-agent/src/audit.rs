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

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use prometheus::IntCounter;

use crate::{policy::Action, procfs::ProcessInfo, vfio::VfioFile};

pub const DEFAULT_AUDIT_PATH: &str = "/var/log/ioasid/audit.jsonl";
const QUEUE: usize = 4096;

/// The ioctl an audit record is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// e.g. KVM_SET_DEVICE_ATTR
    pub ioctl: String,
    /// e.g. KVM_DEV_VFIO_FILE_ADD
    pub attr: String,
    /// The kvm device fd the ioctl was issued on.
    pub fd: i32,
    /// The VFIO file fd passed in `addr`, when it could be read.
    pub file_fd: Option<i32>,
    /// The fd was seen being created by KVM_CREATE_DEVICE(VFIO) (false: created before the
    /// agent started, or passed in; judged all the same).
    pub device_fd_known: bool,
}

/// An enumeration written in audit records (serde) and used as a metric label or log field
/// (`label()`), from one list.
macro_rules! text_enum {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $var:ident => $label:literal,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $label)] $var,)+
        }
        impl $name {
            #[allow(dead_code, reason = "not every enumeration is listed outside the tests")]
            pub const ALL: &'static [$name] = &[$($name::$var),+];
            pub const fn label(self) -> &'static str {
                match self { $($name::$var => $label,)+ }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.label())
            }
        }
    };
}

text_enum! {
    /// The kind of an audit record (`event`).
    pub enum RecordKind {
        IncoherentDma => "incoherent-dma",
        WbinvdStorm => "wbinvd-storm",
    }
}

text_enum! {
    /// An incoherent-DMA decision: the `decision` label of `ioasid_incoherent_dma_requests_total`.
    pub enum Decision {
        Allowed => "allowed",
        Audited => "audited",
        Denied => "denied",
    }
}

impl From<Action> for Decision {
    fn from(a: Action) -> Self {
        match a {
            Action::Allow => Decision::Allowed,
            Action::Audit => Decision::Audited,
            Action::Deny => Decision::Denied,
        }
    }
}

text_enum! {
    /// How a decision was carried out.
    pub enum Mechanism {
        /// BPF LSM returned -EPERM: the ioctl never ran.
        Lsm => "lsm",
        /// The kernel program sent SIGKILL at sys_enter.
        Sigkill => "sigkill",
        /// The kernel stopped the VMM and the agent decided.
        StopAsk => "stop-ask",
        /// Nothing was enforced (allowed, audited, or a dry run).
        None => "none",
    }
}

text_enum! {
    /// What happened to the request.
    pub enum Outcome {
        Completed => "completed",
        Killed => "killed",
        Blocked => "blocked",
        Resumed => "resumed",
        NotEnforced => "not-enforced",
        SignalFailed => "signal-failed",
        /// The process was gone when the agent's signal was sent.
        Gone => "gone",
    }
}

text_enum! {
    /// A storm alert's state change.
    pub enum StormState {
        Raised => "raised",
        Cleared => "cleared",
    }
}

text_enum! {
    /// What a storm alert did.
    pub enum StormOutcome {
        Alerted => "alerted",
        Stopped => "stopped",
        Killed => "killed",
        Cleared => "cleared",
        VmmExited => "vmm-exited",
        SignalFailed => "signal-failed",
    }
}

fn incoherent_dma() -> RecordKind {
    RecordKind::IncoherentDma
}

/// An incoherent-DMA decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// `incoherent-dma`.
    #[serde(default = "incoherent_dma")]
    pub event: RecordKind,
    /// RFC 3339, UTC.
    pub time: String,
    pub host: String,
    pub vm: String,
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub cgroup: Option<String>,
    pub uid: u32,
    pub request: Request,
    pub vfio: Option<VfioFile>,
    /// The kernel's own verdict (fexit vfio_file_enforced_coherent), where that hook loads.
    #[serde(default)]
    pub kernel_coherent: Option<bool>,
    /// Matched rule name, or `default`.
    pub rule: String,
    pub decision: Decision,
    pub mechanism: Mechanism,
    pub outcome: Outcome,
    /// The ioctl's return value, when it ran.
    pub ret: Option<i64>,
    pub reason: Option<String>,
    /// The policy file the decision came from.
    pub policy: String,
}

/// A WBINVD storm raised or cleared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StormRecord {
    /// `wbinvd-storm`.
    pub event: RecordKind,
    pub time: String,
    pub host: String,
    pub vm: String,
    pub pid: u32,
    pub rule: String,
    pub state: StormState,
    /// WBINVD per second over the window.
    pub rate: f64,
    /// Handler time over wall time over the window.
    pub cost_ratio: f64,
    pub budget_rate: f64,
    pub budget_cost_ratio: f64,
    pub window_seconds: f64,
    pub action: crate::policy::StormAction,
    pub outcome: StormOutcome,
    /// Why a signal failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub policy: String,
}

impl AuditRecord {
    /// The process as the policy saw it (for replay).
    pub fn process(&self) -> ProcessInfo {
        ProcessInfo {
            pid: self.pid,
            comm: self.comm.clone(),
            vm: self.vm.clone(),
            exe: self.exe.clone(),
            cgroup: self.cgroup.clone(),
            uid: self.uid,
            start_time: 0,
        }
    }
}

#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Vec<u8>>,
    /// `ioasid_audit_records_dropped_total`.
    dropped: IntCounter,
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

impl AuditLog {
    /// Opens (creating directories) and starts the writer task. Fails now if the file cannot be
    /// opened, rather than losing records later.
    pub fn start(path: &Path, dropped: IntCounter) -> Result<Self, AuditError> {
        let open_err = |source| AuditError::Open { path: path.to_path_buf(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(open_err)?;
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        let path = path.to_path_buf();
        let lost = dropped.clone();
        tokio::task::spawn_blocking(move || {
            let mut failing = false;
            while let Some(mut line) = rx.blocking_recv() {
                line.push(b'\n');
                match append(&mut file, &line) {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!(path = %path.display(), "audit log writable again");
                    }
                    Ok(()) => {}
                    Err(e) => {
                        // Counted every time, logged once per episode (a full disk fails them all).
                        lost.inc();
                        if !failing {
                            failing = true;
                            tracing::error!(path = %path.display(), error = %e, "writing the audit log: records are being dropped (ioasid_audit_records_dropped_total)");
                        }
                    }
                }
            }
        });
        Ok(Self { tx, dropped })
    }

    /// Logs the decision and queues the record.
    pub fn record(&self, rec: AuditRecord) {
        tracing::info!(
            vm = %crate::text::escape(&rec.vm), pid = rec.pid, rule = %rec.rule, decision = %rec.decision,
            mechanism = %rec.mechanism, outcome = %rec.outcome, "incoherent-DMA enable"
        );
        self.record_quiet(rec);
    }

    /// Queues the record without a log line (a second sink, e.g. `--record`).
    pub fn record_quiet(&self, rec: AuditRecord) {
        self.write(&rec);
    }

    /// Queues any record as one JSON line.
    pub fn write<T: Serialize>(&self, rec: &T) {
        let line = match serde_json::to_vec(rec) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "serializing an audit record");
                return;
            }
        };
        if let Err(e) = self.tx.try_send(line) {
            let n = self.dropped.get();
            self.dropped.inc();
            if n.is_power_of_two() || n == 0 {
                tracing::error!(dropped_total = n + 1, error = %e, "audit queue full: record dropped");
            }
        }
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

/// RFC 3339 UTC with microseconds, without a date library.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn time_format() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_730_951_123_456);
        assert_eq!(rfc3339(t), "2026-11-26T22:09:11.123456Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn labels_are_the_serialized_forms() {
        fn check<T: Serialize + std::fmt::Display>(all: &[T]) {
            for v in all {
                assert_eq!(serde_json::to_string(v).unwrap(), format!("\"{v}\""));
            }
        }
        check(RecordKind::ALL);
        check(Decision::ALL);
        check(Mechanism::ALL);
        check(Outcome::ALL);
        check(StormState::ALL);
        check(StormOutcome::ALL);
    }

    #[tokio::test]
    async fn writes_lines_and_counts_drops() {
        let dir = std::env::temp_dir().join(format!("ioasid-audit-{}", std::process::id()));
        let path = dir.join("sub/audit.jsonl");
        let dropped = IntCounter::new("dropped", "test").unwrap();
        let log = AuditLog::start(&path, dropped.clone()).unwrap();
        let rec = AuditRecord {
            event: RecordKind::IncoherentDma,
            time: rfc3339(SystemTime::now()),
            host: "h".into(),
            vm: "gpu-1".into(),
            pid: 7,
            comm: "qemu".into(),
            exe: None,
            cgroup: None,
            uid: 0,
            request: Request {
                ioctl: "KVM_SET_DEVICE_ATTR".into(),
                attr: "KVM_DEV_VFIO_FILE_ADD".into(),
                fd: 5,
                file_fd: Some(6),
                device_fd_known: true,
            },
            vfio: None,
            kernel_coherent: None,
            rule: "default".into(),
            decision: Decision::Audited,
            mechanism: Mechanism::None,
            outcome: Outcome::Completed,
            ret: Some(-22),
            reason: None,
            policy: "<embedded default>".into(),
        };
        log.record(rec.clone());
        drop(log);
        for _ in 0..100 {
            if std::fs::read_to_string(&path).map(|s| s.lines().count()).unwrap_or(0) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let back: AuditRecord = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(back, rec);
        assert!(AuditLog::start(Path::new("/proc/nope/audit.jsonl"), dropped.clone()).is_err());
        assert_eq!(dropped.get(), 0);
        // A device that is always full: every record is counted as dropped, none is lost silently.
        let full = AuditLog::start(Path::new("/dev/full"), dropped.clone()).unwrap();
        for _ in 0..3 {
            full.record(rec.clone());
        }
        drop(full);
        for _ in 0..100 {
            if dropped.get() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(dropped.get(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
