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
//! and compiled once into matchers, and is swapped atomically on reload.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use globset::{Glob, GlobMatcher, GlobSet, GlobSetBuilder};
use ioasid_common::{DECISION_ALLOW, DECISION_ASK, DECISION_AUDIT, DECISION_DENY, RULE_DEFAULT};
use serde::{Deserialize, Serialize};

use crate::procfs::ProcessInfo;

/// The policy the agent runs with when no `--policy` is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("default-policy.yaml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Audit,
    Deny,
}

impl Action {
    /// The audit/metric word for the decision: allowed | audited | denied.
    pub fn decision(self) -> &'static str {
        match self {
            Action::Allow => "allowed",
            Action::Audit => "audited",
            Action::Deny => "denied",
        }
    }

    pub fn kernel_decision(self) -> u32 {
        match self {
            Action::Allow => DECISION_ALLOW,
            Action::Audit => DECISION_AUDIT,
            Action::Deny => DECISION_DENY,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    default: DefaultSection,
    #[serde(default)]
    rules: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultSection {
    #[serde(default = "default_action")]
    incoherent_dma: Action,
    #[serde(default)]
    wbinvd: BudgetFile,
}

impl Default for DefaultSection {
    fn default() -> Self {
        Self { incoherent_dma: default_action(), wbinvd: BudgetFile::default() }
    }
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
}

impl StormAction {
    pub fn as_str(self) -> &'static str {
        match self {
            StormAction::Alert => "alert",
            StormAction::Stop => "stop",
            StormAction::Kill => "kill",
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetFile {
    /// WBINVD per second, averaged over the window.
    rate: Option<f64>,
    /// Share of wall time KVM spent handling the VM's WBINVD over the window.
    cost_ratio: Option<f64>,
    /// `250ms`, `1s`, `2m`...
    window: Option<String>,
    action: Option<StormAction>,
}

/// A compiled WBINVD budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub rate: f64,
    pub cost_ratio: f64,
    pub window: Duration,
    pub action: StormAction,
}

impl Budget {
    /// With no policy at all: alert (only) above 1000 WBINVD/s or 5 % of wall time in WBINVD
    /// handling over 1 s. Healthy guests execute WBINVD a few times at boot, on ACPI sleep and
    /// on memory-type changes; a thousand per second is a loop.
    pub const DEFAULT: Budget =
        Budget { rate: 1000.0, cost_ratio: 0.05, window: Duration::from_secs(1), action: StormAction::Alert };
}

fn compile_budget(f: &BudgetFile, base: &Budget, what: &str) -> Result<Budget, String> {
    let rate = f.rate.unwrap_or(base.rate);
    if !(rate.is_finite() && rate > 0.0) {
        return Err(format!("{what}: wbinvd.rate must be a positive number of WBINVD per second"));
    }
    let cost_ratio = f.cost_ratio.unwrap_or(base.cost_ratio);
    if !(cost_ratio.is_finite() && cost_ratio > 0.0) {
        return Err(format!("{what}: wbinvd.cost_ratio must be a positive share of wall time (0.05 = 5 %)"));
    }
    let window = match &f.window {
        None => base.window,
        Some(w) => crate::cli::parse_duration(w).map_err(|e| format!("{what}: wbinvd.window: {e}"))?,
    };
    if window < Duration::from_millis(100) || window > Duration::from_secs(3600) {
        return Err(format!("{what}: wbinvd.window must be between 100ms and 1h"));
    }
    Ok(Budget { rate, cost_ratio, window, action: f.action.unwrap_or(base.action) })
}

fn default_action() -> Action {
    Action::Audit
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    #[serde(rename = "match")]
    matcher: MatchFile,
    incoherent_dma: Option<Action>,
    devices: Option<Vec<String>>,
    wbinvd: Option<BudgetFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchFile {
    vm: Option<String>,
    cgroup: Option<String>,
    exe: Option<String>,
    uid: Option<Uids>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Uids {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax { path: PathBuf, line: usize, column: usize, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug)]
struct Rule {
    name: String,
    vm: Option<GlobMatcher>,
    cgroup: Option<GlobMatcher>,
    exe: Option<GlobMatcher>,
    uids: Option<Vec<u32>>,
    incoherent_dma: Action,
    devices: Option<(Vec<String>, GlobSet)>,
    budget: Budget,
}

/// A validated, compiled policy.
#[derive(Debug)]
pub struct Policy {
    /// Where it came from: a path, or `<embedded default>`.
    pub source: String,
    pub default: Action,
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
}

impl Verdict {
    /// The decision the kernel can apply alone, or ASK when the device decides.
    pub fn kernel_decision(&self) -> u32 {
        if self.devices.is_some() {
            DECISION_ASK
        } else {
            self.action.kernel_decision()
        }
    }

    pub fn kernel_rule(&self) -> u32 {
        self.rule.map_or(RULE_DEFAULT, |r| r as u32)
    }
}

impl Policy {
    pub fn embedded() -> Self {
        Self::parse(EMBEDDED_DEFAULT, "<embedded default>").expect("the embedded default policy is valid")
    }

    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| PolicyError::Read { path: path.into(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, source: &str) -> Result<Self, PolicyError> {
        let path = PathBuf::from(source);
        let invalid = |message: String| PolicyError::Invalid { path: path.clone(), message };
        if text.trim().is_empty()
            || text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            return Err(invalid(
                "the policy is empty (write at least `default: {incoherent_dma: audit}`)".into(),
            ));
        }
        let file: PolicyFile = serde_norway::from_str(text).map_err(|e| {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            let mut message = e.to_string();
            // The location is already in front; drop the library's own " at line L column C".
            if let Some(cut) = message.rfind(" at line ") {
                message.truncate(cut);
            }
            PolicyError::Syntax { path: path.clone(), line, column, message }
        })?;
        let default_budget =
            compile_budget(&file.default.wbinvd, &Budget::DEFAULT, "default").map_err(&invalid)?;
        let mut rules = Vec::with_capacity(file.rules.len());
        for (i, r) in file.rules.into_iter().enumerate() {
            let what = format!("rule {} ({:?})", i + 1, r.name);
            if r.name.trim().is_empty() {
                return Err(invalid(format!("rule {}: `name` must not be empty", i + 1)));
            }
            if rules.iter().any(|x: &Rule| x.name == r.name) {
                return Err(invalid(format!("{what}: a rule with this name already exists")));
            }
            let glob = |field: &str, pat: &Option<String>| -> Result<Option<GlobMatcher>, PolicyError> {
                pat.as_ref()
                    .map(|p| {
                        if p.is_empty() {
                            return Err(invalid(format!("{what}: match.{field} must not be empty")));
                        }
                        Glob::new(p)
                            .map(|g| g.compile_matcher())
                            .map_err(|e| invalid(format!("{what}: match.{field}: bad glob {p:?}: {e}")))
                    })
                    .transpose()
            };
            let uids = match r.matcher.uid {
                None => None,
                Some(Uids::One(u)) => Some(vec![u]),
                Some(Uids::Many(v)) if v.is_empty() => {
                    return Err(invalid(format!("{what}: match.uid must list at least one uid")));
                }
                Some(Uids::Many(v)) => Some(v),
            };
            let devices = match r.devices {
                None => None,
                Some(list) if list.is_empty() => {
                    return Err(invalid(format!(
                        "{what}: `devices` is empty; omit it to allow any device, or use incoherent_dma: deny"
                    )));
                }
                Some(list) => {
                    let mut set = GlobSetBuilder::new();
                    for d in &list {
                        let g = Glob::new(d)
                            .map_err(|e| invalid(format!("{what}: devices: bad glob {d:?}: {e}")))?;
                        set.add(g);
                    }
                    let set = set.build().map_err(|e| invalid(format!("{what}: devices: {e}")))?;
                    Some((list, set))
                }
            };
            let budget = match &r.wbinvd {
                None => default_budget,
                Some(b) => compile_budget(b, &default_budget, &what).map_err(&invalid)?,
            };
            rules.push(Rule {
                budget,
                vm: glob("vm", &r.matcher.vm)?,
                cgroup: glob("cgroup", &r.matcher.cgroup)?,
                exe: glob("exe", &r.matcher.exe)?,
                uids,
                incoherent_dma: r.incoherent_dma.unwrap_or(file.default.incoherent_dma),
                devices,
                name: r.name,
            });
        }
        Ok(Self { source: source.to_string(), default: file.default.incoherent_dma, default_budget, rules })
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
                };
            }
        }
        Verdict {
            rule: None,
            rule_name: "default".into(),
            action: self.default,
            devices: None,
            budget: self.default_budget,
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

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_EXAMPLE: &str = "default:\n  incoherent_dma: audit\nrules:\n  - name: gpu-tenants\n    match: { vm: \"gpu-*\" }\n    incoherent_dma: allow\n  - name: everyone-else-untrusted\n    match: { vm: \"tenant-*\" }\n    incoherent_dma: deny\n";

    fn proc(vm: &str) -> ProcessInfo {
        ProcessInfo {
            pid: 1,
            comm: "qemu".into(),
            vm: vm.into(),
            exe: Some("/usr/bin/qemu-system-x86_64".into()),
            cgroup: Some("/machine.slice/machine-qemu-1.scope".into()),
            uid: 107,
            start_time: 1,
        }
    }

    #[test]
    fn the_issue_example_means_what_it_says() {
        let p = Policy::parse(ISSUE_EXAMPLE, "example.yaml").unwrap();
        let v = p.evaluate(&proc("gpu-a100-1"));
        assert_eq!(
            (v.action, v.rule_name.as_str(), v.kernel_decision()),
            (Action::Allow, "gpu-tenants", DECISION_ALLOW)
        );
        let v = p.evaluate(&proc("tenant-42"));
        assert_eq!((v.action, v.rule, v.kernel_decision()), (Action::Deny, Some(1), DECISION_DENY));
        let v = p.evaluate(&proc("web"));
        assert_eq!((v.action, v.rule, v.rule_name.as_str()), (Action::Audit, None, "default"));
        assert_eq!(v.kernel_rule(), RULE_DEFAULT);
    }

    #[test]
    fn embedded_default_audits_everything() {
        let p = Policy::embedded();
        assert_eq!(p.rule_count(), 0);
        assert_eq!(p.evaluate(&proc("anything")).action, Action::Audit);
    }

    #[test]
    fn all_keys_must_match_and_first_rule_wins() {
        let text = "rules:\n  - name: strict\n    match: { vm: \"gpu-*\", uid: [0, 107], exe: \"/usr/bin/qemu-*\", cgroup: \"/machine.slice/*\" }\n    incoherent_dma: allow\n  - name: later\n    match: { vm: \"gpu-*\" }\n    incoherent_dma: deny\n";
        let p = Policy::parse(text, "t").unwrap();
        assert_eq!(p.evaluate(&proc("gpu-1")).rule_name, "strict");
        let mut other_uid = proc("gpu-1");
        other_uid.uid = 1000;
        assert_eq!(p.evaluate(&other_uid).rule_name, "later");
        let mut no_cgroup = proc("gpu-1");
        no_cgroup.cgroup = None;
        assert_eq!(p.evaluate(&no_cgroup).action, Action::Deny);
        // Default for a file without `default`: audit.
        assert_eq!(p.evaluate(&proc("x")).action, Action::Audit);
    }

    #[test]
    fn device_limited_rules() {
        let text = "default: { incoherent_dma: deny }\nrules:\n  - name: gpus\n    match: { vm: \"gpu-*\" }\n    incoherent_dma: allow\n    devices: [\"0000:65:00.*\", \"0000:ca:00.0\"]\n";
        let p = Policy::parse(text, "t").unwrap();
        let v = p.evaluate(&proc("gpu-1"));
        assert_eq!(v.kernel_decision(), DECISION_ASK);
        assert_eq!(p.decide_device(&v, &["0000:65:00.1".into()]).0, Action::Allow);
        assert_eq!(p.decide_device(&v, &["0000:65:00.0".into(), "0000:ca:00.0".into()]).0, Action::Allow);
        let (a, why) = p.decide_device(&v, &["0000:17:00.0".into()]);
        assert_eq!(a, Action::Deny);
        assert!(why.unwrap().contains("0000:17:00.0"));
        assert_eq!(p.decide_device(&v, &[]).0, Action::Deny);
        // Rules without devices ignore the device.
        let d = p.evaluate(&proc("web"));
        assert_eq!(p.decide_device(&d, &[]).0, Action::Deny);
    }

    #[test]
    fn wbinvd_budgets_inherit_from_the_default() {
        let text = "default:\n  incoherent_dma: audit\n  wbinvd: { rate: 500, window: 2s }\nrules:\n  - name: tenants\n    match: { vm: \"tenant-*\" }\n    wbinvd: { cost_ratio: 0.01, action: kill }\n  - name: gpu\n    match: { vm: \"gpu-*\" }\n    incoherent_dma: allow\n";
        let p = Policy::parse(text, "t").unwrap();
        let t = p.evaluate(&proc("tenant-1")).budget;
        assert_eq!(
            (t.rate, t.cost_ratio, t.window, t.action),
            (500.0, 0.01, Duration::from_secs(2), StormAction::Kill)
        );
        let g = p.evaluate(&proc("gpu-1")).budget;
        assert_eq!((g.rate, g.cost_ratio, g.action), (500.0, Budget::DEFAULT.cost_ratio, StormAction::Alert));
        // The tenant rule set only a budget: its incoherent_dma is the default's.
        assert_eq!(p.evaluate(&proc("tenant-1")).action, Action::Audit);
        assert_eq!(Policy::embedded().evaluate(&proc("x")).budget, Budget::DEFAULT);
        for (bad, want) in [
            ("default: { wbinvd: { rate: 0 } }\n", "wbinvd.rate must be a positive"),
            ("default: { wbinvd: { rate: -3 } }\n", "wbinvd.rate"),
            ("default: { wbinvd: { cost_ratio: 0 } }\n", "cost_ratio"),
            ("default: { wbinvd: { window: 10ms } }\n", "between 100ms and 1h"),
            ("default: { wbinvd: { window: soon } }\n", "wbinvd.window"),
            ("default: { wbinvd: { action: reboot } }\n", "unknown variant `reboot`"),
            ("default: { wbinvd: { burst: 3 } }\n", "unknown field `burst`"),
            ("rules:\n  - name: a\n    match: {}\n    wbinvd: { rate: .nan }\n", "rule 1 (\"a\")"),
        ] {
            let err = Policy::parse(bad, "b.yaml").expect_err(bad).to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("# only a comment\n", "empty"),
            ("default:\n  incoherent_dma: maybe\n", "unknown variant `maybe`"),
            ("default:\n  incoherent_dma: audit\n  budget: 3\n", "unknown field `budget`"),
            ("defaults:\n  incoherent_dma: audit\n", "unknown field `defaults`"),
            ("rules:\n  - name: a\n    match: { vmname: x }\n", "unknown field `vmname`"),
            ("rules:\n  - name: a\n", "missing field `match`"),
            ("rules:\n  - match: { vm: x }\n", "missing field `name`"),
            ("rules:\n  - name: \"\"\n    match: {}\n", "must not be empty"),
            ("rules:\n  - name: a\n    match: {}\n  - name: a\n    match: {}\n", "already exists"),
            ("rules:\n  - name: a\n    match: { vm: \"[\" }\n", "bad glob"),
            ("rules:\n  - name: a\n    match: { vm: \"\" }\n", "must not be empty"),
            ("rules:\n  - name: a\n    match: { uid: -1 }\n", "did not match any variant"),
            ("rules:\n  - name: a\n    match: { uid: [] }\n", "at least one uid"),
            ("rules:\n  - name: a\n    match: {}\n    devices: []\n", "`devices` is empty"),
            ("rules: 7\n", "invalid type"),
            ("- just\n- a list\n", "invalid type"),
            ("default: {incoherent_dma: audit\n", "line"),
            ("default:\n  incoherent_dma: audit\ndefault:\n  incoherent_dma: deny\n", "duplicate"),
        ];
        for (text, want) in cases {
            let err = Policy::parse(text, "bad.yaml").expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(err.starts_with("bad.yaml"), "{err}");
        }
        let err = Policy::parse("rules:\n  - name: a\n    match: { vmname: x }\n", "bad.yaml").unwrap_err();
        assert!(matches!(err, PolicyError::Syntax { line: 3, .. }), "{err:?}");
        assert!(Policy::load(Path::new("/nonexistent/p.yaml")).is_err());
    }
}
