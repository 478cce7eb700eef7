//! What the programs need to know of this kernel before they load: tracepoint record layouts
//! (tracefs), KVM's flush function, the number of possible CPUs, NRIP save.

use ioasid_common::{
    config::{emul_is_packed, KvmLayout, ProgConfig, WATCHED_IOCTL_FNS_LEN},
    ioctl::WATCHED_IOCTL_FNS,
};

use crate::kernel::{
    btf::{BtfError, Vmlinux, KIND_STRUCT},
    tracefs::{TraceFs, TraceFsError},
};

/// What a load reads of the running kernel, once: vmlinux's BTF (member offsets, hooks' type
/// ids) and /proc/kallsyms (the watched ioctl functions' addresses, which symbols exist). Each
/// used to be read where it was needed, vmlinux's BTF five times and kallsyms twice per load.
pub(super) struct KernelFacts {
    pub vmlinux: Result<Vmlinux, BtfError>,
    pub kallsyms: Result<String, std::io::Error>,
}

impl KernelFacts {
    pub fn read() -> Self {
        Self {
            vmlinux: Vmlinux::read(std::path::Path::new("/sys/kernel/btf/vmlinux")),
            kallsyms: std::fs::read_to_string(KALLSYMS),
        }
    }

    /// Whether every program type may use hash maps that allocate elements at run time: the
    /// kernel has the BPF memory allocator (`struct bpf_mem_alloc`, 6.1+), which serves any
    /// context, and is not PREEMPT_RT. Before it the verifier warns (and RT refuses) when a
    /// kprobe or tracepoint program uses one, and allocating there could deadlock.
    pub fn runtime_allocation(&self) -> bool {
        let rt = std::fs::read_to_string("/proc/sys/kernel/version").is_ok_and(|v| v.contains("PREEMPT_RT"));
        !rt && self.vmlinux.as_ref().is_ok_and(|v| v.id(KIND_STRUCT, "bpf_mem_alloc").is_some())
    }
}

const KALLSYMS: &str = "/proc/kallsyms";

/// What loading needs of this kernel beyond the tracepoint layouts: the program configuration,
/// whether the file filter is on, and the watched ioctl functions' addresses.
pub(super) struct KernelLayout {
    pub config: ProgConfig,
    pub file_filter: FileFilter,
    pub ioctl_fns: [u64; WATCHED_IOCTL_FNS_LEN],
}

/// Reads the record layouts this kernel uses into the program configuration.
pub(super) fn prog_config(tracefs: &TraceFs, facts: &KernelFacts) -> Result<KernelLayout, TraceFsError> {
    let exit = tracefs.format("kvm", "kvm_exit")?;
    let emul = tracefs.format("kvm", "kvm_emulate_insn")?;
    let enter = tracefs.format("syscalls", "sys_enter_ioctl")?;
    let leave = tracefs.format("syscalls", "sys_exit_ioctl")?;
    let vm = facts.vmlinux.as_ref();
    let mm = command_line_offsets(vm);
    let starts = start_offsets(vm);
    let shared = shared_mm_offsets(vm, mm.task_mm);
    let (file_filter, files) = file_filter(vm, facts.kallsyms.as_deref());
    let config = ProgConfig {
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
        task_mm: mm.task_mm,
        mm_arg_start: mm.mm_arg_start,
        mm_arg_end: mm.mm_arg_end,
        file_filter: u32::from(file_filter == FileFilter::On),
        task_files: files.task_files,
        files_fdt: files.files_fdt,
        fdt_max_fds: files.fdt_max_fds,
        fdt_fd: files.fdt_fd,
        file_f_op: files.file_f_op,
        fops_owner: files.fops_owner,
        fops_unlocked_ioctl: files.fops_unlocked_ioctl,
        module_name: files.module_name,
        task_group_leader: starts.0,
        task_start_boottime: starts.1,
        mm_users: shared.0,
        task_signal: shared.1,
        signal_nr_threads: shared.2,
        _pad2: 0,
        kvm: kvm_layout(vm, std::path::Path::new("/sys/kernel/btf")),
    };
    Ok(KernelLayout { config, file_filter, ioctl_fns: files.fns })
}

/// Whether the kernel programs tell KVM/VFIO/iommufd files from any other (and report only
/// requests on those), or why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileFilter {
    On,
    Off(FilterOff),
}

