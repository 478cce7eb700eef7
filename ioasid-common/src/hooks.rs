//! The one table of every hook ioasid knows: which program, where it attaches, whether the
//! agent can run without it, what it is for, and which hooks are alternatives of each other.
//! The loader attaches from it, `ioasid-agent status` prints it, the README's hook table is
//! generated from it (`cargo xtask docs`), and a test checks it against the built object.

/// Where a program attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    TracePoint {
        category: &'static str,
        name: &'static str,
    },
    BtfTracePoint {
        name: &'static str,
    },
    FEntry {
        function: &'static str,
    },
    FExit {
        function: &'static str,
    },
    /// A kprobe: the alternative of an fentry where the function has no BTF (kernels before
    /// 5.11 have no module BTF), on kernels with kprobes.
    KProbe {
        function: &'static str,
    },
    /// A kretprobe: the alternative of an fexit, likewise.
    KRetProbe {
        function: &'static str,
    },
    Lsm {
        hook: &'static str,
    },
}

/// Groups of alternatives: the first hook of a group (in table order) that attaches serves;
/// the others stand by. A required group needs one of them.
pub const GROUP_VM_ENTRY: &str = "vm-entry";
pub const GROUP_IOCTL_ENTER: &str = "ioctl-enter";
pub const GROUP_IOCTL_EXIT: &str = "ioctl-exit";
pub const GROUP_FLUSH_CPUS: &str = "flush-cpus";
pub const GROUP_EXIT_HANDLER_START: &str = "exit-handler-start";
pub const GROUP_EXIT_HANDLER_END: &str = "exit-handler-end";
pub const GROUP_EMULATOR_HANDLER_START: &str = "emulator-handler-start";
pub const GROUP_EMULATOR_HANDLER_END: &str = "emulator-handler-end";
pub const GROUP_FLUSH_IPI_START: &str = "flush-ipi-start";
pub const GROUP_FLUSH_IPI_END: &str = "flush-ipi-end";
pub const GROUP_NONCOHERENT_REGISTER: &str = "noncoherent-register";
pub const GROUP_NONCOHERENT_UNREGISTER: &str = "noncoherent-unregister";
pub const GROUP_LSM_IOCTL: &str = "lsm-ioctl";
pub const GROUP_KERNEL_VERDICT: &str = "kernel-verdict";
pub const GROUP_EMULATED_COUNT: &str = "emulated-count";

/// Labels the agent names in its own logic (the rest are only in the table).
pub const HOOK_TP_BTF_SYS_ENTER: &str = "tp_btf/sys_enter";
pub const HOOK_KVM_EXIT: &str = "tracepoint/kvm/kvm_exit";
pub const HOOK_KVM_EMULATE_INSN: &str = "tracepoint/kvm/kvm_emulate_insn";
pub const HOOK_TP_BTF_KVM_EMULATE_INSN: &str = "tp_btf/kvm_emulate_insn";
pub const HOOK_FENTRY_KVM_EMULATE_INVD: &str = "fentry/kvm_emulate_invd";
pub const HOOK_FEXIT_HANDLE_FASTPATH_INVD: &str = "fexit/handle_fastpath_invd";
pub const HOOK_FENTRY_WBINVD_IPI: &str = "fentry/wbinvd_ipi";
pub const HOOK_FEXIT_WBINVD_IPI: &str = "fexit/wbinvd_ipi";
pub const HOOK_LSM_FILE_IOCTL: &str = "lsm/file_ioctl";
pub const HOOK_LSM_FILE_IOCTL_DENY: &str = "lsm/file_ioctl:deny-only";
pub const HOOK_FEXIT_KVM_VFIO_SET_ATTR: &str = "fexit/kvm_vfio_set_attr";
pub const HOOK_FENTRY_KVM_VFIO_SET_ATTR: &str = "fentry/kvm_vfio_set_attr";

