//! The kernel boundary, and the only users of aya: loading and attaching the programs
//! (`loader`, `btf`, `tracefs`), the ring readers (`ring`) and their decoder (`decode`), and
//! [`BpfKernel`], which owns the loaded object (dropping it detaches every program) and every
//! map handle and implements the engine's ports ([`Kernel`], [`AskGate`]) over them.

pub mod btf;
pub mod decode;
mod known;
pub mod loader;
pub mod ring;
pub mod tracefs;

use std::collections::{HashMap, HashSet};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use ioasid_common::{
    cost::{CostKey, Pending, COST_BUCKETS_NS, COST_SUM, FLUSH_CPUS_LEN},
    counters::{CounterKey, Op, Path, STATS_LEN},
    events::Coherency,
    names::*,
    verdict::{Asked, FdKey, ProcKey, VmVerdict},
};
use known::{Known, Lookup};

use crate::{
    engine::{
        accounting::{CostHist, Totals},
        ports::{AskGate, FlushCpus, Kernel, MapError, ProgramStats, Stats},
    },
    host::{pidfd::Pidfd, procfs::ProcFs, sys::Signal},
    kernel::loader::{LoadError, Loaded},
};

pub struct BpfKernel {
    counters: PerCpuHashMap<MapData, CounterKey, u64>,
    cost: PerCpuHashMap<MapData, CostKey, u64>,
    stats: PerCpuArray<MapData, u64>,
    flush_cpus: PerCpuArray<MapData, u64>,
    verdicts: BpfHashMap<MapData, u32, VmVerdict>,
    kvm_devices: BpfHashMap<MapData, FdKey, u32>,
    asked: BpfHashMap<MapData, u32, Asked>,
    noncoherent: BpfHashMap<MapData, u32, u64>,
    noncoherent_kvm: BpfHashMap<MapData, ProcKey, u64>,
    file_coherency: BpfHashMap<MapData, FdKey, u32>,
    cmdlines: BpfHashMap<MapData, u32, ioasid_common::events::Cmdline>,
    blast: PerCpuHashMap<MapData, ioasid_common::cost::BlastKey, u64>,
    /// Thread id -> its WBINVD timing entry, kept by the programs between WBINVDs.
    pending: BpfHashMap<MapData, u32, Pending>,
    /// How many keys were added to each swept map (`MAP_KEYS_GEN`; None: every read walks).
    keys_gen: Option<Array<MapData, u64>>,
    /// The swept maps' keys as of their last walk (see `known`).
    known: KnownKeys,
    /// (hook label, program name) of attached hooks.
    stats_hooks: Vec<(&'static str, &'static str)>,
    /// BPF run-time statistics are on: runs and run time are exported too.
    stats_on: bool,
    /// The file filter's view of the loaded modules (None: the filter is off).
    modules: Option<ModulesSeen>,
    /// The LSM program beside the functions family, attached while the policy has a deny.
    lsm_switch: Option<loader::LsmSwitch>,
    /// Hooks waiting for their module, and the modules last seen for them.
    late: Vec<loader::HookReport>,
    late_seen: ModulesSeen,
    /// What the control map holds.
    control: ioasid_common::config::Control,
    /// The programs key per-process state by pid and start (else by pid alone: starts are 0).
    starts_keyed: bool,
    // Dropping the object detaches every program: it lives as long as this value.
    ebpf: aya::Ebpf,
}

/// When the loaded modules were last looked at, and what they were.
struct ModulesSeen {
    fingerprint: u64,
    at: std::time::Instant,
}

fn modules_fingerprint() -> u64 {
    loader::modules_fingerprint(&std::fs::read_to_string("/proc/modules").unwrap_or_default())
}

fn take<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    T::try_from(map).map_err(|source| LoadError::Map { name, source })
}

/// The entries a map's walk yields up to its first error (logged, not failed: once per sweep),
/// and whether it went to the end.
fn walk<K, V>(
    map: &'static str,
    iter: impl Iterator<Item = Result<(K, V), aya::maps::MapError>>,
) -> (Vec<(K, V)>, bool) {
    let mut complete = true;
    let entries = iter
        .map_while(|item| match item {
            Ok(kv) => Some(kv),
            Err(e) => {
                tracing::warn!(map, error = %e, "reading a kernel map");
                complete = false;
                None
            }
        })
        .collect();
    (entries, complete)
}

