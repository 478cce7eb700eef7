//! Per-VM WBINVD/INVD accounting and VM lifecycle.
//!
//! The kernel counts per (tgid, vcpu, op, path) in a per-CPU map. Each sweep the agent:
//! 1. checks which tracked processes died (pid gone, or reused: start time changed);
//! 2. reads the whole map and sums CPUs and vCPUs per (tgid, op, path) -- a dead process's
//!    counts are final at this point, since the liveness check came first;
//! 3. names new tgids from procfs (VM name, exe, cgroup, uid);
//! 4. deletes a dead process's keys from the kernel map (after the final read), so a reused pid
//!    starts from zero;
//! 5. hands per-VM totals to the per-VM series (`telemetry::vm`), which export them.
//!
//! A dead VMM stays reported for the retention period, then its series are removed. While any
//! process of the same VM name lives, the totals of its retired processes are kept in the VM's
//! totals: a VM's counters are never reset while it lives.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use ioasid_common::{
    cost::COST_BUCKETS_NS,
    counters::{Op, Path},
};

use crate::{
    engine::policy::Budget,
    host::procfs::{ProcError, ProcFs, ProcessInfo},
};

/// WBINVD handler-time histogram of one VM: the kernel's exact bucket counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CostHist {
    /// Per bucket (not cumulative); the last is +Inf.
    pub buckets: [u64; COST_BUCKETS_NS.len() + 1],
    pub sum_ns: u64,
}

impl CostHist {
    pub fn add(&mut self, o: &CostHist) {
        for (a, b) in self.buckets.iter_mut().zip(o.buckets.iter()) {
            *a += b;
        }
        self.sum_ns += o.sum_ns;
    }
}

/// (op, path) -> count.
pub type Totals = BTreeMap<(Op, Path), u64>;
/// VM name -> its counts and handler-time histogram.
pub type VmTotals = BTreeMap<String, (Totals, CostHist)>;

#[derive(Debug)]
pub struct Proc {
    pub info: ProcessInfo,
    pub totals: Totals,
    /// WBINVD handler time histogram (kernel totals).
    pub cost: CostHist,
    /// The WBINVD budget and rule name from the policy.
    pub budget: Budget,
    pub rule: String,
    /// Known to have non-coherent DMA (its WBINVD flush caches).
    pub noncoherent: bool,
    pub dead_since: Option<Instant>,
    /// Set when the kernel map entries were removed after death.
    pub purged: bool,
}

impl Proc {
    fn new(info: ProcessInfo, dead_since: Option<Instant>) -> Self {
        Self {
            info,
            totals: Totals::new(),
            cost: CostHist::default(),
            budget: Budget::DEFAULT,
            rule: "default".into(),
            noncoherent: false,
            dead_since,
            purged: false,
        }
    }

    pub fn alive(&self) -> bool {
        self.dead_since.is_none()
    }

    pub fn total(&self, op: Op, paths: &[Path]) -> u64 {
        paths.iter().map(|p| self.totals.get(&(op, *p)).copied().unwrap_or(0)).sum()
    }
}

/// Exited processes kept for the retention window, at most this many: past it the oldest are
/// dropped first (counted), so VM churn cannot grow the agent or its scrape without bound
/// (each kept VM has some twenty series).
pub const MAX_EXITED: usize = 1024;

#[derive(Debug, Default)]
pub struct Accounting {
    /// The current process of each pid.
    pub procs: HashMap<u32, Proc>,
    /// Exited processes whose pid has since been taken by another process (pid reuse), or that
    /// wait out their retention there: a process is its pid *and* its start time, so a new
    /// process never inherits a dead one's name, counts or storm state. Oldest first.
    exited: std::collections::VecDeque<Proc>,
    /// Exited processes dropped past [`MAX_EXITED`] before their retention ended.
    pub exited_dropped: u64,
    /// Totals of retired processes of VMs that still have a live process.
    retired: HashMap<String, (Totals, CostHist)>,
    /// Every count read from the kernel since the agent started, whatever became of its VM
    /// since (exited, dropped past [`MAX_EXITED`], expired): the host's totals never forget.
    pub host: Totals,
}

