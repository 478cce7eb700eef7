//! Load-time configuration: tracepoint field offsets read from tracefs, and the switches the
//! agent sets after attaching.

use core::mem::size_of;

/// A field of a tracepoint record: where it is and how wide (from the `format` file).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}
const _: () = assert!(size_of::<Field>() == 8);

/// The read-only global [`crate::names::GLOBAL_CONFIG`], written by the agent before load.
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
    /// kvm:kvm_exit `guest_rip` and kvm:kvm_emulate_insn `rip`: pair an exit with KVM's
    /// emulation of the same instruction (SVM without NRIP save).
    pub exit_rip: Field,
    pub emul_rip: Field,
    /// Possible CPUs (`nr_cpu_ids`, from /sys/devices/system/cpu/possible): the bits of a
    /// cpumask that are valid. An off-stack cpumask is allocated to this size only.
    pub nr_cpus: u32,
    pub _pad: u32,
    /// Byte offsets (from the kernel's BTF) of `task_struct.mm`, `mm_struct.arg_start` and
    /// `mm_struct.arg_end`: where a VMM's command line is, to capture it when it creates its VM.
    /// 0: not known (nothing is captured).
    pub task_mm: u32,
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    /// Non-zero: only requests on KVM, VFIO and iommufd files are reported (see
    /// [`crate::ioctl::WATCHED_MODULES`] and [`crate::names::MAP_IOCTL_FNS`]); the offsets
    /// below are then all known.
    pub file_filter: u32,
    /// Byte offsets (BTF) from the current task to the file behind an fd:
    /// `task_struct.files`, `files_struct.fdt`, `fdtable.max_fds`, `fdtable.fd`.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    /// `file.f_op`, `file_operations.owner`, `file_operations.unlocked_ioctl`, `module.name`.
    pub file_f_op: u32,
    pub fops_owner: u32,
    pub fops_unlocked_ioctl: u32,
    pub module_name: u32,
    /// `task_struct.group_leader` and `task_struct.start_boottime` (BTF): a process's start,
    /// which keys its state with its pid (see [`crate::verdict::start_ticks`]). 0: not known.
    pub task_group_leader: u32,
    pub task_start_boottime: u32,
    /// `mm_struct.mm_users.counter`, `task_struct.signal`, `signal_struct.nr_threads` (BTF):
    /// whether the current process shares its address space with another process (more users
    /// of its mm than threads: a CLONE_VM sibling). 0: not known.
    pub mm_users: u32,
    pub task_signal: u32,
    pub signal_nr_threads: u32,
    pub _pad2: u32,
    /// Where KVM's own structs keep what the WBINVD handler programs read (byte offsets from
    /// the kvm module's BTF): zero `known` where they are not all known.
    pub kvm: KvmLayout,
}
const _: () = assert!(size_of::<ProgConfig>() == 192 + size_of::<KvmLayout>());

/// Byte offsets in KVM's structs, from the kvm module's BTF (none before 5.11: no module BTF).
/// With them the handler programs count, time and measure each WBINVD's flush from
/// `kvm_emulate_wbinvd(vcpu)` and `emulator_wbinvd(ctxt)` alone: no program on every VM exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmLayout {
    /// Non-zero when every offset below is known.
    pub known: u32,
    /// `kvm_vcpu.kvm` (pointer), `kvm_vcpu.vcpu_id` (int).
    pub vcpu_kvm: u32,
    pub vcpu_id: u32,
    /// `kvm_vcpu.arch.wbinvd_dirty_mask`: the CPUs the vCPU was loaded on since its last
    /// WBINVD, which KVM's flush reaches (with the current one) before clearing it.
    pub vcpu_dirty_mask: u32,
    /// Non-zero when that member is a pointer (`cpumask_var_t` with CPUMASK_OFFSTACK, as
    /// distro kernels build), zero when the mask is inline.
    pub dirty_mask_is_ptr: u32,
    /// `kvm_vcpu.arch.emulate_ctxt` (pointer): after KVM skipped an instruction by emulating
    /// it (SVM without NRIP save), its decoded opcode says what the instruction was.
    pub vcpu_emulate_ctxt: u32,
    /// `x86_emulate_ctxt.vcpu` (pointer), `.opcode_len`, `.b` (the opcode byte after 0f).
    pub ctxt_vcpu: u32,
    pub ctxt_opcode_len: u32,
    pub ctxt_b: u32,
    /// `kvm.arch.noncoherent_dma_count.counter`: non-zero while KVM really flushes.
    pub kvm_noncoherent: u32,
    /// `x86_emulate_ctxt.eip`: the rip of the instruction being emulated.
    pub ctxt_eip: u32,
    /// Non-zero when the BTF types `kvm_vcpu.arch.emulate_ctxt` as a pointer to the struct
    /// itself (not to a forward declaration): the programs then read the context's fields with
    /// plain loads, else with `bpf_probe_read_kernel`.
    pub ctxt_typed: u32,
}
const _: () = assert!(size_of::<KvmLayout>() == 48);

