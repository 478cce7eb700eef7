//! The ioctl path: observe every watched KVM/VFIO/iommufd ioctl, judge each incoherent-DMA enable
//! (KVM_SET_DEVICE_ATTR, group KVM_DEV_VFIO_FILE, attr FILE_ADD) against the verdict the agent
//! compiled for the calling process, and enforce it.
//!
//! Enforcement semantics (see README "Enforcement"):
//! - verdict `deny`, LSM attached: `ioasid_lsm_file_ioctl` returns -EPERM; the ioctl never runs.
//! - verdict `deny`, no LSM: bpf_send_signal(SIGKILL) here at sys_enter. The ioctl body still runs,
//!   then the VMM dies on its way back to userspace: it never runs a guest with incoherent DMA.
//! - no verdict yet (process not classified) or a rule that depends on the device:
//!   bpf_send_signal(SIGSTOP), and the agent decides from /proc: SIGCONT or SIGKILL. So a VMM that
//!   execs and issues FILE_ADD microseconds later is judged by its own rule, never by a default.
//!
//! Fail-closed for FILE_ADD: a SET_DEVICE_ATTR with group 1 / attr 1 on an fd we did not see being
//! created (device created before the agent started, or passed in) is still judged; on x86 only
//! the kvm-vfio device accepts it. Fail-open for everything else: a read error is counted in
//! `Stat::ReadErrors` and the ioctl proceeds.
//!
//! Only requests on KVM, VFIO and iommufd files are reported (`is_watched_file`): the same
//! request numbers on any other file (anyone can issue them, on /dev/null, in a loop) are counted
//! in `Stat::IgnoredRequests` and nothing else. FILE_ADD/DEL events go to their own ring
//! (IOASID_DECISIONS), which only holders of a kvm-vfio device fd can write to.

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{
        bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_get_current_task, bpf_get_current_task_btf, bpf_send_signal, bpf_task_pt_regs},
    },
    macros::{btf_tracepoint, fentry, fexit, kretprobe, lsm, tracepoint},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, LsmContext, RetProbeContext, TracePointContext,
    },
    EbpfContext,
};
use aya_log_ebpf::{info, warn};
use ioasid_common::{
    abi::{
        EPERM, KVM_DEV_TYPE_VFIO, KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD, KVM_DEV_VFIO_FILE_DEL, NR_IOCTL,
        PT_REGS_DI, PT_REGS_DX, PT_REGS_SI, SIGKILL, SIGSTOP,
    },
    config::{ProgConfig, WATCHED_IOCTL_FNS_LEN},
    counters::Stat,
    events::{
        Coherency, EventKind, IoctlEvent, CMDLINE_MAX, IOCTL_F_ASK_RECORDED, IOCTL_F_ATTR_READ,
        IOCTL_F_DEVICE_KNOWN, IOCTL_F_FD_SWAPPED, IOCTL_F_FILE_FD_READ, IOCTL_F_FOREIGN_FILE,
        IOCTL_F_LSM_TAKEN, IOCTL_F_RETURNED, IOCTL_F_SIGNAL_SENT,
    },
    ioctl::{
        is_file_add_shape, is_watched_ioctl, KVM_CREATE_DEVICE, KVM_CREATE_VM, KVM_HAS_DEVICE_ATTR,
        KVM_SET_DEVICE_ATTR, VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU, WATCHED_MODULE_KEYS,
    },
    judge::{judge, lsm_return, FileAdd, Judged},
    names::{DECISIONS_RESERVE, DECISIONS_RING_BYTES},
    verdict::{Asked, Decision, FdKey, Mechanism, RULE_NONE},
};

use super::{current_ids, current_start, header};
use crate::{
    maps::{
        config, control, inflight_add, inflight_none, pending_none, stat_inc, IOASID_ASKED, IOASID_CMDLINES,
        IOASID_CMDLINE_SCRATCH, IOASID_DECISIONS, IOASID_EVENTS, IOASID_FILE_COHERENCY, IOASID_INFLIGHT,
        IOASID_IOCTL_FNS, IOASID_KVM_DEVICES, IOASID_VM_POLICY,
    },
    read::field_u64,
};

/// `struct kvm_device_attr` (include/uapi/linux/kvm.h), user memory.
#[repr(C)]
#[derive(Clone, Copy)]
struct KvmDeviceAttr {
    flags: u32,
    group: u32,
    attr: u64,
    addr: u64,
}

/// `struct kvm_create_device` (include/uapi/linux/kvm.h), user memory.
#[repr(C)]
#[derive(Clone, Copy)]
struct KvmCreateDevice {
    ty: u32,
    fd: u32,
    flags: u32,
}

/// The coherency the agent resolved for the FILE_ADD's file fd, if it has.
#[inline(always)]
fn file_coherency(tgid: u32, ev: &IoctlEvent) -> Coherency {
    if ev.flags & IOCTL_F_FILE_FD_READ == 0 || ev.file_fd < 0 {
        return Coherency::Unknown;
    }
    let key = fd_key(tgid, ev.file_fd);
    match IOASID_FILE_COHERENCY.get_ptr(&key) {
        // SAFETY: pointer to a live map value, read once.
        Some(c) => Coherency::try_from(unsafe { *c }).unwrap_or(Coherency::Unknown),
        None => Coherency::Unknown,
    }
}

/// The current process's `fd` as the fd maps key it (its tgid and start: a process on a reused
/// pid finds nothing of the dead one's fds).
#[inline(always)]
fn fd_key(tgid: u32, fd: i32) -> FdKey {
    FdKey { tgid, fd: fd as u32, start: current_start() }
}