/// Whether the kernel holds an open ask for a process: a second fd of the asks map, for the
/// duty-cycle threads (which must never continue a VMM stopped to ask).
pub struct AskMapGate(std::os::fd::OwnedFd);

impl AskMapGate {
    /// A gate over an asks map fd this process was handed (the duty cycle's guard).
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> Self {
        AskMapGate(fd)
    }
}

impl AskGate for AskMapGate {
    fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        Some(self.0.as_fd())
    }

    fn asked(&self, pid: u32) -> bool {
        use std::os::fd::AsRawFd;
        let mut value = [0u8; std::mem::size_of::<Asked>()];
        // union bpf_attr for BPF_MAP_LOOKUP_ELEM: map_fd (u32, padded), key, value, flags.
        let mut attr: [u64; 4] =
            [self.0.as_raw_fd() as u64, &pid as *const u32 as u64, value.as_mut_ptr() as u64, 0];
        // An error other than "no such key" counts as asked: never continue on a doubt.
        const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
        match crate::host::sys::bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => true,
            Err(e) => e.raw_os_error() != Some(libc::ENOENT),
        }
    }
}

/// The kernel's two event rings: everything, and FILE_ADD/DEL only (decisions).
pub struct Rings {
    pub events: RingBuf<MapData>,
    pub decisions: RingBuf<MapData>,
}

impl BpfKernel {
    /// Takes the maps out of a loaded object. Returns the ring buffers separately: their readers
    /// runs in its own task.
    pub fn new(mut loaded: Loaded, stats_on: bool) -> Result<(Self, Rings), LoadError> {
        let e = &mut loaded.ebpf;
        let rings =
            Rings { events: take(e, MAP_EVENTS)?, decisions: take(e, ioasid_common::names::MAP_DECISIONS)? };
        // The LSM program beside the functions family counts while attached, from a reload on.
        let switchable = |h: &loader::HookReport| {
            loaded.lsm_switch.is_some() && h.spec.hook == ioasid_common::hooks::HOOK_LSM_FILE_IOCTL
        };
        let stats_hooks = loaded
            .hooks
            .iter()
            .filter(|h| h.attached() || switchable(h))
            .map(|h| (h.spec.hook, h.program))
            .collect();
        let k = Self {
            counters: take(e, MAP_COUNTERS)?,
            cost: take(e, MAP_COST)?,
            stats: take(e, MAP_STATS)?,
            flush_cpus: take(e, MAP_FLUSH_CPUS)?,
            verdicts: take(e, MAP_VM_POLICY)?,
            kvm_devices: take(e, MAP_KVM_DEVICES)?,
            asked: take(e, MAP_ASKED)?,
            noncoherent: take(e, MAP_NONCOHERENT)?,
            noncoherent_kvm: take(e, MAP_NONCOHERENT_KVM)?,
            file_coherency: take(e, MAP_FILE_COHERENCY)?,
            cmdlines: take(e, ioasid_common::names::MAP_CMDLINES)?,
            blast: take(e, ioasid_common::names::MAP_BLAST)?,
            pending: take(e, MAP_PENDING)?,
            keys_gen: match take(e, MAP_KEYS_GEN) {
                Ok(m) => Some(m),
                Err(err) => {
                    tracing::warn!(error = %err, "every sweep walks the kernel's hash maps");
                    None
                }
            },
            known: KnownKeys::default(),
            stats_hooks,
            stats_on,
            modules: (loaded.file_filter == loader::FileFilter::On)
                .then(|| ModulesSeen { fingerprint: modules_fingerprint(), at: std::time::Instant::now() }),
            lsm_switch: loaded.lsm_switch,
            late: loaded.late,
            late_seen: ModulesSeen { fingerprint: modules_fingerprint(), at: std::time::Instant::now() },
            control: loaded.control,
            starts_keyed: loaded.starts_keyed,
            ebpf: loaded.ebpf,
        };
        Ok((k, rings))
    }

    /// The object, for the aya-log reader.
    pub fn ebpf_mut(&mut self) -> &mut aya::Ebpf {
        &mut self.ebpf
    }
}

