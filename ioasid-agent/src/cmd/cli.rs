//! Command line (clap derive). One subcommand per module under `cmd/`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{kernel::loader::IoctlHooks, output::audit::DEFAULT_AUDIT_PATH, util::units};

#[derive(Parser, Debug)]
#[command(
    name = "ioasid-agent",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("IOASID_COMMIT"), ")"),
    about = "Audits and enforces incoherent (no-snoop) DMA on KVM hosts, and measures guest WBINVD per VM",
    long_about = "ioasid-agent loads eBPF programs onto KVM's WBINVD paths and the KVM/VFIO/iommufd ioctls.\n\
                  It counts every guest WBINVD/INVD per VM, judges every incoherent-DMA enable \
                  (KVM_DEV_VFIO_FILE_ADD) against a policy and enforces it in the kernel, writes an audit \
                  log and exports Prometheus metrics. Needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)."
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "IOASID_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `ioasid_agent=debug`.
    #[arg(long, global = true, default_value = "info", env = "IOASID_LOG")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: attach the hooks, enforce the policy, serve /metrics.
    Run(Box<RunArgs>),
    /// Print which hooks this kernel allows (loads and attaches each, then exits).
    Status(StatusArgs),
    /// Policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Live per-VM view of a running agent (WBINVD rate, handler time, storms, incoherent DMA).
    Top(TopArgs),
    /// Evaluate recorded requests (an audit log or a `run --record` file) against a policy.
    Replay(ReplayArgs),
    /// Ask a running agent's probe listener whether it is alive or ready (exit 0 if so, 1 with
    /// the reason if not): an exec probe no other pod can delay.
    Probe(ProbeArgs),
    /// The duty cycle's guard, started by the agent itself (see the throttle docs): continues
    /// what the duty cycle held stopped once the agent's pipe on standard input closes.
    #[command(hide = true)]
    DutyGuard {
        /// The asks map's fd, inherited: a VMM the kernel holds for a decision is left stopped.
        #[arg(long)]
        asks_fd: Option<i32>,
    },
    /// The reference documentation generated from the code (`cargo xtask docs` writes it to
    /// docs/).
    #[command(hide = true)]
    Reference {
        #[arg(value_enum)]
        what: Reference,
        /// `man`: write every page (ioasid-agent(1) and one per subcommand) into this directory
        /// instead of printing ioasid-agent(1).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

/// What `reference` prints.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Reference {
    /// The command line (docs/cli.md), from clap.
    Cli,
    /// Every metric family (docs/metrics.md), from the registry.
    Metrics,
    /// The man pages (roff), from clap: the Debian package installs them.
    Man,
    /// Shell completions, from clap.
    Bash,
    Zsh,
    Fish,
}

/// Every man page (ioasid-agent(1), ioasid-agent-run(1), ...) into `dir`.
pub fn man_pages(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)
}

/// The man page or a shell's completions (`reference man|bash|zsh|fish`).
pub fn generated(what: Reference) -> Vec<u8> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    let shell = match what {
        Reference::Man => {
            // Writing into a Vec does not fail.
            let _ = clap_mangen::Man::new(cmd).render(&mut out);
            return out;
        }
        Reference::Bash => clap_complete::Shell::Bash,
        Reference::Zsh => clap_complete::Shell::Zsh,
        Reference::Fish => clap_complete::Shell::Fish,
        Reference::Cli | Reference::Metrics => return Vec::new(),
    };
    clap_complete::generate(shell, &mut cmd, "ioasid-agent", &mut out);
    out
}