impl Accounting {
    /// Marks dead processes. Call before reading the kernel map.
    pub fn check_liveness(&mut self, procfs: &ProcFs, now: Instant) -> Vec<u32> {
        let mut died = Vec::new();
        for (tgid, p) in self.procs.iter_mut().filter(|(_, p)| p.dead_since.is_none()) {
            let alive = match procfs.start_time(*tgid) {
                Ok(st) => st == p.info.start_time,
                Err(ProcError::Gone { .. }) => false,
                // Unreadable but present: keep it (never drop a live VM on a transient error).
                Err(_) => true,
            };
            if !alive {
                p.dead_since = Some(now);
                died.push(*tgid);
            }
        }
        died
    }

    /// Returns the known process for `tgid`, naming it from procfs if new. A process that is
    /// already gone is named `unknown:<tgid>` (`comm` when an event told it).
    /// `comm` is given by the event path: an event of a process that exited moments ago keeps
    /// the name it had. Kernel counts (no `comm`) on a purged pid are a new process's.
    #[cfg(test)]
    pub fn ensure(&mut self, tgid: u32, comm: Option<&str>, procfs: &ProcFs, now: Instant) -> &mut Proc {
        self.ensure_with(tgid, comm, procfs, now, &|_| None)
    }

    /// As `ensure`; a process gone before /proc was read is named by `captured` (what the
    /// kernel captured of it at VM creation) before any pid-derived name.
    pub fn ensure_with(
        &mut self,
        tgid: u32,
        comm: Option<&str>,
        procfs: &ProcFs,
        now: Instant,
        captured: &dyn Fn(u32) -> Option<ProcessInfo>,
    ) -> &mut Proc {
        // Counts for a pid whose process died and was purged belong to a new process.
        if self.procs.get(&tgid).is_some_and(|p| p.purged) {
            self.set_aside(tgid);
        }
        let exited = &self.exited;
        self.procs.entry(tgid).or_insert_with(|| {
            let e = match procfs.info(tgid) {
                Ok(info) => return Proc::new(info, None),
                Err(e) => e,
            };
            // An event, the process gone, and it exited recently: a late event of that process
            // keeps its name (its counts were already read; this entry only names it).
            if comm.is_some() {
                if let Some(last) = exited.iter().rev().find(|p| p.info.pid == tgid) {
                    let mut p = Proc::new(last.info.clone(), Some(now));
                    p.purged = true;
                    return p;
                }
            }
            if let Some(info) = captured(tgid) {
                tracing::debug!(tgid, vm = %crate::util::text::escape(&info.vm), "process gone before /proc was read: named from the command line the kernel captured");
                return Proc::new(info, Some(now));
            }
            let name = comm.map_or_else(|| format!("unknown:{tgid}"), |c| format!("{c}:{tgid}"));
            tracing::debug!(tgid, error = %e, vm = %name, "process gone before it could be named");
            let info = ProcessInfo {
                pid: tgid,
                comm: comm.unwrap_or("unknown").to_string(),
                vm: name,
                exe: None,
                cgroup: None,
                uid: u32::MAX,
                start_time: 0,
                uuid: None,
                managed: Default::default(),
            };
            Proc::new(info, Some(now))
        })
    }

    /// Replaces a process's identity with one re-read from /proc (after an exec, or for a
    /// decision) and returns it. What libvirt's status added to the same process of the same
    /// name stays (it names the VMM by pid and is not in /proc): a re-read never drops a VM's
    /// OpenStack identity. Another process on the same pid (another start time) sets the old
    /// one aside instead of overwriting it.
    pub fn replace(&mut self, mut info: ProcessInfo) -> &ProcessInfo {
        let tgid = info.pid;
        match self.procs.get_mut(&tgid) {
            Some(p) if p.info.start_time == info.start_time => {
                if p.info.vm == info.vm {
                    info.managed.keep_libvirt(&p.info.managed);
                    if info.uuid.is_none() {
                        info.uuid = p.info.uuid.take();
                    }
                }
                p.info = info;
            }
            Some(_) => {
                self.set_aside(tgid);
                self.procs.insert(tgid, Proc::new(info, None));
            }
            None => {
                self.procs.insert(tgid, Proc::new(info, None));
            }
        }
        &self.procs[&tgid].info
    }

