//! Wire types and constants shared by the ioasid kernel programs and the agent.
//!
//! Everything here crosses the user/kernel boundary: `#[repr(C)]`, fixed-width integers, explicit
//! padding, and a size assertion per type. Enum-like values travel as `u32` and are decoded on the
//! user side with `TryFrom<u32>`; nothing on the wire is a `bool`, a Rust enum or a `usize`.
#![no_std]

use core::mem::size_of;

// ---------------------------------------------------------------------------------------------
// Names of every map and program in the object. The agent looks them up by these names and a
// test checks that each one exists in the built object.
// ---------------------------------------------------------------------------------------------

/// Per-CPU hash: [`CounterKey`] -> u64. Exact WBINVD/INVD counts.
pub const MAP_COUNTERS: &str = "IOASID_COUNTERS";
/// Per-CPU array of u64 indexed by [`Stat`]: drops, read errors, map-full events.
pub const MAP_STATS: &str = "IOASID_STATS";
/// The one ring buffer of [`IoctlEvent`] / [`TransitionEvent`] records.
pub const MAP_EVENTS: &str = "IOASID_EVENTS";
/// Hash: tgid -> [`VmVerdict`], the compiled policy for each classified VMM process.
pub const MAP_VM_POLICY: &str = "IOASID_VM_POLICY";
/// Hash: [`FdKey`] -> u32 device type, the kvm device fds learnt from KVM_CREATE_DEVICE.
pub const MAP_KVM_DEVICES: &str = "IOASID_KVM_DEVICES";
/// Hash: thread id -> [`IoctlEvent`], ioctls between sys_enter and sys_exit.
pub const MAP_INFLIGHT: &str = "IOASID_INFLIGHT";
/// Hash: tgid -> [`Asked`], processes the kernel stopped to ask the agent. The agent removes
/// an entry when it has decided; one whose event never arrived (ring full) is found here and
/// decided all the same, so no VMM stays stopped.
pub const MAP_ASKED: &str = "IOASID_ASKED";
/// Array of one [`Control`].
pub const MAP_CONTROL: &str = "IOASID_CONTROL";
/// Per-CPU hash: [`CostKey`] -> u64. WBINVD handler time histogram and ns sum, per VM.
pub const MAP_COST: &str = "IOASID_COST";
/// Hash: thread id -> [`Pending`], a WBINVD whose handling has started and not yet ended.
pub const MAP_PENDING: &str = "IOASID_PENDING";
/// Array of one u64: pending WBINVDs host-wide. While 0 (nearly always) the closers on every
/// VM entry, emulated instruction and syscall exit return after one array read.
pub const MAP_PENDING_COUNT: &str = "IOASID_PENDING_COUNT";
/// Hash: tgid -> u32, VMMs known to have non-coherent DMA (their WBINVD really flush).
/// Written by the agent, and by the fentry hooks on (un)register_noncoherent_dma.
pub const MAP_NONCOHERENT: &str = "IOASID_NONCOHERENT";
/// Per-CPU array of u64 indexed by [`flush_cpus_bucket`]: CPUs reached per flush.
pub const MAP_FLUSH_CPUS: &str = "IOASID_FLUSH_CPUS";
/// Array of one u64: watched ioctls between sys_enter and sys_exit, host-wide. While it is 0
/// (nearly always) the sys_exit programs return without a hash lookup.
pub const MAP_INFLIGHT_COUNT: &str = "IOASID_INFLIGHT_COUNT";

