//! `ioasid-agent run`: the daemon.
//!
//! Tasks: a ring buffer reader (AsyncFd -> decode -> bounded queue, drops counted), the HTTP
//! endpoint, the audit writer, and one actor that owns the loaded object and its maps. The actor
//! takes events, periodic sweeps, scrape refreshes, SIGHUP and policy-file changes, one at a
//! time, so no map or state is shared between tasks.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use ioasid_common::{
    self as common, CostKey, CounterKey, FdKey, IoctlEvent, TransitionEvent, VmVerdict, KVM_CREATE_DEVICE,
    KVM_CREATE_VM, STATS_LEN,
};
use tokio::{
    io::unix::AsyncFd,
    net::TcpListener,
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot},
};

use crate::{
    accounting::{Accounting, Totals},
    audit::{hostname, rfc3339, AuditLog, StormRecord, EVENT_WBINVD_STORM},
    enforce::{self, Followup},
    events::{self, Event},
    http,
    loader::{self, HookState, LoadOptions},
    policy::{Policy, StormAction},
    procfs::{ProcFs, ProcessInfo},
    storm::{Detector, Transition},
    telemetry::{CostHist, Metrics, KERNEL_ERROR_KINDS},
    vfio::{self, SysFs},
};

const EVENT_QUEUE: usize = 4096;

/// Per-VM gauges, summed over the VM's live processes each sweep.
#[derive(Default)]
struct VmGauges {
    rate: f64,
    cost_ratio: f64,
    storm: bool,
    noncoherent: bool,
}
/// An ask older than this without its event is taken as lost (events arrive in microseconds).
const LOST_ASK_NS: u64 = 500_000_000;

/// CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub listen: SocketAddr,
    pub policy: Option<PathBuf>,
    pub audit_log: PathBuf,
    pub record: Option<PathBuf>,
    pub enforce: bool,
    pub optional_hooks: bool,
    pub sweep: Duration,
    pub retention: Duration,
    pub ready_file: Option<PathBuf>,
    pub lock_file: PathBuf,
    pub bpf_stats: bool,
    pub ioctl_hooks: loader::IoctlHooks,
    /// Tests only: discard every ring buffer event (as a full queue would), to exercise the
    /// paths that must not depend on events.
    pub test_drop_events: bool,
}

/// Requests to the actor.
pub enum Cmd {
    /// Sweep the kernel counters now (a scrape wants fresh values), then answer.
    Refresh(oneshot::Sender<()>),
}

struct State {
    // Dropping the object detaches every program: it lives as long as the actor.
    _ebpf: aya::Ebpf,
    counters: PerCpuHashMap<MapData, CounterKey, u64>,
    stats: PerCpuArray<MapData, u64>,
    vm_policy: BpfHashMap<MapData, u32, VmVerdict>,
    kvm_devices: BpfHashMap<MapData, FdKey, u32>,
    procfs: ProcFs,
    sysfs: SysFs,
    policy: Policy,
    generation: u32,
    policy_path: Option<PathBuf>,
    policy_hash: Option<u64>,
    acct: Accounting,
    metrics: Metrics,
    audit: AuditLog,
    record: Option<AuditLog>,
    host: String,
    retention: Duration,
    stats_seen: [u64; STATS_LEN as usize],
    /// Non-coherent DMA registrations per `struct kvm *` (opaque), from fentry.
    noncoherent: HashMap<u64, i64>,
    cost: PerCpuHashMap<MapData, CostKey, u64>,
    asked: BpfHashMap<MapData, u32, common::Asked>,
    flush_cpus: PerCpuArray<MapData, u64>,
    /// tgid -> 1: VMMs whose WBINVD really flush (the kernel counts their flushes).
    noncoherent_tgids: BpfHashMap<MapData, u32, u32>,
    detector: Detector,
    sweep_interval: Duration,
    sweeps: u64,
    /// (hook label, program name) of attached hooks, when BPF run-time stats are on.
    stats_hooks: Vec<(&'static str, &'static str)>,
    /// Keeps kernel BPF run-time statistics enabled while the agent runs.
    _bpf_stats: Option<std::os::fd::OwnedFd>,
}