    /// Moves the process on `tgid` to the exited ones (dead from now if it was not yet known
    /// dead), dropping the oldest exited past [`MAX_EXITED`].
    /// A process by tgid: a live one, else the latest exited one kept.
    pub fn find(&self, tgid: u32) -> Option<&Proc> {
        self.procs.get(&tgid).or_else(|| self.exited.iter().rev().find(|p| p.info.pid == tgid))
    }

    fn set_aside(&mut self, tgid: u32) {
        let Some(mut p) = self.procs.remove(&tgid) else { return };
        p.dead_since.get_or_insert_with(Instant::now);
        p.purged = true;
        self.push_exited(p);
    }

    /// Queues an exited process, dropping the oldest past [`MAX_EXITED`] (counted, retired).
    fn push_exited(&mut self, p: Proc) {
        self.exited.push_back(p);
        while self.exited.len() > MAX_EXITED {
            if let Some(old) = self.exited.pop_front() {
                self.exited_dropped += 1;
                self.retire(old);
            }
        }
    }

    /// Folds an expired process's totals into its VM's while the VM has another process.
    fn retire(&mut self, p: Proc) {
        let vm_lives = self.procs.values().chain(self.exited.iter()).any(|o| o.info.vm == p.info.vm);
        if vm_lives {
            let (r, c) = self.retired.entry(p.info.vm.clone()).or_default();
            for (k, v) in p.totals {
                *r.entry(k).or_insert(0) += v;
            }
            c.add(&p.cost);
        }
    }

    /// The process that kernel counts keyed by `tgid` and `start` belong to: the one on that
    /// pid with that start, live or exited. `start` 0 (a kernel whose layout is not known) is
    /// whichever process is on the pid. Counts of a process the agent has not seen are its own:
    /// a new process on a reused pid sets the old one aside, and counts of a process older than
    /// the one on its pid (read after its pid was taken) go to an exited entry of their own.
    /// Nothing is ever added to another process's counts.
    fn owner(
        &mut self,
        tgid: u32,
        start: u64,
        procfs: &ProcFs,
        now: Instant,
        captured: &dyn Fn(u32) -> Option<ProcessInfo>,
    ) -> &mut Proc {
        let fits = |p: &Proc| start == 0 || p.info.start_time == 0 || p.info.start_time == start;
        if let Some(i) = self.exited.iter().rposition(|p| p.info.pid == tgid && p.info.start_time == start) {
            if start != 0 && self.procs.get(&tgid).is_none_or(|p| p.info.start_time != start) {
                return &mut self.exited[i];
            }
        }
        match self.procs.get(&tgid) {
            Some(p) if fits(p) => return self.ensure_with(tgid, None, procfs, now, captured),
            // A process this agent knows on the pid, older than the counts: a new process took
            // the pid.
            Some(p) if p.info.start_time < start => self.set_aside(tgid),
            Some(_) => return self.stray(tgid, start, now, captured),
            None => {}
        }
        let p = self.ensure_with(tgid, None, procfs, now, captured);
        if fits(p) {
            if p.info.start_time == 0 {
                p.info.start_time = start;
            }
            return self.procs.get_mut(&tgid).expect("just ensured");
        }
        // /proc shows yet another process on the pid: the counts' process is gone.
        self.stray(tgid, start, now, captured)
    }

    /// An exited entry for counts of a process that is no longer on its pid and was never
    /// named: from the command line the kernel captured when it has that start, else
    /// `unknown:<pid>`.
    fn stray(
        &mut self,
        tgid: u32,
        start: u64,
        now: Instant,
        captured: &dyn Fn(u32) -> Option<ProcessInfo>,
    ) -> &mut Proc {
        let info = captured(tgid).filter(|i| i.start_time == start).unwrap_or_else(|| ProcessInfo {
            pid: tgid,
            comm: "unknown".into(),
            vm: format!("unknown:{tgid}"),
            exe: None,
            cgroup: None,
            uid: u32::MAX,
            start_time: start,
            uuid: None,
            managed: Default::default(),
        });
        tracing::debug!(tgid, start, vm = %crate::util::text::escape(&info.vm), "counts of a process no longer on its pid");
        let mut p = Proc::new(info, Some(now));
        p.purged = true;
        self.push_exited(p);
        self.exited.back_mut().expect("just pushed")
    }