/// Captures the calling process's command line (current->mm->arg_start..arg_end, at most
/// CMDLINE_MAX - 1 bytes) into IOASID_CMDLINES, so the VMM is named from what it said even if it
/// is gone before the agent reads /proc. Offsets come from the kernel's BTF (0: not known, skip).
#[inline(always)]
fn capture_cmdline(tgid: u32) {
    let cfg = config();
    if cfg.task_mm == 0 {
        return;
    }
    let Some(buf) = IOASID_CMDLINE_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: the current task, read only through bpf_probe_read_kernel (faults safely).
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let read = |p: *const u8| unsafe { bpf_probe_read_kernel(p.cast::<u64>()) };
    let Ok(mm) = read(task.wrapping_add(cfg.task_mm as usize)) else {
        stat_inc(Stat::ReadErrors);
        return;
    };
    if mm == 0 {
        return;
    }
    let mm = mm as *const u8;
    let (Ok(start), Ok(end)) =
        (read(mm.wrapping_add(cfg.mm_arg_start as usize)), read(mm.wrapping_add(cfg.mm_arg_end as usize)))
    else {
        stat_inc(Stat::ReadErrors);
        return;
    };
    // Bounded for the verifier: 0..=CMDLINE_MAX-1.
    let len = (end.saturating_sub(start).min(CMDLINE_MAX as u64 - 1) as u32) & (CMDLINE_MAX as u32 - 1);
    // SAFETY: this CPU's scratch value, used only here and copied out below.
    let b = unsafe { &mut *buf };
    // SAFETY: bpf_probe_read_user faults safely; `len` fits `bytes`.
    let r = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            b.bytes.as_mut_ptr().cast(),
            len,
            start as *const core::ffi::c_void,
        )
    };
    if r != 0 {
        stat_inc(Stat::ReadErrors);
        return;
    }
    b.len = len;
    b.start = current_start();
    // SAFETY: a helper without pointer arguments.
    b.ktime_ns = unsafe { bpf_ktime_get_ns() };
    let _ = IOASID_CMDLINES.insert(&tgid, b, 0);
}

#[inline(always)]
fn is_file_add(attr: &KvmDeviceAttr) -> bool {
    attr.group == KVM_DEV_VFIO_FILE && attr.attr == KVM_DEV_VFIO_FILE_ADD
}

/// Reads a kernel word at `base + off` (faults safely).
#[inline(always)]
fn kword(base: u64, off: u32) -> Result<u64, i32> {
    // SAFETY: bpf_probe_read_kernel faults safely on any address.
    unsafe { bpf_probe_read_kernel((base as *const u8).wrapping_add(off as usize).cast::<u64>()) }
}

/// The current task's file behind `fd` (current->files->fdt->fd[fd]); 0 if there is none.
/// Read errors are `Err`: the caller cannot tell, and reports the request.
#[inline(always)]
fn fd_file(cfg: &ProgConfig, fd: i32) -> Result<u64, i32> {
    // SAFETY: a helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let files = kword(task, cfg.task_files)?;
    if files == 0 {
        return Ok(0);
    }
    let fdt = kword(files, cfg.files_fdt)?;
    let max_fds = kword(fdt, cfg.fdt_max_fds)? as u32;
    if fd < 0 || fd as u32 >= max_fds {
        return Ok(0);
    }
    let fds = kword(fdt, cfg.fdt_fd)?;
    kword(fds, (fd as u32) * 8)
}

/// True if `file` is a KVM, VFIO or iommufd file: its file_operations are owned by one of their
/// modules, or (no owner: built into the kernel, or 6.1's kvm device fds) its unlocked_ioctl is
/// one of theirs (IOASID_IOCTL_FNS). Only such a file
/// leads to KVM or VFIO. True as well when the filter is off or a read fails: what cannot be told
/// apart from a real request is reported.
#[inline(always)]
fn is_watched_file(cfg: &ProgConfig, file: Result<u64, i32>) -> bool {
    if cfg.file_filter == 0 {
        return true;
    }
    let Ok(file) = file else {
        stat_inc(Stat::ReadErrors);
        return true;
    };
    if file == 0 {
        return false;
    }
    let Ok(fop) = kword(file, cfg.file_f_op) else { return true };
    if fop == 0 {
        return false;
    }
    let Ok(owner) = kword(fop, cfg.fops_owner) else { return true };
    if owner != 0 {
        // SAFETY: bpf_probe_read_kernel faults safely.
        let name = unsafe {
            bpf_probe_read_kernel(
                (owner as *const u8).wrapping_add(cfg.module_name as usize).cast::<[u64; 2]>(),
            )
        };
        let Ok(name) = name else { return true };
        return WATCHED_MODULE_KEYS.iter().any(|k| *k == name);
    }
    let Ok(ioctl) = kword(fop, cfg.fops_unlocked_ioctl) else { return true };
    if ioctl == 0 {
        return false;
    }
    let mut i = 0;
    while i < WATCHED_IOCTL_FNS_LEN as u32 {
        if IOASID_IOCTL_FNS.get(i).is_some_and(|a| *a == ioctl) {
            return true;
        }
        i += 1;
    }
    false
}

/// Free bytes in the decisions ring.
#[inline(always)]
fn decisions_room() -> u64 {
    // BPF_RB_AVAIL_DATA (0): bytes written and not yet consumed.
    u64::from(DECISIONS_RING_BYTES).saturating_sub(IOASID_DECISIONS.query(0))
}

/// syscalls:sys_enter_ioctl. Record: `fd`, `cmd`, `arg` (each 8 bytes wide; offsets from the
/// format file). Every ioctl on the host passes here: unrelated requests leave after one
/// type-byte test (`is_watched_ioctl`).
#[tracepoint(category = "syscalls", name = "sys_enter_ioctl")]
pub fn ioasid_sys_enter_ioctl(ctx: TracePointContext) -> u32 {
    if try_sys_enter_ioctl(&ctx).is_err() {
        stat_inc(Stat::ReadErrors);
    }
    0
}

