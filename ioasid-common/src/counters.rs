//! Exact WBINVD/INVD counts and the kernel programs' own statistics.

use core::mem::size_of;

wire_enum! {
    /// Which instruction a counter counts.
    pub enum Op {
        Wbinvd = 1 => "wbinvd",
        Invd = 2 => "invd",
    }
}

wire_enum! {
    /// How KVM handled it, or what else the counter counts.
    pub enum Path {
        /// A hardware exit (kvm:kvm_exit).
        Exit = 1 => "exit",
        /// KVM's instruction emulator (kvm:kvm_emulate_insn).
        Emulated = 2 => "emulated",
        /// A handler invocation seen by fexit on kvm_emulate_wbinvd (optional hook).
        HandlerExit = 3 => "handler-exit",
        /// A handler invocation seen by fexit on emulator_wbinvd (optional hook).
        HandlerEmulated = 4 => "handler-emulated",
        /// A WBINVD of a VM known to be non-coherent: KVM really flushed caches.
        Flushed = 5 => "flushed",
    }
}

/// `vcpu` value when the source does not say which vCPU it was.
pub const VCPU_UNKNOWN: u32 = u32::MAX;

/// Key of [`crate::names::MAP_COUNTERS`]. The VMM's tgid and start (see
/// [`crate::verdict::start_ticks`]) name the process, so a process on a reused pid never adds to
/// a dead one's counts; the agent maps it to a VM name. `op` is an [`Op`], `path` a [`Path`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    pub tgid: u32,
    pub vcpu: u32,
    pub op: u32,
    pub path: u32,
    pub start: u64,
}
const _: () = assert!(size_of::<CounterKey>() == 24);

/// Value of [`crate::names::MAP_EXIT_MARKS`]: a WBINVD/INVD exit of this thread, which KVM
/// (SVM without NRIP save) will emulate next to skip it. The emulation of the same `rip` is the
/// same instruction: not counted again, and its bytes correct `op` if the exit code was wrong.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitMark {
    pub rip: u64,
    pub vcpu: u32,
    /// An [`Op`].
    pub op: u32,
}
const _: () = assert!(size_of::<ExitMark>() == 16);

wire_enum! {
    /// Indices of [`crate::names::MAP_STATS`]; the label is the `kind` of
    /// `ioasid_kernel_errors_total` (events_dropped has a metric of its own).
    pub enum Stat {
        /// Ring buffer reservation failed: an event was lost (its counters were not).
        EventsDropped = 0 => "events_dropped",
        /// A per-CPU counter map was full: a count could not be recorded.
        CounterMapFull = 1 => "counter_map_full",
        /// A tracepoint record or user struct could not be read.
        ReadErrors = 2 => "read_error",
        /// The in-flight ioctl map was full: an ioctl was judged but its exit not audited.
        InflightFull = 3 => "inflight_full",
        /// bpf_send_signal failed: an enforcement action could not be delivered.
        SignalErrors = 4 => "signal_error",
        /// The decisions ring was full: an incoherent-DMA enable's event was lost. Not counted
        /// for an ask (its kernel-side record stands in for the event); while enforcing, the
        /// kernel asks rather than allows when the ring runs short, so only a denial's event
        /// (the kernel carried it out) or an unenforced enable's can be lost.
        DecisionsDropped = 5 => "decision_dropped",
        /// A watched request number on a file that is not KVM's, VFIO's or iommufd's: not
        /// reported (exported as `ioasid_ioctls_ignored_total`, not as an error).
        IgnoredRequests = 6 => "ignored_request",
    }
}
pub const STATS_LEN: u32 = Stat::ALL.len() as u32;