/// One hook.
#[derive(Debug, Clone, Copy)]
pub struct HookSpec {
    /// Stable label: the `hook` label of `ioasid_hook_attached`.
    pub hook: &'static str,
    /// The program's name in the object.
    pub program: &'static str,
    pub kind: HookKind,
    pub optional: bool,
    pub purpose: &'static str,
    pub group: Option<&'static str>,
    /// An empty program of the same attach type at the same point (`ioasid-agent run
    /// --empty-programs`): what the attachment itself costs, the baseline of `cargo xtask bench`.
    pub empty: &'static str,
}

impl HookSpec {
    /// True for the syscall-path hooks that `--ioctl-hooks` chooses between.
    pub fn is_ioctl_path(&self) -> bool {
        matches!(self.group, Some(GROUP_IOCTL_ENTER | GROUP_IOCTL_EXIT))
    }
}

const fn tp(category: &'static str, name: &'static str) -> HookKind {
    HookKind::TracePoint { category, name }
}

macro_rules! hook {
    ($hook:expr, $program:literal, $kind:expr, $optional:literal, $group:expr, $purpose:literal) => {
        HookSpec {
            hook: $hook,
            program: $program,
            kind: $kind,
            optional: $optional,
            group: $group,
            purpose: $purpose,
            empty: concat!($program, "_empty"),
        }
    };
}

use HookKind::{BtfTracePoint, FEntry, FExit, KProbe, KRetProbe, Lsm};

