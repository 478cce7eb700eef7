//! The event loop's state and decisions. One actor owns the kernel boundary and takes, one at a
//! time, kernel events, periodic sweeps, scrape refreshes and policy reloads, so no map or
//! state is shared between tasks. It dispatches: enforcement decides (`enforce`), storms act
//! (`storm`), per-VM series live in `telemetry::vm`, the kernel is behind [`Kernel`].

mod enable;
/// A storm change of the VMM `p` (pid `tgid`), for its audit record.
fn storm_change(
    tgid: u32,
    p: &crate::engine::accounting::Proc,
    window: storm::Window,
    transition: Transition,
) -> StormChange<'_> {
    StormChange {
        pid: tgid,
        vm: &p.info.vm,
        identity: crate::output::audit::VmIdentity::of(&p.info),
        uid: p.info.uid,
        exe: p.info.exe.as_deref(),
        cgroup: p.info.cgroup.as_deref(),
        rule: &p.rule,
        budget: p.budget,
        window,
        transition,
        exited: !p.alive(),
    }
}

#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant, SystemTime},
};

use ioasid_common::counters::{Op, Path, Stat};

use crate::{
    engine::accounting::Accounting,
    engine::events::Event,
    engine::policy::Budget,
    engine::policy::{PolicyStore, StormAction},
    engine::ports::{Kernel, Stats},
    engine::record::{BlastRecord, RecordKind, StormOutcome, VmIdentity},
    engine::storm::{self, Detector, StormChange, Transition},
    host::procfs::{ProcFs, ProcessInfo},
    host::vfio::{self, SysFs, VfioKind},
    kernel::loader::EnforcementMechanism,
    output::audit::AuditLog,
    output::telemetry::{
        vm::{VmGauges, VmSeries},
        Metrics,
    },
    throttle::{
        controller::{Sample, Storming},
        Target,
    },
    util::text::escape,
    util::time::rfc3339,
};

/// An ask older than this without its event is taken as lost (events arrive in microseconds).
pub const LOST_ASK_NS: u64 = 500_000_000;

/// Where the actor looks and how it keeps time.
pub struct Settings {
    pub procfs: ProcFs,
    pub sysfs: SysFs,
    pub host: String,
    /// How long an exited VM stays reported.
    pub retention: Duration,
    pub sweep_interval: Duration,
    /// False for `--dry-run`: nothing is killed, and a VMM found stopped for a decision (a
    /// previous, enforcing agent's ask) is resumed.
    pub enforce: bool,
}

pub struct Actor<K: Kernel> {
    kernel: K,
    set: Settings,
    policy: PolicyStore,
    acct: Accounting,
    series: VmSeries,
    metrics: Metrics,
    detector: Detector,
    audit: AuditLog,
    /// `run --record`: every decision again, for `replay`.
    record: Option<AuditLog>,
    sweeps: u64,
    stats_seen: Stats,
    /// CLOCK_MONOTONIC when this agent started: an ask older than that was left open by a
    /// previous agent (adopted from the pinned maps).
    started_ns: u64,
    /// `action: throttle` (None: throttling is not available; the action then only alerts).
    throttler: Option<crate::throttle::Throttler>,
    /// Blast radius (None: the kernel lacks the hooks; its series stay absent).
    blast: Option<crate::engine::blast::Blast>,
    /// Reads libvirt's status of each new VMM's domain, off the event loop (None: not read).
    libvirt: Option<crate::host::libvirt::Reader>,
}

/// What the kernel captured of a process at VM creation, as the agent knows processes (for one
/// gone before /proc was read).
fn captured<K: Kernel>(kernel: &K) -> impl Fn(u32) -> Option<ProcessInfo> + '_ {
    |tgid| kernel.cmdline(tgid).and_then(|c| crate::host::procfs::info_from_captured(tgid, &c))
}

impl<K: Kernel> Actor<K> {
    pub fn new(
        kernel: K,
        set: Settings,
        policy: PolicyStore,
        metrics: Metrics,
        audit: AuditLog,
        record: Option<AuditLog>,
    ) -> Self {
        let actor = Self {
            kernel,
            set,
            policy,
            acct: Accounting::default(),
            series: VmSeries::new(metrics.clone()),
            metrics,
            detector: Detector::default(),
            audit,
            record,
            sweeps: 0,
            stats_seen: Stats::default(),
            started_ns: crate::host::sys::monotonic_ns(),
            throttler: None,
            blast: None,
            libvirt: None,
        };
        actor.export_policy_info();
        actor
    }