    /// Applies the kernel totals read this sweep, keyed by process (tgid, start).
    pub fn apply(
        &mut self,
        kernel: HashMap<(u32, u64), Totals>,
        procfs: &ProcFs,
        now: Instant,
        captured: &dyn Fn(u32) -> Option<ProcessInfo>,
    ) {
        for ((tgid, start), totals) in kernel {
            let p = self.owner(tgid, start, procfs, now, captured);
            let mut grew = Vec::new();
            for (k, v) in totals {
                let e = p.totals.entry(k).or_insert(0);
                // Kernel counts only grow while the process lives; never go backwards.
                if v > *e {
                    grew.push((k, v - *e));
                    *e = v;
                }
            }
            for (k, d) in grew {
                *self.host.entry(k).or_insert(0) += d;
            }
        }
    }

    /// Applies the kernel's handler-time histograms read this sweep, keyed by process.
    pub fn apply_cost(
        &mut self,
        kernel: HashMap<(u32, u64), CostHist>,
        procfs: &ProcFs,
        now: Instant,
        captured: &dyn Fn(u32) -> Option<ProcessInfo>,
    ) {
        for ((tgid, start), hist) in kernel {
            let p = self.owner(tgid, start, procfs, now, captured);
            // Kernel counts only grow while the process lives; never go backwards.
            for (a, b) in p.cost.buckets.iter_mut().zip(hist.buckets.iter()) {
                *a = (*a).max(*b);
            }
            p.cost.sum_ns = p.cost.sum_ns.max(hist.sum_ns);
        }
    }

    /// Processes that died and whose kernel entries should now be removed. They move to the
    /// exited ones (kept for the retention, at most [`MAX_EXITED`]).
    /// Each is (tgid, start): the kernel entries of that process only.
    pub fn take_newly_dead(&mut self) -> Vec<(u32, u64)> {
        // Every dead process moves, also a late event's placeholder of one already purged;
        // only the not yet purged are newly dead.
        let dead: Vec<(u32, u64, bool)> = self
            .procs
            .iter()
            .filter(|(_, p)| p.dead_since.is_some())
            .map(|(t, p)| (*t, p.info.start_time, p.purged))
            .collect();
        for (t, _, _) in &dead {
            self.set_aside(*t);
        }
        dead.into_iter().filter(|(_, _, purged)| !purged).map(|(t, s, _)| (t, s)).collect()
    }

    /// Forgets processes dead for longer than `retention`; returns their tgids.
    pub fn expire(&mut self, retention: Duration, now: Instant) -> Vec<u32> {
        let over = |p: &Proc| p.dead_since.is_some_and(|d| now.duration_since(d) >= retention);
        let expired: Vec<u32> = self.procs.iter().filter(|(_, p)| over(p)).map(|(t, _)| *t).collect();
        let mut gone: Vec<Proc> = expired.iter().filter_map(|t| self.procs.remove(t)).collect();
        let (old, keep): (Vec<Proc>, Vec<Proc>) = self.exited.drain(..).partition(|p| over(p));
        self.exited = keep.into();
        let mut tgids = expired;
        tgids.extend(old.iter().map(|p| p.info.pid));
        gone.extend(old);
        for p in gone {
            self.retire(p);
        }
        // A VM name with no process left at all is forgotten.
        let names: std::collections::HashSet<&str> =
            self.procs.values().chain(self.exited.iter()).map(|p| p.info.vm.as_str()).collect();
        self.retired.retain(|vm, _| names.contains(vm.as_str()));
        tgids
    }

    /// Every VM name tracked: live processes, and exited ones within retention.
    pub fn vm_names(&self) -> impl Iterator<Item = &str> {
        self.procs.values().chain(self.exited.iter()).map(|p| p.info.vm.as_str())
    }

