//! `cargo xtask lab`: the kernel tests on real hosts' kernels.
//!
//! Each stock Debian kernel (resolved with apt, downloaded and unpacked, never installed) boots
//! under QEMU TCG with nested SVM, an emulated Intel IOMMU (snoop control off: an IOMMU that
//! does not enforce cache coherency) and an emulated PCI device (`edu`) bound to vfio-pci. The
//! host's `/` is the VM's root (9p, read-only, with a tmpfs overlay), so the binaries built here
//! run inside unchanged; a second, writable 9p share brings the results out.
//!
//! Inside, the kernel test binaries run one after the other, as `cargo test` would; each result
//! line comes back per kernel. A guest-kernel crash or hang (serial log, timeout) is reported
//! with its kernel and the test that was running, and that kernel's run is retried once; a
//! second failure fails the lab.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// Modules the initramfs needs to mount the host's root over 9p with an overlay, in load
/// order (those built into a kernel are skipped).
const INITRD_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    "overlay",
];

/// The kernels of the matrix: an apt name pattern each; the newest match is used, so a
/// point release that removes a build never breaks the lab.
pub const KERNELS: &[(&str, &str)] = &[
    ("debian-6.1", r"^linux-image-6\.1\.0-[0-9]+-amd64$"),
    ("debian-6.12", r"^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64$"),
];

/// A VM that writes nothing to its test log for this long counts as hung (one test under
/// emulation takes well under a minute; a kernel's whole run about five).
const QUIET_TIMEOUT: Duration = Duration::from_secs(240);
/// And no kernel's run may take longer than this in all.
const RUN_TIMEOUT: Duration = Duration::from_secs(1200);

pub struct Options {
    /// Kernel names (`debian-6.1`...) to run; all when empty.
    pub kernels: Vec<String>,
    /// Test binaries' name filter, passed to each (`cargo test` style).
    pub filter: Vec<String>,
    /// A script to run inside instead of the tests.
    pub script: Option<PathBuf>,
}

/// The lab's cache: downloaded packages, unpacked kernels, initramfs images. Kept between runs
/// (`IOASID_LAB_CACHE`, default /var/cache/ioasid-lab).
fn cache_dir() -> PathBuf {
    std::env::var_os("IOASID_LAB_CACHE").map_or_else(|| PathBuf::from("/var/cache/ioasid-lab"), PathBuf::from)
}

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The newest package whose name matches `pattern` (Debian version order).
fn resolve(pattern: &str) -> Result<String> {
    let out = sh(Command::new("apt-cache").args(["search", "--names-only", pattern]))?;
    let mut names: Vec<String> =
        out.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect();
    if names.is_empty() {
        // The package lists may be missing or stale on a fresh machine.
        sh(Command::new("apt-get").args(["update", "-qq"]))?;
        let out = sh(Command::new("apt-cache").args(["search", "--names-only", pattern]))?;
        names = out.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect();
    }
    let mut best: Option<(String, String)> = None;
    for name in names {
        let policy = sh(Command::new("apt-cache").args(["policy", &name]))?;
        let Some(cand) =
            policy.lines().find_map(|l| l.trim().strip_prefix("Candidate: ")).map(str::to_string)
        else {
            continue;
        };
        let newer = match &best {
            None => true,
            Some((_, v)) => Command::new("dpkg")
                .args(["--compare-versions", &cand, "gt", v])
                .status()
                .is_ok_and(|s| s.success()),
        };
        if newer && cand != "(none)" {
            best = Some((name, cand));
        }
    }
    best.map(|(n, _)| n).with_context(|| format!("no Debian package matches {pattern}"))
}

