//! The one table of every hook ioasid knows: which program, where it attaches, whether the
//! agent can run without it, what it is for, and which hooks are alternatives of each other.
//! The loader attaches from it, `ioasid-agent status` prints it, the README's hook table is
//! generated from it (`cargo xtask docs`), and a test checks it against the built object.

/// Where a program attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    TracePoint { category: &'static str, name: &'static str },
    BtfTracePoint { name: &'static str },
    FEntry { function: &'static str },
    FExit { function: &'static str },
    Lsm { hook: &'static str },
}

/// Groups of alternatives: the first hook of a group (in table order) that attaches serves;
/// the others stand by. A required group needs one of them.
pub const GROUP_VM_ENTRY: &str = "vm-entry";
pub const GROUP_IOCTL_ENTER: &str = "ioctl-enter";
pub const GROUP_IOCTL_EXIT: &str = "ioctl-exit";
pub const GROUP_FLUSH_CPUS: &str = "flush-cpus";

/// Labels the agent names in its own logic (the rest are only in the table).
pub const HOOK_TP_BTF_SYS_ENTER: &str = "tp_btf/sys_enter";
pub const HOOK_FENTRY_WBINVD_IPI: &str = "fentry/wbinvd_ipi";
pub const HOOK_FEXIT_WBINVD_IPI: &str = "fexit/wbinvd_ipi";
pub const HOOK_LSM_FILE_IOCTL: &str = "lsm/file_ioctl";
pub const HOOK_FEXIT_KVM_VFIO_SET_ATTR: &str = "fexit/kvm_vfio_set_attr";

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

use HookKind::{BtfTracePoint, FEntry, FExit, Lsm};

/// Every hook, in attach order (alternatives: preferred first).
pub const HOOKS: &[HookSpec] = &[
    hook!(
        "tracepoint/kvm/kvm_exit",
        "ioasid_kvm_exit",
        tp("kvm", "kvm_exit"),
        false,
        None,
        "WBINVD/INVD hardware exits"
    ),
    hook!(
        "tracepoint/kvm/kvm_emulate_insn",
        "ioasid_kvm_emulate_insn",
        tp("kvm", "kvm_emulate_insn"),
        false,
        None,
        "WBINVD/INVD run by KVM's emulator"
    ),
    hook!(
        "tp_btf/kvm_entry",
        "ioasid_tp_btf_kvm_entry",
        BtfTracePoint { name: "kvm_entry" },
        true,
        Some(GROUP_VM_ENTRY),
        "ends a WBINVD's handling time at the next VM entry (cheapest)"
    ),
    hook!(
        "tracepoint/kvm/kvm_entry",
        "ioasid_kvm_entry",
        tp("kvm", "kvm_entry"),
        true,
        Some(GROUP_VM_ENTRY),
        "ends a WBINVD's handling time at the next VM entry"
    ),
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
        None,
        "WBINVD exit handler start (exact handler time)"
    ),
    hook!(
        "fentry/emulator_wbinvd",
        "ioasid_fentry_emulator_wbinvd",
        FEntry { function: "emulator_wbinvd" },
        true,
        None,
        "WBINVD emulator handler start (exact handler time)"
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
        "CPUs each WBINVD flush reaches (older kernels: KVM's on_each_cpu_mask(..., wbinvd_ipi))"
    ),
    hook!(
        HOOK_FENTRY_WBINVD_IPI,
        "ioasid_fentry_wbinvd_ipi",
        FEntry { function: "wbinvd_ipi" },
        true,
        None,
        "blast radius: a flush IPI interrupts a task on another CPU (kernels before ~6.17)"
    ),
    hook!(
        HOOK_FEXIT_WBINVD_IPI,
        "ioasid_fexit_wbinvd_ipi",
        FExit { function: "wbinvd_ipi" },
        true,
        None,
        "blast radius: the time a flush IPI took from the task it interrupted"
    ),
    hook!(
        "fexit/kvm_emulate_wbinvd",
        "ioasid_fexit_kvm_emulate_wbinvd",
        FExit { function: "kvm_emulate_wbinvd" },
        true,
        None,
        "WBINVD exit handler calls"
    ),
    hook!(
        "fexit/emulator_wbinvd",
        "ioasid_fexit_emulator_wbinvd",
        FExit { function: "emulator_wbinvd" },
        true,
        None,
        "WBINVD emulator handler calls"
    ),
    hook!(
        HOOK_LSM_FILE_IOCTL,
        "ioasid_lsm_file_ioctl",
        Lsm { hook: "file_ioctl" },
        true,
        None,
        "observes, judges and enforces the ioctl path with fexit/kvm_vfio_set_attr (no syscall tracepoint); else denies FILE_ADD with -EPERM"
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
        None,
        "the kernel's own coherency verdict for each FILE_ADD"
    ),
    hook!(
        "fentry/kvm_arch_register_noncoherent_dma",
        "ioasid_fentry_register_noncoherent",
        FEntry { function: "kvm_arch_register_noncoherent_dma" },
        true,
        None,
        "a VM becomes non-coherent"
    ),
    hook!(
        "fentry/kvm_arch_unregister_noncoherent_dma",
        "ioasid_fentry_unregister_noncoherent",
        FEntry { function: "kvm_arch_unregister_noncoherent_dma" },
        true,
        None,
        "a VM is coherent again"
    ),
];

/// The hooks whose attachment makes the handler hooks the WBINVD cost source (all four).
pub const HANDLER_COST_HOOKS: [&str; 4] = [
    "fentry/kvm_emulate_wbinvd",
    "fexit/kvm_emulate_wbinvd",
    "fentry/emulator_wbinvd",
    "fexit/emulator_wbinvd",
];

/// The hooks that, both attached, serve the whole ioctl path without any syscall tracepoint.
pub const LSM_IOCTL_HOOKS: [&str; 2] = [HOOK_LSM_FILE_IOCTL, HOOK_FEXIT_KVM_VFIO_SET_ATTR];

/// The hooks that measure who a flush interrupts (blast radius): both are needed.
pub const BLAST_HOOKS: [&str; 2] = [HOOK_FENTRY_WBINVD_IPI, HOOK_FEXIT_WBINVD_IPI];

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
        for label in HANDLER_COST_HOOKS
            .iter()
            .chain(&LSM_IOCTL_HOOKS)
            .chain(&BLAST_HOOKS)
            .chain(&[HOOK_TP_BTF_SYS_ENTER])
        {
            assert!(hook(label).is_some(), "{label}");
        }
    }
}
