//! Ring buffer records: a common header, then the record of its kind.

use core::mem::size_of;

wire_enum! {
    /// `EventHeader::kind`.
    pub enum EventKind {
        Ioctl = 1 => "ioctl",
        /// kvm_arch_(un)register_noncoherent_dma.
        Noncoherent = 2 => "noncoherent",
    }
}

/// Common header of every ring buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// An [`EventKind`].
    pub kind: u32,
    /// Size of the whole record in bytes.
    pub size: u32,
    /// bpf_ktime_get_ns() (CLOCK_MONOTONIC) when the event happened.
    pub ktime_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub comm: [u8; 16],
}
const _: () = assert!(size_of::<EventHeader>() == 56);

/// `IoctlEvent::flags` bits.
/// The ioctl's fd was learnt from KVM_CREATE_DEVICE as a kvm-vfio device.
pub const IOCTL_F_DEVICE_KNOWN: u32 = 1 << 0;
/// `attr` was read from user memory.
pub const IOCTL_F_ATTR_READ: u32 = 1 << 1;
/// The fd behind `attr.addr` was read from user memory.
pub const IOCTL_F_FILE_FD_READ: u32 = 1 << 2;
/// sys_exit was seen: `ret` is the ioctl's return value.
pub const IOCTL_F_RETURNED: u32 = 1 << 3;
/// The signal of the mechanism was sent successfully.
pub const IOCTL_F_SIGNAL_SENT: u32 = 1 << 4;
/// The kernel recorded this ask in [`crate::names::MAP_ASKED`]: whoever takes that record
/// decides the request (the event, or the agent's recovery of a lost event), once.
pub const IOCTL_F_ASK_RECORDED: u32 = 1 << 5;
/// At sys_enter the fd was not a KVM/VFIO/iommufd file, yet the FILE_ADD succeeded: another
/// thread swapped a kvm-vfio device onto the fd in between (only a hostile VMM does that). The
/// kernel kills it where it enforces; the agent audits it as a denial.
pub const IOCTL_F_FD_SWAPPED: u32 = 1 << 6;
/// Not a KVM/VFIO/iommufd file at sys_enter: kept in flight only to catch a swap (above).
pub const IOCTL_F_FOREIGN_FILE: u32 = 1 << 7;
/// The LSM program observed and judged this FILE_ADD (it runs before the request): the fentry
/// program on the device's ioctl function, which runs next, leaves it alone and clears this.
pub const IOCTL_F_LSM_TAKEN: u32 = 1 << 8;

/// One watched ioctl, with what the kernel programs read and decided.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IoctlEvent {
    pub header: EventHeader,
    pub cmd: u32,
    pub fd: i32,
    pub arg: u64,
    /// Return value (valid with [`IOCTL_F_RETURNED`]).
    pub ret: i64,
    /// `struct kvm_device_attr` for *_DEVICE_ATTR; for KVM_CREATE_DEVICE `attr_group` is the type.
    pub attr_flags: u32,
    pub attr_group: u32,
    pub attr_attr: u64,
    pub attr_addr: u64,
    /// The int behind `attr_addr` for VFIO FILE_ADD/DEL: the VFIO group or device fd; for
    /// KVM_CREATE_DEVICE the new device fd.
    pub file_fd: i32,
    /// A [`crate::verdict::Decision`].
    pub decision: u32,
    /// A [`crate::verdict::Mechanism`].
    pub mechanism: u32,
    /// Rule index from the verdict, [`crate::verdict::RULE_DEFAULT`], or
    /// [`crate::verdict::RULE_NONE`] when the process had no verdict.
    pub rule: u32,
    pub generation: u32,
    /// `IOCTL_F_*`.
    pub flags: u32,
    /// sys_exit time, for latency.
    pub exit_ktime_ns: u64,
    /// The kernel's own verdict during this ioctl, a [`Coherency`] (fexit
    /// vfio_file_enforced_coherent, where trampolines load).
    pub kernel_coherent: u32,
    /// The coherency the agent had resolved for the file (a [`Coherency`] from
    /// [`crate::names::MAP_FILE_COHERENCY`]), which the kernel judged with.
    pub file_coherency: u32,
}
const _: () = assert!(size_of::<IoctlEvent>() == 144);

wire_enum! {
    /// Whether the IOMMU keeps a VFIO file's DMA cache-coherent: its devices' no-snoop DMA is
    /// then impossible, and adding it to a VM never makes KVM honour WBINVD.
    pub enum Coherency {
        Unknown = 0 => "unknown",
        Coherent = 1 => "coherent",
        Noncoherent = 2 => "noncoherent",
    }
}

/// kvm_arch_(un)register_noncoherent_dma, seen by fentry where trampolines load.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TransitionEvent {
    pub header: EventHeader,
    /// The `struct kvm *`, used only as an opaque identity.
    pub kvm: u64,
    /// 1 = register, 0 = unregister.
    pub register: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<TransitionEvent>() == 72);

/// Bytes of a VMM's command line captured when it creates its VM (NUL-separated, as in
/// /proc/PID/cmdline; longer ones are cut).
pub const CMDLINE_MAX: usize = 256;

/// Value of [`crate::names::MAP_CMDLINES`] (LRU, by tgid): the command line a process had when
/// it issued KVM_CREATE_VM, so a VMM that is gone before the agent reads /proc is still named.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Cmdline {
    /// bpf_ktime_get_ns at capture.
    pub ktime_ns: u64,
    pub len: u32,
    pub _pad: u32,
    /// The process's start (see [`crate::verdict::start_ticks`]): whose command line it is.
    pub start: u64,
    pub bytes: [u8; CMDLINE_MAX],
}
const _: () = assert!(core::mem::size_of::<Cmdline>() == 24 + CMDLINE_MAX);
