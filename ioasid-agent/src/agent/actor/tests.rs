//! The event loop's decisions against a fake kernel boundary: real policy, real procfs and
//! sysfs fixture trees, real metrics and audit files; only the kernel's maps and signals are
//! stood in for.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    time::Duration,
};

use ioasid_common::{
    counters::{Op, Path, Stat, STATS_LEN},
    events::Coherency,
    verdict::{Asked, Decision, Mechanism as KernelMechanism, VmVerdict, RULE_DEFAULT},
};

use super::*;
use crate::{
    engine::accounting::{CostHist, Totals},
    engine::events::{EnableRequest, KernelJudged, RuleRef},
    engine::policy::Action,
    engine::ports::{FlushCpus, MapError, ProgramStats},
    host::sys::Signal,
};

#[derive(Default)]
struct FakeKernel {
    counters: HashMap<u32, Totals>,
    noncoherent: HashSet<u32>,
    marked: HashSet<u32>,
    verdicts: HashMap<u32, VmVerdict>,
    asks: HashMap<u32, Asked>,
    stats: Stats,
    forgotten: Vec<u32>,
    signals: Vec<(u32, Signal)>,
    files: HashMap<(u32, i32), Coherency>,
    cmdlines: HashMap<u32, Vec<u8>>,
}

