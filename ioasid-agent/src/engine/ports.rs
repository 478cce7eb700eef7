//! What the engine asks of the world below it, as traits: the kernel (counts, verdicts, asks,
//! signals) and the ask gate the duty cycle consults. `kernel::BpfKernel` implements them over
//! the loaded programs' maps; the actor's tests implement them with a fake. The engine names no
//! module of `kernel/`: the dependency points from the adapter to the port.

use std::collections::{HashMap, HashSet};

use ioasid_common::{
    cost::{BlastKey, FLUSH_CPUS_LEN},
    counters::STATS_LEN,
    events::Coherency,
    verdict::{Asked, VmVerdict},
};

use crate::{
    engine::accounting::{CostHist, Totals},
    host::sys::Signal,
};

/// Host-wide counters kept by the kernel programs, indexed by `Stat`.
pub type Stats = [u64; STATS_LEN as usize];
/// CPUs-per-flush histogram buckets.
pub type FlushCpus = [u64; FLUSH_CPUS_LEN as usize];

/// One attached program's in-kernel cost (with BPF run-time statistics on).
#[derive(Debug, Clone, PartialEq)]
pub struct ProgramStats {
    pub hook: &'static str,
    /// Runs and in-kernel time: only with BPF run-time statistics on (else None).
    pub runs: Option<u64>,
    pub run_seconds: Option<f64>,
    /// Runs the kernel skipped (recursion protection, a busy `bpf_prog_active`): always.
    pub misses: u64,
}

/// A kernel map refused a write.
#[derive(Debug, thiserror::Error)]
#[error("map {map}")]
pub struct MapError {
    pub map: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// What the event loop reads from and writes to the kernel.
pub trait Kernel {
    /// Exact WBINVD/INVD counts summed over CPUs and vCPUs, per process: (tgid, start as
    /// /proc gives it; 0 where the kernel keys by tgid alone).
    fn counters(&mut self) -> HashMap<(u32, u64), Totals>;
    /// Handler-time histograms summed over CPUs, per process (as `counters`).
    fn cost(&mut self) -> HashMap<(u32, u64), CostHist>;
    fn flush_cpus(&mut self) -> FlushCpus;
    fn stats(&mut self) -> Stats;
    /// VMMs with non-coherent DMA: KVM's own registrations, and those the agent marked, per
    /// process (as `counters`).
    fn noncoherent(&mut self) -> HashSet<(u32, u64)>;
    /// Marks the process (pid, start) non-coherent: never another one on its pid.
    fn mark_noncoherent(&mut self, tgid: u32, start: u64) -> Result<(), MapError>;
    /// Takes back the agent's mark (a VFIO file left the VM); KVM's own count is untouched.
    fn unmark_noncoherent(&mut self, tgid: u32);
    /// The process's verdict; the kernel applies it only to the process of `verdict.start`.
    fn set_verdict(&mut self, tgid: u32, verdict: VmVerdict) -> Result<(), MapError>;
    /// What the agent resolved for a VFIO file fd of process (pid, start), so a FILE_ADD of it
    /// is judged in the kernel.
    fn set_file_coherency(&mut self, tgid: u32, start: u64, fd: i32, c: Coherency) -> Result<(), MapError>;
    /// Processes the kernel stopped to ask the agent, with its record of the request.
    fn asks(&mut self) -> Vec<(u32, Asked)>;
    /// Takes the kernel's record of the ask made at `ktime_ns` by `tgid`, if it is still open:
    /// whoever takes it decides that request; anyone else must not decide it again.
    fn take_ask(&mut self, tgid: u32, ktime_ns: u64) -> bool;
    /// Removes everything kept for a process (pid, start) that exited, after its final counts
    /// were read; another process on the pid keeps its own.
    fn forget(&mut self, tgid: u32, start: u64);
    /// The command line `tgid` had when it created its VM (NUL-separated) and its start, if
    /// the kernel captured it.
    fn cmdline(&self, tgid: u32) -> Option<(Vec<u8>, u64)>;
    fn program_stats(&self) -> Vec<ProgramStats>;
    /// Sends `sig` to the process (pid, start time as /proc says) through a pidfd: to that
    /// process or to nobody (ESRCH), never to another one that reused the pid.
    fn signal(&mut self, pid: u32, start_time: u64, sig: Signal) -> std::io::Result<()>;
    /// Flush IPIs and their time by (flusher, victim), summed over CPUs (blast radius).
    fn blast(&mut self) -> Vec<(BlastKey, u64)> {
        Vec::new()
    }
    /// Drops blast-radius keys whose processes are gone (after their last totals were read).
    fn forget_blast(&mut self, _keys: &[BlastKey]) {}
    /// Keeps the file filter's function addresses current as modules load and unload (at most
    /// once a second; kallsyms is read only when /proc/modules changed).
    fn refresh_file_filter(&mut self) {}
    /// When a module was loaded since (at most once a second), attaches the hooks that were
    /// waiting for it; their labels.
    fn attach_late(&mut self) -> Vec<&'static str> {
        Vec::new()
    }
    /// Attaches (`on`) or detaches the program that refuses denied FILE_ADDs with EPERM, where
    /// it can come and go with the policy's denies (None: it cannot, the mechanism is fixed);
    /// whether it is attached now (Err: why it could not be, the signal then enforces).
    fn set_lsm_deny(&mut self, _on: bool) -> Option<Result<bool, String>> {
        None
    }
}

/// Tells whether the kernel has stopped a process to ask about an enable (the duty cycle must
/// not continue it). Shared with the duty-cycle threads.
pub trait AskGate: Send + Sync {
    fn asked(&self, pid: u32) -> bool;
    /// The asks map's fd, for a helper process to inherit (the duty cycle's guard).
    fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}
