//! WBINVD storm detection: each VMM process's WBINVD rate and handler-time share over its
//! budget's window, with hysteresis.
//!
//! The agent feeds exact kernel totals every sweep (100 ms by default), so a storm is seen
//! within a sweep of the window's count crossing the budget: well under a second for any storm
//! clearly over budget. Rates are normalised by the whole window even while less history exists,
//! so a short burst (a guest's boot-time WBINVDs) never raises an alert by itself.
//!
//! An alert raises when the rate or the share goes over budget, and clears only after both have
//! stayed at or below half the budget for max(window, 1 s): no flapping at the threshold.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use crate::{
    engine::policy::{Budget, StormAction},
    engine::record::{RecordKind, StormOutcome, StormRecord, StormState, VmIdentity},
    host::sys::Signal,
    util::text::escape,
};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transition {
    Raised,
    Cleared,
    /// The process exited during a storm (reported by the agent, not the detector).
    Exited,
}

/// What the last window looked like for one process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    /// WBINVD per second.
    pub rate: f64,
    /// Handler time over wall time.
    pub cost_ratio: f64,
    pub storm: bool,
}

#[derive(Debug, Default)]
struct Track {
    /// (time, WBINVD total, handler ns total), oldest first.
    samples: VecDeque<(Instant, u64, u64)>,
    storm: bool,
    calm_since: Option<Instant>,
    last: Window,
}

#[derive(Debug, Default)]
pub struct Detector {
    tracks: HashMap<u32, Track>,
}

impl Detector {
    /// Starts tracking a process from a baseline: its totals at `at` (zero for a process that
    /// appeared while the agent was watching, its current totals for one that ran before).
    pub fn baseline(&mut self, pid: u32, at: Instant, wbinvd: u64, cost_ns: u64) {
        self.tracks.entry(pid).or_default().samples.push_back((at, wbinvd, cost_ns));
    }

    /// Starts tracking `pid` unless it is tracked: from its totals now if they predate the
    /// agent (`preexisting`: the first sweep), else from zero one `sweep` ago (it appeared
    /// since the last sweep).
    pub fn track(
        &mut self,
        pid: u32,
        now: Instant,
        preexisting: bool,
        sweep: Duration,
        wbinvd: u64,
        cost_ns: u64,
    ) {
        if self.is_tracked(pid) {
            return;
        }
        if preexisting {
            self.baseline(pid, now, wbinvd, cost_ns);
        } else {
            self.baseline(pid, now - sweep, 0, 0);
        }
    }

    pub fn is_tracked(&self, pid: u32) -> bool {
        self.tracks.contains_key(&pid)
    }

    pub fn forget(&mut self, pid: u32) {
        self.tracks.remove(&pid);
    }

    pub fn window(&self, pid: u32) -> Option<Window> {
        self.tracks.get(&pid).map(|t| t.last)
    }

    /// Adds the totals seen at `now` and says whether the alert state changed. `hold`: the
    /// alert may not clear yet (a throttle still limits the rate: calm says nothing of demand).
    pub fn observe(
        &mut self,
        pid: u32,
        now: Instant,
        wbinvd: u64,
        cost_ns: u64,
        budget: &Budget,
        hold: bool,
    ) -> Option<Transition> {
        let t = self.tracks.entry(pid).or_default();
        t.samples.push_back((now, wbinvd, cost_ns));
        let horizon = now.checked_sub(budget.window);
        // Keep one sample at or before the window's start as the base.
        while t.samples.len() > 2 && horizon.is_some_and(|h| t.samples[1].0 <= h) {
            t.samples.pop_front();
        }
        let &(_, base_n, base_ns) = t.samples.front().expect("just pushed");
        let secs = budget.window.as_secs_f64();
        let rate = wbinvd.saturating_sub(base_n) as f64 / secs;
        let cost_ratio = cost_ns.saturating_sub(base_ns) as f64 / 1e9 / secs;
        let over = rate > budget.rate || cost_ratio > budget.cost_ratio;
        let calm = rate <= budget.rate / 2.0 && cost_ratio <= budget.cost_ratio / 2.0;
        let transition = if !t.storm && over {
            t.storm = true;
            t.calm_since = None;
            Some(Transition::Raised)
        } else if t.storm && calm && !hold {
            let since = *t.calm_since.get_or_insert(now);
            if now.duration_since(since) >= budget.window.max(Duration::from_secs(1)) {
                t.storm = false;
                t.calm_since = None;
                Some(Transition::Cleared)
            } else {
                None
            }
        } else {
            if !calm {
                t.calm_since = None;
            }
            None
        };
        t.last = Window { rate, cost_ratio, storm: t.storm };
        transition
    }
}

