//! The duty cycle: for a VMM without a cgroup of its own, a thread stops it (through a pidfd)
//! for the rest of each period after it ran its share. A VMM the kernel stopped to ask about an
//! enable is never continued by it, nor one someone else stopped (an operator's `kill -STOP`):
//! while that stop lasts the cycle neither stops nor continues it, and goes on once someone
//! continues it.

use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use super::guard::{self, Guard};
use crate::{
    engine::ports::AskGate,
    host::{pidfd::Pidfd, procfs::ProcFs, sys::Signal},
};

/// The shortest run the cycle gives (the controller's floor is one per longest period).
const MIN_RUN: Duration = Duration::from_millis(1);

/// A share of a CPU and the period it is given over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DutyShare {
    pub share: f64,
    pub period_us: u64,
}

/// A duty-cycle thread's controls: the share (in 1e-5 CPU) and the end, which wakes it at once
/// (it then continues the VMM and ends).
pub struct Duty {
    share_e5: Arc<AtomicU32>,
    period_us: Arc<AtomicU32>,
    end: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl Duty {
    pub fn set(&self, to: DutyShare) {
        self.share_e5.store((to.share * 100_000.0) as u32, Ordering::Relaxed);
        self.period_us.store(to.period_us as u32, Ordering::Relaxed);
    }

    pub fn end(&self) {
        let (m, cv) = &*self.end;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }
}

/// The duty cycle of one VMM: within each period it is stopped, then runs for the share.
pub fn spawn(mut cycle: Cycle, at: DutyShare) -> Duty {
    let duty = Duty {
        share_e5: Arc::new(AtomicU32::new((at.share * 100_000.0) as u32)),
        period_us: Arc::new(AtomicU32::new(at.period_us as u32)),
        end: Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new())),
    };
    cycle.share_e5 = Arc::clone(&duty.share_e5);
    cycle.period_us = Arc::clone(&duty.period_us);
    cycle.end = Arc::clone(&duty.end);
    let pid = cycle.pid;
    if let Err(e) = std::thread::Builder::new().name(format!("duty-{pid}")).spawn(move || cycle.run()) {
        tracing::error!(pid, error = %e, "starting a duty cycle");
    }
    duty
}

/// The duty-cycle thread's side.
pub struct Cycle {
    fd: Pidfd,
    procfs: ProcFs,
    pid: u32,
    start: u64,
    guard: Option<Arc<Guard>>,
    share_e5: Arc<AtomicU32>,
    period_us: Arc<AtomicU32>,
    end: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    gate: Option<Arc<dyn AskGate>>,
    /// The kernel holds the VMM for an ask (logged once per hold).
    held: bool,
    /// Someone else stopped the VMM: left as it is until it runs again.
    foreign: bool,
}

/// The VMM is gone: the cycle ends.
struct Gone;

