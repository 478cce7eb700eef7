//! `action: throttle`: while a VM is over its WBINVD budget, limit its VMM's CPU so that its
//! WBINVD rate falls to the budget, and put back exactly what was there when the storm clears.
//!
//! - **Own cgroup** (the VMM is the only process of its cgroup, as under libvirt, KubeVirt or
//!   `systemd-run --scope`; for cgroup v2 the nearest domain cgroup, so libvirt's threaded vCPU
//!   sub-groups are included): cgroup v2 `cpu.max`, or cgroup v1 `cpu.cfs_quota_us` with
//!   `cpu.cfs_period_us` where that is what the host has. The exact previous contents are
//!   written to the state file before anything is changed, and written back on clear, on the
//!   VMM's exit, on agent exit, and by the next agent if this one died.
//! - **No cgroup of its own**: the agent never moves processes between cgroups. It throttles by
//!   duty cycle instead: within each 100 ms the VMM runs for the allowed share, then is stopped
//!   (SIGSTOP/SIGCONT through a pidfd: never another process that reused the pid). A VMM the
//!   kernel stopped to ask about an incoherent-DMA enable is never continued by the duty cycle.
//!
//! The controller: the allowed share of a CPU starts at 0.6 x budget / rate (one storming vCPU)
//! and is corrected by 0.6 x budget / (the rate measured since): down by up to 16x at a step,
//! up by at most 1.5x (x4 once no WBINVD is seen at all: the storm is over), and by half the
//! correction (in log terms) within [1/2, 2] of the aim. Multiplicative, so it settles in a few
//! steps from any start; it aims under the budget so that noise stays under it. The bandwidth
//! period is 100 ms, or 1 s under 1 % of a CPU (until over 5 % again): a quota is at least 1 ms,
//! and an emulated WBINVD costs a couple of microseconds, so a budget can need 0.1 % of a CPU.
//! The floor is 1 ms per second: where that runs more WBINVD than the budget, the rate settles
//! there. The rate is measured over 1.5 periods (at least 300 ms), and a new share is given a
//! period (at least 200 ms) to show before the next correction.

use std::{
    collections::{HashMap, VecDeque},
    io::Write as _,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::engine::ports::AskGate;

/// The smallest share of a CPU it allows: 0.1 % (1 ms per 1 s period).
pub const MIN_SHARE: f64 = 0.001;
/// The rate aimed at, as a share of the budget: under it by more than the measurement's noise
/// (a 1.5-period window holds one slice more or less).
const AIM: f64 = 0.6;

const SHORT_US: u64 = 100_000;
const LONG_US: u64 = 1_000_000;

/// The bandwidth period for a share (also the duty cycle's period), in microseconds: 1 s under
/// 1 % of a CPU, back to 100 ms only over 5 % (no flipping between the two near the switch).
pub fn period_us(share: f64, previous: u64) -> u64 {
    if share < 0.01 || (previous == LONG_US && share <= 0.05) {
        LONG_US
    } else {
        SHORT_US
    }
}

/// How long the rate is measured over, and how long a share is left to show, at a period.
fn measure(period_us: u64) -> (Duration, Duration) {
    let p = Duration::from_micros(period_us);
    (p.mul_f64(1.5).max(Duration::from_millis(300)), p.max(Duration::from_millis(200)))
}

/// What the agent changed, with what to put back: one entry of the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Saved {
    /// cgroup v2: `dir/cpu.max` held `previous` (e.g. `max 100000`).
    CpuMax { dir: PathBuf, previous: String },
    /// cgroup v1: `dir/cpu.cfs_period_us` and `dir/cpu.cfs_quota_us` held these.
    CfsQuota { dir: PathBuf, period: String, quota: String },
    /// Stopped and continued by the agent; only SIGCONT to put back.
    DutyCycle,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub pid: u32,
    /// The process's start time (clock ticks since boot, /proc/PID/stat): a pid reused by another
    /// process is never signalled.
    pub start_time: u64,
    pub vm: String,
    pub saved: Saved,
}

