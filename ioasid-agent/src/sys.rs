//! Thin wrappers over the system calls the agent makes outside aya: clocks, signals, the host
//! name and the host-wide lock.

use std::{
    io::Write,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

/// CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The signals the agent sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Stop,
    Cont,
    Kill,
}

impl Signal {
    pub fn number(self) -> i32 {
        match self {
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
            Signal::Kill => libc::SIGKILL,
        }
    }
}

/// kill(2) to a whole process.
pub fn signal_process(pid: u32, sig: Signal) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill(2) with a checked pid and a valid signal number.
    if unsafe { libc::kill(pid, sig.number()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
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
}

/// One enforcing agent per host: two would both judge (and stop, resume or kill) the same VMMs.
/// Held with flock(2) on `path` for the life of the value; the file names the holder's pid.
pub struct HostLock(#[expect(dead_code, reason = "held for its flock")] std::fs::File);

impl HostLock {
    pub fn acquire(path: &Path) -> Result<Self, LockError> {
        let open = |source| LockError::Open { path: path.to_path_buf(), source };
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
            return Err(LockError::Held { holder, path: path.to_path_buf() });
        }
        file.set_len(0).and_then(|()| write!(file, "{}", std::process::id())).map_err(open)?;
        Ok(Self(file))
    }
}