    /// Per-VM totals: live and retained processes plus retired ones.
    pub fn vm_totals(&self) -> VmTotals {
        let mut out = VmTotals::new();
        let parts = self.retired.iter().map(|(vm, (t, c))| (vm, t, c));
        let live = self.procs.values().chain(self.exited.iter()).map(|p| (&p.info.vm, &p.totals, &p.cost));
        for (vm, t, c) in parts.chain(live) {
            let (et, ec) = out.entry(vm.clone()).or_default();
            for (k, v) in t {
                *et.entry(*k).or_insert(0) += v;
            }
            ec.add(c);
        }
        out
    }

    /// Live VMM processes.
    pub fn live(&self) -> impl Iterator<Item = (&u32, &Proc)> {
        self.procs.iter().filter(|(_, p)| p.alive())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pid: u32, vm: &str, start: u64) -> ProcessInfo {
        ProcessInfo {
            pid,
            comm: "q".into(),
            vm: vm.into(),
            exe: None,
            cgroup: None,
            uid: 0,
            start_time: start,
            uuid: None,
            managed: Default::default(),
        }
    }

    /// Kernel counts keyed by pid alone (start 0), as where the kernel's layout is not known.
    fn kernel(tgid: u32, wb_exit: u64, wb_emul: u64) -> HashMap<(u32, u64), Totals> {
        let mut t = Totals::new();
        t.insert((Op::Wbinvd, Path::Exit), wb_exit);
        t.insert((Op::Wbinvd, Path::Emulated), wb_emul);
        HashMap::from([((tgid, 0), t)])
    }

    /// Kernel counts keyed by (pid, start), as the programs key them.
    fn keyed(tgid: u32, start: u64, wb_exit: u64) -> HashMap<(u32, u64), Totals> {
        kernel(tgid, wb_exit, 0).into_values().map(|t| ((tgid, start), t)).collect()
    }

    fn value(a: &Accounting, vm: &str, path: Path) -> Option<u64> {
        a.vm_totals().get(vm).map(|(t, _)| t.get(&(Op::Wbinvd, path)).copied().unwrap_or(0))
    }

    #[test]
    fn a_reread_keeps_what_libvirt_said_of_the_same_vmm() {
        use crate::host::{libvirt::Nova, manager::Manager};
        let mut a = Accounting::default();
        let mut first = info(30, "instance-1", 1);
        first.managed.from_libvirt(Some(Nova { name: Some("srv".into()), ..Nova::default() }));
        first.uuid = Some("u-1".into());
        a.replace(first);
        let kept = a.replace(info(30, "instance-1", 1)).clone();
        let nova_name = kept.managed.nova.and_then(|n| n.name);
        assert_eq!(
            (kept.managed.manager, nova_name.as_deref(), kept.uuid.as_deref()),
            (Manager::Openstack, Some("srv"), Some("u-1"))
        );
        // Renamed (an exec with another -name): libvirt's status was of the other domain.
        let renamed = a.replace(info(30, "other", 1));
        assert_eq!((renamed.managed.manager, renamed.managed.nova.is_none()), (Manager::Qemu, true));
    }

    #[test]
    fn totals_go_up_and_survive_a_process_restart_of_the_same_vm() {
        let procfs = ProcFs::at("/nonexistent-procfs");
        let mut a = Accounting::default();
        let now = Instant::now();
        a.replace(info(10, "gpu-1", 1));
        a.apply(kernel(10, 5, 7), &procfs, now, &|_| None);
        assert_eq!(value(&a, "gpu-1", Path::Exit), Some(5));
        assert_eq!(value(&a, "gpu-1", Path::Emulated), Some(7));
        a.apply(kernel(10, 9, 7), &procfs, now, &|_| None);
        assert_eq!(value(&a, "gpu-1", Path::Exit), Some(9));

        // The process dies (procfs says gone); a new process of the same VM starts.
        assert_eq!(a.check_liveness(&procfs, now), vec![10]);
        assert_eq!(a.take_newly_dead(), vec![(10, 1)]);
        assert!(a.take_newly_dead().is_empty());
        a.replace(info(11, "gpu-1", 2));
        a.apply(kernel(11, 1, 0), &procfs, now, &|_| None);
        assert_eq!(value(&a, "gpu-1", Path::Exit), Some(10));
        // Retention over: the dead process's totals fold into the VM's, no reset.
        assert_eq!(a.expire(Duration::from_secs(1), now + Duration::from_secs(2)), vec![10]);
        assert_eq!(value(&a, "gpu-1", Path::Exit), Some(10));
        assert_eq!(value(&a, "gpu-1", Path::Emulated), Some(7));
    }

