//! The enumerations of audit records: serde enums whose `label()` is also the metric label.

use crate::{engine::policy::Action, util::text_enum};

text_enum! {
    /// The kind of an audit record (`event`).
    pub enum RecordKind {
        IncoherentDma => "incoherent-dma",
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
    /// How a decision was carried out.
    pub enum Mechanism {
        /// BPF LSM returned -EPERM: the ioctl never ran.
        Lsm => "lsm",
        /// The kernel program sent SIGKILL at sys_enter.
        Sigkill => "sigkill",
        /// The kernel stopped the VMM and the agent decided.
        StopAsk => "stop-ask",
        /// Nothing was enforced (allowed, audited, or a dry run).
        None => "none",
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
    }
}

text_enum! {
    /// A storm alert's state change.
    pub enum StormState {
        Raised => "raised",
        Cleared => "cleared",
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

text_enum! {
    /// The coherency a FILE_ADD was judged by; also the `coherency` label of
    /// `ioasid_vfio_file_adds_total`.
    pub enum FileCoherency {
        Coherent => "coherent",
        Noncoherent => "noncoherent",
        Unknown => "unknown",
    }
}

impl From<ioasid_common::events::Coherency> for FileCoherency {
    fn from(c: ioasid_common::events::Coherency) -> Self {
        use ioasid_common::events::Coherency as C;
        match c {
            C::Coherent => FileCoherency::Coherent,
            C::Noncoherent => FileCoherency::Noncoherent,
            C::Unknown => FileCoherency::Unknown,
        }
    }
}

impl From<FileCoherency> for ioasid_common::events::Coherency {
    fn from(c: FileCoherency) -> Self {
        use ioasid_common::events::Coherency as C;
        match c {
            FileCoherency::Coherent => C::Coherent,
            FileCoherency::Noncoherent => C::Noncoherent,
            FileCoherency::Unknown => C::Unknown,
        }
    }
}
