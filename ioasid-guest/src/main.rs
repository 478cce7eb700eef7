//! ioasid-guest: a real KVM guest for tests, demos and load.
//!
//! It creates a VM through /dev/kvm, loads a few bytes of 16-bit real-mode code and runs one vCPU
//! that executes exactly the WBINVD and INVD instructions asked for, or WBINVD at a chosen rate
//! for a chosen time (a WBINVD storm). It is named like a VM on its command line
//! (`--name guest=NAME`, QEMU's syntax), so ioasid names it as QEMU/libvirt VMs are named.
//!
//! `--file-add` instead walks the path QEMU takes to give a VM a VFIO device: KVM_CREATE_DEVICE
//! (KVM_DEV_TYPE_VFIO) then KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, FILE_ADD) with an ordinary
//! fd, which the kernel answers with EINVAL: the request an incoherent-DMA policy judges.
//!
//! The last line on stdout is a JSON summary.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ioasid_guest as code;
use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_VFIO, kvm_regs,
    kvm_userspace_memory_region, KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD, KVM_DEV_VFIO_FILE_DEL,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

/// Guest physical address of the code.
const CODE_GPA: u64 = 0x1000;
const MEM_SIZE: usize = 0x10000;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A real KVM guest that executes WBINVD/INVD on demand (ioasid tests, demos and load)"
)]
struct Args {
    /// VM name in QEMU syntax (`guest=NAME[,...]` or `NAME`); ioasid names the VM from it.
    #[arg(long = "name", value_name = "guest=NAME")]
    name: Option<String>,
    /// Execute exactly this many WBINVD instructions.
    #[arg(long, default_value_t = 0)]
    wbinvd: u32,
    /// Then exactly this many INVD instructions.
    #[arg(long, default_value_t = 0)]
    invd: u32,
    /// Storm mode: WBINVD at this many per second (paced in batches) for --duration.
    #[arg(long, value_name = "PER_SECOND", conflicts_with_all = ["wbinvd", "invd"])]
    rate: Option<u32>,
    /// Storm duration in seconds (fractions allowed).
    #[arg(long, default_value_t = 5.0, requires = "rate")]
    duration: f64,
    /// Create a kvm-vfio device and issue KVM_DEV_VFIO_FILE_ADD with an ordinary fd.
    #[arg(long, conflicts_with_all = ["rate"])]
    file_add: bool,
    /// With --file-add: wait this many seconds between KVM_CREATE_VM (and the VFIO group's
    /// set-up) and KVM_CREATE_DEVICE.
    #[arg(long, default_value_t = 0.0, requires = "file_add")]
    file_add_delay: f64,
    /// With --file-add: add this real VFIO group (`/dev/vfio/N`) instead of an ordinary fd,
    /// set up as QEMU does (a type1v2 container first).
    #[arg(long, value_name = "/dev/vfio/N", requires = "file_add")]
    vfio_group: Option<std::path::PathBuf>,
    /// With --file-add: issue FILE_ADD this many times on the same device (the last errno is
    /// reported).
    #[arg(long, default_value_t = 1, requires = "file_add", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    file_add_repeat: u32,
    /// With --file-add: after the WBINVD/INVD work, remove the file again (FILE_DEL).
    #[arg(long, requires = "file_add")]
    file_del: bool,
    /// With --file-del: wait this many seconds before FILE_DEL (the VM stays non-coherent).
    #[arg(long, default_value_t = 0.0, requires = "file_del")]
    file_del_delay: f64,
    /// Run the --wbinvd work in batches of 10, moving the vCPU thread between CPU 0 and CPU 1
    /// after each batch (a vCPU that runs on both CPUs: its flushes reach both).
    #[arg(long, requires = "wbinvd", conflicts_with = "invd")]
    migrate: bool,
    /// Issue each VFIO container, VFIO cdev and iommufd request the agent watches once, on an
    /// ordinary fd (the kernel answers ENOTTY): what QEMU does on a real VFIO host.
    #[arg(long)]
    vfio_probe: bool,
    /// With --vfio-probe: issue them on this file instead of /dev/null (e.g. a real VFIO group).
    #[arg(long, value_name = "PATH", requires = "vfio_probe")]
    vfio_probe_file: Option<std::path::PathBuf>,
    /// With --vfio-probe: issue them this many rounds.
    #[arg(long, default_value_t = 1, requires = "vfio_probe", value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    vfio_probe_repeat: u32,
    /// Stay alive this many seconds after the work is done (so a watcher sees the VM live).
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// Run as a forked child (no exec) on this pid, if it is free (ns_last_pid: root): as a
    /// process that takes a dead VMM's pid and becomes a VMM without exec'ing. The parent waits
    /// and exits as the child did (the same signal, or code 3 if the pid was not had).
    #[arg(long, value_name = "PID")]
    fork_onto: Option<u32>,
    /// With --file-add: before it, start a process sharing this one's address space (clone
    /// with CLONE_VM, not a thread) that runs a vCPU of the VM in a loop (WBINVD), and write its
    /// pid to this file: what a VMM denied its enable leaves running unless it is killed too.
    #[arg(long, value_name = "PATH", requires = "file_add")]
    clone_vm_sibling: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(pid) = args.fork_onto {
        fork_onto(pid)?;
    }
    for (flag, v) in [
        ("--duration", args.duration),
        ("--hold", args.hold),
        ("--file-add-delay", args.file_add_delay),
        ("--file-del-delay", args.file_del_delay),
    ] {
        if !v.is_finite() || v < 0.0 {
            bail!("{flag} takes a non-negative number of seconds");
        }
    }
    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;

