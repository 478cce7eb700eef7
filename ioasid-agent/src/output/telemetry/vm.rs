//! Per-VM series: the one owner of every series labelled `vm`, from creation (zero-initialised
//! when the VM is first seen, so `rate()`/`increase()` catch its first event) through every
//! update to removal when the VM is forgotten.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ioasid_common::counters::{Op, Path};
use prometheus::IntCounter;

use super::Metrics;
use crate::{
    engine::accounting::{Totals, VmTotals},
    output::audit::{Coherency, Decision},
};

/// The per-VM gauges, set each sweep.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct VmGauges {
    pub rate: f64,
    pub cost_ratio: f64,
    pub storm: bool,
    pub noncoherent: bool,
}

/// The counter family a kernel (op, path) total is exported to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    /// `ioasid_wbinvd_exits_total{vm, path}`
    Wbinvd,
    /// `ioasid_invd_exits_total{vm, path}`
    Invd,
    /// `ioasid_wbinvd_handled_total{vm, path}`
    Handled,
    /// `ioasid_wbinvd_flushes_total{vm}`
    Flushes,
}

/// The family and `path` label of a kernel total, if it is exported.
pub(super) fn series(op: Op, path: Path) -> Option<(Family, &'static str)> {
    Some(match (op, path) {
        (Op::Wbinvd, Path::Exit) => (Family::Wbinvd, "exit"),
        (Op::Wbinvd, Path::Emulated) => (Family::Wbinvd, "emulated"),
        (Op::Invd, Path::Exit) => (Family::Invd, "exit"),
        (Op::Invd, Path::Emulated) => (Family::Invd, "emulated"),
        (Op::Wbinvd, Path::HandlerExit) => (Family::Handled, "exit"),
        (Op::Wbinvd, Path::HandlerEmulated) => (Family::Handled, "emulated"),
        (Op::Wbinvd, Path::Flushed) => (Family::Flushes, ""),
        _ => return None,
    })
}

pub struct VmSeries {
    metrics: Metrics,
    /// What has been exported per (vm, op, path), to increment by the difference.
    exported: HashMap<(String, Op, Path), u64>,
    /// VM names with series out.
    vms: BTreeSet<String>,
    /// The labels of each VM's `ioasid_vm_info` series.
    infos: HashMap<String, [String; 14]>,
    /// Blast radius is measured: each VM's victim counters exist too.
    blast: bool,
    /// Each victim VM's "hurt by" series: the flushers it names now.
    hurt_by: HashMap<String, Vec<String>>,
}

