//! `cargo xtask bench`: the agent's overhead, measured side by side in one run.
//!
//! Alternates rounds without and with the agent (A B A B ...) so drift hits both, takes the
//! median of each, and prints the ratio. Each program family is measured twice: with the real
//! programs and with empty programs of the same attach type at the same hooks (`--empty-programs`),
//! so what the attachment itself costs is separated from what the programs add. Then runs with
//! `--bpf-stats` and reports the in-kernel cost per run of every program beside its empty twin.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use std::os::unix::process::CommandExt;

use anyhow::{bail, Context, Result};

struct Agent {
    child: Child,
    addr: String,
    dir: std::path::PathBuf,
}

impl Agent {
    fn start(root: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_enforcing(root, extra, false)
    }

    /// Starts the agent (`--dry-run` unless `enforce`).
    fn start_enforcing(root: &Path, extra: &[&str], enforce: bool) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("ioasid-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let ready = dir.join("ready");
        let _ = std::fs::remove_file(&ready);
        // The agent's log goes to a file (its warnings would interleave with the tables); it is
        // shown when the agent does not start.
        let log_path = dir.join("agent.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(root.join("target/release/ioasid-agent"))
            .args(["--log", "warn", "run", "--listen", "127.0.0.1:0"])
            .args(if enforce { &[][..] } else { &["--dry-run"][..] })
            .arg("--ready-file")
            .arg(&ready)
            .arg("--audit-log")
            .arg(dir.join("audit.jsonl"))
            .arg("--state-dir")
            .arg(state_dir())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the agent")?;
        let mut agent = Self { child, addr: String::new(), dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while agent.addr.is_empty() {
            if let Ok(a) = std::fs::read_to_string(&ready) {
                agent.addr = a;
            }
            if let Some(status) = agent.child.try_wait()? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let last = log.lines().rfind(|l| l.contains("error")).unwrap_or("").to_string();
                bail!("agent exited during start-up ({status}): {last}");
            }
            if Instant::now() > deadline {
                bail!("agent not ready after 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(agent)
    }

    /// The agent's CPU time so far, user and system, in seconds (/proc/PID/stat).
    fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // The fields after the command name (which may hold anything but ends at the last
        // parenthesis): state is the first, utime the 12th, stime the 13th.
        let fields: Vec<&str> =
            stat.rsplit_once(')').context("/proc/PID/stat")?.1.split_whitespace().collect();
        let ticks = |i: usize| -> Result<f64> {
            Ok(fields.get(i).context("/proc/PID/stat: too few fields")?.parse::<u64>()? as f64)
        };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Ok((ticks(11)? + ticks(12)?) / hz)
    }

    fn metrics(&self) -> Result<String> {
        let url = format!("http://{}/metrics", self.addr);
        Ok(ureq::get(&url).call()?.body_mut().read_to_string()?)
    }
}

/// Each measured agent starts from fresh kernel state (its pinned maps are removed after it).
fn state_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/sys/fs/bpf/ioasid-bench-{}", std::process::id()))
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(state_dir());
    }
}

/// One run of `ioasid-bench` (every case, or the `cases` named): ns per operation by case.
fn bench_once(root: &Path) -> Result<BTreeMap<String, f64>> {
    Ok(bench_cases(root, &[])?.into_iter().filter(|(k, _)| !k.ends_with(".ops")).collect())
}

/// `ioasid-bench CASES...`: every value it printed (`CASE` ns per operation, `CASE.ops`).
fn bench_cases(root: &Path, cases: &[&str]) -> Result<BTreeMap<String, f64>> {
    let out = Command::new(root.join("target/release/ioasid-bench"))
        .args(cases)
        .output()
        .context("running ioasid-bench")?;
    if !out.status.success() {
        bail!("ioasid-bench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("ioasid-bench output")?;
    Ok(v.as_object()
        .context("a JSON object")?
        .iter()
        .filter_map(|(k, v)| v.as_f64().map(|f| (k.clone(), f)))
        .collect())
}

/// A policy that denies incoherent DMA to one VM name (no benchmark's): what an operator with
/// one deny runs, for the run counts with a deny in force.
const DENY_POLICY: &str = "default:\n  incoherent_dma: audit\nrules:\n  - name: bench-deny\n    match: { vm: \"ioasid-bench-nobody\" }\n    incoherent_dma: deny\n";

/// Per benchmark case, how many times each ioasid program ran (the kernel's BPF run counts,
/// `--bpf-stats`), with the embedded audit-only policy and with a deny policy, enforcing. The
/// cases have nothing to do with WBINVD or FILE_ADD but the emulated WBINVD: the target is
/// zero runs, a figure no timing noise blurs.
fn run_counts(root: &Path, setups: &[(&str, &[&str])]) -> Result<serde_json::Value> {
    let out = Command::new(root.join("target/release/ioasid-bench"))
        .arg("--list")
        .output()
        .context("running ioasid-bench --list")?;
    let cases: Vec<String> = serde_json::from_slice(&out.stdout).context("ioasid-bench --list")?;
    let dir = std::env::temp_dir().join(format!("ioasid-bench-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let deny = dir.join("deny.yaml");
    std::fs::write(&deny, DENY_POLICY)?;
    let deny_arg = deny.display().to_string();
    let mut report = serde_json::Map::new();
    println!(
        "\nioasid program runs per benchmark case (BPF run counts; target for every unrelated case: 0):"
    );
    println!(
        "{:<8} {:<13} {:<30} {:>10} {:<46} {:>10} {:>9}",
        "setup", "policy", "case", "ops", "hook", "runs", "per op"
    );
    let policies: [(&str, Vec<&str>); 3] = [
        ("audit", vec![]),
        ("deny", vec!["--policy", deny_arg.as_str()]),
        ("deny-signal", vec!["--policy", deny_arg.as_str(), "--enforce-with", "signal"]),
    ];
    for ((setup, flags), (policy, extra)) in setups.iter().flat_map(|s| policies.iter().map(move |p| (s, p)))
    {
        let mut args = vec!["--bpf-stats"];
        args.extend_from_slice(flags);
        args.extend(extra.iter().copied());
        let agent = Agent::start_enforcing(root, &args, !extra.is_empty())?;
        let policy = format!("{setup}:{policy}");
        let mut per_policy = serde_json::Map::new();
        for case in &cases {
            let before = samples(&agent.metrics()?, "ioasid_program_runs_total");
            let out = bench_cases(root, &[case.as_str()])?;
            let after = samples(&agent.metrics()?, "ioasid_program_runs_total");
            let ops = out.get(&format!("{case}.ops")).copied().unwrap_or(f64::NAN);
            let ran: BTreeMap<String, f64> = after
                .iter()
                .map(|(hook, n)| (hook.clone(), n - before.get(hook).copied().unwrap_or(0.0)))
                .filter(|(_, d)| *d > 0.0)
                .collect();
            if ran.is_empty() {
                println!(
                    "{setup:<8} {:<13} {case:<30} {ops:>10.0} {:<46} {:>10} {:>9}",
                    &policy[setup.len() + 1..],
                    "(none)",
                    0,
                    "0"
                );
            }
            for (hook, n) in &ran {
                println!(
                    "{setup:<8} {:<13} {case:<30} {ops:>10.0} {hook:<46} {n:>10.0} {:>9.3}",
                    &policy[setup.len() + 1..],
                    n / ops
                );
            }
            per_policy.insert(case.clone(), serde_json::json!({ "ops": ops, "runs": ran }));
        }
        drop(agent);
        report.insert(policy, serde_json::Value::Object(per_policy));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(serde_json::Value::Object(report))
}

/// The peers an operator would otherwise run, where installed: `perf stat` counting the KVM
/// exit and emulation tracepoints host-wide, and a bpftrace per-pid count of the same. Each
/// measured like the agent, on the same benchmarks, interleaved.
fn peers() -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let have = |cmd: &str| Command::new(cmd).arg("--version").output().is_ok_and(|o| o.status.success());
    if have("perf") {
        out.push((
            "perf_stat".to_string(),
            ["perf", "stat", "-a", "-e", "kvm:kvm_exit,kvm:kvm_emulate_insn"].map(String::from).to_vec(),
        ));
    } else {
        eprintln!("xtask: bench: perf is not installed: no perf stat column");
    }
    if have("bpftrace") {
        out.push((
            "bpftrace".to_string(),
            [
                "bpftrace",
                "-e",
                "tracepoint:kvm:kvm_exit { @exits[pid] = count(); } tracepoint:kvm:kvm_emulate_insn { @emulated[pid] = count(); }",
            ]
            .map(String::from)
            .to_vec(),
        ));
    } else {
        eprintln!("xtask: bench: bpftrace is not installed: no bpftrace column");
    }
    out
}

/// A peer tool running in the background for one measurement.
struct Peer(Child);

impl Peer {
    fn start(argv: &[String]) -> Result<Self> {
        // In a process group of its own: the interrupt at the end reaches everything it runs.
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", argv[0]))?;
        // Attached once its probes are in: give it the time it takes to start.
        std::thread::sleep(Duration::from_millis(1500));
        Ok(Self(child))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's process group.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGINT) };
        let _ = self.0.wait();
    }
}

/// Whether the agent enforces denials with its LSM program (`ioasid_enforcement_mechanism`).
fn lsm_enforces(agent: &Agent) -> Result<bool> {
    Ok(agent.metrics()?.lines().any(|l| l == "ioasid_enforcement_mechanism{mechanism=\"lsm\"} 1"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn samples(text: &str, name: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| {
            let hook = l.split("hook=\"").nth(1)?.split('"').next()?.to_string();
            Some((hook, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// The agent configurations `cargo xtask bench` measures (`--setups` picks some): what operators
/// run (`agent`: the kernel's best hooks, audit only), the same enforcing a policy with a deny
/// (`deny`: the LSM refusing FILE_ADDs on every ioctl; where BPF LSM loads), the configuration
/// before ioasid counted from KVM's handlers and observed ioctls from KVM's own functions
/// (`before`: the observing LSM and the exit/emulation tracepoints; where BPF LSM loads), and
/// each syscall-hook family.
pub const SETUPS: [(&str, &[&str]); 5] = [
    ("agent", &[]),
    ("deny", &[]),
    ("before", &["--ioctl-hooks", "lsm", "--count-with-tracepoints"]),
    ("tp_btf", &["--ioctl-hooks", "tp-btf"]),
    ("tracepoint", &["--ioctl-hooks", "tracepoint"]),
];

/// The setup that enforces the deny policy (the others run `--dry-run`, audit only).
const DENY_SETUP: &str = "deny";

/// An agent setup's arguments (`flags`, then the deny policy for [`DENY_SETUP`]) and whether it
/// enforces. Its empty twin (`--empty-programs`) then attaches the LSM's empty program, as the
/// real one attaches the LSM.
fn setup_args(root: &Path, name: &str, flags: &[&str]) -> Result<(Vec<String>, bool)> {
    let mut args: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    if name != DENY_SETUP {
        return Ok((args, false));
    }
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("deny.yaml");
    std::fs::write(&path, DENY_POLICY)?;
    args.extend(["--policy".to_string(), path.display().to_string()]);
    Ok((args, true))
}

/// One measured configuration: no agent, an agent setup (real or empty programs; its
/// arguments, whether it enforces), or a peer.
enum Config {
    Without,
    Agent(Vec<String>, bool),
    Peer(Vec<String>),
}

impl Agent {
    /// The agent of one measured configuration.
    fn start_config(root: &Path, args: &[String], enforce: bool) -> Result<Self> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start_enforcing(root, &args, enforce)
    }
}

pub fn run(root: &Path, rounds: usize, setups: &[String], no_peers: bool) -> Result<()> {
    let rounds = rounds.max(1);
    // Configurations measured in each round: no agent, then per setup this kernel allows the
    // agent with its empty programs (what the attachments alone cost) and with the real ones.
    let mut configs: Vec<(String, Config)> = vec![("without".into(), Config::Without)];
    let mut measured: Vec<(&str, &[&str])> = Vec::new();
    for (name, flags) in SETUPS {
        if !setups.is_empty() && !setups.iter().any(|s| s == name) {
            continue;
        }
        let (args, enforce) = setup_args(root, name, flags)?;
        match Agent::start_config(root, &args, enforce) {
            // Without BPF LSM a deny is enforced by signals from KVM's FILE_ADD path: the same
            // programs as `agent`, measured there.
            Ok(agent) if name == DENY_SETUP && !lsm_enforces(&agent)? => {
                eprintln!("xtask: bench: no `{name}` setup on this kernel: the LSM does not enforce here")
            }
            Ok(_) => {
                measured.push((name, flags));
                let mut empty = args.clone();
                empty.push("--empty-programs".to_string());
                configs.push((format!("{name}_empty"), Config::Agent(empty, enforce)));
                configs.push((name.to_string(), Config::Agent(args, enforce)));
            }
            Err(e) => eprintln!("xtask: bench: no `{name}` setup on this kernel: {e:#}"),
        }
    }
    // The peers an operator would otherwise run, beside the agent as operators run it.
    let peers = if no_peers { Vec::new() } else { peers() };
    let first_peer = configs.len();
    for (name, argv) in &peers {
        configs.push((name.clone(), Config::Peer(argv.clone())));
    }
    let mut results: Vec<BTreeMap<String, Vec<f64>>> = vec![BTreeMap::new(); configs.len()];
    // The agent's own CPU (user + system) per second of each round: what its sweeps, naming
    // and exporting cost the host beside its programs.
    let mut agent_cpu: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        eprintln!("xtask: bench round {}/{rounds}", round + 1);
        for (i, (_, config)) in configs.iter().enumerate() {
            let agent = match config {
                Config::Agent(args, enforce) => Some(Agent::start_config(root, args, *enforce)?),
                _ => None,
            };
            let peer = match config {
                Config::Peer(argv) => Some(Peer::start(argv)?),
                _ => None,
            };
            let (t0, c0) = (Instant::now(), agent.as_ref().map(Agent::cpu_seconds).transpose()?);
            for (k, v) in bench_once(root)? {
                results[i].entry(k).or_default().push(v);
            }
            if let (Some(agent), Some(c0)) = (&agent, c0) {
                agent_cpu[i].push((agent.cpu_seconds()? - c0) * 1e3 / t0.elapsed().as_secs_f64());
            }
            drop(peer);
            drop(agent);
        }
    }
    let medians = |k: &str| -> Vec<f64> {
        results.iter().map(|r| r.get(k).map_or(f64::NAN, |v| median(v.clone()))).collect()
    };
    let mut report = serde_json::Map::new();
    for k in results[0].keys() {
        let m = medians(k);
        let mut entry = serde_json::Map::new();
        entry.insert("without_ns".into(), serde_json::json!(m[0]));
        for (i, (name, _)) in configs.iter().enumerate().skip(1) {
            entry.insert(format!("{name}_ns"), serde_json::json!(m[i]));
            entry.insert(format!("{name}_ratio"), serde_json::json!(m[i] / m[0]));
        }
        report.insert(k.clone(), serde_json::Value::Object(entry));
    }
    println!("\nagent overhead ({rounds} interleaved rounds, medians; each value is itself a median of 7).");
    println!(
        "`empty`: the same hooks with empty programs of the same attach type (the attachment's own cost)."
    );
    for (f, (setup, flags)) in measured.iter().enumerate() {
        let (empty, real) = (1 + 2 * f, 2 + 2 * f);
        println!(
            "\n{:<30} {:>11} {:>13} {:>7} {:>13} {:>7} {:>10}",
            format!(
                "setup: {setup} {}",
                if *setup == DENY_SETUP { "--policy deny.yaml" } else { "" }.to_string() + &flags.join(" ")
            ),
            "without",
            "empty progs",
            "ratio",
            "agent",
            "ratio",
            "vs empty"
        );
        for k in results[0].keys() {
            let m = medians(k);
            println!(
                "{k:<30} {:>9.1}ns {:>11.1}ns {:>7.3} {:>11.1}ns {:>7.3} {:>10.3}",
                m[0],
                m[empty],
                m[empty] / m[0],
                m[real],
                m[real] / m[0],
                m[real] / m[empty]
            );
        }
    }
    if !peers.is_empty() && measured.first().is_some_and(|(s, _)| *s == "agent") {
        print!("\n{:<30} {:>11}", "peers (same work)", "without");
        for (name, _) in &peers {
            print!(" {name:>13} {:>7}", "ratio");
        }
        println!(" {:>13} {:>7}", "ioasid", "ratio");
        for k in results[0].keys() {
            let m = medians(k);
            print!("{k:<30} {:>9.1}ns", m[0]);
            for i in first_peer..first_peer + peers.len() {
                print!(" {:>11.1}ns {:>7.3}", m[i], m[i] / m[0]);
            }
            println!(" {:>11.1}ns {:>7.3}", m[2], m[2] / m[0]);
        }
    }

    println!(
        "\nthe agent's own CPU while the benchmarks ran (user + system, ms per s of wall time, medians):"
    );
    println!("{:<12} {:>12} {:>14}", "setup", "agent", "empty progs");
    let mut cpu_report = serde_json::Map::new();
    for (f, (setup, _)) in measured.iter().enumerate() {
        let (empty, real) = (1 + 2 * f, 2 + 2 * f);
        let (e, r) = (median(agent_cpu[empty].clone()), median(agent_cpu[real].clone()));
        println!("{setup:<12} {r:>12.1} {e:>14.1}");
        cpu_report.insert(setup.to_string(), serde_json::json!({ "agent": r, "empty": e }));
    }
    report.insert("agent_cpu_ms_per_s".into(), serde_json::Value::Object(cpu_report));

    // The run counts take each policy (audit, deny, deny with signals) in turn themselves.
    let counted: Vec<(&str, &[&str])> =
        measured.iter().copied().filter(|(s, _)| matches!(*s, "agent" | "before")).collect();
    report.insert("run_counts".into(), run_counts(root, &counted)?);

    // In-kernel cost per program run from BPF run-time statistics, each program beside an empty
    // program of the same attach type at the same hook.
    println!("\nin-kernel ns per program run (BPF run-time stats, which add their own timing):");
    println!("{:<12} {:<46} {:>12} {:>10} {:>10}", "setup", "hook", "runs", "program", "empty");
    let mut kernel = serde_json::Map::new();
    for (setup, flags) in &measured {
        let (setup_args, enforce) = setup_args(root, setup, flags)?;
        let per_run = |extra: &[&str]| -> Result<BTreeMap<String, (f64, f64)>> {
            let mut args = vec!["--bpf-stats".to_string()];
            args.extend(setup_args.iter().cloned());
            args.extend(extra.iter().map(|e| e.to_string()));
            let agent = Agent::start_config(root, &args, enforce)?;
            bench_once(root)?;
            let text = agent.metrics()?;
            drop(agent);
            let runs = samples(&text, "ioasid_program_runs_total");
            let secs = samples(&text, "ioasid_program_run_seconds_total");
            Ok(runs
                .into_iter()
                .filter(|(_, n)| *n > 0.0)
                .map(|(hook, n)| {
                    let ns = secs.get(&hook).copied().unwrap_or(0.0) * 1e9 / n;
                    (hook, (n, ns))
                })
                .collect())
        };
        let real = per_run(&[])?;
        let empty = per_run(&["--empty-programs"])?;
        let lsm = ioasid_common::hooks::HOOK_LSM_FILE_IOCTL;
        if *setup == DENY_SETUP && real.contains_key(lsm) && !empty.contains_key(lsm) {
            bail!("the `{DENY_SETUP}` setup's empty twin ran no {lsm} program: nothing to compare with");
        }
        for (hook, (n, ns)) in &real {
            let base = empty.get(hook).map(|(_, ns)| *ns);
            let base_text = base.map_or("-".to_string(), |b| format!("{b:.1}"));
            println!("{setup:<12} {hook:<46} {n:>12.0} {ns:>10.1} {base_text:>10}");
            kernel.insert(
                format!("{setup}:{hook}"),
                serde_json::json!({ "runs": n, "ns_per_run": ns, "empty_ns_per_run": base }),
            );
        }
    }
    report.insert("in_kernel".into(), serde_json::Value::Object(kernel));
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&report)?)?;
    eprintln!("xtask: results in target/bench/results.json");
    Ok(())
}

/// `cargo xtask churn`: `vms` short-lived guests of one WBINVD each (`parallel` at a time)
/// against a running agent; then the agent's peak and current RSS, its scrape size, how the kept
/// VMs are named and whether each is counted exactly.
pub fn churn(root: &Path, vms: usize, parallel: usize) -> Result<()> {
    let agent = Agent::start(root, &[])?;
    let pid = agent.child.id();
    let guest = root.join("target/release/ioasid-guest");
    let started = Instant::now();
    let failed = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for w in 0..parallel.max(1) {
            let (guest, failed) = (&guest, &failed);
            s.spawn(move || {
                for i in (w..vms).step_by(parallel.max(1)) {
                    let ok = Command::new(guest)
                        .args(["--name", &format!("churn-{i}"), "--wbinvd", "1"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success());
                    if !ok {
                        failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let took = started.elapsed();
    std::thread::sleep(Duration::from_secs(10));
    let text = agent.metrics()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |field: &str| {
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_string()
    };
    let series: Vec<&str> = text.lines().filter(|l| l.starts_with("ioasid_wbinvd_exits_total{")).collect();
    let named = series.iter().filter(|l| l.contains("vm=\"churn-")).count();
    let inexact = series.iter().filter(|l| !l.ends_with(" 1")).count();
    let value = |name: &str| samples_plain(&text, name);
    println!(
        "{vms} guests ({} failed to run) in {:.1} s, {parallel} at a time",
        failed.into_inner(),
        took.as_secs_f64()
    );
    println!(
        "agent RSS: peak {} kB, now {} kB; scrape {} bytes 10 s later",
        kb("VmHWM:"),
        kb("VmRSS:"),
        text.len()
    );
    println!(
        "VMs kept: {} ({named} named from their command line, {} pid-derived); counted other than exactly 1: {inexact}",
        series.len(),
        series.len() - named
    );
    println!(
        "events dropped: {}; exited VMs dropped past the cap: {}",
        value("ioasid_events_dropped_total"),
        value("ioasid_exited_vms_dropped_total")
    );
    Ok(())
}

fn samples_plain(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or("?")
        .to_string()
}
