//! Guest WBINVD / INVD accounting.
//!
//! Both paths KVM has are counted, exactly, into the per-CPU `IOASID_COUNTERS` map keyed by the
//! VMM's tgid (the agent names the VM from it). Fail-open: a record that cannot be read is
//! counted in `Stat::ReadErrors` and never affects the guest.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel_buf,
    macros::{btf_tracepoint, fentry, fexit, kretprobe, tracepoint},
    programs::{BtfTracePointContext, FEntryContext, FExitContext, RetProbeContext, TracePointContext},
    EbpfContext,
};
use ioasid_common::{
    abi::{KVM_EMUL_INSN_F_CS_L, KVM_ISA_SVM},
    config::EmulTail,
    counters::{CounterKey, ExitMark, Op, Path, Stat, VCPU_UNKNOWN},
    decode::{classify_decoded, classify_exit, classify_insn},
    names::KEYS_GEN_COUNTERS,
    verdict::ProcKey,
};

use super::{cost, current_ids, me, me_btf};
use crate::{
    maps::{
        config, control, is_noncoherent, mark_exit, pending_none, percpu_add, stat_inc, take_exit_mark,
        IOASID_COUNTERS,
    },
    read::{field_u64, kread, Btf, Kptr, Raw},
};

/// Adds one to a counter on this CPU.
#[inline(always)]
fn count(me: ProcKey, vcpu: u32, op: Op, path: Path) {
    add(me, vcpu, op.wire(), path, 1);
}

/// Adds `delta` to a counter (`op` as on the wire) on this CPU.
#[inline(always)]
fn add(me: ProcKey, vcpu: u32, op: u32, path: Path, delta: u64) {
    let key = CounterKey { tgid: me.tgid, vcpu, op, path: path.wire(), start: me.start };
    percpu_add(&IOASID_COUNTERS, KEYS_GEN_COUNTERS, &key, delta);
}

/// kvm:kvm_exit, fired on every VM exit.
///
/// TP_PROTO(struct kvm_vcpu *vcpu, u32 isa). The record carries `exit_reason` (u32; SVM codes
/// are moving to u64), `isa` (1 VMX, 2 SVM) and `vcpu_id`, computed by the tracepoint itself,
/// so no kernel struct offset is needed. Offsets and sizes come from the `format` file at load
/// time (seen on 5.x-6.18). Hot path: two reads and a compare for every non-WBINVD exit.
#[tracepoint(category = "kvm", name = "kvm_exit")]
pub fn ioasid_kvm_exit(ctx: TracePointContext) -> u32 {
    if try_kvm_exit(&ctx).is_err() {
        stat_inc(Stat::ReadErrors);
    }
    0
}

#[inline(always)]
fn try_kvm_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let cfg = config();
    let reason = field_u64(ctx, cfg.exit_reason)?;
    let isa = field_u64(ctx, cfg.exit_isa)? as u32;
    let Some(op) = classify_exit(isa, reason) else {
        return Ok(());
    };
    let vcpu = field_u64(ctx, cfg.exit_vcpu_id)? as u32;
    let (me, tid) = (me(), current_ids().1);
    if isa == KVM_ISA_SVM && control().skip_emulation != 0 {
        // KVM will emulate this very instruction to skip it (no NRIP save): the count waits
        // for that emulation, whose bytes say what the instruction is, so it is counted once
        // and never corrected after a reader saw it.
        let rip = field_u64(ctx, cfg.exit_rip)?;
        if let Some(stale) = mark_exit(tid, &ExitMark { rip, vcpu, op: op.wire() }) {
            // The previous exit's emulation never came: count it as reported.
            add(me, stale.vcpu, stale.op, Path::Exit, 1);
        }
    } else {
        count(me, vcpu, op, Path::Exit);
    }
    if op == Op::Wbinvd {
        count_flush(me, vcpu);
        cost::start_from_tracepoint(me, tid, Path::Exit);
    }
    Ok(())
}

/// kvm:kvm_emulate_insn, fired for every instruction KVM's emulator runs (and again with
/// `failed` = 1 when emulation fails; only the successful records are counted).
///
/// TP_PROTO(struct kvm_vcpu *vcpu, __u8 failed). Record: `len`, `insn[15]` copied from the
/// emulator context, `flags` (bit 3 = CS.L, 64-bit mode), `failed`. No vCPU id in the record.
#[tracepoint(category = "kvm", name = "kvm_emulate_insn")]
pub fn ioasid_kvm_emulate_insn(ctx: TracePointContext) -> u32 {
    if try_kvm_emulate_insn(&ctx).is_err() {
        stat_inc(Stat::ReadErrors);
    }
    0
}