    /// `ioasid_policy_info{sha256, rules}`: exactly one series, the policy in force.
    fn export_policy_info(&self) {
        let info = &self.metrics.policy_info;
        info.reset();
        info.with_label_values(&[self.policy.sha256.as_str(), &self.policy.policy.rule_count().to_string()])
            .set(1);
    }

    /// Turns blast radius on (its hooks are attached).
    pub fn enable_blast(&mut self) {
        self.blast = Some(crate::engine::blast::Blast::default());
        self.series.enable_blast();
    }

    /// Reads libvirt's status of each new VMM's domain (OpenStack's identity) with `r`.
    pub fn set_libvirt(&mut self, r: crate::host::libvirt::Reader) {
        self.libvirt = Some(r);
    }

    /// What libvirt's status said of VMMs since the last sweep: their identity completed, in
    /// `ioasid_vm_info` and in the records from now on.
    fn apply_libvirt(&mut self) {
        let Some(r) = self.libvirt.as_mut() else { return };
        for found in r.answers() {
            let Some(p) = self.acct.procs.get_mut(&found.pid) else { continue };
            if p.info.start_time != found.start_time {
                continue; // another process on the pid since
            }
            p.info.managed.from_libvirt(found.domain.nova);
            if p.info.uuid.is_none() {
                p.info.uuid = found.domain.uuid;
            }
            let info = p.info.clone();
            tracing::info!(pid = info.pid, vm = %escape(&info.vm), manager = info.managed.manager.label(), "libvirt's status names this VMM");
            self.series.info(&info, &self.set.host);
        }
    }

    /// Enables `action: throttle`.
    pub fn set_throttler(&mut self, t: crate::throttle::Throttler) {
        self.throttler = Some(t);
    }

    /// Writes the last aggregated records and closes the audit sinks, waiting up to `within`.
    pub fn close_audit(&mut self, within: std::time::Duration) {
        for log in std::iter::once(&self.audit).chain(self.record.as_ref()) {
            log.flush_aggregated();
            log.close(within);
        }
    }

    /// Puts back every throttle in force (agent exit).
    pub fn release_throttles(&mut self) {
        if let Some(t) = self.throttler.as_mut() {
            t.stop_all();
        }
    }

    #[cfg(test)]
    pub fn kernel(&mut self) -> &mut K {
        &mut self.kernel
    }