#[inline(always)]
fn try_sys_enter_ioctl(ctx: &TracePointContext) -> Result<(), i64> {
    let cfg = config();
    let cmd = field_u64(ctx, cfg.ioctl_cmd)? as u32;
    if !is_watched_ioctl(cmd) {
        return Ok(());
    }
    let fd = field_u64(ctx, cfg.ioctl_fd)? as u32 as i32;
    let arg = field_u64(ctx, cfg.ioctl_arg)?;
    let _ = on_sys_enter_ioctl(ctx, fd, cmd, arg, false);
    Ok(())
}

/// tp_btf sys_enter: TP_PROTO(struct pt_regs *regs, long id), every syscall on the host. The
/// cheapest hook for ioctls (no trace record is built): non-ioctl syscalls leave at the first
/// compare, unrelated ioctls at the type-byte test. Preferred over `ioasid_sys_enter_ioctl`.
#[btf_tracepoint(function = "sys_enter")]
pub fn ioasid_tp_btf_sys_enter(ctx: BtfTracePointContext) -> i32 {
    let id: i64 = ctx.arg(1);
    if id != NR_IOCTL {
        return 0;
    }
    let regs: *const u8 = ctx.arg(0);
    // SAFETY: pt_regs of the current syscall; bpf_probe_read_kernel faults safely.
    let read = |off: usize| unsafe { bpf_probe_read_kernel(regs.add(off).cast::<u64>()) };
    let Ok(cmd) = read(PT_REGS_SI) else {
        stat_inc(Stat::ReadErrors);
        return 0;
    };
    let cmd = cmd as u32;
    if !is_watched_ioctl(cmd) {
        return 0;
    }
    match (read(PT_REGS_DI), read(PT_REGS_DX)) {
        (Ok(fd), Ok(arg)) => {
            let _ = on_sys_enter_ioctl(&ctx, fd as u32 as i32, cmd, arg, false);
        }
        _ => stat_inc(Stat::ReadErrors),
    }
    0
}

/// tp_btf sys_exit: TP_PROTO(struct pt_regs *regs, long ret). While no watched ioctl is in
/// flight anywhere (nearly always) it returns after one array read.
#[btf_tracepoint(function = "sys_exit")]
pub fn ioasid_tp_btf_sys_exit(ctx: BtfTracePointContext) -> i32 {
    let _ = on_sys_exit(|| Ok(ctx.arg::<i64>(1) as u64));
    0
}

/// Both sys_exit programs: a WBINVD that was the last thing a vCPU did before returning to
/// userspace ends here, and this thread's in-flight ioctl completes. One array read each while
/// nothing is pending or in flight (nearly always); `ret` is read only when needed.
#[inline(always)]
fn on_sys_exit(ret: impl FnOnce() -> Result<u64, i64>) -> Result<(), i64> {
    if !pending_none() {
        super::cost::close_pending(current_ids().1);
    }
    if inflight_none() {
        return Ok(());
    }
    on_sys_exit_ioctl(ret())
}

/// A watched ioctl entered: judge it if it is an incoherent-DMA enable, and keep it in flight
/// for sys_exit. `file_checked`: the caller (LSM, given the file) has already found it a KVM,
/// VFIO or iommufd file; the syscall hooks look the fd up here.
#[inline(always)]
fn on_sys_enter_ioctl<C: EbpfContext>(
    ctx: &C,
    fd: i32,
    cmd: u32,
    arg: u64,
    file_checked: bool,
) -> Option<IoctlEvent> {
    on_watched_ioctl(ctx, fd, cmd, arg, file_checked, 0)
}

/// `on_sys_enter_ioctl`, with the kernel's own copy of a KVM_SET/HAS_DEVICE_ATTR's attribute
/// when the caller has it (`kattr`, non-zero: the argument of kvm_vfio_set_attr), read instead
/// of user memory.
#[inline(always)]
fn on_watched_ioctl<C: EbpfContext>(
    ctx: &C,
    fd: i32,
    cmd: u32,
    arg: u64,
    file_checked: bool,
    kattr: u64,
) -> Option<IoctlEvent> {
    let (tgid, tid) = current_ids();
    let cfg = config();
    if tgid == cfg.agent_tgid {
        return None;
    }
    if !file_checked && !is_watched_file(&cfg, fd_file(&cfg, fd)) {
        // At a syscall hook the fd is looked up before the ioctl runs: a FILE_ADD stays in
        // flight, so that a kvm-vfio device swapped onto the fd meanwhile is still caught.
        if cmd == KVM_SET_DEVICE_ATTR {
            // SAFETY: bpf_probe_read_user faults safely.
            if let Ok(attr) = unsafe { bpf_probe_read_user(arg as *const KvmDeviceAttr) } {
                if is_file_add_shape(cmd, attr.group, attr.attr) {
                    keep_foreign_file_add(tgid, tid, fd, cmd, arg, &attr);
                    return None;
                }
            }
        }
        stat_inc(Stat::IgnoredRequests);
        return None;
    }

    let mut ev = new_event(tgid, tid, fd, cmd, arg);

    let ctl = control();
    match cmd {
        KVM_CREATE_VM => capture_cmdline(tgid),
        KVM_SET_DEVICE_ATTR | KVM_HAS_DEVICE_ATTR => judge_device_attr(ctx, &mut ev, tgid, kattr),
        // The extension or IOMMU type is the argument itself (VFIO_DMA_CC_IOMMU, TYPE1v2...).
        VFIO_SET_IOMMU | VFIO_CHECK_EXTENSION => ev.attr_attr = arg,
        _ => {}
    }

    if ctl.lsm_observes != 0 {
        // The LSM serves the ioctl path: only FILE_ADD/DEL gets a result (fexit
        // kvm_vfio_set_attr); everything else is sent now.
        let vfio_file = ev.cmd == KVM_SET_DEVICE_ATTR && ev.attr_group == KVM_DEV_VFIO_FILE;
        if !vfio_file {
            submit(&ev);
        } else if IOASID_INFLIGHT.insert(&tid, &ev, BPF_ANY as u64).is_err() {
            // Cannot wait for the result: sent now, without it.
            stat_inc(Stat::InflightFull);
            submit(&ev);
        }
        return Some(ev);
    }
    if IOASID_INFLIGHT.insert(&tid, &ev, BPF_ANY as u64).is_err() {
        // Cannot pair with sys_exit: send what we have now, without the return value.
        stat_inc(Stat::InflightFull);
        submit(&ev);
        return Some(ev);
    }
    inflight_add(1);
    Some(ev)
}