/// Every hook, in attach order (alternatives: preferred first).
pub const HOOKS: &[HookSpec] = &[
    hook!(
        HOOK_TP_BTF_SYS_ENTER,
        "ioasid_tp_btf_sys_enter",
        BtfTracePoint { name: "sys_enter" },
        false,
        Some(GROUP_IOCTL_ENTER),
        "KVM/VFIO/iommufd ioctls; judges and enforces FILE_ADD (cheapest)"
    ),
    hook!(
        "tp_btf/sys_exit",
        "ioasid_tp_btf_sys_exit",
        BtfTracePoint { name: "sys_exit" },
        false,
        Some(GROUP_IOCTL_EXIT),
        "ioctl results; kvm-vfio device fds (cheapest)"
    ),
    hook!(
        "tracepoint/syscalls/sys_enter_ioctl",
        "ioasid_sys_enter_ioctl",
        tp("syscalls", "sys_enter_ioctl"),
        false,
        Some(GROUP_IOCTL_ENTER),
        "KVM/VFIO/iommufd ioctls; judges and enforces FILE_ADD"
    ),
    hook!(
        "tracepoint/syscalls/sys_exit_ioctl",
        "ioasid_sys_exit_ioctl",
        tp("syscalls", "sys_exit_ioctl"),
        false,
        Some(GROUP_IOCTL_EXIT),
        "ioctl results; kvm-vfio device fds"
    ),
    hook!(
        "tracepoint/sched/sched_process_exec",
        "ioasid_sched_exec",
        tp("sched", "sched_process_exec"),
        false,
        None,
        "drops a process's verdict when it execs"
    ),
    hook!(
        "fentry/kvm_emulate_wbinvd",
        "ioasid_fentry_kvm_emulate_wbinvd",
        FEntry { function: "kvm_emulate_wbinvd" },
        true,
        Some(GROUP_EXIT_HANDLER_START),
        "WBINVD exit handler start (exact handler time)"
    ),
    hook!(
        "kprobe/kvm_emulate_wbinvd",
        "ioasid_kprobe_kvm_emulate_wbinvd",
        KProbe { function: "kvm_emulate_wbinvd" },
        true,
        Some(GROUP_EXIT_HANDLER_START),
        "WBINVD exit handler start, where kvm has no BTF (5.10)"
    ),
    hook!(
        "fentry/emulator_wbinvd",
        "ioasid_fentry_emulator_wbinvd",
        FEntry { function: "emulator_wbinvd" },
        true,
        Some(GROUP_EMULATOR_HANDLER_START),
        "WBINVD emulator handler start (exact handler time)"
    ),
    hook!(
        "kprobe/emulator_wbinvd",
        "ioasid_kprobe_emulator_wbinvd",
        KProbe { function: "emulator_wbinvd" },
        true,
        Some(GROUP_EMULATOR_HANDLER_START),
        "WBINVD emulator handler start, where kvm has no BTF (5.10)"
    ),
    hook!(
        "fexit/kvm_emulate_wbinvd",
        "ioasid_fexit_kvm_emulate_wbinvd",
        FExit { function: "kvm_emulate_wbinvd" },
        true,
        Some(GROUP_EXIT_HANDLER_END),
        "WBINVD exit handler calls"
    ),
    hook!(
        "kretprobe/kvm_emulate_wbinvd",
        "ioasid_kretprobe_kvm_emulate_wbinvd",
        KRetProbe { function: "kvm_emulate_wbinvd" },
        true,
        Some(GROUP_EXIT_HANDLER_END),
        "WBINVD exit handler calls, where kvm has no BTF (5.10)"
    ),
    hook!(
        "fexit/emulator_wbinvd",
        "ioasid_fexit_emulator_wbinvd",
        FExit { function: "emulator_wbinvd" },
        true,
        Some(GROUP_EMULATOR_HANDLER_END),
        "WBINVD emulator handler calls"
    ),
    hook!(
        "kretprobe/emulator_wbinvd",
        "ioasid_kretprobe_emulator_wbinvd",
        KRetProbe { function: "emulator_wbinvd" },
        true,
        Some(GROUP_EMULATOR_HANDLER_END),
        "WBINVD emulator handler calls, where kvm has no BTF (5.10)"
    ),
    hook!(
        HOOK_FENTRY_KVM_EMULATE_INVD,
        "ioasid_fentry_kvm_emulate_invd",
        FEntry { function: "kvm_emulate_invd" },
        true,
        None,
        "INVD exits, where the handlers count (6.1+; KVM only skips INVD)"
    ),
    hook!(
        HOOK_FEXIT_HANDLE_FASTPATH_INVD,
        "ioasid_fexit_handle_fastpath_invd",
        FExit { function: "handle_fastpath_invd" },
        true,
        None,
        "INVD exits KVM handles on its fastpath (~6.18+), where the handlers count"
    ),
    hook!(
        HOOK_KVM_EXIT,
        "ioasid_kvm_exit",
        tp("kvm", "kvm_exit"),
        false,
        None,
        "WBINVD/INVD hardware exits, where the handlers cannot count (every VM exit runs it)"
    ),
    hook!(
        HOOK_TP_BTF_KVM_EMULATE_INSN,
        "ioasid_tp_btf_kvm_emulate_insn",
        BtfTracePoint { name: "kvm_emulate_insn" },
        false,
        Some(GROUP_EMULATED_COUNT),
        "WBINVD/INVD run by KVM's emulator, where the handlers cannot count: the decoded instruction read from the emulator (no trace record built; cheapest)"
    ),
    hook!(
        HOOK_KVM_EMULATE_INSN,
        "ioasid_kvm_emulate_insn",
        tp("kvm", "kvm_emulate_insn"),
        false,
        Some(GROUP_EMULATED_COUNT),
        "WBINVD/INVD run by KVM's emulator, where the handlers cannot count (every emulated instruction runs it)"
    ),
    hook!(
        "fentry/wbinvd_on_cpus_mask",
        "ioasid_fentry_wbinvd_on_cpus_mask",
        FEntry { function: "wbinvd_on_cpus_mask" },
        true,
        Some(GROUP_FLUSH_CPUS),
        "CPUs each WBINVD flush reaches (kernels with wbinvd_on_cpus_mask, ~6.17+)"
    ),
    hook!(
        "fentry/on_each_cpu_cond_mask",
        "ioasid_fentry_on_each_cpu_cond_mask",
        FEntry { function: "on_each_cpu_cond_mask" },
        true,
        Some(GROUP_FLUSH_CPUS),
        "CPUs each WBINVD flush reaches (6.1-6.16: KVM's on_each_cpu_mask(..., wbinvd_ipi))"
    ),
    hook!(
        "fentry/smp_call_function_many",
        "ioasid_fentry_smp_call_function_many",
        FEntry { function: "smp_call_function_many" },
        true,
        Some(GROUP_FLUSH_CPUS),
        "CPUs each WBINVD flush reaches (5.10: KVM's smp_call_function_many(..., wbinvd_ipi), which never flushes the calling CPU)"
    ),
    hook!(
        HOOK_FENTRY_WBINVD_IPI,
        "ioasid_fentry_wbinvd_ipi",
        FEntry { function: "wbinvd_ipi" },
        true,
        Some(GROUP_FLUSH_IPI_START),
        "blast radius: a flush IPI interrupts a task on another CPU (KVM's wbinvd_ipi, 6.1-6.16)"
    ),
    hook!(
        "fentry/__wbinvd",
        "ioasid_fentry_wbinvd_fn",
        FEntry { function: "__wbinvd" },
        true,
        Some(GROUP_FLUSH_IPI_START),
        "blast radius: a flush IPI interrupts a task on another CPU (what wbinvd_on_cpus_mask runs there, ~6.17+)"
    ),
    hook!(
        "kprobe/wbinvd_ipi",
        "ioasid_kprobe_wbinvd_ipi",
        KProbe { function: "wbinvd_ipi" },
        true,
        Some(GROUP_FLUSH_IPI_START),
        "blast radius: a flush IPI interrupts a task on another CPU, where kvm has no BTF (5.10)"
    ),
    hook!(
        HOOK_FEXIT_WBINVD_IPI,
        "ioasid_fexit_wbinvd_ipi",
        FExit { function: "wbinvd_ipi" },
        true,
        Some(GROUP_FLUSH_IPI_END),
        "blast radius: the time a flush IPI took from the task it interrupted (6.1-6.16)"
    ),
    hook!(
        "fexit/__wbinvd",
        "ioasid_fexit_wbinvd_fn",
        FExit { function: "__wbinvd" },
        true,
        Some(GROUP_FLUSH_IPI_END),
        "blast radius: the time a flush IPI took from the task it interrupted (~6.17+)"
    ),
    hook!(
        "kretprobe/wbinvd_ipi",
        "ioasid_kretprobe_wbinvd_ipi",
        KRetProbe { function: "wbinvd_ipi" },
        true,
        Some(GROUP_FLUSH_IPI_END),
        "blast radius: the time a flush IPI took, where kvm has no BTF (5.10)"
    ),
    hook!(
        "tp_btf/kvm_entry",
        "ioasid_tp_btf_kvm_entry",
        BtfTracePoint { name: "kvm_entry" },
        true,
        Some(GROUP_VM_ENTRY),
        "ends a WBINVD's handling time at the next VM entry, where the handlers cannot be hooked (cheapest)"
    ),
    hook!(
        "tracepoint/kvm/kvm_entry",
        "ioasid_kvm_entry",
        tp("kvm", "kvm_entry"),
        true,
        Some(GROUP_VM_ENTRY),
        "ends a WBINVD's handling time at the next VM entry, where the handlers cannot be hooked"
    ),
    hook!(
        "fentry/kvm_arch_init_vm",
        "ioasid_fentry_kvm_arch_init_vm",
        FEntry { function: "kvm_arch_init_vm" },
        true,
        None,
        "KVM_CREATE_VM (its only caller): a VM is born, its VMM named"
    ),
    hook!(
        "fentry/kvm_vfio_create",
        "ioasid_fentry_kvm_vfio_create",
        FEntry { function: "kvm_vfio_create" },
        true,
        None,
        "KVM_CREATE_DEVICE of a kvm-vfio device"
    ),
    hook!(
        HOOK_FENTRY_KVM_VFIO_SET_ATTR,
        "ioasid_fentry_kvm_vfio_set_attr",
        FEntry { function: "kvm_vfio_set_attr" },
        true,
        None,
        "FILE_ADD/DEL on a kvm-vfio device, judged from the kernel's copy (enforced by signal where no LSM program refuses it)"
    ),
    hook!(
        "fentry/kvm_vfio_has_attr",
        "ioasid_fentry_kvm_vfio_has_attr",
        FEntry { function: "kvm_vfio_has_attr" },
        true,
        None,
        "KVM_HAS_DEVICE_ATTR on a kvm-vfio device"
    ),
    hook!(
        "fentry/vfio_fops_unl_ioctl",
        "ioasid_fentry_vfio_fops_unl_ioctl",
        FEntry { function: "vfio_fops_unl_ioctl" },
        true,
        None,
        "VFIO container requests (VFIO_SET_IOMMU, VFIO_CHECK_EXTENSION); only that file's requests pay"
    ),
    hook!(
        "fentry/vfio_group_fops_unl_ioctl",
        "ioasid_fentry_vfio_group_fops_unl_ioctl",
        FEntry { function: "vfio_group_fops_unl_ioctl" },
        true,
        None,
        "VFIO group requests (VFIO_GROUP_SET_CONTAINER, VFIO_GROUP_GET_DEVICE_FD); only that file's requests pay"
    ),
    hook!(
        "fentry/vfio_device_fops_unl_ioctl",
        "ioasid_fentry_vfio_device_fops_unl_ioctl",
        FEntry { function: "vfio_device_fops_unl_ioctl" },
        true,
        None,
        "VFIO device cdev requests (VFIO_DEVICE_BIND_IOMMUFD...); only that file's requests pay"
    ),
    hook!(
        "fentry/iommufd_fops_ioctl",
        "ioasid_fentry_iommufd_fops_ioctl",
        FEntry { function: "iommufd_fops_ioctl" },
        true,
        None,
        "iommufd requests (IOMMU_IOAS_ALLOC, IOMMU_HWPT_ALLOC...); only that file's requests pay"
    ),
    hook!(
        HOOK_LSM_FILE_IOCTL,
        "ioasid_lsm_file_ioctl",
        Lsm { hook: "file_ioctl" },
        true,
        Some(GROUP_LSM_IOCTL),
        "observes, judges and enforces the ioctl path with fexit/kvm_vfio_set_attr (no syscall tracepoint); else denies FILE_ADD with -EPERM"
    ),
    hook!(
        HOOK_LSM_FILE_IOCTL_DENY,
        "ioasid_lsm_file_ioctl_deny",
        Lsm { hook: "file_ioctl" },
        true,
        Some(GROUP_LSM_IOCTL),
        "denies FILE_ADD with -EPERM, judged as at sys_enter, on kernels whose verifier refuses the observing program (5.10: no bpf_task_pt_regs)"
    ),
    hook!(
        HOOK_FEXIT_KVM_VFIO_SET_ATTR,
        "ioasid_fexit_kvm_vfio_set_attr",
        FExit { function: "kvm_vfio_set_attr" },
        true,
        None,
        "FILE_ADD/DEL results where the LSM observes the ioctl path (no syscall tracepoint)"
    ),
    hook!(
        "fexit/vfio_file_enforced_coherent",
        "ioasid_fexit_vfio_file_enforced_coherent",
        FExit { function: "vfio_file_enforced_coherent" },
        true,
        Some(GROUP_KERNEL_VERDICT),
        "the kernel's own coherency verdict for each FILE_ADD"
    ),
    hook!(
        "kretprobe/vfio_external_check_extension",
        "ioasid_kretprobe_vfio_external_check_extension",
        KRetProbe { function: "vfio_external_check_extension" },
        true,
        Some(GROUP_KERNEL_VERDICT),
        "the kernel's own coherency verdict for each FILE_ADD (before 6.2: kvm-vfio asks VFIO_DMA_CC_IOMMU)"
    ),
    hook!(
        "fentry/kvm_arch_register_noncoherent_dma",
        "ioasid_fentry_register_noncoherent",
        FEntry { function: "kvm_arch_register_noncoherent_dma" },
        true,
        Some(GROUP_NONCOHERENT_REGISTER),
        "a VM becomes non-coherent"
    ),
    hook!(
        "kprobe/kvm_arch_register_noncoherent_dma",
        "ioasid_kprobe_register_noncoherent",
        KProbe { function: "kvm_arch_register_noncoherent_dma" },
        true,
        Some(GROUP_NONCOHERENT_REGISTER),
        "a VM becomes non-coherent, where kvm has no BTF (5.10)"
    ),
    hook!(
        "fentry/kvm_arch_unregister_noncoherent_dma",
        "ioasid_fentry_unregister_noncoherent",
        FEntry { function: "kvm_arch_unregister_noncoherent_dma" },
        true,
        Some(GROUP_NONCOHERENT_UNREGISTER),
        "a VM is coherent again"
    ),
    hook!(
        "kprobe/kvm_arch_unregister_noncoherent_dma",
        "ioasid_kprobe_unregister_noncoherent",
        KProbe { function: "kvm_arch_unregister_noncoherent_dma" },
        true,
        Some(GROUP_NONCOHERENT_UNREGISTER),
        "a VM is coherent again, where kvm has no BTF (5.10)"
    ),
];