pub const PROG_KVM_EXIT: &str = "ioasid_kvm_exit";
pub const PROG_KVM_EMULATE_INSN: &str = "ioasid_kvm_emulate_insn";
pub const PROG_FEXIT_KVM_EMULATE_WBINVD: &str = "ioasid_fexit_kvm_emulate_wbinvd";
pub const PROG_FEXIT_EMULATOR_WBINVD: &str = "ioasid_fexit_emulator_wbinvd";
pub const PROG_SYS_ENTER_IOCTL: &str = "ioasid_sys_enter_ioctl";
pub const PROG_SYS_EXIT_IOCTL: &str = "ioasid_sys_exit_ioctl";
pub const PROG_TP_BTF_KVM_ENTRY: &str = "ioasid_tp_btf_kvm_entry";
pub const PROG_KVM_ENTRY: &str = "ioasid_kvm_entry";
pub const PROG_FENTRY_KVM_EMULATE_WBINVD: &str = "ioasid_fentry_kvm_emulate_wbinvd";
pub const PROG_FENTRY_EMULATOR_WBINVD: &str = "ioasid_fentry_emulator_wbinvd";
pub const PROG_FENTRY_WBINVD_ON_CPUS_MASK: &str = "ioasid_fentry_wbinvd_on_cpus_mask";
pub const PROG_TP_BTF_SYS_ENTER: &str = "ioasid_tp_btf_sys_enter";
pub const PROG_TP_BTF_SYS_EXIT: &str = "ioasid_tp_btf_sys_exit";
pub const PROG_SCHED_EXEC: &str = "ioasid_sched_exec";
pub const PROG_LSM_FILE_IOCTL: &str = "ioasid_lsm_file_ioctl";
pub const PROG_FENTRY_REGISTER_NONCOHERENT: &str = "ioasid_fentry_register_noncoherent";
pub const PROG_FENTRY_UNREGISTER_NONCOHERENT: &str = "ioasid_fentry_unregister_noncoherent";
pub const PROG_FEXIT_VFIO_FILE_ENFORCED_COHERENT: &str = "ioasid_fexit_vfio_file_enforced_coherent";

/// Every map name, for the object test.
pub const ALL_MAPS: [&str; 14] = [
    MAP_ASKED,
    MAP_COST,
    MAP_PENDING,
    MAP_PENDING_COUNT,
    MAP_NONCOHERENT,
    MAP_FLUSH_CPUS,
    MAP_CONTROL,
    MAP_INFLIGHT_COUNT,
    MAP_COUNTERS,
    MAP_STATS,
    MAP_EVENTS,
    MAP_VM_POLICY,
    MAP_KVM_DEVICES,
    MAP_INFLIGHT,
];

/// Every program name, for the object test.
pub const ALL_PROGRAMS: [&str; 18] = [
    PROG_FEXIT_VFIO_FILE_ENFORCED_COHERENT,
    PROG_TP_BTF_KVM_ENTRY,
    PROG_KVM_ENTRY,
    PROG_FENTRY_KVM_EMULATE_WBINVD,
    PROG_FENTRY_EMULATOR_WBINVD,
    PROG_FENTRY_WBINVD_ON_CPUS_MASK,
    PROG_TP_BTF_SYS_ENTER,
    PROG_TP_BTF_SYS_EXIT,
    PROG_KVM_EXIT,
    PROG_KVM_EMULATE_INSN,
    PROG_FEXIT_KVM_EMULATE_WBINVD,
    PROG_FEXIT_EMULATOR_WBINVD,
    PROG_SYS_ENTER_IOCTL,
    PROG_SYS_EXIT_IOCTL,
    PROG_SCHED_EXEC,
    PROG_LSM_FILE_IOCTL,
    PROG_FENTRY_REGISTER_NONCOHERENT,
    PROG_FENTRY_UNREGISTER_NONCOHERENT,
];

/// Name of the read-only global holding [`ProgConfig`].
pub const GLOBAL_CONFIG: &str = "IOASID_CONFIG";

pub const COUNTERS_MAX_ENTRIES: u32 = 16384;
pub const VM_POLICY_MAX_ENTRIES: u32 = 8192;
pub const KVM_DEVICES_MAX_ENTRIES: u32 = 8192;
pub const INFLIGHT_MAX_ENTRIES: u32 = 4096;
/// 18 keys per VM (16 buckets, +Inf, sum).
pub const COST_MAX_ENTRIES: u32 = 65536;
/// 256 KiB: ioctl events are rare (a handful per VM start), so this is generous.
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

// ---------------------------------------------------------------------------------------------
// x86 and KVM ABI constants (see shared/KERNEL-NOTES.md).
// ---------------------------------------------------------------------------------------------