/// A storm alert raised or cleared for one VMM, with what the policy says about it.
pub struct StormChange<'a> {
    pub pid: u32,
    pub vm: &'a str,
    pub identity: VmIdentity,
    /// Who runs it: `policy learn` learns a storm's rate only into the rule admitting this
    /// identity.
    pub uid: u32,
    pub exe: Option<&'a str>,
    pub cgroup: Option<&'a str>,
    pub rule: &'a str,
    pub budget: Budget,
    pub window: Window,
    pub transition: Transition,
    /// The VMM has exited (its storm was seen in its final counts): nothing to act on.
    pub exited: bool,
}

/// What became of a storm change: its state, what was done, and why it went as it did.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub state: StormState,
    pub outcome: StormOutcome,
    pub reason: Option<String>,
}

impl Response {
    fn new(state: StormState, outcome: StormOutcome, reason: Option<String>) -> Self {
        Response { state, outcome, reason }
    }
}

/// Carries out a storm change (the budget's action, through `signal`), logs it and returns
/// what it did (the throttle, which no signal carries out, is the caller's).
pub fn respond(c: &StormChange<'_>, signal: impl FnOnce(Signal) -> std::io::Result<()>) -> Response {
    let (w, b, vm) = (c.window, c.budget, escape(c.vm));
    match c.transition {
        Transition::Raised if c.exited => {
            tracing::warn!(
                vm = %vm, pid = c.pid, rate = w.rate, cost_ratio = w.cost_ratio, budget_rate = b.rate,
                budget_cost_ratio = b.cost_ratio, "WBINVD storm, seen after the VMM exited"
            );
            let why = "the VMM exited before its storm was seen: no action was taken";
            Response::new(StormState::Raised, StormOutcome::VmmExited, Some(why.into()))
        }
        Transition::Raised => {
            let sig = match b.action {
                // Carried out by the caller (the throttler), not by a signal.
                StormAction::Alert | StormAction::Throttle => None,
                StormAction::Stop => Some((Signal::Stop, StormOutcome::Stopped)),
                StormAction::Kill => Some((Signal::Kill, StormOutcome::Killed)),
            };
            let (outcome, reason) = match sig.map(|(s, done)| (signal(s), done)) {
                None => (StormOutcome::Alerted, None),
                Some((Ok(()), done)) => (done, None),
                Some((Err(e), _)) => (StormOutcome::SignalFailed, Some(e.to_string())),
            };
            tracing::warn!(
                vm = %vm, pid = c.pid, rate = w.rate, cost_ratio = w.cost_ratio, budget_rate = b.rate,
                budget_cost_ratio = b.cost_ratio, action = b.action.as_str(), outcome = %outcome, "WBINVD storm"
            );
            Response::new(StormState::Raised, outcome, reason)
        }
        Transition::Cleared => {
            tracing::info!(vm = %vm, pid = c.pid, rate = w.rate, cost_ratio = w.cost_ratio, "WBINVD storm cleared");
            Response::new(StormState::Cleared, StormOutcome::Cleared, None)
        }
        Transition::Exited => {
            tracing::info!(vm = %vm, pid = c.pid, "WBINVD storm over: the VMM exited");
            Response::new(StormState::Cleared, StormOutcome::VmmExited, None)
        }
    }
}

