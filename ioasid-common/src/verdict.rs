//! The policy as compiled into the kernel: one verdict per classified VMM process, and the
//! records of processes the kernel stopped to ask the agent.

use core::mem::size_of;

wire_enum! {
    /// Decision for an incoherent-DMA enable (KVM_DEV_VFIO_FILE_ADD).
    pub enum Decision {
        /// Not an enable (another watched ioctl): nothing was judged.
        None = 0 => "none",
        Allow = 1 => "allow",
        Audit = 2 => "audit",
        Deny = 3 => "deny",
        /// The kernel had no verdict it could apply alone (process not classified yet, the rule
        /// depends on which device it is, or a deny for a file of unknown coherency): the VMM is
        /// stopped and the agent decides.
        Ask = 4 => "ask",
        /// A FILE_ADD that is not an incoherent-DMA enable (the file's IOMMU keeps it
        /// coherent, or its coherency is unknown and the policy lets that through): observed
        /// and audited, never judged.
        Observed = 5 => "observed",
    }
}

wire_enum! {
    /// How the kernel carried a decision out.
    pub enum Mechanism {
        None = 0 => "none",
        /// BPF LSM on file_ioctl returned -EPERM: the ioctl never ran.
        Lsm = 1 => "lsm",
        /// bpf_send_signal(SIGKILL) at sys_enter: the ioctl runs, the VMM dies before it returns.
        Sigkill = 2 => "sigkill",
        /// bpf_send_signal(SIGSTOP) at sys_enter, then the agent decided: SIGCONT or SIGKILL.
        StopAsk = 3 => "stop-ask",
    }
}

/// `rule` of a verdict from the policy's default section.
pub const RULE_DEFAULT: u32 = u32::MAX;
/// `rule` of an event whose process had no verdict (the kernel asked the agent).
pub const RULE_NONE: u32 = u32::MAX - 1;

/// Value of [`crate::names::MAP_VM_POLICY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmVerdict {
    /// A [`Decision`]: what a FILE_ADD from this process gets (never `None`).
    pub decision: u32,
    /// Index of the matched rule in the compiled policy, or [`RULE_DEFAULT`].
    pub rule: u32,
    /// Policy generation this verdict was compiled from.
    pub generation: u32,
    /// Non-zero when a file of unknown coherency is let through unjudged
    /// (`unknown_coherency: allow`); zero: judged as non-coherent.
    pub unknown_allowed: u32,
    /// The start of the process it was compiled for ([`start_ticks`]): the kernel applies it
    /// only to that process, never to another one on its pid.
    pub start: u64,
}
const _: () = assert!(size_of::<VmVerdict>() == 24);

/// Value of [`crate::names::MAP_ASKED`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Asked {
    /// bpf_ktime_get_ns() (CLOCK_MONOTONIC) when the process was stopped.
    pub ktime_ns: u64,
    /// The kvm device fd and the VFIO file fd of the FILE_ADD.
    pub fd: i32,
    pub file_fd: i32,
}
const _: () = assert!(size_of::<Asked>() == 16);

/// Key of [`crate::names::MAP_KVM_DEVICES`] and [`crate::names::MAP_FILE_COHERENCY`]: an fd of
/// one process (its tgid and start).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FdKey {
    pub tgid: u32,
    pub fd: u32,
    pub start: u64,
}
const _: () = assert!(size_of::<FdKey>() == 16);

/// Key of [`crate::names::MAP_NONCOHERENT_KVM`]: one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProcKey {
    pub tgid: u32,
    pub _pad: u32,
    pub start: u64,
}
const _: () = assert!(size_of::<ProcKey>() == 16);

/// Nanoseconds per unit of a process's start as `/proc/PID/stat` gives it (field 22,
/// `starttime`, in USER_HZ clock ticks: 100 on x86).
pub const START_TICK_NS: u64 = 10_000_000;

/// A process's start as the kernel programs key their per-process state with it: its thread
/// group leader's `start_boottime` in `/proc/PID/stat` clock ticks, the value the agent reads
/// there. Pid and start together name one process: a process on a reused pid has a later start
/// and inherits nothing (no verdict, no file coherency, no counts). 0 where the kernel's layout
/// is not known (the maps are then keyed by pid alone, as before).
pub const fn start_ticks(start_boottime_ns: u64) -> u64 {
    start_boottime_ns / START_TICK_NS
}
