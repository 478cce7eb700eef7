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
//!   duty cycle instead: within each period the VMM runs for the allowed share, then is stopped
//!   (SIGSTOP/SIGCONT through a pidfd: never another process that reused the pid). A VMM the
//!   kernel stopped to ask about an incoherent-DMA enable is never continued by the duty cycle.
//!
//! The controller: the allowed share of a CPU starts at 0.5 x budget / rate (one storming vCPU)
//! and is corrected by 0.5 x budget / (the rate measured since): down by up to 16x at a step,
//! up by at most 1.5x (x4 once no WBINVD is seen at all: the storm is over), and by half the
//! correction (in log terms) within [1/2, 2] of the aim. Multiplicative, so it settles in a few
//! steps from any start; it aims under the budget so that noise stays under it. The period is
//! 100 ms, longer under 1 % of a CPU (as long as a 1 ms slice needs, at most 500 ms: never a
//! whole second stopped); the floor is 1 ms per 500 ms. The rate is measured over 1.5 periods
//! (at least 300 ms), and a new share is given a period (at least 200 ms) to show.
//!
//! The loop is closed on the rate, not on the limit: once a second from 3 s after a mechanism
//! is put in force, a second over twice the budget (or over it at the floor) is a strike, and
//! two in a row mean the mechanism does not hold (a vCPU thread in another cgroup, guest time
//! the kernel does not charge, a quota overrun at the tick). A cgroup limit is then put back
//! and the duty cycle takes over from the storm's first share; a duty cycle that does not hold is said
//! once (at its floor: the budget is under what any mechanism holds here). A VMM moved to
//! another cgroup is followed within 0.5 s: the old cgroup's limit put back, the new cgroup
//! saved and limited (or the duty cycle). Each change is a `changed` storm record.
//!
//! A cgroup that two throttles limit (a VMM died and another started there before the agent saw it
//! go) keeps the first's saved limit: the one from before ioasid touched it is what is put
//! back, by whichever throttle ends last.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    engine::ports::AskGate,
    host::{pidfd::Pidfd, procfs::ProcFs, sys::Signal},
};

pub mod cgroup;
pub mod controller;
pub mod duty;
pub mod guard;
pub mod state;

pub use self::{
    cgroup::Cgroups,
    state::{Entry, Saved, StateFile, ThrottleMethod},
};
use self::{
    cgroup::{apply_share, put_back, read_trim, NotOwn, Own},
    controller::{first_share, Controller, Held, Holding, Sample, Storming, MIN_SHARE},
    duty::{Duty, DutyShare},
};

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

/// Puts back what an entry saved: the cgroup limit, or a SIGCONT for a duty cycle (unless the
/// kernel holds the VMM for an ask).
fn restore(e: &Entry, procfs: &ProcFs, gate: Option<&dyn AskGate>) -> Result<(), ThrottleError> {
    match &e.saved {
        Saved::DutyCycle => {
            if gate.is_some_and(|g| g.asked(e.pid)) {
                return Ok(());
            }
            match Pidfd::open(procfs, e.pid, e.start_time) {
                Some(p) => p.signal(Signal::Cont).map_err(io(Path::new("pidfd_send_signal"))),
                None => Ok(()),
            }
        }
        saved => put_back(saved),
    }
}

/// The VMM a throttle is for.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub pid: u32,
    /// With the pid, the process's identity (a reused pid is never signalled).
    pub start_time: u64,
    pub vm: &'a str,
}

struct Active {
    entry: Entry,
    control: Controller,
    duty: Option<Duty>,
    /// Whether the mechanism holds the rate (checked once a second).
    holding: Holding,
    /// When to look next whether the VMM is still in the cgroup limited.
    place_check: Instant,
    /// A mechanism that does not hold, with nothing left to change to, is audited once.
    reported: bool,
    /// The storm it started for: a new mechanism starts from the same first share.
    over: Storming,
}

/// How often a throttled VMM's cgroup is looked at (it may be moved to escape the limit).
const PLACE_CHECK: Duration = Duration::from_millis(500);

/// The cgroup directory a saved limit is for.
fn dir_of(saved: &Saved) -> Option<&Path> {
    match saved {
        Saved::CpuMax { dir, .. } | Saved::CfsQuota { dir, .. } => Some(dir),
        Saved::DutyCycle => None,
    }
}