/// Why the file filter is off.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FilterOff {
    #[error("reading the kernel's BTF: {0}")]
    Btf(String),
    #[error("{0} is not in the kernel's BTF")]
    NoMember(String),
    #[error("reading {path}: {error}")]
    Kallsyms { path: String, error: String },
    #[error("/proc/kallsyms shows no addresses (kernel.kptr_restrict, or not root)")]
    NoAddresses,
}

/// What the file filter needs: BTF member offsets and the addresses of the watched ioctl
/// functions.
#[derive(Default)]
struct FileLayout {
    task_files: u32,
    files_fdt: u32,
    fdt_max_fds: u32,
    fdt_fd: u32,
    file_f_op: u32,
    fops_owner: u32,
    fops_unlocked_ioctl: u32,
    module_name: u32,
    fns: [u64; WATCHED_IOCTL_FNS_LEN],
}

/// The members the file filter reads, in `FileLayout`'s order.
const FILE_MEMBERS: [(&str, &str); 8] = [
    ("task_struct", "files"),
    ("files_struct", "fdt"),
    ("fdtable", "max_fds"),
    ("fdtable", "fd"),
    ("file", "f_op"),
    ("file_operations", "owner"),
    ("file_operations", "unlocked_ioctl"),
    ("module", "name"),
];

/// vmlinux's BTF as read for this load, or why it could not be.
type Vm<'a> = Result<&'a Vmlinux, &'a BtfError>;

/// The offsets of `pairs` (struct, member) in the kernel's BTF, all or none.
fn member_offsets<const N: usize>(vm: Vm<'_>, pairs: [(&str, &str); N]) -> Result<[u32; N], FilterOff> {
    let found = vm.map_err(|e| FilterOff::Btf(e.to_string()))?.member_offsets(&pairs);
    let mut out = [0; N];
    for ((slot, o), (st, m)) in out.iter_mut().zip(found).zip(pairs) {
        *slot = o.ok_or_else(|| FilterOff::NoMember(format!("{st}.{m}")))?;
    }
    Ok(out)
}

/// The file filter's configuration, or why it stays off (every watched request number is then
/// reported, as on kernels the filter cannot read).
fn file_filter(vm: Vm<'_>, kallsyms: Result<&str, &std::io::Error>) -> (FileFilter, FileLayout) {
    match file_layout(vm, kallsyms) {
        Ok(layout) => (FileFilter::On, layout),
        Err(why) => {
            tracing::warn!(reason = %why, "watched requests on any file are reported (the KVM/VFIO/iommufd file filter is off)");
            (FileFilter::Off(why), FileLayout::default())
        }
    }
}

fn file_layout(vm: Vm<'_>, kallsyms: Result<&str, &std::io::Error>) -> Result<FileLayout, FilterOff> {
    let [task_files, files_fdt, fdt_max_fds, fdt_fd, file_f_op, fops_owner, fops_unlocked_ioctl, module_name] =
        member_offsets(vm, FILE_MEMBERS)?;
    let text =
        kallsyms.map_err(|e| FilterOff::Kallsyms { path: KALLSYMS.to_string(), error: e.to_string() })?;
    Ok(FileLayout {
        task_files,
        files_fdt,
        fdt_max_fds,
        fdt_fd,
        file_f_op,
        fops_owner,
        fops_unlocked_ioctl,
        module_name,
        fns: ioctl_fns(text)?,
    })
}

/// Addresses of the watched ioctl functions, built in or in a loaded module (0: absent). Err
/// if kallsyms hides addresses (kptr_restrict): no file could be recognised by its functions.
pub fn ioctl_fns(kallsyms: &str) -> Result<[u64; WATCHED_IOCTL_FNS_LEN], FilterOff> {
    let mut out = [0u64; WATCHED_IOCTL_FNS_LEN];
    let mut any_address = false;
    for line in kallsyms.lines() {
        let mut f = line.split_ascii_whitespace();
        let (Some(addr), Some(_kind), Some(name)) = (f.next(), f.next(), f.next()) else { continue };
        let Ok(addr) = u64::from_str_radix(addr, 16) else { continue };
        any_address |= addr != 0;
        if let Some(i) = WATCHED_IOCTL_FNS.iter().position(|n| *n == name) {
            out[i] = addr;
        }
    }
    if !any_address {
        return Err(FilterOff::NoAddresses);
    }
    Ok(out)
}

