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
    let share_e5 = Arc::new(AtomicU32::new((at.share * 100_000.0) as u32));
    let period_us = Arc::new(AtomicU32::new(at.period_us as u32));
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
                        if let Err(e) = fd.signal(Signal::Stop) {
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
                if let Err(e) = fd.signal(Signal::Cont) {
                    tracing::debug!(pid, error = %e, "duty cycle ends: the VMM is gone");
                    return;
                }
            }
            if ended || wait(run) {
                break;
            }
        }
        if !asked() {
            let _ = fd.signal(Signal::Cont);
        }
    });
    if let Err(e) = spawned {
        tracing::error!(pid, error = %e, "starting a duty cycle");
    }
    Duty { share_e5, period_us, end }
}