/// The groups whose hooks make the handlers the WBINVD cost source (all four served).
pub const HANDLER_COST_GROUPS: [&str; 4] = [
    GROUP_EXIT_HANDLER_START,
    GROUP_EXIT_HANDLER_END,
    GROUP_EMULATOR_HANDLER_START,
    GROUP_EMULATOR_HANDLER_END,
];

/// The tracepoints that count every WBINVD/INVD where the handlers cannot: every VM exit and
/// every emulated instruction of every VM runs them, so they are attached only there.
pub const COUNT_TRACEPOINTS: [&str; 3] = [HOOK_KVM_EXIT, HOOK_TP_BTF_KVM_EMULATE_INSN, HOOK_KVM_EMULATE_INSN];

/// The functions that do the work of each watched request (KVM's: VM creation, the kvm-vfio
/// device's creation and attributes; VFIO's and iommufd's ioctl functions): fentry programs
/// there serve the whole ioctl path (with fexit/kvm_vfio_set_attr for FILE_ADD's result) and
/// nothing else on the host pays, not even KVM's other ioctls. KVM's three and the fexit must
/// attach (`FUNCTION_IOCTL_CORE`); the VFIO/iommufd ones where their module is loaded.
pub const FUNCTION_IOCTL_HOOKS: [&str; 8] = [
    "fentry/kvm_arch_init_vm",
    "fentry/kvm_vfio_create",
    HOOK_FENTRY_KVM_VFIO_SET_ATTR,
    "fentry/kvm_vfio_has_attr",
    "fentry/vfio_fops_unl_ioctl",
    "fentry/vfio_group_fops_unl_ioctl",
    "fentry/vfio_device_fops_unl_ioctl",
    "fentry/iommufd_fops_ioctl",
];
/// Those on a VFIO or iommufd module, which may load after the agent (attached then).
pub const FUNCTION_IOCTL_VFIO: [&str; 4] = [
    "fentry/vfio_fops_unl_ioctl",
    "fentry/vfio_group_fops_unl_ioctl",
    "fentry/vfio_device_fops_unl_ioctl",
    "fentry/iommufd_fops_ioctl",
];
pub const FUNCTION_IOCTL_CORE: [&str; 4] = [
    "fentry/kvm_arch_init_vm",
    "fentry/kvm_vfio_create",
    HOOK_FENTRY_KVM_VFIO_SET_ATTR,
    HOOK_FEXIT_KVM_VFIO_SET_ATTR,
];