/// tp_btf kvm_emulate_insn: TP_PROTO(struct kvm_vcpu *vcpu, __u8 failed). The raw tracepoint,
/// where KVM's struct layout is known (no trace record is built): the decoded instruction is
/// read from `vcpu->arch.emulate_ctxt`, which the emulator filled just before.
#[btf_tracepoint(function = "kvm_emulate_insn")]
pub fn ioasid_tp_btf_kvm_emulate_insn(ctx: BtfTracePointContext) -> i32 {
    if !pending_none() {
        cost::close_pending(current_ids().1);
    }
    // SAFETY: the tracepoint's arguments, as its prototype has them.
    let (vcpu, failed): (*const u8, u64) = unsafe { (ctx.arg(0), ctx.arg(1)) };
    let Ok((opcode_len, b, ctxt)) = decoded_insn(Btf(vcpu)) else {
        stat_inc(Stat::ReadErrors);
        return 0;
    };
    let op = if failed & 0xff != 0 { None } else { classify_decoded(opcode_len, b) };
    if emulated(op, || Raw(ctxt).field::<u64>(config().kvm.ctxt_eip), me_btf).is_err() {
        stat_inc(Stat::ReadErrors);
    }
    0
}

#[inline(always)]
fn try_kvm_emulate_insn(ctx: &TracePointContext) -> Result<(), i64> {
    // The previous instruction of this vCPU thread is done: if it was a WBINVD, time it. Nothing
    // else runs here for an ordinary instruction while no WBINVD is pending anywhere.
    if !pending_none() {
        cost::close_pending(current_ids().1);
    }
    let cfg = config();
    let (insn, len, flags, failed) = if cfg.emul_packed != 0 {
        // One read of `len, insn[15], flags, failed` (the layout the agent checked).
        // SAFETY: bpf_probe_read_kernel faults safely.
        let t: EmulTail = unsafe { ctx.read_at(cfg.emul_len.offset as usize) }.map_err(i64::from)?;
        (t.insn, t.len, t.flags, t.failed != 0)
    } else {
        let mut insn = [0u8; 15];
        // SAFETY: bpf_probe_read_kernel_buf faults safely; the destination is a stack buffer.
        unsafe {
            bpf_probe_read_kernel_buf(
                (ctx.as_ptr() as *const u8).add(cfg.emul_insn.offset as usize),
                &mut insn,
            )
        }
        .map_err(i64::from)?;
        let failed = field_u64(ctx, cfg.emul_failed)? != 0;
        (insn, field_u64(ctx, cfg.emul_len)? as u8, field_u64(ctx, cfg.emul_flags)? as u8, failed)
    };
    let long_mode = flags & KVM_EMUL_INSN_F_CS_L != 0;
    let op = if failed { None } else { classify_insn(&insn, len, long_mode) };
    emulated(op, || field_u64(ctx, cfg.emul_rip), me)
}

/// An instruction KVM's emulator ran (`op`: WBINVD, INVD or neither), at the rip `rip` reads:
/// pairs it with this thread's exit it skips (SVM without NRIP save), else counts it emulated.
#[inline(always)]
fn emulated(
    op: Option<Op>,
    rip: impl FnOnce() -> Result<u64, i64>,
    who: impl Fn() -> ProcKey,
) -> Result<(), i64> {
    if let Some(mark) = take_exit_mark() {
        let me = who();
        if rip()? == mark.rip {
            // KVM skipping the instruction this thread exited on (no NRIP save): the same
            // instruction, counted once, here, as the hardware exit it was. The bytes decide what
            // it is (an emulator may report INVD with the WBINVD exit code).
            add(me, mark.vcpu, op.map_or(mark.op, Op::wire), Path::Exit, 1);
            return Ok(());
        }
        // The exit's emulation never came: count the exit as it was reported.
        add(me, mark.vcpu, mark.op, Path::Exit, 1);
    }
    let Some(op) = op else {
        return Ok(());
    };
    let (me, tid) = (who(), current_ids().1);
    count(me, VCPU_UNKNOWN, op, Path::Emulated);
    if op == Op::Wbinvd {
        count_flush(me, VCPU_UNKNOWN);
        cost::start_from_tracepoint(me, tid, Path::Emulated);
    }
    Ok(())
}

