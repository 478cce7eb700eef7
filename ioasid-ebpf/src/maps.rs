//! Every map of the object, and the load-time configuration global.
//!
//! Names are the `MAP_*` constants of ioasid-common (the symbol name is the map name).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    Global,
};
use ioasid_common::{
    config::{Control, ProgConfig},
    cost::{CostKey, Pending, FLUSH_CPUS_LEN},
    counters::{CounterKey, ExitMark, Stat, STATS_LEN},
    events::{Cmdline, IoctlEvent},
    names::{
        CMDLINES_MAX_ENTRIES, COST_MAX_ENTRIES, COUNTERS_MAX_ENTRIES, DECISIONS_RING_BYTES,
        EVENTS_RING_BYTES, INFLIGHT_MAX_ENTRIES, KVM_DEVICES_MAX_ENTRIES, VM_POLICY_MAX_ENTRIES,
    },
    verdict::{Asked, FdKey, ProcKey, VmVerdict},
};

/// Exact counts. Per-CPU so the hot path never contends; the agent sums the CPUs.
#[map]
pub static IOASID_COUNTERS: PerCpuHashMap<CounterKey, u64> =
    PerCpuHashMap::with_max_entries(COUNTERS_MAX_ENTRIES, 0);

#[map]
pub static IOASID_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

#[map]
pub static IOASID_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// See `MAP_FLUSH_TARGETS`.
#[map]
pub static IOASID_FLUSH_TARGETS: Array<ioasid_common::cost::FlushMark> =
    Array::with_max_entries(ioasid_common::cost::BLAST_MAX_CPUS, 0);

/// See `MAP_IPI_START`.
#[map]
pub static IOASID_IPI_START: PerCpuArray<ioasid_common::cost::IpiStart> = PerCpuArray::with_max_entries(1, 0);

/// See `MAP_BLAST`.
#[map]
pub static IOASID_BLAST: PerCpuHashMap<ioasid_common::cost::BlastKey, u64> =
    PerCpuHashMap::with_max_entries(ioasid_common::names::BLAST_MAX_ENTRIES, 0);

/// Addresses of the watched ioctl functions (see `MAP_IOCTL_FNS`). Written by the agent only.
#[map]
pub static IOASID_IOCTL_FNS: Array<u64> =
    Array::with_max_entries(ioasid_common::config::WATCHED_IOCTL_FNS_LEN as u32, 0);

/// FILE_ADD/DEL events only (see `MAP_DECISIONS`).
#[map]
pub static IOASID_DECISIONS: RingBuf = RingBuf::with_byte_size(DECISIONS_RING_BYTES, 0);

/// Written by the agent only.
#[map]
pub static IOASID_VM_POLICY: HashMap<u32, VmVerdict> = HashMap::with_max_entries(VM_POLICY_MAX_ENTRIES, 0);

/// (tgid, fd) -> the coherency of the VFIO file behind it, resolved by the agent.
#[map]
pub static IOASID_FILE_COHERENCY: HashMap<FdKey, u32> = HashMap::with_max_entries(KVM_DEVICES_MAX_ENTRIES, 0);

/// (tgid, fd) -> KVM device type, from KVM_CREATE_DEVICE's sys_exit.
#[map]
pub static IOASID_KVM_DEVICES: HashMap<FdKey, u32> = HashMap::with_max_entries(KVM_DEVICES_MAX_ENTRIES, 0);

/// tgid -> when and why the kernel stopped it to ask the agent.
#[map]
pub static IOASID_ASKED: HashMap<u32, Asked> = HashMap::with_max_entries(INFLIGHT_MAX_ENTRIES, 0);

/// Thread id -> the watched ioctl it is in, between sys_enter and sys_exit.
#[map]
pub static IOASID_INFLIGHT: HashMap<u32, IoctlEvent> = HashMap::with_max_entries(INFLIGHT_MAX_ENTRIES, 0);

/// Watched ioctls in flight, host-wide (see `MAP_INFLIGHT_COUNT`).
#[map]
pub static IOASID_INFLIGHT_COUNT: Array<u64> = Array::with_max_entries(1, 0);

/// Adds `delta` to a map value shared by all CPUs, atomically.
#[inline(always)]
fn atomic_add(p: *mut u64, delta: i64) {
    // The bpfel target has no Rust atomics; BPF's own atomic add (BPF_XADD) is exact across
    // CPUs. SAFETY: callers pass a pointer to an 8-byte aligned map value.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({p} + 0) += {d}",
            p = in(reg) p,
            d = in(reg) delta,
            options(nostack),
        )
    };
}

/// Adds to a one-element host-wide counter (in-flight ioctls, pending WBINVDs).
#[inline(always)]
fn shared_add(counter: &Array<u64>, delta: i64) {
    shared_add_at(counter, 0, delta);
}

