//! Blast radius: who pays for a flush. A non-coherent VM's WBINVD makes KVM flush every CPU its
//! vCPU ran on since its last flush, by IPI; on each of those CPUs (the flusher's own excluded)
//! the flush runs on top of whatever task was there: the victim, whose time it takes.
//!
//! The kernel counts, per (flusher process, victim process), the IPIs and their time (fentry and
//! fexit wbinvd_ipi, with the flusher's mark on each target CPU). Each sweep this turns the
//! exact totals into per-VM figures: IPIs sent per flusher VM, IPIs received and time stolen per
//! victim VM (every other process together as `host`; an idle CPU is nobody's loss), who hurt
//! whom over the flusher's window (the `wbinvd-blast` audit record), and each victim VM's
//! stolen share of time against its budget.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, Instant},
};

use ioasid_common::cost::{BlastKey, BLAST_IPIS, BLAST_NS};
use serde::Serialize;

/// The victim name of every process that is not a known VMM.
pub const HOST: &str = "host";
/// At most this many victims in a `wbinvd-blast` record (the largest stolen time first).
pub const TOP_VICTIMS: usize = 5;
/// At most this many flushers named per victim (`ioasid_wbinvd_victim_flusher_seconds`).
pub const TOP_FLUSHERS: usize = 3;

/// What one sweep added, per VM.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Delta {
    /// Flusher VM -> flush IPIs sent to other CPUs (idle ones included).
    pub sent: BTreeMap<String, u64>,
    /// Victim VM (or `host`) -> IPIs that interrupted it.
    pub received: BTreeMap<String, u64>,
    /// Victim VM (or `host`) -> ns those IPIs took.
    pub stolen_ns: BTreeMap<String, u64>,
}

/// One victim in a `wbinvd-blast` record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Victim {
    pub vm: String,
    pub ipis: u64,
    pub stolen_seconds: f64,
}

/// Who one flusher hurt over its window: the body of a `wbinvd-blast` record.
#[derive(Debug, Clone, PartialEq)]
pub struct FlusherWindow {
    pub tgid: u32,
    pub vm: String,
    pub window: Duration,
    pub ipis_sent: u64,
    pub victims: Vec<Victim>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    vm: String,
    sent: u64,
    /// victim VM -> (IPIs, ns)
    victims: HashMap<String, (u64, u64)>,
}

#[derive(Debug, Default)]
pub struct Blast {
    /// Totals last read, per kernel key.
    seen: HashMap<BlastKey, u64>,
    /// Per flusher tgid: what it did since its window began.
    windows: HashMap<u32, Window>,
    /// Windows of flushers that exited: reported at the next `due`, however short.
    ended: Vec<(u32, Window)>,
    /// Per victim VM: (time, stolen ns total) samples over its budget window.
    stolen: HashMap<String, VecDeque<(Instant, u64)>>,
    stolen_total: HashMap<String, u64>,
    /// Per victim VM: when its window began, and the ns each flusher VM took from it since.
    hurt_by: HashMap<String, (Instant, HashMap<String, u64>)>,
}

impl Blast {
    /// Takes the kernel's totals; `vm_of` names a process (None: not a known VMM).
    pub fn update(
        &mut self,
        totals: &[(BlastKey, u64)],
        now: Instant,
        vm_of: impl Fn(u32) -> Option<String>,
    ) -> Delta {
        let mut d = Delta::default();
        for (k, total) in totals {
            let was = self.seen.get(k).copied().unwrap_or(0);
            let delta = total.wrapping_sub(was);
            if delta == 0 || delta > u64::MAX / 2 {
                continue;
            }
            // A flusher not named yet is counted once it is (nothing is lost meanwhile).
            let Some(flusher) = vm_of(k.flusher_tgid) else { continue };
            self.seen.insert(*k, *total);
            let victim = match k.victim_tgid {
                0 => None,
                t => Some(vm_of(t).unwrap_or_else(|| HOST.to_string())),
            };
            let w = self.windows.entry(k.flusher_tgid).or_insert_with(|| Window {
                start: now,
                vm: flusher.clone(),
                sent: 0,
                victims: HashMap::new(),
            });
            match k.kind {
                BLAST_IPIS => {
                    *d.sent.entry(flusher).or_default() += delta;
                    w.sent += delta;
                    if let Some(v) = victim {
                        *d.received.entry(v.clone()).or_default() += delta;
                        w.victims.entry(v).or_default().0 += delta;
                    }
                }
                BLAST_NS => {
                    if let Some(v) = victim {
                        *d.stolen_ns.entry(v.clone()).or_default() += delta;
                        let by =
                            &mut self.hurt_by.entry(v.clone()).or_insert_with(|| (now, HashMap::new())).1;
                        *by.entry(flusher).or_default() += delta;
                        w.victims.entry(v).or_default().1 += delta;
                    }
                }
                _ => {}
            }
        }
        for (vm, ns) in &d.stolen_ns {
            *self.stolen_total.entry(vm.clone()).or_default() += ns;
        }
        d
    }