/// The loaded modules' names and base addresses (/proc/modules, without the reference counts,
/// which change with every open VM): when this changes, the functions' addresses may have.
pub fn modules_fingerprint(modules: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for line in modules.lines() {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        std::hash::Hash::hash(&(f.first(), f.last()), &mut h);
    }
    std::hash::Hasher::finish(&h)
}

/// Where a task's command line is: task_struct.mm, mm_struct.arg_start and arg_end.
#[derive(Debug, Default, Clone, Copy)]
struct CommandLineOffsets {
    task_mm: u32,
    mm_arg_start: u32,
    mm_arg_end: u32,
}

/// The command line's offsets from the kernel's BTF; all 0 (the programs capture nothing) where
/// they cannot be told.
fn command_line_offsets(vm: Vm<'_>) -> CommandLineOffsets {
    match member_offsets(vm, [("task_struct", "mm"), ("mm_struct", "arg_start"), ("mm_struct", "arg_end")]) {
        Ok([task_mm, mm_arg_start, mm_arg_end]) => CommandLineOffsets { task_mm, mm_arg_start, mm_arg_end },
        Err(e) => {
            tracing::warn!(error = %e, "VMM command lines are not captured at VM creation");
            CommandLineOffsets::default()
        }
    }
}

/// `task_struct.group_leader` and `task_struct.start_boottime` from the kernel's BTF (5.5+), or
/// (0, 0): the programs then key per-process state by the tgid alone, and a process on a reused
/// pid could inherit a dead one's until the agent's next sweep (logged).
fn start_offsets(vm: Vm<'_>) -> (u32, u32) {
    match member_offsets(vm, [("task_struct", "group_leader"), ("task_struct", "start_boottime")]) {
        Ok([leader, start]) => (leader, start),
        Err(e) => {
            tracing::warn!(error = %e, "per-process kernel state is keyed by pid alone: a process on a reused pid may inherit a dead one's verdict or counts until the next sweep");
            (0, 0)
        }
    }
}

/// `mm_struct.mm_users.counter`, `task_struct.signal`, `signal_struct.nr_threads` from the
/// kernel's BTF, or zeros (with `task_mm` unknown too): a denial is then killed in the kernel
/// even where a CLONE_VM sibling shares the VMM's address space (logged).
fn shared_mm_offsets(vm: Vm<'_>, task_mm: u32) -> (u32, u32, u32) {
    let pairs =
        [("mm_struct", "mm_users.counter"), ("task_struct", "signal"), ("signal_struct", "nr_threads")];
    match member_offsets(vm, pairs) {
        Ok([users, signal, threads]) if task_mm != 0 => (users, signal, threads),
        Ok(_) => (0, 0, 0),
        Err(e) => {
            tracing::warn!(error = %e, "a VMM sharing its address space with another process (CLONE_VM) is not told apart: a denial killed in the kernel leaves the other process running");
            (0, 0, 0)
        }
    }
}

/// The members of KVM's structs the handler programs read, in `KvmLayout`'s order.
const KVM_MEMBERS: [(&str, &str); 9] = [
    ("kvm_vcpu", "kvm"),
    ("kvm_vcpu", "vcpu_id"),
    ("kvm_vcpu", "arch.wbinvd_dirty_mask"),
    ("kvm_vcpu", "arch.emulate_ctxt"),
    ("x86_emulate_ctxt", "vcpu"),
    ("x86_emulate_ctxt", "opcode_len"),
    ("x86_emulate_ctxt", "b"),
    ("kvm", "arch.noncoherent_dma_count.counter"),
    ("x86_emulate_ctxt", "eip"),
];