impl BpfKernel {
    /// A process's start as the programs key it: 0 where they key by pid alone.
    fn keyed(&self, start: u64) -> u64 {
        if self.starts_keyed {
            start
        } else {
            0
        }
    }
}

/// The keys of each swept hash map as of its last walk.
#[derive(Default)]
struct KnownKeys {
    counters: Known<CounterKey>,
    cost: Known<CostKey>,
    blast: Known<ioasid_common::cost::BlastKey>,
    noncoherent_kvm: Known<ProcKey>,
    asked: Known<u32>,
    /// Written by the agent only: its own count of the keys it added (a new agent walks once).
    noncoherent: Known<u32>,
    noncoherent_added: u64,
}

/// Every entry of a per-CPU counter map, each summed over the CPUs (wrapping): by lookup of the
/// keys known while none was added (`gen`), else by a walk.
fn read_per_cpu<K: aya::Pod + Copy>(
    name: &'static str,
    map: &PerCpuHashMap<MapData, K, u64>,
    known: &mut Known<K>,
    gen: Option<u64>,
) -> Vec<(K, u64)> {
    // Wrapping: a correction may subtract on another CPU than the count it corrects.
    let sum = |values: aya::maps::PerCpuValues<u64>| values.iter().fold(0u64, |a, v| a.wrapping_add(*v));
    known.read(
        gen,
        || {
            let (entries, complete) = walk(name, map.iter());
            (entries.into_iter().map(|(k, v)| (k, sum(v))).collect(), complete)
        },
        |k| lookup(name, map.get(k, 0).map(sum)),
    )
}

/// Every entry of a hash map: as [`read_per_cpu`].
fn read_hash<K: aya::Pod + Copy, V: aya::Pod>(
    name: &'static str,
    map: &BpfHashMap<MapData, K, V>,
    known: &mut Known<K>,
    gen: Option<u64>,
) -> Vec<(K, V)> {
    known.read(gen, || walk(name, map.iter()), |k| lookup(name, map.get(k, 0)))
}

/// One known key's lookup, as [`Known::read`] takes it.
fn lookup<V>(name: &'static str, got: Result<V, aya::maps::MapError>) -> Lookup<V> {
    match got {
        Ok(v) => Lookup::Found(v),
        Err(aya::maps::MapError::KeyNotFound) => Lookup::Gone,
        Err(e) => {
            tracing::warn!(map = name, error = %e, "reading a kernel map");
            Lookup::Failed
        }
    }
}

impl BpfKernel {
    /// How many keys were added to the map of `slot` so far (None: unknown, walk it).
    fn keys_added(&self, slot: u32) -> Option<u64> {
        self.keys_gen.as_ref()?.get(&slot, 0).ok()
    }
}

impl Kernel for BpfKernel {
    fn counters(&mut self) -> HashMap<(u32, u64), Totals> {
        let mut out: HashMap<(u32, u64), Totals> = HashMap::new();
        let gen = self.keys_added(KEYS_GEN_COUNTERS);
        for (k, sum) in read_per_cpu(MAP_COUNTERS, &self.counters, &mut self.known.counters, gen) {
            // Only the programs write this map, from typed values: anything else is skipped.
            let (Ok(op), Ok(path)) = (Op::try_from(k.op), Path::try_from(k.path)) else { continue };
            *out.entry((k.tgid, k.start)).or_default().entry((op, path)).or_insert(0) += sum;
        }
        out
    }

    fn cost(&mut self) -> HashMap<(u32, u64), CostHist> {
        let mut out: HashMap<(u32, u64), CostHist> = HashMap::new();
        let gen = self.keys_added(KEYS_GEN_COST);
        for (k, sum) in read_per_cpu(MAP_COST, &self.cost, &mut self.known.cost, gen) {
            let h = out.entry((k.tgid, k.start)).or_default();
            match h.buckets.get_mut(k.bucket as usize) {
                Some(b) => *b += sum,
                None if k.bucket == COST_SUM => h.sum_ns += sum,
                None => {}
            }
        }
        out
    }

    fn flush_cpus(&mut self) -> FlushCpus {
        let mut snap = [0u64; FLUSH_CPUS_LEN as usize];
        for (i, slot) in snap.iter_mut().enumerate() {
            if let Ok(v) = self.flush_cpus.get(&(i as u32), 0) {
                *slot = v.iter().sum();
            }
        }
        snap
    }

