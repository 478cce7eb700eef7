//! Names and sizes of every map in the object. The agent looks maps up by these names, and a
//! test checks that each one exists in the built object. Program names live in the hook table
//! ([`crate::hooks::HOOKS`]).

/// Per-CPU hash: [`crate::counters::CounterKey`] -> u64. Exact WBINVD/INVD counts.
pub const MAP_COUNTERS: &str = "IOASID_COUNTERS";
/// Per-CPU array of u64 indexed by [`crate::counters::Stat`]: drops, read errors, map-full events.
pub const MAP_STATS: &str = "IOASID_STATS";
/// The one ring buffer of [`crate::events::IoctlEvent`] / [`crate::events::TransitionEvent`].
pub const MAP_EVENTS: &str = "IOASID_EVENTS";
/// The ring buffer of incoherent-DMA enables (FILE_ADD/DEL events) only: only a process holding
/// a real KVM device fd can write to it, so nothing a user floods shares it with decisions.
pub const MAP_DECISIONS: &str = "IOASID_DECISIONS";
/// Array of u64, one per [`crate::ioctl::WATCHED_IOCTL_FNS`]: the function's address (0: not
/// loaded). A file whose file_operations have no owning module (built in; and KVM's device
/// fds on kernels that leave their owner unset) is watched if its unlocked_ioctl is one. The
/// agent keeps it current as modules load and unload.
pub const MAP_IOCTL_FNS: &str = "IOASID_IOCTL_FNS";
/// Array of [`crate::cost::FlushMark`] by target CPU: the WBINVD flush that last aimed there.
pub const MAP_FLUSH_TARGETS: &str = "IOASID_FLUSH_TARGETS";
/// Per-CPU array of one [`crate::cost::IpiStart`]: the flush IPI running on this CPU.
pub const MAP_IPI_START: &str = "IOASID_IPI_START";
/// Per-CPU hash [`crate::cost::BlastKey`] -> u64: flush IPIs and their time, by flusher and
/// victim (the process the IPI interrupted on another CPU).
pub const MAP_BLAST: &str = "IOASID_BLAST";
pub const BLAST_MAX_ENTRIES: u32 = 16384;
/// Hash: tgid -> [`crate::verdict::VmVerdict`], the compiled policy for each classified VMM
/// (applied only to the process whose start it carries). Written by the agent only.
pub const MAP_VM_POLICY: &str = "IOASID_VM_POLICY";
/// Hash: [`crate::verdict::FdKey`] -> u32 device type, kvm device fds from KVM_CREATE_DEVICE.
pub const MAP_KVM_DEVICES: &str = "IOASID_KVM_DEVICES";
/// Hash: thread id -> [`crate::events::IoctlEvent`], ioctls between sys_enter and sys_exit.
pub const MAP_INFLIGHT: &str = "IOASID_INFLIGHT";
/// Hash: tgid -> [`crate::verdict::Asked`], processes the kernel stopped to ask the agent. The
/// agent removes an entry when it has decided; one whose event never arrived (ring full) is
/// found here and decided all the same, so no VMM stays stopped.
pub const MAP_ASKED: &str = "IOASID_ASKED";
/// Array of one [`crate::config::Control`].
pub const MAP_CONTROL: &str = "IOASID_CONTROL";
/// Per-CPU hash: [`crate::cost::CostKey`] -> u64. WBINVD handler time histogram and ns sum.
pub const MAP_COST: &str = "IOASID_COST";
/// Hash: thread id -> [`crate::cost::Pending`], a WBINVD being handled.
pub const MAP_PENDING: &str = "IOASID_PENDING";
/// Array of one u64: pending WBINVDs host-wide. While 0 (nearly always) the closers on every
/// VM entry, emulated instruction and syscall exit return after one array read.
pub const MAP_PENDING_COUNT: &str = "IOASID_PENDING_COUNT";
/// Hash: [`crate::verdict::FdKey`] -> u32 [`crate::events::Coherency`]: the VFIO group and
/// device fds the agent has resolved, so a FILE_ADD is judged by its coherency in the kernel,
/// with no round trip. Written by the agent only.
pub const MAP_FILE_COHERENCY: &str = "IOASID_FILE_COHERENCY";
/// Hash: tgid -> u64 start ([`crate::verdict::start_ticks`]) of the VMM the agent found
/// non-coherent (a successful FILE_ADD of a device whose IOMMU does not enforce coherency, or
/// such a device held when first seen): applies to that process only. Written by the agent only.
pub const MAP_NONCOHERENT: &str = "IOASID_NONCOHERENT";
/// Hash: [`crate::verdict::ProcKey`] -> u64 count of kvm_arch_register_noncoherent_dma minus
/// unregister, by KVM itself (fentry, where trampolines load). Written by the kernel programs
/// only.
pub const MAP_NONCOHERENT_KVM: &str = "IOASID_NONCOHERENT_KVM";
/// Per-CPU array of u64 indexed by [`crate::cost::flush_cpus_bucket`]: CPUs reached per flush.
pub const MAP_FLUSH_CPUS: &str = "IOASID_FLUSH_CPUS";
/// Array of one u64: watched ioctls between sys_enter and sys_exit, host-wide. While it is 0
/// (nearly always) the sys_exit programs return without a hash lookup.
pub const MAP_INFLIGHT_COUNT: &str = "IOASID_INFLIGHT_COUNT";