    /// The windows that have run their length (`window_of` the flusher's budget window) and
    /// saw flushes: one record each, then a new window. A flusher that sent nothing has none.
    pub fn due(&mut self, now: Instant, window_of: impl Fn(u32) -> Duration) -> Vec<FlusherWindow> {
        let mut out = Vec::new();
        let mut report = |tgid: &u32, w: &Window| {
            if w.sent > 0 {
                let mut victims: Vec<Victim> = w
                    .victims
                    .iter()
                    .map(|(vm, (ipis, ns))| Victim {
                        vm: vm.clone(),
                        ipis: *ipis,
                        stolen_seconds: *ns as f64 / 1e9,
                    })
                    .collect();
                victims.sort_by(|a, b| b.stolen_seconds.total_cmp(&a.stolen_seconds).then(a.vm.cmp(&b.vm)));
                victims.truncate(TOP_VICTIMS);
                out.push(FlusherWindow {
                    tgid: *tgid,
                    vm: w.vm.clone(),
                    window: now.duration_since(w.start),
                    ipis_sent: w.sent,
                    victims,
                });
            }
        };
        for (tgid, w) in std::mem::take(&mut self.ended) {
            report(&tgid, &w);
        }
        self.windows.retain(|tgid, w| {
            if now.duration_since(w.start) < window_of(*tgid).max(Duration::from_secs(1)) {
                return true;
            }
            report(tgid, w);
            false
        });
        out
    }

    /// Victims whose window (`window_of` its budget window, at least 1 s) has run: each with its
    /// top flushers over that window (seconds taken, the largest first), then a new window.
    pub fn hurt_by_due(
        &mut self,
        now: Instant,
        window_of: impl Fn(&str) -> Duration,
    ) -> Vec<(String, Vec<(String, f64)>)> {
        let mut out = Vec::new();
        self.hurt_by.retain(|victim, (start, by)| {
            if now.duration_since(*start) < window_of(victim).max(Duration::from_secs(1)) {
                return true;
            }
            let mut top: Vec<(String, f64)> = by.drain().map(|(f, ns)| (f, ns as f64 / 1e9)).collect();
            top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            top.truncate(TOP_FLUSHERS);
            let done = top.is_empty();
            out.push((victim.clone(), top));
            *start = now;
            !done
        });
        out
    }

    /// A victim VM's stolen share of time over `window` (0 without history).
    pub fn stolen_ratio(&mut self, vm: &str, now: Instant, window: Duration) -> f64 {
        let total = self.stolen_total.get(vm).copied().unwrap_or(0);
        let h = self.stolen.entry(vm.to_string()).or_default();
        h.push_back((now, total));
        while h.len() > 2 && now.checked_sub(window).is_some_and(|start| h[1].0 <= start) {
            h.pop_front();
        }
        let &(_, n0) = h.front().expect("pushed");
        total.saturating_sub(n0) as f64 / 1e9 / window.as_secs_f64()
    }

    /// Forgets a process's keys (it exited and its last totals were read); returns them, for
    /// the kernel map.
    pub fn forget(&mut self, tgid: u32) -> Vec<BlastKey> {
        if let Some(w) = self.windows.remove(&tgid) {
            self.ended.push((tgid, w));
        }
        let keys: Vec<BlastKey> =
            self.seen.keys().filter(|k| k.flusher_tgid == tgid || k.victim_tgid == tgid).copied().collect();
        for k in &keys {
            self.seen.remove(k);
        }
        keys
    }

    /// Keeps the stolen-time history of the VMs `keep` says (live ones) only: bounded by churn.
    pub fn retain_vms(&mut self, keep: impl Fn(&str) -> bool) {
        self.stolen.retain(|vm, _| keep(vm));
        self.stolen_total.retain(|vm, _| keep(vm));
        self.hurt_by.retain(|vm, _| keep(vm));
    }