/// The event of a watched request, before anything is read or judged.
#[inline(always)]
fn new_event(tgid: u32, tid: u32, fd: i32, cmd: u32, arg: u64) -> IoctlEvent {
    // SAFETY: IoctlEvent is plain integers; all-zero is a valid value.
    let mut ev: IoctlEvent = unsafe { core::mem::zeroed() };
    ev.header = header(EventKind::Ioctl, core::mem::size_of::<IoctlEvent>(), tgid, tid);
    ev.cmd = cmd;
    ev.fd = fd;
    ev.arg = arg;
    ev.file_fd = -1;
    ev.rule = RULE_NONE;
    ev
}

/// A FILE_ADD on an fd that was not a kvm-vfio device at sys_enter: in flight, unjudged, until
/// sys_exit tells whether it succeeded (`on_sys_exit_ioctl`).
#[inline(always)]
fn keep_foreign_file_add(tgid: u32, tid: u32, fd: i32, cmd: u32, arg: u64, attr: &KvmDeviceAttr) {
    let mut ev = new_event(tgid, tid, fd, cmd, arg);
    ev.flags = IOCTL_F_FOREIGN_FILE | IOCTL_F_ATTR_READ;
    ev.attr_flags = attr.flags;
    ev.attr_group = attr.group;
    ev.attr_attr = attr.attr;
    ev.attr_addr = attr.addr;
    if IOASID_INFLIGHT.insert(&tid, &ev, BPF_ANY as u64).is_ok() {
        inflight_add(1);
    } else {
        stat_inc(Stat::InflightFull);
    }
}

/// sys_exit of a FILE_ADD kept by `keep_foreign_file_add`. A failure is what it looked like
/// (noise: ignored). A success means a kvm-vfio device was swapped onto the fd during the call:
/// an enable that was never judged, by a process that hides it. Killed where the kernel
/// enforces, and always reported (as a denial).
#[inline(always)]
fn foreign_file_add_done(ev: &mut IoctlEvent, ret: Result<u64, i64>) -> bool {
    if ret != Ok(0) {
        stat_inc(Stat::IgnoredRequests);
        return false;
    }
    ev.flags |= IOCTL_F_FD_SWAPPED;
    ev.decision = Decision::Deny.wire();
    if control().enforce != 0 {
        ev.mechanism = Mechanism::Sigkill.wire();
        // SAFETY: helper call; signals the current process (the whole thread group).
        if unsafe { bpf_send_signal(SIGKILL) } == 0 {
            ev.flags |= IOCTL_F_SIGNAL_SENT;
        } else {
            stat_inc(Stat::SignalErrors);
        }
    }
    true
}

/// Reads a KVM_SET_DEVICE_ATTR/HAS_DEVICE_ATTR's argument from user memory into the event:
/// the attribute, whether the fd is a known kvm-vfio device, and the VFIO file fd of a
/// FILE_ADD/DEL. None if the argument cannot be read.
#[inline(always)]
fn read_device_attr(ev: &mut IoctlEvent, tgid: u32, kattr: u64) -> Option<KvmDeviceAttr> {
    // SAFETY: bpf_probe_read_user/_kernel fault safely on a bad pointer.
    let read = unsafe {
        if kattr != 0 {
            bpf_probe_read_kernel(kattr as *const KvmDeviceAttr)
        } else {
            bpf_probe_read_user(ev.arg as *const KvmDeviceAttr)
        }
    };
    let Ok(attr) = read else {
        stat_inc(Stat::ReadErrors);
        return None;
    };
    ev.flags |= IOCTL_F_ATTR_READ;
    ev.attr_flags = attr.flags;
    ev.attr_group = attr.group;
    ev.attr_attr = attr.attr;
    ev.attr_addr = attr.addr;
    let key = fd_key(tgid, ev.fd);
    if let Some(ty) = IOASID_KVM_DEVICES.get_ptr(&key) {
        // SAFETY: pointer to a live map value, read once.
        if unsafe { *ty } == KVM_DEV_TYPE_VFIO {
            ev.flags |= IOCTL_F_DEVICE_KNOWN;
        }
    }
    if attr.group == KVM_DEV_VFIO_FILE
        && (attr.attr == KVM_DEV_VFIO_FILE_ADD || attr.attr == KVM_DEV_VFIO_FILE_DEL)
    {
        // SAFETY: as above.
        if let Ok(file_fd) = unsafe { bpf_probe_read_user(attr.addr as *const i32) } {
            ev.file_fd = file_fd;
            ev.flags |= IOCTL_F_FILE_FD_READ;
        }
    }
    Some(attr)
}

/// What the kernel knows of a FILE_ADD from `tgid` (see `ioasid_common::judge`).
#[inline(always)]
fn file_add(tgid: u32, coherency: Coherency) -> FileAdd {
    let ctl = control();
    FileAdd {
        coherency,
        // Only the verdict compiled for this very process: one left by a dead process on the
        // same pid (another start) is none, and the FILE_ADD is asked about.
        // SAFETY: pointer to a live map value, copied once.
        verdict: IOASID_VM_POLICY
            .get_ptr(&tgid)
            .map(|v| unsafe { *v })
            .filter(|v| v.start == current_start()),
        enforce: ctl.enforce != 0,
        lsm_enforces: ctl.lsm_enforces != 0,
        ring_low: decisions_room() < u64::from(DECISIONS_RESERVE),
        shared_mm: shared_mm(),
    }
}

