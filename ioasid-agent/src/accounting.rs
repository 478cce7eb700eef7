//! Per-VM WBINVD/INVD accounting and VM lifecycle.
//!
//! The kernel counts per (tgid, vcpu, op, path) in a per-CPU map. Each sweep the agent:
//! 1. checks which tracked processes died (pid gone, or reused: start time changed);
//! 2. reads the whole map and sums CPUs and vCPUs per (tgid, op, path) -- a dead process's
//!    counts are final at this point, since the liveness check came first;
//! 3. names new tgids from procfs (VM name, exe, cgroup, uid);
//! 4. deletes a dead process's keys from the kernel map (after the final read), so a reused pid
//!    starts from zero;
//! 5. exports per-VM totals as Prometheus counters, by increments, so they only ever go up.
//!
//! A dead VMM stays reported for the retention period, then its series are removed. While any
//! process of the same VM name lives, the totals of its retired processes are kept in the VM's
//! totals: a VM's counters are never reset while it lives.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use ioasid_common::{
    OP_INVD, OP_WBINVD, PATH_EMULATED, PATH_EXIT, PATH_FLUSHED, PATH_HANDLER_EMULATED, PATH_HANDLER_EXIT,
};

use crate::{
    policy::Budget,
    procfs::{ProcError, ProcFs, ProcessInfo},
    telemetry::{CostHist, Metrics},
};

/// (op, path) -> count.
pub type Totals = BTreeMap<(u32, u32), u64>;

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

    pub fn total(&self, op: u32, paths: &[u32]) -> u64 {
        paths.iter().map(|p| self.totals.get(&(op, *p)).copied().unwrap_or(0)).sum()
    }
}

#[derive(Debug, Default)]
pub struct Accounting {
    pub procs: HashMap<u32, Proc>,
    /// Totals of retired processes of VMs that still have a live process.
    retired: HashMap<String, (Totals, CostHist)>,
    /// What has been exported per (vm, op, path), to increment by the difference.
    exported: HashMap<(String, u32, u32), u64>,
    /// VM names with series out, to remove their per-VM gauges when they are forgotten.
    exported_vms: std::collections::BTreeSet<String>,
}

fn counter(metrics: &Metrics, fam: &str, vm: &str, path: &str) -> prometheus::IntCounter {
    match fam {
        "wbinvd" => metrics.wbinvd_exits.with_label_values(&[vm, path]),
        "invd" => metrics.invd_exits.with_label_values(&[vm, path]),
        "flushes" => metrics.wbinvd_flushes.with_label_values(&[vm]),
        _ => metrics.wbinvd_handled.with_label_values(&[vm, path]),
    }
}

fn remove(metrics: &Metrics, fam: &str, vm: &str, path: &str) {
    let _ = match fam {
        "wbinvd" => metrics.wbinvd_exits.remove_label_values(&[vm, path]),
        "invd" => metrics.invd_exits.remove_label_values(&[vm, path]),
        "flushes" => metrics.wbinvd_flushes.remove_label_values(&[vm]),
        _ => metrics.wbinvd_handled.remove_label_values(&[vm, path]),
    };
}