impl Entry {
    /// How it is throttled: `cgroup-v2 cpu.max`, `cgroup-v1 cfs quota` or `duty cycle`.
    pub fn mechanism(&self) -> &'static str {
        match self.saved {
            Saved::CpuMax { .. } => "cgroup-v2 cpu.max",
            Saved::CfsQuota { .. } => "cgroup-v1 cpu.cfs_quota_us",
            Saved::DutyCycle => "duty cycle (the VMM has no cgroup of its own)",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the state file {path} is not valid: {why}")]
    State { path: PathBuf, why: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ThrottleError + '_ {
    move |source| ThrottleError::Io { path: path.to_path_buf(), source }
}

/// Where the cgroup hierarchies are (tests point it elsewhere).
#[derive(Debug, Clone)]
pub struct Cgroups {
    pub proc_root: PathBuf,
    /// cgroup2's mount point, if mounted.
    pub unified: Option<PathBuf>,
    /// The v1 hierarchy with the `cpu` controller: (mount point, its root within the hierarchy).
    pub cpu_v1: Option<(PathBuf, String)>,
}

impl Cgroups {
    /// From /proc/self/mountinfo.
    pub fn discover() -> Self {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let (mut unified, mut cpu_v1) = (None, None);
        for line in text.lines() {
            // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
            let f: Vec<&str> = line.split(' ').collect();
            let Some(dash) = f.iter().position(|x| *x == "-") else { continue };
            let (Some(root), Some(mnt), Some(fstype), Some(sopts)) =
                (f.get(3), f.get(4), f.get(dash + 1), f.get(dash + 3))
            else {
                continue;
            };
            match *fstype {
                "cgroup2" if unified.is_none() => unified = Some(PathBuf::from(unescape(mnt))),
                "cgroup" if cpu_v1.is_none() && sopts.split(',').any(|o| o == "cpu") => {
                    cpu_v1 = Some((PathBuf::from(unescape(mnt)), (*root).to_string()));
                }
                _ => {}
            }
        }
        Cgroups { proc_root: PathBuf::from("/proc"), unified, cpu_v1 }
    }

    /// The cgroup that holds `pid` and nothing else, and how to limit it; Err says why there is
    /// none (then: duty cycle).
    pub fn own(&self, pid: u32) -> Result<Own, String> {
        let path = self.proc_root.join(format!("{pid}/cgroup"));
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let procs = |dir: &Path| std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        // cgroup.procs may list a process more than once (cgroup v2 on 6.1 does, per thread).
        // Kernel threads count as the VMM's: KVM puts a VM's worker kthreads (6.1's
        // kvm-nx-lpage-recovery) into its creator's cgroup.
        let pid_text = pid.to_string();
        let others = |dir: &Path| -> Vec<String> {
            procs(dir)
                .split_ascii_whitespace()
                .filter(|x| *x != pid_text && !self.is_kthread(x))
                .map(str::to_string)
                .collect()
        };
        let only_pid =
            |dir: &Path| procs(dir).split_ascii_whitespace().any(|x| x == pid_text) && others(dir).is_empty();
        let mut why = Vec::new();
        for line in text.lines() {
            let mut f = line.splitn(3, ':');
            let (Some(_), Some(ctrl), Some(path)) = (f.next(), f.next(), f.next()) else { continue };
            let cpu_v1 = ctrl.split(',').any(|c| c == "cpu");
            if !ctrl.is_empty() && !cpu_v1 {
                continue;
            }
            if path == "/" || path.contains("/..") {
                why.push(format!("its cgroup is {path:?}"));
                continue;
            }
            let (dir, limit, own): (PathBuf, &str, fn(PathBuf) -> Own) = if ctrl.is_empty() {
                let Some(mnt) = &self.unified else { continue };
                let mut dir = mnt.join(path.trim_start_matches('/'));
                // Threaded sub-groups (libvirt's vcpuN) belong to their domain: limit that.
                while std::fs::read_to_string(dir.join("cgroup.type")).is_ok_and(|t| t.trim() == "threaded") {
                    if !dir.pop() || !dir.starts_with(mnt) || dir == *mnt {
                        break;
                    }
                }
                if dir == *mnt {
                    why.push("its cgroup is the root".into());
                    continue;
                }
                (dir, "cpu.max", Own::V2)
            } else {
                let Some((mnt, root)) = &self.cpu_v1 else { continue };
                let rel = path.strip_prefix(root.as_str()).unwrap_or(path);
                (mnt.join(rel.trim_start_matches('/')), "cpu.cfs_quota_us", Own::V1)
            };
            if !dir.join(limit).exists() {
                why.push(format!("{} has no {limit} (no cpu controller there)", dir.display()));
            } else if !only_pid(&dir) {
                why.push(format!("{} holds other processes too ({})", dir.display(), others(&dir).len()));
            } else {
                return Ok(own(dir));
            }
        }
        Err(if why.is_empty() { "no cgroup with a cpu controller".into() } else { why.join("; ") })
    }

    /// True for a kernel thread (PF_KTHREAD in /proc/PID/stat's flags).
    fn is_kthread(&self, pid: &str) -> bool {
        const PF_KTHREAD: u64 = 0x0020_0000;
        let stat = std::fs::read(self.proc_root.join(pid).join("stat")).unwrap_or_default();
        // Field 9: flags.
        crate::host::procfs::stat_field(&stat, 9).is_some_and(|f| f & PF_KTHREAD != 0)
    }
}

/// mountinfo escapes spaces and such as octal (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Own {
    V2(PathBuf),
    V1(PathBuf),
}

fn read_trim(path: &Path) -> Result<String, ThrottleError> {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).map_err(io(path))
}

