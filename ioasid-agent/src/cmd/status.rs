//! `ioasid-agent status`: which hooks this kernel allows, without staying resident.

use anyhow::Result;

use crate::{
    cmd::cli::StatusArgs,
    kernel::loader::{self, HookState, LoadOptions},
};

pub fn run(args: &StatusArgs) -> Result<()> {
    // Enforcement stays off: nothing is judged while status runs.
    let loaded = loader::load(&LoadOptions {
        enforce: false,
        optional_hooks: true,
        ioctl_hooks: args.ioctl_hooks.into(),
        strict: false,
        empty_programs: false,
        count_with_tracepoints: false,
        // What a policy with a deny gets.
        lsm_deny: match args.enforce_with {
            crate::cmd::cli::EnforceWith::Lsm => loader::LsmDeny::On,
            crate::cmd::cli::EnforceWith::Signal => {
                loader::LsmDeny::Never("--enforce-with signal: denials kill from KVM's FILE_ADD path")
            }
        },
        // Never the agent's pinned maps: status's programs would count into its counters.
        state_dir: None,
    })?;
    if args.json {
        println!("{}", json(&loaded));
    } else {
        text(&loaded);
    }
    Ok(())
}

/// `status --json`: every hook with its state and typed refusal, and what serves where.
fn json(loaded: &loader::Loaded) -> serde_json::Value {
    let hooks: Vec<serde_json::Value> = loaded
        .hooks
        .iter()
        .map(|h| {
            serde_json::json!({
                "hook": h.spec.hook,
                "optional": h.spec.optional,
                "attached": h.attached(),
                "standby": matches!(h.state, HookState::Standby(_)),
                "reason": match &h.state {
                    HookState::Refused(r) => Some(r.to_string()),
                    HookState::Standby(by) => Some(format!("{by} serves instead")),
                    HookState::Attached => None,
                },
                "refusal": match &h.state {
                    HookState::Refused(r) => Some(r),
                    _ => None,
                },
                "purpose": h.spec.purpose,
            })
        })
        .collect();
    let blast = loaded.blast_radius();
    let mut groups: Vec<&str> = loaded.hooks.iter().filter_map(|h| h.spec.group).collect();
    groups.dedup();
    let (filter_on, filter_reason) = match &loaded.file_filter {
        loader::FileFilter::On => (true, None),
        loader::FileFilter::Off(why) => (false, Some(why.to_string())),
    };
    serde_json::json!({
        "hooks": hooks,
        "enforcement_mechanism": loaded.mechanism(true).label(),
        "cost_source": loaded.cost_source().label(),
        "count_source": loaded.count_source(),
        "ioctl_hooks": loaded.ioctl_family().label(),
        "file_filter": { "on": filter_on, "reason": filter_reason },
        "blast_radius": { "on": blast.is_ok(), "reason": blast.err().map(|e| e.to_string()) },
        // Each group of alternatives and the hook that serves it (null: none does).
        "serving": groups.into_iter().map(|g| (g, loaded.serving(g))).collect::<std::collections::BTreeMap<_, _>>(),
    })
}

/// `status`: one line per hook, then what serves where.
fn text(loaded: &loader::Loaded) {
    for h in &loaded.hooks {
        println!("{h}");
    }
    println!("enforcement mechanism for incoherent-DMA denials: {}", loaded.mechanism(true));
    println!("WBINVD/INVD counted by: {}", loaded.count_source());
    println!("WBINVD handler time source: {}", loaded.cost_source().label());
    println!("ioctl path: {}", loaded.ioctl_family());
    match loaded.blast_radius() {
        Ok(()) => println!("blast radius (victims of WBINVD flushes): measured"),
        Err(why) => println!("blast radius (victims of WBINVD flushes): not measured: {why}"),
    }
    match &loaded.file_filter {
        loader::FileFilter::On => println!("reported: watched requests on KVM, VFIO and iommufd files only"),
        loader::FileFilter::Off(why) => println!("reported: watched requests on any file ({why})"),
    }
}
