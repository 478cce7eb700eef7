//! The policy file: what an incoherent-DMA enable gets, per VM.
//!
//! ```yaml
//! default:
//!   incoherent_dma: audit          # allow | audit | deny (default: audit)
//! rules:                           # first match wins
//!   - name: gpu-tenants
//!     match: { vm: "gpu-*", cgroup: "/machine.slice/*", exe: "/usr/bin/qemu-*", uid: [107] }
//!     incoherent_dma: allow        # omitted: the default's
//!     devices: ["0000:65:00.*"]    # optional: only these VFIO devices (PCI address globs)
//! ```
//!
//! Parsing is strict (unknown keys are errors, with line and column); the file is validated
//! and compiled once into matchers (`file`), and is swapped atomically on reload.

mod file;
mod store;
#[cfg(test)]
mod tests;

use std::{path::Path, time::Duration};

use globset::{GlobMatcher, GlobSet};
use ioasid_common::verdict::{Decision, VmVerdict, RULE_DEFAULT};
use serde::{Deserialize, Serialize};

pub use self::{
    file::{BudgetFile, DefaultSection, MatchFile, PolicyError, PolicyFile, RuleFile, Uids, MAX_RULES},
    store::PolicyStore,
};
use crate::host::procfs::ProcessInfo;

/// The largest policy file the agent reads (a policy of thousands of rules is a few hundred KiB).
pub const MAX_POLICY_BYTES: u64 = 256 << 10;

/// The policy the agent runs with when no `--policy` is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.yaml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Audit,
    Deny,
}

impl Action {
    pub fn kernel_decision(self) -> Decision {
        match self {
            Action::Allow => Decision::Allow,
            Action::Audit => Decision::Audit,
            Action::Deny => Decision::Deny,
        }
    }

    /// The action a kernel decision carries (`None` for `Ask` and `None`).
    pub fn from_kernel(d: Decision) -> Option<Action> {
        match d {
            Decision::Allow => Some(Action::Allow),
            Decision::Audit => Some(Action::Audit),
            Decision::Deny => Some(Action::Deny),
            Decision::Ask | Decision::None | Decision::Observed => None,
        }
    }
}

/// What a FILE_ADD of a file whose coherency is unknown gets (a device the agent could not
/// resolve, an IOMMU type it does not understand).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownCoherency {
    /// Judged as non-coherent, by the rule (the default: fail closed).
    #[default]
    Judge,
    /// Let through, observed and audited, not judged.
    Allow,
}

/// What to do when a VM goes over its WBINVD budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StormAction {
    /// Raise `ioasid_wbinvd_storm`, count an alert, log and audit it.
    Alert,
    /// Also SIGSTOP the VMM (resume it with SIGCONT).
    Stop,
    /// Also SIGKILL the VMM.
    Kill,
    /// Also limit the VMM's CPU while over budget, so its WBINVD rate falls to the budget
    /// (cgroup cpu.max / cfs quota of its own cgroup, else a stop/continue duty cycle); the
    /// exact previous limit comes back when the storm clears.
    Throttle,
}

impl StormAction {
    pub fn as_str(self) -> &'static str {
        match self {
            StormAction::Alert => "alert",
            StormAction::Stop => "stop",
            StormAction::Kill => "kill",
            StormAction::Throttle => "throttle",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub rate: f64,
    pub cost_ratio: f64,
    pub window: Duration,
    pub action: StormAction,
    /// The share of its time a VM may lose to other VMs' flushes on its CPUs (blast radius).
    pub victim_stolen_ratio: f64,
}

impl Budget {
    /// With no policy at all: alert (only) above 1000 WBINVD/s or 5 % of wall time in WBINVD
    /// handling over 1 s. Healthy guests execute WBINVD a few times at boot, on ACPI sleep and
    /// on memory-type changes; a thousand per second is a loop.
    pub const DEFAULT: Budget = Budget {
        rate: 1000.0,
        cost_ratio: 0.05,
        window: Duration::from_secs(1),
        action: StormAction::Alert,
        victim_stolen_ratio: 0.01,
    };
}

/// A compiled rule (built by `file::compile`).
#[derive(Debug)]
struct Rule {
    name: String,
    vm: Option<GlobMatcher>,
    cgroup: Option<GlobMatcher>,
    exe: Option<GlobMatcher>,
    uids: Option<Vec<u32>>,
    incoherent_dma: Action,
    unknown_coherency: UnknownCoherency,
    devices: Option<(Vec<String>, GlobSet)>,
    budget: Budget,
}

/// Under this `throttle` budget the throttle's measuring window (0.3-0.75 s) holds too few
/// WBINVD to steer by: such a budget is reported when the policy is loaded and by `policy check`.
pub const MIN_THROTTLE_RATE: f64 = 20.0;

/// A validated, compiled policy.
#[derive(Debug)]
pub struct Policy {
    /// Where it came from: a path, or `<embedded default>`.
    pub source: String,
    pub default: Action,
    pub default_unknown: UnknownCoherency,
    pub default_budget: Budget,
    rules: Vec<Rule>,
}

/// What the policy says for one VMM process.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Index of the matched rule, or None for the default.
    pub rule: Option<usize>,
    /// The rule's name, or `default`.
    pub rule_name: String,
    pub action: Action,
    /// Device globs the rule limits the VM to (the decision then depends on the device).
    pub devices: Option<Vec<String>>,
    /// The VM's WBINVD budget.
    pub budget: Budget,
    /// What a file of unknown coherency gets.
    pub unknown: UnknownCoherency,
}

