//! Process and VM lifecycle.

use aya_ebpf::{
    macros::{fentry, kprobe, tracepoint},
    programs::{FEntryContext, ProbeContext, TracePointContext},
};
use ioasid_common::{
    counters::Stat,
    events::{EventKind, TransitionEvent},
};

use super::{current_ids, header, me};
use crate::maps::{noncoherent_kvm_add, stat_inc, IOASID_EVENTS, IOASID_VM_POLICY};

/// sched:sched_process_exec. After exec a process is someone else (new command line, new exe):
/// the verdict compiled from what it was no longer applies, so it is dropped and the next
/// FILE_ADD is judged afresh (stop-and-ask). One hash delete per exec on the host.
#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn ioasid_sched_exec(_ctx: TracePointContext) -> u32 {
    let (tgid, _) = current_ids();
    let _ = IOASID_VM_POLICY.remove(&tgid);
    0
}

/// fentry kvm_arch_register_noncoherent_dma(struct kvm *kvm): the VM really becomes
/// non-coherent (x86, all 6.x). Optional: needs trampolines.
#[fentry(function = "kvm_arch_register_noncoherent_dma")]
pub fn ioasid_fentry_register_noncoherent(ctx: FEntryContext) -> i32 {
    transition(ctx.arg(0), 1);
    0
}

/// fentry kvm_arch_unregister_noncoherent_dma(struct kvm *kvm). Optional: needs trampolines.
#[fentry(function = "kvm_arch_unregister_noncoherent_dma")]
pub fn ioasid_fentry_unregister_noncoherent(ctx: FEntryContext) -> i32 {
    transition(ctx.arg(0), 0);
    0
}

/// kprobe kvm_arch_register_noncoherent_dma: the fentry's twin where kvm has no BTF (5.10).
#[kprobe(function = "kvm_arch_register_noncoherent_dma")]
pub fn ioasid_kprobe_register_noncoherent(ctx: ProbeContext) -> u32 {
    transition(ctx.arg(0).unwrap_or(0), 1);
    0
}

/// kprobe kvm_arch_unregister_noncoherent_dma: likewise.
#[kprobe(function = "kvm_arch_unregister_noncoherent_dma")]
pub fn ioasid_kprobe_unregister_noncoherent(ctx: ProbeContext) -> u32 {
    transition(ctx.arg(0).unwrap_or(0), 0);
    0
}

/// `kvm` registers (1) or unregisters (0) non-coherent DMA: counted for its VMM, and an event.
#[inline(always)]
fn transition(kvm: u64, register: u32) {
    noncoherent_kvm_add(&me(), if register == 1 { 1 } else { -1 });
    let Some(mut entry) = IOASID_EVENTS.reserve::<TransitionEvent>(0) else {
        stat_inc(Stat::EventsDropped);
        return;
    };
    let (tgid, tid) = current_ids();
    entry.write(TransitionEvent {
        header: header(EventKind::Noncoherent, core::mem::size_of::<TransitionEvent>(), tgid, tid),
        kvm,
        register,
        _pad: 0,
    });
    entry.submit(0);
}
