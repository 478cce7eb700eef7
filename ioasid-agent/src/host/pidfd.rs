//! A process known by (pid, start time), held as a pidfd: a signal sent through it reaches that
//! process or nobody, never another one that reused the pid.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::host::{procfs::ProcFs, sys::Signal};

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
