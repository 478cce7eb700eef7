//! The dashboards and alert rules, tested with the real Prometheus tools:
//! - promtool checks and unit-tests the rules (no root needed);
//! - a real Prometheus server scrapes a real agent while a real guest storms and a real enable
//!   is denied; every Grafana panel query must run, the key ones must return data, and the
//!   storm alert must fire.
//!
//! The live test runs on this machine only: it is about the rules and dashboards, and under
//! the lab's emulation Prometheus itself is too slow to be timed.

mod support;

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use support::*;

fn dashboards() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards"))
}

#[test]
fn rules_pass_promtool_check_and_unit_tests() {
    let dir = dashboards().join("prometheus");
    for args in [&["check", "rules", "ioasid-rules.yaml"][..], &["test", "rules", "ioasid-rules.test.yaml"]] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool (Debian package prometheus; `cargo xtask setup` installs it)");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Alerts people can act on: every alert has a severity of the common convention (critical or
/// warning), a summary, a runbook_url naming a runbook in docs/runbooks/ that exists and has
/// its sections, and at least one promtool unit test case.
#[test]
fn every_alert_has_a_severity_a_runbook_and_a_test() {
    let dir = dashboards().join("prometheus");
    let rules: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(dir.join("ioasid-rules.yaml")).unwrap()).unwrap();
    let tests = std::fs::read_to_string(dir.join("ioasid-rules.test.yaml")).unwrap();
    let root = dashboards().join("..");
    let mut alerts = 0;
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let Some(name) = rule["alert"].as_str() else { continue };
            alerts += 1;
            let severity = rule["labels"]["severity"].as_str();
            assert!(matches!(severity, Some("critical" | "warning")), "{name}: severity {severity:?}");
            assert!(rule["annotations"]["summary"].is_string(), "{name}: no summary");
            let url = rule["annotations"]["runbook_url"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no runbook_url"));
            assert_eq!(url, format!("docs/runbooks/{name}.md"));
            let book = std::fs::read_to_string(root.join(url)).unwrap_or_else(|e| panic!("{url}: {e}"));
            for section in ["**Meaning.**", "**Impact.**", "**Diagnose.**", "**Act.**"] {
                assert!(book.contains(section), "{url} has no {section} section");
            }
            assert!(tests.contains(&format!("alertname: {name}\n")), "{name} has no promtool test case");
        }
    }
    assert!(alerts >= 6, "{alerts} alerts");
    let books = std::fs::read_dir(root.join("docs/runbooks")).unwrap().count();
    assert_eq!(books, alerts, "a runbook for every alert, and no runbook without one");
}

/// Every PromQL expression of the Grafana dashboard, with its template variables filled in.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(dashboards().join("grafana/ioasid-overview.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            let expr = expr
                .replace("$instance", ".*")
                .replace("$job", "ioasid")
                .replace("$__rate_interval", "15s")
                .replace("$__range", "5m");
            assert!(!expr.contains('$'), "unknown template variable in {expr}");
            out.push((p["title"].as_str().unwrap().to_string(), expr));
        }
    }
    assert!(out.len() >= 10, "{out:?}");
    out
}