/// fexit kvm_emulate_wbinvd(struct kvm_vcpu *vcpu) -> int: the exit handler ran (the
/// function exists since 2.6.x). Optional: needs BPF trampolines.
#[fexit(function = "kvm_emulate_wbinvd")]
pub fn ioasid_fexit_kvm_emulate_wbinvd(ctx: FExitContext) -> i32 {
    let me = me_btf();
    handler_end(me, Path::HandlerExit);
    handler_counts(me, Btf(ctx.arg(0)), Path::Exit);
    0
}

/// fexit emulator_wbinvd(struct x86_emulate_ctxt *ctxt) -> void: static but address-taken
/// (ctxt->ops->wbinvd), so it is a real function with BTF. Optional: needs trampolines.
#[fexit(function = "emulator_wbinvd")]
pub fn ioasid_fexit_emulator_wbinvd(ctx: FExitContext) -> i32 {
    let me = me_btf();
    handler_end(me, Path::HandlerEmulated);
    handler_counts(me, ctxt_vcpu(ctx.arg(0)), Path::Emulated);
    0
}

/// kretprobe kvm_emulate_wbinvd: the fexit's twin where kvm has no BTF (5.10; there the
/// tracepoints count, so only the handler's calls and time are taken here).
#[kretprobe(function = "kvm_emulate_wbinvd")]
pub fn ioasid_kretprobe_kvm_emulate_wbinvd(_ctx: RetProbeContext) -> u32 {
    handler_end(me(), Path::HandlerExit);
    0
}

/// kretprobe emulator_wbinvd: likewise.
#[kretprobe(function = "emulator_wbinvd")]
pub fn ioasid_kretprobe_emulator_wbinvd(_ctx: RetProbeContext) -> u32 {
    handler_end(me(), Path::HandlerEmulated);
    0
}

/// A WBINVD handler returned on this thread (fexit, or its kretprobe twin): one call on `path`,
/// and its time.
#[inline(always)]
fn handler_end(me: ProcKey, path: Path) {
    count(me, VCPU_UNKNOWN, Op::Wbinvd, path);
    cost::handler_done();
}

/// The instruction KVM's emulator last decoded for `vcpu`: `opcode_len`, the opcode byte `b`,
/// and the context's address (`vcpu->arch.emulate_ctxt`).
#[inline(always)]
fn decoded_insn<P: Kptr>(vcpu: P) -> Result<(u8, u8, u64), i64> {
    let k = &config().kvm;
    // Read-only, so constants to the verifier: with no layout no load below is checked, and
    // only the branch this kernel's BTF allows is.
    if k.known == 0 {
        return Err(-2);
    }
    if k.ctxt_typed != 0 {
        let ctxt = vcpu.ptr(k.vcpu_emulate_ctxt)?;
        return Ok((ctxt.field(k.ctxt_opcode_len)?, ctxt.field(k.ctxt_b)?, ctxt.addr()));
    }
    // `emulate_ctxt` points to a forward declaration in this BTF: the verifier lets no program
    // load through it, so the context is read with the helper; `opcode_len` and `b` sit side
    // by side in every kernel seen, one read for both.
    let ctxt = Raw(vcpu.field::<u64>(k.vcpu_emulate_ctxt)?);
    if k.ctxt_b == k.ctxt_opcode_len + 1 {
        let [len, b] = ctxt.field::<[u8; 2]>(k.ctxt_opcode_len)?;
        return Ok((len, b, ctxt.0));
    }
    Ok((ctxt.field(k.ctxt_opcode_len)?, ctxt.field(k.ctxt_b)?, ctxt.0))
}

/// The vCPU of an emulator context (`ctxt->vcpu`, a `void *`; 0 where it cannot be read).
#[inline(always)]
pub fn ctxt_vcpu(ctxt: u64) -> Raw {
    if config().kvm.known == 0 {
        return Raw(0);
    }
    Raw(kread::<u64>(ctxt + u64::from(config().kvm.ctxt_vcpu)).unwrap_or(0))
}

/// The vCPU's id (`vcpu->vcpu_id`), or VCPU_UNKNOWN.
#[inline(always)]
fn vcpu_id<P: Kptr>(vcpu: P) -> u32 {
    if config().kvm.known == 0 {
        return VCPU_UNKNOWN;
    }
    vcpu.field::<i32>(config().kvm.vcpu_id).map_or(VCPU_UNKNOWN, |id| id as u32)
}

