//! `cargo xtask bench`: the agent's overhead, measured side by side in one run.
//!
//! Alternates rounds without and with the agent (A B A B ...) so drift hits both, takes the
//! median of each, and prints the ratio. Then runs once more with `--bpf-stats` and reports the
//! in-kernel cost per run of every attached program from the agent's own metrics.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

struct Agent {
    child: Child,
    addr: String,
    dir: std::path::PathBuf,
}

impl Agent {
    fn start(root: &Path, extra: &[&str]) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("ioasid-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let ready = dir.join("ready");
        let _ = std::fs::remove_file(&ready);
        let child = Command::new(root.join("target/release/ioasid-agent"))
            .args(["--log", "warn", "run", "--listen", "127.0.0.1:0", "--dry-run"])
            .arg("--ready-file")
            .arg(&ready)
            .arg("--audit-log")
            .arg(dir.join("audit.jsonl"))
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .context("starting the agent")?;
        let mut agent = Self { child, addr: String::new(), dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while agent.addr.is_empty() {
            if let Ok(a) = std::fs::read_to_string(&ready) {
                agent.addr = a;
            }
            if let Some(status) = agent.child.try_wait()? {
                bail!("agent exited during start-up: {status}");
            }
            if Instant::now() > deadline {
                bail!("agent not ready after 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(agent)
    }

    fn metrics(&self) -> Result<String> {
        let url = format!("http://{}/metrics", self.addr);
        Ok(ureq::get(&url).call()?.body_mut().read_to_string()?)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bench_once(root: &Path) -> Result<BTreeMap<String, f64>> {
    let out =
        Command::new(root.join("target/release/ioasid-bench")).output().context("running ioasid-bench")?;
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

pub fn run(root: &Path, rounds: usize) -> Result<()> {
    let rounds = rounds.max(1);
    // Configurations measured in each round, in this order: no agent, then the agent with each
    // ioctl program family this kernel allows (the LSM family needs BPF LSM and trampolines).
    let candidates: [(&str, Option<&[&str]>); 4] = [
        ("without", None),
        ("lsm", Some(&["--ioctl-hooks", "lsm"])),
        ("tp_btf", Some(&["--ioctl-hooks", "tp-btf"])),
        ("tracepoint", Some(&["--ioctl-hooks", "tracepoint"])),
    ];
    let mut configs = Vec::new();
    for (name, args) in candidates {
        match args.map(|a| Agent::start(root, a)).transpose() {
            Ok(_) => configs.push((name, args)),
            Err(e) => eprintln!("xtask: bench: no `{name}` configuration on this kernel: {e:#}"),
        }
    }
    let mut results: Vec<BTreeMap<String, Vec<f64>>> = vec![BTreeMap::new(); configs.len()];
    for round in 0..rounds {
        eprintln!("xtask: bench round {}/{rounds}", round + 1);
        for (i, (_, args)) in configs.iter().enumerate() {
            let agent = args.map(|a| Agent::start(root, a)).transpose()?;
            for (k, v) in bench_once(root)? {
                results[i].entry(k).or_default().push(v);
            }
            drop(agent);
        }
    }
    println!("\nagent overhead ({rounds} interleaved rounds, medians; each value is itself a median of 7):");
    let mut head = format!("{:<30} {:>11}", "benchmark", "without");
    for (name, _) in &configs[1..] {
        head.push_str(&format!(" {:>14} {:>7}", format!("agent {name}"), "ratio"));
    }
    println!("{head}");
    let mut report = serde_json::Map::new();
    for k in results[0].keys() {
        let m: Vec<f64> = results.iter().map(|r| r.get(k).map_or(f64::NAN, |v| median(v.clone()))).collect();
        let mut line = format!("{k:<30} {:>9.1}ns", m[0]);
        let mut entry = serde_json::Map::new();
        entry.insert("without_ns".into(), serde_json::json!(m[0]));
        for (i, (name, _)) in configs.iter().enumerate().skip(1) {
            line.push_str(&format!(" {:>12.1}ns {:>7.3}", m[i], m[i] / m[0]));
            entry.insert(format!("{name}_ns"), serde_json::json!(m[i]));
            entry.insert(format!("{name}_ratio"), serde_json::json!(m[i] / m[0]));
        }
        println!("{line}");
        report.insert(k.clone(), serde_json::Value::Object(entry));
    }

    // In-kernel cost per program run, from the agent's own BPF run-time statistics.
    let agent = Agent::start(root, &["--bpf-stats"])?;
    bench_once(root)?;
    let text = agent.metrics()?;
    drop(agent);
    let runs = samples(&text, "ioasid_program_runs_total");
    let secs = samples(&text, "ioasid_program_run_seconds_total");
    println!("\nin-kernel cost per program run (BPF run-time stats; includes the stats' own timing):");
    let mut kernel = serde_json::Map::new();
    for (hook, n) in &runs {
        if *n > 0.0 {
            let ns = secs.get(hook).copied().unwrap_or(0.0) * 1e9 / n;
            println!("{hook:<46} {n:>12.0} runs {ns:>8.1} ns/run");
            kernel.insert(hook.clone(), serde_json::json!({ "runs": n, "ns_per_run": ns }));
        }
    }
    report.insert("in_kernel".into(), serde_json::Value::Object(kernel));
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&report)?)?;
    eprintln!("xtask: results in target/bench/results.json");
    Ok(())
}