/// True if the current process's address space has more users than the process has threads:
/// another process shares it (a CLONE_VM sibling; or, for a moment, a reader of its /proc or
/// a kernel thread using it: then a denial is asked about rather than killed here, still
/// enforced). False where the layout is not known or a read fails (counted).
#[inline(always)]
fn shared_mm() -> bool {
    let cfg = config();
    if cfg.mm_users == 0 || cfg.task_mm == 0 {
        return false;
    }
    // SAFETY: a helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let (Ok(mm), Ok(signal)) = (kword(task, cfg.task_mm), kword(task, cfg.task_signal)) else {
        stat_inc(Stat::ReadErrors);
        return false;
    };
    if mm == 0 || signal == 0 {
        return false;
    }
    match (kword(mm, cfg.mm_users), kword(signal, cfg.signal_nr_threads)) {
        (Ok(users), Ok(threads)) => (users as u32 as i32) > (threads as u32 as i32),
        _ => {
            stat_inc(Stat::ReadErrors);
            false
        }
    }
}

/// A KVM_SET_DEVICE_ATTR/HAS_DEVICE_ATTR entered: read it, and judge and enforce a FILE_ADD.
#[inline(always)]
fn judge_device_attr<C: EbpfContext>(ctx: &C, ev: &mut IoctlEvent, tgid: u32, kattr: u64) {
    let Some(attr) = read_device_attr(ev, tgid, kattr) else { return };
    if ev.cmd != KVM_SET_DEVICE_ATTR || !is_file_add(&attr) {
        ev.decision = Decision::None.wire();
        return;
    }
    let coherency = file_coherency(tgid, ev);
    ev.file_coherency = coherency.wire();
    let j = judge(&file_add(tgid, coherency));
    ev.decision = j.decision.wire();
    ev.mechanism = j.mechanism.wire();
    ev.rule = j.rule;
    ev.generation = j.generation;
    if let Some(sig) = j.signal() {
        enforce_by_signal(ctx, ev, tgid, sig);
    }
}

/// Sends the judgement's signal to the calling process; a SIGSTOP also leaves the ask record
/// (IOASID_ASKED), so the agent decides even if the event never reaches it.
#[inline(always)]
fn enforce_by_signal<C: EbpfContext>(ctx: &C, ev: &mut IoctlEvent, tgid: u32, sig: u32) {
    // SAFETY: helper call; signals the current process (the whole thread group).
    let rc = unsafe { bpf_send_signal(sig) };
    if rc != 0 {
        stat_inc(Stat::SignalErrors);
        warn!(ctx, "FILE_ADD by tgid {}: bpf_send_signal({}) failed: {}", tgid, sig, rc);
        return;
    }
    ev.flags |= IOCTL_F_SIGNAL_SENT;
    if sig == SIGSTOP {
        let asked = Asked { ktime_ns: ev.header.ktime_ns, fd: ev.fd, file_fd: ev.file_fd };
        if IOASID_ASKED.insert(&tgid, &asked, BPF_ANY as u64).is_ok() {
            crate::maps::key_added(ioasid_common::names::KEYS_GEN_ASKED);
            ev.flags |= IOCTL_F_ASK_RECORDED;
        }
    }
    // Rare (one per judged FILE_ADD that is denied or asked about): worth a kernel log line.
    info!(ctx, "FILE_ADD by tgid {} on fd {}: decision {}, signal {} sent", tgid, ev.fd, ev.decision, sig);
}

/// syscalls:sys_exit_ioctl. Record: `ret` (8 bytes). Completes the in-flight event of this thread,
/// learns kvm device fds from KVM_CREATE_DEVICE, and submits the event.
#[tracepoint(category = "syscalls", name = "sys_exit_ioctl")]
pub fn ioasid_sys_exit_ioctl(ctx: TracePointContext) -> u32 {
    if try_sys_exit_ioctl(&ctx).is_err() {
        stat_inc(Stat::ReadErrors);
    }
    0
}

#[inline(always)]
fn try_sys_exit_ioctl(ctx: &TracePointContext) -> Result<(), i64> {
    on_sys_exit(|| field_u64(ctx, config().ioctl_ret))
}

/// Completes this thread's in-flight ioctl, if it has one, and submits it.
#[inline(always)]
fn on_sys_exit_ioctl(ret: Result<u64, i64>) -> Result<(), i64> {
    let (tgid, tid) = current_ids();
    let Some(ev) = IOASID_INFLIGHT.get_ptr_mut(&tid) else {
        return Ok(());
    };
    // SAFETY: pointer to this thread's map value; only this thread's sys_enter/sys_exit write it
    // and they cannot run at the same time.
    let ev = unsafe { &mut *ev };
    if ev.flags & IOCTL_F_FOREIGN_FILE != 0 && !foreign_file_add_done(ev, ret) {
        if IOASID_INFLIGHT.remove(&tid).is_ok() {
            inflight_add(-1);
        }
        return ret.map(|_| ());
    }
    if let Ok(ret) = ret {
        if ev.cmd == KVM_CREATE_DEVICE && ret == 0 {
            // SAFETY: bpf_probe_read_user faults safely.
            if let Ok(cd) = unsafe { bpf_probe_read_user(ev.arg as *const KvmCreateDevice) } {
                ev.attr_group = cd.ty;
                ev.attr_flags = cd.flags;
                ev.file_fd = cd.fd as i32;
                let key = fd_key(tgid, cd.fd as i32);
                let _ = IOASID_KVM_DEVICES.insert(&key, &cd.ty, BPF_ANY as u64);
            }
        }
    }
    if send_inflight(tid, ev, ret.ok().map(|r| r as i64)) {
        inflight_add(-1);
    }
    ret.map(|_| ())
}

