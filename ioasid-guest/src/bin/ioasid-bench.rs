//! ioasid-bench: micro-benchmarks of what the agent's hooks sit on, printed as JSON.
//! `cargo xtask bench` runs it with and without the agent, interleaved, and reports ratios.
//!
//! - getppid: a syscall that is not an ioctl (pays only for the sys_enter/exit attachment);
//! - pipe FIONREAD: a cheap unrelated ioctl (leaves at the program's type-byte test);
//! - KVM_CHECK_EXTENSION: an unrelated KVM ioctl (passes the type test, fails the compares);
//! - KVM_RUN round trip: a guest that exits to userspace on every run (`out` in a loop);
//! - in-kernel VM exits that are not WBINVD (CPUID);
//! - a multi-CPU TLB shootdown (mprotect with a thread of the process live on another CPU);
//! - anonymous page faults;
//! - emulated instructions, and emulated WBINVD: wall time per WBINVD of a guest executing them
//!   in a loop (the counting path).

use std::{hint::black_box, time::Instant};

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_regs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};

/// `IOASID_BENCH_QUICK=1` (the lab's emulated machines): a tenth of the operations, 3 rounds.
fn quick() -> bool {
    std::env::var_os("IOASID_BENCH_QUICK").is_some_and(|v| v == "1")
}

/// `n` operations, or a tenth of them when quick (at least 1).
fn iters(n: u64) -> u64 {
    if quick() {
        (n / 10).max(1)
    } else {
        n
    }
}

fn ns_per_op(iters: u64, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed().as_nanos() as f64 / iters as f64
}

/// Median of `rounds` measurements.
fn median(rounds: usize, mut f: impl FnMut() -> f64) -> f64 {
    let mut v: Vec<f64> = (0..rounds).map(|_| f()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Guest {
    _mem: *mut libc::c_void,
    vcpu: kvm_ioctls::VcpuFd,
    _vm: kvm_ioctls::VmFd,
}

fn guest(code: &[u8]) -> Result<Guest> {
    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let vm = kvm.create_vm()?;
    const SIZE: usize = 0x10000;
    let mem = anon(SIZE)?;
    // SAFETY: the code fits in the fresh mapping at 0x1000.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem.cast::<u8>().add(0x1000), code.len()) };
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: SIZE as u64,
        userspace_addr: mem as u64,
    };
    // SAFETY: the mapping is never unmapped while the VM exists (the process ends first).
    unsafe { vm.set_user_memory_region(region)? };
    let vcpu = vm.create_vcpu(0)?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() })?;
    Ok(Guest { _mem: mem, vcpu, _vm: vm })
}

/// Wall time of one KVM_RUN of `g` (which must exit with `out`), divided by `per`.
fn run_once(g: &mut Guest, per: u32) -> f64 {
    let start = Instant::now();
    match g.vcpu.run() {
        Ok(VcpuExit::IoOut(..)) => {}
        other => panic!("unexpected exit {other:?}"),
    }
    start.elapsed().as_nanos() as f64 / f64::from(per)
}

