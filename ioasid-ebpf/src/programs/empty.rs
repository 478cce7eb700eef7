//! One empty program per hook, of the same attach type at the same point: what the attachment
//! itself costs, beside what each program adds (`ioasid-agent run --empty-programs`, the
//! baseline of `cargo xtask bench`). Never attached by a normal run.

use aya_ebpf::{
    macros::{btf_tracepoint, fentry, fexit, kprobe, kretprobe, lsm, tracepoint},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, LsmContext, ProbeContext, RetProbeContext,
        TracePointContext,
    },
};

macro_rules! empty {
    ($($attr:meta => $name:ident($ctx:ty) -> $ret:ty;)*) => {
        $(
            #[$attr]
            pub fn $name(_ctx: $ctx) -> $ret {
                0
            }
        )*
    };
}

empty! {
    tracepoint(category = "kvm", name = "kvm_exit") => ioasid_kvm_exit_empty(TracePointContext) -> u32;
    tracepoint(category = "kvm", name = "kvm_emulate_insn") => ioasid_kvm_emulate_insn_empty(TracePointContext) -> u32;
    btf_tracepoint(function = "kvm_emulate_insn") => ioasid_tp_btf_kvm_emulate_insn_empty(BtfTracePointContext) -> i32;
    btf_tracepoint(function = "kvm_entry") => ioasid_tp_btf_kvm_entry_empty(BtfTracePointContext) -> i32;
    tracepoint(category = "kvm", name = "kvm_entry") => ioasid_kvm_entry_empty(TracePointContext) -> u32;
    btf_tracepoint(function = "sys_enter") => ioasid_tp_btf_sys_enter_empty(BtfTracePointContext) -> i32;
    btf_tracepoint(function = "sys_exit") => ioasid_tp_btf_sys_exit_empty(BtfTracePointContext) -> i32;
    tracepoint(category = "syscalls", name = "sys_enter_ioctl") => ioasid_sys_enter_ioctl_empty(TracePointContext) -> u32;
    tracepoint(category = "syscalls", name = "sys_exit_ioctl") => ioasid_sys_exit_ioctl_empty(TracePointContext) -> u32;
    tracepoint(category = "sched", name = "sched_process_exec") => ioasid_sched_exec_empty(TracePointContext) -> u32;
    fentry(function = "kvm_emulate_wbinvd") => ioasid_fentry_kvm_emulate_wbinvd_empty(FEntryContext) -> i32;
    fentry(function = "emulator_wbinvd") => ioasid_fentry_emulator_wbinvd_empty(FEntryContext) -> i32;
    fentry(function = "wbinvd_on_cpus_mask") => ioasid_fentry_wbinvd_on_cpus_mask_empty(FEntryContext) -> i32;
    fentry(function = "on_each_cpu_cond_mask") => ioasid_fentry_on_each_cpu_cond_mask_empty(FEntryContext) -> i32;
    fentry(function = "wbinvd_ipi") => ioasid_fentry_wbinvd_ipi_empty(FEntryContext) -> i32;
    fexit(function = "wbinvd_ipi") => ioasid_fexit_wbinvd_ipi_empty(FExitContext) -> i32;
    fexit(function = "kvm_emulate_wbinvd") => ioasid_fexit_kvm_emulate_wbinvd_empty(FExitContext) -> i32;
    fexit(function = "emulator_wbinvd") => ioasid_fexit_emulator_wbinvd_empty(FExitContext) -> i32;
    lsm(hook = "file_ioctl") => ioasid_lsm_file_ioctl_empty(LsmContext) -> i32;
    fexit(function = "kvm_vfio_set_attr") => ioasid_fexit_kvm_vfio_set_attr_empty(FExitContext) -> i32;
    fexit(function = "vfio_file_enforced_coherent") => ioasid_fexit_vfio_file_enforced_coherent_empty(FExitContext) -> i32;
    fentry(function = "kvm_arch_register_noncoherent_dma") => ioasid_fentry_register_noncoherent_empty(FEntryContext) -> i32;
    fentry(function = "kvm_arch_unregister_noncoherent_dma") => ioasid_fentry_unregister_noncoherent_empty(FEntryContext) -> i32;
    kprobe(function = "kvm_emulate_wbinvd") => ioasid_kprobe_kvm_emulate_wbinvd_empty(ProbeContext) -> u32;
    kprobe(function = "emulator_wbinvd") => ioasid_kprobe_emulator_wbinvd_empty(ProbeContext) -> u32;
    fentry(function = "smp_call_function_many") => ioasid_fentry_smp_call_function_many_empty(FEntryContext) -> i32;
    fentry(function = "__wbinvd") => ioasid_fentry_wbinvd_fn_empty(FEntryContext) -> i32;
    kprobe(function = "wbinvd_ipi") => ioasid_kprobe_wbinvd_ipi_empty(ProbeContext) -> u32;
    fexit(function = "__wbinvd") => ioasid_fexit_wbinvd_fn_empty(FExitContext) -> i32;
    kretprobe(function = "wbinvd_ipi") => ioasid_kretprobe_wbinvd_ipi_empty(RetProbeContext) -> u32;
    kretprobe(function = "kvm_emulate_wbinvd") => ioasid_kretprobe_kvm_emulate_wbinvd_empty(RetProbeContext) -> u32;
    kretprobe(function = "emulator_wbinvd") => ioasid_kretprobe_emulator_wbinvd_empty(RetProbeContext) -> u32;
    lsm(hook = "file_ioctl") => ioasid_lsm_file_ioctl_deny_empty(LsmContext) -> i32;
    kprobe(function = "kvm_arch_register_noncoherent_dma") => ioasid_kprobe_register_noncoherent_empty(ProbeContext) -> u32;
    kprobe(function = "kvm_arch_unregister_noncoherent_dma") => ioasid_kprobe_unregister_noncoherent_empty(ProbeContext) -> u32;
    kretprobe(function = "vfio_external_check_extension") => ioasid_kretprobe_vfio_external_check_extension_empty(RetProbeContext) -> u32;
    fentry(function = "kvm_emulate_invd") => ioasid_fentry_kvm_emulate_invd_empty(FEntryContext) -> i32;
    fexit(function = "handle_fastpath_invd") => ioasid_fexit_handle_fastpath_invd_empty(FExitContext) -> i32;
    fentry(function = "kvm_arch_init_vm") => ioasid_fentry_kvm_arch_init_vm_empty(FEntryContext) -> i32;
    fentry(function = "kvm_vfio_create") => ioasid_fentry_kvm_vfio_create_empty(FEntryContext) -> i32;
    fentry(function = "kvm_vfio_set_attr") => ioasid_fentry_kvm_vfio_set_attr_empty(FEntryContext) -> i32;
    fentry(function = "kvm_vfio_has_attr") => ioasid_fentry_kvm_vfio_has_attr_empty(FEntryContext) -> i32;
    fentry(function = "vfio_fops_unl_ioctl") => ioasid_fentry_vfio_fops_unl_ioctl_empty(FEntryContext) -> i32;
    fentry(function = "vfio_group_fops_unl_ioctl") => ioasid_fentry_vfio_group_fops_unl_ioctl_empty(FEntryContext) -> i32;
    fentry(function = "vfio_device_fops_unl_ioctl") => ioasid_fentry_vfio_device_fops_unl_ioctl_empty(FEntryContext) -> i32;
    fentry(function = "iommufd_fops_ioctl") => ioasid_fentry_iommufd_fops_ioctl_empty(FEntryContext) -> i32;
}