    let mut summary = serde_like::Summary::default();
    // A VMM keeps its device and VFIO fds open for the VM's life: so does this one.
    let mut keep = None;
    if args.file_add {
        // Like QEMU, the VFIO group is set up first; the kvm-vfio device comes later.
        let file = match &args.vfio_group {
            Some(group) => {
                let (file, dma_cc) = vfio_group(group)?;
                summary.dma_cc = Some(dma_cc);
                file
            }
            None => VfioFile {
                file: std::fs::File::open("/dev/null").context("opening /dev/null")?,
                container: None,
            },
        };
        let _sibling = match &args.clone_vm_sibling {
            Some(path) => Some(clone_vm_sibling(&vm, path)?),
            None => None,
        };
        thread::sleep(Duration::from_secs_f64(args.file_add_delay));
        let (mut errno, dev) = file_attr(&vm, None, &file.file, KVM_DEV_VFIO_FILE_ADD)?;
        for _ in 1..args.file_add_repeat {
            errno = file_attr(&vm, dev.as_ref(), &file.file, KVM_DEV_VFIO_FILE_ADD)?.0;
        }
        summary.file_add_errno = Some(errno);
        keep = Some((dev, file));
    }
    if args.vfio_probe {
        let path = args.vfio_probe_file.as_deref().unwrap_or(std::path::Path::new("/dev/null"));
        summary.probed = Some(vfio_probe(path, args.vfio_probe_repeat)?);
    }
    if args.wbinvd > 0 || args.invd > 0 || args.rate.is_some() {
        let code = match args.rate {
            Some(_) => code::storm(batch_size(args.rate)),
            None if args.migrate => {
                if args.wbinvd % MIGRATE_BATCH != 0 {
                    bail!("--migrate runs WBINVD in batches of {MIGRATE_BATCH}: --wbinvd must be a multiple of it");
                }
                code::migrating(MIGRATE_BATCH)
            }
            None => code::counted(args.wbinvd, args.invd, &code::HALT),
        };
        let (_mem, mut vcpu) = setup_guest(&vm, &code)?;
        let start = Instant::now();
        match args.rate {
            Some(rate) => {
                summary.wbinvd = run_storm(&mut vcpu, rate, Duration::from_secs_f64(args.duration))?;
            }
            None if args.migrate => summary.wbinvd = run_migrating(&mut vcpu, args.wbinvd)?,
            None => {
                run_to_halt(&mut vcpu)?;
                summary.wbinvd = u64::from(args.wbinvd);
                summary.invd = u64::from(args.invd);
            }
        }
        summary.seconds = start.elapsed().as_secs_f64();
    }
    if let (true, Some((Some(dev), file))) = (args.file_del, &keep) {
        thread::sleep(Duration::from_secs_f64(args.file_del_delay));
        let (errno, _) = file_attr(&vm, Some(dev), &file.file, KVM_DEV_VFIO_FILE_DEL)?;
        summary.file_del_errno = Some(errno);
    }
    if args.hold > 0.0 {
        thread::sleep(Duration::from_secs_f64(args.hold));
    }
    println!("{}", summary.to_json(std::process::id()));
    Ok(())
}