    /// Victim keys whose process is not a known VMM: candidates for pruning once it is gone.
    pub fn host_victims(&self, is_vmm: impl Fn(u32) -> bool) -> Vec<u32> {
        let mut v: Vec<u32> =
            self.seen.keys().map(|k| k.victim_tgid).filter(|t| *t != 0 && !is_vmm(*t)).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(f: u32, v: u32, kind: u32) -> BlastKey {
        BlastKey { flusher_tgid: f, victim_tgid: v, kind, _pad: 0 }
    }

    /// Process 10 is the VM `flusher`, 20 the VM `victim`; any other is no VMM.
    fn names(tgid: u32) -> Option<String> {
        match tgid {
            10 => Some("flusher".to_string()),
            20 => Some("victim".to_string()),
            _ => None,
        }
    }

    #[test]
    fn flushers_victims_host_and_idle() {
        let mut b = Blast::default();
        let t = Instant::now();
        let totals = [
            (key(10, 20, BLAST_IPIS), 5),
            (key(10, 20, BLAST_NS), 5_000_000),
            (key(10, 0, BLAST_IPIS), 7),
            (key(10, 0, BLAST_NS), 9_000),
            (key(10, 99, BLAST_IPIS), 2),
            (key(10, 99, BLAST_NS), 1_000),
        ];
        let d = b.update(&totals, t, names);
        assert_eq!(d.sent["flusher"], 14, "idle CPUs count as IPIs sent");
        assert_eq!(d.received["victim"], 5);
        assert_eq!(d.received["host"], 2, "any other process is host");
        assert_eq!(d.stolen_ns["victim"], 5_000_000);
        assert!(!d.received.contains_key("flusher"));
        assert_eq!(d.received.len(), 2, "an idle CPU is nobody's loss");
        // Only what is new counts.
        let mut more = totals;
        more[0].1 = 8;
        more[1].1 = 8_000_000;
        let d = b.update(&more, t + Duration::from_millis(100), names);
        assert_eq!((d.sent["flusher"], d.received["victim"], d.stolen_ns["victim"]), (3, 3, 3_000_000));
        assert!(b.due(t + Duration::from_millis(500), |_| Duration::from_secs(1)).is_empty());
        let due = b.due(t + Duration::from_secs(1), |_| Duration::from_secs(1));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].ipis_sent, 17);
        assert_eq!(due[0].victims[0], Victim { vm: "victim".into(), ipis: 8, stolen_seconds: 0.008 });
        assert_eq!(due[0].victims[1].vm, "host");
        assert!(
            b.due(t + Duration::from_secs(3), |_| Duration::from_secs(1)).is_empty(),
            "no flushes, no record"
        );
        assert_eq!(b.host_victims(|t| t == 20), vec![99]);
        assert_eq!(b.forget(99).len(), 2);
        let hurt = b.hurt_by_due(t + Duration::from_secs(1), |_| Duration::from_secs(1));
        let victim = hurt.iter().find(|(v, _)| v == "victim").unwrap();
        assert_eq!(victim.1, vec![("flusher".to_string(), 0.008)]);
        let hurt = b.hurt_by_due(t + Duration::from_secs(2), |_| Duration::from_secs(1));
        assert!(hurt.iter().all(|(_, top)| top.is_empty()), "a calm window names nobody: {hurt:?}");
        assert!(b.hurt_by_due(t + Duration::from_secs(3), |_| Duration::from_secs(1)).is_empty());
        // A flusher not named yet: counted once it is, nothing lost.
        let later = [(key(11, 20, BLAST_IPIS), 4)];
        assert!(b.update(&later, t, |_| None).sent.is_empty());
        assert_eq!(b.update(&later, t, |_| Some("late".into())).sent["late"], 4);
    }

    #[test]
    fn stolen_ratio_over_the_window() {
        let mut b = Blast::default();
        let t = Instant::now();
        assert_eq!(b.stolen_ratio("victim", t, Duration::from_secs(1)), 0.0);
        b.update(&[(key(10, 20, BLAST_NS), 20_000_000)], t + Duration::from_millis(500), names);
        let r = b.stolen_ratio("victim", t + Duration::from_secs(1), Duration::from_secs(1));
        assert!((r - 0.02).abs() < 1e-9, "{r}");
    }
}