struct Prometheus {
    child: Child,
    addr: String,
    _dir: TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Self {
        let dir = TempDir::new("prometheus");
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let rules = dashboards().join("prometheus/ioasid-rules.yaml");
        let config = dir.path("prometheus.yml");
        write(
            &config,
            &format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: [{:?}]\nscrape_configs:\n  - job_name: ioasid\n    static_configs: [{{ targets: [\"{target}\"] }}]\n",
                rules.display()
            ),
        );
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus; `cargo xtask setup` installs it)");
        Self { child, addr: format!("127.0.0.1:{port}"), _dir: dir }
    }

    /// Runs an instant query; the `data.result` array, or the API's error.
    fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let url = format!("http://{}/api/v1/query", self.addr);
        let mut resp = ureq::get(&url).query("query", expr).call().map_err(|e| e.to_string())?;
        let body = resp.body_mut().read_to_string().map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if v["status"] != "success" {
            return Err(v.to_string());
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

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn dashboard_queries_and_alerts_work_on_a_live_prometheus() {
    require_kernel();
    let _g = serial();
    let dir = TempDir::new("dash");
    let prefix = unique("dash");
    let policy = dir.path("policy.yaml");
    write(
        &policy,
        &format!("default:\n  incoherent_dma: audit\n  wbinvd: {{ rate: 1000 }}\nrules:\n  - name: deny-tenants\n    match: {{ vm: \"{prefix}-tenant-*\" }}\n    incoherent_dma: deny\n"),
    );
    let agent = Agent::start(&["--policy", policy.to_str().unwrap()]);
    let prom = Prometheus::start(&agent.addr);
    let up = eventually(Duration::from_secs(20), || {
        prom.query("up{job=\"ioasid\"} == 1").ok().filter(|r| !r.is_empty())
    });
    assert!(up.is_some(), "Prometheus never scraped the agent");

    // Started as KubeVirt's virt-launcher starts a VMM (a pod's cgroup, the domain named
    // NAMESPACE_NAME): the join below finds its namespace.
    let storm = format!("{prefix}_storm");
    let pod = kubevirt_pod_cgroup(&format!("5d0c1e2f-3a4b-4c5d-8e6f-{:012x}", std::process::id()));
    let g = pod.spawn(guest_path().as_os_str(), &["--name", &storm, "--rate", "20000", "--duration", "8"]);
    // Like a real VMM, the tenant creates its VM a while before it adds a device.
    let delay = format!("{}", 2.5 * f64::from(slow()));
    let tenant = format!("{prefix}-tenant-1");
    let (status, summary, err) =
        finish(guest(&["--name", &tenant, "--file-add", "--file-add-delay", &delay]));
    assert_denied_as_recorded(&agent.wait_record(&tenant), status, &summary, &err);

    let firing = eventually(Duration::from_secs(20), || {
        let q = format!("ALERTS{{alertname=\"IoasidWbinvdStorm\",alertstate=\"firing\",vm=\"{storm}\"}}");
        prom.query(&q).ok().filter(|r| !r.is_empty())
    });
    let firing = firing.expect("the storm alert never fired in Prometheus");
    // With the host's node name (the agent's, from ioasid_vm_info: no label from the scrape).
    let node = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    assert_eq!(firing[0]["metric"]["node"], node.as_str(), "{firing:?}");

    let must = [
        "WBINVD per second, by VM",
        "WBINVD handler time p99, by VM",
        "WBINVD storms",
        "Incoherent-DMA enables in range, by decision",
        "Denied enables since VMM start, by VM",
        "Hooks attached",
        "Enforcement mechanism",
        "WBINVD per second with the KubeVirt VM (namespace, name, node)",
        "Host WBINVD per second (every VM, exited ones included)",
    ];
    // Rate windows need a few scrapes: wait until every key panel has data.
    let mut empty = Vec::new();
    let ready = eventually(Duration::from_secs(20), || {
        empty.clear();
        for (title, expr) in dashboard_queries() {
            let result = prom.query(&expr).unwrap_or_else(|e| panic!("panel {title:?}: {expr}: {e}"));
            if result.is_empty() {
                empty.push(title);
            }
        }
        (!must.iter().any(|m| empty.iter().any(|t| t == m))).then_some(())
    });
    assert!(ready.is_some(), "panels without data: {empty:?}");
    let increase = prom
        .query(&format!("sum(increase(ioasid_incoherent_dma_requests_total{{decision=\"denied\",vm=\"{prefix}-tenant-1\"}}[5m]))"))
        .unwrap();
    assert!(increase[0]["value"][1].as_str().unwrap().parse::<f64>().unwrap() > 0.5, "{increase:?}");
    let denied = eventually(Duration::from_secs(10), || {
        let q = format!("ALERTS{{alertname=\"IoasidIncoherentDmaDenied\",vm=\"{prefix}-tenant-1\"}}");
        prom.query(&q).ok().filter(|r| !r.is_empty())
    });
    assert!(denied.is_some(), "the denied-enable alert did not fire");
    // The documented join: a VM's WBINVD rate beside its KubeVirt namespace, name and node.
    let joined = eventually(Duration::from_secs(20), || {
        let q =
            "vm:ioasid_wbinvd:rate1m * on (instance, vm) group_left (namespace, name, node) ioasid_vm_info";
        let r = prom.query(q).ok()?;
        r.into_iter().find(|s| s["metric"]["vm"] == storm.as_str())
    });
    let joined =
        joined.expect("the join of the WBINVD rate with ioasid_vm_info returned nothing for the storm VM");
    assert_eq!(
        (joined["metric"]["namespace"].as_str(), joined["metric"]["name"].as_str()),
        (Some(prefix.as_str()), Some("storm")),
        "{joined}"
    );
    assert!(joined["value"][1].as_str().unwrap().parse::<f64>().unwrap() > 100.0, "{joined}");
    eprintln!("joined: {joined}");
    let (status, summary, err) = finish(g);
    assert!(status.success(), "the storm guest (alert budget) must live: {err}");
    assert!(summary["wbinvd"].as_u64().unwrap_or(0) > 0, "{summary}");
}