/// KVM_RUNs of the CLONE_VM sibling (shared memory: the sibling shares the address space).
static SIBLING_RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The CLONE_VM sibling: runs the vCPU whose fd it is given, forever. Raw syscalls only (it
/// shares the parent's memory and thread-local storage).
extern "C" fn sibling_main(arg: *mut libc::c_void) -> libc::c_int {
    const KVM_RUN: libc::c_ulong = 0xae80;
    let fd = arg as usize as libc::c_int;
    loop {
        // SAFETY: KVM_RUN on the vCPU fd; takes no argument.
        unsafe { libc::ioctl(fd, KVM_RUN, 0) };
        SIBLING_RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Starts the CLONE_VM sibling (see `--clone-vm-sibling`) once it has run the vCPU, writes its
/// pid to `path`; returns what must live as long as it (the guest memory, the vCPU, its stack).
fn clone_vm_sibling(vm: &VmFd, path: &std::path::Path) -> Result<(GuestMem, VcpuFd, Vec<u8>)> {
    use std::os::fd::AsRawFd;
    let (mem, vcpu) = setup_guest(vm, &code::storm(1))?;
    let mut stack = vec![0u8; 256 * 1024];
    // SAFETY: the top of a live allocation, 16-byte aligned down; the stack and everything the
    // child touches (the vCPU fd, guest memory, SIBLING_RUNS) outlive it: returned to the caller.
    let top = unsafe { stack.as_mut_ptr().add(stack.len()) } as usize & !15;
    let arg = vcpu.as_raw_fd() as usize as *mut libc::c_void;
    // SAFETY: clone with a fresh stack; the child runs only `sibling_main`.
    let pid =
        unsafe { libc::clone(sibling_main, top as *mut libc::c_void, libc::CLONE_VM | libc::SIGCHLD, arg) };
    if pid < 0 {
        bail!("clone(CLONE_VM): {}", std::io::Error::last_os_error());
    }
    let started = Instant::now();
    while SIBLING_RUNS.load(std::sync::atomic::Ordering::Relaxed) < 10 {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("the CLONE_VM sibling ran no vCPU");
        }
        thread::sleep(Duration::from_millis(1));
    }
    std::fs::write(path, pid.to_string()).context("writing the sibling's pid")?;
    Ok((mem, vcpu, stack))
}

/// Forks onto `pid` (see `--fork-onto`); returns in the child only.
fn fork_onto(pid: u32) -> Result<()> {
    let last = pid.checked_sub(1).context("--fork-onto takes a pid above 1")?;
    std::fs::write("/proc/sys/kernel/ns_last_pid", last.to_string()).context("writing ns_last_pid")?;
    // SAFETY: single-threaded here (nothing spawned yet); the child continues main().
    match unsafe { libc::fork() } {
        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
        0 if std::process::id() == pid => Ok(()),
        0 => std::process::exit(3),
        child => {
            let mut status = 0;
            // SAFETY: waits for our own child.
            while unsafe { libc::waitpid(child, &mut status, 0) } == -1 {}
            if libc::WIFSIGNALED(status) {
                // SAFETY: re-raises the child's fatal signal on ourselves.
                unsafe { libc::kill(libc::getpid(), libc::WTERMSIG(status)) };
            }
            std::process::exit(libc::WEXITSTATUS(status));
        }
    }
}

/// WBINVDs per paced batch: about 1 ms worth at the asked rate, at least 1.
fn batch_size(rate: Option<u32>) -> u32 {
    rate.map_or(1, |r| (r / 1000).max(1))
}

/// A file to add to the kvm-vfio device, and the VFIO container it needs.
struct VfioFile {
    file: std::fs::File,
    /// Held open for the group's life: closing it would detach the group from its IOMMU.
    #[expect(dead_code, reason = "held for its fd")]
    container: Option<std::fs::File>,
}

/// Opens a VFIO group and sets it up as QEMU does: a container, the type1v2 IOMMU. Returns it
/// and VFIO_CHECK_EXTENSION(VFIO_DMA_CC_IOMMU): 1 if the IOMMU enforces cache coherency.
fn vfio_group(path: &std::path::Path) -> Result<(VfioFile, i32)> {
    use std::os::fd::AsRawFd;

    use ioasid_common::{
        abi::{VFIO_DMA_CC_IOMMU, VFIO_TYPE1V2_IOMMU},
        ioctl::{VFIO_CHECK_EXTENSION, VFIO_GROUP_SET_CONTAINER, VFIO_SET_IOMMU},
    };
    let open = |p: &std::path::Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .with_context(|| format!("opening {}", p.display()))
    };
    let group = open(path)?;
    let container = open(std::path::Path::new("/dev/vfio/vfio"))?;
    let cfd: libc::c_int = container.as_raw_fd();
    let ioctl = |fd: &std::fs::File, req: u32, arg: u64, what: &str| -> Result<i32> {
        // SAFETY: VFIO ioctls on fds we own; pointer arguments point at a live local int.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::c_ulong::from(req), arg) };
        if r < 0 {
            return Err(std::io::Error::last_os_error()).context(what.to_string());
        }
        Ok(r)
    };
    if ioctl(&container, VFIO_CHECK_EXTENSION, VFIO_TYPE1V2_IOMMU, "VFIO_CHECK_EXTENSION")? != 1 {
        bail!("the VFIO container does not offer the type1v2 IOMMU (is vfio_iommu_type1 loaded?)");
    }
    ioctl(&group, VFIO_GROUP_SET_CONTAINER, &cfd as *const libc::c_int as u64, "VFIO_GROUP_SET_CONTAINER")?;
    ioctl(&container, VFIO_SET_IOMMU, VFIO_TYPE1V2_IOMMU, "VFIO_SET_IOMMU(TYPE1v2)")?;
    let dma_cc = ioctl(&container, VFIO_CHECK_EXTENSION, VFIO_DMA_CC_IOMMU, "VFIO_CHECK_EXTENSION")?;
    Ok((VfioFile { file: group, container: Some(container) }, dma_cc))
}

/// KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, `attr`, &fd) on the kvm-vfio device (created first
/// when `dev` is None). Returns the errno (0 on success) and the device fd, which the caller
/// keeps open.
fn file_attr(
    vm: &VmFd,
    dev: Option<&kvm_ioctls::DeviceFd>,
    file: &std::fs::File,
    attr: u32,
) -> Result<(i32, Option<kvm_ioctls::DeviceFd>)> {
    let created = match dev {
        Some(_) => None,
        None => {
            let mut cd = kvm_create_device { type_: kvm_device_type_KVM_DEV_TYPE_VFIO, fd: 0, flags: 0 };
            Some(vm.create_device(&mut cd).context("KVM_CREATE_DEVICE(VFIO)")?)
        }
    };
    let fd: i32 = std::os::fd::AsRawFd::as_raw_fd(file);
    let kattr = kvm_device_attr {
        flags: 0,
        group: KVM_DEV_VFIO_FILE,
        attr: u64::from(attr),
        addr: &fd as *const i32 as u64,
    };
    let target = dev.or(created.as_ref()).context("a kvm-vfio device")?;
    let errno = match target.set_device_attr(&kattr) {
        Ok(()) => 0,
        Err(e) => e.errno(),
    };
    Ok((errno, created))
}

/// WBINVDs per batch in --migrate mode.
const MIGRATE_BATCH: u32 = 10;

/// Runs `n` WBINVD in batches on CPU 0, with an exit-only visit of the vCPU to CPU 1 between
/// batches. KVM adds each CPU the vCPU is loaded on to the set its next WBINVD flushes, and
/// clears the set after each flush: so the first WBINVD of each batch flushes both CPUs.
fn run_migrating(vcpu: &mut VcpuFd, n: u32) -> Result<u64> {
    let mut done = 0u64;
    pin(0)?;
    loop {
        // A signal (a stop and continue, as a duty-cycle throttle does) interrupts KVM_RUN with
        // EINTR: run again, as every VMM does.
        let exit = match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => continue,
            r => r.context("KVM_RUN")?,
        };
        match exit {
            // A batch ran on CPU 0; the guest's next instruction is `out PACE_PORT`: run that
            // one on CPU 1 (the visit).
            VcpuExit::IoOut(port, _) if port == u16::from(code::VISIT_PORT) => {
                done += u64::from(MIGRATE_BATCH);
                if done >= u64::from(n) {
                    return Ok(done);
                }
                pin(1)?;
            }
            // The visit is over: back to CPU 0 for the next batch.
            VcpuExit::IoOut(port, _) if port == u16::from(code::PACE_PORT) => pin(0)?,
            VcpuExit::Intr => {}
            other => bail!("unexpected vCPU exit: {other:?}"),
        }
    }
}

