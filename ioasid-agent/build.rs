//! Builds the ioasid-ebpf object and places it in OUT_DIR for `include_bytes_aligned!`.
//!
//! The eBPF crate is built for bpfel-unknown-none by Debian's rustc (which ships a prebuilt
//! `core` for that target, so no build-std is needed) and linked by bpf-linker; see
//! shared/TOOLCHAIN.md. `cargo xtask setup` installs both. Overrides: IOASID_BPF_RUSTC,
//! IOASID_BPF_LINKER.

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

    let rustc =
        env::var_os("IOASID_BPF_RUSTC").map_or_else(|| PathBuf::from("/usr/bin/rustc"), PathBuf::from);
    if !rustc.exists() {
        bail!(
            "Debian's rustc ({}) is missing: run `cargo xtask setup` (installs rustc-web and \
             libstd-rust-web-dev-bpf), or set IOASID_BPF_RUSTC",
            rustc.display()
        );
    }
    let linker = find_linker().context(
        "bpf-linker not found: run `cargo xtask setup` (installs bpf-linker 0.13 on LLVM 22), or set IOASID_BPF_LINKER",
    )?;
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
    let out = PathBuf::from(env::var("OUT_DIR")?).join("ioasid.bpf.o");
    std::fs::copy(&obj, &out).with_context(|| format!("copying {}", obj.display()))?;
    Ok(())
}

fn find_linker() -> Option<PathBuf> {
    if let Some(p) = env::var_os("IOASID_BPF_LINKER") {
        return Some(PathBuf::from(p));
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