/// Stamps this thread's in-flight event with its end (and result, when known), sends it and
/// drops it from the map; true if it was still there.
#[inline(always)]
fn send_inflight(tid: u32, ev: &mut IoctlEvent, ret: Option<i64>) -> bool {
    // SAFETY: helper without pointer arguments.
    ev.exit_ktime_ns = unsafe { bpf_ktime_get_ns() };
    if let Some(ret) = ret {
        ev.ret = ret;
        ev.flags |= IOCTL_F_RETURNED;
    }
    submit(ev);
    IOASID_INFLIGHT.remove(&tid).is_ok()
}

/// Sends an event: FILE_ADD/DEL to the decisions ring, everything else to the events ring.
#[inline(always)]
fn submit(ev: &IoctlEvent) {
    if ev.cmd == KVM_SET_DEVICE_ATTR && ev.attr_group == KVM_DEV_VFIO_FILE {
        // An ask's record (IOASID_ASKED) stands in for its event: not a loss.
        if IOASID_DECISIONS.output::<IoctlEvent>(ev, 0).is_err() && ev.flags & IOCTL_F_ASK_RECORDED == 0 {
            stat_inc(Stat::DecisionsDropped);
        }
    } else if IOASID_EVENTS.output::<IoctlEvent>(ev, 0).is_err() {
        stat_inc(Stat::EventsDropped);
    }
}

/// LSM file_ioctl: int (struct file *file, unsigned int cmd, unsigned long arg), plus the
/// previous hook's return value as argument 3. Denies FILE_ADD for `deny` verdicts with -EPERM
/// before the ioctl runs. Optional: needs BPF LSM (refused on kernels without it). Processes
/// without a verdict are left to the stop-and-ask path of `ioasid_sys_enter_ioctl`, which runs
/// first (the sys_enter tracepoint precedes security_file_ioctl).
#[lsm(hook = "file_ioctl")]
pub fn ioasid_lsm_file_ioctl(ctx: LsmContext) -> i32 {
    let prev: i32 = ctx.arg(3);
    if prev != 0 {
        return prev;
    }
    let cmd: u32 = ctx.arg(1);
    // Every ioctl on the host passes here: an unrelated one leaves after the type-byte test.
    if !is_watched_ioctl(cmd) {
        return 0;
    }
    let ctl = control();
    if ctl.fns_observe != 0 {
        // The ioctl functions' own programs observe everything else: here only FILE_ADD, the
        // one request refused before it runs.
        let arg: u64 = ctx.arg(2);
        if cmd != KVM_SET_DEVICE_ATTR {
            return 0;
        }
        // SAFETY: bpf_probe_read_user faults safely.
        return match unsafe { bpf_probe_read_user(arg as *const KvmDeviceAttr) } {
            Ok(a) if is_file_add_shape(cmd, a.group, a.attr) => {
                let ret = lsm_verdict(lsm_observe(&ctx, cmd));
                if ret == 0 {
                    // Let through: the request runs, and the device's fentry program next.
                    if let Some(ev) = IOASID_INFLIGHT.get_ptr_mut(&current_ids().1) {
                        // SAFETY: this thread's own in-flight event.
                        unsafe { (*ev).flags |= IOCTL_F_LSM_TAKEN };
                    }
                }
                ret
            }
            _ => 0,
        };
    }
    if ctl.lsm_observes != 0 {
        return lsm_verdict(lsm_observe(&ctx, cmd));
    }
    lsm_verdict(lsm_deny(&ctx, cmd))
}

/// What an LSM program of ours returns for its own judgement (0: let through, anything else:
/// -EPERM), as two constants on two branches. LLVM may compute `-EPERM` from a boolean as
/// `-(b & 1)` (BPF_NEG), through which verifiers before 6.13 track no bounds; 6.12's then
/// refuses the program ("R0 has unknown scalar value should have been in [-4095, 0]"). The
/// branch in assembly leaves it nothing to fold.
#[inline(always)]
fn lsm_verdict(ret: i32) -> i32 {
    const _: () = assert!(EPERM == 1, "the assembly below returns -1");
    let out: u64;
    // SAFETY: register moves and a forward branch; no memory is touched.
    unsafe {
        core::arch::asm!(
            "{o} = 0",
            "if {r} == 0 goto +1",
            "{o} = -1",
            r = in(reg) ret as i64 as u64,
            o = out(reg) out,
            options(pure, nomem, nostack),
        );
    }
    out as i32
}

/// The current syscall's (fd, request, argument) from its registers (x86-64 ABI: di, si, dx).
#[inline(always)]
fn syscall_args() -> Result<(i32, u32, u64), i64> {
    // SAFETY: the current task's BTF pointer, valid for this program's run.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    let read = |off: usize| {
        // SAFETY: bpf_probe_read_kernel faults safely; the offsets are the x86-64 pt_regs ABI.
        unsafe { bpf_probe_read_kernel(regs.wrapping_add(off).cast::<u64>()) }.map_err(i64::from)
    };
    Ok((read(PT_REGS_DI)? as u32 as i32, read(PT_REGS_SI)? as u32, read(PT_REGS_DX)?))
}

/// fentry on the ioctl function of VFIO's or iommufd's own files:
/// `long f(struct file *file, unsigned int cmd, unsigned long arg)`. Only requests on those files
/// reach it (nothing else on the host pays); unwatched requests leave at the first compare. The
/// fd comes from the syscall's registers.
#[inline(always)]
fn fn_ioctl(ctx: &FEntryContext) {
    let cmd: u32 = ctx.arg(1);
    if !is_watched_ioctl(cmd) || control().fns_observe == 0 {
        return;
    }
    let Ok((fd, _, _)) = syscall_args() else {
        stat_inc(Stat::ReadErrors);
        return;
    };
    on_sys_enter_ioctl(ctx, fd, cmd, ctx.arg(2), true);
}

