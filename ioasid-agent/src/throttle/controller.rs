//! The rate controller: from the WBINVD rate measured under a share of a CPU, the next share.
//! Pure arithmetic over samples; `Throttler` applies what it says.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// The smallest share of a CPU it allows: 0.1 % (1 ms per 1 s period).
pub const MIN_SHARE: f64 = 0.001;
/// The rate aimed at, as a share of the budget: under it by more than the measurement's noise
/// (a 1.5-period window holds one slice more or less).
pub const AIM: f64 = 0.6;

pub const SHORT_US: u64 = 100_000;
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
pub fn measure(period_us: u64) -> (Duration, Duration) {
    let p = Duration::from_micros(period_us);
    (p.mul_f64(1.5).max(Duration::from_millis(300)), p.max(Duration::from_millis(200)))
}

pub fn max_share() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

/// The first share for a VMM storming at `rate` against `budget` (one storming vCPU assumed).
pub fn first_share(over: Storming) -> f64 {
    (AIM * over.budget / over.rate.max(1.0)).clamp(MIN_SHARE, 1.0)
}

/// A VMM over its budget: its rate and the budget, in WBINVD per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Storming {
    pub rate: f64,
    pub budget: f64,
}

/// A VMM's WBINVD total at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub at: Instant,
    pub wbinvd: u64,
}

/// One throttle's controller state: the share in force, its period, and the samples taken
/// since it was set.
#[derive(Debug)]
pub struct Controller {
    pub share: f64,
    pub period: u64,
    samples: VecDeque<Sample>,
    adjusted: Instant,
}

impl Controller {
    pub fn new(share: f64, first: Sample) -> Self {
        Controller {
            share,
            period: period_us(share, SHORT_US),
            samples: VecDeque::from([first]),
            adjusted: first.at,
        }
    }

    /// Takes a sample; returns the new share (and period) when it should change.
    pub fn sample(&mut self, now: Sample, budget: f64) -> Option<(f64, u64)> {
        self.samples.push_back(now);
        let (window, settle) = measure(self.period);
        while self.samples.len() > 2 && self.samples[1].at + window <= now.at {
            self.samples.pop_front();
        }
        // Measured only over time the current share was in force.
        while self.samples.len() > 2 && self.samples[0].at < self.adjusted {
            self.samples.pop_front();
        }
        if now.at.duration_since(self.adjusted) < settle {
            return None;
        }
        let first = *self.samples.front().expect("pushed");
        let secs = now.at.duration_since(first.at).as_secs_f64();
        if secs < 0.1 {
            return None;
        }
        let rate = now.wbinvd.saturating_sub(first.wbinvd) as f64 / secs;
        let step = match AIM * budget / rate.max(f64::MIN_POSITIVE) {
            // No WBINVD at all: the storm is over; loosen fast (the alert clears once free).
            _ if rate <= 0.0 => 4.0,
            // Near the aim, half the correction (in log terms): the measurement is noisy.
            s if (0.5..2.0).contains(&s) => s.sqrt(),
            // Far over: down fast. Under: up carefully (the VM still storms).
            s => s.clamp(1.0 / 16.0, 1.5),
        };
        let share = (self.share * step).clamp(MIN_SHARE, max_share().max(1.0));
        if (share - self.share).abs() / self.share < 0.05 {
            return None;
        }
        tracing::debug!(rate, from = self.share, to = share, "throttle adjusted");
        self.share = share;
        self.period = period_us(share, self.period);
        self.adjusted = now.at;
        Some((share, self.period))
    }
}