/// Downloads (once) and unpacks (once) a package; returns the directory it was unpacked into.
fn unpack(cache: &Path, pkg: &str) -> Result<PathBuf> {
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)?;
    let have = |debs: &Path| -> Option<PathBuf> {
        std::fs::read_dir(debs).ok()?.filter_map(Result::ok).map(|e| e.path()).find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
        })
    };
    let deb = match have(&debs) {
        Some(d) => d,
        None => {
            eprintln!("lab: downloading {pkg}");
            let download = || sh(Command::new("apt-get").current_dir(&debs).args(["download", "-qq", pkg]));
            if download().is_err() {
                // Stale package lists name a build the mirror no longer has: refresh, once.
                sh(Command::new("apt-get").args(["update", "-qq"]))?;
                download()?;
            }
            have(&debs).with_context(|| format!("apt-get download {pkg} left no .deb"))?
        }
    };
    let dir = cache.join(format!("pkg-{pkg}"));
    if !dir.join(".unpacked").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
        std::fs::write(dir.join(".unpacked"), "")?;
    }
    Ok(dir)
}

/// One kernel ready to boot.
pub struct Kernel {
    pub package: String,
    pub release: String,
    root: PathBuf,
    initrd: PathBuf,
}

fn prepare(cache: &Path, pattern: &str, busybox: &Path) -> Result<Kernel> {
    let package = resolve(pattern)?;
    let root = unpack(cache, &package)?;
    let release = std::fs::read_dir(root.join("lib/modules"))?
        .filter_map(Result::ok)
        .find_map(|e| e.file_name().to_str().map(str::to_string))
        .context("the kernel package has no lib/modules")?;
    let moddir = root.join("lib/modules").join(&release);
    if !moddir.join("modules.dep").exists() {
        // The host has no kmod; busybox's depmod writes what busybox's modprobe reads.
        sh(Command::new(busybox).arg("depmod").arg("-b").arg(&root).arg(&release))?;
    }
    let initrd = cache.join(format!("initrd-{release}.gz"));
    if !initrd.exists() {
        build_initrd(&moddir, busybox, &initrd)?;
    }
    Ok(Kernel { package, release, root, initrd })
}

/// busybox, the modules to mount 9p + overlay, and an init that switches to the host's root.
fn build_initrd(moddir: &Path, busybox: &Path, out: &Path) -> Result<()> {
    let tmp = out.with_extension("d");
    let _ = std::fs::remove_dir_all(&tmp);
    for d in ["bin", "mods", "proc", "sys", "dev", "lower", "upper", "newroot"] {
        std::fs::create_dir_all(tmp.join(d))?;
    }
    std::fs::copy(busybox, tmp.join("bin/busybox"))?;
    let deps = std::fs::read_to_string(moddir.join("modules.dep"))?;
    let mut order = Vec::new();
    for m in INITRD_MODULES {
        let Some(rel) = deps.lines().filter_map(|l| l.split(':').next()).find(|p| {
            let file = p.rsplit('/').next().unwrap_or("");
            file == format!("{m}.ko") || file == format!("{m}.ko.xz") || file == format!("{m}.ko.zst")
        }) else {
            continue; // built in
        };
        let src = moddir.join(rel);
        let dst = tmp.join(format!("mods/{m}.ko"));
        if rel.ends_with(".xz") {
            std::fs::write(&dst, sh_bytes(Command::new("xz").arg("-dc").arg(&src))?)?;
        } else if rel.ends_with(".zst") {
            std::fs::write(&dst, sh_bytes(Command::new("zstd").arg("-dcq").arg(&src))?)?;
        } else {
            std::fs::copy(&src, &dst)?;
        }
        order.push(*m);
    }
    std::fs::write(tmp.join("mods/order"), order.join(" "))?;
    let init = tmp.join("init");
    std::fs::write(&init, STAGE1)?;
    set_exec(&init)?;
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | '{}' cpio -o -H newc 2>/dev/null | gzip -1 > '{}'",
            tmp.display(),
            busybox.display(),
            out.display()
        ))
        .status()?;
    if !status.success() {
        bail!("building {}", out.display());
    }
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}