/// kvm:kvm_exit `isa` values.
pub const KVM_ISA_VMX: u32 = 1;
pub const KVM_ISA_SVM: u32 = 2;
pub const VMX_EXIT_REASON_INVD: u64 = 13;
pub const VMX_EXIT_REASON_WBINVD: u64 = 54;
/// VMX exit reasons carry flags in the upper half; the basic reason is the low 16 bits.
pub const VMX_EXIT_REASON_BASIC_MASK: u64 = 0xffff;
pub const SVM_EXIT_INVD: u64 = 0x76;
pub const SVM_EXIT_WBINVD: u64 = 0x89;

/// kvm:kvm_emulate_insn `flags`: set when the guest runs in 64-bit mode (CS.L).
pub const KVM_EMUL_INSN_F_CS_L: u8 = 1 << 3;

pub const KVM_CREATE_VM: u32 = 0xae01;
pub const KVM_CREATE_DEVICE: u32 = 0xc00c_aee0;
pub const KVM_SET_DEVICE_ATTR: u32 = 0x4018_aee1;
pub const KVM_GET_DEVICE_ATTR: u32 = 0x4018_aee2;
pub const KVM_HAS_DEVICE_ATTR: u32 = 0x4018_aee3;
pub const KVM_DEV_TYPE_VFIO: u32 = 4;
/// `KVM_DEV_VFIO_FILE`, alias `KVM_DEV_VFIO_GROUP`.
pub const KVM_DEV_VFIO_FILE: u32 = 1;
pub const KVM_DEV_VFIO_FILE_ADD: u64 = 1;
pub const KVM_DEV_VFIO_FILE_DEL: u64 = 2;
pub const KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE: u64 = 3;

pub const VFIO_GET_API_VERSION: u32 = 0x3b64;
pub const VFIO_CHECK_EXTENSION: u32 = 0x3b65;
pub const VFIO_SET_IOMMU: u32 = 0x3b66;
pub const VFIO_GROUP_SET_CONTAINER: u32 = 0x3b68;
pub const VFIO_GROUP_GET_DEVICE_FD: u32 = 0x3b6a;
pub const VFIO_DEVICE_BIND_IOMMUFD: u32 = 0x3b76;
pub const VFIO_DEVICE_ATTACH_IOMMUFD_PT: u32 = 0x3b77;
pub const VFIO_DEVICE_DETACH_IOMMUFD_PT: u32 = 0x3b78;
pub const IOMMU_DESTROY: u32 = 0x3b80;
pub const IOMMU_IOAS_ALLOC: u32 = 0x3b81;
pub const IOMMU_HWPT_ALLOC: u32 = 0x3b89;
pub const IOMMU_GET_HW_INFO: u32 = 0x3b8a;
pub const VFIO_TYPE1V2_IOMMU: u64 = 3;
pub const VFIO_DMA_CC_IOMMU: u64 = 4;

/// The ioctl requests the kernel programs look at; every other ioctl returns at the first compare.
pub const WATCHED_IOCTLS: [u32; 15] = [
    KVM_CREATE_VM,
    KVM_CREATE_DEVICE,
    KVM_SET_DEVICE_ATTR,
    KVM_HAS_DEVICE_ATTR,
    VFIO_CHECK_EXTENSION,
    VFIO_SET_IOMMU,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_GROUP_GET_DEVICE_FD,
    VFIO_DEVICE_BIND_IOMMUFD,
    VFIO_DEVICE_ATTACH_IOMMUFD_PT,
    VFIO_DEVICE_DETACH_IOMMUFD_PT,
    IOMMU_IOAS_ALLOC,
    IOMMU_HWPT_ALLOC,
    IOMMU_GET_HW_INFO,
    IOMMU_DESTROY,
];

/// x86-64 `struct pt_regs` offsets (arch/x86/include/asm/ptrace.h, the ptrace ABI order,
/// unchanged since 2.6; FRED in 6.9 reused only the cs/ss slots). The tp_btf sys_enter program
/// reads the ioctl arguments from them: fd in di, request in si, argument in dx.
pub const PT_REGS_DX: usize = 96;
pub const PT_REGS_SI: usize = 104;
pub const PT_REGS_DI: usize = 112;
/// x86-64 syscall number of ioctl.
pub const NR_IOCTL: i64 = 16;

pub const SIGKILL: u32 = 9;
pub const SIGSTOP: u32 = 19;
pub const EPERM: i32 = 1;

// ---------------------------------------------------------------------------------------------
// Counters.
// ---------------------------------------------------------------------------------------------

