//! Project tasks: `cargo xtask setup | build | run | test | lint | bench | storm | docs |
//! check-anywhere`.
//!
//! Every task that needs the eBPF toolchain runs `setup` first, which installs, idempotently,
//! what docs/TOOLCHAIN.md measured to work on these machines: Debian's rustc-web with the
//! prebuilt `core` for bpfel-unknown-none, LLVM 22, bpf-linker 0.13 built against it, and the
//! test tools (promtool from Debian's prometheus package, tmux, bpftool).

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod docs;
mod fleet;
mod image;
mod lab;
mod package;

#[derive(Parser)]
#[command(about = "ioasid project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain and test tools (idempotent; skips what is present).
    Setup,
    /// Build the agent and the guest (release).
    Build,
    /// Set up, build and run the agent on this host (as root). Extra arguments go to `run`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The container image (ioasid-agent:VERSION, podman, FROM scratch) of the release build.
    Image {
        /// Also export its root filesystem and run the agent from it under chroot (root).
        #[arg(long)]
        check: bool,
    },
    /// A Debian package (target/package/ioasid_VERSION_amd64.deb) of the release build.
    Package {
        /// Also install it on this machine, run it, verify the unit and remove it (root).
        #[arg(long)]
        check: bool,
    },
    /// Overhead of the agent: micro-benchmarks without and with it, interleaved in one run,
    /// reported as ratios; plus each program's in-kernel cost from BPF run-time statistics.
    Bench {
        /// Without/with alternations.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Use the binaries already built (e.g. inside the lab's VMs: `cargo xtask lab --script`).
        #[arg(long)]
        no_build: bool,
        /// Agent setups to measure, comma-separated (default: every one this kernel allows):
        /// agent, deny, before, tp_btf, tracepoint.
        #[arg(long, value_delimiter = ',')]
        setups: Vec<String>,
        /// Skip the peers (perf stat, bpftrace) even where installed.
        #[arg(long)]
        no_peers: bool,
    },
    /// A WBINVD storm from a real KVM guest named like a VM: for demos, alert tests and load.
    Storm {
        /// VM name (QEMU style: `guest=NAME` or `NAME`).
        #[arg(long, default_value = "storm-demo")]
        name: String,
        /// WBINVD per second.
        #[arg(long, default_value_t = 20000)]
        rate: u32,
        /// Seconds.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    /// VM churn against a running agent: many short-lived guests of one WBINVD each; reports
    /// the agent's memory, scrape size and naming.
    Churn {
        #[arg(long, default_value_t = 24000)]
        vms: usize,
        #[arg(long, default_value_t = 4)]
        parallel: usize,
    },
    /// rustfmt check and clippy (warnings are errors) on the host crates.
    Lint,
    /// Regenerate the generated docs (hook table, metrics, CLI, PrometheusRule) from the code.
    Docs,
    /// Without the eBPF toolchain (hidden through IOASID_BPF_RUSTC/IOASID_BPF_LINKER): the
    /// workspace checks and the pure unit tests still build and pass (stub object).
    CheckAnywhere,
    /// The kernel tests on stock Debian kernels (5.10, 6.1, 6.12, 6.18, 7.3), each booted under
    /// QEMU with nested KVM, an IOMMU without snoop control and a real VFIO device.
    Lab {
        /// Only these kernels (debian-5.10, debian-5.10-lsm, debian-6.1, debian-6.12, debian-6.18,
        /// debian-7.3); all by default.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// Instead of the tests, run this shell script inside each kernel's VM (its output is
        /// printed), e.g. to look around.
        #[arg(long, value_name = "FILE")]
        script: Option<PathBuf>,
        /// Test name filter, as for `cargo test`.
        filter: Vec<String>,
    },
    /// ioasid as a fleet: two lab VMs as two hosts (Debian 6.12 and 6.1), each running the
    /// agent, scraped by one Prometheus here with the project's rules and federated to a
    /// global one; a storm on one host must fire the storm alert with its node, and the
    /// dashboard's fleet row must have data for both hosts on both servers (about a minute;
    /// target/fleet/report.md).
    Fleet,
    /// Set up and run every test: unit tests and the kernel tests (real programs, real guests),
    /// here and in the lab's kernels.
    Test {
        /// Skip the lab (the host's kernel only).
        #[arg(long)]
        no_lab: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// The lab's build: release binaries (under emulation a debug agent spends seconds parsing BTF
/// at each start), the agent with the tests' fault injection (hidden `run` flags; never in the
/// package or the image, which are built without it).
/// (`--features` names the agent's own feature only with the agent alone selected.)
fn lab_build(root: &Path) -> Result<()> {
    cargo(root, &["build", "--release", "-p", "ioasid-guest"])?;
    cargo(root, &["build", "--release", "-p", "ioasid-agent", "--features", "fault-injection"])
}

/// Debian packages: (package, why).
const APT_PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "rustc 1.96 for the eBPF crate"),
    ("libstd-rust-web-dev-bpf", "prebuilt core/alloc for bpfel-unknown-none"),
    ("llvm-22-dev", "LLVM 22 for bpf-linker"),
    ("prometheus", "promtool, to check the metrics exposition and alert rules"),
    ("tmux", "drives the terminal UI in tests"),
    ("qemu-system-x86", "a real VMM for the QEMU guest test"),
    ("bpftool", "inspecting loaded programs (optional)"),
    ("rsyslog", "a real syslog daemon for the audit syslog sink's test"),
    ("man-db", "renders the package's man pages in its test (man -l)"),
    ("podman", "builds the container image (cargo xtask image)"),
    ("systemd", "systemd-analyze, to verify the unit the package installs"),
    ("binutils", "strip, for the packaged and imaged agent"),
    ("libvirt-daemon-system", "a real libvirtd, for OpenStack's identity from its domain status"),
    ("libvirt-daemon-driver-qemu", "libvirt's QEMU driver"),
    ("libvirt-clients", "virsh"),
];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.task {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            cargo(&root, &["build", "--release", "-p", "ioasid-agent", "-p", "ioasid-guest"])
        }
        Task::Run { args } => {
            setup()?;
            cargo(&root, &["build", "--release", "-p", "ioasid-agent"])?;
            let agent = root.join("target/release/ioasid-agent");
            let mut cmd = Command::new(&agent);
            cmd.arg("run").args(&args);
            let status = cmd.status().with_context(|| format!("running {}", agent.display()))?;
            exit_with(status)
        }
        Task::Bench { rounds, no_build, setups, no_peers } => {
            if !no_build {
                setup()?;
                cargo(&root, &["build", "--release", "-p", "ioasid-agent", "-p", "ioasid-guest"])?;
            }
            bench::run(&root, rounds, &setups, no_peers)
        }
        Task::Storm { name, rate, duration } => {
            cargo(&root, &["build", "--release", "-p", "ioasid-guest"])?;
            let guest = root.join("target/release/ioasid-guest");
            run(Command::new(guest).args([
                "--name",
                &name,
                "--rate",
                &rate.to_string(),
                "--duration",
                &duration.to_string(),
            ]))
        }
        Task::Churn { vms, parallel } => {
            setup()?;
            cargo(&root, &["build", "--release", "-p", "ioasid-agent", "-p", "ioasid-guest"])?;
            bench::churn(&root, vms, parallel)
        }
        Task::Lint => {
            cargo(&root, &["fmt", "--all", "--", "--check"])?;
            cargo(
                &root,
                &[
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "ioasid-ebpf",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
            )
        }
        Task::Docs => docs::write(&root),
        Task::CheckAnywhere => check_anywhere(&root),
        Task::Image { check } => {
            setup()?;
            cargo(&root, &["build", "--release", "-p", "ioasid-agent"])?;
            let tag = image::build(&root, &package::version(&root)?)?;
            if check {
                image::check(&root, &tag)?;
            }
            Ok(())
        }
        Task::Package { check } => {
            setup()?;
            cargo(&root, &["build", "--release", "-p", "ioasid-agent"])?;
            let deb = package::build(&root)?;
            if check {
                package::check(&deb)?;
            }
            Ok(())
        }
        Task::Fleet => {
            setup()?;
            lab_build(&root)?;
            fleet::run(&root)
        }
        Task::Lab { kernels, script, filter } => {
            setup()?;
            lab_build(&root)?;
            lab::run(&root, &lab::Options { kernels, filter, script })
        }
        Task::Test { no_lab, args } => {
            setup()?;
            require_kernel_tests()?;
            let start = Instant::now();
            // The kernel tests run the guest binary of the same build; the agent is built with the
            // features `cargo test` gives it (its dev-dependency on itself: fault injection), so
            // the test run reuses it instead of building it again.
            cargo(&root, &["build", "-p", "ioasid-guest"])?;
            cargo(&root, &["build", "-p", "ioasid-agent", "--features", "fault-injection"])?;
            let mut test = vec!["test", "--workspace", "--exclude", "ioasid-ebpf"];
            test.extend(args.iter().map(String::as_str));
            let r = cargo(&root, &test);
            eprintln!("xtask: host tests took {:.1} s", start.elapsed().as_secs_f64());
            r?;
            // The Debian package, installed, run and removed on this machine.
            cargo(&root, &["build", "--release", "-p", "ioasid-agent"])?;
            package::check(&package::build(&root)?)?;
            // The container image, built and run from its exported root filesystem.
            image::check(&root, &image::build(&root, &package::version(&root)?)?)?;
            if no_lab || std::env::var("IOASID_SKIP_KERNEL_TESTS").as_deref() == Ok("1") {
                eprintln!("xtask: the lab (Debian kernels under QEMU) was not run");
                return Ok(());
            }
            let start = Instant::now();
            lab_build(&root)?;
            let r = lab::run(&root, &lab::Options { kernels: Vec::new(), filter: Vec::new(), script: None });
            eprintln!("xtask: lab took {:.1} s", start.elapsed().as_secs_f64());
            r
        }
    }
}

