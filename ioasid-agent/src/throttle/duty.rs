//! The duty cycle: for a VMM without a cgroup of its own, a thread stops it (through a pidfd)
//! for the rest of each period after it ran its share. A VMM the kernel stopped to ask about an
//! enable is never continued by it.

use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use crate::{
    engine::ports::AskGate,
    host::{pidfd::Pidfd, sys::Signal},
};

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
pub fn spawn(fd: Pidfd, pid: u32, at: DutyShare, gate: Option<Arc<dyn AskGate>>) -> Duty {
    let duty = Duty {
        share_e5: Arc::new(AtomicU32::new((at.share * 100_000.0) as u32)),
        period_us: Arc::new(AtomicU32::new(at.period_us as u32)),
        end: Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new())),
    };
    let cycle = Cycle {
        fd,
        pid,
        share_e5: Arc::clone(&duty.share_e5),
        period_us: Arc::clone(&duty.period_us),
        end: Arc::clone(&duty.end),
        gate,
        held: false,
    };
    if let Err(e) = std::thread::Builder::new().name(format!("duty-{pid}")).spawn(move || cycle.run()) {
        tracing::error!(pid, error = %e, "starting a duty cycle");
    }
    duty
}

/// The duty-cycle thread's side.
struct Cycle {
    fd: Pidfd,
    pid: u32,
    share_e5: Arc<AtomicU32>,
    period_us: Arc<AtomicU32>,
    end: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    gate: Option<Arc<dyn AskGate>>,
    /// The kernel holds the VMM for an ask (logged once per hold).
    held: bool,
}

/// The VMM is gone: the cycle ends.
struct Gone;

impl Cycle {
    fn run(mut self) {
        loop {
            let share = f64::from(self.share_e5.load(Ordering::Relaxed)) / 100_000.0;
            let period = Duration::from_micros(u64::from(self.period_us.load(Ordering::Relaxed)));
            let run = period.mul_f64(share.min(1.0)).max(Duration::from_millis(1));
            let Ok(ended) = self.stopped_for(share, period - run) else { return };
            if self.resume().is_err() {
                return;
            }
            if ended || self.wait(run) {
                break;
            }
        }
        if !self.asked() {
            let _ = self.fd.signal(Signal::Cont);
        }
    }

    /// Stops the VMM (under a share of a whole CPU) and waits `off`; true if the cycle ended
    /// meanwhile. Stopped only under the lock that ending takes: an end never misses a stop.
    fn stopped_for(&self, share: f64, off: Duration) -> Result<bool, Gone> {
        let g = self.end.0.lock().unwrap_or_else(|e| e.into_inner());
        if *g {
            return Ok(true);
        }
        if share < 1.0 {
            self.fd.signal(Signal::Stop).map_err(|e| self.gone(e))?;
        }
        drop(g);
        Ok(share < 1.0 && self.wait(off))
    }

    /// Continues the VMM, unless the kernel stopped it to ask: the agent's decision does that.
    fn resume(&mut self) -> Result<(), Gone> {
        if self.asked() {
            if !self.held {
                tracing::warn!(
                    pid = self.pid,
                    "duty cycle: the VMM is stopped for an incoherent-DMA decision; not continued"
                );
            }
            self.held = true;
            return Ok(());
        }
        self.held = false;
        self.fd.signal(Signal::Cont).map_err(|e| self.gone(e))
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