/// Pins the calling thread to one CPU.
fn pin(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes within it; sched_setaffinity(0, ...)
    // applies to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .context(format!("moving the vCPU thread to CPU {cpu}"));
        }
    }
    Ok(())
}

/// Every watched VFIO/iommufd request (the one list in ioasid-common), issued `rounds` times on
/// `path` (/dev/null: unprivileged noise; a VFIO group: requests the agent must see). Returns
/// how many were issued.
fn vfio_probe(path: &std::path::Path, rounds: u32) -> Result<u32> {
    use ioasid_common::{
        abi::{VFIO_DMA_CC_IOMMU, VFIO_TYPE1V2_IOMMU},
        ioctl::{VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU, WATCHED_IOCTLS},
    };
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let mut zeroes = [0u8; 64];
    let mut n = 0;
    // VFIO and iommufd requests are of type ';' (0x3b); the KVM ones need a VM.
    let requests = WATCHED_IOCTLS.iter().filter(|r| (r.cmd >> 8) & 0xff == 0x3b);
    for req in (0..rounds).flat_map(|_| requests.clone()) {
        let arg = match req.cmd {
            VFIO_CHECK_EXTENSION => VFIO_DMA_CC_IOMMU,
            VFIO_SET_IOMMU => VFIO_TYPE1V2_IOMMU,
            _ => zeroes.as_mut_ptr() as u64,
        };
        // SAFETY: /dev/null rejects every one of these requests (ENOTTY) without touching `arg`;
        // a VFIO group rejects them or reads at most a zeroed int or an empty string from the
        // zeroed local buffer (a bad fd, no such device): nothing changes.
        unsafe { libc::ioctl(fd, libc::c_ulong::from(req.cmd), arg) };
        n += 1;
    }
    Ok(n)
}