impl StormChange<'_> {
    /// The audit record of this change.
    pub fn record(&self, result: Response, time: String, host: &str, policy: &str) -> StormRecord {
        let Response { state, outcome, reason } = result;
        StormRecord {
            event: RecordKind::WbinvdStorm,
            time,
            host: host.to_string(),
            vm: self.vm.to_string(),
            identity: self.identity.clone(),
            pid: self.pid,
            uid: Some(self.uid),
            exe: self.exe.map(str::to_string),
            cgroup: self.cgroup.map(str::to_string),
            rule: self.rule.to_string(),
            state,
            rate: self.window.rate,
            cost_ratio: self.window.cost_ratio,
            budget_rate: self.budget.rate,
            budget_cost_ratio: self.budget.cost_ratio,
            window_seconds: self.budget.window.as_secs_f64(),
            action: self.budget.action,
            outcome,
            reason,
            policy: policy.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::policy::StormAction;

    const B: Budget = Budget { action: StormAction::Alert, ..Budget::DEFAULT };

    /// Feeds `rate` WBINVD/s (each costing `ns`) for `secs`, in 100 ms sweeps, from `t`.
    fn feed(
        d: &mut Detector,
        t: &mut Instant,
        n: &mut u64,
        c: &mut u64,
        rate: u64,
        ns: u64,
        secs: f64,
    ) -> Vec<(f64, Transition)> {
        let mut out = Vec::new();
        let start = *t;
        for _ in 0..(secs * 10.0).round() as usize {
            *t += Duration::from_millis(100);
            *n += rate / 10;
            *c += rate / 10 * ns;
            if let Some(tr) = d.observe(1, *t, *n, *c, &B, false) {
                out.push((t.duration_since(start).as_secs_f64(), tr));
            }
        }
        out
    }

    #[test]
    fn a_storm_is_seen_fast_and_clears_with_hysteresis() {
        let mut d = Detector::default();
        let (mut t, mut n, mut c) = (Instant::now(), 0, 0);
        d.baseline(1, t, 0, 0);
        assert!(feed(&mut d, &mut t, &mut n, &mut c, 100, 1000, 3.0).is_empty(), "quiet is quiet");
        let raised = feed(&mut d, &mut t, &mut n, &mut c, 20_000, 1000, 2.0);
        assert_eq!(raised.len(), 1);
        assert_eq!(raised[0].1, Transition::Raised);
        assert!(raised[0].0 <= 0.2, "raised after {} s", raised[0].0);
        assert!(d.window(1).unwrap().storm);
        // Stops: clears once the window drains plus the calm period, and only once.
        let cleared = feed(&mut d, &mut t, &mut n, &mut c, 0, 0, 5.0);
        assert_eq!(cleared.len(), 1);
        assert_eq!(cleared[0].1, Transition::Cleared);
        assert!((1.5..=2.6).contains(&cleared[0].0), "cleared after {} s", cleared[0].0);
    }

    #[test]
    fn no_flapping_at_the_threshold() {
        let mut d = Detector::default();
        let (mut t, mut n, mut c) = (Instant::now(), 0, 0);
        d.baseline(1, t, 0, 0);
        let mut all = feed(&mut d, &mut t, &mut n, &mut c, 1500, 0, 2.0);
        // Hovering between half and full budget keeps the alert raised.
        all.extend(feed(&mut d, &mut t, &mut n, &mut c, 800, 0, 5.0));
        all.extend(feed(&mut d, &mut t, &mut n, &mut c, 1200, 0, 2.0));
        assert_eq!(all.iter().filter(|(_, tr)| *tr == Transition::Raised).count(), 1, "{all:?}");
        assert_eq!(all.iter().filter(|(_, tr)| *tr == Transition::Cleared).count(), 0, "{all:?}");
    }

    #[test]
    fn handler_time_share_alone_raises() {
        let mut d = Detector::default();
        let (mut t, mut n, mut c) = (Instant::now(), 0, 0);
        d.baseline(1, t, 0, 0);
        // 500/s is under the rate budget, but 200 us each is 10 % of wall time.
        let r = feed(&mut d, &mut t, &mut n, &mut c, 500, 200_000, 2.0);
        assert_eq!(r.first().map(|x| x.1), Some(Transition::Raised));
        assert!((d.window(1).unwrap().cost_ratio - 0.1).abs() < 0.01);
    }

    #[test]
    fn a_short_burst_is_not_a_storm() {
        let mut d = Detector::default();
        let (mut t, mut n, mut c) = (Instant::now(), 0, 0);
        d.baseline(1, t, 0, 0);
        // 800 WBINVD at once (boot), then nothing.
        t += Duration::from_millis(100);
        n += 800;
        assert_eq!(d.observe(1, t, n, c, &B, false), None);
        assert!(feed(&mut d, &mut t, &mut n, &mut c, 0, 0, 2.0).is_empty());
    }
}
