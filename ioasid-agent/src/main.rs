//! ioasid-agent: parses the command line, sets up logging and runs the subcommand. Everything
//! else is the library (`lib.rs`).

use clap::Parser;
use tracing_subscriber::EnvFilter;

use ioasid_agent::cmd::{
    self,
    cli::{self, Cli, Command, LogFormat, PolicyCommand},
};

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
    if matches!(cli.command, Command::Run(_) | Command::Status(_)) {
        // Before any BPF object: kernels before 5.11 count them against this limit.
        if let Err(e) = ioasid_agent::host::sys::raise_memlock() {
            tracing::debug!("RLIMIT_MEMLOCK not raised: {e}");
        }
    }
    let result = match &cli.command {
        Command::Run(args) => cmd::run::run(args),
        Command::Status(args) => cmd::status::run(args),
        Command::Policy(PolicyCommand::Check { path }) => cmd::policy::check(path),
        Command::Policy(PolicyCommand::Learn { logs, margin, out, follow }) => {
            cmd::learn::run(logs, *margin, out.as_deref(), *follow)
        }
        Command::Replay(args) => cmd::replay::run(args),
        Command::Top(args) => cmd::top::run(args),
        Command::Probe(args) => cmd::probe::run(args),
        Command::DutyGuard { asks_fd } => {
            duty_guard(*asks_fd);
            Ok(())
        }
        Command::Reference { what: cli::Reference::Man, out: Some(dir) } => cmd::cli::man_pages(dir)
            .map_err(|e| anyhow::anyhow!("writing the man pages into {}: {e}", dir.display())),
        Command::Reference { what, .. } => {
            use std::io::Write as _;
            let text = match what {
                cli::Reference::Cli => cmd::cli::reference().into_bytes(),
                cli::Reference::Metrics => ioasid_agent::output::telemetry::reference().into_bytes(),
                other => cmd::cli::generated(*other),
            };
            std::io::stdout().write_all(&text).map_err(Into::into)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ioasid-agent: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `duty-guard`: see `ioasid_agent::throttle::guard`.
fn duty_guard(asks_fd: Option<i32>) {
    use std::os::fd::{FromRawFd, OwnedFd};
    // A service stop signals every process of the unit: the agent puts back its own throttles and
    // closes the pipe; this process waits for that.
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: sets a signal's disposition to ignored.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let gate = asks_fd.filter(|fd| *fd > 2).map(|fd| {
        // SAFETY: the fd the agent handed down (cleared of close-on-exec for this process).
        ioasid_agent::kernel::AskMapGate::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })
    });
    let procfs = ioasid_agent::host::procfs::ProcFs::at("/proc");
    let gate = gate.as_ref().map(|g| g as &dyn ioasid_agent::engine::ports::AskGate);
    ioasid_agent::throttle::guard::run(std::io::stdin().lock(), &procfs, gate);
}
