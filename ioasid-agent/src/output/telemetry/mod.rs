//! Every Prometheus metric the agent exports, defined in one place.
//!
//! Names and labels marked "contract" are promised in the README and used by the dashboards
//! and alert rules: never rename them. Labels are bounded: `vm` is one value per VM on the
//! host, everything else is a fixed set. No pid or path labels. Per-VM series are created,
//! set and forgotten by [`vm::VmSeries`] alone; the histograms are in [`hist`].

mod hist;
pub mod vm;

use std::sync::{Arc, Mutex};

use ioasid_common::counters::Stat;
use prometheus::{
    core::Collector, Encoder, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub use self::hist::CostSnapshot;
use self::hist::HistCollector;

/// One metric family as the reference documents it (docs/metrics.md, `cargo xtask docs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricDoc {
    pub name: String,
    pub kind: &'static str,
    pub labels: Vec<String>,
    pub help: String,
}

/// The kind of a collector, for the reference.
trait Kind {
    const KIND: &'static str;
}

macro_rules! kinds {
    ($($t:ty => $k:literal),+ $(,)?) => { $(impl Kind for $t { const KIND: &'static str = $k; })+ };
}

kinds! {
    IntCounterVec => "counter",
    prometheus::CounterVec => "counter",
    IntCounter => "counter",
    IntGaugeVec => "gauge",
    GaugeVec => "gauge",
    IntGauge => "gauge",
    HistCollector => "histogram",
}

/// A registry that also keeps each family's description, in registration order.
struct Registrar {
    registry: Registry,
    docs: std::cell::RefCell<Vec<MetricDoc>>,
}

impl Registrar {
    /// Registers a metric defined from constants: a failure is a programming error, which the
    /// unit tests (every one builds a `Metrics`) catch.
    fn register<M: Collector + Clone + Kind + 'static>(&self, m: Result<M, prometheus::Error>) -> M {
        let m = m.expect("valid metric definition");
        self.document(&m, M::KIND);
        self.registry.register(Box::new(m.clone())).expect("unique metric");
        m
    }

    fn document(&self, c: &dyn Collector, kind: &'static str) {
        let mut docs = self.docs.borrow_mut();
        for d in c.desc() {
            // Counters are registered under their name without `_total`'s exposition suffix
            // doubled: the name is what the exposition shows.
            let kind = if kind == "gauge" && d.fq_name.ends_with("_total") { "counter" } else { kind };
            docs.push(MetricDoc {
                name: d.fq_name.clone(),
                kind,
                labels: d.variable_labels.clone(),
                help: d.help.clone(),
            });
        }
    }
}

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Every family's description, for the reference (docs/metrics.md).
    pub docs: Arc<Vec<MetricDoc>>,
    /// contract: guest WBINVD executions, path = exit | emulated.
    pub wbinvd_exits: IntCounterVec,
    /// contract: guest INVD executions, path = exit | emulated.
    pub invd_exits: IntCounterVec,
    /// WBINVD handler invocations seen by fexit (only where trampolines load).
    pub wbinvd_handled: IntCounterVec,
    /// contract: 1 if the hook is attached, 0 if it was refused.
    pub hook_attached: IntGaugeVec,
    /// contract: events lost (kernel ring buffer full, or the agent's queue full).
    pub events_dropped: IntCounter,
    pub ioctls_ignored: IntCounter,
    pub kernel_errors: IntCounterVec,
    pub event_decode_errors: IntCounter,
    /// contract: constant 1 with the version.
    pub build_info: IntGaugeVec,
    pub vms: IntGauge,
    /// contract: incoherent-DMA enables by decision = allowed | audited | denied.
    pub incoherent_dma_requests: IntCounterVec,
    /// contract: every FILE_ADD by VM and coherency = coherent | noncoherent | unknown.
    pub vfio_file_adds: IntCounterVec,
    /// The kernel's own coherency verdict disagreed with sysfs's (the kernel's wins).
    pub coherency_disagreements: IntCounter,
    /// contract: VMs with non-coherent DMA registered (where the kernel transition is observable).
    pub noncoherent_vms: IntGauge,
    /// 1 while the VM has non-coherent DMA (its WBINVD really flush).
    pub vm_noncoherent: IntGaugeVec,
    /// contract: policy reloads by result = success | failure.
    pub policy_reloads: IntCounterVec,
    pub policy_info: IntGaugeVec,
    pub vm_info: IntGaugeVec,
    /// 1 for the enforcement mechanism in use: lsm | sigkill | none.
    pub enforcement_mechanism: IntGaugeVec,
    pub ioctls: IntCounterVec,
    pub audit_dropped: IntCounterVec,
    pub audit_aggregated: IntCounter,
    pub exited_dropped: IntCounter,
    /// BPF program runs and in-kernel run time (only with --bpf-stats).
    pub program_runs: IntCounterVec,
    pub program_misses: IntCounterVec,
    pub program_run_seconds: prometheus::CounterVec,
    pub wbinvd_ipis_received: IntCounterVec,
    pub wbinvd_stolen_seconds: prometheus::CounterVec,
    pub wbinvd_ipis_sent: IntCounterVec,
    pub wbinvd_victim_stolen_ratio: GaugeVec,
    pub wbinvd_victim_over_budget: IntGaugeVec,
    pub wbinvd_victim_flusher_seconds: GaugeVec,
    /// Histogram data for `ioasid_wbinvd_handler_seconds` and `ioasid_wbinvd_flush_cpus`.
    pub cost: Arc<Mutex<CostSnapshot>>,
    /// contract: WBINVD that really flushed caches (the VM had non-coherent DMA).
    pub wbinvd_flushes: IntCounterVec,
    /// contract: every guest's WBINVD/INVD and flushes since the agent started, exited VMs'
    /// included (the per-VM series forget a VM after its retention).
    pub host_wbinvd_exits: IntCounterVec,
    pub host_invd_exits: IntCounterVec,
    pub host_wbinvd_flushes: IntCounter,
    /// contract: handler time over wall time, last window.
    pub wbinvd_cost_ratio: GaugeVec,
    /// WBINVD per second, last window.
    pub wbinvd_rate: GaugeVec,
    /// contract: 1 while a VM is over its WBINVD budget.
    pub wbinvd_storm: IntGaugeVec,
    /// contract: storm alerts raised.
    pub dos_alerts: IntCounterVec,
    /// 1 for the source timing WBINVD handling: handlers | tracepoint-pairs.
    pub wbinvd_cost_source: IntGaugeVec,
    /// 1 for the program family serving the ioctl path: functions | lsm | tp-btf | tracepoint.
    pub ioctl_path: IntGaugeVec,
    /// 1 for the programs counting WBINVD/INVD: handlers | tracepoints.
    pub wbinvd_count_source: IntGaugeVec,
}

impl Metrics {
    /// The counters the audit logs keep.
    pub fn audit_counters(&self) -> crate::output::audit::AuditCounters {
        crate::output::audit::AuditCounters {
            dropped: self.audit_dropped.clone(),
            aggregated: self.audit_aggregated.clone(),
        }
    }

    pub fn new() -> Self {
        let r = Registrar { registry: Registry::new(), docs: Default::default() };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            r.register(IntCounterVec::new(Opts::new(name, help), labels))
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            r.register(IntGaugeVec::new(Opts::new(name, help), labels))
        };
        let float_gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            r.register(GaugeVec::new(Opts::new(name, help), labels))
        };
        let counter = |name: &str, help: &str| r.register(IntCounter::new(name, help));
        let gauge = |name: &str, help: &str| r.register(IntGauge::new(name, help));
        let m = Self {
            wbinvd_exits: counter_vec(
                "ioasid_wbinvd_exits_total",
                "Guest WBINVD instructions handled by KVM, by VM and path (exit: hardware VM exit; emulated: KVM's instruction emulator).",
                &["vm", "path"],
            ),
            invd_exits: counter_vec(
                "ioasid_invd_exits_total",
                "Guest INVD instructions handled by KVM, by VM and path.",
                &["vm", "path"],
            ),
            wbinvd_handled: counter_vec(
                "ioasid_wbinvd_handled_total",
                "KVM WBINVD handler invocations seen by fexit (kvm_emulate_wbinvd, emulator_wbinvd), by VM and path.",
                &["vm", "path"],
            ),
            hook_attached: gauge_vec(
                "ioasid_hook_attached",
                "1 if the kernel hook is attached, 0 if the kernel refused it.",
                &["hook"],
            ),
            events_dropped: counter(
                "ioasid_events_dropped_total",
                "Events lost because the kernel ring buffer or the agent's event queue was full (counters stay exact).",
            ),
            ioctls_ignored: counter(
                "ioasid_ioctls_ignored_total",
                "Watched ioctl request numbers issued on files that are not KVM, VFIO or iommufd files (anyone can; not reported further).",
            ),
            kernel_errors: counter_vec(
                "ioasid_kernel_errors_total",
                "Errors counted by the kernel programs, by kind.",
                &["kind"],
            ),
            event_decode_errors: counter(
                "ioasid_event_decode_errors_total",
                "Ring buffer records the agent could not decode.",
            ),
            build_info: gauge_vec("ioasid_build_info", "Constant 1, labelled with the agent version.", &["version"]),
            vms: gauge("ioasid_vms", "VMM processes the agent currently tracks."),
            incoherent_dma_requests: counter_vec(
                "ioasid_incoherent_dma_requests_total",
                "Incoherent-DMA enables (KVM_DEV_VFIO_FILE_ADD) by VM and decision.",
                &["vm", "decision"],
            ),
            vfio_file_adds: counter_vec(
                "ioasid_vfio_file_adds_total",
                "VFIO files added to VMs (KVM_DEV_VFIO_FILE_ADD), by VM and the coherency they were judged by; only noncoherent (and unknown, unless the policy lets it through) ones are incoherent-DMA enables.",
                &["vm", "coherency"],
            ),
            coherency_disagreements: counter(
                "ioasid_coherency_disagreements_total",
                "FILE_ADDs where the kernel's own coherency verdict (fexit vfio_file_enforced_coherent) disagreed with the IOMMU's as read from sysfs; the kernel's wins.",
            ),
            noncoherent_vms: gauge(
                "ioasid_noncoherent_vms",
                "Live VMs with non-coherent DMA: KVM registered it (fentry), or a FILE_ADD of a device whose IOMMU does not enforce coherency succeeded.",
            ),
            vm_noncoherent: gauge_vec(
                "ioasid_vm_noncoherent",
                "1 while the VM has non-coherent DMA, so KVM really executes its WBINVD.",
                &["vm"],
            ),
            policy_reloads: counter_vec("ioasid_policy_reloads_total", "Policy reloads by result.", &["result"]),
            vm_info: gauge_vec(
                "ioasid_vm_info",
                "1 per VM: its manager (qemu, libvirt, proxmox, kubevirt, openstack) and what that knows it by (KubeVirt namespace, name and pod UID; Proxmox VMID; OpenStack server name, project, user and flavor), its UUID, node and VMM program, to join with the manager's own series.",
                &[
                    "vm",
                    "namespace",
                    "name",
                    "uuid",
                    "node",
                    "vmm",
                    "manager",
                    "vmid",
                    "pod_uid",
                    "project",
                    "project_id",
                    "user",
                    "user_id",
                    "flavor",
                ],
            ),
            policy_info: gauge_vec(
                "ioasid_policy_info",
                "The policy in force (value 1): SHA-256 of its file's bytes and its number of rules.",
                &["sha256", "rules"],
            ),
            enforcement_mechanism: gauge_vec(
                "ioasid_enforcement_mechanism",
                "1 for the in-kernel enforcement mechanism in use on this host.",
                &["mechanism"],
            ),
            ioctls: counter_vec(
                "ioasid_ioctls_total",
                "Watched KVM/VFIO/iommufd ioctls seen, by request.",
                &["request"],
            ),
            audit_dropped: counter_vec(
                "ioasid_audit_records_dropped_total",
                "Audit records a sink lost (its queue full, or a write failed), by sink: file | stdout | syslog | record.",
                &["sink"],
            ),
            audit_aggregated: counter(
                "ioasid_audit_records_aggregated_total",
                "Incoherent-DMA records of flooding processes counted into incoherent-dma-aggregated records instead of written one by one.",
            ),
            exited_dropped: counter(
                "ioasid_exited_vms_dropped_total",
                "Exited VMM processes forgotten before their retention ended: more than 1024 were kept.",
            ),
            program_runs: counter_vec(
                "ioasid_program_runs_total",
                "Runs of each attached kernel program (with --bpf-stats).",
                &["hook"],
            ),
            program_misses: counter_vec(
                "ioasid_program_misses_total",
                "Runs of each attached kernel program that the kernel skipped (it was already running on that CPU, or another BPF program or syscall held the CPU): events not counted. Nonzero on kernels with lazy or full preemption under load.",
                &["hook"],
            ),
            program_run_seconds: r.register(
                prometheus::CounterVec::new(
                    Opts::new(
                        "ioasid_program_run_seconds_total",
                        "In-kernel run time of each attached kernel program (with --bpf-stats; the measuring itself adds a little).",
                    ),
                    &["hook"],
                ),
            ),
            wbinvd_ipis_received: counter_vec(
                "ioasid_wbinvd_ipis_received_total",
                "WBINVD flush IPIs that interrupted this VM's vCPU threads (vm=\"host\": any other process), the flusher's own CPU excluded. Absent where the kernel lacks the hooks (status says why).",
                &["vm"],
            ),
            wbinvd_stolen_seconds: r.register(
                prometheus::CounterVec::new(
                    Opts::new(
                        "ioasid_wbinvd_stolen_seconds_total",
                        "Time other VMs' WBINVD flushes took on this VM's CPUs, on top of its vCPU threads (vm=\"host\": any other process).",
                    ),
                    &["vm"],
                ),
            ),
            wbinvd_ipis_sent: counter_vec(
                "ioasid_wbinvd_ipis_sent_total",
                "WBINVD flush IPIs this VM's flushes sent to other CPUs (idle ones included).",
                &["vm"],
            ),
            wbinvd_victim_stolen_ratio: float_gauge_vec(
                "ioasid_wbinvd_victim_stolen_ratio",
                "Share of time other VMs' flushes took from this VM over its budget window.",
                &["vm"],
            ),
            wbinvd_victim_over_budget: gauge_vec(
                "ioasid_wbinvd_victim_over_budget",
                "1 while this VM loses more than its budget's victim_stolen_ratio to other VMs' flushes.",
                &["vm"],
            ),
            wbinvd_victim_flusher_seconds: float_gauge_vec(
                "ioasid_wbinvd_victim_flusher_seconds",
                "Who hurt whom: the time each of a victim VM's top 3 flusher VMs took from it over its last budget window (bounded: 3 series per victim).",
                &["vm", "flusher"],
            ),
            cost: {
                let (collector, snap) = HistCollector::new();
                r.register(Ok(collector));
                snap
            },
            wbinvd_flushes: counter_vec(
                "ioasid_wbinvd_flushes_total",
                "Guest WBINVD that really flushed caches: the VM had non-coherent DMA.",
                &["vm"],
            ),
            host_wbinvd_exits: counter_vec(
                "ioasid_host_wbinvd_exits_total",
                "Guest WBINVD instructions handled by KVM on this host, every VM's (exited and forgotten ones included), by path.",
                &["path"],
            ),
            host_invd_exits: counter_vec(
                "ioasid_host_invd_exits_total",
                "Guest INVD instructions handled by KVM on this host, every VM's (exited and forgotten ones included), by path.",
                &["path"],
            ),
            host_wbinvd_flushes: counter(
                "ioasid_host_wbinvd_flushes_total",
                "Guest WBINVD that really flushed caches on this host, every VM's (exited and forgotten ones included).",
            ),
            wbinvd_cost_ratio: float_gauge_vec(
                "ioasid_wbinvd_cost_ratio",
                "Time KVM spent handling the VM's WBINVD over wall time, last budget window (can exceed 1 with several vCPUs).",
                &["vm"],
            ),
            wbinvd_rate: float_gauge_vec(
                "ioasid_wbinvd_rate",
                "Guest WBINVD per second, last budget window.",
                &["vm"],
            ),
            wbinvd_storm: gauge_vec("ioasid_wbinvd_storm", "1 while the VM is over its WBINVD budget.", &["vm"]),
            dos_alerts: counter_vec("ioasid_dos_alerts_total", "WBINVD storm alerts raised, by VM.", &["vm"]),
            wbinvd_cost_source: gauge_vec(
                "ioasid_wbinvd_cost_source",
                "1 for the source timing WBINVD handling: handlers (fentry/fexit) or tracepoint-pairs.",
                &["source"],
            ),
            ioctl_path: gauge_vec(
                "ioasid_ioctl_path",
                "1 for the program family serving the ioctl path: functions (KVM's, VFIO's and iommufd's own: nothing else pays), lsm (no syscall tracepoint), tp-btf or tracepoint.",
                &["family"],
            ),
            wbinvd_count_source: gauge_vec(
                "ioasid_wbinvd_count_source",
                "1 for the programs counting guest WBINVD/INVD: handlers (KVM's handler functions only), tracepoints (kvm_exit and kvm_emulate_insn, run on every VM exit and emulated instruction) or incomplete (a path is not counted: a tracepoint refused, with --no-strict).",
                &["source"],
            ),
            registry: r.registry.clone(),
            docs: Arc::new(Vec::new()),
        };
        // The agent's own health: CPU, resident memory, open fds against the limit, threads,
        // start time (process_* series, the common names).
        let process = prometheus::process_collector::ProcessCollector::for_self();
        r.document(&process, "gauge");
        if let Err(e) = m.registry.register(Box::new(process)) {
            tracing::warn!(error = %e, "the process collector could not be registered");
        }
        let m = Metrics { docs: Arc::new(r.docs.into_inner()), ..m };
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for result in ["success", "failure"] {
            m.policy_reloads.with_label_values(&[result]);
        }
        // The host's totals exist at zero from the start, so rate() catches the first WBINVD.
        for path in ["exit", "emulated"] {
            m.host_wbinvd_exits.with_label_values(&[path]);
            m.host_invd_exits.with_label_values(&[path]);
        }
        for stat in Stat::ALL.iter().filter(|s| !matches!(s, Stat::EventsDropped | Stat::IgnoredRequests)) {
            m.kernel_errors.with_label_values(&[stat.label()]);
        }
        m
    }

    /// The host's totals (never forgetting a VM) brought up to `host`, by increments.
    pub fn set_host_totals(&self, host: &crate::engine::accounting::Totals) {
        for (&(op, path), &v) in host {
            let c = match vm::series(op, path) {
                Some((vm::Family::Wbinvd, label)) => self.host_wbinvd_exits.with_label_values(&[label]),
                Some((vm::Family::Invd, label)) => self.host_invd_exits.with_label_values(&[label]),
                Some((vm::Family::Flushes, _)) => self.host_wbinvd_flushes.clone(),
                _ => continue,
            };
            c.inc_by(v.saturating_sub(c.get()));
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }
}

/// The metrics reference: every family the agent exports, as a Markdown table (docs/metrics.md
/// holds it between markers; `cargo xtask docs` rewrites it, a test fails when it is stale).
pub fn reference() -> String {
    let mut out = String::from("| metric | type | labels | meaning |\n|---|---|---|---|\n");
    for d in Metrics::new().docs.iter() {
        let labels: Vec<String> = d.labels.iter().map(|l| format!("`{l}`")).collect();
        let help = d.help.replace('|', "\\|");
        out.push_str(&format!("| `{}` | {} | {} | {help} |\n", d.name, d.kind, labels.join(", ")));
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