fn take<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).with_context(|| format!("the object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
}

/// One enforcing agent per host: two would both judge (and stop, resume or kill) the same VMMs.
/// Held with flock(2) on `path` for the life of the process; the file names the holder's pid.
fn lock_host(path: &Path) -> Result<std::fs::File> {
    use std::{io::Write, os::fd::AsRawFd};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(path).unwrap_or_default();
        anyhow::bail!(
            "another ioasid-agent (pid {}) is running on this host (lock {}): only one may judge the host's VMMs",
            holder.trim(),
            path.display()
        );
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

pub async fn run(cfg: RunConfig) -> Result<()> {
    let _lock = lock_host(&cfg.lock_file)?;
    let metrics = Metrics::new();
    let (policy, policy_hash) = match &cfg.policy {
        Some(path) => {
            let p = Policy::load(path)?;
            tracing::info!(policy = %path.display(), rules = p.rule_count(), default = p.default.decision(), "policy loaded");
            (p, file_hash(path))
        }
        None => {
            tracing::info!("no --policy given: running the embedded default policy (audit every incoherent-DMA enable, deny nothing)");
            (Policy::embedded(), None)
        }
    };
    let audit = AuditLog::start(&cfg.audit_log, metrics.clone())?;
    let record = cfg.record.as_deref().map(|p| AuditLog::start(p, metrics.clone())).transpose()?;

    let mut loaded = loader::load(LoadOptions {
        enforce: cfg.enforce,
        optional_hooks: cfg.optional_hooks,
        ioctl_hooks: cfg.ioctl_hooks,
        strict: true,
    })?;
    for h in &loaded.hooks {
        match &h.state {
            HookState::Attached => {
                tracing::info!(hook = h.spec.hook, optional = h.spec.optional, "hook attached")
            }
            HookState::Refused(why) => {
                tracing::warn!(hook = h.spec.hook, optional = h.spec.optional, reason = %why, "hook refused by the kernel")
            }
            HookState::Standby(by) => {
                tracing::info!(hook = h.spec.hook, serving = by, "hook on standby: an alternative serves")
            }
        }
        metrics.hook_attached.with_label_values(&[h.spec.hook]).set(i64::from(h.attached()));
    }
    let mechanism = mechanism_name(cfg.enforce, loaded.lsm_attached());
    for m in ["lsm", "sigkill", "none"] {
        metrics.enforcement_mechanism.with_label_values(&[m]).set(i64::from(m == mechanism));
    }
    tracing::info!(mechanism, "incoherent-DMA enforcement");
    let (_, cost_source) = loaded.cost_source();
    for s in ["handlers", "tracepoint-pairs"] {
        metrics.wbinvd_cost_source.with_label_values(&[s]).set(i64::from(s == cost_source));
    }
    tracing::info!(source = cost_source, "WBINVD handler time source");

    let bpf_stats = if cfg.bpf_stats {
        match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(error = %e, "could not enable BPF run-time statistics");
                None
            }
        }
    } else {
        None
    };
    let stats_hooks = if bpf_stats.is_some() {
        loaded.hooks.iter().filter(|h| h.attached()).map(|h| (h.spec.hook, h.spec.program)).collect()
    } else {
        Vec::new()
    };
    start_kernel_log(&mut loaded.ebpf);
    let ebpf = &mut loaded.ebpf;
    let ring: RingBuf<MapData> = take(ebpf, common::MAP_EVENTS)?;
    let cost = take(ebpf, common::MAP_COST)?;
    let asked = take(ebpf, common::MAP_ASKED)?;
    let flush_cpus = take(ebpf, common::MAP_FLUSH_CPUS)?;
    let noncoherent_tgids = take(ebpf, common::MAP_NONCOHERENT)?;
    let mut state = State {
        counters: take(ebpf, common::MAP_COUNTERS)?,
        stats: take(ebpf, common::MAP_STATS)?,
        vm_policy: take(ebpf, common::MAP_VM_POLICY)?,
        kvm_devices: take(ebpf, common::MAP_KVM_DEVICES)?,
        _ebpf: loaded.ebpf,
        procfs: ProcFs::default(),
        sysfs: SysFs::default(),
        policy,
        generation: 1,
        policy_path: cfg.policy.clone(),
        policy_hash,
        acct: Accounting::default(),
        metrics: metrics.clone(),
        audit,
        record,
        host: hostname(),
        retention: cfg.retention,
        stats_seen: [0; STATS_LEN as usize],
        noncoherent: HashMap::new(),
        cost,
        asked,
        flush_cpus,
        noncoherent_tgids,
        detector: Detector::default(),
        sweep_interval: cfg.sweep,
        sweeps: 0,
        stats_hooks,
        _bpf_stats: bpf_stats,
    };

    let listener =
        TcpListener::bind(cfg.listen).await.with_context(|| format!("listening on {}", cfg.listen))?;
    let local = listener.local_addr()?;
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Cmd>(64);
    tokio::spawn(http::serve(listener, cmd_tx, metrics.clone()));
    tracing::info!(listen = %local, "serving /metrics");

    let (ev_tx, mut ev_rx) = mpsc::channel::<Event>(EVENT_QUEUE);
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf, and
    // always returns that same fd.
    let reader = unsafe { AsyncFd::register(ring) }
        .map_err(|e| e.into_parts().1)
        .context("polling the ring buffer")?;
    tokio::spawn(read_events(reader, ev_tx, metrics.clone(), cfg.test_drop_events));

    // Classify VMMs that were running before the agent started, from the counters they have.
    state.sweep();
    if let Some(path) = &cfg.ready_file {
        std::fs::write(path, local.to_string()).with_context(|| format!("writing {}", path.display()))?;
    }

    let mut tick = tokio::time::interval(cfg.sweep);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            Some(ev) = ev_rx.recv() => state.on_event(ev),
            Some(cmd) = cmd_rx.recv() => match cmd {
                Cmd::Refresh(done) => {
                    state.sweep();
                    let _ = done.send(());
                }
            },
            _ = tick.tick() => state.sweep(),
            _ = watch.tick() => state.watch_policy_file(),
            _ = hup.recv() => state.reload("SIGHUP"),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Queued events first, then any ask still open: no VMM stays stopped behind a restart.
    while let Ok(ev) = ev_rx.try_recv() {
        state.on_event(ev);
    }
    state.recover_asks(0);
    tracing::info!("shutting down: detaching every hook");
    Ok(())
}