    #[test]
    fn the_host_totals_keep_every_count_of_vms_long_forgotten() {
        let procfs = ProcFs::at("/nonexistent-procfs");
        let mut a = Accounting::default();
        let now = Instant::now();
        // More short-lived VMs than are kept, two WBINVD each, each purged after its last read.
        let n = MAX_EXITED as u32 + 500;
        for pid in 1..=n {
            a.replace(info(pid, &format!("vm-{pid}"), 1));
            a.apply(kernel(pid, 1, 0), &procfs, now, &|_| None);
            a.apply(kernel(pid, 2, 0), &procfs, now, &|_| None);
            assert_eq!(a.check_liveness(&procfs, now), vec![pid]);
            a.take_newly_dead();
        }
        a.expire(Duration::from_secs(1), now + Duration::from_secs(2));
        assert!(a.vm_totals().is_empty(), "every VM forgotten");
        assert_eq!(a.exited_dropped, 500);
        assert_eq!(a.host.get(&(Op::Wbinvd, Path::Exit)), Some(&(2 * u64::from(n))));
        // A new process on a reused pid counts from zero, on top.
        a.replace(info(1, "vm-again", 2));
        a.apply(kernel(1, 3, 4), &procfs, now, &|_| None);
        assert_eq!(a.host.get(&(Op::Wbinvd, Path::Exit)), Some(&(2 * u64::from(n) + 3)));
        assert_eq!(a.host.get(&(Op::Wbinvd, Path::Emulated)), Some(&4));
    }

    #[test]
    fn a_vm_with_no_process_left_is_forgotten_after_retention() {
        let procfs = ProcFs::at("/nonexistent-procfs");
        let mut a = Accounting::default();
        let now = Instant::now();
        a.replace(info(20, "web", 1));
        a.apply(kernel(20, 3, 0), &procfs, now, &|_| None);
        assert_eq!(value(&a, "web", Path::Exit), Some(3));
        a.check_liveness(&procfs, now);
        assert!(a.expire(Duration::from_secs(60), now + Duration::from_secs(30)).is_empty());
        assert_eq!(value(&a, "web", Path::Exit), Some(3), "still reported during retention");
        assert_eq!(a.expire(Duration::from_secs(60), now + Duration::from_secs(61)), vec![20]);
        assert_eq!(value(&a, "web", Path::Exit), None);
    }

    #[test]
    fn an_unnamed_tgid_gets_a_fallback_name() {
        let procfs = ProcFs::at("/nonexistent-procfs");
        let mut a = Accounting::default();
        let now = Instant::now();
        a.apply(kernel(30, 1, 0), &procfs, now, &|_| None);
        assert_eq!(a.procs[&30].info.vm, "unknown:30");
        assert!(a.procs[&30].dead_since.is_some());
        assert_eq!(a.ensure(31, Some("qemu"), &procfs, now).info.vm, "qemu:31");
    }

