//! Every Prometheus metric the agent exports, defined in one place.
//!
//! Names and labels marked "contract" are promised in the README and used by the dashboards
//! and alert rules: never rename them. Labels are bounded: `vm` is one value per VM on the
//! host, everything else is a fixed set. No pid or path labels.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

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
    /// contract: policy reloads by result = success | failure.
    pub policy_reloads: IntCounterVec,
    /// 1 for the enforcement mechanism in use: lsm | sigkill | none.
    pub enforcement_mechanism: IntGaugeVec,
    pub ioctls: IntCounterVec,
    pub audit_dropped: IntCounter,
    /// BPF program runs and in-kernel run time (only with --bpf-stats).
    pub program_runs: IntCounterVec,
    pub program_run_seconds: prometheus::CounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            registry.register(Box::new(m.clone())).expect("unique metric");
            m
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let m = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            registry.register(Box::new(m.clone())).expect("unique metric");
            m
        };
        let counter = |name: &str, help: &str| {
            let m = IntCounter::new(name, help).expect("valid metric definition");
            registry.register(Box::new(m.clone())).expect("unique metric");
            m
        };
        let gauge = |name: &str, help: &str| {
            let m = IntGauge::new(name, help).expect("valid metric definition");
            registry.register(Box::new(m.clone())).expect("unique metric");
            m
        };
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
                "VMs for which KVM has registered non-coherent DMA (needs fentry on kvm_arch_register_noncoherent_dma).",
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
            program_run_seconds: {
                let m = prometheus::CounterVec::new(
                    Opts::new(
                        "ioasid_program_run_seconds_total",
                        "In-kernel run time of each attached kernel program (with --bpf-stats; the measuring itself adds a little).",
                    ),
                    &["hook"],
                )
                .expect("valid metric definition");
                registry.register(Box::new(m.clone())).expect("unique metric");
                m
            },
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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `kind` label values of `ioasid_kernel_errors_total`, in `Stat` order after EventsDropped.
pub const KERNEL_ERROR_KINDS: [&str; 4] = ["counter_map_full", "read_error", "inflight_full", "signal_error"];
