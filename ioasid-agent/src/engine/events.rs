//! The domain events the kernel's records become: who asked for what, and what the kernel did
//! with it. Decoding the wire bytes into these is `kernel::decode`'s job; nothing past it sees a
//! wire struct or a raw wire integer.

use ioasid_common::{
    events::Coherency,
    verdict::{Asked, Mechanism},
};

use crate::engine::policy::Action;

/// Who did it, as the kernel saw it at the time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub tgid: u32,
    pub comm: String,
    /// CLOCK_MONOTONIC ns.
    pub ktime_ns: u64,
}

/// Which rule a kernel verdict came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleRef {
    Default,
    Index(u32),
    /// No rule: a kvm-vfio device was swapped onto the fd while FILE_ADD ran (it was another
    /// file at sys_enter), so the request was never judged; the kernel treats it as a denial.
    FdSwapped,
}

/// What the kernel did with an enable when it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelJudged {
    /// The process had a verdict: the kernel applied it.
    Verdict { action: Action, rule: RuleRef, generation: u32 },
    /// No verdict it could apply alone: the agent decides.
    Ask,
    /// Not an incoherent-DMA enable by what the kernel knew of the file (coherent, or unknown
    /// and let through by the policy): observed, not judged.
    Observed,
}

/// An incoherent-DMA enable: KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, FILE_ADD).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnableRequest {
    pub origin: Origin,
    /// The kvm device fd.
    pub fd: i32,
    /// The VFIO group/device fd, when it could be read from user memory.
    pub file_fd: Option<i32>,
    /// The device fd was seen being created as a kvm-vfio device.
    pub device_fd_known: bool,
    pub judged: KernelJudged,
    pub mechanism: Mechanism,
    /// The mechanism's signal was delivered.
    pub signal_sent: bool,
    /// The kernel recorded the ask (a stopped VMM): the request is decided by whoever takes
    /// that record.
    pub ask_recorded: bool,
    /// The ioctl's return value, when its exit was seen.
    pub ret: Option<i64>,
    /// The kernel's own coherency verdict for the file (fexit vfio_file_enforced_coherent).
    pub kernel_coherent: Option<bool>,
    /// The coherency the kernel judged the file by (what the agent had resolved for its fd).
    pub file_coherency: Coherency,
}

impl EnableRequest {
    /// The request behind the kernel's record of a stopped VMM's ask (its event may be lost):
    /// all the kernel kept is the fds and when it asked.
    pub fn from_ask(tgid: u32, a: &Asked) -> Self {
        EnableRequest {
            origin: Origin { tgid, comm: String::new(), ktime_ns: a.ktime_ns },
            fd: a.fd,
            file_fd: (a.file_fd >= 0).then_some(a.file_fd),
            device_fd_known: false,
            judged: KernelJudged::Ask,
            mechanism: Mechanism::StopAsk,
            signal_sent: true,
            ask_recorded: true,
            ret: None,
            kernel_coherent: None,
            file_coherency: Coherency::Unknown,
        }
    }
}

/// Any other watched ioctl.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoctlSeen {
    pub origin: Origin,
    /// The request's name (from the one list in ioasid-common).
    pub request: &'static str,
    /// The fd it was issued on.
    pub fd: i32,
    /// KVM_CREATE_VM or KVM_CREATE_DEVICE: the process is a VMM.
    pub creates_vm_or_device: bool,
    /// KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, FILE_DEL): a VFIO file leaves the VM.
    pub file_del: bool,
    /// A request on a VFIO group or device fd (its IOMMU coherency can be resolved now).
    pub vfio_file: bool,
    pub ret: Option<i64>,
    pub group: u32,
    pub attr: u64,
}

/// KVM registered (or unregistered) non-coherent DMA for a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub origin: Origin,
    /// The `struct kvm *`, an opaque identity.
    pub kvm: u64,
    pub register: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Enable(EnableRequest),
    Ioctl(IoctlSeen),
    Transition(Transition),
}