/// One benchmark case: its result key, and what it measures (ns per operation, operations run).
type Case = (&'static str, fn(usize) -> Result<Option<(f64, u64)>>);

/// Every case, in the order they run. Unrelated to WBINVD and FILE_ADD but the last two:
/// what the agent's programs must leave alone (`cargo xtask bench` counts the runs of each
/// program per case, and the target is zero).
const CASES: &[Case] = &[
    ("getppid_ns", getppid),
    ("ioctl_fionread_ns", fionread),
    ("ioctl_kvm_check_extension_ns", kvm_check_extension),
    ("kvm_run_roundtrip_ns", kvm_run_roundtrip),
    ("kvm_exit_cpuid_ns", kvm_exit_cpuid),
    ("mprotect_shootdown_ns", mprotect_shootdown),
    ("page_fault_ns", page_fault),
    ("emulated_insn_ns", emulated_insn),
    ("emulated_wbinvd_ns", emulated_wbinvd),
];

fn getppid(rounds: usize) -> Result<Option<(f64, u64)>> {
    let ns = median(rounds, || {
        ns_per_op(iters(200_000), || {
            // SAFETY: getppid has no preconditions.
            black_box(unsafe { libc::getppid() });
        })
    });
    Ok(Some((ns, iters(200_000) * rounds as u64)))
}

fn fionread(rounds: usize) -> Result<Option<(f64, u64)>> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) into a two-int array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        bail!("pipe failed");
    }
    let ns = median(rounds, || {
        ns_per_op(iters(200_000), || {
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int.
            black_box(unsafe { libc::ioctl(fds[0], libc::FIONREAD, &mut n) });
        })
    });
    // SAFETY: our own fds.
    unsafe { libc::close(fds[0]) };
    unsafe { libc::close(fds[1]) };
    Ok(Some((ns, iters(200_000) * rounds as u64)))
}

fn kvm_check_extension(rounds: usize) -> Result<Option<(f64, u64)>> {
    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let ns = median(rounds, || {
        ns_per_op(iters(200_000), || {
            black_box(kvm.check_extension_int(kvm_ioctls::Cap::Irqchip));
        })
    });
    Ok(Some((ns, iters(200_000) * rounds as u64)))
}

fn kvm_run_roundtrip(rounds: usize) -> Result<Option<(f64, u64)>> {
    // `top: out 0x10, al; jmp top`
    let mut g = guest(&[0xe6, 0x10, 0xeb, 0xfc])?;
    let ns = median(rounds, || {
        ns_per_op(iters(20_000), || {
            run_once(&mut g, 1);
        })
    });
    Ok(Some((ns, iters(20_000) * rounds as u64)))
}

