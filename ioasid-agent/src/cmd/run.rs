//! `run`: the agent itself, from its command-line arguments.

use crate::{agent::daemon, cmd::cli::RunArgs, kernel::loader};

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    if args.empty_programs {
        tracing::warn!(
            "--empty-programs: benchmark baseline, empty programs attached; nothing is observed or enforced"
        );
    }
    let cfg = daemon::RunConfig {
        listen: args.listen,
        probe_listen: args.probe_listen,
        policy: args.policy.clone(),
        audit_log: args.audit_log.clone(),
        audit_syslog: args.audit_syslog.clone(),
        record: args.record.clone(),
        load: loader::LoadOptions {
            enforce: !args.dry_run && !args.empty_programs,
            optional_hooks: !args.no_optional_hooks,
            ioctl_hooks: args.ioctl_hooks.into(),
            // The daemon turns this Off while the policy has no deny.
            // With --empty-programs a deny policy attaches the LSM's empty twin: what the
            // benchmarks compare a deny policy's program with.
            lsm_deny: if args.dry_run {
                loader::LsmDeny::Never("not enforcing (--dry-run)")
            } else if args.enforce_with == crate::cmd::cli::EnforceWith::Signal {
                loader::LsmDeny::Never("--enforce-with signal: denials kill from KVM's FILE_ADD path")
            } else {
                loader::LsmDeny::On
            },
            strict: true,
            empty_programs: args.empty_programs,
            count_with_tracepoints: args.count_with_tracepoints,
            state_dir: (!args.empty_programs).then(|| args.state_dir.clone()),
        },
        sweep: args.sweep_interval,
        retention: args.vm_retention,
        ready_file: args.ready_file.clone(),
        lock_file: args.lock_file.clone(),
        bpf_stats: args.bpf_stats,
        throttle_state: args.throttle_state.clone(),
    };
    #[cfg(feature = "fault-injection")]
    let faults =
        daemon::Faults { drop_events: args.test_drop_events, stall_decisions: args.test_stall_decisions };
    #[cfg(not(feature = "fault-injection"))]
    let faults = daemon::Faults::default();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(daemon::run(cfg, faults))
}