fn sh_bytes(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

fn set_exec(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// PID 1 in the initramfs: load the 9p/overlay modules, mount the host's root read-only with a
/// tmpfs overlay and the writable results share, and switch to the host's root.
const STAGE1: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc; $B mount -t sysfs sysfs /sys; $B mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do $B insmod /mods/$m.ko || echo "lab stage1: insmod $m failed"; done
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower || { echo "lab stage1: 9p mount failed"; $B poweroff -f; }
$B mount -t tmpfs -o size=1g tmpfs /upper; $B mkdir -p /upper/u /upper/w
$B mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot || { echo "lab stage1: overlay failed"; $B poweroff -f; }
OUT=$($B sed -n 's/.*lab\.out=\([^ ]*\).*/\1/p' /proc/cmdline)
$B mkdir -p /newroot$OUT
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /newroot$OUT || echo "lab stage1: out share not mounted"
S=$($B sed -n 's/.*lab\.stage2=\([^ ]*\).*/\1/p' /proc/cmdline)
$B umount /proc /sys; $B mount --move /dev /newroot/dev
exec $B switch_root /newroot $S
"#;

/// PID 1 on the host's root: kernel filesystems, this kernel's modules, KVM (nested SVM),
/// vfio-pci on the `edu` device, then the lab script; results go to the out share.
fn stage2(kernel: &Kernel, busybox: &Path, out: &Path, script: &Path) -> String {
    format!(
        r#"#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc; mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /dev/shm; mkdir -p /dev/pts; mount -t devpts devpts /dev/pts
mount -t tracefs tracefs /sys/kernel/tracing; mount -t debugfs debugfs /sys/kernel/debug
mount -t securityfs securityfs /sys/kernel/security
mount -t bpf bpf /sys/fs/bpf; mount -t cgroup2 cgroup2 /sys/fs/cgroup
# As systemd does: child cgroups get the cpu controller (cpu.max), for the throttle tests.
echo +cpu > /sys/fs/cgroup/cgroup.subtree_control
{scratch}
mkdir -p /lib/modules/{rel}; mount --bind {root}/lib/modules/{rel} /lib/modules/{rel}
{bb} ip link set lo up
{bb} modprobe kvm_amd 2>&1 | head -3
{bb} modprobe vfio-pci 2>&1 | head -3
{bb} modprobe vfio_iommu_type1 2>&1 | head -3
echo 1234 11e8 > /sys/bus/pci/drivers/vfio-pci/new_id 2>/dev/null
echo "LAB-UP kernel {rel} uptime $(cut -d' ' -f1 /proc/uptime)"
sh {script} > {out}/log 2>&1
echo "LAB-SCRIPT-RC $?"
sync
{bb} poweroff -f
"#,
        rel = kernel.release,
        root = kernel.root.display(),
        bb = busybox.display(),
        script = script.display(),
        out = out.display(),
        scratch = scratch_mounts(&[out, script]),
    )
}

/// A fresh tmpfs on /run and /tmp, except over a directory the lab itself lives in (a checkout
/// under /tmp): that one stays the overlay's, which is writable too.
fn scratch_mounts(lab_paths: &[&Path]) -> String {
    ["/run", "/tmp"]
        .iter()
        .filter(|dir| !lab_paths.iter().any(|p| p.starts_with(dir)))
        .map(|dir| format!("mount -t tmpfs tmpfs {dir}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The script run inside: every test binary in turn, with its output, then a marker line.
/// The tests that need the IOMMU with snoop control run in a boot of their own.
const SNOOP_PREFIX: &str = "snoop_control_";

fn tests_script(
    bin: &Path,
    binaries: &[(String, PathBuf)],
    filter: &[String],
    out: &Path,
    snoop: bool,
) -> String {
    let mut s = format!(
        "set +e\ncd /tmp\nexport IOASID_LAB=1 RUST_BACKTRACE=1 IOASID_AGENT={} IOASID_GUEST={}\n",
        bin.join("ioasid-agent").display(),
        bin.join("ioasid-guest").display()
    );
    let mut filter = filter.iter().map(|f| format!("'{f}'")).collect::<Vec<_>>().join(" ");
    if snoop {
        filter = SNOOP_PREFIX.to_string();
    } else {
        filter.push_str(&format!(" --skip {SNOOP_PREFIX}"));
    }
    // The hook table of this kernel, for the kernel matrix (docs/kernels.md).
    let _ = writeln!(
        s,
        "{} status --json > {}/status.json 2>/dev/null",
        bin.join("ioasid-agent").display(),
        out.display()
    );
    for (name, bin) in binaries {
        let _ = writeln!(s, "echo \"LAB-TEST-BEGIN {name}\" > {}/current", out.display());
        let _ = writeln!(s, "echo \"LAB-TEST-BEGIN {name}\"");
        // --include-ignored: the tests that need a real hypervisor kernel are ignored elsewhere.
        // The live Prometheus test, the manifests' validation and the syslog sink are about the
        // rules, dashboards, deployment files and audit sinks, not the kernel: they run on the
        // host only (under emulation
        // Prometheus itself is too slow to be timed).
        let _ = writeln!(
            s,
            "'{}' --test-threads=1 --include-ignored --skip dashboard_queries_and_alerts_work_on_a_live_prometheus --skip kubernetes_manifests_build_and_validate --skip audit_records_reach_a_real_syslog_daemon {filter}",
            bin.display()
        );
        let _ = writeln!(s, "echo \"LAB-TEST-END {name} rc=$?\"");
    }
    s.push_str("echo LAB-ALL-DONE\n");
    s
}

/// What one boot produced.
struct Boot {
    serial: String,
    log: String,
    took: Duration,
    timed_out: bool,
}

fn boot(kernel: &Kernel, busybox: &Path, dir: &Path, script_text: &str, snoop: bool) -> Result<Boot> {
    let out = dir.join("out");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let script = dir.join("script.sh");
    std::fs::write(&script, script_text)?;
    let stage2_path = dir.join("stage2.sh");
    std::fs::write(&stage2_path, stage2(kernel, busybox, &out, &script))?;
    set_exec(&stage2_path)?;
    let serial_path = dir.join("serial.log");
    let serial = std::fs::File::create(&serial_path)?;
    let vmlinuz = kernel.root.join(format!("boot/vmlinuz-{}", kernel.release));
    let append = format!(
        "console=ttyS0 panic=-1 oops=panic loglevel=4 intel_iommu=on lab.stage2={} lab.out={}",
        stage2_path.display(),
        out.display()
    );
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        // Single-threaded TCG: with thread=multi, QEMU 7.2 lets a vCPU run a stale int3 while
        // the guest kernel live-patches its text (static keys flip whenever a tracepoint is
        // attached or detached), and the guest oopses ("Oops: int3") within minutes of agent
        // starts and stops. Kernels run in parallel instead, one host core each.
        .args(["-accel", "tcg,thread=single", "-cpu", "max", "-smp", "2", "-m", "2048", "-machine", "q35"])
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&kernel.initrd)
        .args(["-append", &append])
        .args(["-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio", "-monitor", "none"])
        .args(["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"])
        .arg("-virtfs")
        .arg(format!("local,path={},mount_tag=out,security_model=none", out.display()))
        .arg("-device")
        .arg(format!("intel-iommu,snoop-control={snoop},intremap=on"))
        .args(["-device", "edu"])
        .stdin(Stdio::null())
        .stdout(serial)
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64 (cargo xtask setup installs it)")?;
    let mut timed_out = false;
    let (mut last_len, mut last_change) = (0u64, Instant::now());
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        let len = std::fs::metadata(out.join("log")).map_or(0, |m| m.len());
        if len != last_len {
            (last_len, last_change) = (len, Instant::now());
        }
        if last_change.elapsed() > QUIET_TIMEOUT || start.elapsed() > RUN_TIMEOUT {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(Boot {
        serial: std::fs::read_to_string(&serial_path).unwrap_or_default(),
        log: std::fs::read_to_string(out.join("log")).unwrap_or_default(),
        took: start.elapsed(),
        timed_out,
    })
}

/// Why a boot did not complete, if it did not: a crash or hang of the guest kernel.
fn crash(b: &Boot) -> Option<String> {
    let panic =
        b.serial.lines().find(|l| l.contains("Kernel panic") || l.contains("BUG:") || l.contains("Oops:"));
    if let Some(l) = panic {
        return Some(format!("guest kernel crashed: {}", l.trim()));
    }
    if b.timed_out {
        return Some(format!(
            "guest hung: no test output for {} s (or over {} s in all)",
            QUIET_TIMEOUT.as_secs(),
            RUN_TIMEOUT.as_secs()
        ));
    }
    if !b.log.contains("LAB-ALL-DONE") {
        return Some("the VM stopped before the tests finished".into());
    }
    None
}

/// The test that was running when a boot ended (the last BEGIN without an END).
fn running_test(log: &str) -> Option<&str> {
    let mut current = None;
    for l in log.lines() {
        if let Some(n) = l.strip_prefix("LAB-TEST-BEGIN ") {
            current = Some(n);
        } else if l.starts_with("LAB-TEST-END ") {
            current = None;
        }
    }
    current
}

/// Per-binary results of a completed run: (binary, passed, failed, ignored, failures).
pub struct Summary {
    pub passed: u32,
    pub failed: u32,
    pub ignored: u32,
    pub failures: Vec<String>,
}

fn summarize(log: &str) -> Summary {
    let mut s = Summary { passed: 0, failed: 0, ignored: 0, failures: Vec::new() };
    let mut binary = "";
    for l in log.lines() {
        if let Some(n) = l.strip_prefix("LAB-TEST-BEGIN ") {
            binary = n;
        }
        if let Some(rest) = l.strip_prefix("test result: ") {
            let num = |word: &str| -> u32 {
                rest.split(';')
                    .find_map(|p| {
                        p.trim()
                            .strip_suffix(word)
                            .map(|n| n.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. "))
                    })
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            };
            s.passed += num(" passed");
            s.failed += num(" failed");
            s.ignored += num(" ignored");
        }
        if let Some(name) = l.strip_prefix("test ").and_then(|r| r.strip_suffix(" ... FAILED")) {
            s.failures.push(format!("{binary}::{name}"));
        }
    }
    s
}

/// The kernel test binaries of this build (`cargo test --no-run`), by name.
fn test_binaries(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args(["test", "-p", "ioasid-agent", "--tests", "--no-run", "--message-format=json"])
        .env("IOASID_REQUIRE_BPF", "1")
        .stderr(Stdio::inherit())
        .output()
        .context("building the test binaries")?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["reason"] != "compiler-artifact"
            || v["profile"]["test"] != true
            || v["target"]["kind"][0] != "test"
        {
            continue;
        }
        if let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str()) {
            bins.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    bins.sort();
    Ok(bins)
}

/// Copies the binaries the tests run into the lab's directory: the VMs read them over 9p for
/// minutes, and a rebuild meanwhile must not change them under a running test.
fn snapshot(root: &Path, binaries: &[(String, PathBuf)], bin: &Path) -> Result<Vec<(String, PathBuf)>> {
    let _ = std::fs::remove_dir_all(bin);
    std::fs::create_dir_all(bin)?;
    // Release builds: under emulation a debug agent spends seconds parsing BTF at each start.
    for exe in ["ioasid-agent", "ioasid-guest"] {
        std::fs::copy(root.join("target/release").join(exe), bin.join(exe))
            .with_context(|| format!("copying target/release/{exe} (built by `cargo xtask lab`)"))?;
    }
    binaries
        .iter()
        .map(|(name, exe)| {
            let to = bin.join(format!("test-{name}"));
            std::fs::copy(exe, &to)?;
            Ok((name.clone(), to))
        })
        .collect()
}

/// A boot's label, its kernel release, and what came of it (the boot and how many attempts).
type BootOutcome = (String, String, Result<(Boot, u32), String>);

/// One kernel's runs: boot, and boot once more after a crash or hang.
fn run_kernel(
    name: &str,
    kernel: &Kernel,
    busybox: &Path,
    dir: &Path,
    script: &str,
    snoop: bool,
) -> Result<(Boot, u32), String> {
    let mut attempt = 0;
    let iommu = if snoop { "an IOMMU with snoop control" } else { "an IOMMU without snoop control" };
    loop {
        attempt += 1;
        eprintln!(
            "lab: {name} ({}, {}, {iommu}): booting, attempt {attempt}",
            kernel.package, kernel.release
        );
        let b = boot(kernel, busybox, dir, script, snoop).map_err(|e| format!("{e:#}"))?;
        let _ = std::fs::write(dir.join(format!("serial-{attempt}.log")), &b.serial);
        let _ = std::fs::write(dir.join(format!("tests-{attempt}.log")), &b.log);
        match crash(&b) {
            None => return Ok((b, attempt)),
            Some(why) => {
                let during = running_test(&b.log).map(|t| format!(" during {t}")).unwrap_or_default();
                eprintln!(
                    "lab: {name}: {why}{during} (serial log: {})",
                    dir.join(format!("serial-{attempt}.log")).display()
                );
                if attempt == 2 {
                    return Err(format!("{why}{during}, twice"));
                }
            }
        }
    }
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let busybox = unpack(&cache, "busybox-static")?.join("bin/busybox");
    let run_dir = root.join("target/lab");
    let bin = run_dir.join("bin");
    let binaries = snapshot(root, &test_binaries(root)?, &bin)?;
    let chosen: Vec<&(&str, &str)> = KERNELS
        .iter()
        .filter(|(n, _)| opts.kernels.is_empty() || opts.kernels.iter().any(|k| k == n))
        .collect();
    // Per kernel, one boot with an IOMMU that does not enforce coherency (every test but the
    // snoop-control ones), then one with snoop control (only those).
    let mut prepared = Vec::new();
    for (name, pattern) in chosen {
        let kernel = prepare(&cache, pattern, &busybox)?;
        let mut boots = Vec::new();
        for snoop in [false, true] {
            if snoop && opts.script.is_some() {
                continue;
            }
            let label = if snoop { format!("{name}+snoop") } else { name.to_string() };
            let dir = run_dir.join(&label);
            std::fs::create_dir_all(&dir)?;
            let script = match &opts.script {
                Some(path) => {
                    // The VM may have its own /tmp: run a copy from the lab's directory.
                    let copy = dir.join("user-script.sh");
                    std::fs::copy(path, &copy).with_context(|| format!("reading {}", path.display()))?;
                    format!("set +e\nsh {}\necho LAB-ALL-DONE\n", copy.display())
                }
                None => tests_script(&bin, &binaries, &opts.filter, &dir.join("out"), snoop),
            };
            boots.push((label, dir, script, snoop));
        }
        prepared.push((kernel, boots));
    }
    // Every kernel at once: each VM runs on one host core (single-threaded TCG).
    let outcomes: Vec<BootOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = prepared
            .iter()
            .map(|(kernel, boots)| {
                let busybox = &busybox;
                s.spawn(move || {
                    boots
                        .iter()
                        .map(|(label, dir, script, snoop)| {
                            let r = run_kernel(label, kernel, busybox, dir, script, *snoop);
                            (label.clone(), kernel.release.clone(), r)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a lab thread panicked")).collect()
    });
    let mut report = Vec::new();
    let mut failed = false;
    let mut matrix = vec![host_status(root)];
    for (name, release, _) in outcomes.iter().filter(|(n, _, _)| !n.ends_with("+snoop")) {
        let json = std::fs::read_to_string(run_dir.join(name).join("out/status.json")).unwrap_or_default();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&json) {
            matrix.push((name.clone(), release.clone(), v));
        }
    }
    if opts.script.is_none() && matrix.len() == prepared.len() + 1 {
        write_matrix(root, &matrix)?;
    }
    for (name, release, outcome) in outcomes {
        let dir = run_dir.join(&name);
        match outcome {
            Ok((b, _)) if opts.script.is_some() => println!("== {name} ({release})\n{}", b.log),
            Ok((b, attempts)) => {
                let s = summarize(&b.log);
                eprintln!(
                    "lab: {name}: {} passed, {} failed, {} ignored in {:.0} s{}",
                    s.passed,
                    s.failed,
                    s.ignored,
                    b.took.as_secs_f64(),
                    if attempts > 1 { " (second boot)" } else { "" }
                );
                for f in &s.failures {
                    eprintln!("lab: {name}: FAILED {f}");
                }
                // A filter may leave a boot with nothing to run; a full run always has tests.
                if s.failed > 0 || (s.passed == 0 && opts.filter.is_empty()) {
                    failed = true;
                    eprintln!(
                        "lab: {name}: full output in {}",
                        dir.join(format!("tests-{attempts}.log")).display()
                    );
                }
                report.push((name, release, s));
            }
            Err(why) => {
                failed = true;
                eprintln!("lab: {name}: FAILED: {why}");
            }
        }
    }
    let (mut p, mut f, mut i) = (0, 0, 0);
    for (name, release, s) in &report {
        eprintln!(
            "lab: {name:<12} {release:<24} {} passed, {} failed, {} ignored",
            s.passed, s.failed, s.ignored
        );
        p += s.passed;
        f += s.failed;
        i += s.ignored;
    }
    if opts.script.is_none() {
        // The plain closing line of the whole lab.
        println!("lab: {p} passed, {f} failed, {i} skipped");
    }
    if failed {
        bail!("the lab failed");
    }
    Ok(())
}

/// This machine's own kernel in the matrix: `ioasid-agent status --json` run here.
fn host_status(root: &Path) -> (String, String, serde_json::Value) {
    let release = sh(Command::new("uname").arg("-r")).unwrap_or_default().trim().to_string();
    let out = Command::new(root.join("target/debug/ioasid-agent")).args(["status", "--json"]).output();
    let v = out.ok().and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or(serde_json::Value::Null);
    ("development".to_string(), release, v)
}

const MATRIX_BEGIN: &str = "<!-- generated: kernel matrix (cargo xtask lab) -->";
const MATRIX_END: &str = "<!-- end generated: kernel matrix -->";

/// The kernel matrix (docs/kernels.md), from each kernel's `status --json` as the lab saw it.
fn write_matrix(root: &Path, rows: &[(String, String, serde_json::Value)]) -> Result<()> {
    let mut t = String::from(
        "| kernel | release | hooks attached | not attached (why) | ioctl path | enforcement | WBINVD cost source |\n|---|---|---|---|---|---|---|\n",
    );
    for (name, release, v) in rows {
        let hooks = v["hooks"].as_array().cloned().unwrap_or_default();
        let attached = hooks.iter().filter(|h| h["attached"] == true).count();
        let standby = hooks.iter().filter(|h| h["standby"] == true).count();
        let missing: Vec<String> = hooks
            .iter()
            .filter(|h| h["attached"] != true && h["standby"] != true)
            .map(|h| {
                // The agent's typed refusal (status --json `refusal`): its kind, and the errno
                // where the kernel gave one.
                let refusal = &h["refusal"];
                let why = match (refusal["kind"].as_str(), refusal["errno"].as_i64()) {
                    (Some("kernel"), Some(1)) => "EPERM".to_string(),
                    (Some("kernel"), Some(n)) => format!("errno {n}"),
                    (Some(kind), _) => kind.to_string(),
                    (None, _) => "refused".to_string(),
                };
                format!("`{}` ({why})", h["hook"].as_str().unwrap_or("?"))
            })
            .collect();
        let _ = writeln!(
            t,
            "| {name} | {release} | {attached} of {} ({standby} alternatives on standby) | {} | {} | {} | {} |",
            hooks.len(),
            if missing.is_empty() { "-".to_string() } else { missing.join(", ") },
            v["ioctl_hooks"].as_str().unwrap_or("?"),
            v["enforcement_mechanism"].as_str().unwrap_or("?"),
            v["cost_source"].as_str().unwrap_or("?"),
        );
    }
    let path = root.join(crate::docs::KERNELS);
    let doc = std::fs::read_to_string(&path)?;
    let new = crate::docs::replace_block(&doc, MATRIX_BEGIN, MATRIX_END, &t)?;
    if new != doc {
        std::fs::write(&path, new)?;
        eprintln!("lab: {} kernel matrix updated", crate::docs::KERNELS);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkout_under_tmp_stays_visible_in_the_vm() {
        let tmp = Path::new("/tmp/ci/target/lab/k/out");
        let work = Path::new("/work/main/target/lab/k/out");
        assert_eq!(scratch_mounts(&[work]), "mount -t tmpfs tmpfs /run\nmount -t tmpfs tmpfs /tmp");
        assert_eq!(scratch_mounts(&[work, tmp]), "mount -t tmpfs tmpfs /run");
        // A sibling whose name merely starts with "/tmp" is not under it.
        assert_eq!(scratch_mounts(&[Path::new("/tmpx/lab")]).lines().count(), 2);
    }
}