    fn stats(&mut self) -> Stats {
        let mut out = [0u64; STATS_LEN as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(v) = self.stats.get(&(i as u32), 0) {
                *slot = v.iter().sum();
            }
        }
        out
    }

    fn noncoherent(&mut self) -> HashSet<(u32, u64)> {
        let gen = self.keys_added(KEYS_GEN_NONCOHERENT_KVM);
        let kvm = read_hash(MAP_NONCOHERENT_KVM, &self.noncoherent_kvm, &mut self.known.noncoherent_kvm, gen);
        let ours = Some(self.known.noncoherent_added);
        let agent = read_hash(MAP_NONCOHERENT, &self.noncoherent, &mut self.known.noncoherent, ours);
        kvm.into_iter().map(|(k, _)| (k.tgid, k.start)).chain(agent).collect()
    }

    fn mark_noncoherent(&mut self, tgid: u32, start: u64) -> Result<(), MapError> {
        let start = self.keyed(start);
        // Counted first: a key added is never missed, whatever the insert's outcome.
        self.known.noncoherent_added += 1;
        self.noncoherent
            .insert(tgid, start, 0)
            .map_err(|source| MapError { map: MAP_NONCOHERENT, source: source.into() })
    }

    fn unmark_noncoherent(&mut self, tgid: u32) {
        let _ = self.noncoherent.remove(&tgid);
    }

    fn set_verdict(&mut self, tgid: u32, mut verdict: VmVerdict) -> Result<(), MapError> {
        verdict.start = self.keyed(verdict.start);
        self.verdicts
            .insert(tgid, verdict, 0)
            .map_err(|source| MapError { map: MAP_VM_POLICY, source: source.into() })
    }

    fn set_file_coherency(&mut self, tgid: u32, start: u64, fd: i32, c: Coherency) -> Result<(), MapError> {
        let key = FdKey { tgid, fd: fd as u32, start: self.keyed(start) };
        self.file_coherency
            .insert(key, c.wire(), 0)
            .map_err(|source| MapError { map: MAP_FILE_COHERENCY, source: source.into() })
    }

    fn asks(&mut self) -> Vec<(u32, Asked)> {
        let gen = self.keys_added(KEYS_GEN_ASKED);
        read_hash(MAP_ASKED, &self.asked, &mut self.known.asked, gen)
    }

    fn take_ask(&mut self, tgid: u32, ktime_ns: u64) -> bool {
        match self.asked.get(&tgid, 0) {
            Ok(a) if a.ktime_ns == ktime_ns => self.asked.remove(&tgid).is_ok(),
            _ => false,
        }
    }

    fn forget(&mut self, tgid: u32, start: u64) {
        let start = self.keyed(start);
        let keys: Vec<CounterKey> = self
            .counters
            .keys()
            .map_while(Result::ok)
            .filter(|k| k.tgid == tgid && k.start == start)
            .collect();
        for k in keys {
            let _ = self.counters.remove(&k);
        }
        for bucket in (0..=COST_BUCKETS_NS.len() as u32).chain([COST_SUM]) {
            let _ = self.cost.remove(&CostKey { tgid, bucket, start });
        }
        // The pid-keyed entries only while they are still this process's: a process on the
        // reused pid keeps its own.
        if self.verdicts.get(&tgid, 0).is_ok_and(|v| v.start == start) {
            let _ = self.verdicts.remove(&tgid);
        }
        if self.cmdlines.get(&tgid, 0).is_ok_and(|c| c.start == start) {
            let _ = self.cmdlines.remove(&tgid);
        }
        if self.noncoherent.get(&tgid, 0).is_ok_and(|s| s == start) {
            let _ = self.noncoherent.remove(&tgid);
        }
        let _ = self.noncoherent_kvm.remove(&ProcKey { tgid, _pad: 0, start });
        // Its threads' WBINVD timing entries (the programs keep one per thread, idle between
        // WBINVDs). A thread of another process on a reused thread id rewrites its entry with
        // its own process, so it is not matched here.
        let threads: Vec<u32> = self
            .pending
            .iter()
            .map_while(Result::ok)
            .filter(|(_, p)| p.tgid == tgid && p.start == start)
            .map(|(tid, _)| tid)
            .collect();
        for tid in threads {
            let _ = self.pending.remove(&tid);
        }
        for map in [&mut self.kvm_devices, &mut self.file_coherency] {
            let fds: Vec<FdKey> =
                map.keys().map_while(Result::ok).filter(|k| k.tgid == tgid && k.start == start).collect();
            for k in fds {
                let _ = map.remove(&k);
            }
        }
        let blast: Vec<_> = self
            .blast
            .keys()
            .map_while(Result::ok)
            .filter(|k| k.flusher_tgid == tgid || k.victim_tgid == tgid)
            .collect();
        self.forget_blast(&blast);
    }