fn write_file(path: &Path, text: &str) -> Result<(), ThrottleError> {
    std::fs::write(path, text).map_err(io(path))
}

/// Sets a share of a CPU on a throttled cgroup.
fn apply_share(saved: &Saved, share: f64, period: u64) -> Result<(), ThrottleError> {
    let quota = ((share * period as f64) as u64).max(1000);
    match saved {
        Saved::CpuMax { dir, .. } => write_file(&dir.join("cpu.max"), &format!("{quota} {period}")),
        Saved::CfsQuota { dir, .. } => {
            // v1 checks the pair at each write: the period is changed without a quota.
            let (q, p) = (dir.join("cpu.cfs_quota_us"), dir.join("cpu.cfs_period_us"));
            if read_trim(&p)? != period.to_string() {
                write_file(&q, "-1")?;
                write_file(&p, &period.to_string())?;
            }
            write_file(&q, &quota.to_string())
        }
        Saved::DutyCycle => Ok(()),
    }
}

/// Puts back what an entry saved. A cgroup that no longer exists needs nothing.
fn restore(e: &Entry, gate: Option<&dyn AskGate>) -> Result<(), ThrottleError> {
    match &e.saved {
        Saved::CpuMax { dir, previous } => {
            if !dir.exists() {
                return Ok(());
            }
            write_file(&dir.join("cpu.max"), previous)
        }
        Saved::CfsQuota { dir, period, quota } => {
            if !dir.exists() {
                return Ok(());
            }
            // -1 (no limit) first, so that any period is accepted, then the saved pair.
            write_file(&dir.join("cpu.cfs_quota_us"), "-1")?;
            write_file(&dir.join("cpu.cfs_period_us"), period)?;
            write_file(&dir.join("cpu.cfs_quota_us"), quota)
        }
        Saved::DutyCycle => {
            if gate.is_some_and(|g| g.asked(e.pid)) {
                return Ok(());
            }
            match Pidfd::open(e.pid, e.start_time) {
                Some(p) => p.signal(libc::SIGCONT).map_err(io(Path::new("pidfd_send_signal"))),
                None => Ok(()),
            }
        }
    }
}

/// A pidfd for a process known by (pid, start time): None if it is gone or the pid was reused.
struct Pidfd(OwnedFd);

impl Pidfd {
    fn open(pid: u32, start_time: u64) -> Option<Pidfd> {
        // SAFETY: pidfd_open(2) with flags 0 returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh fd that nothing else owns.
        let fd = Pidfd(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        // Checked after opening: the pidfd then refers to the process whose start time matched.
        (crate::host::procfs::ProcFs::default().start_time(pid).ok() == Some(start_time)).then_some(fd)
    }

    fn signal(&self, sig: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal(2) on our pidfd, no siginfo.
        let r = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.0.as_raw_fd(), sig, std::ptr::null::<u8>(), 0)
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// The persisted entries: one JSON document, replaced atomically (written, synced, renamed)
/// before each change is applied and after each is undone.
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: PathBuf) -> Self {
        StateFile { path }
    }

    pub fn load(&self) -> Result<Vec<Entry>, ThrottleError> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| ThrottleError::State { path: self.path.clone(), why: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(ThrottleError::Io { path: self.path.clone(), source: e }),
        }
    }

    pub fn store(&self, entries: &[Entry]) -> Result<(), ThrottleError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let text = serde_json::to_vec_pretty(entries).expect("entries serialize");
        f.write_all(&text).and_then(|()| f.sync_all()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))
    }
}