impl Cycle {
    /// The cycle of the process `pid` (started at `start`, /proc's clock ticks), reached through
    /// `fd`; `gate` tells a VMM the kernel stopped for a decision, `guard` hears of every stop
    /// and continue.
    pub fn new(
        fd: Pidfd,
        procfs: ProcFs,
        pid: u32,
        start: u64,
        gate: Option<Arc<dyn AskGate>>,
        guard: Option<Arc<Guard>>,
    ) -> Self {
        Cycle {
            fd,
            procfs,
            pid,
            start,
            guard,
            share_e5: Arc::new(AtomicU32::new(0)),
            period_us: Arc::new(AtomicU32::new(0)),
            end: Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new())),
            gate,
            held: false,
            foreign: false,
        }
    }

    /// Sends `sig` and tells the guard.
    fn signal(&self, sig: Signal) -> std::io::Result<()> {
        self.fd.signal(sig)?;
        if let Some(g) = &self.guard {
            g.tell(self.pid, self.start, sig == Signal::Stop);
        }
        Ok(())
    }

    /// Each period: stopped, then run for the share. The run is timed from the continue sent
    /// to the next stop sent: a late wakeup (a loaded host) lets the VMM run longer than its
    /// slice, and the overrun is taken from the next slices (and by longer stops if need be),
    /// as CFS bandwidth carries a quota overrun: the share holds on average, not only as asked.
    fn run(mut self) {
        punctual(self.pid);
        // Seconds the VMM ran beyond its slices, still to be taken back: at most a slice, so
        // that one long overrun (the host did not run this thread for a while) costs the VM a
        // period or two, never seconds stopped.
        let mut debt = 0.0f64;
        // When the last run began, and the slice it was given.
        let mut resumed: Option<(std::time::Instant, f64)> = None;
        let min_run = MIN_RUN.as_secs_f64();
        loop {
            let share = f64::from(self.share_e5.load(Ordering::Relaxed)) / 100_000.0;
            let period = Duration::from_micros(u64::from(self.period_us.load(Ordering::Relaxed)));
            let want = period.as_secs_f64() * share.min(1.0);
            if self.stopped_by_another() {
                (resumed, debt) = (None, 0.0);
                if self.wait(period) {
                    break;
                }
                continue;
            }
            if let Some((at, given)) = resumed.take() {
                debt = (debt + at.elapsed().as_secs_f64() - given).clamp(0.0, want.max(min_run));
            }
            // What is owed is taken from this period's slice (down to the shortest run), and
            // the rest by a longer stop (at most half a period more; the remainder next time).
            let take = debt.min((want - min_run).max(0.0));
            let run = (want - take).max(min_run);
            debt -= take;
            let longer = (debt / share.clamp(1e-3, 1.0)).min(period.as_secs_f64() / 2.0);
            debt = (debt - longer * share.min(1.0)).max(0.0);
            let run = Duration::from_secs_f64(run).min(period);
            let off = period - run + Duration::from_secs_f64(longer);
            let Ok(ended) = self.stopped_for(share, off) else { return };
            if ended {
                break;
            }
            match self.resume() {
                Err(Gone) => return,
                Ok(true) => resumed = Some((std::time::Instant::now(), run.as_secs_f64())),
                Ok(false) => {}
            }
            if self.wait(run) {
                break;
            }
        }
        if !self.asked() && !self.foreign {
            let _ = self.signal(Signal::Cont);
        }
        // Whatever happened, the guard holds nothing of this cycle any more.
        if let Some(g) = &self.guard {
            g.tell(self.pid, self.start, false);
        }
    }

    fn status(&self) -> Option<(char, u64)> {
        guard::status(&self.procfs, self.pid)
    }

    /// True while someone else holds the VMM stopped. Checked before each stop (a stop during
    /// the run phase shows as a stopped VMM), and noted by `resume` (a stop during the off
    /// phase stays pending, since the VMM is already stopped: ours was taken, so a pending stop
    /// signal is another's). Once the VMM runs again (continued by whoever stopped it), the
    /// cycle goes on.
    fn stopped_by_another(&mut self) -> bool {
        let stopped = self.status().is_some_and(|(state, _)| state == 'T');
        if self.foreign && !stopped {
            tracing::info!(
                pid = self.pid,
                "duty cycle: the VMM was continued by whoever stopped it; the cycle goes on"
            );
            self.foreign = false;
        } else if !self.foreign && stopped && !self.asked() {
            self.note_foreign();
        }
        self.foreign
    }

    fn note_foreign(&mut self) {
        tracing::warn!(
            pid = self.pid,
            "duty cycle: someone else stopped the VMM (kill -STOP?); it is neither stopped nor continued by the cycle until it runs again"
        );
        self.foreign = true;
    }

    /// Stops the VMM (under a share of a whole CPU) and waits `off`; true if the cycle ended
    /// meanwhile. Stopped only under the lock that ending takes: an end never misses a stop.
    fn stopped_for(&self, share: f64, off: Duration) -> Result<bool, Gone> {
        let g = self.end.0.lock().unwrap_or_else(|e| e.into_inner());
        if *g {
            return Ok(true);
        }
        if share < 1.0 {
            self.signal(Signal::Stop).map_err(|e| self.gone(e))?;
        }
        drop(g);
        Ok(share < 1.0 && self.wait(off))
    }

    /// Continues the VMM, unless the kernel stopped it to ask (the agent's decision does that)
    /// or someone else stopped it meanwhile (a stop signal pending while it is stopped). True
    /// if it was continued.
    fn resume(&mut self) -> Result<bool, Gone> {
        if guard::stopped_by_another(&self.procfs, self.pid) {
            self.note_foreign();
            return Ok(false);
        }
        if self.asked() {
            if !self.held {
                tracing::warn!(
                    pid = self.pid,
                    "duty cycle: the VMM is stopped for an incoherent-DMA decision; not continued"
                );
            }
            self.held = true;
            return Ok(false);
        }
        self.held = false;
        self.signal(Signal::Cont).map(|()| true).map_err(|e| self.gone(e))
    }

    fn gone(&self, e: std::io::Error) -> Gone {
        tracing::debug!(pid = self.pid, error = %e, "duty cycle ends: the VMM is gone");
        Gone
    }

    fn asked(&self) -> bool {
        self.gate.as_ref().is_some_and(|g| g.asked(self.pid))
    }

    /// Sleeps for `d` unless the end comes first; true if it came.
    fn wait(&self, d: Duration) -> bool {
        let (lock, cv) = &*self.end;
        let g = lock.lock().unwrap_or_else(|e| e.into_inner());
        *cv.wait_timeout_while(g, d, |ended| !*ended).unwrap_or_else(|e| e.into_inner()).0
    }
}