/// The command-line reference in Markdown: every (visible) subcommand's long help, as clap
/// renders it at 100 columns, with environment values hidden (the output never depends on the
/// machine it ran on).
pub fn reference() -> String {
    use clap::CommandFactory;
    fn walk(cmd: &mut clap::Command, path: &str, out: &mut String) {
        let mut cmd = std::mem::take(cmd).term_width(100).mut_args(|a| a.hide_env_values(true));
        let name =
            if path.is_empty() { cmd.get_name().to_string() } else { format!("{path} {}", cmd.get_name()) };
        let help = cmd.render_long_help().to_string();
        let help: Vec<&str> = help.lines().map(str::trim_end).collect();
        out.push_str(&format!("## `{name}`\n\n```text\n{}\n```\n\n", help.join("\n").trim_end()));
        for sub in cmd.get_subcommands_mut().filter(|c| !c.is_hide_set()) {
            walk(sub, &name, out);
        }
    }
    let mut out = String::new();
    let mut cmd = Cli::command();
    cmd.build();
    walk(&mut cmd, "", &mut out);
    out.trim_end().to_string() + "\n"
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// Which probe.
    #[arg(value_enum)]
    pub what: ProbeKind,
    /// The agent's probe listener (`run --probe-listen`), or its --listen address.
    #[arg(long, default_value = "127.0.0.1:9478")]
    pub addr: SocketAddr,
    /// How long to wait for the answer; 100ms to 1h.
    #[arg(long, value_parser = units::refresh_interval, default_value = "2s")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProbeKind {
    /// /healthz: the event loop sweeps and the ring buffer reader runs.
    Live,
    /// /readyz: every required hook attached, running VMMs classified, open asks decided.
    Ready,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Address of the Prometheus endpoint. Loopback by default: expose it deliberately.
    #[arg(long, default_value = "127.0.0.1:9477")]
    pub listen: SocketAddr,
    /// A second listener that answers only the probes (/healthz, /readyz), with connections of
    /// its own: scrapers and floods on --listen never delay them. The DaemonSet binds it to
    /// 127.0.0.1 (reachable only inside the pod) and probes it with `ioasid-agent probe`.
    #[arg(long, value_name = "ADDR")]
    pub probe_listen: Option<SocketAddr>,
    /// Policy file (YAML). Without it the embedded default policy runs: audit everything.
    #[arg(long, value_name = "PATH")]
    pub policy: Option<PathBuf>,
    /// Audit log (JSON lines, appended), reopened when rotated; `-` writes records to stdout.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_AUDIT_PATH)]
    pub audit_log: PathBuf,
    /// Also send every audit record to the local syslog daemon at this datagram socket (RFC
    /// 5424, facility authpriv), e.g. /dev/log.
    #[arg(long, value_name = "SOCKET")]
    pub audit_syslog: Option<PathBuf>,
    /// Also write every judged request to this file, for `replay`.
    #[arg(long, value_name = "PATH")]
    pub record: Option<PathBuf>,
    /// Observe and audit only: never stop or kill a process.
    #[arg(long)]
    pub dry_run: bool,
    /// Attach only the tracepoint hooks (no fentry/fexit/LSM), e.g. to compare overheads.
    #[arg(long)]
    pub no_optional_hooks: bool,
    /// How often the kernel counters are read (scrapes also read them); 10ms to 10s.
    #[arg(long, value_parser = units::sweep_interval, default_value = "100ms")]
    pub sweep_interval: Duration,
    /// How long a VM whose process exited is still reported; 1s to 7 days.
    #[arg(long, value_parser = units::retention, default_value = "5m")]
    pub vm_retention: Duration,
    /// Program family for the ioctl path.
    #[arg(long, value_enum, default_value_t = IoctlHooksArg::Auto)]
    pub ioctl_hooks: IoctlHooksArg,
    /// How a denied incoherent-DMA enable is stopped: `lsm` refuses it with EPERM before it
    /// runs (the VMM lives; attached only while the policy has a deny, and every ioctl on the
    /// host then passes one compare), `signal` kills the VMM from KVM's own FILE_ADD path
    /// (nothing on any other ioctl). Where the LSM cannot load, the signal serves.
    #[arg(long, value_enum, default_value_t = EnforceWith::Lsm)]
    pub enforce_with: EnforceWith,
    /// Turn on kernel BPF run-time statistics and export each program's runs and in-kernel
    /// time (ioasid_program_runs_total, ioasid_program_run_seconds_total). Costs a little per run.
    #[arg(long)]
    pub bpf_stats: bool,
    /// Tests only (feature fault-injection): discard every kernel event, as if the ring buffer
    /// were always full.
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    pub test_drop_events: bool,
    /// Where `action: throttle` records each CPU limit it changed, with the exact previous
    /// setting, before changing it: a restarted agent puts them all back.
    #[arg(long, value_name = "PATH", default_value = "/run/ioasid/throttle.json")]
    pub throttle_state: PathBuf,
    /// Tests only (feature fault-injection): never read the decisions ring (the kernel's own
    /// fallback is exercised).
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    pub test_stall_decisions: bool,
    /// Benchmarks only: count WBINVD/INVD with the exit and emulation tracepoints (and read each
    /// flush's CPUs from the generic cross-CPU call) even where KVM's handlers can: the
    /// configuration before ioasid counted from the handlers, measured beside it.
    #[arg(long, hide = true)]
    pub count_with_tracepoints: bool,
    /// Benchmarks only: attach an empty program of the same type at every hook instead of the
    /// real ones (what the attachments alone cost). Observes nothing; implies --dry-run.
    #[arg(long, hide = true)]
    pub empty_programs: bool,
    /// Lock file naming the running agent's pid. The single-instance guarantee does not rest on
    /// it: a kernel-side marker also stops a second agent with any other lock file.
    #[arg(long, value_name = "PATH", default_value = "/run/ioasid-agent.lock")]
    pub lock_file: PathBuf,
    /// Directory on a BPF filesystem where the kernel state that outlives the agent is pinned
    /// (open asks, counters, non-coherent VMs): a restarted or upgraded agent adopts it.
    #[arg(long, value_name = "PATH", default_value = crate::kernel::loader::state::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Write the bound listen address here once every hook is attached (readiness).
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Program family for the ioctl path (as for `run`).
    #[arg(long, value_enum, default_value_t = IoctlHooksArg::Auto)]
    pub ioctl_hooks: IoctlHooksArg,
    /// As for `run` (status attaches what a policy with a deny would).
    #[arg(long, value_enum, default_value_t = EnforceWith::Lsm)]
    pub enforce_with: EnforceWith,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `--enforce-with`: how denials are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EnforceWith {
    /// BPF LSM file_ioctl: EPERM before the request runs (while the policy has a deny).
    Lsm,
    /// bpf_send_signal from KVM's FILE_ADD path: the VMM is killed before it runs a guest.
    Signal,
}

/// `--ioctl-hooks`: which program family serves the ioctl path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IoctlHooksArg {
    /// KVM's, VFIO's and iommufd's own ioctl functions where trampolines load (nothing else
    /// pays), else the LSM (no syscall tracepoint) where BPF LSM loads, else tp_btf where the
    /// kernel allows it, else classic tracepoints.
    Auto,
    /// Only fentry programs on KVM's, VFIO's and iommufd's ioctl functions.
    Functions,
    /// Only lsm/file_ioctl + fexit/kvm_vfio_set_attr: unrelated syscalls pay nothing.
    Lsm,
    /// Only tp_btf sys_enter/sys_exit.
    TpBtf,
    /// Only the classic syscalls:sys_enter_ioctl/sys_exit_ioctl tracepoints.
    Tracepoint,
}