/// The hooks that, both attached, serve the whole ioctl path without any syscall tracepoint.
pub const LSM_IOCTL_HOOKS: [&str; 2] = [HOOK_LSM_FILE_IOCTL, HOOK_FEXIT_KVM_VFIO_SET_ATTR];

/// The groups that measure who a flush interrupts (blast radius): both must be served.
pub const BLAST_GROUPS: [&str; 2] = [GROUP_FLUSH_IPI_START, GROUP_FLUSH_IPI_END];

/// A hook on a generic kernel function that serves ioasid only on kernels whose KVM calls it:
/// it is attached only where the kernel has (`present`) or lacks `symbol`.
#[derive(Debug, Clone, Copy)]
pub struct OnlyWhere {
    pub hook: &'static str,
    pub symbol: &'static str,
    pub present: bool,
    /// Why, as `status` says it where the hook does not apply.
    pub why: &'static str,
}

/// Hooks whose function every kernel has but whose KVM caller changed: `__wbinvd` is what
/// `wbinvd_on_cpus_mask` runs (KVM's flush since ~6.17, when `wbinvd_ipi` went away), but
/// `wbinvd_on_all_cpus` runs it on every kernel; KVM's flush lands in `on_each_cpu_cond_mask`
/// where `on_each_cpu_mask` is an inline wrapper (6.x), and is a bare `smp_call_function_many`
/// where `on_each_cpu_mask` is still a function of its own (5.10).
pub const ONLY_WHERE: &[OnlyWhere] = &[
    OnlyWhere {
        hook: "fentry/__wbinvd",
        symbol: "wbinvd_ipi",
        present: false,
        why: "KVM flushes through wbinvd_ipi on this kernel",
    },
    OnlyWhere {
        hook: "fexit/__wbinvd",
        symbol: "wbinvd_ipi",
        present: false,
        why: "KVM flushes through wbinvd_ipi on this kernel",
    },
    OnlyWhere {
        hook: "fentry/on_each_cpu_cond_mask",
        symbol: "on_each_cpu_mask",
        present: false,
        why: "on_each_cpu_mask is a function of its own here: KVM flushes with smp_call_function_many",
    },
    OnlyWhere {
        hook: "fentry/smp_call_function_many",
        symbol: "on_each_cpu_mask",
        present: true,
        why: "on_each_cpu_mask is inline here: KVM's flush runs through on_each_cpu_cond_mask",
    },
];

