//! Process identity from procfs: who a VMM is (VM name, exe, cgroup, uid) and whether a pid is
//! still the same process (start time). The procfs root is injectable for tests.

use std::path::PathBuf;

use super::manager::{Managed, Manager};

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("process {pid} is gone")]
    Gone { pid: u32 },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: unexpected content: {what}")]
    Malformed { path: PathBuf, what: String },
}

impl ProcError {
    /// The process no longer exists (as opposed to: it could not be read, e.g. for want of fds).
    pub fn is_gone(&self) -> bool {
        match self {
            ProcError::Gone { .. } => true,
            ProcError::Read { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
            }
            ProcError::Malformed { .. } => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
}

impl Default for ProcFs {
    fn default() -> Self {
        Self::at("/proc")
    }
}

/// What the agent knows about a VMM process.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub comm: String,
    /// The VM name: from `-name`/`--name` (QEMU, libvirt, KubeVirt), else `<comm>:<pid>`.
    pub vm: String,
    pub exe: Option<String>,
    /// cgroup v2 path (the `0::` line), or the first hierarchy's path on cgroup v1.
    pub cgroup: Option<String>,
    pub uid: u32,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, the identity.
    pub start_time: u64,
    /// The VM's UUID from the command line (`-uuid`: libvirt and KubeVirt set it; Proxmox's
    /// `-smbios type=1,uuid=`).
    #[serde(default)]
    pub uuid: Option<String>,
    /// Its VM manager and what that calls the VM (see `host::manager`).
    #[serde(default)]
    pub managed: Managed,
}

impl ProcessInfo {
    /// KubeVirt names a VM's domain `NAMESPACE_NAME` (a namespace cannot contain `_`): the
    /// namespace and name, split at the first `_`, for a VMM in a virt-launcher pod's cgroup;
    /// None for any other (a `_` in a name elsewhere is just a `_`).
    pub fn kubevirt(&self) -> Option<(&str, &str)> {
        if self.managed.manager != Manager::Kubevirt {
            return None;
        }
        self.vm.split_once('_').filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
    }

    /// The VMM program: the executable's file name, else the comm.
    pub fn vmm(&self) -> &str {
        self.exe.as_deref().and_then(|e| e.rsplit('/').next()).filter(|e| !e.is_empty()).unwrap_or(&self.comm)
    }
}

/// What a VMM's command line captured by the kernel at VM creation says (the process may be
/// gone): its VM name (`<argv0>:<pid>` without `-name`) and UUID; nothing else is known of it.
pub fn info_from_cmdline(pid: u32, raw: &[u8]) -> Option<ProcessInfo> {
    let args = split_cmdline(raw);
    let argv0 = args.first()?.rsplit('/').next().unwrap_or_default().chars().take(15).collect::<String>();
    let vm = vm_name_from_cmdline(&args).unwrap_or_else(|| format!("{argv0}:{pid}"));
    Some(ProcessInfo {
        pid,
        comm: argv0,
        vm,
        exe: None,
        cgroup: None,
        uid: u32::MAX,
        start_time: 0,
        uuid: uuid_from_cmdline(&args),
        // Its cgroup is not known: no manager is named.
        managed: Managed::default(),
    })
}

/// A process named from what the kernel captured of it at VM creation: its command line and
/// its start (0: not known).
pub fn info_from_captured(pid: u32, (raw, start): &(Vec<u8>, u64)) -> Option<ProcessInfo> {
    let mut info = info_from_cmdline(pid, raw)?;
    info.start_time = *start;
    Some(info)
}

/// The VM's UUID from a VMM command line: QEMU's last `-uuid`/`--uuid` (or `-uuid=...`), if it
/// is a well-formed UUID (lowercased); anything else is ignored.
pub fn uuid_from_cmdline(args: &[String]) -> Option<String> {
    let mut value = None;
    let mut it = args.iter().skip(1);
    while let Some(arg) = it.next() {
        if arg == "-uuid" || arg == "--uuid" {
            value = it.next().map(String::as_str);
        } else if let Some(v) = arg.strip_prefix("-uuid=").or_else(|| arg.strip_prefix("--uuid=")) {
            value = Some(v);
        }
    }
    // Proxmox gives it as SMBIOS type 1's (`-smbios type=1,uuid=...,...`): taken where there
    // is no `-uuid`.
    let v = value.or_else(|| smbios_uuid(args))?;
    well_formed_uuid(v).then(|| v.to_ascii_lowercase())
}

/// The `uuid=` of the last `-smbios type=1,...` option.
fn smbios_uuid(args: &[String]) -> Option<&str> {
    let mut value = None;
    let mut it = args.iter().skip(1);
    while let Some(arg) = it.next() {
        if arg == "-smbios" || arg == "--smbios" {
            let Some(v) = it.next() else { break };
            let mut fields = v.split(',');
            if fields.next() == Some("type=1") {
                if let Some(u) = fields.find_map(|f| f.strip_prefix("uuid=")) {
                    value = Some(u);
                }
            }
        }
    }
    value
}

/// `8-4-4-4-12` hexadecimal digits.
pub fn well_formed_uuid(v: &str) -> bool {
    v.len() == 36
        && v.char_indices()
            .all(|(i, c)| if matches!(i, 8 | 13 | 18 | 23) { c == '-' } else { c.is_ascii_hexdigit() })
}

impl ProcFs {
    /// True while process `pid` exists.
    pub fn exists(&self, pid: u32) -> bool {
        self.root.join(pid.to_string()).exists()
    }
}

impl ProcFs {
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `<root>/<pid>/<file>`.
    pub fn path(&self, pid: u32, file: &str) -> PathBuf {
        self.root.join(pid.to_string()).join(file)
    }

