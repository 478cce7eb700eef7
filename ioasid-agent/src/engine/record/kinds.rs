//! The enumerations of audit records: serde enums whose `label()` is also the metric label.

use crate::{engine::policy::Action, util::text_enum};

text_enum! {
    /// The kind of an audit record (`event`).
    pub enum RecordKind {
        IncoherentDma => "incoherent-dma",
        /// One process's incoherent-DMA records over a second of its flood, counted.
        IncoherentDmaAggregated => "incoherent-dma-aggregated",
        /// A FILE_ADD that was not an incoherent-DMA enable: observed, not judged.
        VfioFileAdd => "vfio-file-add",
        WbinvdStorm => "wbinvd-storm",
        /// Who one flusher's WBINVD flushes hurt over its window (blast radius).
        WbinvdBlast => "wbinvd-blast",
    }
}

text_enum! {
    /// An incoherent-DMA decision: the `decision` label of `ioasid_incoherent_dma_requests_total`.
    pub enum Decision {
        Allowed => "allowed",
        Audited => "audited",
        Denied => "denied",
    }
}

impl From<Action> for Decision {
    fn from(a: Action) -> Self {
        match a {
            Action::Allow => Decision::Allowed,
            Action::Audit => Decision::Audited,
            Action::Deny => Decision::Denied,
        }
    }
}

text_enum! {
    /// What happened to the request.
    pub enum Outcome {
        Completed => "completed",
        Killed => "killed",
        Blocked => "blocked",
        Resumed => "resumed",
        NotEnforced => "not-enforced",
        SignalFailed => "signal-failed",
        /// The process was gone when the agent's signal was sent.
        Gone => "gone",
        /// Allowed, but found stopped by someone else (not by a decision this agent can read):
        /// not resumed.
        LeftStopped => "left-stopped",
    }
}

text_enum! {
    /// A storm alert's state change.
    pub enum StormState {
        Raised => "raised",
        Cleared => "cleared",
        /// A throttle in force changed on its own: its VMM moved cgroup, or its mechanism did
        /// not hold the rate (`reason` says what and what now).
        Changed => "changed",
    }
}

text_enum! {
    /// What a storm alert did.
    pub enum StormOutcome {
        Alerted => "alerted",
        Stopped => "stopped",
        Killed => "killed",
        Cleared => "cleared",
        VmmExited => "vmm-exited",
        SignalFailed => "signal-failed",
        /// `action: throttle`: its CPU is limited (`reason` says how and how much).
        Throttled => "throttled",
        /// `action: throttle` could not be applied (`reason` says why): alerted only.
        ThrottleFailed => "throttle-failed",
    }
}
