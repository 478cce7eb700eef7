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

pub fn write(root: &Path) -> Result<()> {
    let path = root.join("README.md");
    let readme = std::fs::read_to_string(&path)?;
    std::fs::write(&path, render(&readme)?)?;
    eprintln!("xtask: {} regenerated", path.display());
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
}