/// Forwards the kernel programs' aya-log records (enforcement actions, signal failures) into
/// the agent's log, under the `ioasid_ebpf` target.
fn start_kernel_log(ebpf: &mut aya::Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "kernel-side log unavailable");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd owns the logger.
    let registered =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered.map_err(|e| e.into_parts().1) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "kernel-side log unavailable");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else { return };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

pub fn mechanism_name(enforce: bool, lsm: bool) -> &'static str {
    match (enforce, lsm) {
        (false, _) => "none",
        (true, true) => "lsm",
        (true, false) => "sigkill",
    }
}

/// Ring buffer -> decode -> bounded queue. A full queue drops the event and counts it.
async fn read_events(
    mut fd: AsyncFd<RingBuf<MapData>>,
    tx: mpsc::Sender<Event>,
    metrics: Metrics,
    drop_all: bool,
) {
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "ring buffer poll failed; no more events");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match events::decode(&item) {
                Ok(ev) => {
                    if drop_all || tx.try_send(ev).is_err() {
                        metrics.events_dropped.inc();
                    }
                }
                Err(e) => {
                    let n = metrics.event_decode_errors.get();
                    metrics.event_decode_errors.inc();
                    if n.is_power_of_two() || n == 0 {
                        tracing::warn!(error = %e, "undecodable ring buffer record");
                    }
                }
            }
        }
        guard.clear_ready();
    }
}