/// Adds to element `i` of an array of host-wide counters.
#[inline(always)]
fn shared_add_at(counter: &Array<u64>, i: u32, delta: i64) {
    if let Some(p) = counter.get_ptr_mut(i) {
        atomic_add(p, delta);
    }
}

/// True while a one-element host-wide counter is zero: one inlined array read.
#[inline(always)]
fn shared_zero(counter: &Array<u64>) -> bool {
    counter.get(0).is_none_or(|n| *n == 0)
}

#[inline(always)]
pub fn inflight_add(delta: i64) {
    shared_add(&IOASID_INFLIGHT_COUNT, delta);
}

#[inline(always)]
pub fn inflight_none() -> bool {
    shared_zero(&IOASID_INFLIGHT_COUNT)
}

/// tgid -> the command line it had at KVM_CREATE_VM, with its start (LRU: bounded whatever the churn).
#[map]
pub static IOASID_CMDLINES: LruHashMap<u32, Cmdline> = LruHashMap::with_max_entries(CMDLINES_MAX_ENTRIES, 0);

/// The capture's per-CPU scratch (a Cmdline is too big for the BPF stack).
#[map]
pub static IOASID_CMDLINE_SCRATCH: PerCpuArray<Cmdline> = PerCpuArray::with_max_entries(1, 0);

/// WBINVD handler time histogram and sum per VM.
#[map]
pub static IOASID_COST: PerCpuHashMap<CostKey, u64> = PerCpuHashMap::with_max_entries(COST_MAX_ENTRIES, 0);

/// Thread id -> WBINVD being handled.
#[map]
pub static IOASID_PENDING: HashMap<u32, Pending> = HashMap::with_max_entries(INFLIGHT_MAX_ENTRIES, 0);

#[map]
pub static IOASID_PENDING_COUNT: Array<u64> = Array::with_max_entries(1, 0);

/// tgid -> the start of the VMM the agent found non-coherent (see `MAP_NONCOHERENT`). Written
/// by the agent only.
#[map]
pub static IOASID_NONCOHERENT: HashMap<u32, u64> = HashMap::with_max_entries(VM_POLICY_MAX_ENTRIES, 0);

/// Process -> KVM's non-coherent DMA registrations minus unregistrations (fentry). Written by
/// the kernel programs only, so the count is never overwritten by the agent's flag.
#[map]
pub static IOASID_NONCOHERENT_KVM: HashMap<ProcKey, u64> =
    HashMap::with_max_entries(VM_POLICY_MAX_ENTRIES, 0);

/// True if the VMM has non-coherent DMA, by KVM's own count or the agent's finding, for this
/// very process (not another one on its pid).
#[inline(always)]
pub fn is_noncoherent(me: &ProcKey) -> bool {
    IOASID_NONCOHERENT_KVM.get_ptr(me).is_some()
        // SAFETY: pointer to a live map value, read once.
        || IOASID_NONCOHERENT.get_ptr(&me.tgid).is_some_and(|s| unsafe { *s } == me.start)
}

/// Adds `delta` to a registration count, atomically (creating it at 0 first). A count that
/// reaches zero is removed, so presence means "registered".
#[inline(always)]
pub fn noncoherent_kvm_add(me: &ProcKey, delta: i64) {
    if IOASID_NONCOHERENT_KVM.get_ptr(me).is_none() {
        if delta < 0 {
            return;
        }
        if IOASID_NONCOHERENT_KVM.insert(me, &0, BPF_NOEXIST as u64).is_ok() {
            key_added(ioasid_common::names::KEYS_GEN_NONCOHERENT_KVM);
        }
    }
    let Some(p) = IOASID_NONCOHERENT_KVM.get_ptr_mut(me) else {
        stat_inc(Stat::CounterMapFull);
        return;
    };
    atomic_add(p, delta);
    // SAFETY: live map value, read after our own atomic add.
    if unsafe { *p } == 0 {
        let _ = IOASID_NONCOHERENT_KVM.remove(me);
    }
}

#[map]
pub static IOASID_FLUSH_CPUS: PerCpuArray<u64> = PerCpuArray::with_max_entries(FLUSH_CPUS_LEN, 0);

#[inline(always)]
pub fn pending_add(delta: i64) {
    shared_add(&IOASID_PENDING_COUNT, delta);
}

#[inline(always)]
pub fn pending_none() -> bool {
    shared_zero(&IOASID_PENDING_COUNT)
}

/// Thread id -> its last WBINVD/INVD exit, where KVM emulates the instruction to skip it.
#[map]
pub static IOASID_EXIT_MARKS: HashMap<u32, ExitMark> = HashMap::with_max_entries(INFLIGHT_MAX_ENTRIES, 0);

#[map]
pub static IOASID_MARKS_COUNT: Array<u64> = Array::with_max_entries(1, 0);