    pub fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Ioctl(io) => {
                self.metrics.ioctls.with_label_values(&[io.request]).inc();
                if io.creates_vm_or_device {
                    let info = self.classify(io.origin.tgid, &io.origin.comm);
                    tracing::debug!(pid = info.pid, vm = %escape(&info.vm), request = io.request, ret = ?io.ret, "VMM ioctl");
                } else if io.vfio_file {
                    // A VFIO group or device fd in use: resolve it before the VMM adds it.
                    let f = vfio::resolve(&self.set.procfs, &self.set.sysfs, io.origin.tgid, io.fd);
                    self.learn_file(io.origin.tgid, io.fd, &f);
                } else if io.file_del && io.ret == Some(0) {
                    // The file the agent marked the VM non-coherent for has left it. (KVM's own
                    // registration count, where its hooks load, says whether others remain.)
                    self.kernel.unmark_noncoherent(io.origin.tgid);
                    tracing::info!(pid = io.origin.tgid, "VFIO file removed from the VM (FILE_DEL)");
                } else {
                    tracing::debug!(pid = io.origin.tgid, comm = %escape(&io.origin.comm), request = io.request, group = io.group, attr = io.attr, ret = ?io.ret, "watched ioctl");
                }
            }
            Event::Enable(req) => {
                self.metrics.ioctls.with_label_values(&["KVM_SET_DEVICE_ATTR"]).inc();
                self.decide(&req, None);
            }
            Event::Transition(t) => {
                let info = self.classify(t.origin.tgid, &t.origin.comm);
                tracing::info!(vm = %escape(&info.vm), pid = info.pid, register = t.register, kvm = t.kvm, "KVM non-coherent DMA transition");
            }
        }
    }

    /// Names the process and writes its verdict into the kernel, once per process.
    fn classify(&mut self, tgid: u32, comm: &str) -> ProcessInfo {
        let mut known = self.acct.procs.contains_key(&tgid);
        // Another process on a known pid (the known one died, its pid was taken before the
        // liveness check noticed): a VMM of its own, named and judged afresh.
        if let Some(p) = self.acct.procs.get(&tgid).filter(|p| p.info.start_time != 0) {
            let now = self.set.procfs.start_time(tgid).ok();
            if now.is_some_and(|st| st != p.info.start_time) {
                if let Ok(info) = self.set.procfs.info(tgid) {
                    tracing::debug!(pid = tgid, vm = %escape(&info.vm), "a new process on a known pid");
                    self.acct.replace(info);
                    known = false;
                }
            }
        }
        let kernel = &self.kernel;
        let captured =
            |t: u32| kernel.cmdline(t).and_then(|c| crate::host::procfs::info_from_captured(t, &c));
        let info =
            self.acct.ensure_with(tgid, Some(comm), &self.set.procfs, Instant::now(), &captured).info.clone();
        if !known {
            self.on_new_process(&info, false);
        }
        info
    }

    /// Once per VMM process: its verdict into the kernel, the coherency of the VFIO files it
    /// holds, and, for a VMM that ran before the agent started (`preexisting`), its
    /// non-coherent state: QEMU adds every VFIO file it holds to its VM, and those FILE_ADDs
    /// happened unseen. (A VMM that starts later is seen adding them.)
    fn on_new_process(&mut self, info: &ProcessInfo, preexisting: bool) {
        self.write_verdict(info);
        let files = vfio::held(&self.set.procfs, &self.set.sysfs, info.pid);
        for (fd, f) in &files {
            self.learn_file(info.pid, *fd, f);
        }
        if !preexisting {
            return;
        }
        if let Some((_, f)) = files.iter().find(|(_, f)| vfio::makes_noncoherent(f)) {
            tracing::info!(pid = info.pid, device = %escape(&f.path), coherency = ?f.coherency, "VM already holds a non-coherent VFIO device");
            self.mark_noncoherent(info.pid);
        }
    }

    /// Hands a VFIO file's coherency to the kernel, keyed by the fd the VMM holds it by, so a
    /// FILE_ADD of it is judged there with no round trip.
    fn learn_file(&mut self, tgid: u32, fd: i32, f: &vfio::VfioFile) {
        if !matches!(f.kind, VfioKind::Group | VfioKind::Cdev | VfioKind::Noiommu) {
            return;
        }
        let c = vfio::coherency(f);
        match self.kernel.set_file_coherency(tgid, self.start_of(tgid), fd, c) {
            Ok(()) => {
                tracing::debug!(pid = tgid, fd, path = %escape(&f.path), coherency = c.label(), "VFIO file resolved")
            }
            Err(e) => {
                tracing::warn!(pid = tgid, fd, error = %e, "handing a VFIO file's coherency to the kernel")
            }
        }
    }

    /// Marks a VMM non-coherent in the kernel (its WBINVD count as flushes); the kernel's maps
    /// are the one record of it, read back each sweep.
    /// The start of the process on `tgid` as the agent knows it (else as /proc says now; 0 if
    /// it is gone): with the pid, what the kernel keys its state by.
    fn start_of(&self, tgid: u32) -> u64 {
        match self.acct.procs.get(&tgid) {
            Some(p) if p.info.start_time != 0 => p.info.start_time,
            _ => self.set.procfs.start_time(tgid).unwrap_or(0),
        }
    }

    fn mark_noncoherent(&mut self, tgid: u32) {
        if let Err(e) = self.kernel.mark_noncoherent(tgid, self.start_of(tgid)) {
            tracing::warn!(pid = tgid, error = %e, "marking the VM non-coherent");
        }
        if let Some(p) = self.acct.procs.get_mut(&tgid) {
            p.noncoherent = true;
        }
    }

    fn write_verdict(&mut self, info: &ProcessInfo) {
        if info.start_time == 0 {
            return; // gone before it was named: nothing to judge
        }
        let verdict = self.policy.policy.evaluate(info);
        self.series.create(&info.vm);
        self.series.info(info, &self.set.host);
        if let Some(r) = self.libvirt.as_mut() {
            use crate::host::manager::Manager;
            if matches!(info.managed.manager, Manager::Qemu | Manager::Libvirt) {
                r.ask(crate::host::libvirt::Lookup {
                    pid: info.pid,
                    start_time: info.start_time,
                    domain: info.vm.clone(),
                    libvirt_cgroup: info.managed.manager == Manager::Libvirt,
                });
            }
        }
        if let Some(p) = self.acct.procs.get_mut(&info.pid) {
            p.budget = verdict.budget;
            p.rule = verdict.rule_name.clone();
        }
        match self.kernel.set_verdict(info.pid, verdict.to_kernel(self.policy.generation, info.start_time)) {
            Err(e) => {
                tracing::error!(pid = info.pid, vm = %escape(&info.vm), error = %e, "writing the verdict map; FILE_ADD from this VM will be stopped and asked")
            }
            Ok(()) => {
                tracing::debug!(pid = info.pid, vm = %escape(&info.vm), rule = %verdict.rule_name, action = ?verdict.action, "verdict compiled into the kernel")
            }
        }
    }

    /// At start: every process holding a KVM VM fd is a VMM, idle and stopped ones included
    /// (they may have no counter yet): named, its verdict in the kernel, its VFIO files'
    /// coherency handed over, its non-coherent state found. A stopped one with no open ask is
    /// reported (a storm `stop` action or an operator stopped it; it stays as it is).
    pub fn discover(&mut self) {
        let asked: HashSet<u32> = self.kernel.asks().into_iter().map(|(t, _)| t).collect();
        for pid in self.set.procfs.kvm_vmms() {
            if self.acct.procs.contains_key(&pid) {
                continue;
            }
            let info = match self.set.procfs.info(pid) {
                Ok(info) => info,
                Err(e) => {
                    tracing::debug!(pid, error = %e, "a VMM could not be read at start; its first counts will name it");
                    continue;
                }
            };
            self.acct.replace(info.clone());
            self.on_new_process(&info, true);
            let stopped = self.set.procfs.state(pid) == Some('T');
            if stopped && !asked.contains(&pid) {
                self.judge_found_stopped(&info);
            }
            tracing::info!(pid, vm = %escape(&info.vm), stopped, "VMM found at start");
        }
    }

    /// A VMM found stopped at start with no open ask this agent can read. If it holds a device
    /// that makes its VM non-coherent, its FILE_ADD ran and nothing this agent can read decided
    /// it (the kernel may have stopped it for an agent with another state directory): it is
    /// judged by the policy now, fail closed (denied: killed; else audited and left stopped,
    /// since an operator or a storm's `stop` may have stopped it). Otherwise it is reported.
    fn judge_found_stopped(&mut self, info: &ProcessInfo) {
        let pid = info.pid;
        let files = vfio::held(&self.set.procfs, &self.set.sysfs, pid);
        let Some((fd, _)) = files.iter().find(|(_, f)| vfio::makes_noncoherent(f)) else {
            tracing::warn!(pid, vm = %escape(&info.vm), "a VMM is stopped, and not for a decision this agent can read (an operator, a storm's `stop` action or an agent with another --state-dir stopped it); it holds no device that makes its VM non-coherent, so there is nothing to judge: resume it with kill -CONT when that is right");
            return;
        };
        tracing::warn!(pid, vm = %escape(&info.vm), "a VMM is stopped with incoherent DMA enabled and no decision this agent can read: judged by the policy now");
        let req = crate::engine::events::EnableRequest {
            origin: crate::engine::events::Origin {
                tgid: pid,
                comm: info.comm.clone(),
                ktime_ns: crate::host::sys::monotonic_ns(),
            },
            fd: -1,
            file_fd: Some(*fd),
            device_fd_known: false,
            judged: crate::engine::events::KernelJudged::Ask,
            mechanism: ioasid_common::verdict::Mechanism::StopAsk,
            signal_sent: true,
            ask_recorded: false,
            ret: None,
            kernel_coherent: None,
            file_coherency: ioasid_common::events::Coherency::Noncoherent,
        };
        let why = "found stopped with incoherent DMA enabled and no decision this agent can read (an ask left in another --state-dir, an operator or a storm's stop): judged now; left stopped unless denied";
        self.decide_as(&req, Some(why), false);
    }

    /// Reads the kernel's counters and brings every view up to date: lifecycle, accounting,
    /// lost asks, per-VM series, storms, host-wide statistics.
    pub fn sweep(&mut self) {
        let now = Instant::now();
        // Liveness costs a procfs read per VMM: about once a second is enough for lifecycle.
        let every = (1000 / self.set.sweep_interval.as_millis().max(1)).max(1) as u64;
        let full = self.sweeps.is_multiple_of(every);
        self.sweeps += 1;
        self.apply_libvirt();
        if full {
            // Marked dead now, settled once their final counts are read (`settle_exited`).
            self.acct.check_liveness(&self.set.procfs, now);
        }
        // A process is its pid and its start time: one on a reused pid is new.
        let before: HashSet<(u32, u64)> =
            self.acct.procs.iter().map(|(t, p)| (*t, p.info.start_time)).collect();
        let (counters, cost) = (self.kernel.counters(), self.kernel.cost());
        {
            let captured = captured(&self.kernel);
            self.acct.apply(counters, &self.set.procfs, now, &captured);
            self.acct.apply_cost(cost, &self.set.procfs, now, &captured);
        }
        let new: Vec<ProcessInfo> = self
            .acct
            .live()
            .filter(|(t, p)| !before.contains(&(**t, p.info.start_time)))
            .map(|(_, p)| p.info.clone())
            .collect();
        // The first sweep finds the VMMs that ran before the agent started.
        let preexisting = self.sweeps == 1;
        for info in new {
            self.on_new_process(&info, preexisting);
        }
        self.export_blast(now, full);
        self.settle_exited(now);
        // A dead process's counts were read above for the last time.
        for (tgid, start) in self.acct.take_newly_dead() {
            self.kernel.forget(tgid, start);
            if let Some(b) = self.blast.as_mut() {
                b.forget(tgid);
            }
        }
        if full {
            self.acct.expire(self.set.retention, now);
            // Once a second: what flooding processes' records were counted into.
            self.audit.flush_aggregated();
            if let Some(r) = &self.record {
                r.flush_aggregated();
            }
        }
        let noncoherent = self.kernel.noncoherent();
        for (tgid, p) in self.acct.procs.iter_mut().filter(|(_, p)| p.alive()) {
            p.noncoherent =
                noncoherent.contains(&(*tgid, p.info.start_time)) || noncoherent.contains(&(*tgid, 0));
        }
        self.recover_asks(LOST_ASK_NS);
        self.kernel.refresh_file_filter();
        for hook in self.kernel.attach_late() {
            self.metrics.hook_attached.with_label_values(&[hook]).set(1);
        }
        self.series.set_totals(&self.acct.vm_totals());
        self.metrics.set_host_totals(&self.acct.host);
        self.detect_storms(now);
        self.export_host_stats();
    }

    /// The VMMs that exited since the last sweep, their final counts read: the detector sees
    /// those counts once more, so a storm is recorded however short the VMM's life (one that
    /// lived between two sweeps was never seen alive), and a storm in progress is recorded as
    /// over. Then their tracks go.
    fn settle_exited(&mut self, now: Instant) {
        let first = self.sweeps == 1;
        let exited: Vec<u32> =
            self.acct.procs.iter().filter(|(_, p)| !p.alive() && !p.purged).map(|(t, _)| *t).collect();
        for tgid in exited {
            let tracked = self.detector.is_tracked(tgid);
            let Some(p) = self.acct.procs.get_mut(&tgid) else { continue };
            if !tracked {
                // Never seen alive: judged by the policy now, for its budget.
                let v = self.policy.policy.evaluate(&p.info);
                (p.budget, p.rule) = (v.budget, v.rule_name);
            }
            let (wbinvd, cost) = (p.total(Op::Wbinvd, &[Path::Exit, Path::Emulated]), p.cost.sum_ns);
            let budget = p.budget;
            self.detector.track(tgid, now, first, self.set.sweep_interval, wbinvd, cost);
            if self.detector.observe(tgid, now, wbinvd, cost, &budget, false) == Some(Transition::Raised) {
                self.on_storm(tgid, Transition::Raised);
            }
            // A VMM that exits ends its storm: said, so raised and cleared records pair up.
            if self.detector.window(tgid).is_some_and(|w| w.storm) {
                self.on_storm(tgid, Transition::Exited);
            }
            self.detector.forget(tgid);
        }
    }

    /// Feeds each live VMM's totals to the detector, acts on alerts raised or cleared, and sets
    /// the per-VM gauges (rate, cost share, storm, non-coherent) in the same pass.
    fn detect_storms(&mut self, now: Instant) {
        let first = self.sweeps == 1;
        // Every tracked VM gets its gauges set; a VM whose processes all exited reads 0.
        let mut per_vm: std::collections::HashMap<String, VmGauges> =
            self.acct.vm_names().map(|vm| (vm.to_string(), VmGauges::default())).collect();
        let mut changes = Vec::new();
        let mut throttle_changes = Vec::new();
        for (tgid, p) in self.acct.live() {
            let wbinvd = p.total(Op::Wbinvd, &[Path::Exit, Path::Emulated]);
            self.detector.track(*tgid, now, first, self.set.sweep_interval, wbinvd, p.cost.sum_ns);
            let hold = match self.throttler.as_mut() {
                Some(th) => {
                    if let Some(why) = th.adjust(*tgid, Sample { at: now, wbinvd }, p.budget.rate) {
                        throttle_changes.push((*tgid, why));
                    }
                    th.holds(*tgid)
                }
                None => false,
            };
            if let Some(t) = self.detector.observe(*tgid, now, wbinvd, p.cost.sum_ns, &p.budget, hold) {
                changes.push((*tgid, t));
            }
            let g = per_vm.entry(p.info.vm.clone()).or_default();
            g.noncoherent |= p.noncoherent;
            if let Some(w) = self.detector.window(*tgid) {
                g.rate += w.rate;
                g.cost_ratio += w.cost_ratio;
                g.storm |= w.storm;
            }
        }
        for (vm, g) in &per_vm {
            self.series.set_gauges(vm, g);
        }
        self.metrics.noncoherent_vms.set(per_vm.values().filter(|g| g.noncoherent).count() as i64);
        self.metrics.vms.set(self.acct.live().count() as i64);
        for (tgid, t) in changes {
            self.on_storm(tgid, t);
        }
        for (tgid, why) in throttle_changes {
            self.on_throttle_change(tgid, why);
        }
    }

    /// A throttle changed on its own (its VMM moved cgroup, or its mechanism did not hold the
    /// rate): a `wbinvd-storm` record with state `changed`.
    fn on_throttle_change(&mut self, tgid: u32, why: String) {
        let Some(p) = self.acct.procs.get(&tgid) else { return };
        let c = storm_change(tgid, p, self.detector.window(tgid).unwrap_or_default(), Transition::Raised);
        let result = storm::Response {
            state: crate::engine::record::StormState::Changed,
            outcome: StormOutcome::Throttled,
            reason: Some(why),
        };
        let rec = c.record(result, rfc3339(SystemTime::now()), &self.set.host, &self.policy.policy.source);
        self.audit.write(&rec);
    }

    fn on_storm(&mut self, tgid: u32, transition: Transition) {
        let Some(p) = self.acct.procs.get(&tgid) else { return };
        let window = self.detector.window(tgid).unwrap_or_default();
        let c = storm_change(tgid, p, window, transition);
        if transition == Transition::Raised {
            self.series.alert(c.vm);
        }
        let kernel = &mut self.kernel;
        let start = p.info.start_time;
        let mut result = storm::respond(&c, |sig| kernel.signal(tgid, start, sig));
        // A storm seen only in an exited VMM's final counts: nothing to throttle either.
        let acts = !(transition == Transition::Raised && c.exited);
        if let Some(th) = self.throttler.as_mut().filter(|_| acts) {
            let (outcome, reason) = (&mut result.outcome, &mut result.reason);
            match transition {
                Transition::Raised if c.budget.action == StormAction::Throttle => {
                    let wbinvd = p.total(Op::Wbinvd, &[Path::Exit, Path::Emulated]);
                    let started = th.start(
                        Target { pid: tgid, start_time: p.info.start_time, vm: &p.info.vm },
                        Storming { rate: window.rate, budget: c.budget.rate },
                        Sample { at: Instant::now(), wbinvd },
                    );
                    (*outcome, *reason) = match started {
                        Ok(s) => (StormOutcome::Throttled, Some(format!("{}: {:.3} CPU", s.method, s.share))),
                        Err(e) => {
                            tracing::error!(pid = tgid, error = %e, "throttling a storming VMM");
                            (StormOutcome::ThrottleFailed, Some(e.to_string()))
                        }
                    };
                }
                Transition::Cleared | Transition::Exited => match th.stop(tgid) {
                    Some(Ok(e)) => {
                        *reason = Some(match e.left_to {
                            None => format!("throttle ended: {} put back", e.entry.method()),
                            Some(other) => format!(
                                "throttle ended: {} left in force for pid {other}'s throttle in the same cgroup (it puts back what was there before either)",
                                e.entry.method()
                            ),
                        })
                    }
                    Some(Err(e)) => *reason = Some(format!("throttle could not be put back: {e}")),
                    None => {}
                },
                Transition::Raised => {}
            }
        } else if acts && transition == Transition::Raised && c.budget.action == StormAction::Throttle {
            result.reason = Some("throttling is not available in this agent: alerted only".into());
        }
        let rec = c.record(result, rfc3339(SystemTime::now()), &self.set.host, &self.policy.policy.source);
        self.audit.write(&rec);
    }

    /// Blast radius: IPIs sent, received and time stolen per VM, each victim VM's stolen share
    /// against its budget, and a `wbinvd-blast` record per flusher and window. On `full` sweeps,
    /// the keys of host processes that are gone are dropped (their totals are final).
    fn export_blast(&mut self, now: Instant, full: bool) {
        let Some(blast) = self.blast.as_mut() else { return };
        let totals = self.kernel.blast();
        let procs = &self.acct.procs;
        let d = blast.update(&totals, now, |t| procs.get(&t).map(|p| p.info.vm.clone()));
        self.series.blast(&d);
        // Each live VM (its victim counters created with its series): its stolen share against
        // its budget.
        let mut budgets: BTreeMap<&str, &Budget> = BTreeMap::new();
        for p in procs.values().filter(|p| p.alive()) {
            budgets.entry(p.info.vm.as_str()).or_insert(&p.budget);
        }
        blast.retain_vms(|vm| budgets.contains_key(vm));
        for (vm, b) in &budgets {
            let ratio = blast.stolen_ratio(vm, now, b.window.max(Duration::from_secs(1)));
            if self.series.victim_share(vm, ratio, b.victim_stolen_ratio) {
                tracing::warn!(vm = %escape(vm), stolen_ratio = ratio, budget = b.victim_stolen_ratio, "a VM loses more than its budget to other VMs' WBINVD flushes");
            }
        }
        // Who hurt whom, per victim: its top flushers over its last window, as bounded series.
        let window_of_vm = |vm: &str| budgets.get(vm).map_or(Duration::from_secs(1), |b| b.window);
        for (victim, top) in blast.hurt_by_due(now, window_of_vm) {
            self.series.hurt_by(&victim, &top);
        }
        self.blast_records(now);
        if full {
            self.forget_gone_blast();
        }
    }

    /// A `wbinvd-blast` record for each flusher whose window is due (one that exited is reported
    /// from what was kept of it).
    fn blast_records(&mut self, now: Instant) {
        let Some(blast) = self.blast.as_mut() else { return };
        let acct = &self.acct;
        for w in blast.due(now, |t| acct.find(t).map_or(Duration::from_secs(1), |p| p.budget.window)) {
            let Some(p) = acct.find(w.tgid) else { continue };
            let rec = BlastRecord {
                event: RecordKind::WbinvdBlast,
                time: rfc3339(SystemTime::now()),
                host: self.set.host.clone(),
                vm: w.vm,
                identity: VmIdentity::of(&p.info),
                pid: w.tgid,
                window_seconds: w.window.as_secs_f64(),
                ipis_sent: w.ipis_sent,
                victims: w.victims,
                policy: self.policy.policy.source.clone(),
            };
            self.audit.write(&rec);
        }
    }

    /// Drops the blast-radius keys of host processes that are gone (their totals are final).
    fn forget_gone_blast(&mut self) {
        let Some(blast) = self.blast.as_mut() else { return };
        let procs = &self.acct.procs;
        let gone: Vec<u32> = blast
            .host_victims(|t| procs.contains_key(&t))
            .into_iter()
            .filter(|t| !self.set.procfs.exists(*t))
            .collect();
        for t in gone {
            let keys = blast.forget(t);
            self.kernel.forget_blast(&keys);
        }
    }

    /// Kernel statistics (drops, errors), CPUs per flush and, when on, each program's cost.
    fn export_host_stats(&mut self) {
        let dropped = self.acct.exited_dropped;
        self.metrics.exited_dropped.inc_by(dropped.saturating_sub(self.metrics.exited_dropped.get()));
        self.metrics.cost.lock().unwrap_or_else(|e| e.into_inner()).flush_cpus = self.kernel.flush_cpus();
        let stats = self.kernel.stats();
        for stat in Stat::ALL {
            let (total, seen) = (stats[*stat as usize], &mut self.stats_seen[*stat as usize]);
            if total <= *seen {
                continue;
            }
            let delta = total - std::mem::replace(seen, total);
            if *stat == Stat::EventsDropped {
                self.metrics.events_dropped.inc_by(delta);
                tracing::warn!(
                    dropped = delta,
                    "kernel ring buffer full: events dropped (counters stay exact)"
                );
            } else if *stat == Stat::IgnoredRequests {
                self.metrics.ioctls_ignored.inc_by(delta);
            } else {
                if *stat == Stat::DecisionsDropped {
                    tracing::error!(
                        dropped = delta,
                        "decisions ring full: incoherent-DMA enable events lost (the kernel asks instead while enforcing)"
                    );
                }
                self.metrics.kernel_errors.with_label_values(&[stat.label()]).inc_by(delta);
            }
        }
    }

    /// The kernel's statistics of each attached program (runs, run time, recursion misses):
    /// read for a scrape only, the one reader of these series (a read costs a syscall and an
    /// allocation in the kernel per program).
    pub fn export_program_stats(&mut self) {
        for ps in self.kernel.program_stats() {
            let misses = self.metrics.program_misses.with_label_values(&[ps.hook]);
            misses.inc_by(ps.misses.saturating_sub(misses.get()));
            if let (Some(n), Some(secs)) = (ps.runs, ps.run_seconds) {
                let runs = self.metrics.program_runs.with_label_values(&[ps.hook]);
                runs.inc_by(n.saturating_sub(runs.get()));
                let time = self.metrics.program_run_seconds.with_label_values(&[ps.hook]);
                if secs > time.get() {
                    time.inc_by(secs - time.get());
                }
            }
        }
    }

    /// True once the policy file changed and then stayed the same for a check interval.
    pub fn policy_file_changed(&mut self) -> bool {
        self.policy.changed()
    }

    /// The file a reload parses, or None (the embedded default runs: nothing to reload).
    pub fn reload_path(&self, why: &str) -> Option<std::path::PathBuf> {
        let path = self.policy.path().map(std::path::Path::to_path_buf);
        if path.is_none() {
            tracing::info!(
                trigger = why,
                "reload requested; running the embedded default policy, nothing to reload"
            );
        }
        path
    }

    /// Attaches or detaches the refusing LSM program, and says which mechanism enforces now.
    fn set_lsm_deny(&mut self, on: bool) {
        if !self.set.enforce {
            return;
        }
        let attached = match self.kernel.set_lsm_deny(on) {
            None => return,
            Some(Ok(attached)) => attached,
            Some(Err(e)) => {
                tracing::error!(error = %e, on, "the LSM program could not be switched; denials kill the VMM instead");
                false
            }
        };
        let mechanism = if attached { EnforcementMechanism::Lsm } else { EnforcementMechanism::Sigkill };
        self.metrics
            .hook_attached
            .with_label_values(&[ioasid_common::hooks::HOOK_LSM_FILE_IOCTL])
            .set(i64::from(attached));
        for m in EnforcementMechanism::ALL {
            self.metrics
                .enforcement_mechanism
                .with_label_values(&[m.label()])
                .set(i64::from(*m == mechanism));
        }
        tracing::info!(mechanism = mechanism.label(), "incoherent-DMA enforcement");
    }

    /// Reloads the policy if its file changed, parsing here (tests; the daemon parses off the
    /// event loop and calls `apply_reload`).
    #[cfg(test)]
    pub fn watch_policy_file(&mut self) {
        if self.policy_file_changed() {
            if let Some(path) = self.reload_path("file changed") {
                self.apply_reload("file changed", crate::engine::policy::Policy::load_bytes(&path));
            }
        }
    }

    /// Puts a reloaded policy in force: a good one re-judges every running VM, a bad one is
    /// rejected and the last good policy stays in force.
    pub fn apply_reload(
        &mut self,
        why: &str,
        parsed: Result<(crate::engine::policy::Policy, Vec<u8>), crate::engine::policy::PolicyError>,
    ) {
        match parsed {
            Ok((policy, bytes)) => {
                // A deny is enforced from the moment it is written: the refusing program is
                // attached first, and detached only after the last deny is gone.
                let deny = policy.has_deny();
                if deny {
                    self.set_lsm_deny(true);
                }
                self.policy.install(policy, &bytes);
                self.export_policy_info();
                let live: Vec<ProcessInfo> = self.acct.live().map(|(_, p)| p.info.clone()).collect();
                for info in &live {
                    self.write_verdict(info);
                }
                if !deny {
                    self.set_lsm_deny(false);
                }
                self.metrics.policy_reloads.with_label_values(&["success"]).inc();
                let path = self.policy.path().map(|p| p.display().to_string()).unwrap_or_default();
                tracing::info!(trigger = why, policy = %path, generation = self.policy.generation, rules = self.policy.policy.rule_count(), vms = live.len(), "policy reloaded");
            }
            Err(e) => {
                self.metrics.policy_reloads.with_label_values(&["failure"]).inc();
                tracing::error!(trigger = why, error = %e, "policy reload rejected; the last good policy stays in force");
            }
        }
    }
}