/// Every throttle in force.
pub struct Throttler {
    state: StateFile,
    cgroups: Cgroups,
    procfs: ProcFs,
    gate: Option<Arc<dyn AskGate>>,
    active: HashMap<u32, Active>,
    /// The state file could be neither read whole nor kept aside: it is never written over, so
    /// no throttle starts (none could be put back after a crash).
    frozen: bool,
    /// The duty cycles' guard process, from the first duty cycle on (see `guard`).
    guard: Option<Arc<guard::Guard>>,
}

/// What starting a throttle did.
pub struct Started {
    pub method: ThrottleMethod,
    pub share: f64,
}

/// What ending a throttle did.
pub struct Stopped {
    pub entry: Entry,
    /// The cgroup's limit was left in force for this VMM's throttle (the same cgroup): it puts
    /// back what was there before either.
    pub left_to: Option<u32>,
}

impl Throttler {
    /// Puts back everything a previous agent left throttled (it died, or was upgraded), then
    /// starts empty. Entries it could not put back stay in the file and are retried next time.
    pub fn recover(state: StateFile, cgroups: Cgroups, gate: Option<Arc<dyn AskGate>>) -> Self {
        let procfs = ProcFs::at(&cgroups.proc_root);
        let (left, aside) = state.salvage();
        match aside {
            None => {}
            Some(Ok(kept)) => {
                tracing::error!(kept_aside = %kept.display(), readable = left.len(), "the throttle state file could not be read whole: kept aside as it was (what it holds is not lost), the entries that could be read are put back")
            }
            Some(Err(e)) => {
                // Not renamed: never written over either, so nothing of it is lost.
                tracing::error!(error = %e, "the throttle state file can be neither read nor kept aside: earlier throttles are not undone, and it is left as it is");
                return Throttler {
                    state,
                    cgroups,
                    procfs,
                    gate,
                    active: HashMap::new(),
                    frozen: true,
                    guard: None,
                };
            }
        }
        let mut kept = Vec::new();
        for e in left {
            match restore(&e, &procfs, gate.as_deref()) {
                Ok(()) => {
                    tracing::warn!(pid = e.pid, vm = %crate::util::text::escape(&e.vm), mechanism = %e.method(), "a previous agent left this VMM throttled: its CPU limit is put back")
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
        Throttler { state, cgroups, procfs, gate, active: HashMap::new(), frozen: false, guard: None }
    }

    /// True while `pid` is held under a full CPU: its calm rate may be the throttle's doing, so
    /// its storm may not clear yet. The controller loosens a calm VMM (x2 per step) until then.
    pub fn holds(&self, pid: u32) -> bool {
        self.active.get(&pid).is_some_and(|a| a.control.share < 1.0)
    }

    /// The duty cycles' guard, started with the first of them (None if it cannot be: logged).
    fn guard(&mut self) -> Option<Arc<guard::Guard>> {
        if self.guard.is_none() {
            match guard::Guard::spawn(self.gate.as_deref().and_then(|g| g.fd())) {
                Ok(g) => self.guard = Some(Arc::new(g)),
                Err(e) => {
                    tracing::error!(error = %e, "starting the duty cycle's guard: a VMM stopped by the duty cycle when the agent dies stays stopped")
                }
            }
        }
        self.guard.clone()
    }

    fn persist(&self) -> Result<(), ThrottleError> {
        let entries: Vec<Entry> = self.active.values().map(|a| a.entry.clone()).collect();
        self.write(&entries)
    }

    /// Writes the state file, unless it must be left as it is (`frozen`).
    fn write(&self, entries: &[Entry]) -> Result<(), ThrottleError> {
        if self.frozen {
            return Err(ThrottleError::State {
                path: self.state.path().to_path_buf(),
                why: "it could be neither read nor kept aside, and is never written over".into(),
            });
        }
        self.state.store(entries)
    }

    /// The throttle of another VMM on the cgroup `dir`, if any.
    fn sharing(&self, dir: &Path, pid: u32) -> Option<&Active> {
        self.active.values().find(|a| a.entry.pid != pid && dir_of(&a.entry.saved) == Some(dir))
    }

    /// What `pid` would be throttled with: its own cgroup's limit, saved, or a duty cycle. A
    /// cgroup another throttle limits already (its VMM died and this one started there before
    /// the agent saw it go) keeps that throttle's saved limit: the one from before ioasid
    /// touched it, never ioasid's own.
    fn saved_for(&self, who: Target<'_>) -> Result<Saved, ThrottleError> {
        let own = self.cgroups.own(who.pid);
        if let Ok(Own::V2(dir) | Own::V1(dir)) = &own {
            if let Some(other) = self.sharing(dir, who.pid) {
                return Ok(other.entry.saved.clone());
            }
        }
        Ok(match own {
            Ok(Own::V2(dir)) => Saved::CpuMax { previous: read_trim(&dir.join("cpu.max"))?, dir },
            Ok(Own::V1(dir)) => Saved::CfsQuota {
                period: read_trim(&dir.join("cpu.cfs_period_us"))?,
                quota: read_trim(&dir.join("cpu.cfs_quota_us"))?,
                dir,
            },
            Err(why) => {
                tracing::info!(pid = who.pid, vm = %crate::util::text::escape(who.vm), why = %why, "no cgroup of its own to limit: throttled by duty cycle");
                Saved::DutyCycle
            }
        })
    }

    /// Puts back what `e` saved, unless another throttle limits the same cgroup (it puts back
    /// the same saved limit when it ends). `e` is no longer in `active`.
    fn release(&self, e: &Entry) -> Result<Option<u32>, ThrottleError> {
        if let Some(other) = dir_of(&e.saved).and_then(|d| self.sharing(d, e.pid)) {
            return Ok(Some(other.entry.pid));
        }
        restore(e, &self.procfs, self.gate.as_deref()).map(|()| None)
    }

    /// Puts `a`'s mechanism in force at its controller's share: the cgroup limit written, or
    /// the duty cycle started.
    fn enforce(&mut self, a: &mut Active) -> Result<(), ThrottleError> {
        let at = DutyShare { share: a.control.share, period_us: a.control.period };
        match &a.entry.saved {
            Saved::DutyCycle => {
                let (pid, start) = (a.entry.pid, a.entry.start_time);
                let Some(fd) = Pidfd::open(&self.procfs, pid, start) else {
                    return Err(ThrottleError::Io {
                        path: PathBuf::from(format!("/proc/{pid}")),
                        source: std::io::Error::from_raw_os_error(libc::ESRCH),
                    });
                };
                let guard = self.guard();
                let cycle = duty::Cycle::new(fd, self.procfs.clone(), pid, start, self.gate.clone(), guard);
                a.duty = Some(duty::spawn(cycle, at));
                Ok(())
            }
            saved => apply_share(saved, at.share, at.period_us),
        }
    }

    /// Starts throttling a VMM that storms over its budget; `now` is its WBINVD total.
    pub fn start(&mut self, who: Target<'_>, over: Storming, now: Sample) -> Result<Started, ThrottleError> {
        if let Some(a) = self.active.get(&who.pid) {
            return Ok(Started { method: a.entry.method(), share: a.control.share });
        }
        let saved = self.saved_for(who)?;
        let entry = Entry { pid: who.pid, start_time: who.start_time, vm: who.vm.to_string(), saved };
        // Written ahead: whatever happens next, the previous setting is on disk.
        let mut entries: Vec<Entry> = self.active.values().map(|a| a.entry.clone()).collect();
        entries.push(entry.clone());
        self.write(&entries)?;
        let mut a = Active {
            entry,
            control: Controller::new(first_share(over), now),
            duty: None,
            holding: Holding::new(now),
            place_check: now.at + PLACE_CHECK,
            reported: false,
            over,
        };
        if let Err(e) = self.enforce(&mut a) {
            let _ = self.release(&a.entry);
            let _ = self.persist();
            return Err(e);
        }
        let started = Started { method: a.entry.method(), share: a.control.share };
        self.active.insert(who.pid, a);
        Ok(started)
    }

    /// Corrects the share of a throttled `pid` from its WBINVD total at `now`, follows a VMM
    /// moved to another cgroup, and changes a mechanism that does not hold the rate to the duty
    /// cycle. Returns what changed, for the audit log.
    pub fn adjust(&mut self, pid: u32, now: Sample, budget: f64) -> Option<String> {
        let a = self.active.get_mut(&pid)?;
        if let Some((share, period_us)) = a.control.sample(now, budget) {
            match &a.duty {
                Some(d) => d.set(DutyShare { share, period_us }),
                None => {
                    if let Err(e) = apply_share(&a.entry.saved, share, period_us) {
                        tracing::warn!(pid, error = %e, "adjusting a throttle");
                    }
                }
            }
        }
        if now.at >= a.place_check {
            a.place_check = now.at + PLACE_CHECK;
            if let Some(dir) = dir_of(&a.entry.saved).map(Path::to_path_buf) {
                if let Some(to) = self.moved(pid, &dir) {
                    let why = format!("the VMM moved from cgroup {} to {to}", dir.display());
                    return Some(self.change(pid, now, false, why));
                }
            }
        }
        let a = self.active.get_mut(&pid)?;
        match a.holding.check(now, budget, a.control.share) {
            Held::Yes => None,
            Held::No { rate, at_floor } => {
                let (method, share) = (a.entry.method(), a.control.share);
                let how = format!(
                    "{method} at {share:.4} CPU does not hold the rate: {rate:.0}/s against a budget of {budget:.0}/s"
                );
                if method != ThrottleMethod::DutyCycle {
                    // The rate it ran at under a limit that did not hold is the storm's, as
                    // the alert's first second (partial: the storm began within it) may not be.
                    a.over.rate = a.over.rate.max(rate);
                    return Some(self.change(pid, now, true, how));
                }
                if std::mem::replace(&mut a.reported, true) {
                    return None;
                }
                Some(if at_floor {
                    format!("{how}, at its floor ({MIN_SHARE} CPU): the budget is under what any mechanism holds here; held at the floor")
                } else {
                    format!("{how}; nothing left to change to, the duty cycle goes on")
                })
            }
        }
    }

    /// Where `pid` is now, if no longer in the cgroup `dir` its throttle limits (None while it is
    /// there, also with others; or when it is gone: its exit ends the throttle).
    fn moved(&self, pid: u32, dir: &Path) -> Option<String> {
        match self.cgroups.own(pid) {
            Ok(Own::V2(d) | Own::V1(d)) => (d != dir).then(|| d.display().to_string()),
            Err(why) => {
                let there = why.0.iter().any(|w| matches!(w, NotOwn::Shared { dir: d, .. } if d == dir));
                let gone = why.0.iter().any(|w| matches!(w, NotOwn::Unreadable { .. }));
                (!there && !gone).then(|| format!("one not its own ({why})"))
            }
        }
    }

    /// Ends `pid`'s mechanism (its cgroup's limit put back, unless another throttle limits
    /// that cgroup too) and puts the next in force: where the VMM is now (`to_duty` false: it
    /// moved), or the duty cycle. Returns the audit reason.
    fn change(&mut self, pid: u32, now: Sample, to_duty: bool, why: String) -> String {
        let Some(mut a) = self.active.remove(&pid) else { return why };
        let (old, old_entry) = (a.entry.method(), a.entry.clone());
        let (released, keep_old) = match self.release(&a.entry) {
            Ok(None) => ("its limit put back".to_string(), false),
            Ok(Some(other)) => (format!("its limit left in force for pid {other}'s throttle there"), false),
            Err(e) => {
                tracing::error!(pid, error = %e, "putting back the limit of a cgroup a VMM left");
                (format!("its limit could not be put back ({e}): kept in the state file"), true)
            }
        };
        let vm = a.entry.vm.clone();
        let who = Target { pid, start_time: a.entry.start_time, vm: &vm };
        let saved = if to_duty { Ok(Saved::DutyCycle) } else { self.saved_for(who) };
        // A limit that could not be put back stays in the state file, whatever happens next.
        let mut entries: Vec<Entry> = self.active.values().map(|x| x.entry.clone()).collect();
        if keep_old {
            entries.push(old_entry.clone());
        }
        let left = entries.clone();
        let result = saved.and_then(|saved| {
            a.entry.saved = saved;
            entries.push(a.entry.clone());
            self.write(&entries)?;
            if to_duty {
                // Steered afresh from the storm's first share, as at the start, at the higher
                // of the alert's rate and the rate under the limit that did not hold: the share
                // that limit was cut to means nothing to the duty cycle (climbing from the
                // floor, it overshot the budget seconds later); a share sized for the alert's
                // first second alone (partial) was a burst of 40 % of a CPU; one sized for a
                // rate a limit held partly down alone would be too.
                a.control = Controller::new(first_share(a.over), now);
            }
            a.holding = Holding::new(now);
            a.reported = false;
            self.enforce(&mut a)
        });
        match result {
            Ok(()) => {
                let reason = format!(
                    "{why}: {old} ended ({released}); now {}: {:.4} CPU",
                    a.entry.method(),
                    a.control.share
                );
                tracing::warn!(pid, vm = %crate::util::text::escape(&a.entry.vm), reason = %reason, "throttle changed");
                self.active.insert(pid, a);
                reason
            }
            Err(e) => {
                tracing::error!(pid, error = %e, "a throttle could not follow its VMM: it is no longer throttled");
                if let Err(e) = self.write(&left) {
                    tracing::error!(error = %e, "writing the throttle state file");
                }
                format!("{why}: {old} ended ({released}); could not throttle it again ({e}): alerted only")
            }
        }
    }

    /// Ends the throttle of `pid` and puts back exactly what was there (unless another
    /// throttle limits the same cgroup: then it does, when it ends).
    pub fn stop(&mut self, pid: u32) -> Option<Result<Stopped, ThrottleError>> {
        let a = self.active.remove(&pid)?;
        if let Some(d) = &a.duty {
            // Once ended (under the lock the thread stops the VMM under) the thread never
            // stops it again; it is continued here at once, not by the thread, which may not
            // run before the agent exits.
            d.end();
        }
        let left_to = match self.release(&a.entry) {
            Ok(left_to) => left_to,
            Err(e) => {
                tracing::error!(pid, error = %e, "putting a throttled VMM's CPU limit back");
                self.active.insert(pid, a);
                return Some(Err(e));
            }
        };
        if let Err(e) = self.persist() {
            tracing::error!(error = %e, "writing the throttle state file");
        }
        Some(Ok(Stopped { entry: a.entry, left_to }))
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{cgroup::unescape, *};

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
        assert!(cg.own(42).unwrap_err().to_string().contains("holds other processes too (1)"));
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
        let vm1 = Target { pid: 42, start_time: 1, vm: "vm1" };
        let s =
            t.start(vm1, Storming { rate: 10_000.0, budget: 1000.0 }, Sample { at: now, wbinvd: 0 }).unwrap();
        assert_eq!(s.method.label(), "cgroup-v1 cpu.cfs_quota_us");
        assert!((s.share - 0.05).abs() < 1e-9);
        assert_eq!(read_trim(&vm.join("cpu.cfs_quota_us")).unwrap(), "5000");
        assert_eq!(read_trim(&vm.join("cpu.cfs_period_us")).unwrap(), "100000");
        let saved = StateFile::new(root.join("state/throttle.json")).load().unwrap();
        assert_eq!(saved.len(), 1, "written before the change");
        // 4x over budget 0.3 s later: the share falls by 0.5 x 1000 / 4000, under 1 % of a CPU:
        // the period grows to hold a 1 ms slice (160 ms), never to a second.
        t.adjust(42, Sample { at: now + Duration::from_millis(300), wbinvd: 1200 }, 1000.0);
        assert_eq!(read_trim(&vm.join("cpu.cfs_quota_us")).unwrap(), "1000");
        assert_eq!(read_trim(&vm.join("cpu.cfs_period_us")).unwrap(), "160000");
        let e = t.stop(42).unwrap().unwrap();
        assert_eq!((e.entry.pid, e.left_to), (42, None));
        assert_eq!(read_trim(&vm.join("cpu.cfs_quota_us")).unwrap(), "150000");
        assert_eq!(read_trim(&vm.join("cpu.cfs_period_us")).unwrap(), "50000");
        assert!(StateFile::new(root.join("state/throttle.json")).load().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A fake cgroup v1 cpu hierarchy under `root`, with cgroups `names` (limit 150000 per
    /// 50000), and a way to place a process in one of them.
    struct FakeV1 {
        root: PathBuf,
        cpu: PathBuf,
    }

    impl FakeV1 {
        fn new(tag: &str, names: &[&str]) -> Self {
            let root = std::env::temp_dir().join(format!("ioasid-{tag}-{}", std::process::id()));
            let cpu = root.join("cpu");
            for n in names {
                let d = cpu.join(n);
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join("cgroup.procs"), "").unwrap();
                std::fs::write(d.join("cpu.cfs_quota_us"), "150000\n").unwrap();
                std::fs::write(d.join("cpu.cfs_period_us"), "50000\n").unwrap();
            }
            FakeV1 { root, cpu }
        }

        fn cgroups(&self) -> Cgroups {
            Cgroups {
                proc_root: self.root.join("proc"),
                unified: None,
                cpu_v1: Some((self.cpu.clone(), "/".into())),
            }
        }

        /// `pid` now lives in cgroup `name` (None: it exited), and nowhere else.
        fn place(&self, pid: u32, name: Option<&str>) {
            for e in std::fs::read_dir(&self.cpu).unwrap().flatten() {
                let procs = e.path().join("cgroup.procs");
                let left: String = std::fs::read_to_string(&procs)
                    .unwrap()
                    .lines()
                    .filter(|l| *l != pid.to_string())
                    .map(|l| format!("{l}\n"))
                    .collect();
                std::fs::write(&procs, left).unwrap();
            }
            let proc_dir = self.root.join(format!("proc/{pid}"));
            match name {
                Some(n) => {
                    std::fs::create_dir_all(&proc_dir).unwrap();
                    std::fs::write(proc_dir.join("cgroup"), format!("1:cpu:/{n}\n")).unwrap();
                    let procs = self.cpu.join(n).join("cgroup.procs");
                    let mut text = std::fs::read_to_string(&procs).unwrap();
                    text.push_str(&format!("{pid}\n"));
                    std::fs::write(&procs, text).unwrap();
                }
                None => {
                    let _ = std::fs::remove_dir_all(&proc_dir);
                }
            }
        }

        fn limit(&self, name: &str) -> (String, String) {
            let d = self.cpu.join(name);
            (
                read_trim(&d.join("cpu.cfs_quota_us")).unwrap(),
                read_trim(&d.join("cpu.cfs_period_us")).unwrap(),
            )
        }

        fn state(&self) -> StateFile {
            StateFile::new(self.root.join("state/throttle.json"))
        }
    }

    impl Drop for FakeV1 {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    const STORM: Storming = Storming { rate: 10_000.0, budget: 1000.0 };
    fn original() -> (String, String) {
        ("150000".into(), "50000".into())
    }

    /// Two VMMs in one cgroup back to back (a storm killed, another started there before the
    /// agent saw the first go): the second's throttle keeps the limit from before either, the
    /// first's end leaves the second's limit alone, and the second's end puts back what was
    /// there before ioasid touched the cgroup. Before, the cgroup kept ioasid's limit for good.
    #[test]
    fn two_vmms_back_to_back_in_one_cgroup_leave_the_limit_from_before_either() {
        let f = FakeV1::new("cg-b2b", &["vm"]);
        f.place(42, Some("vm"));
        let mut t = Throttler::recover(f.state(), f.cgroups(), None);
        let now = Instant::now();
        t.start(Target { pid: 42, start_time: 1, vm: "a" }, STORM, Sample { at: now, wbinvd: 0 }).unwrap();
        let throttled = f.limit("vm");
        assert_ne!(throttled, original());
        f.place(42, None);
        f.place(43, Some("vm"));
        let s = t
            .start(Target { pid: 43, start_time: 2, vm: "b" }, STORM, Sample { at: now, wbinvd: 0 })
            .unwrap();
        assert_eq!(s.method, ThrottleMethod::CgroupV1);
        let saved = f.state().load().unwrap();
        assert_eq!(saved.len(), 2);
        assert!(
            saved.iter().all(|e| e.saved
                == Saved::CfsQuota { dir: f.cpu.join("vm"), period: "50000".into(), quota: "150000".into() }),
            "both keep the limit from before ioasid: {saved:?}"
        );
        // The first ends (its VMM exited): the second's limit stays.
        let first = t.stop(42).unwrap().unwrap();
        assert_eq!(first.left_to, Some(43));
        assert_eq!(f.limit("vm"), throttled, "the second VMM's limit was lifted");
        let second = t.stop(43).unwrap().unwrap();
        assert_eq!(second.left_to, None);
        assert_eq!(f.limit("vm"), original());
        assert!(f.state().load().unwrap().is_empty());
    }

    /// A VMM moved to another cgroup while throttled is followed: the cgroup it left gets its
    /// limit back (a process placed there later is not starved), the new one is limited
    /// (its own limit saved first), and the change is said. Before, it ran free, unrecorded.
    #[test]
    fn a_throttled_vmm_that_moves_cgroup_is_followed() {
        let f = FakeV1::new("cg-move", &["old", "new", "shared"]);
        f.place(42, Some("old"));
        std::fs::write(f.cpu.join("new/cpu.cfs_quota_us"), "70000\n").unwrap();
        let mut t = Throttler::recover(f.state(), f.cgroups(), None);
        let now = Instant::now();
        let at = |ms: u64, n: u64| Sample { at: now + Duration::from_millis(ms), wbinvd: n };
        t.start(Target { pid: 42, start_time: 1, vm: "a" }, STORM, at(0, 0)).unwrap();
        assert_ne!(f.limit("old"), original());
        assert_eq!(t.adjust(42, at(200, 100), 1000.0), None, "not moved");
        f.place(42, Some("new"));
        let why = t.adjust(42, at(600, 200), 1000.0).expect("the move is said");
        assert!(why.contains("moved from cgroup") && why.contains("its limit put back"), "{why}");
        assert!(why.contains("now cgroup-v1 cpu.cfs_quota_us"), "{why}");
        assert_eq!(f.limit("old"), original(), "the cgroup it left keeps ioasid's limit");
        assert_ne!(f.limit("new").0, "70000", "the new cgroup is not limited");
        let saved = f.state().load().unwrap();
        assert_eq!(
            saved.iter().map(|e| e.saved.clone()).collect::<Vec<_>>(),
            vec![Saved::CfsQuota { dir: f.cpu.join("new"), period: "50000".into(), quota: "70000".into() }]
        );
        t.stop(42).unwrap().unwrap();
        assert_eq!(f.limit("new"), ("70000".into(), "50000".into()));
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

    /// A state file that cannot be read whole is kept aside, byte for byte, never written over;
    /// what can be read of it is put back. Before, it was replaced by `[]` and every leftover
    /// limit stayed for good.
    #[test]
    fn an_unreadable_state_file_is_kept_aside_and_what_can_be_read_is_put_back() {
        let root = std::env::temp_dir().join(format!("ioasid-cg3-{}", std::process::id()));
        let vm = root.join("unified/machine.slice/vm3.scope");
        std::fs::create_dir_all(&vm).unwrap();
        std::fs::write(vm.join("cpu.max"), "2000 100000\n").unwrap();
        let path = root.join("throttle.json");
        let readable = serde_json::json!({
            "pid": 1, "start_time": 0, "vm": "vm3",
            "saved": { "kind": "cpu-max", "dir": vm, "previous": "max 100000" },
        });
        let text =
            serde_json::to_string(&serde_json::json!([readable, {"kind": "from-the-future", "pid": 2}]))
                .unwrap();
        std::fs::write(&path, &text).unwrap();
        let cg =
            || Cgroups { proc_root: root.join("proc"), unified: Some(root.join("unified")), cpu_v1: None };
        let aside = |root: &Path| -> Vec<PathBuf> {
            let mut v: Vec<PathBuf> = std::fs::read_dir(root)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains("throttle.json.unreadable-"))
                .collect();
            v.sort();
            v
        };
        let _t = Throttler::recover(StateFile::new(path.clone()), cg(), None);
        assert_eq!(read_trim(&vm.join("cpu.max")).unwrap(), "max 100000", "the readable entry is put back");
        let kept = aside(&root);
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(std::fs::read_to_string(&kept[0]).unwrap(), text, "kept as it was");
        assert!(StateFile::new(path.clone()).load().unwrap().is_empty());

        // Not JSON at all: kept aside too (beside the first, under another name).
        std::fs::write(&path, b"\xff{not json").unwrap();
        let _t = Throttler::recover(StateFile::new(path.clone()), cg(), None);
        let kept = aside(&root);
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(kept.iter().any(|k| std::fs::read(k).unwrap() == b"\xff{not json"));
        let _ = std::fs::remove_dir_all(&root);
    }
}
