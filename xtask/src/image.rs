//! `cargo xtask image`: the agent's container image, and its test.
//!
//! The image is `FROM scratch` (deploy/Containerfile): the stripped agent with its eBPF object
//! embedded, the shared libraries `ldd` says it links, the default policy, and empty mount
//! points. Built with podman (`--storage-driver vfs`, which works on this machine). `check`
//! cannot `podman run` here (this machine's cgroups are hybrid), so it tests what the image
//! holds: it exports the image's root filesystem, binds the host's /proc and /sys into it, and
//! runs the agent from it with chroot: `status`, then a short `run` until ready and serving.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::output;

const STORAGE: &str = "--storage-driver=vfs";

fn copy(from: &Path, ctx: &Path, to: &str, mode: u32) -> Result<()> {
    let dest = ctx.join(to.trim_start_matches('/'));
    std::fs::create_dir_all(dest.parent().context("a parent")?)?;
    // Follows symlinks: the image holds the files themselves.
    std::fs::copy(from, &dest).with_context(|| format!("copying {}", from.display()))?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Builds `ioasid-agent:<version>` from the release build; returns the tag.
pub fn build(root: &Path, version: &str) -> Result<String> {
    let ctx = root.join("target/image/context");
    let _ = std::fs::remove_dir_all(&ctx);
    std::fs::create_dir_all(&ctx)?;
    let agent = root.join("target/release/ioasid-agent");
    copy(&agent, &ctx, "/usr/bin/ioasid-agent", 0o755)?;
    output(Command::new("strip").arg("--strip-debug").arg(ctx.join("usr/bin/ioasid-agent")))?;
    // The libraries it links, at the paths the loader looks for them.
    for line in output(Command::new("ldd").arg(&agent))?.lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            copy(Path::new(path), &ctx, path, 0o755)?;
        }
    }
    copy(&root.join("ioasid-agent/src/engine/policy/default.yaml"), &ctx, "/etc/ioasid/policy.yaml", 0o644)?;
    for dir in ["proc", "sys", "dev", "tmp", "run", "var/log/ioasid"] {
        std::fs::create_dir_all(ctx.join(dir))?;
    }
    let tag = format!("ioasid-agent:{version}");
    output(
        Command::new("podman")
            .args([STORAGE, "build", "-q", "-t", &tag, "-f"])
            .arg(root.join("deploy/Containerfile"))
            .arg(&ctx),
    )?;
    let size =
        output(Command::new("podman").args([STORAGE, "image", "inspect", "--format", "{{.Size}}", &tag]))?;
    eprintln!("xtask: image {tag} ({} KiB)", size.trim().parse::<u64>().unwrap_or(0) / 1024);
    Ok(tag)
}

struct Mounted(Vec<PathBuf>);

impl Drop for Mounted {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-R").arg(m).status();
        }
    }
}

/// Exports the image's root filesystem and runs the agent from it under chroot.
pub fn check(root: &Path, tag: &str) -> Result<()> {
    let start = Instant::now();
    let rootfs = root.join("target/image/rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    std::fs::create_dir_all(&rootfs)?;
    let name = format!("ioasid-image-check-{}", std::process::id());
    output(Command::new("podman").args([STORAGE, "create", "--name", &name, tag]))?;
    let exported = Command::new("sh")
        .arg("-c")
        .arg(format!("podman {STORAGE} export {name} | tar -x -C '{}'", rootfs.display()))
        .status();
    let _ = output(Command::new("podman").args([STORAGE, "rm", &name]));
    if !exported?.success() {
        bail!("exporting the image's root filesystem failed");
    }
    let mut files = Vec::new();
    list(&rootfs, &rootfs, &mut files)?;
    let result = {
        let mut mounted = Mounted(Vec::new());
        for fs in ["proc", "sys"] {
            output(Command::new("mount").arg("--rbind").arg(format!("/{fs}")).arg(rootfs.join(fs)))?;
            mounted.0.push(rootfs.join(fs));
        }
        run_inside(&rootfs)
    };
    let _ = std::fs::remove_dir_all(&rootfs);
    result?;
    eprintln!(
        "xtask: image {tag}: {} files ({}), status and a short run from it under chroot in {:.1} s",
        files.len(),
        files.join(", "),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn list(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            list(base, &e.path(), out)?;
        } else {
            out.push(format!("/{}", e.path().strip_prefix(base)?.display()));
        }
    }
    out.sort();
    Ok(())
}

fn run_inside(rootfs: &Path) -> Result<()> {
    let chroot = |args: &[&str]| {
        let mut c = Command::new("chroot");
        c.arg(rootfs).arg("/usr/bin/ioasid-agent").args(args);
        c
    };
    let status = output(&mut chroot(&["status", "--json"]))?;
    let v: serde_json::Value = serde_json::from_str(&status).context("status --json from the image")?;
    if v["hooks"].as_array().is_none_or(|h| h.is_empty()) {
        bail!("status from the image lists no hooks: {status}");
    }
    let state = format!("/sys/fs/bpf/ioasid-image-{}", std::process::id());
    let child = chroot(&[
        "run",
        "--policy",
        "/etc/ioasid/policy.yaml",
        "--listen",
        "127.0.0.1:0",
        "--audit-log",
        "-",
        "--lock-file",
        "/run/ioasid-agent.lock",
        "--state-dir",
        &state,
        "--ready-file",
        "/tmp/ready",
    ])
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(rootfs.join("tmp/agent.log"))?)
    .spawn()?;
    let result = crate::short_run(
        child,
        &rootfs.join("tmp/ready"),
        &rootfs.join("tmp/agent.log"),
        "the agent from the image",
        |a| {
            let r = ureq::get(&format!("http://{a}/readyz")).call()?.into_body().read_to_string()?;
            if r != "ready\n" {
                bail!("the agent from the image answered /readyz {r:?}");
            }
            Ok(())
        },
    );
    let _ = std::fs::remove_dir_all(&state);
    result
}
