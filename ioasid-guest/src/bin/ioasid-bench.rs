//! ioasid-bench: micro-benchmarks of what the agent's hooks sit on, printed as JSON.
//! `cargo xtask bench` runs it with and without the agent, interleaved, and reports ratios.
//!
//! - getppid: a syscall that is not an ioctl (pays only for the sys_enter/exit attachment);
//! - pipe FIONREAD: a cheap unrelated ioctl (leaves at the program's type-byte test);
//! - KVM_CHECK_EXTENSION: an unrelated KVM ioctl (passes the type test, fails the compares);
//! - KVM_RUN round trip: a guest that exits to userspace on every run (`out` in a loop);
//! - emulated WBINVD: wall time per WBINVD of a guest executing them in a loop (the counting path).

use std::{hint::black_box, time::Instant};

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_regs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};

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
    // SAFETY: anonymous mapping, checked below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        bail!("mmap failed");
    }
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

fn main() -> Result<()> {
    let rounds = 7;
    let mut out = Vec::new();

    let getppid = median(rounds, || {
        ns_per_op(200_000, || {
            // SAFETY: getppid has no preconditions.
            black_box(unsafe { libc::getppid() });
        })
    });
    out.push(("getppid_ns", getppid));

    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) into a two-int array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        bail!("pipe failed");
    }
    let fionread = median(rounds, || {
        ns_per_op(200_000, || {
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int.
            black_box(unsafe { libc::ioctl(fds[0], libc::FIONREAD, &mut n) });
        })
    });
    out.push(("ioctl_fionread_ns", fionread));

    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let check = median(rounds, || {
        ns_per_op(200_000, || {
            black_box(kvm.check_extension_int(kvm_ioctls::Cap::Irqchip));
        })
    });
    out.push(("ioctl_kvm_check_extension_ns", check));

    // `top: out 0x10, al; jmp top`
    let mut g = guest(&[0xe6, 0x10, 0xeb, 0xfc])?;
    let run = median(rounds, || {
        ns_per_op(20_000, || {
            run_once(&mut g, 1);
        })
    });
    out.push(("kvm_run_roundtrip_ns", run));

    // `top: mov ecx, 20000; L: wbinvd; dec ecx; jnz L; out 0x10, al; jmp top`
    let n: u32 = 20_000;
    let code = ioasid_guest::storm(n);
    let mut w = guest(&code)?;
    let wb = median(rounds, || run_once(&mut w, n));
    out.push(("emulated_wbinvd_ns", wb));

    // `top: mov ecx, 20000; L: dec ecx; jnz L; out 0x10, al; jmp top`: ordinary emulated
    // instructions with no WBINVD pending. Every one passes kvm_emulate_insn, whose program
    // runs the pending-WBINVD check first: on this kernel that is the per-entry path.
    let code = ioasid_guest::spin(n);
    let mut e = guest(&code)?;
    let insn = median(rounds, || run_once(&mut e, 2 * n));
    out.push(("emulated_insn_ns", insn));

    let body: Vec<String> = out.iter().map(|(k, v)| format!("\"{k}\":{v:.1}")).collect();
    println!("{{{}}}", body.join(","));
    Ok(())
}