/// The hook of `label`.
pub fn hook(label: &str) -> Option<&'static HookSpec> {
    HOOKS.iter().find(|h| h.hook == label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        for (i, h) in HOOKS.iter().enumerate() {
            assert!(
                HOOKS[..i].iter().all(|o| o.hook != h.hook && o.program != h.program && o.empty != h.empty),
                "{} twice",
                h.hook
            );
            if let Some(g) = h.group {
                // Alternatives share whether they are required.
                assert!(HOOKS.iter().filter(|o| o.group == Some(g)).all(|o| o.optional == h.optional));
            }
        }
        for label in LSM_IOCTL_HOOKS
            .iter()
            .chain(&[HOOK_TP_BTF_SYS_ENTER, HOOK_LSM_FILE_IOCTL_DENY])
            .chain(&FUNCTION_IOCTL_HOOKS)
            .chain(&FUNCTION_IOCTL_CORE)
        {
            assert!(hook(label).is_some(), "{label}");
        }
        for only in ONLY_WHERE {
            assert!(hook(only.hook).is_some(), "{}", only.hook);
        }
        for group in HANDLER_COST_GROUPS.iter().chain(&BLAST_GROUPS) {
            assert!(HOOKS.iter().filter(|h| h.group == Some(group)).count() >= 2, "{group}");
        }
    }
}
