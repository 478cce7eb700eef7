//! WBINVD cost: how long KVM spent handling each WBINVD, and how many CPUs a flush reached.
//!
//! Two sources, the agent uses the best the kernel allows (`Control::cost_source`):
//! - handlers (fentry/fexit on kvm_emulate_wbinvd and emulator_wbinvd, where trampolines load):
//!   the exact time inside KVM's handler;
//! - tracepoint pairs (everywhere): from the WBINVD's kvm_exit (or its kvm_emulate_insn record)
//!   to the same thread's next kvm_entry, next emulated instruction, or return to userspace.
//!
//! The closers run on every VM entry, every emulated instruction and every syscall exit: while
//! no WBINVD is pending anywhere (nearly always) they cost one array read.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, fentry, fexit, kprobe, kretprobe, tracepoint},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RetProbeContext, TracePointContext,
    },
    EbpfContext,
};
use ioasid_common::{
    cost::{
        cost_bucket, flush_cpus_bucket, BlastKey, CostKey, CostSource, FlushMark, IpiStart, Pending,
        BLAST_IPIS, BLAST_MAX_CPUS, BLAST_NS, COST_SUM,
    },
    counters::Path,
    names::{KEYS_GEN_BLAST, KEYS_GEN_COST},
};

use super::{current_ids, me, me_btf};
use crate::maps::{
    config, control, pending_add, pending_none, percpu_add, IOASID_BLAST, IOASID_COST, IOASID_FLUSH_CPUS,
    IOASID_FLUSH_TARGETS, IOASID_IPI_START, IOASID_PENDING,
};
use ioasid_common::verdict::ProcKey;

/// Records one handled WBINVD of process `tgid`/`start` that took `ns`.
#[inline(always)]
fn record(tgid: u32, start: u64, ns: u64) {
    percpu_add(&IOASID_COST, KEYS_GEN_COST, &CostKey { tgid, bucket: cost_bucket(ns), start }, 1);
    percpu_add(&IOASID_COST, KEYS_GEN_COST, &CostKey { tgid, bucket: COST_SUM, start }, ns);
}

/// A WBINVD started on this thread (tracepoint source).
#[inline(always)]
pub fn start_from_tracepoint(me: ProcKey, tid: u32, path: Path) {
    if control().cost_source == CostSource::Handlers.wire() {
        return;
    }
    start(me, tid, path);
}

/// This thread's WBINVD starts now. A thread's entry stays in `IOASID_PENDING` once made (idle
/// between WBINVDs: `start_ns` 0), so a WBINVD writes it in place instead of inserting and
/// deleting a hash element (an allocation and a bucket lock each); the agent removes the
/// entries of a VMM that is gone (`forget`).
#[inline(always)]
fn start(me: ProcKey, tid: u32, path: Path) {
    // SAFETY: helper without pointer arguments.
    let start_ns = unsafe { bpf_ktime_get_ns() };
    let p = Pending { start_ns, tgid: me.tgid, path: path.wire(), start: me.start };
    if let Some(slot) = IOASID_PENDING.get_ptr_mut(&tid) {
        // SAFETY: a live map value, written only by this thread's programs, which do not nest
        // on one thread. An entry that is still pending (its WBINVD never closed) is replaced
        // and stays counted once.
        let idle = unsafe { (*slot).start_ns } == 0;
        unsafe { *slot = p };
        if idle {
            pending_add(1);
        }
    } else if IOASID_PENDING.insert(&tid, &p, BPF_NOEXIST as u64).is_ok() {
        pending_add(1);
    }
}

/// True while this thread handles a WBINVD (its entry is pending).
#[inline(always)]
fn handling_wbinvd(tid: u32) -> bool {
    // SAFETY: a live map value, read once.
    IOASID_PENDING.get_ptr(&tid).is_some_and(|p| unsafe { (*p).start_ns } != 0)
}

/// Ends this thread's pending WBINVD, if any. Fast when nothing is pending anywhere.
#[inline(always)]
pub fn close_pending(tid: u32) {
    if pending_none() {
        return;
    }
    let Some(slot) = IOASID_PENDING.get_ptr_mut(&tid) else { return };
    // SAFETY: live map value, copied once, then marked idle (see `start`).
    let p = unsafe { *slot };
    if p.start_ns == 0 {
        return;
    }
    unsafe { (*slot).start_ns = 0 };
    pending_add(-1);
    // SAFETY: helper without pointer arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    record(p.tgid, p.start, now.saturating_sub(p.start_ns));
}

