//! The policy file format (serde, strict) and its compilation into a [`Policy`].

use std::{path::PathBuf, time::Duration};

use globset::{Glob, GlobMatcher, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use super::{Action, Budget, Policy, Rule, StormAction, UnknownCoherency};
use crate::util::units::parse_duration;

/// A policy file as written: what `Policy::parse` reads and `policy learn` writes (one schema).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub default: DefaultSection,
    #[serde(default)]
    pub rules: Vec<RuleFile>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultSection {
    #[serde(default = "default_action")]
    pub incoherent_dma: Action,
    /// What a FILE_ADD of a file whose coherency is unknown gets.
    #[serde(default)]
    pub unknown_coherency: UnknownCoherency,
    #[serde(default, skip_serializing_if = "BudgetFile::is_empty")]
    pub wbinvd: BudgetFile,
}

impl Default for DefaultSection {
    fn default() -> Self {
        Self {
            incoherent_dma: default_action(),
            unknown_coherency: UnknownCoherency::default(),
            wbinvd: BudgetFile::default(),
        }
    }
}

/// What to do when a VM goes over its WBINVD budget.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetFile {
    /// WBINVD per second, averaged over the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Share of wall time KVM spent handling the VM's WBINVD over the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_ratio: Option<f64>,
    /// `250ms`, `1s`, `2m`...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<StormAction>,
    /// Share of the VM's time other VMs' flushes may take on its CPUs (blast radius).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub victim_stolen_ratio: Option<f64>,
}

impl BudgetFile {
    fn is_empty(&self) -> bool {
        self.rate.is_none()
            && self.cost_ratio.is_none()
            && self.window.is_none()
            && self.action.is_none()
            && self.victim_stolen_ratio.is_none()
    }
}

/// What is wrong with a `wbinvd:` budget (of `default` or of a rule).
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("wbinvd.rate must be a positive number of WBINVD per second")]
    Rate,
    #[error("wbinvd.cost_ratio must be a positive share of wall time (0.05 = 5 %)")]
    CostRatio,
    #[error("wbinvd.window: {0}")]
    WindowText(#[from] crate::util::units::UnitError),
    #[error("wbinvd.window must be between 100ms and 1h")]
    Window,
    #[error("wbinvd.victim_stolen_ratio must be a share of time in (0, 1] (0.01 = 1 %)")]
    VictimStolenRatio,
}

/// A compiled WBINVD budget.
fn compile_budget(f: &BudgetFile, base: &Budget) -> Result<Budget, BudgetError> {
    let rate = f.rate.unwrap_or(base.rate);
    if !(rate.is_finite() && rate > 0.0) {
        return Err(BudgetError::Rate);
    }
    let cost_ratio = f.cost_ratio.unwrap_or(base.cost_ratio);
    if !(cost_ratio.is_finite() && cost_ratio > 0.0) {
        return Err(BudgetError::CostRatio);
    }
    let window = match &f.window {
        None => base.window,
        Some(w) => parse_duration(w)?,
    };
    if window < Duration::from_millis(100) || window > Duration::from_secs(3600) {
        return Err(BudgetError::Window);
    }
    let victim_stolen_ratio = f.victim_stolen_ratio.unwrap_or(base.victim_stolen_ratio);
    if !(victim_stolen_ratio.is_finite() && victim_stolen_ratio > 0.0 && victim_stolen_ratio <= 1.0) {
        return Err(BudgetError::VictimStolenRatio);
    }
    Ok(Budget { rate, cost_ratio, window, action: f.action.unwrap_or(base.action), victim_stolen_ratio })
}