/// Maps guest memory, copies the code and makes a vCPU in real mode at CODE_GPA.
fn setup_guest(vm: &VmFd, code: &[u8]) -> Result<(GuestMem, VcpuFd)> {
    let mem = GuestMem::new(MEM_SIZE)?;
    let off = CODE_GPA as usize;
    if code.len() > MEM_SIZE - off {
        bail!("guest code of {} bytes does not fit", code.len());
    }
    // SAFETY: `mem` is a fresh private mapping of MEM_SIZE bytes; the copy stays inside it.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem.ptr.add(off), code.len()) };
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.ptr as u64,
    };
    // SAFETY: the region is a valid mapping that outlives the VM (returned to the caller).
    unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
    let vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
    let regs = kvm_regs { rip: CODE_GPA, rflags: 2, ..Default::default() };
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
    Ok((mem, vcpu))
}

fn run_to_halt(vcpu: &mut VcpuFd) -> Result<()> {
    loop {
        // A signal (a stop and continue, as a duty-cycle throttle does) interrupts KVM_RUN with
        // EINTR: run again, as every VMM does.
        let exit = match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => continue,
            r => r.context("KVM_RUN")?,
        };
        match exit {
            VcpuExit::Hlt => return Ok(()),
            VcpuExit::IoOut(..) | VcpuExit::Intr => {}
            other => bail!("unexpected vCPU exit: {other:?}"),
        }
    }
}