/// Hash: thread id -> [`crate::counters::ExitMark`], set only where `Control::skip_emulation`.
pub const MAP_EXIT_MARKS: &str = "IOASID_EXIT_MARKS";
/// Array of one u64: exit marks host-wide; while 0 the emulation program does no lookup.
pub const MAP_MARKS_COUNT: &str = "IOASID_MARKS_COUNT";

/// LRU hash tgid -> [`crate::events::Cmdline`]: command lines captured at KVM_CREATE_VM.
pub const MAP_CMDLINES: &str = "IOASID_CMDLINES";
pub const CMDLINES_MAX_ENTRIES: u32 = 4096;
/// Per-CPU array of one [`crate::events::Cmdline`]: the capture's scratch (too big for the stack).
pub const MAP_CMDLINE_SCRATCH: &str = "IOASID_CMDLINE_SCRATCH";

/// Array of [`KEYS_GEN_LEN`] u64s: per swept hash map, how many times a key was added to it
/// (by the programs; by the agent for the maps only it writes). While a map's count stands
/// still the agent reads the keys it knows by lookup, instead of walking the map: a walk visits
/// every bucket of the hash table however few entries it holds (tens of thousands, ten times a
/// second). Not pinned: a new agent walks each map once.
pub const MAP_KEYS_GEN: &str = "IOASID_KEYS_GEN";
/// Slots of [`MAP_KEYS_GEN`].
pub const KEYS_GEN_COUNTERS: u32 = 0;
pub const KEYS_GEN_COST: u32 = 1;
pub const KEYS_GEN_BLAST: u32 = 2;
pub const KEYS_GEN_NONCOHERENT_KVM: u32 = 3;
pub const KEYS_GEN_ASKED: u32 = 4;
pub const KEYS_GEN_LEN: u32 = 5;

/// Every map name, for the object test.
pub const ALL_MAPS: [&str; 26] = [
    MAP_KEYS_GEN,
    MAP_FLUSH_TARGETS,
    MAP_IPI_START,
    MAP_BLAST,
    MAP_IOCTL_FNS,
    MAP_DECISIONS,
    MAP_CMDLINES,
    MAP_CMDLINE_SCRATCH,
    MAP_FILE_COHERENCY,
    MAP_EXIT_MARKS,
    MAP_MARKS_COUNT,
    MAP_COUNTERS,
    MAP_STATS,
    MAP_EVENTS,
    MAP_VM_POLICY,
    MAP_KVM_DEVICES,
    MAP_INFLIGHT,
    MAP_ASKED,
    MAP_CONTROL,
    MAP_COST,
    MAP_PENDING,
    MAP_PENDING_COUNT,
    MAP_NONCOHERENT,
    MAP_NONCOHERENT_KVM,
    MAP_FLUSH_CPUS,
    MAP_INFLIGHT_COUNT,
];

/// The maps that outlive the agent (pinned in bpffs, adopted by the next agent): open asks,
/// counters, WBINVD cost, the kernel's statistics, which VMs are non-coherent, and the kvm-vfio
/// device fds and VFIO file coherency learned so far. Everything else (verdicts, in-flight
/// requests, pending timers, the ring buffer, the control word) starts afresh with each agent.
pub const PERSISTENT_MAPS: [&str; 10] = [
    MAP_BLAST,
    MAP_ASKED,
    MAP_COUNTERS,
    MAP_COST,
    MAP_STATS,
    MAP_FLUSH_CPUS,
    MAP_NONCOHERENT,
    MAP_NONCOHERENT_KVM,
    MAP_KVM_DEVICES,
    MAP_FILE_COHERENCY,
];

/// Name of the read-only global holding [`crate::config::ProgConfig`].
pub const GLOBAL_CONFIG: &str = "IOASID_CONFIG";

pub const COUNTERS_MAX_ENTRIES: u32 = 16384;
pub const VM_POLICY_MAX_ENTRIES: u32 = 8192;
pub const KVM_DEVICES_MAX_ENTRIES: u32 = 8192;
pub const INFLIGHT_MAX_ENTRIES: u32 = 4096;
/// 18 keys per VM (16 buckets, +Inf, sum).
pub const COST_MAX_ENTRIES: u32 = 65536;
/// 256 KiB: ioctl events are rare (a handful per VM start), so this is generous.
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;
/// 64 KiB: about 430 enable events. In enforcing mode the kernel stops and asks (a kernel-side
/// record) instead of allowing an enable while fewer than [`DECISIONS_RESERVE`] bytes are free.
pub const DECISIONS_RING_BYTES: u32 = 64 * 1024;
/// Free space under which an enable is asked about rather than allowed: 8 records.
pub const DECISIONS_RESERVE: u32 = 8 * 160;