/// Remembers this thread's WBINVD/INVD exit for the emulation that follows it. Returns the
/// mark it replaces, if the previous exit's emulation never came.
#[inline(always)]
pub fn mark_exit(tid: u32, mark: &ExitMark) -> Option<ExitMark> {
    if IOASID_EXIT_MARKS.insert(&tid, mark, BPF_NOEXIST as u64).is_ok() {
        shared_add(&IOASID_MARKS_COUNT, 1);
        return None;
    }
    // SAFETY: live map value, copied once.
    let stale = IOASID_EXIT_MARKS.get_ptr(&tid).map(|p| unsafe { *p });
    if IOASID_EXIT_MARKS.insert(&tid, mark, 0).is_err() {
        stat_inc(Stat::CounterMapFull);
    }
    stale
}

/// Takes the current thread's exit mark, if any. One array read while no thread has one.
#[inline(always)]
pub fn take_exit_mark() -> Option<ExitMark> {
    if shared_zero(&IOASID_MARKS_COUNT) {
        return None;
    }
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    // SAFETY: live map value, copied once.
    let mark = unsafe { *IOASID_EXIT_MARKS.get_ptr(&tid)? };
    if IOASID_EXIT_MARKS.remove(&tid).is_ok() {
        shared_add(&IOASID_MARKS_COUNT, -1);
    }
    Some(mark)
}

/// Enforcement switches, written by the agent after attaching.
#[map]
pub static IOASID_CONTROL: Array<Control> = Array::with_max_entries(1, 0);

#[inline(always)]
pub fn control() -> Control {
    IOASID_CONTROL.get(0).copied().unwrap_or(Control::OFF)
}

/// Tracepoint field offsets (from tracefs `format` files) and switches, set by the agent.
#[unsafe(no_mangle)]
pub static IOASID_CONFIG: Global<ProgConfig> = Global::new(ProgConfig::ZERO);

/// The load-time configuration, read in place: only the fields a program uses are loaded.
/// (`Global::load` copies all of it with a volatile read, some 60 loads per call, on every
/// emulated instruction and every WBINVD.) The pointer is passed through `black_box` so the
/// compiler cannot fold the fields to the zeros it was compiled with: the loader writes the
/// real values into the (frozen, read-only) map before the programs load.
#[inline(always)]
pub fn config() -> &'static ProgConfig {
    let p: *const ProgConfig = core::hint::black_box((&raw const IOASID_CONFIG).cast());
    // SAFETY: `Global<T>` is `repr(transparent)` over an initialised `T` that nothing writes
    // once the programs run.
    unsafe { &*p }
}

/// Adds one to a statistics slot (this CPU's).
///
/// Per-CPU slots are still written atomically: programs of different hooks do nest on one CPU
/// (the blast-radius programs on `wbinvd_ipi` run in the flush IPI and can interrupt a task-context
/// program between its read and its write of the same slot), and BPF's atomic add on an
/// uncontended per-CPU line costs a few cycles.
#[inline(always)]
pub fn stat_inc(stat: Stat) {
    if let Some(slot) = IOASID_STATS.get_ptr_mut(stat as u32) {
        atomic_add(slot, 1);
    }
}

/// How many times a key was added to each swept hash map (`names::MAP_KEYS_GEN`).
#[map]
pub static IOASID_KEYS_GEN: Array<u64> = Array::with_max_entries(ioasid_common::names::KEYS_GEN_LEN, 0);

/// A key was added to the map of `slot` (after the insert, so an agent that sees the count
/// unchanged knows every key there was when it last walked the map).
#[inline(always)]
pub fn key_added(slot: u32) {
    shared_add_at(&IOASID_KEYS_GEN, slot, 1);
}

/// Adds `v` to `key` in a per-CPU counter map, on this CPU, creating the key if needed (and
/// counting that in the keys generation `gen`). A full map is counted
/// (`Stat::CounterMapFull`): a count is never dropped silently.
#[inline(always)]
pub fn percpu_add<K>(map: &PerCpuHashMap<K, u64>, gen: u32, key: &K, v: u64) {
    if let Some(slot) = map.get_ptr_mut(key) {
        // This CPU's slot of a per-CPU hash element, added to atomically (see `stat_inc`: an
        // IPI-context program may interrupt us). Wrapping, and summed wrapping by the agent: a
        // counter never panics or saturates.
        atomic_add(slot, v as i64);
        return;
    }
    // First event for this key: create it with `v` on this CPU (0 on the others). A concurrent
    // insert of the same key on another CPU makes ours fail with EEXIST: add to it instead.
    if map.insert(key, v, BPF_NOEXIST as u64).is_ok() {
        key_added(gen);
        return;
    }
    match map.get_ptr_mut(key) {
        Some(slot) => atomic_add(slot, v as i64),
        None => stat_inc(Stat::CounterMapFull),
    }
}