/// Which instruction a counter counts.
pub const OP_WBINVD: u32 = 1;
pub const OP_INVD: u32 = 2;
/// How KVM handled it: a hardware exit (kvm:kvm_exit) or the instruction emulator.
pub const PATH_EXIT: u32 = 1;
pub const PATH_EMULATED: u32 = 2;
/// A handler invocation seen by fexit on kvm_emulate_wbinvd / emulator_wbinvd (optional hooks).
pub const PATH_HANDLER_EXIT: u32 = 3;
pub const PATH_HANDLER_EMULATED: u32 = 4;
/// A WBINVD of a VM known to be non-coherent: KVM really flushed caches.
pub const PATH_FLUSHED: u32 = 5;
/// `vcpu` value when the source does not say which vCPU it was.
pub const VCPU_UNKNOWN: u32 = u32::MAX;

/// Key of [`MAP_COUNTERS`]. The VMM's tgid names the VM; the agent maps it to a VM name.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    pub tgid: u32,
    pub vcpu: u32,
    pub op: u32,
    pub path: u32,
}
const _: () = assert!(size_of::<CounterKey>() == 16);

/// Indices of [`MAP_STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Ring buffer reservation failed: an event was lost (its counters were not).
    EventsDropped = 0,
    /// The counter map was full: a count could not be recorded.
    CounterMapFull = 1,
    /// A tracepoint record or user struct could not be read.
    ReadErrors = 2,
    /// The in-flight ioctl map was full: an ioctl was judged but its exit not audited.
    InflightFull = 3,
    /// bpf_send_signal failed: an enforcement action could not be delivered.
    SignalErrors = 4,
}
pub const STATS_LEN: u32 = 5;

// ---------------------------------------------------------------------------------------------
// WBINVD cost.
// ---------------------------------------------------------------------------------------------

/// Upper bounds (ns) of the handler-time histogram buckets: 1 us .. 100 ms. Index
/// `COST_BUCKETS_NS.len()` is +Inf.
pub const COST_BUCKETS_NS: [u64; 16] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
];
/// `CostKey::bucket` of the ns sum.
pub const COST_SUM: u32 = 0xffff;

/// Index of the first bound `v` does not exceed, else `bounds.len()` (+Inf). Bounded for the
/// verifier.
#[inline(always)]
pub fn bucket<T: Copy + PartialOrd, const N: usize>(v: T, bounds: &[T; N]) -> u32 {
    let mut i = 0;
    while i < N {
        if v <= bounds[i] {
            return i as u32;
        }
        i += 1;
    }
    N as u32
}

/// Histogram bucket of a handler time in ns.
#[inline(always)]
pub fn cost_bucket(ns: u64) -> u32 {
    bucket(ns, &COST_BUCKETS_NS)
}

/// Upper bounds of the flush-CPU-count buckets; index `FLUSH_CPU_BUCKETS.len()` is +Inf.
pub const FLUSH_CPU_BUCKETS: [u32; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];
pub const FLUSH_CPUS_LEN: u32 = FLUSH_CPU_BUCKETS.len() as u32 + 1;

#[inline(always)]
pub fn flush_cpus_bucket(cpus: u32) -> u32 {
    bucket(cpus, &FLUSH_CPU_BUCKETS)
}

/// Key of [`MAP_COST`]: a histogram bucket (or [`COST_SUM`]) of one VMM.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CostKey {
    pub tgid: u32,
    pub bucket: u32,
}
const _: () = assert!(size_of::<CostKey>() == 8);

/// Value of [`MAP_PENDING`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Pending {
    pub start_ns: u64,
    pub tgid: u32,
    /// `PATH_EXIT` / `PATH_EMULATED`.
    pub path: u32,
}
const _: () = assert!(size_of::<Pending>() == 16);

/// `Control::cost_source`: which programs time WBINVD handling.
pub const COST_SOURCE_TRACEPOINTS: u32 = 0;
/// fentry/fexit on kvm_emulate_wbinvd and emulator_wbinvd time it exactly; the tracepoint
/// pairs then do not.
pub const COST_SOURCE_HANDLERS: u32 = 1;

// ---------------------------------------------------------------------------------------------
// Policy, compiled into the kernel.
// ---------------------------------------------------------------------------------------------