/// tp_btf kvm_entry: TP_PROTO(struct kvm_vcpu *vcpu, bool force_immediate_exit) (6.10+; one
/// argument before). Arguments are not read. Runs on every VM entry: one array read unless a
/// WBINVD is pending.
#[btf_tracepoint(function = "kvm_entry")]
pub fn ioasid_tp_btf_kvm_entry(_ctx: BtfTracePointContext) -> i32 {
    if pending_none() {
        return 0;
    }
    close_pending(current_ids().1);
    0
}

/// kvm:kvm_entry, the fallback where tp_btf does not load (builds a trace record per entry).
#[tracepoint(category = "kvm", name = "kvm_entry")]
pub fn ioasid_kvm_entry(_ctx: TracePointContext) -> u32 {
    if pending_none() {
        return 0;
    }
    close_pending(current_ids().1);
    0
}

/// A WBINVD handler of process `me` starts on this thread (fentry, or its kprobe twin).
#[inline(always)]
fn handler_start(me: ProcKey, path: Path) {
    start(me, current_ids().1, path);
}

/// fentry kvm_emulate_wbinvd(struct kvm_vcpu *): the exit handler starts.
#[fentry(function = "kvm_emulate_wbinvd")]
pub fn ioasid_fentry_kvm_emulate_wbinvd(ctx: FEntryContext) -> i32 {
    let me = me_btf();
    handler_start(me, Path::Exit);
    // The vCPU's address as a number: the first argument read from the context by a helper.
    let addr = || {
        // SAFETY: the context holds the arguments as u64s; the read faults safely.
        unsafe { bpf_probe_read_kernel(ctx.as_ptr() as *const u64) }.unwrap_or(0)
    };
    super::wbinvd::handler_entered(me, crate::read::Btf(ctx.arg(0)), addr);
    0
}

/// fentry emulator_wbinvd(struct x86_emulate_ctxt *): the emulator's handler starts.
#[fentry(function = "emulator_wbinvd")]
pub fn ioasid_fentry_emulator_wbinvd(ctx: FEntryContext) -> i32 {
    let me = me_btf();
    handler_start(me, Path::Emulated);
    let vcpu = super::wbinvd::ctxt_vcpu(ctx.arg(0));
    super::wbinvd::handler_entered(me, vcpu, || vcpu.0);
    0
}

/// kprobe kvm_emulate_wbinvd: the fentry's twin where kvm has no BTF (5.10).
#[kprobe(function = "kvm_emulate_wbinvd")]
pub fn ioasid_kprobe_kvm_emulate_wbinvd(_ctx: ProbeContext) -> u32 {
    handler_start(me(), Path::Exit);
    0
}

/// kprobe emulator_wbinvd: likewise.
#[kprobe(function = "emulator_wbinvd")]
pub fn ioasid_kprobe_emulator_wbinvd(_ctx: ProbeContext) -> u32 {
    handler_start(me(), Path::Emulated);
    0
}

/// fexit of either handler: see `programs::wbinvd`.
#[inline(always)]
pub fn handler_done() {
    close_pending(current_ids().1);
}

/// What a flush does on the calling CPU, beside the CPUs of its mask.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OwnCpu {
    /// As the mask says (wbinvd_on_cpus_mask, on_each_cpu_mask: KVM set it in the mask).
    AsMask,
    /// Never (smp_call_function_many: 5.10's KVM never flushes its own CPU).
    Skip,
    /// Always (read from KVM's dirty mask before KVM adds the current CPU to it).
    Add,
}