fn workspace_root() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(dir.parent().context("xtask has a parent directory")?.to_path_buf())
}

fn exit_with(status: ExitStatus) -> Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("exited with {status}")
    }
}

/// Runs cargo in the workspace. The agent's build must embed the real kernel object: a
/// missing eBPF toolchain is an error here, never a silent stub.
fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(cargo)
        .current_dir(root)
        .args(args)
        .env("IOASID_REQUIRE_BPF", "1")
        .status()
        .context("running cargo")?;
    exit_with(status)
}

/// The kernel tests run in `cargo xtask test` unless explicitly skipped: a machine that cannot
/// run them is an error here, not a quiet pass.
fn require_kernel_tests() -> Result<()> {
    if std::env::var("IOASID_SKIP_KERNEL_TESTS").as_deref() == Ok("1") {
        eprintln!("xtask: IOASID_SKIP_KERNEL_TESTS=1: kernel tests will be reported as ignored");
        return Ok(());
    }
    if !is_root() {
        bail!("the kernel tests need root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN); set IOASID_SKIP_KERNEL_TESTS=1 to skip them explicitly");
    }
    if !Path::new("/dev/kvm").exists() {
        bail!("the kernel tests need /dev/kvm; set IOASID_SKIP_KERNEL_TESTS=1 to skip them explicitly");
    }
    Ok(())
}