/// Decision for an incoherent-DMA enable (KVM_DEV_VFIO_FILE_ADD).
pub const DECISION_NONE: u32 = 0;
pub const DECISION_ALLOW: u32 = 1;
pub const DECISION_AUDIT: u32 = 2;
pub const DECISION_DENY: u32 = 3;
/// The kernel had no verdict it could apply alone (process not classified yet, or the rule
/// depends on which device it is): the VMM is stopped and the agent decides.
pub const DECISION_ASK: u32 = 4;

/// How a decision was carried out.
pub const MECH_NONE: u32 = 0;
/// BPF LSM on file_ioctl returned -EPERM: the ioctl never ran.
pub const MECH_LSM: u32 = 1;
/// bpf_send_signal(SIGKILL) at sys_enter: the ioctl runs, the VMM dies before it returns.
pub const MECH_SIGKILL: u32 = 2;
/// bpf_send_signal(SIGSTOP) at sys_enter, then the agent decided: SIGCONT or SIGKILL.
pub const MECH_STOP_ASK: u32 = 3;

/// Value of [`MAP_VM_POLICY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmVerdict {
    /// One of the `DECISION_*` values: what a FILE_ADD from this process gets.
    pub decision: u32,
    /// Index of the matched rule in the compiled policy, or [`RULE_DEFAULT`].
    pub rule: u32,
    /// Policy generation this verdict was compiled from.
    pub generation: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<VmVerdict>() == 16);
pub const RULE_DEFAULT: u32 = u32::MAX;

/// Value of [`MAP_ASKED`].
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

/// Key of [`MAP_KVM_DEVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FdKey {
    pub tgid: u32,
    pub fd: u32,
}
const _: () = assert!(size_of::<FdKey>() == 8);

// ---------------------------------------------------------------------------------------------
// Events.
// ---------------------------------------------------------------------------------------------

pub const EVENT_IOCTL: u32 = 1;
pub const EVENT_NONCOHERENT: u32 = 2;

/// Common header of every ring buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// `EVENT_*`.
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
    /// The int behind `attr_addr` for VFIO FILE_ADD/DEL: the VFIO group or device fd.
    pub file_fd: i32,
    /// `DECISION_*`.
    pub decision: u32,
    /// `MECH_*`.
    pub mechanism: u32,
    /// Rule index from the verdict, [`RULE_DEFAULT`], or u32::MAX when there was none.
    pub rule: u32,
    pub generation: u32,
    /// `IOCTL_F_*`.
    pub flags: u32,
    /// sys_exit time, for latency.
    pub exit_ktime_ns: u64,
    /// The kernel's own verdict during this ioctl, from fexit vfio_file_enforced_coherent
    /// (where trampolines load): [`COHERENT_UNKNOWN`], [`COHERENT_YES`] or [`COHERENT_NO`].
    pub kernel_coherent: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<IoctlEvent>() == 144);

pub const COHERENT_UNKNOWN: u32 = 0;
pub const COHERENT_YES: u32 = 1;
pub const COHERENT_NO: u32 = 2;

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

// ---------------------------------------------------------------------------------------------
// Load-time configuration: tracepoint field offsets read from tracefs, enforcement switches.
// ---------------------------------------------------------------------------------------------

/// A field of a tracepoint record: where it is and how wide (from the `format` file).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}
const _: () = assert!(size_of::<Field>() == 8);

/// The read-only global [`GLOBAL_CONFIG`], written by the agent before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgConfig {
    pub exit_reason: Field,
    pub exit_isa: Field,
    pub exit_vcpu_id: Field,
    pub emul_len: Field,
    pub emul_insn: Field,
    pub emul_flags: Field,
    pub emul_failed: Field,
    pub ioctl_fd: Field,
    pub ioctl_cmd: Field,
    pub ioctl_arg: Field,
    pub ioctl_ret: Field,
    /// The agent's own tgid, never stopped or killed.
    pub agent_tgid: u32,
    /// Non-zero when kvm_emulate_insn's `len, insn[15], flags, failed` are contiguous, as in
    /// every kernel seen (then one 18-byte read replaces four; see [`EmulTail`]).
    pub emul_packed: u32,
}
const _: () = assert!(size_of::<ProgConfig>() == 96);