impl From<IoctlHooksArg> for IoctlHooks {
    fn from(a: IoctlHooksArg) -> Self {
        match a {
            IoctlHooksArg::Auto => IoctlHooks::Auto,
            IoctlHooksArg::Functions => IoctlHooks::Functions,
            IoctlHooksArg::Lsm => IoctlHooks::Lsm,
            IoctlHooksArg::TpBtf => IoctlHooks::TpBtf,
            IoctlHooksArg::Tracepoint => IoctlHooks::Tracepoint,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Validate a policy file; exit status 1 with the error if it is invalid.
    Check {
        /// The policy file.
        path: PathBuf,
    },
    /// Write a policy learned from audit logs: what ran is let through again (same decision),
    /// one rule per VMM executable, uid and VM name pattern, with its devices and WBINVD budgets;
    /// the rest denied.
    Learn {
        /// Audit logs (JSON lines), e.g. /var/log/ioasid/audit.jsonl and its rotations.
        #[arg(required = true)]
        logs: Vec<PathBuf>,
        /// WBINVD budgets: the highest recorded storm rate plus this share (0.5 = 50 %).
        #[arg(long, default_value_t = 0.5)]
        margin: f64,
        /// Write the policy here instead of to stdout.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
        /// Also watch the logs live this long (e.g. `10m`) while a running agent appends to
        /// them (a rotation is followed: renamed away, the rest of the old file is read and the
        /// new file followed), then learn from everything seen.
        #[arg(long, value_name = "DURATION", value_parser = units::follow_duration)]
        follow: Option<Duration>,
    },
}

#[derive(Args, Debug)]
pub struct TopArgs {
    /// The agent's metrics address.
    #[arg(long, default_value = "127.0.0.1:9477")]
    pub url: String,
    /// Refresh interval.
    #[arg(long, value_parser = units::refresh_interval, default_value = "1s")]
    pub interval: Duration,
    /// Print one frame and exit.
    #[arg(long)]
    pub once: bool,
    /// Sort order (`s` cycles it in the terminal).
    #[arg(long, value_enum, default_value_t = TopSort::Rate)]
    pub sort: TopSort,
    /// Only VMs whose name contains this text, any case (`/` in the terminal).
    #[arg(long, value_name = "TEXT")]
    pub filter: Option<String>,
    /// The victims view (`v` in the terminal): flush IPIs sent and received, time stolen and
    /// who took it, per VM, most stolen first.
    #[arg(long)]
    pub victims: bool,
}

/// `top`'s sort orders.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopSort {
    /// WBINVD per second (storming VMs first).
    Rate,
    /// Handler time over wall time (storming VMs first).
    Cost,
    /// WBINVD count.
    Wbinvd,
    /// VM name.
    Name,
}

impl TopSort {
    pub fn next(self) -> Self {
        match self {
            TopSort::Rate => TopSort::Cost,
            TopSort::Cost => TopSort::Wbinvd,
            TopSort::Wbinvd => TopSort::Name,
            TopSort::Name => TopSort::Rate,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            TopSort::Rate => "WBINVD/s",
            TopSort::Cost => "cost",
            TopSort::Wbinvd => "WBINVD",
            TopSort::Name => "name",
        }
    }
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// Recorded requests: JSON lines as written to the audit log or by `run --record`.
    pub events: PathBuf,
    /// The policy to evaluate them against.
    #[arg(long, value_name = "PATH")]
    pub policy: PathBuf,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_flags_are_errors_not_panics() {
        for args in [
            vec!["ioasid-agent", "run", "--listen", "nope"],
            vec!["ioasid-agent", "run", "--sweep-interval", "fast"],
            vec!["ioasid-agent", "policy", "check"],
            vec!["ioasid-agent", "replay", "x.jsonl"],
            vec!["ioasid-agent", "--log-format", "xml", "status"],
            vec!["ioasid-agent", "frobnicate"],
        ] {
            assert!(Cli::try_parse_from(&args).is_err(), "{args:?}");
        }
        assert!(Cli::try_parse_from(["ioasid-agent", "run"]).is_ok());
    }
}