    fn read(&self, pid: u32, file: &str) -> Result<Vec<u8>, ProcError> {
        let path = self.path(pid, file);
        std::fs::read(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ProcError::Gone { pid },
            _ if source.raw_os_error() == Some(libc::ESRCH) => ProcError::Gone { pid },
            _ => ProcError::Read { path, source },
        })
    }

    /// The process start time, or `Gone`.
    pub fn start_time(&self, pid: u32) -> Result<u64, ProcError> {
        let stat = self.read(pid, "stat")?;
        parse_start_time(&stat).ok_or_else(|| ProcError::Malformed {
            path: self.root.join(pid.to_string()).join("stat"),
            what: "no start time".into(),
        })
    }

    /// The state letter of /proc/PID/stat (`R`, `S`, `T` for stopped...).
    pub fn state(&self, pid: u32) -> Option<char> {
        let stat = self.read(pid, "stat").ok()?;
        let stat = String::from_utf8_lossy(&stat);
        stat.rsplit_once(')')?.1.split_whitespace().next()?.chars().next()
    }

    /// Every other process sharing `pid`'s address space (created with CLONE_VM, not as a
    /// thread): they can run its VM, so a VMM denied its enable is killed with them. One kcmp(2)
    /// per process of the host: done only when a VMM is killed.
    pub fn mm_siblings(&self, pid: u32) -> Vec<u32> {
        let Ok(procs) = std::fs::read_dir(&self.root) else { return Vec::new() };
        procs
            .flatten()
            .filter_map(|p| p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
            .filter(|q| *q != pid && crate::host::sys::same_mm(pid, *q) && !self.is_kernel_thread(*q))
            .collect()
    }

    /// A kernel thread (PF_KTHREAD in /proc/PID/stat's flags): one may borrow a process's
    /// address space for a while (vhost before 6.4), and takes no signal.
    fn is_kernel_thread(&self, pid: u32) -> bool {
        const PF_KTHREAD: u64 = 0x0020_0000;
        let Ok(stat) = self.read(pid, "stat") else { return false };
        let stat = String::from_utf8_lossy(&stat);
        let flags =
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(6)?.parse::<u64>().ok());
        flags.is_some_and(|f| f & PF_KTHREAD != 0)
    }