/// A duty-cycle thread's controls: the share (in 1e-5 CPU) and the end, which wakes it at once
/// (it then continues the VMM and ends).
struct Duty {
    share_e5: Arc<AtomicU32>,
    period_us: Arc<AtomicU32>,
    end: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl Duty {
    fn set(&self, share: f64, period: u64) {
        self.share_e5.store((share * 100_000.0) as u32, Ordering::Relaxed);
        self.period_us.store(period as u32, Ordering::Relaxed);
    }

    fn end(&self) {
        let (m, cv) = &*self.end;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }
}

struct Active {
    entry: Entry,
    share: f64,
    period: u64,
    samples: VecDeque<(Instant, u64)>,
    adjusted: Instant,
    duty: Option<Duty>,
}

/// Every throttle in force.
pub struct Throttler {
    state: StateFile,
    cgroups: Cgroups,
    gate: Option<Arc<dyn AskGate>>,
    active: HashMap<u32, Active>,
}

/// What starting a throttle did.
pub struct Started {
    pub mechanism: &'static str,
    pub share: f64,
}

impl Throttler {
    /// Puts back everything a previous agent left throttled (it died, or was upgraded), then
    /// starts empty. Entries it could not put back stay in the file and are retried next time.
    pub fn recover(state: StateFile, cgroups: Cgroups, gate: Option<Arc<dyn AskGate>>) -> Self {
        let left = match state.load() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "the throttle state file cannot be read: earlier throttles are not undone");
                Vec::new()
            }
        };
        let mut kept = Vec::new();
        for e in left {
            match restore(&e, gate.as_deref()) {
                Ok(()) => {
                    tracing::warn!(pid = e.pid, vm = %crate::util::text::escape(&e.vm), mechanism = e.mechanism(), "a previous agent left this VMM throttled: its CPU limit is put back")
                }
                Err(err) => {
                    tracing::error!(pid = e.pid, error = %err, "could not put back a previous agent's throttle");
                    kept.push(e);
                }
            }
        }
        if let Err(e) = state.store(&kept) {
            tracing::error!(error = %e, "writing the throttle state file");
        }
        Throttler { state, cgroups, gate, active: HashMap::new() }
    }

    /// True while `pid` is held under a full CPU: its calm rate may be the throttle's doing, so
    /// its storm may not clear yet. The controller loosens a calm VMM (x2 per step) until then.
    pub fn holds(&self, pid: u32) -> bool {
        self.active.get(&pid).is_some_and(|a| a.share < 1.0)
    }

    fn persist(&self) -> Result<(), ThrottleError> {
        let entries: Vec<Entry> = self.active.values().map(|a| a.entry.clone()).collect();
        self.state.store(&entries)
    }

    /// Starts throttling `pid` (over budget at `rate` WBINVD/s, total `wbinvd` so far).
    pub fn start(
        &mut self,
        pid: u32,
        start_time: u64,
        vm: &str,
        (rate, budget): (f64, f64),
        (now, wbinvd): (Instant, u64),
    ) -> Result<Started, ThrottleError> {
        if let Some(a) = self.active.get(&pid) {
            return Ok(Started { mechanism: a.entry.mechanism(), share: a.share });
        }
        let saved = match self.cgroups.own(pid) {
            Ok(Own::V2(dir)) => Saved::CpuMax { previous: read_trim(&dir.join("cpu.max"))?, dir },
            Ok(Own::V1(dir)) => Saved::CfsQuota {
                period: read_trim(&dir.join("cpu.cfs_period_us"))?,
                quota: read_trim(&dir.join("cpu.cfs_quota_us"))?,
                dir,
            },
            Err(why) => {
                tracing::info!(pid, vm = %crate::util::text::escape(vm), why = %why, "no cgroup of its own to limit: throttled by duty cycle");
                Saved::DutyCycle
            }
        };
        let share = (AIM * budget / rate.max(1.0)).clamp(MIN_SHARE, 1.0);
        let entry = Entry { pid, start_time, vm: vm.to_string(), saved };
        // Written ahead: whatever happens next, the previous setting is on disk.
        let mut entries: Vec<Entry> = self.active.values().map(|a| a.entry.clone()).collect();
        entries.push(entry.clone());
        self.state.store(&entries)?;
        let period = period_us(share, SHORT_US);
        let mut a = Active {
            entry,
            share,
            period,
            samples: VecDeque::from([(now, wbinvd)]),
            adjusted: now,
            duty: None,
        };
        let applied = match &a.entry.saved {
            Saved::DutyCycle => match Pidfd::open(pid, start_time) {
                Some(fd) => {
                    a.duty = Some(spawn_duty(fd, pid, (share, period), self.gate.clone()));
                    Ok(())
                }
                None => Err(ThrottleError::Io {
                    path: PathBuf::from(format!("/proc/{pid}")),
                    source: std::io::Error::from_raw_os_error(libc::ESRCH),
                }),
            },
            saved => apply_share(saved, share, period),
        };
        if let Err(e) = applied {
            let _ = restore(&a.entry, self.gate.as_deref());
            let _ = self.persist();
            return Err(e);
        }
        let mechanism = a.entry.mechanism();
        self.active.insert(pid, a);
        Ok(Started { mechanism, share })
    }

    /// Corrects the share of a throttled `pid` from its WBINVD total at `now`.
    pub fn adjust(&mut self, pid: u32, now: Instant, wbinvd: u64, budget: f64) {
        let Some(a) = self.active.get_mut(&pid) else { return };
        a.samples.push_back((now, wbinvd));
        let (window, settle) = measure(a.period);
        while a.samples.len() > 2 && a.samples[1].0 + window <= now {
            a.samples.pop_front();
        }
        // Measured only over time the current share was in force.
        while a.samples.len() > 2 && a.samples[0].0 < a.adjusted {
            a.samples.pop_front();
        }
        if now.duration_since(a.adjusted) < settle {
            return;
        }
        let &(t0, n0) = a.samples.front().expect("pushed");
        let secs = now.duration_since(t0).as_secs_f64();
        if secs < 0.1 {
            return;
        }
        let rate = wbinvd.saturating_sub(n0) as f64 / secs;
        let step = match AIM * budget / rate.max(f64::MIN_POSITIVE) {
            // No WBINVD at all: the storm is over; loosen fast (the alert clears once free).
            _ if rate <= 0.0 => 4.0,
            // Near the aim, half the correction (in log terms): the measurement is noisy.
            s if (0.5..2.0).contains(&s) => s.sqrt(),
            // Far over: down fast. Under: up carefully (the VM still storms).
            s => s.clamp(1.0 / 16.0, 1.5),
        };
        let share = (a.share * step).clamp(MIN_SHARE, max_share().max(1.0));
        if (share - a.share).abs() / a.share < 0.05 {
            return;
        }
        tracing::debug!(pid, rate, from = a.share, to = share, "throttle adjusted");
        a.share = share;
        a.period = period_us(share, a.period);
        a.adjusted = now;
        match &a.duty {
            Some(d) => d.set(share, a.period),
            None => {
                if let Err(e) = apply_share(&a.entry.saved, share, a.period) {
                    tracing::warn!(pid, error = %e, "adjusting a throttle");
                }
            }
        }
    }

    /// Ends the throttle of `pid` and puts back exactly what was there.
    pub fn stop(&mut self, pid: u32) -> Option<Result<Entry, ThrottleError>> {
        let a = self.active.remove(&pid)?;
        if let Some(d) = &a.duty {
            // Once ended (under the lock the thread stops the VMM under) the thread never
            // stops it again; it is continued here at once, not by the thread, which may not
            // run before the agent exits.
            d.end();
        }
        if let Err(e) = restore(&a.entry, self.gate.as_deref()) {
            tracing::error!(pid, error = %e, "putting a throttled VMM's CPU limit back");
            self.active.insert(pid, a);
            return Some(Err(e));
        }
        if let Err(e) = self.persist() {
            tracing::error!(error = %e, "writing the throttle state file");
        }
        Some(Ok(a.entry))
    }

    /// Puts back every throttle (agent exit).
    pub fn stop_all(&mut self) {
        let pids: Vec<u32> = self.active.keys().copied().collect();
        for pid in pids {
            if let Some(Err(e)) = self.stop(pid) {
                tracing::error!(pid, error = %e, "a throttle stays in the state file for the next agent");
            }
        }
    }
}

