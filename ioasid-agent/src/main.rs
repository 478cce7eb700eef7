//! ioasid-agent: the daemon and CLI. See README.md.

mod accounting;
mod actor;
mod audit;
mod blast;
mod btf;
mod cli;
mod cmd;
mod daemon;
mod enforce;
mod events;
#[cfg(test)]
mod fuzz;
mod http;
mod instance;
mod kernel;
mod loader;
mod policy;
mod procfs;
mod promtext;
mod ring;
mod storm;
mod sys;
mod telemetry;
mod text;
mod throttle;
mod tracefs;
mod units;
mod vfio;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command, LogFormat, PolicyCommand};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|e| {
        eprintln!("ioasid-agent: bad --log filter {:?} ({e}); using `info`", cli.log);
        EnvFilter::new("info")
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let result = match &cli.command {
        Command::Run(args) => run(args),
        Command::Status(args) => cmd::status::run(args),
        Command::Policy(PolicyCommand::Check { path }) => cmd::policy::check(path),
        Command::Policy(PolicyCommand::Learn { logs, margin, out, follow }) => {
            cmd::learn::run(logs, *margin, out.as_deref(), *follow)
        }
        Command::Replay(args) => cmd::replay::run(args),
        Command::Top(args) => cmd::top::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ioasid-agent: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &cli::RunArgs) -> anyhow::Result<()> {
    if args.empty_programs {
        tracing::warn!(
            "--empty-programs: benchmark baseline, empty programs attached; nothing is observed or enforced"
        );
    }
    let cfg = daemon::RunConfig {
        listen: args.listen,
        policy: args.policy.clone(),
        audit_log: args.audit_log.clone(),
        audit_syslog: args.audit_syslog.clone(),
        record: args.record.clone(),
        load: loader::LoadOptions {
            enforce: !args.dry_run && !args.empty_programs,
            optional_hooks: !args.no_optional_hooks,
            ioctl_hooks: args.ioctl_hooks.into(),
            strict: true,
            empty_programs: args.empty_programs,
            state_dir: (!args.empty_programs).then(|| args.state_dir.clone()),
        },
        sweep: args.sweep_interval,
        retention: args.vm_retention,
        ready_file: args.ready_file.clone(),
        lock_file: args.lock_file.clone(),
        bpf_stats: args.bpf_stats,
        test_drop_events: args.test_drop_events,
        test_stall_decisions: args.test_stall_decisions,
        throttle_state: args.throttle_state.clone(),
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(daemon::run(cfg))
}