    fn blast(&mut self) -> Vec<(ioasid_common::cost::BlastKey, u64)> {
        let gen = self.keys_added(KEYS_GEN_BLAST);
        read_per_cpu(MAP_BLAST, &self.blast, &mut self.known.blast, gen)
    }

    fn forget_blast(&mut self, keys: &[ioasid_common::cost::BlastKey]) {
        for k in keys {
            let _ = self.blast.remove(k);
        }
    }

    fn cmdline(&self, tgid: u32) -> Option<(Vec<u8>, u64)> {
        let c = self.cmdlines.get(&tgid, 0).ok()?;
        let len = (c.len as usize).min(c.bytes.len());
        Some((c.bytes[..len].to_vec(), c.start))
    }

    fn program_stats(&self) -> Vec<ProgramStats> {
        self.stats_hooks
            .iter()
            .filter_map(|(hook, program)| {
                let info = self.ebpf.program(program)?.info().ok()?;
                Some(ProgramStats {
                    hook,
                    runs: self.stats_on.then(|| info.run_count()),
                    run_seconds: self.stats_on.then(|| info.run_time().as_secs_f64()),
                    misses: info.recursion_misses(),
                })
            })
            .collect()
    }

    fn set_lsm_deny(&mut self, on: bool) -> Option<Result<bool, String>> {
        let switch = self.lsm_switch.as_mut()?;
        Some(loader::set_lsm_deny(&mut self.ebpf, switch, &mut self.control, on).map_err(|e| e.to_string()))
    }

    fn signal(&mut self, pid: u32, start_time: u64, sig: Signal) -> std::io::Result<()> {
        let fd = Pidfd::open(&ProcFs::default(), pid, start_time)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ESRCH))?;
        fd.signal(sig)
    }

    fn attach_late(&mut self) -> Vec<&'static str> {
        if self.late.is_empty() || self.late_seen.at.elapsed() < std::time::Duration::from_secs(1) {
            return Vec::new();
        }
        self.late_seen.at = std::time::Instant::now();
        let now = modules_fingerprint();
        if now == self.late_seen.fingerprint {
            return Vec::new();
        }
        self.late_seen.fingerprint = now;
        let attached = loader::attach_late(&mut self.ebpf, &mut self.late);
        for hook in &attached {
            tracing::info!(hook, "a module loaded: hook attached");
        }
        attached
    }

    fn refresh_file_filter(&mut self) {
        let Some(seen) = self.modules.as_mut() else { return };
        if seen.at.elapsed() < std::time::Duration::from_secs(1) {
            return;
        }
        seen.at = std::time::Instant::now();
        let now = modules_fingerprint();
        if now == seen.fingerprint {
            return;
        }
        let written = std::fs::read_to_string("/proc/kallsyms")
            .map_err(anyhow::Error::from)
            .and_then(|t| Ok(loader::ioctl_fns(&t)?))
            .and_then(|f| Ok(loader::write_ioctl_fns(&mut self.ebpf, &f)?));
        match written {
            Ok(()) => {
                seen.fingerprint = now;
                tracing::info!(
                    "modules changed: the KVM/VFIO/iommufd ioctl functions' addresses are updated"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "modules changed, but the ioctl functions' addresses could not be updated (retried)")
            }
        }
    }
}

impl BpfKernel {
    /// A gate on the asks map for other threads.
    pub fn ask_gate(&self) -> std::io::Result<AskMapGate> {
        use aya::maps::IterableMap as _;
        use std::os::fd::AsFd;
        Ok(AskMapGate(self.asked.map().fd().as_fd().try_clone_to_owned()?))
    }
}
