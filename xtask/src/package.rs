//! `cargo xtask package`: a Debian package of the agent, and its install test.
//!
//! Built with Debian's own `dpkg-deb` from a staged tree: the agent binary with its eBPF object
//! embedded (the target host needs no toolchain), the systemd unit, the default policy as a
//! conffile under /etc/ioasid/, a logrotate configuration, and the dashboards, alert rules and
//! runbooks under /usr/share/ioasid/. `check` installs it on this machine with `dpkg -i`, runs
//! the installed agent (`status`, then a short `run` with the installed policy until it is
//! ready), verifies the installed unit with `systemd-analyze verify`, and removes it
//! (`dpkg -r`, then `--purge`), checking what each step leaves.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::output;

pub const NAME: &str = "ioasid";

pub fn version(root: &Path) -> Result<String> {
    let toml = std::fs::read_to_string(root.join("Cargo.toml"))?;
    let line = toml.lines().find(|l| l.starts_with("version = ")).context("workspace version")?;
    Ok(line.split('"').nth(1).context("quoted version")?.to_string())
}

fn put(stage: &Path, path: &str, from: &[u8], mode: u32) -> Result<()> {
    let dest = stage.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(dest.parent().context("a parent")?)?;
    std::fs::write(&dest, from).with_context(|| format!("writing {}", dest.display()))?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn copy_dir(stage: &Path, from: &Path, to: &str) -> Result<()> {
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_dir() {
            copy_dir(stage, &entry.path(), &format!("{to}/{name}"))?;
        } else {
            put(stage, &format!("{to}/{name}"), &std::fs::read(entry.path())?, 0o644)?;
        }
    }
    Ok(())
}

