//! A process known by (pid, start time), held as a pidfd: a signal sent through it reaches that
//! process or nobody, never another one that reused the pid.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::host::{
    procfs::ProcFs,
    sys::{boottime_ns, monotonic_ns, Signal},
};

/// The process on `pid` if it is the one that made a request at `asked_ns` (CLOCK_MONOTONIC,
/// the kernel's clock): alive, not a zombie, and started before the request. Its start time
/// (clock ticks since boot, as /proc says) is what a signal is then bound to; else why not.
/// A process that started after the request is another one on a reused pid: signalling it
/// would stop, resume or kill an innocent process.
pub fn requester(procfs: &ProcFs, pid: u32, asked_ns: u64) -> Result<u64, String> {
    let start =
        procfs.start_time(pid).map_err(|e| if e.is_gone() { "exited".to_string() } else { e.to_string() })?;
    if let Some('Z' | 'X') = procfs.state(pid) {
        return Err("exited (a zombie)".into());
    }
    if !started_before(start, asked_ns) {
        return Err(format!("exited: pid {pid} now belongs to a process started after the request"));
    }
    Ok(start)
}

/// Whether a process that started at `start` (/proc's clock ticks) may have made a request at
/// `asked_ns`. /proc's start time is CLOCK_BOOTTIME, rounded down to a tick; the request's time
/// is CLOCK_MONOTONIC. Boot time runs ahead of monotonic time by the time spent suspended, which
/// only grows: the request's boot time is at most its monotonic time plus today's difference,
/// so a start after that is after the request, whatever the suspends.
pub fn started_before(start: u64, asked_ns: u64) -> bool {
    let started_ns = u128::from(start) * 1_000_000_000 / u128::from(clock_ticks());
    started_ns <= u128::from(asked_ns) + u128::from(boottime_ns().saturating_sub(monotonic_ns()))
}

/// Clock ticks per second of /proc's times (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
fn clock_ticks() -> u64 {
    // SAFETY: sysconf reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

pub struct Pidfd(OwnedFd);

impl Pidfd {
    /// None if the process is gone or its pid now belongs to another process (start time
    /// read through `procfs`, whose root tests may move).
    pub fn open(procfs: &ProcFs, pid: u32, start_time: u64) -> Option<Pidfd> {
        // SAFETY: pidfd_open(2) with flags 0 returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh fd that nothing else owns.
        let fd = Pidfd(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        // Checked after opening: the pidfd then refers to the process whose start time matched.
        (procfs.start_time(pid).ok() == Some(start_time)).then_some(fd)
    }

    pub fn signal(&self, sig: Signal) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal(2) on our pidfd, no siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                sig.number(),
                std::ptr::null::<u8>(),
                0,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}
