//! Thin wrappers over the system calls the agent makes outside aya: clocks, signals, the host
//! name, bpf(2) for what aya does not expose, mount(2) for tracefs and bpffs (the
//! single-instance guard is `instance`).

use std::{ffi::CStr, path::Path};

/// CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_BOOTTIME in ns: monotonic time plus the time spent suspended (/proc's start times).
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
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

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// bpf(2) on an attribute block of plain integers (`attr`'s size is what the kernel is told);
/// Ok is the syscall's return value (an fd, for the commands that make one).
/// True if processes `a` and `b` share one address space (kcmp(2) KCMP_VM): a CLONE_VM sibling,
/// which can run the same VM (KVM refuses any other mm). False on any error (a process gone, no
/// kcmp in this kernel).
pub fn same_mm(a: u32, b: u32) -> bool {
    const KCMP_VM: libc::c_long = 1;
    // SAFETY: kcmp takes plain integers.
    unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            a as libc::c_long,
            b as libc::c_long,
            KCMP_VM,
            0 as libc::c_long,
            0 as libc::c_long,
        ) == 0
    }
}

pub fn bpf<T: Copy>(cmd: libc::c_long, attr: &mut [T]) -> std::io::Result<i64> {
    let size = std::mem::size_of_val(attr) as u32;
    // SAFETY: `attr` is a valid, writable block of `size` bytes of plain data; the kernel reads
    // and writes within it (and within any buffer the caller made it point to).
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// mount(2) of a pseudo-filesystem (`fstype`, e.g. tracefs, bpf) at `target`.
pub fn mount(fstype: &CStr, source: &CStr, target: &Path) -> std::io::Result<()> {
    let target =
        std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Lifts RLIMIT_MEMLOCK as far as this process may (unlimited with CAP_SYS_RESOURCE, else to
/// the hard limit). Kernels before 5.11 charge BPF maps and programs to the user's locked
/// memory, shared by every process of that user: without this, a second root process (a second
/// agent checking the single-instance marker, `status` beside a running agent) is refused
/// with EPERM. Later kernels charge the memory cgroup and ignore the limit.
pub fn raise_memlock() -> std::io::Result<()> {
    let infinite = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit/getrlimit read or write the struct passed, nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &infinite) } == 0 {
        return Ok(());
    }
    let mut cur = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: as above.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut cur) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    cur.rlim_cur = cur.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &cur) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