/// One pass over a flush's cpumask (the first `nr_cpus` bits, at most BLAST_MAX_CPUS = 512: an
/// off-stack cpumask is allocated to `nr_cpu_ids` bits only): counts its CPUs into the
/// CPUs-per-flush histogram, and marks each of them with the flusher, for the flush IPI there
/// to find (blast radius; concurrent flushes aimed at one CPU: the later mark wins). `own`
/// says what happens on the calling CPU.
#[inline(always)]
pub fn record_flush_cpus(mask: *const u64, own_cpu: OwnCpu) {
    let nr = config().nr_cpus.min(BLAST_MAX_CPUS);
    // SAFETY: helpers without pointer arguments.
    let mark = FlushMark {
        flusher_tgid: current_ids().0,
        flusher_cpu: unsafe { bpf_get_smp_processor_id() },
        ktime_ns: unsafe { bpf_ktime_get_ns() },
    };
    let own = mark.flusher_cpu;
    let mut cpus = 0u32;
    let mut w = 0u32;
    while w < BLAST_MAX_CPUS / 64 && w * 64 < nr {
        // SAFETY: bpf_probe_read_kernel faults safely; `w` stays within the mask's words.
        let Ok(word) = (unsafe { bpf_probe_read_kernel(mask.wrapping_add(w as usize)) }) else { break };
        let valid = nr - w * 64;
        let mut word = if valid < 64 { word & ((1u64 << valid) - 1) } else { word };
        if own / 64 == w {
            match own_cpu {
                OwnCpu::Skip => word &= !(1u64 << (own % 64)),
                OwnCpu::Add => word |= 1u64 << (own % 64),
                OwnCpu::AsMask => {}
            }
        }
        cpus += word.count_ones();
        let mut n = 0;
        while word != 0 && n < 64 {
            if let Some(slot) = IOASID_FLUSH_TARGETS.get_ptr_mut(w * 64 + word.trailing_zeros()) {
                // SAFETY: a live array element; a racing writer leaves one whole mark or the
                // other (each field is written whole).
                unsafe { *slot = mark };
            }
            word &= word - 1;
            n += 1;
        }
        w += 1;
    }
    if let Some(slot) = IOASID_FLUSH_CPUS.get_ptr_mut(flush_cpus_bucket(cpus)) {
        // SAFETY: this CPU's slot of a per-CPU array element, written only here, by the flush
        // path in task context (the IPI-context programs never touch this map).
        unsafe { *slot += 1 };
    }
}

/// fentry wbinvd_on_cpus_mask(struct cpumask *mask) (x86, since ~6.17; KVM's flush of every
/// CPU the vCPU ran on): how many CPUs the flush reaches.
#[fentry(function = "wbinvd_on_cpus_mask")]
pub fn ioasid_fentry_wbinvd_on_cpus_mask(ctx: FEntryContext) -> i32 {
    record_flush_cpus(ctx.arg(0), OwnCpu::AsMask);
    0
}

/// fentry on_each_cpu_cond_mask(smp_cond_func_t cond_func, smp_call_func_t func, void *info,
/// bool wait, const struct cpumask *mask) (kernel/smp.c, all 6.x): before ~6.17 KVM flushes
/// with on_each_cpu_mask(vcpu->arch.wbinvd_dirty_mask, wbinvd_ipi, NULL, 1), an inline wrapper
/// of this function. The verifier of those kernels refuses reads of a function-pointer
/// argument (`func`), so the call is recognised by where it runs instead: on a thread that is
/// handling a WBINVD (it has a pending WBINVD, from its exit or handler entry). Every other
/// caller (TLB shootdowns...) leaves after one array read while no WBINVD is pending anywhere.
#[fentry(function = "on_each_cpu_cond_mask")]
pub fn ioasid_fentry_on_each_cpu_cond_mask(ctx: FEntryContext) -> i32 {
    if pending_none() || !handling_wbinvd(current_ids().1) {
        return 0;
    }
    record_flush_cpus(ctx.arg(4), OwnCpu::AsMask);
    0
}

/// fentry smp_call_function_many(const struct cpumask *mask, smp_call_func_t func, void *info,
/// bool wait) (kernel/smp.c): how 5.10's KVM flushes (`smp_call_function_many(dirty_mask,
/// wbinvd_ipi, NULL, 1)`), which runs `func` on every CPU of the mask but the calling one, so
/// that one is not counted. Recognised, as above, by a thread handling a WBINVD.
#[fentry(function = "smp_call_function_many")]
pub fn ioasid_fentry_smp_call_function_many(ctx: FEntryContext) -> i32 {
    if pending_none() || !handling_wbinvd(current_ids().1) {
        return 0;
    }
    record_flush_cpus(ctx.arg(0), OwnCpu::Skip);
    0
}

