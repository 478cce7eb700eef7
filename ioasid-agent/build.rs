//! Builds the ioasid-ebpf object and places it in OUT_DIR for `include_bytes_aligned!`.
//!
//! The eBPF crate is built for bpfel-unknown-none by Debian's rustc (which ships a prebuilt
//! `core` for that target, so no build-std is needed) and linked by bpf-linker; see
//! docs/TOOLCHAIN.md. `cargo xtask setup` installs both. Overrides: IOASID_BPF_RUSTC,
//! IOASID_BPF_LINKER.
//!
//! Where that toolchain is missing, the agent is built against an empty stub object instead
//! (with a cargo warning), so `cargo check`, clippy and the unit tests work on any machine; an
//! agent built that way refuses to load anything and says why. `IOASID_REQUIRE_BPF=1` (set by
//! `cargo xtask`) turns a missing toolchain into a build error instead.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent().context("workspace root")?.to_path_buf();
    for dir in ["ioasid-ebpf/src", "ioasid-common/src", "ioasid-ebpf/Cargo.toml", "ioasid-common/Cargo.toml"]
    {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=IOASID_BPF_RUSTC");
    println!("cargo:rerun-if-env-changed=IOASID_BPF_LINKER");
    println!("cargo:rerun-if-env-changed=IOASID_REQUIRE_BPF");
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=IOASID_SKIP_KERNEL_TESTS");
    println!("cargo:rustc-env=IOASID_COMMIT={}", commit(&root));
    println!("cargo::rustc-check-cfg=cfg(ioasid_stub_object)");
    println!("cargo::rustc-check-cfg=cfg(ioasid_kernel_tests)");
    let out = PathBuf::from(env::var("OUT_DIR")?).join("ioasid.bpf.o");

    let rustc =
        env::var_os("IOASID_BPF_RUSTC").map_or_else(|| PathBuf::from("/usr/bin/rustc"), PathBuf::from);
    let missing = if !rustc.is_file() {
        Some(format!(
            "Debian's rustc ({}) is missing: run `cargo xtask setup` (installs rustc-web and \
             libstd-rust-web-dev-bpf), or set IOASID_BPF_RUSTC",
            rustc.display()
        ))
    } else if find_linker().is_none() {
        Some("bpf-linker not found: run `cargo xtask setup` (installs bpf-linker 0.13 on LLVM 22), or set IOASID_BPF_LINKER".into())
    } else {
        None
    };
    if let Some(why) = missing {
        if env::var_os("IOASID_REQUIRE_BPF").is_some_and(|v| v == "1") {
            bail!("{why}");
        }
        println!(
            "cargo:warning=building ioasid-agent with a stub eBPF object (it will refuse to run): {why}"
        );
        println!("cargo:rustc-cfg=ioasid_stub_object");
        std::fs::write(&out, b"").context("writing the stub object")?;
        return Ok(());
    }
    let linker = find_linker().context("bpf-linker")?;
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = root.join("target").join("ebpf");
    let rustflags = ["-C", "debuginfo=2", "-C", "link-arg=--btf", "-C", "panic=abort"].join("\x1f");

    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--release", "--package", "ioasid-ebpf", "--target", "bpfel-unknown-none"])
        .arg("--config")
        .arg(format!("target.bpfel-unknown-none.linker={:?}", linker.display().to_string()))
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings must not leak into the eBPF build.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME"
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.env("RUSTC", &rustc)
        // aya-ebpf uses #![feature(asm_experimental_arch)]; Debian's stable rustc needs this.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    let status = cmd.status().context("running cargo for ioasid-ebpf")?;
    if !status.success() {
        bail!("building ioasid-ebpf failed ({status})");
    }
    let obj = target_dir.join("bpfel-unknown-none/release/ioasid-ebpf");
    std::fs::copy(&obj, &out).with_context(|| format!("copying {}", obj.display()))?;
    // The kernel tests (tests/*.rs) run where they can: as root, with /dev/kvm, the real object.
    match kernel_tests_blocked() {
        None => println!("cargo:rustc-cfg=ioasid_kernel_tests"),
        Some(why) => println!("cargo:warning=kernel tests will be reported as ignored: {why}"),
    }
    Ok(())
}

/// Why the kernel tests cannot run on this machine, if they cannot.
fn kernel_tests_blocked() -> Option<&'static str> {
    if env::var_os("IOASID_SKIP_KERNEL_TESTS").is_some_and(|v| v == "1") {
        return Some("IOASID_SKIP_KERNEL_TESTS=1");
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if !root {
        return Some("not root (loading eBPF programs needs CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)");
    }
    if !Path::new("/dev/kvm").exists() {
        return Some("no /dev/kvm");
    }
    None
}

fn find_linker() -> Option<PathBuf> {
    if let Some(p) = env::var_os("IOASID_BPF_LINKER") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let mut dirs: Vec<PathBuf> =
        env::var_os("PATH").map(|p| env::split_paths(&p).collect()).unwrap_or_default();
    if let Some(home) = env::var_os("CARGO_HOME") {
        dirs.push(Path::new(&home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join("bpf-linker")).find(|p| p.is_file())
}

/// The commit the build is from (`--version`): read from the checkout's .git (HEAD, its ref,
/// or packed-refs), no git binary needed; "unknown" outside a checkout.
fn commit(root: &Path) -> String {
    let git = root.join(".git");
    println!("cargo:rerun-if-changed={}", git.join("HEAD").display());
    let Ok(head) = std::fs::read_to_string(git.join("HEAD")) else { return "unknown".into() };
    let head = head.trim();
    let id = match head.strip_prefix("ref: ") {
        None => Some(head.to_string()),
        Some(name) => {
            println!("cargo:rerun-if-changed={}", git.join(name).display());
            println!("cargo:rerun-if-changed={}", git.join("packed-refs").display());
            std::fs::read_to_string(git.join(name)).ok().map(|s| s.trim().to_string()).or_else(|| {
                std::fs::read_to_string(git.join("packed-refs"))
                    .ok()?
                    .lines()
                    .find_map(|l| l.strip_suffix(name)?.strip_suffix(' ').map(str::to_string))
            })
        }
    };
    match id.filter(|i| i.len() >= 12 && i.chars().all(|c| c.is_ascii_hexdigit())) {
        Some(i) => i[..12].to_string(),
        None => "unknown".into(),
    }
}