/// The length of [`crate::ioctl::WATCHED_IOCTL_FNS`].
pub const WATCHED_IOCTL_FNS_LEN: usize = 8;

impl ProgConfig {
    /// All zero: the object's compiled-in value, replaced at load.
    pub const ZERO: ProgConfig = ProgConfig {
        exit_reason: Field { offset: 0, size: 0 },
        exit_isa: Field { offset: 0, size: 0 },
        exit_vcpu_id: Field { offset: 0, size: 0 },
        emul_len: Field { offset: 0, size: 0 },
        emul_insn: Field { offset: 0, size: 0 },
        emul_flags: Field { offset: 0, size: 0 },
        emul_failed: Field { offset: 0, size: 0 },
        ioctl_fd: Field { offset: 0, size: 0 },
        ioctl_cmd: Field { offset: 0, size: 0 },
        ioctl_arg: Field { offset: 0, size: 0 },
        ioctl_ret: Field { offset: 0, size: 0 },
        agent_tgid: 0,
        emul_packed: 0,
        exit_rip: Field { offset: 0, size: 0 },
        emul_rip: Field { offset: 0, size: 0 },
        nr_cpus: 0,
        _pad: 0,
        task_mm: 0,
        mm_arg_start: 0,
        mm_arg_end: 0,
        file_filter: 0,
        task_files: 0,
        files_fdt: 0,
        fdt_max_fds: 0,
        fdt_fd: 0,
        file_f_op: 0,
        fops_owner: 0,
        fops_unlocked_ioctl: 0,
        module_name: 0,
        task_group_leader: 0,
        task_start_boottime: 0,
        mm_users: 0,
        task_signal: 0,
        signal_nr_threads: 0,
        _pad2: 0,
        kvm: KvmLayout {
            known: 0,
            vcpu_kvm: 0,
            vcpu_id: 0,
            vcpu_dirty_mask: 0,
            dirty_mask_is_ptr: 0,
            vcpu_emulate_ctxt: 0,
            ctxt_vcpu: 0,
            ctxt_opcode_len: 0,
            ctxt_b: 0,
            kvm_noncoherent: 0,
            ctxt_eip: 0,
            ctxt_typed: 0,
        },
    };
}

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

/// The one element of [`crate::names::MAP_CONTROL`]: switches the agent sets after attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    /// Non-zero to enforce verdicts (zero: observe and audit only).
    pub enforce: u32,
    /// Non-zero when the LSM program is attached: `deny` happens there (-EPERM) and the
    /// tracepoint program sends no SIGKILL.
    pub lsm_enforces: u32,
    /// A [`crate::cost::CostSource`].
    pub cost_source: u32,
    /// Non-zero on SVM hosts without NRIP save (`kvm_amd nrips=0`): KVM skips every
    /// intercepted instruction by emulating it, so a WBINVD/INVD exit is followed by a
    /// kvm_emulate_insn of the same instruction, which must not count twice.
    pub skip_emulation: u32,
    /// Non-zero when no syscall tracepoint is attached: the LSM program (or, with
    /// `fns_observe`, the ioctl functions' fentry programs) observes, judges and enforces the
    /// ioctl path itself, and fexit kvm_vfio_set_attr gives FILE_ADD/DEL their result.
    pub lsm_observes: u32,
    /// Non-zero when the WBINVD/INVD handlers' own programs count every instruction (and read
    /// each flush's reach): no exit or emulation tracepoint is attached.
    pub handlers_count: u32,
    /// Non-zero when fentry programs on KVM's, VFIO's and iommufd's own ioctl functions observe
    /// the watched requests (nothing on any other file's ioctl, no syscall hook): an attached
    /// LSM program then takes only FILE_ADD (to refuse it), and they leave FILE_ADD to it.
    pub fns_observe: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Control>() == 32);

impl Control {
    /// Everything off: what the programs assume before the agent has written the map.
    pub const OFF: Control = Control {
        enforce: 0,
        lsm_enforces: 0,
        cost_source: 0,
        skip_emulation: 0,
        lsm_observes: 0,
        handlers_count: 0,
        fns_observe: 0,
        _pad: 0,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulate_insn_layout() {
        let f = |offset, size| Field { offset, size };
        // The 6.18 format: len@20, insn[15]@21, flags@36, failed@37.
        assert!(emul_is_packed(f(20, 1), f(21, 15), f(36, 1), f(37, 1)));
        assert!(!emul_is_packed(f(20, 1), f(24, 15), f(39, 1), f(40, 1)));
        assert!(!emul_is_packed(f(20, 2), f(21, 15), f(36, 1), f(37, 1)));
        assert!(!emul_is_packed(f(20, 1), f(21, 16), f(37, 1), f(38, 1)));
    }
}