/// One CPU of a non-coherent VM's flush starts, in the IPI (or inline on the flusher's own
/// CPU): the task running here was interrupted, the victim. Only flushes whose flusher marked
/// this CPU count, and never on the flusher's own CPU. The mark is taken (consumed), so a
/// later flush of the same function by somebody else (`wbinvd_on_all_cpus`...) is nobody's.
#[inline(always)]
fn flush_ipi_start() {
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(start) = IOASID_IPI_START.get_ptr_mut(0) else { return };
    let Some(slot) = IOASID_FLUSH_TARGETS.get_ptr_mut(cpu) else { return };
    // SAFETY: a live array element, copied, then cleared (each field is written whole).
    let mark = unsafe { *slot };
    unsafe { (*slot).flusher_tgid = 0 };
    if mark.flusher_tgid == 0 || mark.flusher_cpu == cpu {
        // SAFETY: this CPU's own element.
        unsafe { (*start).start_ns = 0 };
        return;
    }
    // SAFETY: this CPU's own element; IPIs do not nest on a CPU.
    unsafe {
        *start = IpiStart {
            start_ns: bpf_ktime_get_ns(),
            flusher_tgid: mark.flusher_tgid,
            victim_tgid: current_ids().0,
        }
    };
}

/// The flush on this CPU is done: its time, stolen from the victim.
#[inline(always)]
fn flush_ipi_end() {
    let Some(start) = IOASID_IPI_START.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's own element.
    let s = unsafe { *start };
    if s.start_ns == 0 {
        return;
    }
    // SAFETY: as above; a helper without arguments.
    unsafe { (*start).start_ns = 0 };
    let ns = unsafe { bpf_ktime_get_ns() }.saturating_sub(s.start_ns);
    let key = |kind| BlastKey { flusher_tgid: s.flusher_tgid, victim_tgid: s.victim_tgid, kind, _pad: 0 };
    percpu_add(&IOASID_BLAST, KEYS_GEN_BLAST, &key(BLAST_IPIS), 1);
    percpu_add(&IOASID_BLAST, KEYS_GEN_BLAST, &key(BLAST_NS), ns);
}

/// fentry wbinvd_ipi(void *garbage) (arch/x86/kvm/x86.c, up to 6.16; static, address-taken):
/// what KVM's flush runs on each CPU.
#[fentry(function = "wbinvd_ipi")]
pub fn ioasid_fentry_wbinvd_ipi(_ctx: FEntryContext) -> i32 {
    flush_ipi_start();
    0
}

/// fexit wbinvd_ipi.
#[fexit(function = "wbinvd_ipi")]
pub fn ioasid_fexit_wbinvd_ipi(_ctx: FExitContext) -> i32 {
    flush_ipi_end();
    0
}

/// fentry __wbinvd(void *dummy) (arch/x86/lib/cache-smp.c; static, address-taken): what
/// wbinvd_on_cpus_mask, KVM's flush from ~6.17, runs on each CPU (wbinvd_on_all_cpus too,
/// whose CPUs nobody marked).
#[fentry(function = "__wbinvd")]
pub fn ioasid_fentry_wbinvd_fn(_ctx: FEntryContext) -> i32 {
    flush_ipi_start();
    0
}

/// fexit __wbinvd.
#[fexit(function = "__wbinvd")]
pub fn ioasid_fexit_wbinvd_fn(_ctx: FExitContext) -> i32 {
    flush_ipi_end();
    0
}

/// kprobe wbinvd_ipi: the fentry's twin where kvm has no BTF (5.10).
#[kprobe(function = "wbinvd_ipi")]
pub fn ioasid_kprobe_wbinvd_ipi(_ctx: ProbeContext) -> u32 {
    flush_ipi_start();
    0
}

/// kretprobe wbinvd_ipi: the fexit's twin.
#[kretprobe(function = "wbinvd_ipi")]
pub fn ioasid_kretprobe_wbinvd_ipi(_ctx: RetProbeContext) -> u32 {
    flush_ipi_end();
    0
}