fn file_hash(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

fn signal_process(pid: u32, sig: i32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill(2) with a checked pid and a valid signal number.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl State {
    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Ioctl(ev) => self.on_ioctl(&ev),
            Event::Noncoherent(ev) => self.on_transition(&ev),
        }
    }

    /// Names the process and writes its verdict into the kernel, once per process.
    fn classify(&mut self, tgid: u32, comm: Option<&str>) -> ProcessInfo {
        let known = self.acct.procs.contains_key(&tgid);
        let info = self.acct.ensure(tgid, comm, &self.procfs, Instant::now()).info.clone();
        if !known {
            self.on_new_process(&info);
        }
        info
    }

    /// Once per VMM process: its verdict into the kernel, and its non-coherent state if it
    /// already holds VFIO devices.
    fn on_new_process(&mut self, info: &ProcessInfo) {
        self.write_verdict(info);
        self.discover_noncoherent(info.pid);
    }

    /// Marks a VMM non-coherent, in the kernel (so its WBINVD count as flushes) and here.
    fn mark_noncoherent(&mut self, tgid: u32) {
        if let Err(e) = self.noncoherent_tgids.insert(tgid, 1, 0) {
            tracing::warn!(pid = tgid, error = %e, "marking the VM non-coherent");
        }
        if let Some(p) = self.acct.procs.get_mut(&tgid) {
            p.noncoherent = true;
        }
    }

    /// A VMM first seen already holding a VFIO device its IOMMU does not keep coherent (added
    /// before the agent started) has non-coherent DMA: its WBINVD flush.
    fn discover_noncoherent(&mut self, tgid: u32) {
        let files = vfio::held(&self.procfs, &self.sysfs, tgid);
        let Some(f) = files.iter().find(|f| vfio::makes_noncoherent(f)) else { return };
        tracing::info!(pid = tgid, device = %f.path, coherency = ?f.coherency, "VM already holds a non-coherent VFIO device");
        self.mark_noncoherent(tgid);
    }

    fn write_verdict(&mut self, info: &ProcessInfo) {
        if info.start_time == 0 {
            return; // gone before it was named: nothing to judge
        }
        let verdict = self.policy.evaluate(info);
        // Per-VM counters start at zero when the VM is first seen, so that rate() and
        // increase() in Prometheus see its first incoherent-DMA request or storm alert.
        for d in ["allowed", "audited", "denied"] {
            self.metrics.incoherent_dma_requests.with_label_values(&[&info.vm, d]);
        }
        self.metrics.dos_alerts.with_label_values(&[&info.vm]);
        if let Some(p) = self.acct.procs.get_mut(&info.pid) {
            p.budget = verdict.budget;
            p.rule = verdict.rule_name.clone();
        }
        let kv = enforce::kernel_verdict(&verdict, self.generation);
        if let Err(e) = self.vm_policy.insert(info.pid, kv, 0) {
            tracing::error!(pid = info.pid, vm = %info.vm, error = %e, "writing the verdict map; FILE_ADD from this VM will be stopped and asked");
        } else {
            tracing::debug!(pid = info.pid, vm = %info.vm, rule = %verdict.rule_name, action = verdict.action.decision(), "verdict compiled into the kernel");
        }
    }

    fn on_ioctl(&mut self, ev: &IoctlEvent) {
        let tgid = ev.header.tgid;
        let comm = events::comm(&ev.header.comm);
        self.metrics.ioctls.with_label_values(&[events::request_name(ev.cmd)]).inc();
        if ev.cmd == KVM_CREATE_VM || ev.cmd == KVM_CREATE_DEVICE {
            let info = self.classify(tgid, Some(&comm));
            tracing::debug!(pid = tgid, vm = %info.vm, request = events::request_name(ev.cmd), ret = ev.ret, "VMM ioctl");
        }
        if !enforce::is_enable(ev.decision) {
            tracing::debug!(pid = tgid, comm = %comm, request = events::request_name(ev.cmd), group = ev.attr_group, attr = ev.attr_attr, ret = ev.ret, "watched ioctl");
            return;
        }
        self.decide(ev, None);
    }

    /// Judges one incoherent-DMA enable, carries out what is left to do, audits it.
    fn decide(&mut self, ev: &IoctlEvent, note: Option<&str>) {
        let tgid = ev.header.tgid;
        let comm = events::comm(&ev.header.comm);
        let info = if ev.decision == common::DECISION_ASK {
            // Decided now, from any source: the kernel's ask record is done with.
            let _ = self.asked.remove(&tgid);
            // The kernel stopped the process: judge it on what it is now.
            match self.procfs.info(tgid) {
                Ok(info) => {
                    self.acct.replace(info.clone());
                    self.write_verdict(&info);
                    info
                }
                Err(_) => self.classify(tgid, Some(&comm)),
            }
        } else {
            self.classify(tgid, Some(&comm))
        };
        let vfio = (ev.flags & common::IOCTL_F_FILE_FD_READ != 0)
            .then(|| vfio::resolve(&self.procfs, &self.sysfs, tgid, ev.file_fd));
        let cx = enforce::Context {
            policy: &self.policy,
            generation: self.generation,
            host: &self.host,
            time: rfc3339(SystemTime::now()),
        };
        let j = enforce::judge(ev, &info, vfio, &cx);
        let sig = match j.followup {
            Followup::None => None,
            Followup::Continue => Some(libc::SIGCONT),
            Followup::Kill => Some(libc::SIGKILL),
        };
        let mut record = j.record;
        if let Some(note) = note {
            record.reason = Some(note.to_string());
        }
        if let Some(sig) = sig {
            if let Err(e) = signal_process(tgid, sig) {
                record.outcome = "gone".into();
                record.reason = Some(format!("signal {sig}: {e}"));
            }
        }
        self.metrics.incoherent_dma_requests.with_label_values(&[&info.vm, j.action.decision()]).inc();
        // A device the IOMMU does not keep coherent was really added: from now on KVM really
        // executes this VM's WBINVD. (Where the fentry hooks load, the kernel says so itself.)
        let added = record.ret == Some(0) && j.action != crate::policy::Action::Deny;
        // The kernel's own verdict where fexit vfio_file_enforced_coherent loads, else sysfs's.
        let coherent = record.kernel_coherent.unwrap_or_else(|| {
            record.vfio.as_ref().is_some_and(|v| v.coherency == vfio::Coherency::Enforced)
        });
        if added && !coherent {
            self.mark_noncoherent(tgid);
        }
        if let Some(r) = &self.record {
            r.record_quiet(record.clone());
        }
        self.audit.record(record);
    }

    fn on_transition(&mut self, ev: &TransitionEvent) {
        let n = self.noncoherent.entry(ev.kvm).or_insert(0);
        *n += if ev.register == 1 { 1 } else { -1 };
        let still = *n > 0;
        if !still {
            self.noncoherent.remove(&ev.kvm);
        }
        let info = self.classify(ev.header.tgid, Some(&events::comm(&ev.header.comm)));
        if let Some(p) = self.acct.procs.get_mut(&ev.header.tgid) {
            p.noncoherent = still;
        }
        tracing::info!(vm = %info.vm, pid = ev.header.tgid, register = ev.register == 1, "KVM non-coherent DMA transition");
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        // Liveness costs a procfs read per VMM: about once a second is enough for lifecycle.
        let every = (1000 / self.sweep_interval.as_millis().max(1)).max(1) as u64;
        let full = self.sweeps.is_multiple_of(every);
        self.sweeps += 1;
        if full {
            for tgid in self.acct.check_liveness(&self.procfs, now) {
                // A VMM that exits ends its storm: say so, so raised/cleared records pair up.
                if self.detector.window(tgid).is_some_and(|w| w.storm) {
                    self.on_storm(tgid, Transition::Exited);
                }
                self.detector.forget(tgid);
            }
        }
        let (kernel, mut keys) = self.read_counters();
        let cost = self.read_cost();
        let before: std::collections::HashSet<u32> = self.acct.procs.keys().copied().collect();
        self.acct.apply(kernel, &self.procfs, now);
        self.acct.apply_cost(cost, &self.procfs, now);
        let new: Vec<ProcessInfo> = self
            .acct
            .procs
            .iter()
            .filter(|(t, p)| !before.contains(t) && p.alive())
            .map(|(_, p)| p.info.clone())
            .collect();
        for info in new {
            self.on_new_process(&info);
        }
        for tgid in self.acct.take_newly_dead() {
            for k in keys.remove(&tgid).unwrap_or_default() {
                let _ = self.counters.remove(&k);
            }
            for bucket in (0..=common::COST_BUCKETS_NS.len() as u32).chain([common::COST_SUM]) {
                let _ = self.cost.remove(&CostKey { tgid, bucket });
            }
            let _ = self.vm_policy.remove(&tgid);
            let _ = self.noncoherent_tgids.remove(&tgid);
            let stale: Vec<FdKey> =
                self.kvm_devices.keys().filter_map(Result::ok).filter(|k| k.tgid == tgid).collect();
            for k in stale {
                let _ = self.kvm_devices.remove(&k);
            }
        }
        if full {
            self.acct.expire(self.retention, now);
        }
        self.recover_asks(LOST_ASK_NS);
        self.acct.export(&self.metrics);
        self.detect_storms(now);
        self.export_flush_cpus();
        self.export_stats();
        self.export_program_stats();
    }

    /// Decides for processes the kernel stopped to ask whose event never arrived (ring buffer
    /// full, or dropped): no VMM stays stopped. The kernel's ask record carries the fds.
    fn recover_asks(&mut self, older_than_ns: u64) {
        let now = monotonic_ns();
        let stale: Vec<(u32, common::Asked)> = self
            .asked
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, a)| now.saturating_sub(a.ktime_ns) >= older_than_ns)
            .collect();
        for (tgid, a) in stale {
            // SAFETY: all-zero is valid for this plain-integer type.
            let mut ev: IoctlEvent = unsafe { std::mem::zeroed() };
            ev.header.kind = common::EVENT_IOCTL;
            ev.header.ktime_ns = a.ktime_ns;
            ev.header.tgid = tgid;
            ev.header.tid = tgid;
            ev.cmd = common::KVM_SET_DEVICE_ATTR;
            ev.fd = a.fd;
            ev.file_fd = a.file_fd;
            ev.rule = u32::MAX;
            ev.decision = common::DECISION_ASK;
            ev.mechanism = common::MECH_STOP_ASK;
            ev.flags =
                common::IOCTL_F_SIGNAL_SENT | if a.file_fd >= 0 { common::IOCTL_F_FILE_FD_READ } else { 0 };
            tracing::warn!(
                pid = tgid,
                "a stopped VMM's FILE_ADD event never arrived: deciding from the kernel's ask record"
            );
            self.decide(&ev, Some("event lost; decided from the kernel's ask record"));
        }
    }

    /// Kernel WBINVD/INVD counts summed over CPUs and vCPUs, per tgid, and the keys per tgid.
    fn read_counters(&self) -> (HashMap<u32, Totals>, HashMap<u32, Vec<CounterKey>>) {
        let mut kernel: HashMap<u32, Totals> = HashMap::new();
        let mut keys: HashMap<u32, Vec<CounterKey>> = HashMap::new();
        for item in self.counters.iter() {
            match item {
                Ok((k, values)) => {
                    let sum: u64 = values.iter().sum();
                    *kernel.entry(k.tgid).or_default().entry((k.op, k.path)).or_insert(0) += sum;
                    keys.entry(k.tgid).or_default().push(k);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the counter map");
                    break;
                }
            }
        }
        (kernel, keys)
    }

    /// Kernel handler-time histograms summed over CPUs, per tgid.
    fn read_cost(&self) -> HashMap<u32, CostHist> {
        let mut out: HashMap<u32, CostHist> = HashMap::new();
        for item in self.cost.iter() {
            match item {
                Ok((k, values)) => {
                    let sum: u64 = values.iter().sum();
                    let h = out.entry(k.tgid).or_default();
                    match h.buckets.get_mut(k.bucket as usize) {
                        Some(b) => *b += sum,
                        None if k.bucket == common::COST_SUM => h.sum_ns += sum,
                        None => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the cost map");
                    break;
                }
            }
        }
        out
    }

    fn export_flush_cpus(&self) {
        let mut snap = [0u64; common::FLUSH_CPUS_LEN as usize];
        for (i, slot) in snap.iter_mut().enumerate() {
            if let Ok(v) = self.flush_cpus.get(&(i as u32), 0) {
                *slot = v.iter().sum();
            }
        }
        self.metrics.cost.lock().unwrap_or_else(|e| e.into_inner()).flush_cpus = snap;
    }

    /// Feeds each live VMM's totals to the detector, acts on alerts raised or cleared, and sets
    /// the per-VM gauges (rate, cost share, storm, non-coherent) in the same pass.
    fn detect_storms(&mut self, now: Instant) {
        let first = self.sweeps == 1;
        // Every tracked VM gets its gauges set; a VM whose processes all exited reads 0.
        let mut per_vm: HashMap<String, VmGauges> =
            self.acct.procs.values().map(|p| (p.info.vm.clone(), VmGauges::default())).collect();
        let mut changes = Vec::new();
        for (tgid, p) in self.acct.procs.iter().filter(|(_, p)| p.alive()) {
            let wbinvd = p.total(common::OP_WBINVD, &[common::PATH_EXIT, common::PATH_EMULATED]);
            if !self.detector.is_tracked(*tgid) {
                // A VMM that ran before the agent starts from what it has; one that appeared
                // since started from zero one sweep ago.
                if first {
                    self.detector.baseline(*tgid, now, wbinvd, p.cost.sum_ns);
                } else {
                    self.detector.baseline(*tgid, now - self.sweep_interval, 0, 0);
                }
            }
            if let Some(t) = self.detector.observe(*tgid, now, wbinvd, p.cost.sum_ns, &p.budget) {
                changes.push((*tgid, t));
            }
            let g = per_vm.entry(p.info.vm.clone()).or_default();
            // Live VMMs known to have non-coherent DMA: from the kernel's own transitions, a
            // successful FILE_ADD of a non-coherent device, or devices held when first seen.
            g.noncoherent |= p.noncoherent;
            if let Some(w) = self.detector.window(*tgid) {
                g.rate += w.rate;
                g.cost_ratio += w.cost_ratio;
                g.storm |= w.storm;
            }
        }
        for (vm, g) in &per_vm {
            self.metrics.wbinvd_rate.with_label_values(&[vm]).set(g.rate);
            self.metrics.wbinvd_cost_ratio.with_label_values(&[vm]).set(g.cost_ratio);
            self.metrics.wbinvd_storm.with_label_values(&[vm]).set(i64::from(g.storm));
            self.metrics.vm_noncoherent.with_label_values(&[vm]).set(i64::from(g.noncoherent));
        }
        self.metrics.noncoherent_vms.set(per_vm.values().filter(|g| g.noncoherent).count() as i64);
        for (tgid, t) in changes {
            self.on_storm(tgid, t);
        }
    }

    fn on_storm(&mut self, tgid: u32, t: Transition) {
        let Some(p) = self.acct.procs.get(&tgid) else { return };
        let w = self.detector.window(tgid).unwrap_or_default();
        let b = p.budget;
        let (state, outcome) = match t {
            Transition::Raised => {
                self.metrics.dos_alerts.with_label_values(&[&p.info.vm]).inc();
                let outcome = match b.action {
                    StormAction::Alert => "alerted".to_string(),
                    StormAction::Stop | StormAction::Kill => {
                        let (sig, done) = if b.action == StormAction::Kill {
                            (libc::SIGKILL, "killed")
                        } else {
                            (libc::SIGSTOP, "stopped")
                        };
                        match signal_process(tgid, sig) {
                            Ok(()) => done.to_string(),
                            Err(e) => format!("signal-failed: {e}"),
                        }
                    }
                };
                tracing::warn!(
                    vm = %p.info.vm, pid = tgid, rate = w.rate, cost_ratio = w.cost_ratio, budget_rate = b.rate,
                    budget_cost_ratio = b.cost_ratio, action = b.action.as_str(), outcome = %outcome, "WBINVD storm"
                );
                ("raised", outcome)
            }
            Transition::Cleared => {
                tracing::info!(vm = %p.info.vm, pid = tgid, rate = w.rate, cost_ratio = w.cost_ratio, "WBINVD storm cleared");
                ("cleared", "cleared".to_string())
            }
            Transition::Exited => {
                tracing::info!(vm = %p.info.vm, pid = tgid, "WBINVD storm over: the VMM exited");
                ("cleared", "vmm-exited".to_string())
            }
        };
        self.audit.write(&StormRecord {
            event: EVENT_WBINVD_STORM.into(),
            time: rfc3339(SystemTime::now()),
            host: self.host.clone(),
            vm: p.info.vm.clone(),
            pid: tgid,
            rule: p.rule.clone(),
            state: state.into(),
            rate: w.rate,
            cost_ratio: w.cost_ratio,
            budget_rate: b.rate,
            budget_cost_ratio: b.cost_ratio,
            window_seconds: b.window.as_secs_f64(),
            action: b.action.as_str().into(),
            outcome,
            policy: self.policy.source.clone(),
        });
    }

    /// In-kernel cost of each attached program (run count and total run time), when enabled.
    fn export_program_stats(&self) {
        for (hook, program) in &self.stats_hooks {
            let Some(info) = self._ebpf.program(program).and_then(|p| p.info().ok()) else { continue };
            let runs = self.metrics.program_runs.with_label_values(&[hook]);
            let time = self.metrics.program_run_seconds.with_label_values(&[hook]);
            runs.inc_by(info.run_count().saturating_sub(runs.get()));
            let secs = info.run_time().as_secs_f64();
            if secs > time.get() {
                time.inc_by(secs - time.get());
            }
        }
    }

    fn export_stats(&mut self) {
        for i in 0..STATS_LEN {
            let Ok(values) = self.stats.get(&i, 0) else {
                continue;
            };
            let total: u64 = values.iter().sum();
            let seen = &mut self.stats_seen[i as usize];
            if total > *seen {
                let delta = total - *seen;
                *seen = total;
                if i == common::Stat::EventsDropped as u32 {
                    self.metrics.events_dropped.inc_by(delta);
                    tracing::warn!(
                        dropped = delta,
                        "kernel ring buffer full: events dropped (counters stay exact)"
                    );
                } else if let Some(kind) = KERNEL_ERROR_KINDS.get(i as usize - 1) {
                    self.metrics.kernel_errors.with_label_values(&[kind]).inc_by(delta);
                }
            }
        }
    }

    fn watch_policy_file(&mut self) {
        let Some(path) = &self.policy_path else {
            return;
        };
        let h = file_hash(path);
        if h.is_some() && h != self.policy_hash {
            self.policy_hash = h;
            self.reload("file changed");
        }
    }

    fn reload(&mut self, why: &str) {
        let Some(path) = self.policy_path.clone() else {
            tracing::info!(
                trigger = why,
                "reload requested; running the embedded default policy, nothing to reload"
            );
            return;
        };
        match Policy::load(&path) {
            Ok(p) => {
                self.policy_hash = file_hash(&path);
                self.policy = p;
                self.generation += 1;
                let live: Vec<ProcessInfo> = self
                    .acct
                    .procs
                    .values()
                    .filter(|p| p.dead_since.is_none())
                    .map(|p| p.info.clone())
                    .collect();
                for info in &live {
                    self.write_verdict(info);
                }
                self.metrics.policy_reloads.with_label_values(&["success"]).inc();
                tracing::info!(trigger = why, policy = %path.display(), generation = self.generation, rules = self.policy.rule_count(), vms = live.len(), "policy reloaded");
            }
            Err(e) => {
                self.metrics.policy_reloads.with_label_values(&["failure"]).inc();
                tracing::error!(trigger = why, error = %e, "policy reload rejected; the last good policy stays in force");
            }
        }
    }
}