    #[test]
    fn a_new_process_on_a_reused_pid_is_its_own() {
        let procfs = ProcFs::at("/nonexistent-procfs");
        let mut a = Accounting::default();
        let now = Instant::now();
        a.replace(info(40, "old-vm", 1));
        a.apply(kernel(40, 100, 0), &procfs, now, &|_| None);
        assert_eq!(a.check_liveness(&procfs, now), vec![40]);
        assert_eq!(a.take_newly_dead(), vec![(40, 1)]);
        // Another VMM gets pid 40 (another start time): its own name and counts.
        a.replace(info(40, "new-vm", 2));
        a.apply(kernel(40, 3, 0), &procfs, now, &|_| None);
        assert_eq!(value(&a, "old-vm", Path::Exit), Some(100), "the exited VM is kept for retention");
        assert_eq!(value(&a, "new-vm", Path::Exit), Some(3), "nothing inherited");
        assert!(a.procs[&40].alive());
        assert_eq!(a.expire(Duration::from_secs(1), now + Duration::from_secs(2)), vec![40]);
        assert_eq!(value(&a, "old-vm", Path::Exit), None);
        assert_eq!(value(&a, "new-vm", Path::Exit), Some(3));
        // Counts for a purged pid with no name yet also start a new process.
        a.check_liveness(&procfs, now);
        a.take_newly_dead();
        a.apply(kernel(40, 1, 0), &procfs, now, &|_| None);
        assert_eq!(value(&a, "unknown:40", Path::Exit), Some(1));
        assert_eq!(value(&a, "new-vm", Path::Exit), Some(3));
    }

    #[test]
    fn counts_keyed_by_start_go_to_their_own_process_whatever_holds_the_pid() {
        let procfs = ProcFs::at("/nonexistent-procfs");
        let mut a = Accounting::default();
        let now = Instant::now();
        a.replace(info(80, "old-vm", 5));
        a.apply(keyed(80, 5, 10), &procfs, now, &|_| None);
        // A new process took pid 80 before the agent noticed the old one died: its counts
        // arrive under its own start, and set the old one aside instead of adding to it.
        let captured = |t: u32| (t == 80).then(|| info(80, "new-vm", 9));
        a.apply(keyed(80, 9, 3), &procfs, now, &captured);
        assert_eq!(value(&a, "old-vm", Path::Exit), Some(10), "the old process keeps its own");
        assert_eq!(value(&a, "new-vm", Path::Exit), Some(3), "nothing inherited");
        assert_eq!(a.procs[&80].info.start_time, 9);
        // The old process's last counts, read after the pid was taken, still go to it.
        a.apply(keyed(80, 5, 12), &procfs, now, &captured);
        assert_eq!(value(&a, "old-vm", Path::Exit), Some(12));
        assert_eq!(value(&a, "new-vm", Path::Exit), Some(3));
        // Counts of a process older than the one on the pid, never seen: an entry of their own.
        a.apply(keyed(80, 2, 7), &procfs, now, &captured);
        assert_eq!(value(&a, "unknown:80", Path::Exit), Some(7));
        assert_eq!(value(&a, "new-vm", Path::Exit), Some(3));
        assert_eq!(a.host.get(&(Op::Wbinvd, Path::Exit)), Some(&(12 + 3 + 7)), "the host counts all");
    }

    #[test]
    fn exited_processes_are_capped_oldest_first() {
        let mut a = Accounting::default();
        for start in 1..=(MAX_EXITED as u64 + 2) {
            a.replace(info(60, &format!("vm-{start}"), start));
        }
        assert_eq!(a.exited.len(), MAX_EXITED);
        assert_eq!(a.exited_dropped, 1);
        assert_eq!(a.exited.front().unwrap().info.vm, "vm-2", "the oldest went first");
        assert!(a.vm_names().any(|v| v == format!("vm-{}", MAX_EXITED + 2)));
    }

    #[test]
    fn an_exited_process_waits_out_its_retention_in_the_capped_queue() {
        let procfs = ProcFs::at("/nonexistent-procfs");
        let mut a = Accounting::default();
        let now = Instant::now();
        a.replace(info(70, "vm-late", 1));
        a.apply(kernel(70, 4, 0), &procfs, now, &|_| None);
        a.check_liveness(&procfs, now);
        assert_eq!(a.take_newly_dead(), vec![(70, 1)]);
        assert!(!a.procs.contains_key(&70) && a.exited.len() == 1, "moved to the capped queue");
        assert_eq!(value(&a, "vm-late", Path::Exit), Some(4), "still reported");
        // A late event of it keeps its name; kernel counts on the pid would be a new process's.
        assert_eq!(a.ensure(70, Some("qemu"), &procfs, now).info.vm, "vm-late");
        assert_eq!(value(&a, "vm-late", Path::Exit), Some(4), "nothing counted twice");
    }
}
