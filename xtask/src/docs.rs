//! The docs' generated sections: produced from the code, checked by tests, so the docs never
//! drift from what the agent does. The hook table (docs/kernels.md) and the PrometheusRule come
//! from here; the metrics (docs/metrics.md) and the CLI (docs/cli.md) from the agent itself
//! (`ioasid-agent reference metrics|cli`), whose own unit tests check them.

use std::path::Path;

use anyhow::{bail, Context, Result};
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
            HookKind::KProbe { .. } => "kprobe",
            HookKind::KRetProbe { .. } => "kretprobe",
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

/// Where the hook table lives.
pub const KERNELS: &str = "docs/kernels.md";

/// `text` with the block between `begin` and `end` replaced by `content`.
pub fn replace_block(text: &str, begin: &str, end: &str, content: &str) -> Result<String> {
    let start = text.find(begin).with_context(|| format!("no marker {begin}"))?;
    let stop = text.find(end).with_context(|| format!("no marker {end}"))?;
    Ok(format!("{}{begin}\n{content}{}", &text[..start], &text[stop..]))
}

/// Where the lab's plan lives.
pub const TESTING: &str = "docs/testing.md";

/// docs/testing.md with its generated lab plan replaced.
pub fn render_testing(testing: &str) -> Result<String> {
    replace_block(testing, crate::lab::PLAN_BEGIN, crate::lab::PLAN_END, &crate::lab::plan_table())
}

/// docs/kernels.md with its generated hook table replaced.
pub fn render(kernels: &str) -> Result<String> {
    replace_block(kernels, BEGIN, END, &hook_table())
}

/// What the agent prints for `reference WHAT` (the debug build of this checkout).
fn agent_reference(root: &Path, what: &str) -> Result<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(cargo)
        .current_dir(root)
        .args(["run", "--quiet", "-p", "ioasid-agent", "--", "reference", what])
        .output()
        .context("running ioasid-agent reference")?;
    if !out.status.success() {
        bail!("ioasid-agent reference {what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

pub const METRICS_BEGIN: &str = "<!-- generated: metrics (cargo xtask docs) -->";
pub const METRICS_END: &str = "<!-- end generated: metrics -->";
pub const CLI_HEAD: &str =
    "# Command line\n\nGenerated from the agent's clap definitions by `cargo xtask docs` \
     (`ioasid-agent reference cli`); a test fails when it is stale.\n\n";

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
    let path = root.join(KERNELS);
    let kernels = std::fs::read_to_string(&path)?;
    std::fs::write(&path, render(&kernels)?)?;
    eprintln!("xtask: {} regenerated", path.display());
    let path = root.join("docs/metrics.md");
    let metrics = std::fs::read_to_string(&path)?;
    let table = agent_reference(root, "metrics")?;
    std::fs::write(&path, replace_block(&metrics, METRICS_BEGIN, METRICS_END, &table)?)?;
    eprintln!("xtask: {} regenerated", path.display());
    let path = root.join("docs/cli.md");
    std::fs::write(&path, format!("{CLI_HEAD}{}", agent_reference(root, "cli")?))?;
    eprintln!("xtask: {} regenerated", path.display());
    let path = root.join(TESTING);
    let testing = std::fs::read_to_string(&path)?;
    std::fs::write(&path, render_testing(&testing)?)?;
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
    fn hook_table_is_current() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let kernels = std::fs::read_to_string(root.join(KERNELS)).unwrap();
        assert_eq!(
            render(&kernels).unwrap(),
            kernels,
            "{KERNELS}'s hook table is stale: run `cargo xtask docs`"
        );
        assert_eq!(hook_table().lines().count(), HOOKS.len() + 2);
    }

    #[test]
    fn lab_plan_is_current() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let testing = std::fs::read_to_string(root.join(TESTING)).unwrap();
        assert_eq!(
            render_testing(&testing).unwrap(),
            testing,
            "{TESTING}'s lab plan is stale: run `cargo xtask docs`"
        );
    }

    #[test]
    fn prometheus_rule_is_current() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let rules = std::fs::read_to_string(root.join(RULES)).unwrap();
        let current = std::fs::read_to_string(root.join(PROMETHEUS_RULE)).unwrap_or_default();
        assert_eq!(current, prometheus_rule(&rules), "{PROMETHEUS_RULE} is stale: run `cargo xtask docs`");
    }
}