/// The tail of the kvm:kvm_emulate_insn record, read at once when `ProgConfig::emul_packed`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EmulTail {
    pub len: u8,
    pub insn: [u8; 15],
    pub flags: u8,
    pub failed: u8,
}
const _: () = assert!(size_of::<EmulTail>() == 18);

/// Whether the format's fields lie as [`EmulTail`] does.
pub fn emul_is_packed(len: Field, insn: Field, flags: Field, failed: Field) -> bool {
    len.size == 1
        && insn == Field { offset: len.offset + 1, size: 15 }
        && flags == Field { offset: len.offset + 16, size: 1 }
        && failed == Field { offset: len.offset + 17, size: 1 }
}

/// The one element of [`MAP_CONTROL`]: switches the agent sets after attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    /// Non-zero to enforce verdicts (zero: observe and audit only).
    pub enforce: u32,
    /// Non-zero when the LSM program is attached: `deny` happens there (-EPERM) and the
    /// tracepoint program sends no SIGKILL.
    pub lsm_enforces: u32,
    /// `COST_SOURCE_*`.
    pub cost_source: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Control>() == 16);

// ---------------------------------------------------------------------------------------------
// Decoding shared by the kernel programs and the tests: one implementation, tested on the host.
// ---------------------------------------------------------------------------------------------

/// Which instruction a kvm:kvm_exit record is for: `OP_WBINVD`, `OP_INVD` or 0.
#[inline(always)]
pub fn classify_exit(isa: u32, exit_reason: u64) -> u32 {
    if isa == KVM_ISA_VMX {
        match exit_reason & VMX_EXIT_REASON_BASIC_MASK {
            VMX_EXIT_REASON_WBINVD => OP_WBINVD,
            VMX_EXIT_REASON_INVD => OP_INVD,
            _ => 0,
        }
    } else if isa == KVM_ISA_SVM {
        match exit_reason {
            SVM_EXIT_WBINVD => OP_WBINVD,
            SVM_EXIT_INVD => OP_INVD,
            _ => 0,
        }
    } else {
        0
    }
}

/// Which instruction the bytes of a kvm:kvm_emulate_insn record are: `OP_WBINVD` for 0f 09
/// (with `f3`, WBNOINVD, which KVM emulates the same way), `OP_INVD` for 0f 08, else 0.
/// Legacy prefixes are skipped, and REX prefixes in 64-bit mode. Bounded for the verifier.
#[inline(always)]
pub fn classify_insn(insn: &[u8; 15], len: u8, long_mode: bool) -> u32 {
    let len = if (len as usize) > insn.len() { insn.len() } else { len as usize };
    let mut i = 0usize;
    while i < 14 && i < len {
        let b = insn[i];
        let prefix = matches!(b, 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3)
            || (long_mode && (b & 0xf0) == 0x40);
        if !prefix {
            break;
        }
        i += 1;
    }
    if i + 2 > len || i >= 14 {
        return 0;
    }
    if insn[i] != 0x0f {
        return 0;
    }
    match insn[i + 1] {
        0x09 => OP_WBINVD,
        0x08 => OP_INVD,
        _ => 0,
    }
}