/// Prometheus family and path label of a (op, path) key.
fn series(op: u32, path: u32) -> Option<(&'static str, &'static str)> {
    let fam = match (op, path) {
        (OP_WBINVD, PATH_EXIT | PATH_EMULATED) => "wbinvd",
        (OP_INVD, PATH_EXIT | PATH_EMULATED) => "invd",
        (OP_WBINVD, PATH_HANDLER_EXIT | PATH_HANDLER_EMULATED) => "handled",
        (OP_WBINVD, PATH_FLUSHED) => "flushes",
        _ => return None,
    };
    let label = match path {
        PATH_EXIT | PATH_HANDLER_EXIT => "exit",
        _ => "emulated",
    };
    Some((fam, label))
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
    pub fn ensure(&mut self, tgid: u32, comm: Option<&str>, procfs: &ProcFs, now: Instant) -> &mut Proc {
        self.procs.entry(tgid).or_insert_with(|| match procfs.info(tgid) {
            Ok(info) => Proc::new(info, None),
            Err(e) => {
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
                };
                Proc::new(info, Some(now))
            }
        })
    }

    /// Replaces a process's identity (it was re-read after an exec).
    pub fn replace(&mut self, info: ProcessInfo) {
        let tgid = info.pid;
        match self.procs.get_mut(&tgid) {
            Some(p) if p.info.start_time == info.start_time => p.info = info,
            _ => {
                self.procs.insert(tgid, Proc::new(info, None));
            }
        }
    }

    /// Applies the kernel totals read this sweep.
    pub fn apply(&mut self, kernel: HashMap<u32, Totals>, procfs: &ProcFs, now: Instant) {
        for (tgid, totals) in kernel {
            let p = self.ensure(tgid, None, procfs, now);
            for (k, v) in totals {
                let e = p.totals.entry(k).or_insert(0);
                // Kernel counts only grow while the process lives; never go backwards.
                *e = (*e).max(v);
            }
        }
    }

    /// Applies the kernel's handler-time histograms read this sweep.
    pub fn apply_cost(&mut self, kernel: HashMap<u32, CostHist>, procfs: &ProcFs, now: Instant) {
        for (tgid, hist) in kernel {
            let p = self.ensure(tgid, None, procfs, now);
            // Kernel counts only grow while the process lives; never go backwards.
            for (a, b) in p.cost.buckets.iter_mut().zip(hist.buckets.iter()) {
                *a = (*a).max(*b);
            }
            p.cost.sum_ns = p.cost.sum_ns.max(hist.sum_ns);
        }
    }

    /// Processes that died and whose kernel entries should now be removed.
    pub fn take_newly_dead(&mut self) -> Vec<u32> {
        let v: Vec<u32> =
            self.procs.iter().filter(|(_, p)| p.dead_since.is_some() && !p.purged).map(|(t, _)| *t).collect();
        for t in &v {
            if let Some(p) = self.procs.get_mut(t) {
                p.purged = true;
            }
        }
        v
    }

    /// Forgets processes dead for longer than `retention`; returns their tgids.
    pub fn expire(&mut self, retention: Duration, now: Instant) -> Vec<u32> {
        let expired: Vec<u32> = self
            .procs
            .iter()
            .filter(|(_, p)| p.dead_since.is_some_and(|d| now.duration_since(d) >= retention))
            .map(|(t, _)| *t)
            .collect();
        for tgid in &expired {
            let Some(p) = self.procs.remove(tgid) else {
                continue;
            };
            let vm_lives = self.procs.values().any(|o| o.info.vm == p.info.vm);
            if vm_lives {
                let (r, c) = self.retired.entry(p.info.vm.clone()).or_default();
                for (k, v) in p.totals {
                    *r.entry(k).or_insert(0) += v;
                }
                c.add(&p.cost);
            }
        }
        // A VM name with no process left at all is forgotten.
        let names: std::collections::HashSet<&str> =
            self.procs.values().map(|p| p.info.vm.as_str()).collect();
        self.retired.retain(|vm, _| names.contains(vm.as_str()));
        expired
    }

    /// Per-VM totals: live and retained processes plus retired ones.
    pub fn vm_totals(&self) -> BTreeMap<String, (Totals, CostHist)> {
        let mut out: BTreeMap<String, (Totals, CostHist)> = BTreeMap::new();
        let parts = self.retired.iter().map(|(vm, (t, c))| (vm, t, c));
        let live = self.procs.values().map(|p| (&p.info.vm, &p.totals, &p.cost));
        for (vm, t, c) in parts.chain(live) {
            let (et, ec) = out.entry(vm.clone()).or_default();
            for (k, v) in t {
                *et.entry(*k).or_insert(0) += v;
            }
            ec.add(c);
        }
        out
    }

    /// Brings the Prometheus counters up to the current totals and removes forgotten VMs.
    pub fn export(&mut self, metrics: &Metrics) {
        let totals = self.vm_totals();
        for (vm, (t, _)) in &totals {
            for ((op, path), v) in t {
                let Some((fam, label)) = series(*op, *path) else { continue };
                let key = (vm.clone(), *op, *path);
                let before = self.exported.get(&key).copied().unwrap_or(0);
                if *v > before {
                    counter(metrics, fam, vm, label).inc_by(*v - before);
                    self.exported.insert(key, *v);
                }
            }
        }
        // Series of VMs no longer tracked at all.
        let gone: Vec<(String, u32, u32)> =
            self.exported.keys().filter(|(vm, _, _)| !totals.contains_key(vm)).cloned().collect();
        for key in gone {
            self.exported.remove(&key);
            if let Some((fam, label)) = series(key.1, key.2) {
                remove(metrics, fam, &key.0, label);
            }
        }
        let forgotten: Vec<String> =
            self.exported_vms.iter().filter(|vm| !totals.contains_key(*vm)).cloned().collect();
        for vm in forgotten {
            let _ = metrics.wbinvd_cost_ratio.remove_label_values(&[&vm]);
            let _ = metrics.wbinvd_rate.remove_label_values(&[&vm]);
            let _ = metrics.wbinvd_storm.remove_label_values(&[&vm]);
            let _ = metrics.vm_noncoherent.remove_label_values(&[&vm]);
            let _ = metrics.dos_alerts.remove_label_values(&[&vm]);
            for d in ["allowed", "audited", "denied"] {
                let _ = metrics.incoherent_dma_requests.remove_label_values(&[&vm, d]);
            }
            self.exported_vms.remove(&vm);
        }
        self.exported_vms.extend(totals.keys().cloned());
        let per_vm = totals
            .into_iter()
            .filter(|(_, (_, c))| c.buckets.iter().any(|n| *n > 0))
            .map(|(vm, (_, c))| (vm, c))
            .collect();
        metrics.cost.lock().unwrap_or_else(|e| e.into_inner()).per_vm = per_vm;
        metrics.vms.set(self.procs.values().filter(|p| p.alive()).count() as i64);
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
        }
    }

    fn kernel(tgid: u32, wb_exit: u64, wb_emul: u64) -> HashMap<u32, Totals> {
        let mut t = Totals::new();
        t.insert((OP_WBINVD, PATH_EXIT), wb_exit);
        t.insert((OP_WBINVD, PATH_EMULATED), wb_emul);
        HashMap::from([(tgid, t)])
    }

    fn value(m: &Metrics, vm: &str, path: &str) -> Option<u64> {
        let fams = m.registry.gather();
        let fam = fams.iter().find(|f| f.name() == "ioasid_wbinvd_exits_total")?;
        fam.get_metric()
            .iter()
            .find(|x| {
                x.get_label().iter().any(|l| l.name() == "vm" && l.value() == vm)
                    && x.get_label().iter().any(|l| l.name() == "path" && l.value() == path)
            })
            .map(|x| x.get_counter().get_value() as u64)
    }

    #[test]
    fn totals_go_up_and_survive_a_process_restart_of_the_same_vm() {
        let procfs = ProcFs::at("/nonexistent-procfs");
        let m = Metrics::new();
        let mut a = Accounting::default();
        let now = Instant::now();
        a.replace(info(10, "gpu-1", 1));
        a.apply(kernel(10, 5, 7), &procfs, now);
        a.export(&m);
        assert_eq!(value(&m, "gpu-1", "exit"), Some(5));
        assert_eq!(value(&m, "gpu-1", "emulated"), Some(7));
        a.apply(kernel(10, 9, 7), &procfs, now);
        a.export(&m);
        assert_eq!(value(&m, "gpu-1", "exit"), Some(9));

        // The process dies (procfs says gone); a new process of the same VM starts.
        assert_eq!(a.check_liveness(&procfs, now), vec![10]);
        assert_eq!(a.take_newly_dead(), vec![10]);
        assert!(a.take_newly_dead().is_empty());
        a.replace(info(11, "gpu-1", 2));
        a.apply(kernel(11, 1, 0), &procfs, now);
        a.export(&m);
        assert_eq!(value(&m, "gpu-1", "exit"), Some(10));
        // Retention over: the dead process's totals fold into the VM's, no reset.
        assert_eq!(a.expire(Duration::from_secs(1), now + Duration::from_secs(2)), vec![10]);
        a.export(&m);
        assert_eq!(value(&m, "gpu-1", "exit"), Some(10));
        assert_eq!(value(&m, "gpu-1", "emulated"), Some(7));
    }

    #[test]
    fn a_vm_with_no_process_left_is_forgotten_after_retention() {
        let procfs = ProcFs::at("/nonexistent-procfs");
        let m = Metrics::new();
        let mut a = Accounting::default();
        let now = Instant::now();
        a.replace(info(20, "web", 1));
        a.apply(kernel(20, 3, 0), &procfs, now);
        a.export(&m);
        assert_eq!(value(&m, "web", "exit"), Some(3));
        a.check_liveness(&procfs, now);
        assert!(a.expire(Duration::from_secs(60), now + Duration::from_secs(30)).is_empty());
        a.export(&m);
        assert_eq!(value(&m, "web", "exit"), Some(3), "still reported during retention");
        assert_eq!(a.expire(Duration::from_secs(60), now + Duration::from_secs(61)), vec![20]);
        a.export(&m);
        assert_eq!(value(&m, "web", "exit"), None);
    }

    #[test]
    fn an_unnamed_tgid_gets_a_fallback_name() {
        let procfs = ProcFs::at("/nonexistent-procfs");
        let mut a = Accounting::default();
        let now = Instant::now();
        a.apply(kernel(30, 1, 0), &procfs, now);
        assert_eq!(a.procs[&30].info.vm, "unknown:30");
        assert!(a.procs[&30].dead_since.is_some());
        assert_eq!(a.ensure(31, Some("qemu"), &procfs, now).info.vm, "qemu:31");
    }
}
