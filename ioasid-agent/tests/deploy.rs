//! The deployment artifacts, checked with the real tools: the Kubernetes manifests built with
//! `kubectl kustomize` and validated against the Kubernetes schemas with `kubernetes-validate
//! --strict` (both installed on the development machines: kubectl preinstalled,
//! kubernetes-validate by `cargo xtask setup`); the PrometheusRule's rules with promtool; the
//! probes, node name and state mount the agent relies on. (The Debian package and the systemd
//! unit are checked by installing them: `cargo xtask package --check`, part of `cargo xtask test`.)

use std::{path::PathBuf, process::Command};

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn tool(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what} is not installed ({e}): `cargo xtask setup` installs it"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed:\n{text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kubernetes_manifests_build_and_validate() {
    let built =
        tool(Command::new("kubectl").arg("kustomize").arg(root().join("deploy/kubernetes")), "kubectl");
    let dir = std::env::temp_dir().join(format!("ioasid-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let all = dir.join("all.yaml");
    std::fs::write(&all, &built).unwrap();
    let out = Command::new("kubernetes-validate").arg("--strict").arg(&all).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for kind in [
        "namespace/ioasid-system",
        "priorityclass/ioasid-node-agent",
        "configmap/ioasid-policy",
        "daemonset/ioasid-agent",
        "service/ioasid-agent",
    ] {
        assert!(text.contains(&format!("passed for resource {kind}")), "{kind} not validated:\n{text}");
    }

    // The Prometheus Operator's kinds have no schema there: their content is checked here.
    let docs: Vec<serde_json::Value> = built
        .split("\n---\n")
        .map(|d| serde_norway::from_str(d).unwrap_or_else(|e| panic!("{e}:\n{d}")))
        .collect();
    let find = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"));
    let rule = find("PrometheusRule");
    let rules = dir.join("rules.yaml");
    std::fs::write(&rules, serde_norway::to_string(&rule["spec"]).unwrap()).unwrap();
    tool(Command::new("promtool").args(["check", "rules"]).arg(&rules), "promtool");
    let monitor = find("ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(
        monitor["spec"]["endpoints"][0]["relabelings"][0]["replacement"], "ioasid",
        "job=\"ioasid\" for the alerts"
    );

    // What the agent relies on: probes on endpoints that mean something, the node's name, the
    // host's bpffs for its pinned state, the host's PIDs.
    let ds = find("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(pod["hostPID"], true);
    // Exec probes of the probe listener on the pod's loopback, which the agent is told to open.
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().filter_map(|a| a.as_str()).collect();
    let probe_listen = args.iter().position(|a| *a == "--probe-listen").map(|i| args[i + 1]);
    assert_eq!(probe_listen, Some("127.0.0.1:9478"), "{args:?}");
    for (probe, what) in [("readinessProbe", "ready"), ("livenessProbe", "live")] {
        assert_eq!(
            c[probe]["exec"]["command"],
            serde_json::json!(["/usr/bin/ioasid-agent", "probe", what, "--addr", "127.0.0.1:9478"]),
            "{probe}"
        );
    }
    assert!(c["env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "NODE_NAME" && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"));
    assert!(c["volumeMounts"].as_array().unwrap().iter().any(|m| m["mountPath"] == "/sys/fs/bpf"));
    assert!(
        c["resources"]["requests"]["memory"].is_string() && c["resources"]["limits"]["memory"].is_string()
    );
    assert!(pod["priorityClassName"].is_string());
    let _ = std::fs::remove_dir_all(&dir);
}
