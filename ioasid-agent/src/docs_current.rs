//! The generated reference docs match the code: docs/metrics.md's table is the registry's,
//! docs/cli.md is clap's. `cargo xtask docs` rewrites both.

use std::path::Path;

fn doc(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_metrics_reference_is_current() {
    let text = doc("metrics.md");
    let begin = "<!-- generated: metrics (cargo xtask docs) -->\n";
    let (Some(a), Some(b)) = (text.find(begin), text.find("<!-- end generated: metrics -->")) else {
        panic!("docs/metrics.md has no generated-table markers");
    };
    let table = crate::output::telemetry::reference();
    assert_eq!(&text[a + begin.len()..b], table, "docs/metrics.md is stale: run `cargo xtask docs`");
    // Every family the agent registers is in it, the process collector's included.
    for name in ["ioasid_wbinvd_exits_total", "ioasid_wbinvd_handler_seconds", "process_open_fds"] {
        assert!(table.contains(&format!("`{name}`")), "{name} missing");
    }
}

#[test]
fn the_cli_reference_is_current() {
    let text = doc("cli.md");
    assert!(text.ends_with(&crate::cmd::cli::reference()), "docs/cli.md is stale: run `cargo xtask docs`");
    for sub in ["run", "status", "policy check", "policy learn", "top", "replay"] {
        assert!(text.contains(&format!("## `ioasid-agent {sub}`")), "{sub} missing");
    }
    assert!(!text.contains("## `ioasid-agent reference"), "hidden subcommands stay out of the reference");
}
