//! `cargo xtask fleet`: ioasid as a fleet, the way it scales (through Prometheus, nothing
//! home-made). Two of the lab's VMs are two hypervisor hosts (Debian 6.12 and 6.1, nodes
//! `fleet-a` and `fleet-b`), each running the agent with its port forwarded to this machine;
//! one Prometheus here scrapes both with the project's rules, a second (global) one federates
//! the first's recording rules and VM identities, as Thanos/Mimir users run it. A guest storms
//! on `fleet-a`, a quiet one runs on `fleet-b`. Checked: the storm alert fires with its node
//! (and only for that host), every panel of the dashboard's fleet row has data for both hosts,
//! on the first Prometheus and on the global one. The report (`target/fleet/report.md`) has
//! what Prometheus returned.

use std::{
    fmt::Write as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::lab;

/// One host of the fleet: its node name, lab kernel, VM, its WBINVD rate and whether it is
/// given the lab's VFIO device (behind an IOMMU without snoop control: non-coherent; it then
/// runs WBINVD as fast as it can).
struct Host {
    node: &'static str,
    kernel: &'static str,
    vm: &'static str,
    rate: u32,
    device: bool,
}

const HOSTS: [Host; 2] = [
    Host { node: "fleet-a", kernel: "debian-6.12", vm: "gpu-train-7", rate: 0, device: true },
    Host { node: "fleet-b", kernel: "debian-6.1", vm: "web-3", rate: 20, device: false },
];

/// The policy in both hosts: every enable audited, a storm over 1,000 WBINVD/s alerted.
const POLICY: &str =
    "default:\n  incoherent_dma: audit\n  wbinvd: { rate: 1000, window: 1s, action: alert }\n";

/// What the global Prometheus takes from the first: the recording rules, the VMs' identity
/// (for the joins) and the alerts.
const FEDERATE: &str = r#"{__name__=~"vm:.*|instance:.*|ioasid_vm_info|ALERTS"}"#;

/// How long the hosts may take to boot and start their agents under emulation.
const UP_WITHIN: Duration = Duration::from_secs(600);
/// How long the alert and the panels may take once both hosts are scraped.
const DATA_WITHIN: Duration = Duration::from_secs(240);

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The script each host runs: its name, its network, its agent (reachable on 9477), its guest
/// until told to stop, a line every 5 s to show it lives.
fn script(h: &Host, bin: &Path, out: &Path) -> String {
    let (agent, guest, out) = (bin.join("ioasid-agent"), bin.join("ioasid-guest"), out.display());
    format!(
        r#"set +e
B=$IOASID_LAB_BUSYBOX
echo {node} > /proc/sys/kernel/hostname
$B modprobe virtio_net 2>&1 | head -3
IF=$(ls /sys/class/net | grep -v '^lo$' | head -1)
$B ip link set "$IF" up && $B ip addr add 10.0.2.15/24 dev "$IF" && echo "FLEET-NET $IF"
cat > /tmp/policy.yaml <<'EOF'
{POLICY}EOF
'{agent}' run --listen 0.0.0.0:9477 --policy /tmp/policy.yaml --audit-log {out}/audit.jsonl --ready-file /tmp/ready > {out}/agent.log 2>&1 &
A=$!
n=0; while [ ! -s /tmp/ready ] && [ $n -lt 300 ]; do sleep 1; n=$((n+1)); done
echo "FLEET-AGENT-READY after $n s"
# With the device: WBINVD as fast as the VM runs, until stopped (a FILE_ADD takes no paced
# storm); without: paced at the rate.
WORK="--rate {rate} --duration 1800"
if [ {device} = true ]; then
  for d in /sys/bus/pci/drivers/vfio-pci/0000:*; do
    WORK="--file-add --vfio-group /dev/vfio/$(basename $(readlink $d/iommu_group)) --wbinvd 100000000 --hold 1800"
  done
fi
echo "FLEET-GUEST $WORK"
'{guest}' --name {vm} $WORK > {out}/guest.log 2>&1 &
G=$!
while [ ! -e {out}/stop ]; do sleep 5; echo "FLEET-ALIVE $(cut -d' ' -f1 /proc/uptime)"; done
kill $G; kill $A; wait $A
echo "FLEET-AGENT-EXIT $?"
echo LAB-ALL-DONE
"#,
        node = h.node,
        agent = agent.display(),
        guest = guest.display(),
        vm = h.vm,
        rate = h.rate,
        device = h.device,
    )
}

/// A Prometheus server of this machine's (Debian's package), stopped when dropped.
struct Prometheus {
    child: Child,
    addr: String,
}

impl Prometheus {
    fn start(dir: &Path, config: &str) -> Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config)?;
        let port = free_port()?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log"))?)
            .spawn()
            .context("prometheus (Debian package prometheus; `cargo xtask setup` installs it)")?;
        Ok(Self { child, addr: format!("127.0.0.1:{port}") })
    }

    /// An instant query's `data.result`.
    fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>> {
        let url = format!("http://{}/api/v1/query", self.addr);
        let mut resp =
            ureq::get(&url).query("query", expr).call().with_context(|| format!("query {expr}"))?;
        let body = resp.body_mut().read_to_string()?;
        let v: serde_json::Value = serde_json::from_str(&body).with_context(|| body.clone())?;
        if v["status"] != "success" {
            bail!("{expr}: {v}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 2 s until it gives a value or `within` passes.
fn until<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The dashboard's fleet row: each panel's title and query.
fn fleet_panels(root: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(root.join("dashboards/grafana/ioasid-overview.json"))?;
    let dash: serde_json::Value = serde_json::from_str(&text)?;
    let mut out = Vec::new();
    for p in dash["panels"].as_array().context("panels")? {
        let title = p["title"].as_str().unwrap_or_default();
        if !title.starts_with("Fleet: ") {
            continue;
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((title.to_string(), t["expr"].as_str().unwrap_or_default().to_string()));
        }
    }
    if out.len() < 4 {
        bail!("the dashboard's fleet row has {} panel queries, not 4", out.len());
    }
    Ok(out)
}

/// The instances (hosts) a query's result names.
fn instances(r: &[serde_json::Value]) -> Vec<String> {
    let mut v: Vec<String> =
        r.iter().filter_map(|s| s["metric"]["instance"].as_str().map(str::to_string)).collect();
    v.sort();
    v.dedup();
    v
}

pub fn run(root: &Path) -> Result<()> {
    let start = Instant::now();
    let dir = root.join("target/fleet");
    std::fs::create_dir_all(&dir)?;
    let cache = lab::cache_dir();
    std::fs::create_dir_all(&cache)?;
    let apt = lab::Apt::new(&cache)?;
    let busybox = apt.unpack(&cache, &[apt.resolve("^busybox-static$")?])?.join("bin/busybox");
    let bin = dir.join("bin");
    lab::snapshot(root, &[], &bin)?;
    let mut kernels = Vec::new();
    for h in &HOSTS {
        let spec = lab::KERNELS.iter().find(|k| k.name == h.kernel).context("a fleet kernel left the lab")?;
        kernels.push((spec, lab::prepare(&apt, &cache, spec, &busybox)?));
    }
    let ports = [free_port()?, free_port()?];
    let targets: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let outs: Vec<PathBuf> = HOSTS.iter().map(|h| dir.join(h.node)).collect();
    let mut report = String::from("# `cargo xtask fleet`\n\n");
    let result = std::thread::scope(|s| -> Result<()> {
        let mut vms = Vec::new();
        for (i, h) in HOSTS.iter().enumerate() {
            let (spec, kernel) = (&kernels[i].0, &kernels[i].1);
            let (busybox, out_dir, port) = (&busybox, &outs[i], ports[i]);
            let text = script(h, &bin, &out_dir.join("out"));
            eprintln!(
                "fleet: {} ({}, {}) boots, its agent on 127.0.0.1:{port}",
                h.node, h.kernel, kernel.release
            );
            vms.push(s.spawn(move || {
                std::fs::create_dir_all(out_dir)?;
                lab::boot(kernel, spec.cmdline, busybox, out_dir, &text, false, Some(port))
            }));
        }
        let checked = check(root, &dir, &targets, &mut report);
        // Whatever was found, the hosts are told to stop, and each boot must end cleanly.
        for out in &outs {
            let _ = std::fs::write(out.join("out/stop"), "");
        }
        for (h, vm) in HOSTS.iter().zip(vms) {
            let b = vm.join().map_err(|_| anyhow::anyhow!("{}'s thread panicked", h.node))??;
            std::fs::write(dir.join(format!("{}.log", h.node)), &b.log)?;
            std::fs::write(dir.join(format!("{}-serial.log", h.node)), &b.serial)?;
            if let Some(why) = lab::crash(&b) {
                bail!("{}: {why} (target/fleet/{}-serial.log)", h.node, h.node);
            }
            if !b.log.contains("FLEET-AGENT-EXIT 0") {
                bail!("{}: its agent did not exit cleanly (target/fleet/{}.log)", h.node, h.node);
            }
        }
        checked
    });
    let took = start.elapsed();
    let _ = writeln!(
        report,
        "\nThe whole run (two boots under TCG, the checks, the shutdowns) took {:.0} s.",
        took.as_secs_f64()
    );
    std::fs::write(dir.join("report.md"), &report)?;
    println!("{report}");
    result?;
    eprintln!("fleet: passed in {:.0} s (target/fleet/report.md)", took.as_secs_f64());
    Ok(())
}

/// The checks, once both hosts boot: scraped, the alert with its node, the fleet row on both
/// Prometheus servers.
fn check(root: &Path, dir: &Path, targets: &[String], report: &mut String) -> Result<()> {
    let rules = root.join("dashboards/prometheus/ioasid-rules.yaml");
    let prom = Prometheus::start(
        &dir.join("prometheus"),
        &format!(
            "global: {{ scrape_interval: 2s, evaluation_interval: 2s }}\nrule_files: [{:?}]\nscrape_configs:\n  - job_name: ioasid\n    static_configs: [{{ targets: {targets:?} }}]\n",
            rules.display()
        ),
    )?;
    let global = Prometheus::start(
        &dir.join("global"),
        &format!(
            "global: {{ scrape_interval: 2s, evaluation_interval: 2s }}\nscrape_configs:\n  - job_name: federate\n    honor_labels: true\n    metrics_path: /federate\n    params: {{ 'match[]': ['{FEDERATE}'] }}\n    static_configs: [{{ targets: [\"{}\"] }}]\n",
            prom.addr
        ),
    )?;
    let up = until(UP_WITHIN, || {
        let r = prom.query("up{job=\"ioasid\"} == 1").ok()?;
        (r.len() == targets.len()).then_some(())
    });
    if up.is_none() {
        bail!(
            "Prometheus did not scrape both hosts' agents within {} s (target/fleet/*/out/agent.log)",
            UP_WITHIN.as_secs()
        );
    }
    eprintln!("fleet: both hosts' agents are scraped");
    let alert = until(DATA_WITHIN, || {
        let r = prom.query("ALERTS{alertname=\"IoasidWbinvdStorm\",alertstate=\"firing\"}").ok()?;
        r.into_iter().find(|a| a["metric"]["vm"] == HOSTS[0].vm)
    })
    .context("IoasidWbinvdStorm never fired for fleet-a's storming VM")?;
    if alert["metric"]["node"] != HOSTS[0].node {
        bail!("the storm alert does not carry fleet-a's node: {alert}");
    }
    let firing = prom.query("ALERTS{alertname=\"IoasidWbinvdStorm\",alertstate=\"firing\"}")?;
    if let Some(other) = firing.iter().find(|a| a["metric"]["node"] != HOSTS[0].node) {
        bail!("a storm alert for a host that does not storm: {other}");
    }
    let _ = writeln!(
        report,
        "The storm alert, as Prometheus returned it:\n\n```json\n{}\n```\n",
        alert["metric"]
    );
    // fleet-a's VM holds a device that makes it non-coherent; fleet-b's none.
    let noncoherent = "instance:ioasid_noncoherent_vms:max";
    let per_host = until(DATA_WITHIN, || {
        let r = prom.query(noncoherent).ok()?;
        let of = |t: &str| {
            r.iter()
                .find(|s| s["metric"]["instance"] == t)
                .and_then(|s| s["value"][1].as_str().map(str::to_string))
        };
        (of(&targets[0]).as_deref() == Some("1") && of(&targets[1]).as_deref() == Some("0")).then_some(())
    });
    if per_host.is_none() {
        bail!(
            "non-coherent VMs per host are not 1 (fleet-a) and 0 (fleet-b): {:?}",
            prom.query(noncoherent)?
        );
    }
    let panels = fleet_panels(root)?;
    for (name, server) in
        [("Prometheus (scraping both hosts)", &prom), ("the global Prometheus (federated)", &global)]
    {
        let _ = writeln!(report, "## The dashboard's fleet row on {name}\n");
        for (title, expr) in &panels {
            let r = until(DATA_WITHIN, || {
                let r = server.query(expr).ok()?;
                (instances(&r).len() == targets.len()).then_some(r)
            })
            .with_context(|| format!("{name}: panel {title:?} ({expr}) has no data for both hosts"))?;
            let _ = writeln!(report, "- {title}: `{expr}`");
            for s in &r {
                let m = &s["metric"];
                let _ = writeln!(
                    report,
                    "  - instance `{}`{}{}: {}",
                    m["instance"].as_str().unwrap_or(""),
                    m["node"].as_str().map(|n| format!(", node `{n}`")).unwrap_or_default(),
                    m["vm"].as_str().map(|v| format!(", vm `{v}`")).unwrap_or_default(),
                    s["value"][1].as_str().unwrap_or("")
                );
            }
        }
        let _ = writeln!(report);
    }
    let federated = global.query("vm:ioasid_wbinvd:rate1m")?;
    let _ = writeln!(report, "Federated `vm:ioasid_wbinvd:rate1m` on the global Prometheus:\n");
    for s in &federated {
        let _ = writeln!(report, "- `{}`: {}", s["metric"], s["value"][1].as_str().unwrap_or(""));
    }
    Ok(())
}