/// Where the handlers count (`Control::handlers_count`, KVM's layout known): one guest
/// instruction on `path`, of the VM whose vCPU thread this is. The two WBINVD handlers are
/// disjoint (an exit is handled by `kvm_emulate_wbinvd`, an emulated WBINVD by
/// `emulator_wbinvd`), so each guest WBINVD is counted once, whatever else the vCPU does; no
/// program runs on any other exit.
///
/// On SVM without NRIP save KVM skips the instruction by decoding it in its emulator, so
/// `vcpu->arch.emulate_ctxt` then holds this very instruction: its opcode decides (an
/// emulator may report INVD with the WBINVD exit code; KVM then runs this handler for it).
#[inline(always)]
fn handler_counts<P: Kptr>(me: ProcKey, vcpu: P, path: Path) {
    let ctl = control();
    if ctl.handlers_count == 0 {
        return;
    }
    if vcpu.addr() == 0 {
        stat_inc(Stat::ReadErrors);
    }
    let mut op = Op::Wbinvd;
    if path == Path::Exit && ctl.skip_emulation != 0 {
        match decoded_insn(vcpu) {
            Ok((len, b, _)) => op = classify_decoded(len, b).unwrap_or(Op::Wbinvd),
            Err(_) => stat_inc(Stat::ReadErrors),
        }
    }
    count(me, vcpu_id(vcpu), op, path);
}

/// A WBINVD handler starts with this vCPU (fentry), where the handlers count: if the VM has
/// non-coherent DMA (`kvm->arch.noncoherent_dma_count`, what KVM itself tests) the WBINVD
/// really flushes, and it reaches every CPU of `vcpu->arch.wbinvd_dirty_mask` plus this one
/// (KVM adds the current CPU, flushes, then clears the mask). Read here, before KVM clears
/// it: no program on the kernel's generic cross-CPU call path.
#[inline(always)]
pub fn handler_entered<P: Kptr>(me: ProcKey, vcpu: P, vcpu_addr: impl FnOnce() -> u64) {
    let k = &config().kvm;
    if control().handlers_count == 0 || k.known == 0 {
        return;
    }
    let Ok(kvm) = vcpu.ptr(k.vcpu_kvm) else {
        stat_inc(Stat::ReadErrors);
        return;
    };
    match kvm.field::<i32>(k.kvm_noncoherent) {
        Ok(0) => return,
        Ok(_) => {}
        Err(_) => {
            stat_inc(Stat::ReadErrors);
            return;
        }
    }
    count(me, vcpu_id(vcpu), Op::Wbinvd, Path::Flushed);
    // The mask's words are read in a loop, at a variable offset: from the vCPU's address as a
    // number (never a BTF-typed pointer, which the verifier lets move by constants only).
    let field = vcpu_addr().wrapping_add(u64::from(k.vcpu_dirty_mask));
    let mask = if k.dirty_mask_is_ptr != 0 { kread::<u64>(field).unwrap_or(0) } else { field };
    if mask == 0 {
        stat_inc(Stat::ReadErrors);
        return;
    }
    cost::record_flush_cpus(mask as *const u64, cost::OwnCpu::Add);
}

/// fentry kvm_emulate_invd(struct kvm_vcpu *vcpu) -> int (6.1+): an INVD exit, where the
/// handlers count (KVM only skips INVD: it costs the host nothing).
#[fentry(function = "kvm_emulate_invd")]
pub fn ioasid_fentry_kvm_emulate_invd(ctx: FEntryContext) -> i32 {
    if control().handlers_count != 0 {
        count(me_btf(), vcpu_id(Btf(ctx.arg(0))), Op::Invd, Path::Exit);
    }
    0
}

/// fexit handle_fastpath_invd(struct kvm_vcpu *vcpu) -> fastpath_t (~6.18+): an INVD exit
/// handled on the fastpath, without kvm_emulate_invd; EXIT_FASTPATH_NONE (0) would send it to
/// the full handler, which counts it there.
#[fexit(function = "handle_fastpath_invd")]
pub fn ioasid_fexit_handle_fastpath_invd(ctx: FExitContext) -> i32 {
    let ret: u32 = ctx.arg(1);
    if control().handlers_count != 0 && ret != 0 {
        count(me_btf(), vcpu_id(Btf(ctx.arg(0))), Op::Invd, Path::Exit);
    }
    0
}

/// A WBINVD of a VM known to be non-coherent really flushed the caches of every CPU its vCPU
/// ran on: count it. At most two hash lookups per WBINVD (not per exit).
#[inline(always)]
fn count_flush(me: ProcKey, vcpu: u32) {
    if is_noncoherent(&me) {
        count(me, vcpu, Op::Wbinvd, Path::Flushed);
    }
}