fn max_share() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

/// The duty cycle of one VMM: within each period it is stopped, then runs for the share.
fn spawn_duty(fd: Pidfd, pid: u32, (share, period): (f64, u64), gate: Option<Arc<dyn AskGate>>) -> Duty {
    let share_e5 = Arc::new(AtomicU32::new((share * 100_000.0) as u32));
    let period_us = Arc::new(AtomicU32::new(period as u32));
    let end = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let (s, p, e) = (Arc::clone(&share_e5), Arc::clone(&period_us), Arc::clone(&end));
    let asked = move || gate.as_ref().is_some_and(|g| g.asked(pid));
    let spawned = std::thread::Builder::new().name(format!("duty-{pid}")).spawn(move || {
        let (lock, cv) = &*e;
        // Sleeps for `d` unless the end comes first; true if it came.
        let wait = |d: Duration| {
            let g = lock.lock().unwrap_or_else(|e| e.into_inner());
            *cv.wait_timeout_while(g, d, |ended| !*ended).unwrap_or_else(|e| e.into_inner()).0
        };
        let mut held = false;
        loop {
            let share = f64::from(s.load(Ordering::Relaxed)) / 100_000.0;
            let period = Duration::from_micros(u64::from(p.load(Ordering::Relaxed)));
            let run = period.mul_f64(share.min(1.0)).max(Duration::from_millis(1));
            let ended = {
                // Stopped only under the lock that ending takes: an end never misses a stop.
                let g = lock.lock().unwrap_or_else(|e| e.into_inner());
                if *g {
                    true
                } else {
                    if share < 1.0 {
                        if let Err(e) = fd.signal(libc::SIGSTOP) {
                            tracing::debug!(pid, error = %e, "duty cycle ends: the VMM is gone");
                            return;
                        }
                    }
                    drop(g);
                    share < 1.0 && wait(period - run)
                }
            };
            // Never continue a VMM the kernel stopped to ask: the agent's decision does.
            if asked() {
                if !held {
                    tracing::warn!(
                        pid,
                        "duty cycle: the VMM is stopped for an incoherent-DMA decision; not continued"
                    );
                }
                held = true;
            } else {
                held = false;
                if let Err(e) = fd.signal(libc::SIGCONT) {
                    tracing::debug!(pid, error = %e, "duty cycle ends: the VMM is gone");
                    return;
                }
            }
            if ended || wait(run) {
                break;
            }
        }
        if !asked() {
            let _ = fd.signal(libc::SIGCONT);
        }
    });
    if let Err(e) = spawned {
        tracing::error!(pid, error = %e, "starting a duty cycle");
    }
    Duty { share_e5, period_us, end }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/sys/fs/cgroup/a\040b"), "/sys/fs/cgroup/a b");
        assert_eq!(unescape(r"\04"), r"\04");
    }

    #[test]
    fn the_state_file_round_trips_and_rejects_garbage() {
        let dir = std::env::temp_dir().join(format!("ioasid-throttle-{}", std::process::id()));
        let f = StateFile::new(dir.join("throttle.json"));
        assert_eq!(f.load().unwrap(), Vec::new(), "no file: nothing throttled");
        let e = vec![
            Entry {
                pid: 7,
                start_time: 9,
                vm: "a".into(),
                saved: Saved::CpuMax { dir: "/x".into(), previous: "max 100000".into() },
            },
            Entry {
                pid: 8,
                start_time: 1,
                vm: "b\n".into(),
                saved: Saved::CfsQuota { dir: "/y".into(), period: "100000".into(), quota: "-1".into() },
            },
            Entry { pid: 9, start_time: 2, vm: "c".into(), saved: Saved::DutyCycle },
        ];
        f.store(&e).unwrap();
        assert_eq!(f.load().unwrap(), e);
        std::fs::write(dir.join("throttle.json"), b"{not json").unwrap();
        assert!(matches!(f.load(), Err(ThrottleError::State { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A fake cgroup v1 tree: a VMM alone in its cgroup gets a quota; the exact previous pair
    /// comes back.
    #[test]
    fn own_cgroup_and_exact_restore() {
        let root = std::env::temp_dir().join(format!("ioasid-cg-{}", std::process::id()));
        let proc_root = root.join("proc");
        let cpu = root.join("cpu");
        let vm = cpu.join("machine/vm1");
        std::fs::create_dir_all(proc_root.join("42")).unwrap();
        std::fs::create_dir_all(&vm).unwrap();
        std::fs::write(proc_root.join("42/cgroup"), "1:cpu,cpuacct:/machine/vm1\n0::/\n").unwrap();
        std::fs::write(vm.join("cgroup.procs"), "42\n").unwrap();
        std::fs::write(vm.join("cpu.cfs_quota_us"), "150000\n").unwrap();
        std::fs::write(vm.join("cpu.cfs_period_us"), "50000\n").unwrap();
        let cg =
            Cgroups { proc_root: proc_root.clone(), unified: None, cpu_v1: Some((cpu.clone(), "/".into())) };
        assert_eq!(cg.own(42), Ok(Own::V1(vm.clone())));
        // Shared with another process: not its own.
        std::fs::write(vm.join("cgroup.procs"), "42\n43\n").unwrap();
        assert!(cg.own(42).unwrap_err().contains("holds other processes too (1)"));
        // Listed twice (cgroup v2 on 6.1, once per thread): still its own.
        std::fs::write(vm.join("cgroup.procs"), "42\n42\n").unwrap();
        assert_eq!(cg.own(42), Ok(Own::V1(vm.clone())));
        // With a kernel thread KVM put there (6.1's kvm-nx-lpage-recovery): still its own.
        std::fs::create_dir_all(proc_root.join("77")).unwrap();
        std::fs::write(proc_root.join("77/stat"), "77 (kvm-nx-lpage-re) S 2 0 0 0 -1 2129984 0 0\n").unwrap();
        std::fs::write(vm.join("cgroup.procs"), "42\n77\n").unwrap();
        assert_eq!(cg.own(42), Ok(Own::V1(vm.clone())));
        std::fs::write(vm.join("cgroup.procs"), "42\n").unwrap();

        let state = StateFile::new(root.join("state/throttle.json"));
        let mut t = Throttler::recover(state, cg, None);
        let now = Instant::now();
        let s = t.start(42, 1, "vm1", (10_000.0, 1000.0), (now, 0)).unwrap();
        assert_eq!(s.mechanism, "cgroup-v1 cpu.cfs_quota_us");
        assert!((s.share - 0.06).abs() < 1e-9);
        assert_eq!(read_trim(&vm.join("cpu.cfs_quota_us")).unwrap(), "6000");
        assert_eq!(read_trim(&vm.join("cpu.cfs_period_us")).unwrap(), "100000");
        let saved = StateFile::new(root.join("state/throttle.json")).load().unwrap();
        assert_eq!(saved.len(), 1, "written before the change");
        // 4x over budget 0.3 s later: the share falls by 0.6 x 1000 / 4000, under 1 % of a CPU:
        // the period becomes 1 s.
        t.adjust(42, now + Duration::from_millis(300), 1200, 1000.0);
        assert_eq!(read_trim(&vm.join("cpu.cfs_quota_us")).unwrap(), "9000");
        assert_eq!(read_trim(&vm.join("cpu.cfs_period_us")).unwrap(), "1000000");
        let e = t.stop(42).unwrap().unwrap();
        assert_eq!(e.pid, 42);
        assert_eq!(read_trim(&vm.join("cpu.cfs_quota_us")).unwrap(), "150000");
        assert_eq!(read_trim(&vm.join("cpu.cfs_period_us")).unwrap(), "50000");
        assert!(StateFile::new(root.join("state/throttle.json")).load().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A throttle a dead agent left is put back by the next one.
    #[test]
    fn a_new_agent_puts_back_what_a_dead_one_left() {
        let root = std::env::temp_dir().join(format!("ioasid-cg2-{}", std::process::id()));
        let vm = root.join("unified/machine.slice/vm2.scope");
        std::fs::create_dir_all(&vm).unwrap();
        std::fs::write(vm.join("cpu.max"), "2000 100000\n").unwrap();
        let state = StateFile::new(root.join("throttle.json"));
        state
            .store(&[Entry {
                pid: 1,
                start_time: 0,
                vm: "vm2".into(),
                saved: Saved::CpuMax { dir: vm.clone(), previous: "max 100000".into() },
            }])
            .unwrap();
        let cg = Cgroups { proc_root: root.join("proc"), unified: Some(root.join("unified")), cpu_v1: None };
        let _t = Throttler::recover(StateFile::new(root.join("throttle.json")), cg, None);
        assert_eq!(read_trim(&vm.join("cpu.max")).unwrap(), "max 100000");
        assert!(state.load().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }
}