/// KVM's struct layout from the kvm module's BTF (vmlinux's where KVM is built in), all or
/// nothing: where any member is missing (no module BTF before 5.11, a renamed member) the
/// WBINVD/INVD exits are counted from the tracepoints instead, and the log says why.
pub(super) fn kvm_layout(vm: Vm<'_>, sysfs_btf: &std::path::Path) -> KvmLayout {
    let module = if sysfs_btf.join("kvm").exists() { "kvm" } else { "vmlinux" };
    let found = match vm {
        Ok(vm) => {
            crate::kernel::btf::member_paths(vm, sysfs_btf, module, &KVM_MEMBERS).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    let found = match found {
        Ok(found) => found,
        Err(e) => {
            tracing::info!(error = %e, "KVM's struct layout is not readable: WBINVD/INVD exits are counted from tracepoints");
            return KvmLayout::default();
        }
    };
    let missing: Vec<String> = KVM_MEMBERS
        .iter()
        .zip(&found)
        .filter(|(_, f)| f.is_none())
        .map(|((s, m), _)| format!("{s}.{m}"))
        .collect();
    if !missing.is_empty() {
        tracing::info!(missing = %missing.join(", "), "KVM's struct layout is not in its BTF: WBINVD/INVD exits are counted from tracepoints");
        return KvmLayout::default();
    }
    use crate::kernel::btf::Leaf;
    let at = |i: usize| found[i].map_or(0, |(off, _)| off);
    let dirty_mask_is_ptr = matches!(found[2], Some((_, Leaf::Pointer { .. })));
    // Some kernels' BTF has `emulate_ctxt` point to a forward declaration of the context's
    // struct (Debian 6.12's kvm module): the programs then read the context with the helper.
    let ctxt_typed = matches!(found[3], Some((_, Leaf::Pointer { to_struct: true })));
    KvmLayout {
        known: 1,
        vcpu_kvm: at(0),
        vcpu_id: at(1),
        vcpu_dirty_mask: at(2),
        dirty_mask_is_ptr: u32::from(dirty_mask_is_ptr),
        vcpu_emulate_ctxt: at(3),
        ctxt_vcpu: at(4),
        ctxt_opcode_len: at(5),
        ctxt_b: at(6),
        kvm_noncoherent: at(7),
        ctxt_eip: at(8),
        ctxt_typed: u32::from(ctxt_typed),
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
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_functions_from_kallsyms_and_module_changes() {
        let text = "ffffffff8127c8e0 t kvm_device_ioctl\n\
                    ffffffff812011a5 t kvm_dev_ioctl.cold\n\
                    ffffffff81284030 t kvm_dev_ioctl\n\
                    ffffffffc0a01000 t vfio_group_fops_unl_ioctl\t[vfio]\n\
                    garbage line\n";
        let b = ioctl_fns(text).unwrap();
        assert_eq!(b[0], 0xffff_ffff_8128_4030, "kvm_dev_ioctl, not its .cold part");
        assert_eq!(b[3], 0xffff_ffff_8127_c8e0);
        assert_eq!(b[5], 0xffff_ffff_c0a0_1000, "a module's function too");
        assert_eq!(b[7], 0, "absent");
        assert!(ioctl_fns("0000000000000000 t kvm_dev_ioctl\n").is_err(), "kptr_restrict");
        // Reference counts change with every VM; names and addresses only when modules do.
        let m = |refs: u32| {
            format!("kvm_amd 200704 {refs} - Live 0xffffffffc0b00000\nkvm 1327104 1 kvm_amd, Live 0xffffffffc0900000\n")
        };
        assert_eq!(modules_fingerprint(&m(0)), modules_fingerprint(&m(3)));
        assert_ne!(
            modules_fingerprint(&m(0)),
            modules_fingerprint("kvm 1327104 1 kvm_amd, Live 0xffffffffc0a00000\n")
        );
    }

    #[test]
    fn this_kernels_kvm_layout() {
        // KVM is built in or a module with BTF on this machine's kernel: every member resolves,
        // and they sit where the 6.x structs put them relative to each other.
        let sysfs = std::path::Path::new("/sys/kernel/btf");
        if !sysfs.join("vmlinux").exists() || !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipped: no kernel BTF or no KVM here");
            return;
        }
        let facts = KernelFacts::read();
        let l = kvm_layout(facts.vmlinux.as_ref(), sysfs);
        assert_eq!(l.known, 1, "{l:?}");
        assert_eq!(l.ctxt_vcpu, 0, "x86_emulate_ctxt starts with its vcpu: {l:?}");
        assert_eq!(l.ctxt_b, l.ctxt_opcode_len + 1, "{l:?}");
        assert!(l.vcpu_dirty_mask > l.vcpu_id && l.vcpu_emulate_ctxt > l.vcpu_id, "{l:?}");
    }

    #[test]
    fn this_kernel_has_the_file_filter_layout() {
        // Every kernel ioasid supports has these members; where BTF is readable, all resolve.
        if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            eprintln!("skipped: no /sys/kernel/btf/vmlinux here");
            return;
        }
        let v = Vmlinux::read(std::path::Path::new("/sys/kernel/btf/vmlinux"))
            .unwrap()
            .member_offsets(&FILE_MEMBERS);
        assert!(v.iter().all(Option::is_some), "{v:?}");
    }
}