impl Verdict {
    /// The decision the kernel can apply alone, or `Ask` when the device decides.
    pub fn kernel_decision(&self) -> Decision {
        if self.devices.is_some() {
            Decision::Ask
        } else {
            self.action.kernel_decision()
        }
    }

    /// The verdict as compiled into the kernel's map, for the process that started at `start`
    /// (/proc's clock ticks): the kernel applies it to that process only.
    pub fn to_kernel(&self, generation: u32, start: u64) -> VmVerdict {
        VmVerdict {
            start,
            decision: self.kernel_decision().wire(),
            rule: self.rule.map_or(RULE_DEFAULT, |r| r as u32),
            generation,
            unknown_allowed: u32::from(self.unknown == UnknownCoherency::Allow),
        }
    }
}

impl Policy {
    pub fn embedded() -> Self {
        Self::parse(EMBEDDED_DEFAULT, "<embedded default>").expect("the embedded default policy is valid")
    }

    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        Ok(Self::load_bytes(path)?.0)
    }

    /// Loads and also returns the bytes it parsed (a reload records their hash, not a second
    /// read's). Only a regular file of at most [`MAX_POLICY_BYTES`] is read: a FIFO would block
    /// the agent, /dev/zero would fill its memory.
    pub fn load_bytes(path: &Path) -> Result<(Self, Vec<u8>), PolicyError> {
        use std::io::Read;
        let read_err = |error| PolicyError::Read { path: path.into(), error };
        let file = crate::host::files::open_read(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        let invalid = |message: String| PolicyError::Invalid { path: path.into(), message };
        if !meta.is_file() {
            return Err(invalid("not a regular file".into()));
        }
        let mut bytes = Vec::new();
        file.take(MAX_POLICY_BYTES + 1).read_to_end(&mut bytes).map_err(read_err)?;
        if bytes.len() as u64 > MAX_POLICY_BYTES {
            return Err(invalid(format!("larger than {MAX_POLICY_BYTES} bytes")));
        }
        let text = std::str::from_utf8(&bytes).map_err(|e| invalid(format!("not UTF-8: {e}")))?;
        let policy = Self::parse(text, &path.display().to_string())?;
        Ok((policy, bytes))
    }

    pub fn parse(text: &str, source: &str) -> Result<Self, PolicyError> {
        file::compile(text, source)
    }

    /// Whether anything can be denied: the default or a rule denies, or a rule limits its VMs
    /// to some devices (the others are denied). Without, the kernel needs no program that
    /// refuses (`--enforce-with lsm` attaches it only while this holds).
    pub fn has_deny(&self) -> bool {
        self.default == Action::Deny
            || self.rules.iter().any(|r| r.incoherent_dma == Action::Deny || r.devices.is_some())
    }

    /// What is valid but will not work as written: a `throttle` budget under the rate a
    /// throttle can steer by (`MIN_THROTTLE_RATE`). Said by `policy check` and logged at load.
    pub fn notes(&self) -> Vec<String> {
        let floor = MIN_THROTTLE_RATE;
        let budgets = std::iter::once(("the default", &self.default_budget))
            .chain(self.rules.iter().map(|r| (r.name.as_str(), &r.budget)));
        budgets
            .filter(|(_, b)| b.action == StormAction::Throttle && b.rate < floor)
            .map(|(name, b)| {
                format!(
                    "{}: a throttle budget of {}/s is under the {floor}/s a throttle can hold (it measures the rate over 0.3-0.75 s): the VMM is held at the throttle's floor instead, audited",
                    if name == "the default" { name.to_string() } else { format!("rule \"{}\"", crate::util::text::escape(name)) },
                    b.rate
                )
            })
            .collect()
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    pub fn rule_name(&self, index: u32) -> Option<&str> {
        self.rules.get(index as usize).map(|r| r.name.as_str())
    }

    /// The first rule whose every given key matches, else the default.
    pub fn evaluate(&self, p: &ProcessInfo) -> Verdict {
        for (i, r) in self.rules.iter().enumerate() {
            let ok = r.vm.as_ref().is_none_or(|g| g.is_match(&p.vm))
                && r.cgroup.as_ref().is_none_or(|g| p.cgroup.as_deref().is_some_and(|c| g.is_match(c)))
                && r.exe.as_ref().is_none_or(|g| p.exe.as_deref().is_some_and(|e| g.is_match(e)))
                && r.uids.as_ref().is_none_or(|u| u.contains(&p.uid));
            if ok {
                return Verdict {
                    rule: Some(i),
                    rule_name: r.name.clone(),
                    action: r.incoherent_dma,
                    devices: r.devices.as_ref().map(|(l, _)| l.clone()),
                    budget: r.budget,
                    unknown: r.unknown_coherency,
                };
            }
        }
        Verdict {
            rule: None,
            rule_name: "default".into(),
            action: self.default,
            devices: None,
            budget: self.default_budget,
            unknown: self.default_unknown,
        }
    }

    /// The final action once the device is known: a device-limited rule denies any device
    /// that is not on its list, and any device it could not identify (fail-closed).
    pub fn decide_device(&self, verdict: &Verdict, pci: &[String]) -> (Action, Option<String>) {
        let Some(rule) = verdict.rule.and_then(|i| self.rules.get(i)) else {
            return (verdict.action, None);
        };
        let Some((_, set)) = &rule.devices else {
            return (verdict.action, None);
        };
        if pci.is_empty() {
            return (
                Action::Deny,
                Some("the device could not be identified; the rule lists allowed devices".into()),
            );
        }
        match pci.iter().find(|d| !set.is_match(d.as_str())) {
            None => (verdict.action, None),
            Some(d) => (Action::Deny, Some(format!("device {d} is not in rule {:?}'s devices", rule.name))),
        }
    }
}