/// Makes the calling thread wake on time: a slice is a millisecond, and a stop sent late lets
/// the VMM run on (a wakeup late by a millisecond doubles a slice). Timer slack 1 ns, and the
/// lowest real-time priority where the host allows it (the thread sleeps all but microseconds
/// a period; where real-time is refused, e.g. a cgroup without real-time runtime, it runs as it
/// is, and the controller corrects the share from the rate it measures).
fn punctual(pid: u32) {
    // SAFETY: prctl and sched_setscheduler on the calling thread, with a valid sched_param.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
        let p = libc::sched_param { sched_priority: 1 };
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) == 0 {
            tracing::debug!(pid, "duty cycle: its thread wakes at real-time priority");
        } else {
            let e = std::io::Error::last_os_error();
            tracing::info!(pid, error = %e, "duty cycle: no real-time priority here; its stops may come late");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn state(pid: u32) -> Option<char> {
        ProcFs::at("/proc").state(pid)
    }

    /// Samples `pid`'s state every 2 ms for `d`.
    fn states(pid: u32, d: Duration) -> Vec<char> {
        let end = Instant::now() + d;
        let mut out = Vec::new();
        while Instant::now() < end {
            out.extend(state(pid));
            std::thread::sleep(Duration::from_millis(2));
        }
        out
    }

    /// Waits until `pid` is in `want` (the cycle's own stop or run phase).
    fn until(pid: u32, want: char) {
        let end = Instant::now() + Duration::from_secs(5);
        while state(pid) != Some(want) {
            assert!(Instant::now() < end, "never {want}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// An operator's `kill -STOP` holds, whether it lands in the cycle's run phase or in its
    /// off phase (before: the cycle continued the VMM within a period), and the cycle goes on
    /// once the operator continues it; at its end it continues only a VMM it stopped itself.
    #[test]
    fn an_operators_stop_is_never_overridden() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let procfs = ProcFs::at("/proc");
        let start = procfs.start_time(pid).unwrap();
        let fd = Pidfd::open(&procfs, pid, start).unwrap();
        // Half of each 200 ms period running, the rest stopped: the operator's stop lands in the
        // middle of a phase. (One sent within the moment the cycle's own stop is delivered
        // merges with it: the kernel keeps one pending stop signal. That window is not tested.)
        let cycle = Cycle::new(fd, procfs, pid, start, None, None);
        let duty = spawn(cycle, DutyShare { share: 0.5, period_us: 200_000 });
        let stop = |sig| {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid as i32, sig) };
        };
        for (phase, other) in [('S', 'T'), ('T', 'S')] {
            // The phase from its start.
            until(pid, other);
            until(pid, phase);
            std::thread::sleep(Duration::from_millis(40));
            assert_eq!(state(pid), Some(phase), "the machine is too loaded for this test's timing");
            stop(libc::SIGSTOP);
            // From the moment the stop took effect (the process wakes to take it).
            let held = states(pid, Duration::from_millis(300));
            let from = held.iter().position(|s| *s == 'T').unwrap_or(held.len());
            assert!(
                from < 10 && held[from..].iter().all(|s| *s == 'T'),
                "stopped in phase {phase}, continued by the cycle: {held:?}"
            );
            stop(libc::SIGCONT);
            let after = states(pid, Duration::from_millis(600));
            assert!(after.contains(&'S') && after.contains(&'T'), "the cycle did not go on: {after:?}");
        }
        // Stopped by the operator when the cycle ends: left stopped.
        until(pid, 'T');
        until(pid, 'S');
        std::thread::sleep(Duration::from_millis(40));
        stop(libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(100));
        duty.end();
        let left = states(pid, Duration::from_millis(200));
        assert!(left.iter().all(|s| *s == 'T'), "continued at the cycle's end: {left:?}");
        stop(libc::SIGCONT);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// At its end the cycle continues a VMM it stopped itself: never left stopped.
    #[test]
    fn the_cycles_own_stop_is_undone_at_its_end() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let procfs = ProcFs::at("/proc");
        let start = procfs.start_time(pid).unwrap();
        let fd = Pidfd::open(&procfs, pid, start).unwrap();
        let duty = spawn(
            Cycle::new(fd, procfs, pid, start, None, None),
            DutyShare { share: 0.05, period_us: 200_000 },
        );
        until(pid, 'T');
        duty.end();
        until(pid, 'S');
        let after = states(pid, Duration::from_millis(300));
        assert!(after.iter().all(|s| *s == 'S'), "stopped again after the end: {after:?}");
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[cfg(test)]
mod share_tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// CPU seconds `pid` used (utime + stime, /proc/PID/stat fields 14 and 15).
    fn cpu(pid: u32) -> f64 {
        let stat = std::fs::read(format!("/proc/{pid}/stat")).unwrap();
        let field = |n| crate::host::procfs::stat_field(&stat, n).unwrap() as f64;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (field(14) + field(15)) / hz
    }

    /// A busy process under the duty cycle uses no more than its share of a CPU on average
    /// (within the kernel's 1/HZ CPU accounting), at the short period and near the floor.
    #[test]
    fn a_busy_process_gets_its_share_on_average() {
        for (share, period_us) in [(0.05, 100_000), (0.004, 250_000)] {
            let mut child =
                std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
            let pid = child.id();
            let procfs = ProcFs::at("/proc");
            let start = procfs.start_time(pid).unwrap();
            let fd = Pidfd::open(&procfs, pid, start).unwrap();
            let duty = spawn(Cycle::new(fd, procfs, pid, start, None, None), DutyShare { share, period_us });
            std::thread::sleep(Duration::from_millis(300));
            let (c0, t0) = (cpu(pid), Instant::now());
            std::thread::sleep(Duration::from_secs(2));
            let used = (cpu(pid) - c0) / t0.elapsed().as_secs_f64();
            duty.end();
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("share {share} over {period_us} us: used {used:.4} of a CPU");
            assert!(used <= share * 1.5 + 0.004, "share {share}: used {used:.4} of a CPU");
        }
    }
}