macro_rules! ioctl_fns {
    ($($function:literal => $name:ident;)*) => {
        $(
            #[doc = concat!("fentry ", $function, ": see `fn_ioctl`.")]
            #[fentry(function = $function)]
            pub fn $name(ctx: FEntryContext) -> i32 {
                fn_ioctl(&ctx);
                0
            }
        )*
    };
}

ioctl_fns! {
    "vfio_fops_unl_ioctl" => ioasid_fentry_vfio_fops_unl_ioctl;
    "vfio_group_fops_unl_ioctl" => ioasid_fentry_vfio_group_fops_unl_ioctl;
    "vfio_device_fops_unl_ioctl" => ioasid_fentry_vfio_device_fops_unl_ioctl;
    "iommufd_fops_ioctl" => ioasid_fentry_iommufd_fops_ioctl;
}

/// One of KVM's watched requests, from the function that does its work: `cmd` is known by
/// where it runs; the fd and the user argument come from the syscall's registers (an ia32
/// caller's fd reads wrong there: its request is still judged, by the kernel's copy).
#[inline(always)]
fn kvm_request<C: EbpfContext>(ctx: &C, cmd: u32, arg: Option<u64>, kattr: u64) -> Option<IoctlEvent> {
    if control().fns_observe == 0 {
        return None;
    }
    let (fd, _, user_arg) = syscall_args().unwrap_or_else(|_| {
        stat_inc(Stat::ReadErrors);
        (-1, cmd, 0)
    });
    on_watched_ioctl(ctx, fd, cmd, arg.unwrap_or(user_arg), true, kattr)
}

/// fentry kvm_arch_init_vm(struct kvm *kvm, unsigned long type) (x86 common code; its only
/// caller is KVM_CREATE_VM): a VM is born; its VMM's command line is captured.
#[fentry(function = "kvm_arch_init_vm")]
pub fn ioasid_fentry_kvm_arch_init_vm(ctx: FEntryContext) -> i32 {
    kvm_request(&ctx, KVM_CREATE_VM, Some(ctx.arg(1)), 0);
    0
}

/// fentry kvm_vfio_create(struct kvm_device *dev, u32 type) (virt/kvm/vfio.c, kvm_vfio_ops):
/// KVM_CREATE_DEVICE of a kvm-vfio device; no other device type pays.
#[fentry(function = "kvm_vfio_create")]
pub fn ioasid_fentry_kvm_vfio_create(ctx: FEntryContext) -> i32 {
    kvm_request(&ctx, KVM_CREATE_DEVICE, None, 0);
    0
}

/// fentry kvm_vfio_set_attr(struct kvm_device *dev, struct kvm_device_attr *attr): a
/// KVM_SET_DEVICE_ATTR on a kvm-vfio device (FILE_ADD/DEL), judged from the kernel's copy of the
/// attribute and enforced by signal. Left alone where the LSM program, which runs before the
/// request, took it (`IOCTL_F_LSM_TAKEN`).
#[fentry(function = "kvm_vfio_set_attr")]
pub fn ioasid_fentry_kvm_vfio_set_attr(ctx: FEntryContext) -> i32 {
    if let Some(ev) = IOASID_INFLIGHT.get_ptr_mut(&current_ids().1) {
        // SAFETY: this thread's own in-flight event.
        let ev = unsafe { &mut *ev };
        if ev.flags & IOCTL_F_LSM_TAKEN != 0 {
            ev.flags &= !IOCTL_F_LSM_TAKEN;
            return 0;
        }
    }
    kvm_request(&ctx, KVM_SET_DEVICE_ATTR, None, ctx.arg(1));
    0
}

/// fentry kvm_vfio_has_attr: KVM_HAS_DEVICE_ATTR on a kvm-vfio device (reported).
#[fentry(function = "kvm_vfio_has_attr")]
pub fn ioasid_fentry_kvm_vfio_has_attr(ctx: FEntryContext) -> i32 {
    kvm_request(&ctx, KVM_HAS_DEVICE_ATTR, None, ctx.arg(1));
    0
}

/// LSM file_ioctl, denying only: the program for kernels whose verifier refuses the observing
/// one (5.10 has neither bpf_get_current_task_btf nor bpf_task_pt_regs). The syscall
/// tracepoints observe and judge; this returns -EPERM for a FILE_ADD the same judgement denies.
#[lsm(hook = "file_ioctl")]
pub fn ioasid_lsm_file_ioctl_deny(ctx: LsmContext) -> i32 {
    // An earlier LSM's refusal stands.
    match ctx.arg::<i32>(3) {
        0 => lsm_verdict(lsm_deny(&ctx, ctx.arg(1))),
        prev => prev,
    }
}

/// The judgement sys_enter made for this FILE_ADD (sys_enter ran first and sent any signal),
/// as the LSM's return value.
#[inline(always)]
fn lsm_deny(ctx: &LsmContext, cmd: u32) -> i32 {
    if cmd != KVM_SET_DEVICE_ATTR || control().enforce == 0 {
        return 0;
    }
    let arg: u64 = ctx.arg(2);
    // SAFETY: bpf_probe_read_user faults safely.
    let Ok(attr) = (unsafe { bpf_probe_read_user(arg as *const KvmDeviceAttr) }) else {
        return 0;
    };
    if !is_file_add(&attr) {
        return 0;
    }
    let (tgid, _) = current_ids();
    // The same judgement sys_enter made (which ran first and sent any signal): its return value.
    // A file the agent has not resolved is judged of unknown coherency, as at sys_enter.
    // SAFETY: bpf_probe_read_user faults safely.
    let coherency = match unsafe { bpf_probe_read_user(attr.addr as *const i32) } {
        Ok(file_fd) => match IOASID_FILE_COHERENCY.get_ptr(&fd_key(tgid, file_fd)) {
            // SAFETY: pointer to a live map value, read once.
            Some(c) => Coherency::try_from(unsafe { *c }).unwrap_or(Coherency::Unknown),
            None => Coherency::Unknown,
        },
        Err(_) => Coherency::Unknown,
    };
    judge(&file_add(tgid, coherency)).lsm_return()
}