// The fake keys by pid alone (start 0), as the programs do where the kernel's layout is not
// known; keying by start is tested on the accounting and with the real programs.
impl Kernel for FakeKernel {
    fn counters(&mut self) -> HashMap<(u32, u64), Totals> {
        self.counters.iter().map(|(t, v)| ((*t, 0), v.clone())).collect()
    }
    fn cost(&mut self) -> HashMap<(u32, u64), CostHist> {
        HashMap::new()
    }
    fn flush_cpus(&mut self) -> FlushCpus {
        FlushCpus::default()
    }
    fn stats(&mut self) -> Stats {
        self.stats
    }
    fn noncoherent(&mut self) -> HashSet<(u32, u64)> {
        self.noncoherent.union(&self.marked).map(|t| (*t, 0)).collect()
    }
    fn mark_noncoherent(&mut self, tgid: u32, _start: u64) -> Result<(), MapError> {
        self.marked.insert(tgid);
        Ok(())
    }
    fn unmark_noncoherent(&mut self, tgid: u32) {
        self.marked.remove(&tgid);
    }
    fn set_verdict(&mut self, tgid: u32, verdict: VmVerdict) -> Result<(), MapError> {
        self.verdicts.insert(tgid, verdict);
        Ok(())
    }
    fn set_file_coherency(&mut self, tgid: u32, _start: u64, fd: i32, c: Coherency) -> Result<(), MapError> {
        self.files.insert((tgid, fd), c);
        Ok(())
    }
    fn asks(&mut self) -> Vec<(u32, Asked)> {
        self.asks.iter().map(|(t, a)| (*t, *a)).collect()
    }
    fn take_ask(&mut self, tgid: u32, ktime_ns: u64) -> bool {
        match self.asks.get(&tgid) {
            Some(a) if a.ktime_ns == ktime_ns => self.asks.remove(&tgid).is_some(),
            _ => false,
        }
    }
    fn cmdline(&self, tgid: u32) -> Option<(Vec<u8>, u64)> {
        self.cmdlines.get(&tgid).map(|c| (c.clone(), 0))
    }
    fn forget(&mut self, tgid: u32, _start: u64) {
        // As the real kernel's: the process's entries go (a new process on the pid starts anew).
        self.counters.remove(&tgid);
        self.forgotten.push(tgid);
    }
    fn program_stats(&self) -> Vec<ProgramStats> {
        Vec::new()
    }
    fn signal(&mut self, pid: u32, _start_time: u64, sig: Signal) -> std::io::Result<()> {
        self.signals.push((pid, sig));
        Ok(())
    }
}

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ioasid-actor-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("proc")).unwrap();
        std::fs::create_dir_all(dir.join("sys")).unwrap();
        Self { dir }
    }

    /// A VMM process in the procfs tree, named by `-name guest=VM`, started 10 ms after boot
    /// (before any request a test makes: see [`T0`]).
    fn vmm(&self, pid: u32, vm: &str) {
        self.process(pid, vm, 'S', 1);
    }

    /// A process in state `state` started `start` clock ticks after boot.
    fn process(&self, pid: u32, vm: &str, state: char, start: u64) {
        let p = self.dir.join("proc").join(pid.to_string());
        std::fs::create_dir_all(p.join("fd")).unwrap();
        let stat = format!("{pid} (qemu) {state} 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0");
        std::fs::write(p.join("stat"), stat).unwrap();
        std::fs::write(p.join("comm"), "qemu\n").unwrap();
        std::fs::write(p.join("cmdline"), format!("qemu\0-name\0guest={vm},debug-threads=on\0")).unwrap();
        std::fs::write(p.join("status"), "Name:\tqemu\nUid:\t107\t107\t107\t107\n").unwrap();
    }

    fn actor(&self, policy: &str) -> Actor<FakeKernel> {
        self.actor_with(policy, true)
    }

    fn actor_with(&self, policy: &str, enforce: bool) -> Actor<FakeKernel> {
        let path = self.dir.join("policy.yaml");
        std::fs::write(&path, policy).unwrap();
        let metrics = Metrics::new();
        let audit = AuditLog::start(&self.dir.join("audit.jsonl"), metrics.audit_counters()).unwrap();
        let settings = Settings {
            procfs: ProcFs::at(self.dir.join("proc")),
            sysfs: SysFs::at(self.dir.join("sys")),
            host: "h".into(),
            retention: Duration::from_secs(60),
            sweep_interval: Duration::from_millis(100),
            enforce,
        };
        let store = PolicyStore::open(Some(&path)).unwrap();
        Actor::new(FakeKernel::default(), settings, store, metrics, audit, None)
    }

    /// The audit records written so far (waits for the writer up to a second for `n`).
    async fn audit(&self, n: usize) -> Vec<serde_json::Value> {
        for _ in 0..100 {
            let text = std::fs::read_to_string(self.dir.join("audit.jsonl")).unwrap_or_default();
            let recs: Vec<serde_json::Value> =
                text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            if recs.len() >= n {
                return recs;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("fewer than {n} audit records");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const POLICY: &str = "default: { incoherent_dma: audit }\nrules:\n  - name: gpu\n    match: { vm: \"gpu-*\" }\n    incoherent_dma: allow\n  - name: tenants\n    match: { vm: \"tenant-*\" }\n    incoherent_dma: deny\n    wbinvd: { rate: 100, action: kill }\n";

/// The kernel's clock when the tests' requests are made: 1 s after boot, after the fixture's
/// VMMs started.
const T0: u64 = 1_000_000_000;

fn ask(tgid: u32) -> EnableRequest {
    let mut r = EnableRequest::from_ask(tgid, &Asked { ktime_ns: T0 + 1, fd: 5, file_fd: 6 });
    r.origin.comm = "qemu".into();
    r.device_fd_known = true;
    r
}

/// A stopped VMM's ask, recorded in the (fake) kernel as the real one records it.
fn open_ask(a: &mut Actor<FakeKernel>, tgid: u32) -> EnableRequest {
    a.kernel().asks.insert(tgid, Asked { ktime_ns: T0 + 1, fd: 5, file_fd: 6 });
    ask(tgid)
}

fn sample(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = String::from_utf8(m.encode()).unwrap();
    crate::output::promtext::parse(&text)
        .into_iter()
        .find(|s| {
            s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

#[tokio::test]
async fn an_asked_enable_is_decided_once_by_the_policy() {
    let f = Fixture::new("ask");
    f.vmm(4242, "tenant-1");
    f.vmm(4243, "gpu-1");
    let mut a = f.actor(POLICY);
    let (r1, r2) = (open_ask(&mut a, 4242), open_ask(&mut a, 4243));
    a.on_event(Event::Enable(r1));
    a.on_event(Event::Enable(r2));
    assert_eq!(a.kernel().signals, vec![(4242, Signal::Kill), (4243, Signal::Cont)]);
    assert!(a.kernel().asks.is_empty(), "the kernel's ask record is done with");
    // The verdicts are now in the kernel, so the next FILE_ADD is decided there.
    let v = a.kernel().verdicts[&4242];
    assert_eq!((Decision::try_from(v.decision), v.rule, v.generation), (Ok(Decision::Deny), 1, 1));
    assert_eq!(Decision::try_from(a.kernel().verdicts[&4243].decision), Ok(Decision::Allow));
    let recs = f.audit(2).await;
    assert_eq!((recs[0]["vm"].as_str(), recs[0]["outcome"].as_str()), (Some("tenant-1"), Some("killed")));
    assert_eq!(
        (recs[1]["decision"].as_str(), recs[1]["outcome"].as_str()),
        (Some("allowed"), Some("resumed"))
    );
    let m = &a.metrics;
    let requests = "ioasid_incoherent_dma_requests_total";
    assert_eq!(sample(m, requests, &[("vm", "tenant-1"), ("decision", "denied")]), Some(1.0));
    assert_eq!(sample(m, requests, &[("vm", "tenant-1"), ("decision", "allowed")]), Some(0.0));
    // Nothing is left to recover: no second decision for the same request.
    a.recover_asks(0);
    assert_eq!(a.kernel().signals.len(), 2);
}

#[tokio::test]
async fn a_pid_taken_by_another_process_is_never_signalled() {
    let f = Fixture::new("reused");
    // tenant-9 asked at T0, then died while no agent ran; innocent-db started on its pid 2 s
    // after boot, after the request.
    f.process(4900, "innocent-db", 'S', 200);
    // gpu-2 was killed during its ask: a zombie its parent has not reaped yet.
    f.process(4901, "gpu-2", 'Z', 1);
    let mut a = f.actor(POLICY);
    // What the kernel captured when each created its VM.
    a.kernel().cmdlines.insert(4900, b"qemu\0-name\0guest=tenant-9,debug-threads=on\0".to_vec());
    a.kernel().cmdlines.insert(4901, b"qemu\0-name\0guest=gpu-2\0".to_vec());
    let (r1, r2) = (open_ask(&mut a, 4900), open_ask(&mut a, 4901));
    a.on_event(Event::Enable(r1));
    a.on_event(Event::Enable(r2));
    assert_eq!(a.kernel().signals, vec![], "nothing sent to a process that did not ask");
    assert!(!a.kernel().verdicts.contains_key(&4900), "no verdict for the innocent process");
    assert!(a.kernel().asks.is_empty(), "both requests decided");
    let recs = f.audit(2).await;
    let got = |r: &serde_json::Value| {
        (
            r["vm"].as_str().map(String::from),
            r["decision"].as_str().map(String::from),
            r["outcome"].as_str().map(String::from),
        )
    };
    let s = |x: &str| Some(x.to_string());
    // Judged as what asked (the command line the kernel captured), not as the pid's process.
    assert_eq!(got(&recs[0]), (s("tenant-9"), s("denied"), s("gone")), "{}", recs[0]);
    assert!(recs[0]["reason"].as_str().unwrap().contains("started after the request"), "{}", recs[0]);
    assert_eq!(got(&recs[1]), (s("gpu-2"), s("allowed"), s("gone")), "{}", recs[1]);
    assert!(recs[1]["reason"].as_str().unwrap().contains("zombie"), "{}", recs[1]);
}

#[tokio::test]
async fn a_lost_ask_is_decided_from_the_kernel_record() {
    let f = Fixture::new("lost");
    f.vmm(4300, "tenant-7");
    let mut a = f.actor(POLICY);
    a.started_ns = 0; // the ask is this agent's own
    a.kernel().asks.insert(4300, Asked { ktime_ns: T0, fd: 9, file_fd: -1 });
    a.sweep();
    assert_eq!(a.kernel().signals, vec![(4300, Signal::Kill)]);
    let recs = f.audit(1).await;
    assert_eq!(recs[0]["reason"].as_str(), Some("event lost; decided from the kernel's ask record"));
    assert_eq!(recs[0]["request"]["file_fd"], serde_json::Value::Null);
    assert_eq!(recs[0]["request"]["fd"], 9);
}

#[tokio::test]
async fn a_kernel_verdict_is_audited_without_a_signal() {
    let f = Fixture::new("verdict");
    f.vmm(4400, "web-1");
    let mut a = f.actor(POLICY);
    let mut req = ask(4400);
    req.judged = KernelJudged::Verdict { action: Action::Audit, rule: RuleRef::Default, generation: 1 };
    req.mechanism = KernelMechanism::None;
    req.signal_sent = false;
    req.ret = Some(0);
    req.kernel_coherent = Some(false);
    a.on_event(Event::Enable(req));
    assert!(a.kernel().signals.is_empty());
    assert_eq!(a.kernel().verdicts[&4400].rule, RULE_DEFAULT);
    // It succeeded with a device the kernel says is not coherent: the VM's WBINVD now flush.
    assert!(a.kernel().marked.contains(&4400));
    a.sweep();
    assert_eq!(sample(&a.metrics, "ioasid_vm_noncoherent", &[("vm", "web-1")]), Some(1.0));
    assert_eq!(sample(&a.metrics, "ioasid_noncoherent_vms", &[]), Some(1.0));
    let recs = f.audit(1).await;
    assert_eq!(
        (recs[0]["decision"].as_str(), recs[0]["kernel_coherent"].as_bool()),
        (Some("audited"), Some(false))
    );
}

#[tokio::test]
async fn a_sweep_names_vms_counts_and_detects_a_storm() {
    let f = Fixture::new("sweep");
    f.vmm(4500, "tenant-9");
    let mut a = f.actor(POLICY);
    let totals = |n: u64| Totals::from([((Op::Wbinvd, Path::Exit), n), ((Op::Wbinvd, Path::Flushed), n)]);
    a.kernel().counters.insert(4500, totals(10));
    a.kernel().noncoherent.insert(4500);
    a.sweep();
    assert!(a.kernel().verdicts.contains_key(&4500), "a VMM first seen by its counters gets its verdict");
    let m = a.metrics.clone();
    let exits = &[("vm", "tenant-9"), ("path", "exit")];
    assert_eq!(sample(&m, "ioasid_wbinvd_exits_total", exits), Some(10.0));
    assert_eq!(sample(&m, "ioasid_wbinvd_flushes_total", &[("vm", "tenant-9")]), Some(10.0));
    assert_eq!(sample(&m, "ioasid_vm_noncoherent", &[("vm", "tenant-9")]), Some(1.0));
    // 10,000 more within the window against a 100/s kill budget.
    a.kernel().counters.insert(4500, totals(10_010));
    a.sweep();
    assert_eq!(a.kernel().signals, vec![(4500, Signal::Kill)]);
    assert_eq!(sample(&m, "ioasid_wbinvd_storm", &[("vm", "tenant-9")]), Some(1.0));
    assert_eq!(sample(&m, "ioasid_dos_alerts_total", &[("vm", "tenant-9")]), Some(1.0));
    let recs = f.audit(1).await;
    assert_eq!(
        (recs[0]["event"].as_str(), recs[0]["outcome"].as_str()),
        (Some("wbinvd-storm"), Some("killed"))
    );
    // The process is gone: its final counts stay, its kernel entries go.
    std::fs::remove_dir_all(f.dir.join("proc/4500")).unwrap();
    for _ in 0..10 {
        a.sweep();
    }
    assert_eq!(a.kernel().forgotten, vec![4500]);
    assert_eq!(sample(&m, "ioasid_wbinvd_exits_total", exits), Some(10_010.0));
    assert_eq!(sample(&m, "ioasid_vms", &[]), Some(0.0));
}

/// A VMM that storms and exits between two sweeps is never seen alive; one seen alive exits
/// before its storm's counts were read. Both storms are recorded from the final counts, raised
/// (nothing left to act on) then over, judged by the policy's budget for them.
#[tokio::test]
async fn a_storm_is_recorded_however_short_the_vmms_life() {
    let f = Fixture::new("short");
    f.vmm(4510, "tenant-late");
    let mut a = f.actor(POLICY);
    let storm = Totals::from([((Op::Wbinvd, Path::Exit), 5_000)]);
    a.kernel().counters.insert(4510, Totals::from([((Op::Wbinvd, Path::Exit), 1)]));
    // Sweeps 1-10: only the 11th checks liveness again (once a second at 100 ms).
    for _ in 0..10 {
        a.sweep();
    }
    // Never seen alive: gone before /proc was read, named from what the kernel captured.
    a.kernel().cmdlines.insert(4511, b"qemu\0-name\0guest=tenant-brief\0".to_vec());
    a.kernel().counters.insert(4511, storm.clone());
    // Seen alive, quiet; its storm's counts and its exit come together.
    a.kernel().counters.insert(4510, storm);
    std::fs::remove_dir_all(f.dir.join("proc/4510")).unwrap();
    a.sweep();
    assert_eq!(a.kernel().signals, vec![], "nothing is left to signal");
    let recs = f.audit(4).await;
    for vm in ["tenant-brief", "tenant-late"] {
        let got: Vec<_> = recs
            .iter()
            .filter(|r| r["event"] == "wbinvd-storm" && r["vm"] == vm)
            .map(|r| {
                (r["state"].as_str().unwrap(), r["outcome"].as_str().unwrap(), r["rule"].as_str().unwrap())
            })
            .collect();
        assert_eq!(
            got,
            vec![("raised", "vmm-exited", "tenants"), ("cleared", "vmm-exited", "tenants")],
            "{vm}: {recs:?}"
        );
    }
    assert_eq!(sample(&a.metrics, "ioasid_dos_alerts_total", &[("vm", "tenant-brief")]), Some(1.0));
    assert_eq!(sample(&a.metrics, "ioasid_vms", &[]), Some(0.0));
}

/// A VMM adds its device moments after it was first seen: the decision's record names it as
/// libvirt's status does (OpenStack's name, project, user, flavor) once that status was read,
/// without waiting for the next sweep to apply it.
#[tokio::test]
async fn a_decision_names_the_vm_as_libvirts_status_read_since_does() {
    let f = Fixture::new("nova");
    f.vmm(4242, "instance-0000002a");
    let run = f.dir.join("libvirt");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("instance-0000002a.xml"), crate::host::libvirt::tests::STATUS).unwrap();
    let mut a = f.actor(POLICY);
    a.set_libvirt(crate::host::libvirt::Reader::start(run).unwrap());
    // First seen by its counters: its libvirt status is asked for.
    a.kernel().counters.insert(4242, Totals::from([((Op::Wbinvd, Path::Exit), 1)]));
    a.sweep();
    assert!(a.libvirt.as_mut().unwrap().wait(Duration::from_secs(10)), "libvirt's status was read");
    let req = open_ask(&mut a, 4242);
    a.on_event(Event::Enable(req));
    let recs = f.audit(1).await;
    let got = ["manager", "name", "project", "user", "flavor"].map(|k| recs[0][k].as_str().unwrap_or(""));
    assert_eq!(got, ["openstack", "gpu-train-7", "ml-research", "alice", "g1.a100x1"], "{}", recs[0]);
}

#[tokio::test]
async fn kernel_statistics_become_counters() {
    let f = Fixture::new("stats");
    let mut a = f.actor(POLICY);
    let mut stats = [0u64; STATS_LEN as usize];
    stats[Stat::EventsDropped as usize] = 3;
    stats[Stat::SignalErrors as usize] = 2;
    a.kernel().stats = stats;
    a.sweep();
    a.sweep();
    assert_eq!(sample(&a.metrics, "ioasid_events_dropped_total", &[]), Some(3.0));
    assert_eq!(sample(&a.metrics, "ioasid_kernel_errors_total", &[("kind", "signal_error")]), Some(2.0));
    assert_eq!(sample(&a.metrics, "ioasid_kernel_errors_total", &[("kind", "read_error")]), Some(0.0));
}

#[tokio::test]
async fn a_reload_rejudges_running_vms_and_a_bad_file_changes_nothing() {
    let f = Fixture::new("reload");
    f.vmm(4600, "gpu-3");
    let mut a = f.actor(POLICY);
    let r = open_ask(&mut a, 4600);
    a.on_event(Event::Enable(r));
    assert_eq!(Decision::try_from(a.kernel().verdicts[&4600].decision), Ok(Decision::Allow));
    // Caught mid-write: a file that changes between two checks is not applied.
    std::fs::write(f.dir.join("policy.yaml"), "default: { incoherent_dma: d").unwrap();
    a.watch_policy_file();
    std::fs::write(f.dir.join("policy.yaml"), "default: { incoherent_dma: deny }\n").unwrap();
    a.watch_policy_file();
    assert_eq!(a.kernel().verdicts[&4600].generation, 1, "applied only once stable");
    a.watch_policy_file();
    let v = a.kernel().verdicts[&4600];
    assert_eq!((Decision::try_from(v.decision), v.generation), (Ok(Decision::Deny), 2));
    std::fs::write(f.dir.join("policy.yaml"), "default: { incoherent_dma: maybe }\n").unwrap();
    a.watch_policy_file();
    a.watch_policy_file();
    assert_eq!(a.kernel().verdicts[&4600].generation, 2, "the last good policy stays");
    assert_eq!(sample(&a.metrics, "ioasid_policy_reloads_total", &[("result", "failure")]), Some(1.0));
    assert_eq!(sample(&a.metrics, "ioasid_policy_reloads_total", &[("result", "success")]), Some(1.0));
    // The policy in force, by the SHA-256 of its bytes: one series, the good one.
    let text = a.metrics.encode();
    let text = String::from_utf8_lossy(&text);
    let info: Vec<&str> = text.lines().filter(|l| l.starts_with("ioasid_policy_info{")).collect();
    assert_eq!(info.len(), 1, "{info:?}");
    let want = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(b"default: { incoherent_dma: deny }\n");
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    assert!(info[0].contains(&format!("sha256=\"{want}\"")) && info[0].contains("rules=\"0\""), "{info:?}");
}

#[tokio::test]
async fn a_coherent_file_is_observed_never_judged() {
    let f = Fixture::new("coherent");
    f.vmm(4700, "tenant-coh");
    let mut a = f.actor(POLICY);
    // Stopped to ask (the kernel did not know the file); the kernel's own verdict: coherent.
    let mut req = open_ask(&mut a, 4700);
    req.kernel_coherent = Some(true);
    req.ret = Some(0);
    a.on_event(Event::Enable(req));
    assert_eq!(a.kernel().signals, vec![(4700, Signal::Cont)], "resumed, not killed");
    assert!(a.kernel().marked.is_empty(), "a coherent file never makes the VM non-coherent");
    let m = &a.metrics;
    let adds = sample(m, "ioasid_vfio_file_adds_total", &[("vm", "tenant-coh"), ("coherency", "coherent")]);
    assert_eq!(adds, Some(1.0));
    let denied =
        sample(m, "ioasid_incoherent_dma_requests_total", &[("vm", "tenant-coh"), ("decision", "denied")]);
    assert_eq!(denied, Some(0.0), "not an incoherent-DMA enable");
    let recs = f.audit(1).await;
    assert_eq!(
        (recs[0]["event"].as_str(), recs[0]["coherency"].as_str()),
        (Some("vfio-file-add"), Some("coherent"))
    );
}

#[tokio::test]
async fn a_late_event_never_decides_a_request_twice() {
    let f = Fixture::new("late");
    f.vmm(4800, "tenant-8");
    f.vmm(4801, "gpu-8");
    let mut a = f.actor(POLICY);
    // The agent stalled: both asks are recovered from the kernel's records first...
    a.kernel().asks.insert(4800, Asked { ktime_ns: T0, fd: 5, file_fd: 6 });
    a.kernel().asks.insert(4801, Asked { ktime_ns: T0, fd: 5, file_fd: 6 });
    a.recover_asks(0);
    assert_eq!(a.kernel().signals.len(), 2);
    // ...then their late events arrive: nothing more is sent, counted or written.
    for tgid in [4800, 4801] {
        let mut late = ask(tgid);
        late.origin.ktime_ns = T0;
        a.on_event(Event::Enable(late));
    }
    assert_eq!(a.kernel().signals.len(), 2, "a stale event decides nothing");
    // A stale event of an older request never takes a newer request's record either.
    a.kernel().asks.insert(4801, Asked { ktime_ns: T0 + 50, fd: 5, file_fd: 6 });
    let mut stale = ask(4801);
    stale.origin.ktime_ns = T0 + 10;
    a.on_event(Event::Enable(stale));
    assert!(a.kernel().asks.contains_key(&4801), "the newer ask stays open for its own decision");
    let m = &a.metrics;
    let denied =
        sample(m, "ioasid_incoherent_dma_requests_total", &[("vm", "tenant-8"), ("decision", "denied")]);
    assert_eq!(denied, Some(1.0), "one count per request");
    assert_eq!(f.audit(2).await.len(), 2, "one record per request");
}

#[tokio::test]
async fn an_ask_left_by_a_previous_agent_is_decided_at_start_and_says_so() {
    let f = Fixture::new("adopted");
    f.vmm(4310, "gpu-2");
    let mut a = f.actor(POLICY);
    // Asked before this agent started: found in the pinned map.
    a.kernel().asks.insert(4310, Asked { ktime_ns: T0 + 1, fd: 9, file_fd: -1 });
    a.recover_asks(0);
    assert_eq!(a.kernel().signals, vec![(4310, Signal::Cont)]);
    assert!(a.kernel().asks.is_empty());
    let recs = f.audit(1).await;
    assert_eq!(
        (recs[0]["decision"].as_str(), recs[0]["outcome"].as_str()),
        (Some("allowed"), Some("resumed"))
    );
    assert!(recs[0]["reason"].as_str().unwrap().contains("before this agent started"), "{}", recs[0]);
}

/// A dry-run agent kills nothing: a denied VMM an enforcing agent left stopped is resumed,
/// audited as denied and not enforced.
#[tokio::test]
async fn a_dry_run_resumes_a_denied_vmm_left_stopped() {
    let f = Fixture::new("dryrun");
    f.vmm(4320, "tenant-3");
    let mut a = f.actor_with(POLICY, false);
    a.kernel().asks.insert(4320, Asked { ktime_ns: T0 + 1, fd: 9, file_fd: -1 });
    a.recover_asks(0);
    assert_eq!(a.kernel().signals, vec![(4320, Signal::Cont)]);
    let recs = f.audit(1).await;
    assert_eq!(
        (recs[0]["decision"].as_str(), recs[0]["outcome"].as_str()),
        (Some("denied"), Some("not-enforced")),
        "{}",
        recs[0]
    );
}

/// A stopped VMM whose /proc cannot be read (here a directory where its cmdline should be:
/// EISDIR, as EMFILE would be, not "gone") is never judged by a fallback name: it is held, its
/// ask left open in the kernel; once readable it is judged by its real name; if it stays
/// unreadable past the limit it is denied and killed.
#[tokio::test]
async fn an_unreadable_vmm_is_held_then_denied_never_judged_by_a_fallback_name() {
    let f = Fixture::new("unreadable");
    let cmdline = |pid: u32| f.dir.join(format!("proc/{pid}/cmdline"));
    let unreadable = |pid: u32| {
        std::fs::remove_file(cmdline(pid)).unwrap();
        std::fs::create_dir(cmdline(pid)).unwrap();
    };
    // The policy allows gpu-*, and its default only audits: a fallback name would be let through.
    f.vmm(4400, "tenant-9");
    f.vmm(4401, "tenant-10");
    unreadable(4400);
    unreadable(4401);
    let mut a = f.actor(POLICY);
    a.started_ns = 0;
    let now = crate::host::sys::monotonic_ns();
    a.kernel().asks.insert(4400, Asked { ktime_ns: now - 1_000_000_000, fd: 9, file_fd: -1 });
    a.kernel().asks.insert(4401, Asked { ktime_ns: now - 1_000_000_000, fd: 9, file_fd: -1 });
    a.sweep();
    assert!(a.kernel().signals.is_empty(), "held, not judged: {:?}", a.kernel().signals);
    assert_eq!(a.kernel().asks.len(), 2, "the asks stay open in the kernel");
    // 4401 becomes readable: judged by its real name (denied by the tenants rule).
    std::fs::remove_dir(cmdline(4401)).unwrap();
    std::fs::write(cmdline(4401), "qemu\0-name\0guest=tenant-10\0").unwrap();
    a.sweep();
    assert_eq!(a.kernel().signals, vec![(4401, Signal::Kill)]);
    // 4400 stays unreadable past the limit: denied, failing closed.
    let old = now - enable::UNCLASSIFIED_LIMIT_NS - 1;
    a.kernel().asks.insert(4400, Asked { ktime_ns: old, fd: 9, file_fd: -1 });
    a.sweep();
    assert_eq!(a.kernel().signals, vec![(4401, Signal::Kill), (4400, Signal::Kill)]);
    assert!(a.kernel().asks.is_empty());
    let recs = f.audit(2).await;
    let r = recs.iter().find(|r| r["pid"] == 4400).unwrap();
    assert_eq!(
        (r["decision"].as_str(), r["outcome"].as_str(), r["rule"].as_str()),
        (Some("denied"), Some("killed"), Some("unclassified")),
        "{r}"
    );
    assert!(r["reason"].as_str().unwrap().contains("could not be classified"), "{r}");
    let r = recs.iter().find(|r| r["pid"] == 4401).unwrap();
    assert_eq!((r["vm"].as_str(), r["rule"].as_str()), (Some("tenant-10"), Some("tenants")), "{r}");
}