/// Runs the storm code, pacing batches to `rate` per second, for `duration`. Returns the
/// number of WBINVD the guest executed.
fn run_storm(vcpu: &mut VcpuFd, rate: u32, duration: Duration) -> Result<u64> {
    let batch = u64::from(batch_size(Some(rate)));
    let start = Instant::now();
    let mut done = 0u64;
    loop {
        // A signal (a stop and continue, as a duty-cycle throttle does) interrupts KVM_RUN with
        // EINTR: run again, as every VMM does.
        let exit = match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => continue,
            r => r.context("KVM_RUN")?,
        };
        match exit {
            VcpuExit::IoOut(port, _) if port == u16::from(code::PACE_PORT) => {
                done += batch;
                let elapsed = start.elapsed();
                if elapsed >= duration {
                    return Ok(done);
                }
                // Pace: batch k may start at k/rate seconds.
                let due = Duration::from_secs_f64(done as f64 / f64::from(rate.max(1)));
                if due > elapsed {
                    thread::sleep(due - elapsed);
                }
            }
            VcpuExit::Intr => {}
            other => bail!("unexpected vCPU exit: {other:?}"),
        }
    }
}

struct GuestMem {
    ptr: *mut u8,
    len: usize,
}

impl GuestMem {
    fn new(len: usize) -> Result<Self> {
        // SAFETY: anonymous private mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap guest memory");
        }
        Ok(Self { ptr: ptr.cast(), len })
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

mod serde_like {
    /// The summary line; written by hand to keep this binary's dependencies small.
    #[derive(Default)]
    pub struct Summary {
        pub wbinvd: u64,
        pub invd: u64,
        pub seconds: f64,
        pub file_add_errno: Option<i32>,
        pub file_del_errno: Option<i32>,
        pub dma_cc: Option<i32>,
        pub probed: Option<u32>,
    }

    impl Summary {
        pub fn to_json(&self, pid: u32) -> String {
            let opt = |v: Option<i64>| v.map_or("null".to_string(), |e| e.to_string());
            format!(
                "{{\"pid\":{pid},\"wbinvd\":{},\"invd\":{},\"seconds\":{:.6},\"file_add_errno\":{},\"file_del_errno\":{},\"dma_cc\":{},\"vfio_probed\":{}}}",
                self.wbinvd,
                self.invd,
                self.seconds,
                opt(self.file_add_errno.map(i64::from)),
                opt(self.file_del_errno.map(i64::from)),
                opt(self.dma_cc.map(i64::from)),
                opt(self.probed.map(i64::from)),
            )
        }
    }
}
