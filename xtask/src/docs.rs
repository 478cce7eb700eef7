//! The README's generated sections: produced from the code, checked by a test, so the README
//! never drifts from what the agent does.

use std::path::Path;

use anyhow::{Context, Result};
use ioasid_common::hooks::{HookKind, HOOKS};

const BEGIN: &str = "<!-- generated: hooks (cargo xtask docs) -->";
const END: &str = "<!-- end generated: hooks -->";

/// The hook table in Markdown, from `ioasid_common::hooks::HOOKS`.
pub fn hook_table() -> String {
    let mut out =
        String::from("| hook | attaches to | need | alternatives | purpose |\n|---|---|---|---|---|\n");
    for h in HOOKS {
        let kind = match h.kind {
            HookKind::TracePoint { .. } => "tracepoint",
            HookKind::BtfTracePoint { .. } => "tp_btf (raw tracepoint with BTF)",
            HookKind::FEntry { .. } => "fentry (trampoline)",
            HookKind::FExit { .. } => "fexit (trampoline)",
            HookKind::Lsm { .. } => "BPF LSM",
        };
        let need = if h.optional { "optional" } else { "required" };
        let alternatives: Vec<&str> = HOOKS
            .iter()
            .filter(|o| o.group.is_some() && o.group == h.group && o.hook != h.hook)
            .map(|o| o.hook)
            .collect();
        let alternatives = if alternatives.is_empty() { "-".to_string() } else { alternatives.join(", ") };
        out.push_str(&format!("| `{}` | {kind} | {need} | {alternatives} | {} |\n", h.hook, h.purpose));
    }
    out
}

/// The README with its generated section replaced.
pub fn render(readme: &str) -> Result<String> {
    let start = readme.find(BEGIN).context("README has no generated hook table marker")?;
    let end = readme.find(END).context("README has no end marker of the hook table")?;
    Ok(format!("{}{BEGIN}\n{}{}", &readme[..start], hook_table(), &readme[end..]))
}

/// The Prometheus Operator's PrometheusRule, from the one rules file
/// (dashboards/prometheus/ioasid-rules.yaml): its groups, indented under `spec`.
pub fn prometheus_rule(rules: &str) -> String {
    let mut out = String::from(
        "# Generated from dashboards/prometheus/ioasid-rules.yaml by `cargo xtask docs`; do not edit.\n\
         apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n  name: ioasid\n  \
         namespace: ioasid-system\n  labels: { app.kubernetes.io/name: ioasid }\nspec:\n",
    );
    for line in rules.lines().skip_while(|l| l.starts_with('#') || l.trim().is_empty()) {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

pub const PROMETHEUS_RULE: &str = "deploy/kubernetes/prometheusrule.yaml";
pub const RULES: &str = "dashboards/prometheus/ioasid-rules.yaml";

pub fn write(root: &Path) -> Result<()> {
    let path = root.join("README.md");
    let readme = std::fs::read_to_string(&path)?;
    std::fs::write(&path, render(&readme)?)?;
    eprintln!("xtask: {} regenerated", path.display());
    let rules = std::fs::read_to_string(root.join(RULES))?;
    std::fs::write(root.join(PROMETHEUS_RULE), prometheus_rule(&rules))?;
    eprintln!("xtask: {PROMETHEUS_RULE} regenerated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readme_hook_table_is_current() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        assert_eq!(
            render(&readme).unwrap(),
            readme,
            "the README's hook table is stale: run `cargo xtask docs`"
        );
        assert_eq!(hook_table().lines().count(), HOOKS.len() + 2);
    }

    #[test]
    fn prometheus_rule_is_current() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let rules = std::fs::read_to_string(root.join(RULES)).unwrap();
        let current = std::fs::read_to_string(root.join(PROMETHEUS_RULE)).unwrap_or_default();
        assert_eq!(current, prometheus_rule(&rules), "{PROMETHEUS_RULE} is stale: run `cargo xtask docs`");
    }
}
