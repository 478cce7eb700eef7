//! The rate controller: from the WBINVD rate measured under a share of a CPU, the next share.
//! Pure arithmetic over samples; `Throttler` applies what it says.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// The shortest slice a limit gives: 1 ms (cgroup bandwidth refuses a smaller quota; the duty
/// cycle runs the VMM at least that long).
pub const MIN_SLICE_US: u64 = 1_000;
pub const SHORT_US: u64 = 100_000;
/// The longest period: a VMM is never held stopped for a whole second (its guest would see
/// it: timers, watchdogs), and the rate measured per second stays even.
pub const MAX_PERIOD_US: u64 = 500_000;
/// The smallest share of a CPU it allows: one shortest slice per longest period, 0.2 %. Where
/// that still runs more WBINVD than the budget, the rate settles there: the budget is under
/// the mechanism's floor (audited once, see `Holding`).
pub const MIN_SHARE: f64 = MIN_SLICE_US as f64 / MAX_PERIOD_US as f64;
/// The rate aimed at, as a share of the budget: under it by more than the measurement's noise
/// (a 1.5-period window holds one slice more or less; near the floor a slice runs anywhere
/// from half to twice its share).
pub const AIM: f64 = 0.5;

/// The bandwidth period for a share (also the duty cycle's period), in microseconds: 100 ms
/// down to 1 % of a CPU, then as long as a 1 ms slice needs (in steps of 10 ms), up to 500 ms.
pub fn period_us(share: f64) -> u64 {
    if share >= MIN_SLICE_US as f64 / SHORT_US as f64 {
        return SHORT_US;
    }
    let need = (MIN_SLICE_US as f64 / share.max(MIN_SHARE)).ceil() as u64;
    need.div_ceil(10_000).saturating_mul(10_000).clamp(SHORT_US, MAX_PERIOD_US)
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
        Controller { share, period: period_us(share), samples: VecDeque::from([first]), adjusted: first.at }
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
        self.period = period_us(share);
        self.adjusted = now.at;
        Some((share, self.period))
    }
}

/// Whether a mechanism holds the rate: checked once a second from 3 s after it was put in
/// force (where it works, the controller settles under the budget within 2 s). A second over twice the
/// budget, or over the budget with the share at its floor, is a strike; two in a row and the
/// mechanism does not hold (`Throttler::adjust` then changes it, audited).
#[derive(Debug)]
pub struct Holding {
    since: Instant,
    last: Sample,
    strikes: u32,
}

/// What a check of `Holding` found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Held {
    Yes,
    /// Not holding: the rate over the last second, and whether the share is at its floor.
    No {
        rate: f64,
        at_floor: bool,
    },
}

impl Holding {
    pub fn new(first: Sample) -> Self {
        Holding { since: first.at, last: first, strikes: 0 }
    }

    pub fn check(&mut self, now: Sample, budget: f64, share: f64) -> Held {
        let secs = now.at.duration_since(self.last.at).as_secs_f64();
        if secs < 1.0 {
            return Held::Yes;
        }
        let rate = now.wbinvd.saturating_sub(self.last.wbinvd) as f64 / secs;
        self.last = now;
        if now.at.duration_since(self.since) < Duration::from_secs(3) {
            return Held::Yes;
        }
        let at_floor = share <= MIN_SHARE * 1.01;
        if rate > 2.0 * budget || (at_floor && rate > budget) {
            self.strikes += 1;
        } else {
            self.strikes = 0;
        }
        if self.strikes >= 2 {
            self.strikes = 0;
            Held::No { rate, at_floor }
        } else {
            Held::Yes
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_never_reach_a_second_and_slices_never_go_under_a_millisecond() {
        assert_eq!(period_us(0.5), SHORT_US);
        assert_eq!(period_us(0.01), SHORT_US);
        assert_eq!(period_us(0.009), 120_000);
        assert_eq!(period_us(0.004), 250_000);
        assert_eq!(period_us(MIN_SHARE), MAX_PERIOD_US);
        assert_eq!(period_us(0.000_01), MAX_PERIOD_US);
        for share in [MIN_SHARE, 0.003, 0.005, 0.009, 0.01, 0.2] {
            let p = period_us(share);
            assert!(share * p as f64 >= MIN_SLICE_US as f64 - 1e-6, "{share}: {p}");
        }
    }

    /// A limit that does not bring the rate down is noticed within seconds: from the third
    /// second, two seconds in a row over twice the budget (or over it at the floor).
    #[test]
    fn a_limit_that_does_not_hold_is_noticed() {
        let t0 = Instant::now();
        let at = |s: f64, n: u64| Sample { at: t0 + Duration::from_secs_f64(s), wbinvd: n };
        let mut h = Holding::new(at(0.0, 0));
        // 10,000/s against 1,000/s, at 5 % of a CPU.
        let found: Vec<Held> =
            (1..=6u32).map(|s| h.check(at(f64::from(s), u64::from(s) * 10_000), 1000.0, 0.05)).collect();
        assert_eq!(&found[..3], &[Held::Yes; 3]);
        assert_eq!(found[3], Held::No { rate: 10_000.0, at_floor: false });
        // Holding (under the budget): never.
        let mut h = Holding::new(at(0.0, 0));
        assert!((1..=10u32).all(|s| h.check(at(f64::from(s), u64::from(s) * 900), 1000.0, 0.05) == Held::Yes));
        // At the floor, a little over: not holding either (the budget is under the floor).
        let mut h = Holding::new(at(0.0, 0));
        let found: Vec<Held> =
            (1..=4u32).map(|s| h.check(at(f64::from(s), u64::from(s) * 1200), 1000.0, MIN_SHARE)).collect();
        assert_eq!(found[3], Held::No { rate: 1200.0, at_floor: true });
    }
}
