//! One enforcing agent per host: two would both judge (and stop, resume or kill) the same VMMs.
//!
//! Two guards, both held for the agent's life:
//! - flock(2) on the lock file (`--lock-file`): the quick, friendly check; the file names the
//!   holder's pid. It only works while both agents see the same file (same path, same mount
//!   namespace), so it is not what the guarantee rests on.
//! - a marker in the kernel, whose object IDs are host-wide and do not depend on any path,
//!   mount or namespace: each agent loads a tiny socket-filter program named `ioasid_agent`
//!   (it is never attached). A starting agent that finds an older marker (a lower ID, loaded by
//!   root or by the agent's own user) refuses to run. Two agents starting at once both load a
//!   marker, and the one with the higher ID gives way. The kernel frees a marker when its agent
//!   exits, however it exits (SIGKILL, OOM), so a dead agent never blocks its successor.
//!   Unprivileged users cannot forge one: markers of other users are ignored.

use std::{
    io::Write,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use crate::host::sys::bpf;

/// The marker program's name (at most 15 bytes: BPF_OBJ_NAME_LEN).
pub const MARKER_NAME: &str = "ioasid_agent";

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("opening lock file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another ioasid-agent (pid {holder}) is running on this host (lock {path}): only one may judge the host's VMMs"
    )]
    Held { holder: String, path: PathBuf },
    #[error(
        "another ioasid-agent is running on this host ({holder}; kernel marker program id {id}), whatever its \
         lock file: only one may judge the host's VMMs"
    )]
    Marked { id: u32, holder: String },
    #[error("loading the single-instance marker program (needs CAP_BPF or CAP_SYS_ADMIN)")]
    Marker(#[source] std::io::Error),
    #[error("listing the kernel's BPF programs (needs CAP_SYS_ADMIN)")]
    List(#[source] aya::programs::ProgramError),
}

/// Held for the life of the agent.
pub struct Instance {
    _lock: std::fs::File,
    _marker: OwnedFd,
}

impl Instance {
    pub fn acquire(lock_path: &Path) -> Result<Self, InstanceError> {
        let lock = flock(lock_path)?;
        let marker = load_marker().map_err(InstanceError::Marker)?;
        let mine = prog_id(&marker).map_err(InstanceError::Marker)?;
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        for info in aya::programs::loaded_programs() {
            // A program freed between listing and reading is gone: not an agent.
            let info = match info {
                Ok(i) => i,
                Err(aya::programs::ProgramError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
                {
                    continue
                }
                Err(e) => return Err(InstanceError::List(e)),
            };
            let trusted = matches!(info.created_by_uid(), Some(uid) if uid == 0 || uid == euid);
            if info.name_as_str() == Some(MARKER_NAME) && trusted && info.id() < mine {
                return Err(InstanceError::Marked { id: info.id(), holder: holder_of(info.id()) });
            }
        }
        Ok(Self { _lock: lock, _marker: marker })
    }
}

fn flock(path: &Path) -> Result<std::fs::File, InstanceError> {
    let open = |source| InstanceError::Open { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(open)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(open)?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(path).unwrap_or_default().trim().to_string();
        return Err(InstanceError::Held { holder, path: path.to_path_buf() });
    }
    file.set_len(0).and_then(|()| write!(file, "{}", std::process::id())).map_err(open)?;
    Ok(file)
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;

/// Loads `r0 = 0; exit` as a socket filter named MARKER_NAME. Never attached.
fn load_marker() -> std::io::Result<OwnedFd> {
    // BPF_ALU64|BPF_MOV|BPF_K r0 = 0; BPF_JMP|BPF_EXIT.
    let insns: [u64; 2] = [0xb7, 0x95];
    let license = b"GPL\0";
    let mut attr = [0u64; 16];
    attr[0] = u64::from(BPF_PROG_TYPE_SOCKET_FILTER) | ((insns.len() as u64) << 32);
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    // prog_name: bytes 48..64 of bpf_attr.
    let mut name = [0u8; 16];
    name[..MARKER_NAME.len()].copy_from_slice(MARKER_NAME.as_bytes());
    attr[6] = u64::from_ne_bytes(name[..8].try_into().expect("8 bytes"));
    attr[7] = u64::from_ne_bytes(name[8..].try_into().expect("8 bytes"));
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The kernel's ID of the program behind `fd` (bpf_prog_info.id).
fn prog_id(fd: &OwnedFd) -> std::io::Result<u32> {
    // The first words of bpf_prog_info: type (u32), id (u32), tag...; the kernel fills
    // only as much as info_len asks for.
    let mut info = [0u32; 4];
    let mut attr = [0u64; 16];
    attr[0] = u64::from(fd.as_raw_fd() as u32) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info[1])
}

/// Which process holds program `id` ("pid N (comm)"), from /proc/*/fdinfo; best effort (the
/// holder may live in another pid namespace).
fn holder_of(id: u32) -> String {
    let want = format!("prog_id:\t{id}");
    let Ok(procs) = std::fs::read_dir("/proc") else { return "holder unknown".into() };
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            let is_prog = std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-prog");
            let fdinfo = p.path().join("fdinfo").join(fd.file_name());
            if is_prog && std::fs::read_to_string(fdinfo).is_ok_and(|t| t.lines().any(|l| l == want)) {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                return format!("pid {pid} ({})", crate::util::text::escape(comm.trim()));
            }
        }
    }
    "holder in another pid namespace".into()
}