/// The whole ioctl path from the LSM hook (no syscall tracepoint attached: unrelated syscalls
/// pay nothing, unrelated ioctls one compare). The fd comes from the syscall's own registers
/// (bpf_task_pt_regs), so the event is the one the sys_enter programs build; a deny for a file
/// the agent resolved as non-coherent returns -EPERM, an ask stops the VMM as at sys_enter.
#[inline(always)]
fn lsm_observe(ctx: &LsmContext, cmd: u32) -> i32 {
    let arg: u64 = ctx.arg(2);
    // SAFETY: the current task's BTF pointer, valid for this program's run.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    // SAFETY: bpf_probe_read_kernel faults safely; the offset is the x86-64 pt_regs ABI.
    let Ok(fd) = (unsafe { bpf_probe_read_kernel(regs.wrapping_add(PT_REGS_DI).cast::<u64>()) }) else {
        stat_inc(Stat::ReadErrors);
        return 0;
    };
    let file: u64 = ctx.arg(0);
    if !is_watched_file(config(), Ok(file)) {
        stat_inc(Stat::IgnoredRequests);
        // A FILE_ADD on a file not recognised as KVM's (a /dev/null... or a kvm-vfio device
        // of a KVM module reloaded a moment ago, before the agent learnt its new address):
        // refused, never let through unjudged. On a file that is no kvm device it would fail
        // anyway.
        // SAFETY: bpf_probe_read_user faults safely.
        return match unsafe { bpf_probe_read_user(arg as *const KvmDeviceAttr) } {
            Ok(a) if is_file_add_shape(cmd, a.group, a.attr) => Judged::UNRECOGNISED.lsm_return(),
            _ => 0,
        };
    }
    let Some(ev) = on_sys_enter_ioctl(ctx, fd as u32 as i32, cmd, arg, true) else { return 0 };
    let refused = Mechanism::try_from(ev.mechanism).map_or(0, lsm_return);
    if refused != 0 {
        // Refused here: kvm_vfio_set_attr never runs, so the result is ours to send.
        complete_inflight(i64::from(refused));
    }
    refused
}

/// Completes this thread's in-flight FILE_ADD/DEL event with its result and sends it.
#[inline(always)]
fn complete_inflight(ret: i64) {
    let (_, tid) = current_ids();
    if let Some(ev) = IOASID_INFLIGHT.get_ptr_mut(&tid) {
        // SAFETY: this thread's own in-flight event.
        send_inflight(tid, unsafe { &mut *ev }, Some(ret));
    }
}

/// fexit kvm_vfio_set_attr(struct kvm_device *dev, struct kvm_device_attr *attr) -> int
/// (virt/kvm/vfio.c, static but address-taken: kvm_vfio_ops; 5.x-6.x): the result of a
/// FILE_ADD/DEL where the LSM observes the ioctl path. Completes and sends this thread's
/// in-flight event (the kernel's own coherency verdict is already in it).
#[fexit(function = "kvm_vfio_set_attr")]
pub fn ioasid_fexit_kvm_vfio_set_attr(ctx: FExitContext) -> i32 {
    // Only while the LSM observes: otherwise sys_exit completes the event (and counts it).
    if control().lsm_observes == 0 {
        return 0;
    }
    let Ok(ret) = ctx.ret::<i32>() else { return 0 };
    complete_inflight(i64::from(ret));
    0
}

/// fexit vfio_file_enforced_coherent(struct file *file) -> bool (drivers/vfio, 6.2+; called by
/// kvm-vfio while it handles FILE_ADD): the kernel's own coherency verdict for the file. Written
/// into this thread's in-flight FILE_ADD event, so it lands in its audit record. Optional: needs
/// trampolines and VFIO.
#[fexit(function = "vfio_file_enforced_coherent")]
pub fn ioasid_fexit_vfio_file_enforced_coherent(ctx: FExitContext) -> i32 {
    let Ok(ret) = ctx.ret::<u64>() else { return 0 };
    kernel_verdict(ret & 0xff != 0);
    0
}

/// kretprobe vfio_external_check_extension(struct vfio_group *, unsigned long arg) -> long
/// (drivers/vfio, before 6.2; exported for kvm-vfio alone, which asks it VFIO_DMA_CC_IOMMU while
/// it handles FILE_ADD): the same verdict, positive for coherent.
#[kretprobe(function = "vfio_external_check_extension")]
pub fn ioasid_kretprobe_vfio_external_check_extension(ctx: RetProbeContext) -> u32 {
    let ret: i64 = ctx.ret();
    kernel_verdict(ret > 0);
    0
}

/// Writes the kernel's verdict into this thread's in-flight FILE_ADD event, if it has one.
#[inline(always)]
fn kernel_verdict(coherent: bool) {
    let (_, tid) = current_ids();
    if let Some(ev) = IOASID_INFLIGHT.get_ptr_mut(&tid) {
        let verdict = if coherent { Coherency::Coherent } else { Coherency::Noncoherent };
        // SAFETY: this thread's own in-flight event; sys_exit for it has not run yet.
        unsafe { (*ev).kernel_coherent = verdict.wire() };
    }
}
