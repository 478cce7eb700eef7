//! What the programs need to know of this kernel before they load: tracepoint record layouts
//! (tracefs), KVM's flush function, the number of possible CPUs, NRIP save.

use ioasid_common::{
    config::{emul_is_packed, ProgConfig, WATCHED_IOCTL_FNS_LEN},
    ioctl::WATCHED_IOCTL_FNS,
};

use crate::kernel::tracefs::{TraceFs, TraceFsError};

/// Reads the record layouts this kernel uses into the program configuration.
pub(super) fn prog_config(
    tracefs: &TraceFs,
) -> Result<(ProgConfig, FileFilter, [u64; WATCHED_IOCTL_FNS_LEN]), TraceFsError> {
    let exit = tracefs.format("kvm", "kvm_exit")?;
    let emul = tracefs.format("kvm", "kvm_emulate_insn")?;
    let enter = tracefs.format("syscalls", "sys_enter_ioctl")?;
    let leave = tracefs.format("syscalls", "sys_exit_ioctl")?;
    let mm = command_line_offsets();
    let (filter, files) = file_filter(std::path::Path::new("/proc/kallsyms"));
    Ok((
        ProgConfig {
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
            file_filter: u32::from(filter == FileFilter::On),
            task_files: files.offsets[0],
            files_fdt: files.offsets[1],
            fdt_max_fds: files.offsets[2],
            fdt_fd: files.offsets[3],
            file_f_op: files.offsets[4],
            fops_owner: files.offsets[5],
            fops_unlocked_ioctl: files.offsets[6],
            module_name: files.offsets[7],
        },
        filter,
        files.fns,
    ))
}

/// Whether the kernel programs tell KVM/VFIO/iommufd files from any other (and report only
/// requests on those), or why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileFilter {
    On,
    Off(String),
}

/// What the file filter needs: BTF offsets (task_struct.files, files_struct.fdt, fdtable.max_fds,
/// fdtable.fd, file.f_op, file_operations.owner, file_operations.unlocked_ioctl, module.name) and
/// the addresses of the watched ioctl functions.
#[derive(Default)]
struct FileLayout {
    offsets: [u32; 8],
    fns: [u64; WATCHED_IOCTL_FNS_LEN],
}

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

/// The file filter's configuration, or why it stays off (every watched request number is then
/// reported, as on kernels the filter cannot read).
fn file_filter(kallsyms: &std::path::Path) -> (FileFilter, FileLayout) {
    let off = |why: String| {
        tracing::warn!(reason = %why, "watched requests on any file are reported (the KVM/VFIO/iommufd file filter is off)");
        (FileFilter::Off(why), FileLayout::default())
    };
    let offsets = match crate::kernel::btf::member_offsets(
        std::path::Path::new("/sys/kernel/btf/vmlinux"),
        &FILE_MEMBERS,
    ) {
        Ok(v) => v,
        Err(e) => return off(format!("reading the kernel's BTF: {e}")),
    };
    let mut layout = FileLayout::default();
    for (i, (o, (st, m))) in offsets.iter().zip(FILE_MEMBERS).enumerate() {
        match o {
            Some(o) => layout.offsets[i] = *o,
            None => return off(format!("{st}.{m} is not in the kernel's BTF")),
        }
    }
    let text = match std::fs::read_to_string(kallsyms) {
        Ok(t) => t,
        Err(e) => return off(format!("reading {}: {e}", kallsyms.display())),
    };
    match ioctl_fns(&text) {
        Ok(b) => layout.fns = b,
        Err(why) => return off(why),
    }
    (FileFilter::On, layout)
}

/// Addresses of the watched ioctl functions, built in or in a loaded module (0: absent). Err
/// if kallsyms hides addresses (kptr_restrict): no file could be recognised by its functions.
pub fn ioctl_fns(kallsyms: &str) -> Result<[u64; WATCHED_IOCTL_FNS_LEN], String> {
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
        return Err("/proc/kallsyms shows no addresses (kernel.kptr_restrict, or not root)".into());
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

/// Where a task's command line is (task_struct.mm, mm_struct.arg_start/arg_end), from the
/// kernel's BTF; all 0 (the programs capture nothing) where it cannot be told.
fn command_line_offsets() -> (u32, u32, u32) {
    let pairs = [("task_struct", "mm"), ("mm_struct", "arg_start"), ("mm_struct", "arg_end")];
    match crate::kernel::btf::member_offsets(std::path::Path::new("/sys/kernel/btf/vmlinux"), &pairs) {
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
    fn this_kernel_has_the_file_filter_layout() {
        // Every kernel ioasid supports has these members; where BTF is readable, all resolve.
        if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            eprintln!("skipped: no /sys/kernel/btf/vmlinux here");
            return;
        }
        let v = crate::kernel::btf::member_offsets(
            std::path::Path::new("/sys/kernel/btf/vmlinux"),
            &FILE_MEMBERS,
        )
        .unwrap();
        assert!(v.iter().all(Option::is_some), "{v:?}");
    }
}