/// VM exits KVM handles in the kernel that are not WBINVD: `n` CPUID per KVM_RUN (a hardware
/// exit on a real or nested host; emulated where the whole guest is).
fn kvm_exit_cpuid(rounds: usize) -> Result<Option<(f64, u64)>> {
    let n: u32 = 2_000;
    // `mov edi, n; L: xor eax, eax; cpuid; dec edi; jnz L` (CPUID clobbers eax..edx).
    let mut body = vec![0x66, 0xbf];
    body.extend_from_slice(&n.to_le_bytes());
    body.extend_from_slice(&[0x66, 0x31, 0xc0, 0x0f, 0xa2, 0x66, 0x4f, 0x75, 0xf7]);
    let mut g = guest(&ioasid_guest::paced(&body))?;
    let ns = median(rounds, || (0..5).map(|_| run_once(&mut g, n)).sum::<f64>() / 5.0);
    Ok(Some((ns, 5 * u64::from(n) * rounds as u64)))
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// A multi-CPU TLB shootdown per operation: a thread of this process runs on CPU 1 while CPU 0
/// write-protects a page (`mprotect` PROT_READ, then back), so the kernel flushes CPU 1's TLB
/// by IPI each time. None on a single-CPU machine.
fn mprotect_shootdown(rounds: usize) -> Result<Option<(f64, u64)>> {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return Ok(None);
    }
    let page = anon(4096)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinner = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            pin(1);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    };
    let pinned = pin(0);
    let iters = iters(2_000);
    let ns = median(rounds, || {
        ns_per_op(iters, || {
            // SAFETY: our own page, written while writable.
            unsafe {
                *page.cast::<u8>() = 1;
                libc::mprotect(page, 4096, libc::PROT_READ);
                libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_WRITE);
            }
        })
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = spinner.join();
    // SAFETY: our own mapping.
    unsafe { libc::munmap(page, 4096) };
    if !pinned {
        bail!("sched_setaffinity to CPU 0 failed");
    }
    let all: Vec<usize> = (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    // SAFETY: as in `pin`, with every CPU.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in all {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    Ok(Some((ns, iters * rounds as u64)))
}

/// One anonymous page fault per operation: 256 fresh pages touched, then unmapped.
fn page_fault(rounds: usize) -> Result<Option<(f64, u64)>> {
    const PAGES: usize = 256;
    let mut total = 0u64;
    let ns = median(rounds, || {
        let mut sum = 0.0;
        for _ in 0..iters(20) {
            let Ok(m) = anon(PAGES * 4096) else { return f64::NAN };
            let start = Instant::now();
            for p in 0..PAGES {
                // SAFETY: inside our fresh mapping.
                unsafe { std::ptr::write_volatile(m.cast::<u8>().add(p * 4096), 1) };
            }
            sum += start.elapsed().as_nanos() as f64 / PAGES as f64;
            // SAFETY: our own mapping.
            unsafe { libc::munmap(m, PAGES * 4096) };
            total += PAGES as u64;
        }
        sum / iters(20) as f64
    });
    Ok(Some((ns, total)))
}

fn emulated_wbinvd(rounds: usize) -> Result<Option<(f64, u64)>> {
    // `top: mov ecx, 20000; L: wbinvd; dec ecx; jnz L; out 0x10, al; jmp top`
    let n: u32 = 20_000;
    let mut w = guest(&ioasid_guest::storm(n))?;
    let ns = median(rounds, || run_once(&mut w, n));
    Ok(Some((ns, u64::from(n) * rounds as u64)))
}

/// `top: mov ecx, 20000; L: dec ecx; jnz L; out 0x10, al; jmp top`: ordinary emulated
/// instructions with no WBINVD pending (on a kernel that emulates the whole guest, each passes
/// kvm_emulate_insn).
fn emulated_insn(rounds: usize) -> Result<Option<(f64, u64)>> {
    let n: u32 = 20_000;
    let mut e = guest(&ioasid_guest::spin(n))?;
    let ns = median(rounds, || run_once(&mut e, 2 * n));
    Ok(Some((ns, 2 * u64::from(n) * rounds as u64)))
}

/// An anonymous read-write mapping of `len` bytes.
fn anon(len: usize) -> Result<*mut libc::c_void> {
    // SAFETY: a fresh anonymous mapping, checked.
    let m = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if m == libc::MAP_FAILED {
        bail!("mmap failed: {}", std::io::Error::last_os_error());
    }
    Ok(m)
}

/// `ioasid-bench [CASE...]`: runs the named cases (all without arguments) and prints one JSON
/// object: `CASE` (ns per operation) and `CASE.ops` (operations run) for each. `--list`: the
/// cases, as a JSON array.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ioasid-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let rounds = if quick() { 3 } else { 7 };
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    let names: Vec<&str> = CASES.iter().map(|(k, _)| *k).collect();
    if wanted.iter().any(|w| w == "--help" || w == "-h") {
        println!("usage: ioasid-bench [--list | CASE...]\nRuns the named cases (every case without one) and prints one JSON object: CASE (ns per operation) and CASE.ops. IOASID_BENCH_QUICK=1: a tenth of the operations, 3 rounds.\ncases: {}", names.join(", "));
        return Ok(());
    }
    if wanted.iter().any(|w| w == "--list") {
        let quoted: Vec<String> = names.iter().map(|k| format!("\"{k}\"")).collect();
        println!("[{}]", quoted.join(","));
        return Ok(());
    }
    if let Some(bad) = wanted.iter().find(|w| !names.contains(&w.as_str())) {
        bail!("no case {bad:?} (--help); cases: {}", names.join(", "));
    }
    let mut out = Vec::new();
    for (key, case) in CASES {
        if !wanted.is_empty() && !wanted.iter().any(|w| w == key) {
            continue;
        }
        if let Some((ns, ops)) = case(rounds)? {
            out.push(format!("\"{key}\":{ns:.1}"));
            out.push(format!("\"{key}.ops\":{ops}"));
        }
    }
    println!("{{{}}}", out.join(","));
    Ok(())
}