impl VmSeries {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            exported: HashMap::new(),
            vms: BTreeSet::new(),
            infos: HashMap::new(),
            blast: false,
            hurt_by: HashMap::new(),
        }
    }

    /// Blast radius is measured here: from now on a VM's victim counters are created with it.
    pub fn enable_blast(&mut self) {
        self.blast = true;
    }

    /// `ioasid_vm_info{vm, namespace, name, uuid, node, vmm, manager, vmid, pod_uid, project,
    /// project_id, user, user_id, flavor}` = 1 for the VM's current process: the labels to join
    /// with its manager's series (KubeVirt's `kubevirt_vmi_*` on namespace, name and node;
    /// Proxmox's on vmid; OpenStack exporters' on project_id and the instance UUID).
    pub fn info(&mut self, p: &crate::host::procfs::ProcessInfo, node: &str) {
        let nova = p.managed.nova.clone().unwrap_or_default();
        let (namespace, name) = match (p.kubevirt(), &nova.name) {
            (Some((ns, name)), _) => (ns.to_string(), name.to_string()),
            (None, Some(name)) => (String::new(), name.clone()),
            (None, None) => (String::new(), p.vm.clone()),
        };
        let labels = [
            p.vm.clone(),
            namespace,
            name,
            p.uuid.clone().unwrap_or_default(),
            node.to_string(),
            p.vmm().to_string(),
            p.managed.manager.label().to_string(),
            p.managed.vmid.clone().unwrap_or_default(),
            p.managed.pod_uid.clone().unwrap_or_default(),
            nova.owner.project.unwrap_or_default(),
            nova.owner.project_id.unwrap_or_default(),
            nova.owner.user.unwrap_or_default(),
            nova.owner.user_id.unwrap_or_default(),
            nova.owner.flavor.unwrap_or_default(),
        ];
        if self.infos.get(&p.vm) == Some(&labels) {
            return;
        }
        if let Some(old) = self.infos.insert(p.vm.clone(), labels.clone()) {
            let _ = self.metrics.vm_info.remove_label_values(&old.each_ref().map(String::as_str));
        }
        self.metrics.vm_info.with_label_values(&labels.each_ref().map(String::as_str)).set(1);
    }

    fn counter(&self, fam: Family, vm: &str, path: &str) -> IntCounter {
        let m = &self.metrics;
        match fam {
            Family::Wbinvd => m.wbinvd_exits.with_label_values(&[vm, path]),
            Family::Invd => m.invd_exits.with_label_values(&[vm, path]),
            Family::Handled => m.wbinvd_handled.with_label_values(&[vm, path]),
            Family::Flushes => m.wbinvd_flushes.with_label_values(&[vm]),
        }
    }

    /// A VM is known: its event counters exist at zero.
    pub fn create(&mut self, vm: &str) {
        if !self.vms.insert(vm.to_string()) {
            return;
        }
        for d in Decision::ALL {
            self.metrics.incoherent_dma_requests.with_label_values(&[vm, d.label()]);
        }
        for c in Coherency::ALL {
            self.metrics.vfio_file_adds.with_label_values(&[vm, c.label()]);
        }
        self.metrics.dos_alerts.with_label_values(&[vm]);
        if self.blast {
            self.metrics.wbinvd_ipis_received.with_label_values(&[vm]);
            self.metrics.wbinvd_stolen_seconds.with_label_values(&[vm]);
        }
    }

    /// One VFIO file added to the VM, judged or not.
    pub fn file_add(&mut self, vm: &str, c: Coherency) {
        self.create(vm);
        self.metrics.vfio_file_adds.with_label_values(&[vm, c.label()]).inc();
    }

    /// One judged incoherent-DMA enable.
    pub fn request(&mut self, vm: &str, decision: Decision) {
        self.create(vm);
        self.metrics.incoherent_dma_requests.with_label_values(&[vm, decision.label()]).inc();
    }

    /// One storm alert raised.
    pub fn alert(&mut self, vm: &str) {
        self.create(vm);
        self.metrics.dos_alerts.with_label_values(&[vm]).inc();
    }

    pub fn set_gauges(&mut self, vm: &str, g: &VmGauges) {
        self.create(vm);
        let m = &self.metrics;
        m.wbinvd_rate.with_label_values(&[vm]).set(g.rate);
        m.wbinvd_cost_ratio.with_label_values(&[vm]).set(g.cost_ratio);
        m.wbinvd_storm.with_label_values(&[vm]).set(i64::from(g.storm));
        m.vm_noncoherent.with_label_values(&[vm]).set(i64::from(g.noncoherent));
    }

    /// Brings the counters and histograms up to the current per-VM totals (by increments, so
    /// they only go up) and forgets every VM that is no longer in them.
    pub fn set_totals(&mut self, totals: &VmTotals) {
        for (vm, (t, _)) in totals {
            self.create(vm);
            self.add(vm, t);
        }
        let gone: Vec<String> = self.vms.iter().filter(|vm| !totals.contains_key(*vm)).cloned().collect();
        for vm in gone {
            self.forget(&vm);
        }
        let per_vm: BTreeMap<_, _> = totals
            .iter()
            .filter(|(_, (_, c))| c.buckets.iter().any(|n| *n > 0))
            .map(|(vm, (_, c))| (vm.clone(), c.clone()))
            .collect();
        self.metrics.cost.lock().unwrap_or_else(|e| e.into_inner()).per_vm = per_vm;
    }

    fn add(&mut self, vm: &str, t: &Totals) {
        for (&(op, path), &v) in t {
            let Some((fam, label)) = series(op, path) else { continue };
            let before = self.exported.get(&(vm.to_string(), op, path)).copied().unwrap_or(0);
            if v > before {
                self.counter(fam, vm, label).inc_by(v - before);
                self.exported.insert((vm.to_string(), op, path), v);
            }
        }
    }

    /// Blast radius since the last sweep: IPIs sent and received and time stolen, per VM.
    pub fn blast(&mut self, d: &crate::engine::blast::Delta) {
        let m = &self.metrics;
        for (vm, n) in &d.sent {
            m.wbinvd_ipis_sent.with_label_values(&[vm]).inc_by(*n);
        }
        for (vm, n) in &d.received {
            m.wbinvd_ipis_received.with_label_values(&[vm]).inc_by(*n);
        }
        for (vm, ns) in &d.stolen_ns {
            m.wbinvd_stolen_seconds.with_label_values(&[vm]).inc_by(*ns as f64 / 1e9);
        }
    }

    /// A VM's share of time stolen by other VMs' flushes against its budget; true when it has
    /// just gone over.
    pub fn victim_share(&mut self, vm: &str, ratio: f64, budget: f64) -> bool {
        self.metrics.wbinvd_victim_stolen_ratio.with_label_values(&[vm]).set(ratio);
        let over = self.metrics.wbinvd_victim_over_budget.with_label_values(&[vm]);
        let now_over = ratio > budget;
        let went_over = now_over && over.get() == 0;
        over.set(i64::from(now_over));
        went_over
    }

    /// Who hurt whom: the victim's top flushers over its last window replace the ones it named.
    pub fn hurt_by(&mut self, victim: &str, top: &[(String, f64)]) {
        let g = &self.metrics.wbinvd_victim_flusher_seconds;
        for old in self.hurt_by.remove(victim).unwrap_or_default() {
            let _ = g.remove_label_values(&[victim, &old]);
        }
        for (flusher, secs) in top {
            g.with_label_values(&[victim, flusher]).set(*secs);
        }
        if !top.is_empty() {
            self.hurt_by.insert(victim.to_string(), top.iter().map(|(f, _)| f.clone()).collect());
        }
    }

    /// Removes every series of `vm`.
    pub fn forget(&mut self, vm: &str) {
        let m = &self.metrics;
        let keys: Vec<(String, Op, Path)> =
            self.exported.keys().filter(|(v, _, _)| v == vm).cloned().collect();
        for key in keys {
            self.exported.remove(&key);
            if let Some((fam, label)) = series(key.1, key.2) {
                let _ = match fam {
                    Family::Wbinvd => m.wbinvd_exits.remove_label_values(&[vm, label]),
                    Family::Invd => m.invd_exits.remove_label_values(&[vm, label]),
                    Family::Handled => m.wbinvd_handled.remove_label_values(&[vm, label]),
                    Family::Flushes => m.wbinvd_flushes.remove_label_values(&[vm]),
                };
            }
        }
        let _ = m.wbinvd_cost_ratio.remove_label_values(&[vm]);
        let _ = m.wbinvd_rate.remove_label_values(&[vm]);
        let _ = m.wbinvd_storm.remove_label_values(&[vm]);
        let _ = m.vm_noncoherent.remove_label_values(&[vm]);
        let _ = m.dos_alerts.remove_label_values(&[vm]);
        let _ = m.wbinvd_ipis_received.remove_label_values(&[vm]);
        let _ = m.wbinvd_stolen_seconds.remove_label_values(&[vm]);
        let _ = m.wbinvd_ipis_sent.remove_label_values(&[vm]);
        let _ = m.wbinvd_victim_stolen_ratio.remove_label_values(&[vm]);
        let _ = m.wbinvd_victim_over_budget.remove_label_values(&[vm]);
        for flusher in self.hurt_by.remove(vm).unwrap_or_default() {
            let _ = m.wbinvd_victim_flusher_seconds.remove_label_values(&[vm, &flusher]);
        }
        if let Some(old) = self.infos.remove(vm) {
            let _ = m.vm_info.remove_label_values(&old.each_ref().map(String::as_str));
        }
        for d in Decision::ALL {
            let _ = m.incoherent_dma_requests.remove_label_values(&[vm, d.label()]);
        }
        for c in Coherency::ALL {
            let _ = m.vfio_file_adds.remove_label_values(&[vm, c.label()]);
        }
        self.vms.remove(vm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::accounting::CostHist;

    fn value(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let fams = m.registry.gather();
        let fam = fams.iter().find(|f| f.name() == name)?;
        fam.get_metric()
            .iter()
            .find(|x| {
                labels.iter().all(|(k, v)| x.get_label().iter().any(|l| l.name() == *k && l.value() == *v))
            })
            .map(|x| match fam.get_field_type() {
                prometheus::proto::MetricType::COUNTER => x.get_counter().get_value(),
                _ => x.get_gauge().get_value(),
            })
    }

    #[test]
    fn a_vm_series_lives_from_creation_to_forgetting() {
        let m = Metrics::new();
        let mut s = VmSeries::new(m.clone());
        s.create("gpu-1");
        let requests = "ioasid_incoherent_dma_requests_total";
        assert_eq!(value(&m, requests, &[("vm", "gpu-1"), ("decision", "denied")]), Some(0.0));
        s.request("gpu-1", Decision::Denied);
        assert_eq!(value(&m, requests, &[("vm", "gpu-1"), ("decision", "denied")]), Some(1.0));
        let mut t = Totals::new();
        t.insert((Op::Wbinvd, Path::Exit), 5);
        t.insert((Op::Wbinvd, Path::Flushed), 5);
        let mut totals = VmTotals::new();
        totals.insert("gpu-1".into(), (t.clone(), CostHist::default()));
        s.set_totals(&totals);
        t.insert((Op::Wbinvd, Path::Exit), 7);
        totals.insert("gpu-1".into(), (t, CostHist::default()));
        s.set_totals(&totals);
        assert_eq!(value(&m, "ioasid_wbinvd_exits_total", &[("vm", "gpu-1"), ("path", "exit")]), Some(7.0));
        assert_eq!(value(&m, "ioasid_wbinvd_flushes_total", &[("vm", "gpu-1")]), Some(5.0));
        s.set_gauges("gpu-1", &VmGauges { rate: 3.0, storm: true, ..VmGauges::default() });
        assert_eq!(value(&m, "ioasid_wbinvd_storm", &[("vm", "gpu-1")]), Some(1.0));
        s.set_totals(&VmTotals::new());
        for name in ["ioasid_wbinvd_exits_total", "ioasid_wbinvd_storm", requests, "ioasid_dos_alerts_total"]
        {
            assert_eq!(value(&m, name, &[("vm", "gpu-1")]), None, "{name} forgotten");
        }
    }
}