/// Builds target/package/ioasid_<version>_amd64.deb from the release build; returns its path.
pub fn build(root: &Path) -> Result<PathBuf> {
    let version = version(root)?;
    let out = root.join("target/package");
    let stage = out.join("root");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage)?;
    let bin = std::fs::read(root.join("target/release/ioasid-agent"))
        .context("the release agent (cargo xtask build)")?;
    put(&stage, "/usr/bin/ioasid-agent", &bin, 0o755)?;
    // Debug info stays in target/release; the installed binary carries none.
    output(Command::new("strip").arg("--strip-debug").arg(stage.join("usr/bin/ioasid-agent")))?;
    put(
        &stage,
        "/lib/systemd/system/ioasid-agent.service",
        &std::fs::read(root.join("deploy/ioasid-agent.service"))?,
        0o644,
    )?;
    put(
        &stage,
        "/etc/logrotate.d/ioasid-agent",
        &std::fs::read(root.join("deploy/ioasid-agent.logrotate"))?,
        0o644,
    )?;
    put(
        &stage,
        "/etc/ioasid/policy.yaml",
        &std::fs::read(root.join("ioasid-agent/src/engine/policy/default.yaml"))?,
        0o644,
    )?;
    copy_dir(&stage, &root.join("dashboards"), "/usr/share/ioasid/dashboards")?;
    copy_dir(&stage, &root.join("docs/runbooks"), "/usr/share/ioasid/runbooks")?;
    put(
        &stage,
        "/usr/share/ioasid/examples/policy.yaml",
        &std::fs::read(root.join("examples/policy.yaml"))?,
        0o644,
    )?;
    put(&stage, &format!("/usr/share/doc/{NAME}/README.md"), &std::fs::read(root.join("README.md"))?, 0o644)?;
    copy_dir(&stage, &root.join("docs"), &format!("/usr/share/doc/{NAME}/docs"))?;
    let installed_kb = dir_size(&stage)? / 1024;
    let control = format!(
        "Package: {NAME}\nVersion: {version}\nArchitecture: amd64\nMaintainer: ioasid developers <ioasid@localhost>\n\
         Installed-Size: {installed_kb}\nDepends: libc6 (>= 2.34)\nRecommends: logrotate\nSection: admin\nPriority: optional\n\
         Description: incoherent-DMA policy enforcement and WBINVD accounting for KVM hosts\n \
         ioasid-agent checks every incoherent-DMA enable (a VFIO device whose IOMMU does not keep\n \
         DMA coherent, added to a KVM VM) against a policy and enforces it in the kernel with eBPF,\n \
         counts and times guest WBINVD per VM, detects WBINVD storms, writes an audit log and\n \
         exports Prometheus metrics. The eBPF programs are embedded in the binary.\n"
    );
    put(&stage, "/DEBIAN/control", control.as_bytes(), 0o644)?;
    put(&stage, "/DEBIAN/conffiles", b"/etc/ioasid/policy.yaml\n/etc/logrotate.d/ioasid-agent\n", 0o644)?;
    // The unit is installed, not started: the operator reviews the policy first
    // (`systemctl enable --now ioasid-agent`). Removal stops it; purge drops its log and its
    // pinned kernel state.
    put(
        &stage,
        "/DEBIAN/postinst",
        b"#!/bin/sh\nset -e\nif [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi\n",
        0o755,
    )?;
    put(
        &stage,
        "/DEBIAN/prerm",
        b"#!/bin/sh\nset -e\nif [ -d /run/systemd/system ]; then systemctl stop ioasid-agent.service 2>/dev/null || true; fi\n",
        0o755,
    )?;
    put(
        &stage,
        "/DEBIAN/postrm",
        b"#!/bin/sh\nset -e\nif [ \"$1\" = purge ]; then rm -rf /var/log/ioasid /sys/fs/bpf/ioasid; fi\n\
          if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi\n",
        0o755,
    )?;
    let deb = out.join(format!("{NAME}_{version}_amd64.deb"));
    let status = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb)
        .stdout(Stdio::null())
        .status()
        .context("dpkg-deb (Debian's dpkg)")?;
    if !status.success() {
        bail!("dpkg-deb failed: {status}");
    }
    eprintln!("xtask: {} ({} KiB)", deb.display(), std::fs::metadata(&deb)?.len() / 1024);
    Ok(deb)
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        n += if entry.file_type()?.is_dir() { dir_size(&entry.path())? } else { entry.metadata()?.len() };
    }
    Ok(n)
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", NAME])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs the package, runs the installed agent, verifies the unit, removes and purges it.
pub fn check(deb: &Path) -> Result<()> {
    if installed() {
        bail!("{NAME} is already installed on this machine: the install test would replace it");
    }
    let start = Instant::now();
    output(Command::new("dpkg").arg("-i").arg(deb))?;
    let result = check_installed();
    // Removed whatever the checks said.
    let removed = output(Command::new("dpkg").args(["-r", NAME]));
    result?;
    removed?;
    if Path::new("/usr/bin/ioasid-agent").exists() {
        bail!("dpkg -r left /usr/bin/ioasid-agent");
    }
    if !Path::new("/etc/ioasid/policy.yaml").exists() {
        bail!("dpkg -r removed the conffile /etc/ioasid/policy.yaml (only --purge may)");
    }
    output(Command::new("dpkg").args(["--purge", NAME]))?;
    for gone in [
        "/etc/ioasid/policy.yaml",
        "/etc/logrotate.d/ioasid-agent",
        "/lib/systemd/system/ioasid-agent.service",
    ] {
        if Path::new(gone).exists() {
            bail!("dpkg --purge left {gone}");
        }
    }
    eprintln!(
        "xtask: package installed, run, verified, removed and purged in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn check_installed() -> Result<()> {
    let agent = "/usr/bin/ioasid-agent";
    let status = output(Command::new(agent).args(["status", "--json"]))?;
    let v: serde_json::Value = serde_json::from_str(&status).context("status --json")?;
    if v["hooks"].as_array().is_none_or(|h| h.is_empty()) {
        bail!("the installed agent's status lists no hooks: {status}");
    }
    output(Command::new(agent).args(["policy", "check", "/etc/ioasid/policy.yaml"]))?;
    // The unit as installed: systemd-analyze verify must be clean (it checks the binary exists).
    let verify = Command::new("systemd-analyze")
        .args(["verify", "/lib/systemd/system/ioasid-agent.service"])
        .output()
        .context("systemd-analyze")?;
    let complaints = String::from_utf8_lossy(&verify.stderr).into_owned();
    if !verify.status.success() || complaints.lines().any(|l| l.contains("ioasid")) {
        bail!("systemd-analyze verify: {complaints}");
    }
    // A short run from the installed paths (its own scratch audit log, lock and state), ready
    // and serving, then a clean stop; with exactly the unit's capability bounding set and
    // no_new_privs, as systemd would run it (this machine's init is not systemd).
    let unit = std::fs::read_to_string("/lib/systemd/system/ioasid-agent.service")?;
    let caps = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .context("the unit has a CapabilityBoundingSet")?;
    let bounding: Vec<String> = caps
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let dir = std::env::temp_dir().join(format!("ioasid-package-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ready = dir.join("ready");
    let child = Command::new("setpriv")
        .arg("--no-new-privs")
        .arg(format!("--bounding-set=-all,{}", bounding.join(",")))
        .arg(agent)
        .args(["run", "--policy", "/etc/ioasid/policy.yaml", "--listen", "127.0.0.1:0"])
        .arg("--audit-log")
        .arg(dir.join("audit.jsonl"))
        .arg("--lock-file")
        .arg(dir.join("lock"))
        .arg("--state-dir")
        .arg(format!("/sys/fs/bpf/ioasid-package-{}", std::process::id()))
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log"))?)
        .spawn()?;
    let state = format!("/sys/fs/bpf/ioasid-package-{}", std::process::id());
    let result = crate::short_run(child, &ready, &dir.join("agent.log"), "the installed agent", |a| {
        let ready = ureq::get(&format!("http://{a}/readyz")).call()?.into_body().read_to_string()?;
        let metrics = ureq::get(&format!("http://{a}/metrics")).call()?.into_body().read_to_string()?;
        if ready != "ready\n" {
            bail!("the installed agent answered /readyz {ready:?}");
        }
        for series in ["ioasid_policy_info{", "process_resident_memory_bytes ", "process_open_fds "] {
            if !metrics.contains(series) {
                bail!("the installed agent's /metrics has no {series}");
            }
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&state);
    result
}
