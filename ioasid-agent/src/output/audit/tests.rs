use super::*;
use std::{path::PathBuf, time::Duration};

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
    check(Coherency::ALL);
}

fn log_instance(text: &str) -> std::sync::Arc<str> {
    let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    v["id"].as_str().unwrap().rsplit_once('-').unwrap().0.into()
}

fn record(pid: u32, decision: Decision) -> AuditRecord {
    AuditRecord {
        event: RecordKind::IncoherentDma,
        time: rfc3339(SystemTime::now()),
        host: "h".into(),
        vm: "gpu-1".into(),
        identity: VmIdentity::default(),
        pid,
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
        coherency: None,
        rule: "default".into(),
        decision,
        mechanism: Mechanism::None,
        outcome: Outcome::Completed,
        ret: Some(-22),
        reason: None,
        policy: "<embedded default>".into(),
    }
}

#[tokio::test]
async fn writes_lines_and_counts_drops() {
    let dir = std::env::temp_dir().join(format!("ioasid-audit-{}", std::process::id()));
    let path = dir.join("sub/audit.jsonl");
    let counters = crate::output::telemetry::Metrics::new().audit_counters();
    let dropped = counters.dropped.with_label_values(&["file"]);
    let log = AuditLog::start(&path, counters.clone()).unwrap();
    let rec = record(7, Decision::Audited);
    log.record(rec.clone());
    log.record(rec.clone());
    drop(log);
    for _ in 0..100 {
        if std::fs::read_to_string(&path).map(|s| s.lines().count()).unwrap_or(0) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let back: AuditRecord = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(back, rec);
    // Each record leads with its schema and a unique id: this agent's random instance and the
    // record's number (consecutive: a gap would be a record lost).
    let ids: Vec<String> = text
        .lines()
        .map(|l| {
            assert!(l.starts_with(&format!("{{\"schema\":{SCHEMA},\"id\":\"")), "{l}");
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    let (a, b) = (ids[0].rsplit_once('-').unwrap(), ids[1].rsplit_once('-').unwrap());
    assert_eq!((a.0.len(), a.0, a.1, b.1), (36, b.0, "1", "2"), "{ids:?}");
    let other = AuditLog::start(&dir.join("other.jsonl"), counters.clone()).unwrap();
    assert_ne!(other.instance, log_instance(&text), "each agent start has its own instance id");
    assert!(AuditLog::start(Path::new("/proc/nope/audit.jsonl"), counters.clone()).is_err());
    assert_eq!(dropped.get(), 0);
    // A device that is always full: every record is counted as dropped, none is lost silently.
    let full = AuditLog::start(Path::new("/dev/full"), counters.clone()).unwrap();
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

#[tokio::test]
async fn a_rotated_or_removed_log_is_reopened() {
    let dir = std::env::temp_dir().join(format!("ioasid-audit-rotate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("audit.jsonl");
    let log = AuditLog::start(&path, crate::output::telemetry::Metrics::new().audit_counters()).unwrap();
    let lines = |p: &Path| std::fs::read_to_string(p).map(|s| s.lines().count()).unwrap_or(0);
    let wait = |p: PathBuf, n: usize| async move {
        for _ in 0..200 {
            if lines(&p) == n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    };
    log.write(&serde_json::json!({"n": 1}));
    assert!(wait(path.clone(), 1).await);
    // logrotate's default: rename, then the writer makes a new file at the path.
    std::fs::rename(&path, dir.join("audit.jsonl.1")).unwrap();
    log.write(&serde_json::json!({"n": 2}));
    assert!(wait(path.clone(), 1).await, "the record went to the renamed file");
    assert_eq!(lines(&dir.join("audit.jsonl.1")), 1);
    std::fs::remove_file(&path).unwrap();
    log.write(&serde_json::json!({"n": 3}));
    assert!(wait(path.clone(), 1).await, "a removed log is recreated");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Any JSON object is a record for these tests of the writer.
impl Auditable for serde_json::Value {
    fn event(&self) -> RecordKind {
        RecordKind::IncoherentDma
    }
    fn warning(&self) -> bool {
        false
    }
}

#[test]
fn the_envelope_leads_with_schema_and_id() {
    let rec = serde_json::json!({"event": "wbinvd-storm", "vm": "a"});
    let line = serde_json::to_string(&Envelope { schema: SCHEMA, id: "i-1".into(), record: &rec }).unwrap();
    assert_eq!(line, r#"{"schema":1,"id":"i-1","event":"wbinvd-storm","vm":"a"}"#);
}

fn lines_of(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A syslog daemon that never reads: the file still gets every record at once, syslog's losses
/// are counted under its own label, and closing the log takes a bounded time.
#[test]
fn a_hung_syslog_holds_back_no_other_sink_and_no_shutdown() {
    let dir = std::env::temp_dir().join(format!("ioasid-audit-hung-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("log.sock");
    // Bound, never read: its queue fills after a few hundred datagrams.
    let _hung = std::os::unix::net::UnixDatagram::bind(&socket).unwrap();
    let counters = crate::output::telemetry::Metrics::new().audit_counters();
    let path = dir.join("audit.jsonl");
    let syslog = Syslog { socket, host: "h".into() };
    let log = AuditLog::start_with(&path, counters.clone(), Some(syslog), None).unwrap();
    for pid in 0..2000 {
        log.record_quiet(record(pid, Decision::Denied));
    }
    let t = Instant::now();
    log.close(Duration::from_secs(5));
    assert!(t.elapsed() < Duration::from_secs(6), "closing waited {:?}", t.elapsed());
    assert_eq!(lines_of(&path).len(), 2000, "every record reached the file");
    assert_eq!(counters.dropped.with_label_values(&["file"]).get(), 0);
    let syslog_lost = counters.dropped.with_label_values(&["syslog"]).get();
    assert!(syslog_lost > 0 && syslog_lost < 2000, "syslog's losses counted as its own: {syslog_lost}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One process floods (20,000 requests in a burst) while three others are denied: their
/// records are all written, the flood past its burst is counted into one aggregated record.
#[test]
fn a_flood_never_pushes_out_another_vms_record() {
    let dir = std::env::temp_dir().join(format!("ioasid-audit-flood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let counters = crate::output::telemetry::Metrics::new().audit_counters();
    let path = dir.join("audit.jsonl");
    let log = AuditLog::start(&path, counters.clone()).unwrap();
    for i in 0..20_000u32 {
        log.record_quiet(record(66, Decision::Audited));
        if i % 5000 == 2500 {
            log.record_quiet(record(100 + i / 5000, Decision::Denied));
        }
    }
    log.flush_aggregated();
    log.close(Duration::from_secs(10));
    let recs = lines_of(&path);
    let denied: Vec<u64> =
        recs.iter().filter(|r| r["decision"] == "denied").map(|r| r["pid"].as_u64().unwrap()).collect();
    assert_eq!(denied, vec![100, 101, 102, 103], "every other VM's denial written");
    // The burst, plus what refilled while the loop ran (20 a second), one by one.
    let written = recs.iter().filter(|r| r["pid"] == 66 && r["event"] == "incoherent-dma").count() as u64;
    assert!((100..150).contains(&written), "the flood's burst written one by one: {written}");
    let agg: Vec<&serde_json::Value> =
        recs.iter().filter(|r| r["event"] == "incoherent-dma-aggregated").collect();
    assert_eq!(agg.len(), 1, "{agg:?}");
    assert_eq!(agg[0]["count"], 20_000 - written, "every other record of the flood counted");
    assert_eq!(agg[0]["decisions"]["audited/completed"], 20_000 - written);
    assert_eq!(counters.aggregated.get(), 20_000 - written);
    assert_eq!(counters.dropped.with_label_values(&["file"]).get(), 0, "nothing dropped");
    std::fs::remove_dir_all(&dir).unwrap();
}
