//! Every Prometheus metric the agent exports, defined in one place.
//!
//! Names and labels marked "contract" are promised in the README and used by the dashboards
//! and alert rules: never rename them. Labels are bounded: `vm` is one value per VM on the
//! host, everything else is a fixed set. No pid or path labels.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use ioasid_common::{COST_BUCKETS_NS, FLUSH_CPUS_LEN, FLUSH_CPU_BUCKETS};
use prometheus::{
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
    Encoder, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
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

/// What the histogram collector exports, replaced by each sweep.
#[derive(Debug, Default)]
pub struct CostSnapshot {
    pub per_vm: BTreeMap<String, CostHist>,
    pub flush_cpus: [u64; FLUSH_CPUS_LEN as usize],
}

/// Exports `ioasid_wbinvd_handler_seconds{vm}` and `ioasid_wbinvd_flush_cpus` from kernel counts
/// (the prometheus crate's own histograms only take observations one by one).
#[derive(Clone)]
struct HistCollector {
    descs: Vec<Desc>,
    snap: Arc<Mutex<CostSnapshot>>,
}

/// A histogram from per-bucket counts; `per_bucket` has one more entry than `bounds` (+Inf),
/// which only enters the total count.
fn histogram(bounds: impl Iterator<Item = f64>, per_bucket: &[u64], sum: f64) -> proto::Histogram {
    let mut h = proto::Histogram::default();
    let mut cumulative = 0;
    let buckets = bounds
        .zip(per_bucket.iter())
        .map(|(upper, n)| {
            cumulative += n;
            let mut b = proto::Bucket::default();
            b.set_upper_bound(upper);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    h.set_bucket(buckets);
    h.set_sample_count(per_bucket.iter().sum());
    h.set_sample_sum(sum);
    h
}

fn family(name: &str, help: &str, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(MetricType::HISTOGRAM);
    f.set_metric(metrics);
    f
}

const HANDLER_HELP: &str =
    "Time KVM spent handling each guest WBINVD, by VM (source: see ioasid_wbinvd_cost_source).";
const FLUSH_CPUS_HELP: &str =
    "Physical CPUs reached by each WBINVD flush (needs fentry on wbinvd_on_cpus_mask).";

impl Collector for HistCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snap = self.snap.lock().unwrap_or_else(|e| e.into_inner());
        let bounds = || COST_BUCKETS_NS.iter().map(|ns| *ns as f64 / 1e9);
        let per_vm = snap
            .per_vm
            .iter()
            .map(|(vm, h)| {
                let mut m = proto::Metric::default();
                let mut l = proto::LabelPair::default();
                l.set_name("vm".into());
                l.set_value(vm.clone());
                m.set_label(vec![l]);
                m.set_histogram(histogram(bounds(), &h.buckets, h.sum_ns as f64 / 1e9));
                m
            })
            .collect();
        let mut flush = proto::Metric::default();
        flush.set_histogram(histogram(
            FLUSH_CPU_BUCKETS.iter().map(|b| f64::from(*b)),
            &snap.flush_cpus,
            0.0,
        ));
        vec![
            family("ioasid_wbinvd_handler_seconds", HANDLER_HELP, per_vm),
            family("ioasid_wbinvd_flush_cpus", FLUSH_CPUS_HELP, vec![flush]),
        ]
    }
}

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
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
    pub kernel_errors: IntCounterVec,
    pub event_decode_errors: IntCounter,
    /// contract: constant 1 with the version.
    pub build_info: IntGaugeVec,
    pub vms: IntGauge,
    /// contract: incoherent-DMA enables by decision = allowed | audited | denied.
    pub incoherent_dma_requests: IntCounterVec,
    /// contract: VMs with non-coherent DMA registered (where the kernel transition is observable).
    pub noncoherent_vms: IntGauge,
    /// 1 while the VM has non-coherent DMA (its WBINVD really flush).
    pub vm_noncoherent: IntGaugeVec,
    /// contract: policy reloads by result = success | failure.
    pub policy_reloads: IntCounterVec,
    /// 1 for the enforcement mechanism in use: lsm | sigkill | none.
    pub enforcement_mechanism: IntGaugeVec,
    pub ioctls: IntCounterVec,
    pub audit_dropped: IntCounter,
    /// BPF program runs and in-kernel run time (only with --bpf-stats).
    pub program_runs: IntCounterVec,
    pub program_run_seconds: prometheus::CounterVec,
    /// Histogram data for `ioasid_wbinvd_handler_seconds` and `ioasid_wbinvd_flush_cpus`.
    pub cost: Arc<Mutex<CostSnapshot>>,
    /// contract: WBINVD that really flushed caches (the VM had non-coherent DMA).
    pub wbinvd_flushes: IntCounterVec,
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
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntGaugeVec::new(Opts::new(name, help), labels))
        };
        let float_gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, GaugeVec::new(Opts::new(name, help), labels))
        };
        let counter = |name: &str, help: &str| register(&registry, IntCounter::new(name, help));
        let gauge = |name: &str, help: &str| register(&registry, IntGauge::new(name, help));
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
            audit_dropped: counter(
                "ioasid_audit_records_dropped_total",
                "Audit records lost because the audit queue was full.",
            ),
            program_runs: counter_vec(
                "ioasid_program_runs_total",
                "Runs of each attached kernel program (with --bpf-stats).",
                &["hook"],
            ),
            program_run_seconds: register(
                &registry,
                prometheus::CounterVec::new(
                    Opts::new(
                        "ioasid_program_run_seconds_total",
                        "In-kernel run time of each attached kernel program (with --bpf-stats; the measuring itself adds a little).",
                    ),
                    &["hook"],
                ),
            ),
            cost: {
                let snap = Arc::new(Mutex::new(CostSnapshot::default()));
                let descs = vec![
                    Desc::new("ioasid_wbinvd_handler_seconds".into(), HANDLER_HELP.into(), vec!["vm".into()], Default::default())
                        .expect("valid metric definition"),
                    Desc::new("ioasid_wbinvd_flush_cpus".into(), FLUSH_CPUS_HELP.into(), vec![], Default::default())
                        .expect("valid metric definition"),
                ];
                register(&registry, Ok(HistCollector { descs, snap: snap.clone() }));
                snap
            },
            wbinvd_flushes: counter_vec(
                "ioasid_wbinvd_flushes_total",
                "Guest WBINVD that really flushed caches: the VM had non-coherent DMA.",
                &["vm"],
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
            registry,
        };
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for result in ["success", "failure"] {
            m.policy_reloads.with_label_values(&[result]);
        }
        for kind in KERNEL_ERROR_KINDS {
            m.kernel_errors.with_label_values(&[kind]);
        }
        m
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

/// Registers a metric defined from constants: a failure is a programming error, which the unit
/// tests (every one builds a `Metrics`) catch.
fn register<M: Collector + Clone + 'static>(registry: &Registry, m: Result<M, prometheus::Error>) -> M {
    let m = m.expect("valid metric definition");
    registry.register(Box::new(m.clone())).expect("unique metric");
    m
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `kind` label values of `ioasid_kernel_errors_total`, in `Stat` order after EventsDropped.
pub const KERNEL_ERROR_KINDS: [&str; 4] = ["counter_map_full", "read_error", "inflight_full", "signal_error"];