/// `cargo check` and the pure unit tests with the eBPF toolchain out of reach: the agent builds
/// against the stub object and its unit tests pass, on any machine.
fn check_anywhere(root: &Path) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let run_hidden = |args: &[&str]| -> Result<()> {
        eprintln!("xtask: (no eBPF toolchain) cargo {}", args.join(" "));
        let status = Command::new(&cargo)
            .current_dir(root)
            .args(args)
            .env("IOASID_BPF_RUSTC", "/nonexistent/rustc")
            .env("IOASID_BPF_LINKER", "/nonexistent/bpf-linker")
            .env_remove("IOASID_REQUIRE_BPF")
            .status()
            .context("running cargo")?;
        exit_with(status)
    };
    run_hidden(&["check", "--workspace", "--exclude", "ioasid-ebpf", "--all-targets"])?;
    run_hidden(&["test", "-p", "ioasid-common", "-p", "ioasid-agent", "--lib", "--bins"])
}

/// Runs `cmd` to completion: its stdout, or an error carrying its output.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A short run of an agent started as `child` (`what` names it in errors, its stderr goes to
/// `log`): waits for its ready file, hands the address to `probe`, then stops it with SIGTERM.
/// Ok only if it got ready, the probe passed and it stopped cleanly.
pub fn short_run(
    mut child: std::process::Child,
    ready: &Path,
    log: &Path,
    what: &str,
    probe: impl FnOnce(&str) -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    let addr = loop {
        if let Some(a) = std::fs::read_to_string(ready).ok().filter(|a| !a.is_empty()) {
            break Ok(a);
        }
        if let Some(s) = child.try_wait()? {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            break Err(anyhow::anyhow!("{what} exited during start-up ({s}):\n{log}"));
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!("{what} was not ready after 30 s"));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let probed = addr.and_then(|a| probe(&a));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait()?;
    probed?;
    if !status.success() {
        bail!("{what} did not stop cleanly: {status}");
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    exit_with(status)
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn setup() -> Result<()> {
    let start = Instant::now();
    let missing: Vec<&str> = APT_PACKAGES.iter().map(|(p, _)| *p).filter(|p| !dpkg_installed(p)).collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!("missing Debian packages {missing:?}; run `cargo xtask setup` as root");
        }
        for (p, why) in APT_PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
            eprintln!("xtask: installing {p}: {why}");
        }
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !bpf_linker_ok() {
        eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 90 s)");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        run(Command::new(cargo)
            .args(["install", "--locked", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
        if !bpf_linker_ok() {
            bail!("bpf-linker {BPF_LINKER_VERSION} is still not runnable after installing it (is ~/.cargo/bin on PATH?)");
        }
    }
    // The Kubernetes manifests' validator (PyPI), pinned; kubectl itself is preinstalled.
    let validator_ok = |v: &str| {
        Command::new("kubernetes-validate")
            .arg("--version")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == v)
    };
    if !validator_ok(KUBERNETES_VALIDATE) {
        eprintln!("xtask: installing kubernetes-validate {KUBERNETES_VALIDATE} (PyPI): validates the Kubernetes manifests");
        run(Command::new("python3")
            .args(["-m", "pip", "install", "-q", "--root-user-action=ignore"])
            .arg(format!("kubernetes-validate=={KUBERNETES_VALIDATE}")))?;
    }
    eprintln!("xtask: toolchain ready ({:.1} s)", start.elapsed().as_secs_f64());
    Ok(())
}

const KUBERNETES_VALIDATE: &str = "1.37.0";

fn bpf_linker_ok() -> bool {
    let candidates = [
        Some(PathBuf::from("bpf-linker")),
        std::env::var_os("CARGO_HOME").map(|h| Path::new(&h).join("bin/bpf-linker")),
        std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin/bpf-linker")),
    ];
    candidates.into_iter().flatten().any(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
            .unwrap_or(false)
    })
}