/// True for the ioctl requests the kernel programs watch. Unrelated requests, KVM_RUN included,
/// leave after the type-byte test or one compare.
#[inline(always)]
pub fn is_watched_ioctl(cmd: u32) -> bool {
    let ty = (cmd >> 8) & 0xff;
    if ty != 0xae && ty != 0x3b {
        return false;
    }
    let mut i = 0;
    while i < WATCHED_IOCTLS.len() {
        if WATCHED_IOCTLS[i] == cmd {
            return true;
        }
        i += 1;
    }
    false
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each of these is `repr(C)`, made only of integers and integer arrays with explicit
    // padding fields, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::CounterKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VmVerdict {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FdKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProgConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IoctlEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Control {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CostKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Pending {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Asked {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn(bytes: &[u8]) -> ([u8; 15], u8) {
        let mut b = [0u8; 15];
        b[..bytes.len()].copy_from_slice(bytes);
        (b, bytes.len() as u8)
    }

    #[test]
    fn exit_reasons() {
        assert_eq!(classify_exit(KVM_ISA_VMX, 54), OP_WBINVD);
        assert_eq!(classify_exit(KVM_ISA_VMX, 13), OP_INVD);
        // VMX flags in the upper half (e.g. bit 31, failed VM entry; bit 27, enclave) are masked.
        assert_eq!(classify_exit(KVM_ISA_VMX, 0x0800_0036), OP_WBINVD);
        assert_eq!(classify_exit(KVM_ISA_VMX, 0x89), 0);
        assert_eq!(classify_exit(KVM_ISA_SVM, 0x89), OP_WBINVD);
        assert_eq!(classify_exit(KVM_ISA_SVM, 0x76), OP_INVD);
        // SVM codes are not masked: 0x10089 is not WBINVD.
        assert_eq!(classify_exit(KVM_ISA_SVM, 0x1_0089), 0);
        assert_eq!(classify_exit(KVM_ISA_SVM, 54), 0);
        assert_eq!(classify_exit(0, 54), 0);
        assert_eq!(classify_exit(3, 0x89), 0);
    }

    #[test]
    fn instruction_bytes() {
        let cases: &[(&[u8], bool, u32)] = &[
            (&[0x0f, 0x09], false, OP_WBINVD),
            (&[0x0f, 0x08], false, OP_INVD),
            (&[0xf3, 0x0f, 0x09], false, OP_WBINVD), // WBNOINVD
            (&[0x66, 0x2e, 0x0f, 0x09], false, OP_WBINVD),
            (&[0x48, 0x0f, 0x09], true, OP_WBINVD), // REX in long mode
            (&[0x48, 0x0f, 0x09], false, 0),        // 0x48 is DEC eax outside long mode
            (&[0x0f, 0x0b], false, 0),              // UD2
            (&[0x0f], false, 0),                    // truncated
            (&[0x90], false, 0),
            (&[], false, 0),
        ];
        for (bytes, long_mode, want) in cases {
            let (b, len) = insn(bytes);
            assert_eq!(classify_insn(&b, len, *long_mode), *want, "{bytes:02x?}");
        }
        // A length byte larger than the array must not read past it.
        let (b, _) = insn(&[0x0f, 0x09]);
        assert_eq!(classify_insn(&b, 200, false), OP_WBINVD);
        // Fourteen prefixes and nothing else is not an instruction we count.
        let b = [0x66u8; 15];
        assert_eq!(classify_insn(&b, 15, false), 0);
    }

    #[test]
    fn emulate_insn_layout() {
        let f = |offset, size| Field { offset, size };
        // The 6.18 format: len@20, insn[15]@21, flags@36, failed@37.
        assert!(emul_is_packed(f(20, 1), f(21, 15), f(36, 1), f(37, 1)));
        assert!(!emul_is_packed(f(20, 1), f(24, 15), f(39, 1), f(40, 1)));
        assert!(!emul_is_packed(f(20, 2), f(21, 15), f(36, 1), f(37, 1)));
        assert!(!emul_is_packed(f(20, 1), f(21, 16), f(37, 1), f(38, 1)));
    }

    #[test]
    fn cost_buckets() {
        assert_eq!(cost_bucket(0), 0);
        assert_eq!(cost_bucket(1_000), 0);
        assert_eq!(cost_bucket(1_001), 1);
        assert_eq!(cost_bucket(99_999_999), 15);
        assert_eq!(cost_bucket(100_000_000), 15);
        assert_eq!(cost_bucket(100_000_001), 16);
        assert_eq!(cost_bucket(u64::MAX), 16);
        assert_eq!(flush_cpus_bucket(0), 0);
        assert_eq!(flush_cpus_bucket(3), 2);
        assert_eq!(flush_cpus_bucket(256), 8);
        assert_eq!(flush_cpus_bucket(257), 9);
    }

    #[test]
    fn watched_ioctls() {
        for cmd in WATCHED_IOCTLS {
            assert!(is_watched_ioctl(cmd), "{cmd:#x}");
        }
        assert!(!is_watched_ioctl(0xae80)); // KVM_RUN
        assert!(!is_watched_ioctl(KVM_GET_DEVICE_ATTR));
        assert!(!is_watched_ioctl(0x5401)); // TCGETS
        assert!(!is_watched_ioctl(0));
    }
}
