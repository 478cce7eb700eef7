//! WBINVD cost: handler-time histograms and the CPUs each flush reaches.

use core::mem::size_of;

/// Upper bounds (ns) of the handler-time histogram buckets: 1 us .. 100 ms. Index
/// `COST_BUCKETS_NS.len()` is +Inf.
pub const COST_BUCKETS_NS: [u64; 16] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
];
/// `CostKey::bucket` of the ns sum.
pub const COST_SUM: u32 = 0xffff;

/// Index of the first bound `v` does not exceed, else `bounds.len()` (+Inf). Bounded for the
/// verifier.
#[inline(always)]
pub fn bucket<T: Copy + PartialOrd, const N: usize>(v: T, bounds: &[T; N]) -> u32 {
    let mut i = 0;
    while i < N {
        if v <= bounds[i] {
            return i as u32;
        }
        i += 1;
    }
    N as u32
}

/// Histogram bucket of a handler time in ns.
#[inline(always)]
pub fn cost_bucket(ns: u64) -> u32 {
    bucket(ns, &COST_BUCKETS_NS)
}

/// Upper bounds of the flush-CPU-count buckets; index `FLUSH_CPU_BUCKETS.len()` is +Inf. A
/// flush can reach no CPU at all: 5.10's KVM never flushes the calling CPU, so a vCPU that
/// stayed on its CPU since its last WBINVD flushes nothing.
pub const FLUSH_CPU_BUCKETS: [u32; 10] = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256];
pub const FLUSH_CPUS_LEN: u32 = FLUSH_CPU_BUCKETS.len() as u32 + 1;

#[inline(always)]
pub fn flush_cpus_bucket(cpus: u32) -> u32 {
    bucket(cpus, &FLUSH_CPU_BUCKETS)
}

/// Key of [`crate::names::MAP_COST`]: a histogram bucket (or [`COST_SUM`]) of one VMM.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CostKey {
    pub tgid: u32,
    pub bucket: u32,
    /// The process's start (see [`crate::verdict::start_ticks`]).
    pub start: u64,
}
const _: () = assert!(size_of::<CostKey>() == 16);

/// Value of [`crate::names::MAP_PENDING`]: a thread's WBINVD timing. The programs keep a
/// thread's entry between WBINVDs (written in place, never deleted by them); the agent removes
/// a gone VMM's entries.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Pending {
    /// When the pending WBINVD started (ktime ns); 0 while the thread has none pending.
    pub start_ns: u64,
    pub tgid: u32,
    /// [`crate::counters::Path::Exit`] or [`crate::counters::Path::Emulated`].
    pub path: u32,
    /// The VMM's start (see [`crate::verdict::start_ticks`]).
    pub start: u64,
}
const _: () = assert!(size_of::<Pending>() == 24);

wire_enum! {
    /// `Control::cost_source`: which programs time WBINVD handling.
    pub enum CostSource {
        /// Tracepoint pairs: the WBINVD's record to the thread's next entry/instruction/exit.
        Tracepoints = 0 => "tracepoint-pairs",
        /// fentry/fexit on kvm_emulate_wbinvd and emulator_wbinvd: the exact handler time.
        Handlers = 1 => "handlers",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_buckets() {
        assert_eq!(cost_bucket(0), 0);
        assert_eq!(cost_bucket(1_000), 0);
        assert_eq!(cost_bucket(1_001), 1);
        assert_eq!(cost_bucket(99_999_999), 15);
        assert_eq!(cost_bucket(100_000_000), 15);
        assert_eq!(cost_bucket(100_000_001), 16);
        assert_eq!(cost_bucket(u64::MAX), 16);
        assert_eq!(flush_cpus_bucket(0), 0);
        assert_eq!(flush_cpus_bucket(1), 1);
        assert_eq!(flush_cpus_bucket(3), 3);
        assert_eq!(flush_cpus_bucket(256), 9);
        assert_eq!(flush_cpus_bucket(257), 10);
    }
}

/// Most CPUs a flush's targets are recorded for (the flusher marks each target CPU).
pub const BLAST_MAX_CPUS: u32 = 512;

/// Value of [`crate::names::MAP_FLUSH_TARGETS`] (indexed by target CPU): the flush that last
/// aimed at this CPU. Written by the flusher before its IPIs go out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushMark {
    pub flusher_tgid: u32,
    /// The flusher's own CPU (its flush runs there inline: not a victim's).
    pub flusher_cpu: u32,
    pub ktime_ns: u64,
}
const _: () = assert!(size_of::<FlushMark>() == 16);

/// Value of [`crate::names::MAP_IPI_START`] (per-CPU, one element): the flush IPI running on
/// this CPU, from fentry to fexit of wbinvd_ipi.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpiStart {
    pub start_ns: u64,
    pub flusher_tgid: u32,
    /// The task the IPI interrupted (0: the CPU was idle).
    pub victim_tgid: u32,
}
const _: () = assert!(size_of::<IpiStart>() == 16);

/// `BlastKey::kind`: flush IPIs counted, or the ns they took.
pub const BLAST_IPIS: u32 = 0;
pub const BLAST_NS: u32 = 1;

/// Key of [`crate::names::MAP_BLAST`]: who flushed whose CPU (victim 0: an idle CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlastKey {
    pub flusher_tgid: u32,
    pub victim_tgid: u32,
    /// [`BLAST_IPIS`] or [`BLAST_NS`].
    pub kind: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<BlastKey>() == 16);
