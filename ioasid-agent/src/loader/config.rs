//! What the programs need to know of this kernel before they load: tracepoint record layouts
//! (tracefs), KVM's flush function, the number of possible CPUs, NRIP save.

use ioasid_common::config::{emul_is_packed, ProgConfig};

use crate::tracefs::{TraceFs, TraceFsError};

/// Reads the record layouts this kernel uses into the program configuration.
pub(super) fn prog_config(tracefs: &TraceFs) -> Result<ProgConfig, TraceFsError> {
    let exit = tracefs.format("kvm", "kvm_exit")?;
    let emul = tracefs.format("kvm", "kvm_emulate_insn")?;
    let enter = tracefs.format("syscalls", "sys_enter_ioctl")?;
    let leave = tracefs.format("syscalls", "sys_exit_ioctl")?;
    let mm = command_line_offsets();
    Ok(ProgConfig {
        exit_reason: exit.field("exit_reason")?,
        exit_isa: exit.field("isa")?,
        exit_vcpu_id: exit.field("vcpu_id")?,
        emul_len: emul.field("len")?,
        emul_insn: emul.field("insn")?,
        emul_flags: emul.field("flags")?,
        emul_failed: emul.field("failed")?,
        ioctl_fd: enter.field("fd")?,
        ioctl_cmd: enter.field("cmd")?,
        ioctl_arg: enter.field("arg")?,
        ioctl_ret: leave.field("ret")?,
        agent_tgid: std::process::id(),
        emul_packed: u32::from(emul_is_packed(
            emul.field("len")?,
            emul.field("insn")?,
            emul.field("flags")?,
            emul.field("failed")?,
        )),
        exit_rip: exit.field("guest_rip")?,
        emul_rip: emul.field("rip")?,
        nr_cpus: possible_cpus(),
        _pad: 0,
        task_mm: mm.0,
        mm_arg_start: mm.1,
        mm_arg_end: mm.2,
        _pad2: 0,
    })
}

/// Where a task's command line is (task_struct.mm, mm_struct.arg_start/arg_end), from the
/// kernel's BTF; all 0 (the programs capture nothing) where it cannot be told.
fn command_line_offsets() -> (u32, u32, u32) {
    let pairs = [("task_struct", "mm"), ("mm_struct", "arg_start"), ("mm_struct", "arg_end")];
    match crate::btf::member_offsets(std::path::Path::new("/sys/kernel/btf/vmlinux"), &pairs) {
        Ok(v) if v.iter().all(Option::is_some) => (v[0].unwrap_or(0), v[1].unwrap_or(0), v[2].unwrap_or(0)),
        Ok(v) => {
            tracing::warn!(found = ?v, "task_struct.mm / mm_struct.arg_start/arg_end not in the kernel's BTF: VMM command lines are not captured at VM creation");
            (0, 0, 0)
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading the kernel's BTF: VMM command lines are not captured at VM creation");
            (0, 0, 0)
        }
    }
}

/// `nr_cpu_ids`: one more than the highest possible CPU (/sys/devices/system/cpu/possible,
/// e.g. `0-63`); the number of online CPUs if that cannot be read.
fn possible_cpus() -> u32 {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let last = text.trim().split([',', '-']).filter_map(|n| n.parse::<u32>().ok()).max();
    last.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32), |m| m + 1)
}

/// True on an SVM host without NRIP save: KVM skips intercepted instructions by emulating them.
pub(super) fn svm_without_nrips() -> bool {
    std::fs::read_to_string("/sys/module/kvm_amd/parameters/nrips")
        .is_ok_and(|v| matches!(v.trim(), "0" | "N"))
}