    /// Every process holding a KVM VM fd (`anon_inode:kvm-vm`): the host's VMMs, idle and
    /// stopped ones included, whether or not they ever ran a counted instruction.
    pub fn kvm_vmms(&self) -> Vec<u32> {
        let Ok(procs) = std::fs::read_dir(&self.root) else { return Vec::new() };
        let mut out = Vec::new();
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
            if fds
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:kvm-vm"))
            {
                out.push(pid);
            }
        }
        out.sort_unstable();
        out
    }

    /// Where fd `fd` of `pid` points (`readlink /proc/PID/fd/FD`).
    pub fn fd_target(&self, pid: u32, fd: i32) -> Result<PathBuf, ProcError> {
        let path = self.root.join(pid.to_string()).join("fd").join(fd.to_string());
        std::fs::read_link(&path).map_err(|source| ProcError::Read { path, source })
    }

    /// Every open fd of `pid` and where it points (fds that vanish meanwhile are skipped).
    pub fn fds(&self, pid: u32) -> Result<Vec<(i32, PathBuf)>, ProcError> {
        let dir = self.root.join(pid.to_string()).join("fd");
        let entries = std::fs::read_dir(&dir).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ProcError::Gone { pid },
            _ => ProcError::Read { path: dir.clone(), source },
        })?;
        let mut out: Vec<(i32, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let fd = e.file_name().to_str()?.parse().ok()?;
                Some((fd, std::fs::read_link(e.path()).ok()?))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    pub fn info(&self, pid: u32) -> Result<ProcessInfo, ProcError> {
        let start_time = self.start_time(pid)?;
        let comm = String::from_utf8_lossy(&self.read(pid, "comm")?).trim_end().to_string();
        let cmdline = split_cmdline(&self.read(pid, "cmdline")?);
        if cmdline.is_empty() {
            // An exiting process has released its memory: its command line reads empty while
            // stat and status are still there. It is not named from that (a VMM always has a
            // command line); what was read of it while it lived stays in force.
            return Err(ProcError::Gone { pid });
        }
        let exe = std::fs::read_link(self.root.join(pid.to_string()).join("exe"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        let cgroup = self.read(pid, "cgroup").ok().and_then(|c| parse_cgroup(&String::from_utf8_lossy(&c)));
        let status = String::from_utf8_lossy(&self.read(pid, "status")?).into_owned();
        let uid = parse_uid(&status).ok_or_else(|| ProcError::Malformed {
            path: self.root.join(pid.to_string()).join("status"),
            what: "no Uid line".into(),
        })?;
        let vm = vm_name_from_cmdline(&cmdline).unwrap_or_else(|| format!("{comm}:{pid}"));
        let uuid = uuid_from_cmdline(&cmdline);
        let managed = super::manager::identify(&cmdline, cgroup.as_deref(), &vm);
        Ok(ProcessInfo { pid, comm, vm, exe, cgroup, uid, start_time, uuid, managed })
    }
}

fn split_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Field 22 of /proc/PID/stat, counted after the `(comm)` field, which may hold spaces and ')'.
fn parse_start_time(stat: &[u8]) -> Option<u64> {
    stat_field(stat, 22)
}

/// Numeric field `n` (1-based, as in proc(5)) of /proc/PID/stat, `n` > 3. The comm (field 2)
/// may hold spaces and parentheses: fields are counted after its last `)`.
pub fn stat_field(stat: &[u8], n: usize) -> Option<u64> {
    let stat = std::str::from_utf8(stat).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    // After the comm: field 3 (state) is the first.
    after.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

fn parse_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The cgroup v2 path (`0::/path`), else the first v1 hierarchy's path.
fn parse_cgroup(text: &str) -> Option<String> {
    let mut first = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" {
            return Some(path.to_string());
        }
        first.get_or_insert_with(|| path.to_string());
    }
    first
}

/// The VM name from a VMM command line: QEMU's `-name`/`--name` option (also `-name=...`), whose
/// value is either `NAME[,opts]` or `guest=NAME[,opts]`, with `,,` standing for a literal comma.
/// libvirt and KubeVirt start QEMU with `-name guest=NAME,debug-threads=on`.
pub fn vm_name_from_cmdline(args: &[String]) -> Option<String> {
    let mut value = None;
    let mut it = args.iter().skip(1);
    while let Some(arg) = it.next() {
        let arg = arg.as_str();
        if arg == "-name" || arg == "--name" {
            value = it.next().map(String::as_str);
        } else if let Some(v) = arg.strip_prefix("-name=").or_else(|| arg.strip_prefix("--name=")) {
            value = Some(v);
        }
    }
    // QEMU takes the last -name given.
    let value = value?;
    for (i, opt) in split_qemu_opts(value).into_iter().enumerate() {
        match opt.split_once('=') {
            Some(("guest", name)) => return non_empty(name),
            Some(_) => continue,
            // QEMU's implied first key for -name is `guest`.
            None if i == 0 => return non_empty(&opt),
            None => continue,
        }
    }
    None
}

/// VM names are labels on every per-VM series and come from a command line any /dev/kvm user
/// controls: longer names are cut (on a character boundary) to keep series bounded.
pub const MAX_VM_NAME: usize = 128;

fn non_empty(s: &str) -> Option<String> {
    if s.is_empty() {
        return None;
    }
    let mut end = s.len().min(MAX_VM_NAME);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Some(s[..end].to_string())
}

/// Splits a QEMU option string on single commas; `,,` is an escaped comma.
fn split_qemu_opts(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().expect("never empty").push(',');
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().expect("never empty").push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_threads_are_told_from_processes() {
        let procfs = ProcFs::at("/proc");
        assert!(!procfs.is_kernel_thread(std::process::id()));
        // kthreadd, the parent of every kernel thread, where this pid namespace shows it.
        let kthreadd = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            (std::fs::read_to_string(e.path().join("comm")).ok()?.trim() == "kthreadd").then_some(pid)
        });
        match kthreadd {
            Some(pid) => assert!(procfs.is_kernel_thread(pid)),
            None => eprintln!("no kernel thread in this pid namespace: only a process was checked"),
        }
        // No process shares this test's address space.
        assert_eq!(procfs.mm_siblings(std::process::id()), Vec::<u32>::new());
    }

    fn name(args: &[&str]) -> Option<String> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        vm_name_from_cmdline(&args)
    }

    #[test]
    fn qemu_and_libvirt_names() {
        let q = "/usr/bin/qemu-system-x86_64";
        assert_eq!(name(&[q, "-name", "web1"]).as_deref(), Some("web1"));
        assert_eq!(name(&[q, "-name", "guest=db,debug-threads=on"]).as_deref(), Some("db"));
        assert_eq!(name(&[q, "-name", "debug-threads=on,guest=late"]).as_deref(), Some("late"));
        assert_eq!(name(&[q, "-name", "plain,process=qemu:plain"]).as_deref(), Some("plain"));
        assert_eq!(name(&[q, "--name", "guest=two-dash"]).as_deref(), Some("two-dash"));
        assert_eq!(name(&[q, "-name=eq"]).as_deref(), Some("eq"));
        // KubeVirt: namespace_vm.
        assert_eq!(
            name(&[q, "-name", "guest=default_vm-gpu,debug-threads=on"]).as_deref(),
            Some("default_vm-gpu")
        );
        // Last -name wins, as in QEMU.
        assert_eq!(name(&[q, "-name", "a", "-name", "b"]).as_deref(), Some("b"));
    }

    #[test]
    fn qemu_comma_escaping() {
        assert_eq!(name(&["q", "-name", "guest=a,,b,debug-threads=on"]).as_deref(), Some("a,b"));
        assert_eq!(name(&["q", "-name", "x,,,,y"]).as_deref(), Some("x,,y"));
        assert_eq!(name(&["q", "-name", "guest=trail,,"]).as_deref(), Some("trail,"));
    }

    #[test]
    fn long_names_are_cut() {
        let long = "é".repeat(100); // 200 bytes
        let got = name(&["q", "-name", &long]).unwrap();
        assert!(got.len() <= MAX_VM_NAME && got.chars().all(|c| c == 'é'), "{got}");
    }

    #[test]
    fn no_name() {
        assert_eq!(name(&["q"]), None);
        assert_eq!(name(&["q", "-name"]), None);
        assert_eq!(name(&["q", "-name", ""]), None);
        assert_eq!(name(&["q", "-name", "guest="]), None);
        assert_eq!(name(&["q", "-name", "debug-threads=on"]), None);
        // argv[0] is never the option.
        assert_eq!(name(&["-name", "x"]), None);
    }

    #[test]
    fn stat_start_time_survives_odd_comm() {
        let stat = b"1234 (qemu) x (y)) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 987654 1000 10 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time(b"garbage"), None);
        assert_eq!(parse_start_time(b"1 (a) S 1"), None);
    }

    #[test]
    fn cgroup_and_uid() {
        assert_eq!(
            parse_cgroup("0::/machine.slice/machine-qemu.scope\n").as_deref(),
            Some("/machine.slice/machine-qemu.scope")
        );
        assert_eq!(parse_cgroup("12:cpu,cpuacct:/v1path\n0::/v2\n").as_deref(), Some("/v2"));
        assert_eq!(parse_cgroup("12:cpu:/v1only\n").as_deref(), Some("/v1only"));
        assert_eq!(parse_cgroup("junk"), None);
        assert_eq!(parse_uid("Name:\tq\nUid:\t107\t107\t107\t107\n"), Some(107));
        assert_eq!(parse_uid("Name:\tq\n"), None);
    }

    #[test]
    fn info_from_a_fixture_tree() {
        let dir = std::env::temp_dir().join(format!("ioasid-procfs-{}", std::process::id()));
        let p = dir.join("4242");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("stat"), "4242 (qemu-kvm) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5555 0 0")
            .unwrap();
        std::fs::write(p.join("comm"), "qemu-kvm\n").unwrap();
        std::fs::write(
            p.join("cmdline"),
            b"/usr/bin/qemu-kvm\0-name\0guest=gpu-1,debug-threads=on\0-m\0\x31G\0",
        )
        .unwrap();
        std::fs::write(p.join("cgroup"), "0::/machine.slice/gpu\n").unwrap();
        std::fs::write(p.join("status"), "Name:\tqemu-kvm\nUid:\t107\t107\t107\t107\n").unwrap();
        std::os::unix::fs::symlink("/usr/bin/qemu-kvm", p.join("exe")).unwrap();
        let fs = ProcFs::at(&dir);
        let info = fs.info(4242).unwrap();
        assert_eq!(info.vm, "gpu-1");
        assert_eq!(info.exe.as_deref(), Some("/usr/bin/qemu-kvm"));
        assert_eq!(info.cgroup.as_deref(), Some("/machine.slice/gpu"));
        assert_eq!((info.uid, info.start_time, info.comm.as_str()), (107, 5555, "qemu-kvm"));
        std::fs::write(p.join("cmdline"), b"/opt/vmm\0").unwrap();
        assert_eq!(fs.info(4242).unwrap().vm, "qemu-kvm:4242");
        assert!(matches!(fs.info(1), Err(ProcError::Gone { pid: 1 })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn uuid_kubevirt_and_vmm_from_what_the_vmm_said() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let u = "4C2A0000-1B2C-4D3E-8F40-0000DEADBEEF";
        assert_eq!(uuid_from_cmdline(&args(&["qemu", "-uuid", u])), Some(u.to_ascii_lowercase()));
        assert_eq!(
            uuid_from_cmdline(&args(&["qemu", "--uuid=0", "-uuid", u])).as_deref(),
            Some(&*u.to_ascii_lowercase())
        );
        for bad in [
            "",
            "x",
            "4c2a0000-1b2c-4d3e-8f40-0000deadbeef-",
            "4c2a0000x1b2c-4d3e-8f40-0000deadbeef",
            "4c2a0000-1b2c-4d3e-8f40-0000deadbeeg",
        ] {
            assert_eq!(uuid_from_cmdline(&args(&["qemu", "-uuid", bad])), None, "{bad}");
        }
        assert_eq!(uuid_from_cmdline(&args(&["qemu", "-uuid"])), None);
        // Proxmox's: SMBIOS type 1's, where there is no -uuid.
        let smbios =
            args(&["kvm", "-smbios", &format!("type=1,uuid={u},manufacturer=x"), "-smbios", "type=2"]);
        assert_eq!(uuid_from_cmdline(&smbios), Some(u.to_ascii_lowercase()));
        assert_eq!(uuid_from_cmdline(&args(&["kvm", "-smbios", &format!("type=2,uuid={u}")])), None);
        let mut p = ProcessInfo {
            pid: 1,
            comm: "qemu-kvm".into(),
            vm: "tenant-a_web-1".into(),
            exe: Some("/usr/libexec/qemu-kvm".into()),
            cgroup: None,
            uid: 107,
            start_time: 1,
            uuid: None,
            managed: Managed::default(),
        };
        // Outside a virt-launcher pod's cgroup, a `_` is just a `_`.
        assert_eq!(p.kubevirt(), None);
        p.managed.manager = Manager::Kubevirt;
        assert_eq!(p.kubevirt(), Some(("tenant-a", "web-1")));
        assert_eq!(p.vmm(), "qemu-kvm");
        for vm in ["plain", "_x", "x_", "qemu:12"] {
            p.vm = vm.into();
            assert_eq!(p.kubevirt(), None, "{vm}");
        }
        p.exe = None;
        assert_eq!(p.vmm(), "qemu-kvm");
    }
}