fn default_action() -> Action {
    Action::Audit
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: MatchFile,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incoherent_dma: Option<Action>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown_coherency: Option<UnknownCoherency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wbinvd: Option<BudgetFile>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<Uids>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Uids {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The reason is in the message itself (not a `source` too: a chain would say it twice).
    #[error("{path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax { path: PathBuf, line: usize, column: usize, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Parses, validates and compiles a policy text; `source` names it in errors.
/// How deep a policy may nest: flow collections (`[`, `{`) inside each other, and block
/// structure (indentation, counting each `- ` or `? ` that opens a collection on a line). A
/// real policy nests 4-5 levels; a hostile one nested thousands deep takes the YAML parser
/// seconds per hundred kilobytes.
pub const MAX_NESTING: usize = 16;
pub const MAX_INDENT: usize = 64;
/// Rules per policy: each compiles its patterns, and every VMM is matched against them in order.
pub const MAX_RULES: usize = 1024;

/// Text nested beyond the limits, at a line.
#[derive(Debug, thiserror::Error)]
enum TooDeep {
    #[error("nested too deep: indented more than {MAX_INDENT} columns")]
    Indent { line: usize },
    #[error("nested too deep: more than {MAX_NESTING} levels of [ ] or {{ }}")]
    Brackets { line: usize },
}

/// Rejects text nested beyond the limits before the YAML parser sees it.
fn check_shape(text: &str) -> Result<(), TooDeep> {
    let mut depth = 0usize;
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let mut rest = line;
        let mut indent = 0;
        loop {
            let trimmed = rest.trim_start_matches(' ');
            indent += rest.len() - trimmed.len();
            match trimmed.get(..2) {
                Some("- " | "? ") => {
                    indent += 2;
                    rest = &trimmed[2..];
                }
                _ => break,
            }
        }
        if indent > MAX_INDENT && !rest.trim().is_empty() && !rest.trim_start().starts_with('#') {
            return Err(TooDeep::Indent { line: line_no });
        }
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(c),
                (None, '#') if prev == ' ' || prev == '\t' => break,
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_NESTING {
                        return Err(TooDeep::Brackets { line: line_no });
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
            prev = c;
        }
    }
    Ok(())
}

pub(super) fn compile(text: &str, source: &str) -> Result<Policy, PolicyError> {
    let path = PathBuf::from(source);
    let invalid = |message: String| PolicyError::Invalid { path: path.clone(), message };
    if text.trim().is_empty() || text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Err(invalid(
            "the policy is empty (write at least `default: {incoherent_dma: audit}`)".into(),
        ));
    }
    check_shape(text).map_err(|e| PolicyError::Syntax {
        path: path.clone(),
        line: match e {
            TooDeep::Indent { line } | TooDeep::Brackets { line } => line,
        },
        column: 1,
        message: e.to_string(),
    })?;
    let file: PolicyFile = serde_norway::from_str(text).map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        let mut message = e.to_string();
        // The location is already in front; drop the library's own " at line L column C".
        if let Some(cut) = message.rfind(" at line ") {
            message.truncate(cut);
        }
        PolicyError::Syntax { path: path.clone(), line, column, message }
    })?;
    let default_budget = compile_budget(&file.default.wbinvd, &Budget::DEFAULT)
        .map_err(|e| invalid(format!("default: {e}")))?;
    if file.rules.len() > MAX_RULES {
        return Err(invalid(format!(
            "{} rules: at most {MAX_RULES} (group VMs with patterns)",
            file.rules.len()
        )));
    }
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
                    let g =
                        Glob::new(d).map_err(|e| invalid(format!("{what}: devices: bad glob {d:?}: {e}")))?;
                    set.add(g);
                }
                let set = set.build().map_err(|e| invalid(format!("{what}: devices: {e}")))?;
                Some((list, set))
            }
        };
        let budget = match &r.wbinvd {
            None => default_budget,
            Some(b) => compile_budget(b, &default_budget).map_err(|e| invalid(format!("{what}: {e}")))?,
        };
        rules.push(Rule {
            budget,
            vm: glob("vm", &r.matcher.vm)?,
            cgroup: glob("cgroup", &r.matcher.cgroup)?,
            exe: glob("exe", &r.matcher.exe)?,
            uids,
            incoherent_dma: r.incoherent_dma.unwrap_or(file.default.incoherent_dma),
            unknown_coherency: r.unknown_coherency.unwrap_or(file.default.unknown_coherency),
            devices,
            name: r.name,
        });
    }
    Ok(Policy {
        source: source.to_string(),
        default: file.default.incoherent_dma,
        default_unknown: file.default.unknown_coherency,
        default_budget,
        rules,
    })
}
