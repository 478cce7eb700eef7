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

/// What a boot runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Tests {
    /// Every kernel test binary.
    All,
    /// The kernel-facing subset (`KERNEL_FACING`): hooks, exact counts, a real non-coherent
    /// enable, denial, blast radius, storms under kill and throttle.
    KernelFacing,
    /// The kernel-facing subset and a real VMM's exact counts under load
    /// (`KERNEL_FACING_UNDER_LOAD`): kernels with lazy preemption, where counts from classic
    /// tracepoints once fell short.
    KernelFacingUnderLoad,
    /// The kernel-facing subset but the storms (`KERNEL_FACING_NO_STORMS`): for a kernel whose
    /// storm path (hooks, timing) another kernel of the matrix shares and runs in full (6.1:
    /// 6.12's), for CI time.
    KernelFacingNoStorms,
    /// Only what tells the boot apart (5.10 with BPF LSM on its command line: the EPERM path).
    Enforcement,
}

/// Kernel tests that run on the host only: they are about the rules and dashboards (a live
/// Prometheus, too slow under emulation to be timed), the deployment files, the audit sinks and
/// the HTTP server under floods (userspace mechanisms whose floods take minutes under
/// emulation), not about the kernel; the kernel's side of each is in tests that do run there.
const HOST_ONLY: &[&str] = &[
    "dashboard_queries_and_alerts_work_on_a_live_prometheus",
    "kubernetes_manifests_build_and_validate",
    "audit_records_reach_a_real_syslog_daemon",
    "decisions_and_probes_hold_under_a_scrape_flood",
    "a_flood_of_enables_never_pushes_out_another_vms_record",
    "an_openstack_servers_identity_comes_from_libvirts_status_of_its_vmm",
];

/// A subset of the kernel tests: per test binary, the name filters to run (none: all) and to
/// skip.
type Subset = &'static [Part];

/// The kernel-facing subset: what the lab must show on every kernel (the hooks and what serves,
/// exact WBINVD/INVD counts, a real non-coherent FILE_ADD and FILE_DEL, denial, blast radius,
/// storms under kill and throttle).
const KERNEL_FACING: Subset = &[KF_LAB, KF_MAPS, KF_STORMS];

/// One binary's share of a subset: its name, the filters to run, the ones to skip.
type Part = (&'static str, &'static [&'static str], &'static [&'static str]);

const KF_LAB: Part = ("lab", &[], &["requests_on_real_vfio_files_only"]);
const KF_STORMS: Part = (
    "storm",
    &[
        "the_kill_action_ends_the_storming_vmm_and_is_audited",
        "a_throttled_storm_settles_under_budget_and_the_limit_comes_back",
    ],
    &[],
);

/// How the per-CPU hash maps are allocated: on demand from 6.1 on, preallocated on 5.10.
const KF_MAPS: Part = ("wbinvd", &["per_cpu_hashes_are_allocated_on_demand_where_the_kernel_allows"], &[]);

/// The kernel-facing subset without the storm tests.
const KERNEL_FACING_NO_STORMS: Subset = &[KF_LAB, KF_MAPS];

/// The kernel-facing subset, and a real VMM's exact counts under load: where tracepoints
/// counted, Debian's lazy-preemption kernels (6.18, 7.3) fell short there (7.3 shows it; 6.18
/// shares its hooks and preemption); KVM's handlers count now.
const KERNEL_FACING_UNDER_LOAD: Subset =
    &[KF_LAB, KF_MAPS, KF_STORMS, ("qemu", &["qemu_guests_are_named_and_counted_exactly"], &[])];

/// The enforcement subset (5.10 with BPF LSM on its command line): the hooks (the deny-only LSM
/// program serves), the EPERM path, the observing LSM's refusal, and a second agent beside a
/// first (BPF memory under RLIMIT_MEMLOCK).
const ENFORCEMENT: Subset = &[
    (
        "lab",
        &["hooks_on_module_functions_attach", "an_lsm_denial", "requests_on_real_vfio_files_only_lsm"],
        &[],
    ),
    ("incoherent_dma", &["one_agent_per_host"], &[]),
];

/// One kernel of the matrix, as Debian ships it.
pub struct LabKernel {
    pub name: &'static str,
    /// The Debian suites that carry it; the mirror is the machine's own.
    suites: &'static [&'static str],
    /// The package with the image: a name pattern, `V` standing for the version part (resolved
    /// to the newest match, never a hard-coded build).
    image: &'static str,
    /// The version part: an apt (POSIX) regular expression.
    version: &'static str,
    /// The other packages of a split kernel: their names with `V` for the same version.
    companions: &'static [&'static str],
    /// Added to the kernel command line.
    pub cmdline: &'static str,
    tests: Tests,
    /// Also boots with an IOMMU that enforces coherency (the `snoop_control_*` tests).
    snoop: bool,
}

/// A kernel of Debian's own suites, in one package, booted as shipped with the kernel-facing
/// tests: what the matrix's entries change from.
const STOCK: LabKernel = LabKernel {
    name: "",
    version: "",
    suites: &[],
    image: r"linux-image-V-amd64",
    companions: &[],
    cmdline: "",
    tests: Tests::KernelFacing,
    snoop: false,
};

/// Debian 11's 5.10: image and modules in one unsigned package.
const BULLSEYE_5_10: LabKernel = LabKernel {
    name: "debian-5.10",
    version: r"5\.10\.0-[0-9]+",
    suites: &["bullseye", "bullseye-security"],
    image: r"linux-image-V-amd64-unsigned",
    ..STOCK
};

/// The matrix, oldest first. 5.10 boots twice: as Debian ships it (no `bpf` in the LSM list:
/// denial by the in-kernel kill) and with BPF LSM on its command line (denial with EPERM).
pub const KERNELS: &[LabKernel] = &[
    BULLSEYE_5_10,
    LabKernel {
        name: "debian-5.10-lsm",
        cmdline: "lsm=lockdown,yama,loadpin,safesetid,integrity,apparmor,selinux,smack,tomoyo,bpf",
        tests: Tests::Enforcement,
        ..BULLSEYE_5_10
    },
    LabKernel {
        name: "debian-6.1",
        version: r"6\.1\.0-[0-9]+",
        suites: &["bookworm", "bookworm-security"],
        tests: Tests::KernelFacingNoStorms,
        ..STOCK
    },
    // The whole suite: the newest kernel whose counts from classic tracepoints are not at the
    // mercy of preemption (see docs/testing.md).
    LabKernel {
        name: "debian-6.12",
        version: r"6\.12\.[0-9]+\+deb12",
        suites: &["bookworm", "bookworm-security"],
        tests: Tests::All,
        snoop: true,
        ..STOCK
    },
    // Only the signed image is served; a signed image is a bzImage with a signature appended.
    LabKernel {
        name: "debian-6.18",
        version: r"6\.18\.[0-9]+\+deb13",
        suites: &["trixie-backports"],
        ..STOCK
    },
    // Split: the image (at /usr/lib/modules/V/vmlinuz.unsigned) and the modules apart.
    LabKernel {
        name: "debian-7.3",
        version: r"7\.3\.[0-9]+\+deb13",
        suites: &["trixie-backports"],
        image: r"linux-binary-unsigned-V-amd64",
        companions: &["linux-modules-V-amd64"],
        tests: Tests::KernelFacingUnderLoad,
        ..STOCK
    },
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
pub(crate) fn cache_dir() -> PathBuf {
    std::env::var_os("IOASID_LAB_CACHE").map_or_else(|| PathBuf::from("/var/cache/ioasid-lab"), PathBuf::from)
}

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The lab's own apt: the machine's Debian mirror with the matrix's suites, its lists and
/// state under the lab's cache. The machine's apt configuration and lists are never touched.
pub(crate) struct Apt {
    dir: PathBuf,
}

/// The machine's Debian mirror, for its main and its security suites, and the keyring that
/// signs them: (main URI, security URI, keyring), from /etc/apt's sources (deb822 or one-line).
fn machine_mirrors() -> Result<(String, String, String)> {
    let mut entries: Vec<(String, Vec<String>, Option<String>)> = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(Result::ok).map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        let name = f.to_string_lossy();
        if name.ends_with(".sources") {
            for stanza in text.split("\n\n") {
                let field = |k: &str| {
                    stanza
                        .lines()
                        .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix(':')))
                        .map(str::trim)
                };
                if field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb")) {
                    if let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) {
                        let suites: Vec<String> = suites.split_whitespace().map(str::to_string).collect();
                        for uri in uris.split_whitespace() {
                            entries.push((
                                uri.to_string(),
                                suites.clone(),
                                field("Signed-By").map(str::to_string),
                            ));
                        }
                    }
                }
            }
        } else if name.ends_with(".list") {
            for l in text.lines().map(str::trim).filter(|l| l.starts_with("deb ")) {
                let mut words = l.split_whitespace().skip(1).peekable();
                let mut keyring = None;
                if words.peek().is_some_and(|w| w.starts_with('[')) {
                    for w in words.by_ref() {
                        if let Some(k) = w.trim_start_matches('[').strip_prefix("signed-by=") {
                            keyring = Some(k.trim_end_matches(']').to_string());
                        }
                        if w.ends_with(']') {
                            break;
                        }
                    }
                }
                if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
                    entries.push((uri.to_string(), vec![suite.to_string()], keyring));
                }
            }
        }
    }
    let debian = |e: &&(String, Vec<String>, Option<String>)| e.0.trim_end_matches('/').contains("/debian");
    let security = entries
        .iter()
        .filter(debian)
        .find(|e| e.1.iter().any(|s| s.ends_with("-security")))
        .context("the lab needs the machine's apt sources to name a Debian security mirror")?;
    let main = entries
        .iter()
        .filter(debian)
        .find(|e| e.1.iter().any(|s| !s.contains('-')))
        .context("the lab needs the machine's apt sources to name a Debian mirror")?;
    let keyring = main.2.clone().unwrap_or_else(|| "/usr/share/keyrings/debian-archive-keyring.gpg".into());
    Ok((main.0.clone(), security.0.clone(), keyring))
}

impl Apt {
    /// The lab's sources list (every suite of the matrix, on the machine's mirror), its lists
    /// refreshed when missing, a day old, or when the sources changed.
    pub(crate) fn new(cache: &Path) -> Result<Apt> {
        let dir = cache.join("apt");
        for d in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let (main, security, keyring) = machine_mirrors()?;
        let mut suites: Vec<&str> = KERNELS.iter().flat_map(|k| k.suites.iter().copied()).collect();
        suites.sort_unstable();
        suites.dedup();
        let mut list = String::new();
        for suite in suites {
            let uri = if suite.ends_with("-security") { &security } else { &main };
            let _ = writeln!(list, "deb [signed-by={keyring}] {uri} {suite} main");
        }
        let apt = Apt { dir };
        let path = apt.dir.join("sources.list");
        let changed = std::fs::read_to_string(&path).ok().as_deref() != Some(list.as_str());
        let stamp = apt.dir.join("updated");
        let stale = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .map_or(true, |t| t.elapsed().unwrap_or_default() > Duration::from_secs(24 * 3600));
        if changed {
            std::fs::write(&path, list)?;
        }
        if changed || stale {
            apt.update()?;
        }
        Ok(apt)
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        let d = self.dir.display();
        c.args(["-o", &format!("Dir::Etc::sourcelist={d}/sources.list")])
            .args(["-o", "Dir::Etc::sourceparts=-"])
            .args(["-o", &format!("Dir::State::Lists={d}/lists")])
            .args(["-o", &format!("Dir::Cache={d}/cache")]);
        c
    }

    fn update(&self) -> Result<()> {
        eprintln!("lab: apt-get update (the lab's own lists, {})", self.dir.display());
        sh(self.cmd("apt-get").args(["update", "-qq"]))?;
        std::fs::write(self.dir.join("updated"), "")?;
        Ok(())
    }

    /// Package names matching `pattern` (anchored), newest first by candidate version.
    fn newest(&self, pattern: &str) -> Result<Option<String>> {
        let out = sh(self.cmd("apt-cache").args(["search", "--names-only", pattern]))?;
        let mut best: Option<(String, String)> = None;
        for name in out.lines().filter_map(|l| l.split_whitespace().next()) {
            let policy = sh(self.cmd("apt-cache").args(["policy", name]))?;
            let Some(cand) = policy.lines().find_map(|l| l.trim().strip_prefix("Candidate: ")) else {
                continue;
            };
            let newer = match &best {
                None => true,
                Some((_, v)) => Command::new("dpkg")
                    .args(["--compare-versions", cand, "gt", v])
                    .status()
                    .is_ok_and(|s| s.success()),
            };
            if newer && cand != "(none)" {
                best = Some((name.to_string(), cand.to_string()));
            }
        }
        Ok(best.map(|(n, _)| n))
    }

    /// The newest package matching `pattern`; the lists are refreshed once if none does.
    pub(crate) fn resolve(&self, pattern: &str) -> Result<String> {
        if let Some(n) = self.newest(pattern)? {
            return Ok(n);
        }
        self.update()?;
        self.newest(pattern)?.with_context(|| format!("no Debian package matches {pattern}"))
    }

    /// Downloads `pkg` into `debs` (once): its .deb.
    fn download(&self, debs: &Path, pkg: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(debs)?;
        let have = |debs: &Path| -> Option<PathBuf> {
            std::fs::read_dir(debs).ok()?.filter_map(Result::ok).map(|e| e.path()).find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
            })
        };
        if let Some(d) = have(debs) {
            return Ok(d);
        }
        eprintln!("lab: downloading {pkg}");
        let download = || sh(self.cmd("apt-get").current_dir(debs).args(["download", "-qq", pkg]));
        if download().is_err() {
            // Stale lists name a build the mirror no longer has: refresh, once.
            self.update()?;
            download()?;
        }
        have(debs).with_context(|| format!("apt-get download {pkg} left no .deb"))
    }

    /// Downloads (once) and unpacks (once) `pkgs` into one directory named after the first.
    pub(crate) fn unpack(&self, cache: &Path, pkgs: &[String]) -> Result<PathBuf> {
        let dir = cache.join(format!("pkg-{}", pkgs[0]));
        if dir.join(".unpacked").exists() {
            return Ok(dir);
        }
        let _ = std::fs::remove_dir_all(&dir);
        for pkg in pkgs {
            let deb = self.download(&cache.join("debs"), pkg)?;
            sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
        }
        std::fs::write(dir.join(".unpacked"), "")?;
        Ok(dir)
    }
}

/// One kernel ready to boot.
pub struct Kernel {
    pub package: String,
    pub release: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
    initrd: PathBuf,
}

pub(crate) fn prepare(apt: &Apt, cache: &Path, spec: &LabKernel, busybox: &Path) -> Result<Kernel> {
    let (prefix, suffix) = spec.image.split_once('V').context("an image pattern has V")?;
    let package = apt.resolve(&format!("^{prefix}{}{suffix}$", spec.version))?;
    let version = &package[prefix.len()..package.len() - suffix.len()];
    let mut pkgs = vec![package.clone()];
    pkgs.extend(spec.companions.iter().map(|c| c.replace('V', version)));
    let root = apt.unpack(cache, &pkgs)?;
    // Debian before trixie ships /lib/modules and /boot/vmlinuz-*; trixie-era packages
    // /usr/lib/modules, a split kernel its image as /usr/lib/modules/V/vmlinuz.unsigned.
    let base = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.is_dir())
        .context("the kernel's packages have no lib/modules")?;
    let release = std::fs::read_dir(&base)?
        .filter_map(Result::ok)
        .find_map(|e| e.file_name().to_str().map(str::to_string))
        .context("the kernel's packages have no lib/modules/<release>")?;
    let modules = base.join(&release);
    let vmlinuz = [
        root.join(format!("boot/vmlinuz-{release}")),
        modules.join("vmlinuz"),
        modules.join("vmlinuz.unsigned"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .context("the kernel's packages have no image (boot/vmlinuz-*, lib/modules/*/vmlinuz*)")?;
    if !modules.join("modules.dep").exists() {
        // The host has no kmod; busybox's depmod writes what busybox's modprobe reads.
        let depmod_root = base.parent().and_then(Path::parent).unwrap_or(&root);
        sh(Command::new(busybox).arg("depmod").arg("-b").arg(depmod_root).arg(&release))?;
    }
    let initrd = cache.join(format!("initrd-{release}.gz"));
    if !initrd.exists() {
        build_initrd(&modules, busybox, &initrd)?;
    }
    Ok(Kernel { package, release, vmlinuz, modules, initrd })
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
mkdir -p /lib/modules/{rel}; mount --bind {modules} /lib/modules/{rel}
{bb} ip link set lo up
{bb} modprobe kvm_amd 2>&1 | head -3
{bb} modprobe vfio-pci 2>&1 | head -3
{bb} modprobe vfio_iommu_type1 2>&1 | head -3
echo 1234 11e8 > /sys/bus/pci/drivers/vfio-pci/new_id 2>/dev/null
echo "LAB-UP kernel {rel} uptime $(cut -d' ' -f1 /proc/uptime)"
export IOASID_LAB_BUSYBOX={bb}
sh {script} > {out}/log 2>&1
echo "LAB-SCRIPT-RC $?"
sync
{bb} poweroff -f
"#,
        rel = kernel.release,
        modules = kernel.modules.display(),
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
    tests: Tests,
    filter: &[String],
    out: &Path,
    snoop: bool,
) -> String {
    let mut s = format!(
        "set +e\ncd /tmp\nexport IOASID_LAB=1 RUST_BACKTRACE=1 IOASID_AGENT={} IOASID_GUEST={}\n",
        bin.join("ioasid-agent").display(),
        bin.join("ioasid-guest").display()
    );
    // The hook table of this kernel, for the kernel matrix (docs/kernels.md).
    let _ = writeln!(
        s,
        "{} status --json > {}/status.json 2>/dev/null",
        bin.join("ioasid-agent").display(),
        out.display()
    );
    let quote = |fs: &[&str]| fs.iter().map(|f| format!("'{f}'")).collect::<Vec<_>>().join(" ");
    let user: Vec<&str> = filter.iter().map(String::as_str).collect();
    let subset = match tests {
        Tests::All => None,
        Tests::KernelFacing => Some(KERNEL_FACING),
        Tests::KernelFacingUnderLoad => Some(KERNEL_FACING_UNDER_LOAD),
        Tests::KernelFacingNoStorms => Some(KERNEL_FACING_NO_STORMS),
        Tests::Enforcement => Some(ENFORCEMENT),
    };
    for (name, bin) in binaries {
        // A name filter given to the lab applies to every binary; else the boot's own tests.
        let filter = if snoop {
            SNOOP_PREFIX.to_string()
        } else {
            let chosen = match subset {
                _ if !user.is_empty() => quote(&user),
                None => String::new(),
                Some(set) => match set.iter().find(|(b, _, _)| b == name) {
                    Some((_, run, skip)) => {
                        let skip: Vec<String> = skip.iter().map(|f| format!("--skip '{f}'")).collect();
                        format!("{} {}", quote(run), skip.join(" "))
                    }
                    None => continue,
                },
            };
            format!("{chosen} --skip {SNOOP_PREFIX}")
        };
        let _ = writeln!(s, "echo \"LAB-TEST-BEGIN {name}\" > {}/current", out.display());
        let _ = writeln!(s, "echo \"LAB-TEST-BEGIN {name}\"");
        // --include-ignored: the tests that need a real hypervisor kernel are ignored elsewhere.
        let host_only: Vec<String> = HOST_ONLY.iter().map(|t| format!("--skip {t}")).collect();
        let _ = writeln!(
            s,
            "'{}' --test-threads=1 --show-output --include-ignored {} {filter}",
            bin.display(),
            host_only.join(" ")
        );
        let _ = writeln!(s, "echo \"LAB-TEST-END {name} rc=$?\"");
    }
    s.push_str("echo LAB-ALL-DONE\n");
    s
}

/// What one boot produced.
pub(crate) struct Boot {
    pub serial: String,
    pub log: String,
    pub took: Duration,
    pub timed_out: bool,
}

pub(crate) fn boot(
    kernel: &Kernel,
    cmdline: &str,
    busybox: &Path,
    dir: &Path,
    script_text: &str,
    snoop: bool,
    forward: Option<u16>,
) -> Result<Boot> {
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
    let append = format!(
        "console=ttyS0 panic=-1 oops=panic loglevel=4 intel_iommu=on {} lab.stage2={} lab.out={}",
        cmdline,
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
        .arg(&kernel.vmlinuz)
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
        // `cargo xtask fleet`: the VM's agent (port 9477 on 10.0.2.15) on this port of the
        // host's loopback.
        .args(forward.map_or_else(Vec::new, |port| {
            vec!["-nic".to_string(), format!("user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:9477")]
        }))
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
pub(crate) fn crash(b: &Boot) -> Option<String> {
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
pub(crate) fn snapshot(
    root: &Path,
    binaries: &[(String, PathBuf)],
    bin: &Path,
) -> Result<Vec<(String, PathBuf)>> {
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

/// One boot to run: a kernel of the matrix, with or without snoop control, and its script.
struct Job<'a> {
    label: String,
    spec: &'a LabKernel,
    kernel: &'a Kernel,
    dir: PathBuf,
    script: String,
    snoop: bool,
}

impl Job<'_> {
    /// How long it runs, roughly (longest first keeps the cores busy to the end).
    fn weight(&self) -> u32 {
        match (self.snoop, self.spec.tests) {
            (true, _) => 1,
            (false, Tests::Enforcement) => 2,
            (false, Tests::KernelFacing) => 4,
            (false, Tests::KernelFacingUnderLoad) => 5,
            (false, Tests::KernelFacingNoStorms) => 3,
            (false, Tests::All) => 10,
        }
    }

    /// Boots, and boots once more after a crash or hang.
    fn run(&self, busybox: &Path) -> Result<(Boot, u32), String> {
        let (name, kernel, dir) = (&self.label, self.kernel, &self.dir);
        let iommu = if self.snoop { "an IOMMU with snoop control" } else { "an IOMMU without snoop control" };
        let mut attempt = 0;
        loop {
            attempt += 1;
            eprintln!(
                "lab: {name} ({}, {}, {iommu}): booting, attempt {attempt}",
                kernel.package, kernel.release
            );
            let b = boot(kernel, self.spec.cmdline, busybox, dir, &self.script, self.snoop, None)
                .map_err(|e| format!("{e:#}"))?;
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
}

pub const PLAN_BEGIN: &str = "<!-- generated: lab plan (cargo xtask docs) -->";
pub const PLAN_END: &str = "<!-- end generated: lab plan -->";

/// The lab's plan in Markdown: each kernel, where it comes from, how it boots and what runs there.
pub fn plan_table() -> String {
    let names = |fs: &[&str]| fs.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ");
    let subset = |set: Subset| {
        set.iter()
            .map(|(bin, run, skip)| {
                let run = if run.is_empty() { "all".to_string() } else { names(run) };
                let skip = if skip.is_empty() { String::new() } else { format!(" but {}", names(skip)) };
                format!("`tests/{bin}.rs`: {run}{skip}")
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut t = String::from(
        "| kernel | Debian suites | package (newest match) | command line | tests | snoop-control boot |\n|---|---|---|---|---|---|\n",
    );
    for k in KERNELS {
        let mut pkgs = vec![k.image.replace('V', k.version)];
        pkgs.extend(k.companions.iter().map(|c| c.replace('V', k.version)));
        let tests = match k.tests {
            Tests::All => "every kernel test".to_string(),
            Tests::KernelFacing => subset(KERNEL_FACING),
            Tests::KernelFacingUnderLoad => subset(KERNEL_FACING_UNDER_LOAD),
            Tests::KernelFacingNoStorms => subset(KERNEL_FACING_NO_STORMS),
            Tests::Enforcement => subset(ENFORCEMENT),
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {tests} | {} |",
            k.name,
            k.suites.join(", "),
            pkgs.iter().map(|p| format!("`{}`", p.replace('|', "\\|"))).collect::<Vec<_>>().join(" + "),
            if k.cmdline.is_empty() { "-".to_string() } else { format!("`{}`", k.cmdline) },
            if k.snoop { "yes" } else { "-" },
        );
    }
    let names: Vec<String> = HOST_ONLY.iter().map(|n| format!("`{n}`")).collect();
    let _ = writeln!(t, "\nOn the host only (about rules, dashboards, deployment files, audit sinks, libvirt's domain status and the HTTP server under floods, not the kernel; the lab's image has no libvirt): {}.", names.join(", "));
    t
}

/// How many VMs run at once: one per host core (single-threaded TCG), `IOASID_LAB_JOBS` to
/// choose.
fn parallel_boots() -> usize {
    std::env::var("IOASID_LAB_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
        .max(1)
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    for k in &opts.kernels {
        if !KERNELS.iter().any(|s| s.name == k) {
            let names: Vec<&str> = KERNELS.iter().map(|s| s.name).collect();
            bail!("no lab kernel {k} (the lab has {})", names.join(", "));
        }
    }
    // A run of the whole matrix rewrites it: a doc that lost its markers fails now, not after
    // every kernel has booted.
    if opts.script.is_none() && opts.kernels.is_empty() {
        matrix_docs(root)?;
    }
    let apt = Apt::new(&cache)?;
    let busybox = apt.unpack(&cache, &[apt.resolve("^busybox-static$")?])?.join("bin/busybox");
    let run_dir = root.join("target/lab");
    let bin = run_dir.join("bin");
    let binaries = snapshot(root, &test_binaries(root)?, &bin)?;
    let chosen: Vec<&LabKernel> = KERNELS
        .iter()
        .filter(|k| opts.kernels.is_empty() || opts.kernels.iter().any(|n| n == k.name))
        .collect();
    // Every kernel is fetched before any boots: one that cannot be fails the lab, by name.
    let mut kernels = Vec::new();
    for spec in &chosen {
        let kernel = prepare(&apt, &cache, spec, &busybox)
            .with_context(|| format!("lab kernel {}: cannot be fetched or prepared", spec.name))?;
        kernels.push(kernel);
    }
    // Per kernel, one boot with an IOMMU that does not enforce coherency (its tests but the
    // snoop-control ones), and where the matrix says so one with snoop control (only those).
    let mut jobs = Vec::new();
    for (spec, kernel) in chosen.iter().zip(&kernels) {
        for snoop in [false, true] {
            if snoop && (opts.script.is_some() || !spec.snoop) {
                continue;
            }
            let label = if snoop { format!("{}+snoop", spec.name) } else { spec.name.to_string() };
            let dir = run_dir.join(&label);
            std::fs::create_dir_all(&dir)?;
            let script = match &opts.script {
                Some(path) => {
                    // The VM may have its own /tmp: run a copy from the lab's directory.
                    let copy = dir.join("user-script.sh");
                    std::fs::copy(path, &copy).with_context(|| format!("reading {}", path.display()))?;
                    format!("set +e\nsh {}\necho LAB-ALL-DONE\n", copy.display())
                }
                None => tests_script(&bin, &binaries, spec.tests, &opts.filter, &dir.join("out"), snoop),
            };
            jobs.push(Job { label, spec, kernel, dir, script, snoop });
        }
    }
    jobs.sort_by_key(|j| std::cmp::Reverse(j.weight()));
    // One VM per core, longest first, each worker taking the next boot.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = parallel_boots().min(jobs.len().max(1));
    let mut outcomes: Vec<(usize, BootOutcome)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (jobs, next, busybox) = (&jobs, &next, &busybox);
                s.spawn(move || {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some(job) = jobs.get(i) else { break };
                        let r = job.run(busybox);
                        done.push((i, (job.label.clone(), job.kernel.release.clone(), r)));
                    }
                    done
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a lab thread panicked")).collect()
    });
    // Reported in matrix order.
    outcomes.sort_by_key(|(i, _)| {
        let j = &jobs[*i];
        (KERNELS.iter().position(|k| k.name == j.spec.name), j.snoop)
    });
    let outcomes: Vec<BootOutcome> = outcomes.into_iter().map(|(_, o)| o).collect();
    let mut report = Vec::new();
    let mut failed = false;
    let mut matrix = vec![host_status(root)];
    for (name, release, _) in outcomes.iter().filter(|(n, _, _)| !n.ends_with("+snoop")) {
        let json = std::fs::read_to_string(run_dir.join(name).join("out/status.json")).unwrap_or_default();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&json) {
            matrix.push((name.clone(), release.clone(), v));
        }
    }
    // Only a run of the whole matrix rewrites it (a run of some kernels would drop the others).
    if opts.script.is_none() && opts.kernels.is_empty() && matrix.len() == chosen.len() + 1 {
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

/// The documents that carry the kernel matrix.
const MATRIX_DOCS: [&str; 2] = [crate::docs::KERNELS, "README.md"];

/// Each matrix document with its text, or which one has lost its markers.
fn matrix_docs(root: &Path) -> Result<Vec<(PathBuf, String)>> {
    MATRIX_DOCS
        .iter()
        .map(|doc| {
            let path = root.join(doc);
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            crate::docs::replace_block(&text, MATRIX_BEGIN, MATRIX_END, "")
                .with_context(|| format!("{doc}: the kernel matrix's markers"))?;
            Ok((path, text))
        })
        .collect()
}

/// The kernel matrix (docs/kernels.md and the README), from each kernel's `status --json` as
/// the lab saw it.
fn write_matrix(root: &Path, rows: &[(String, String, serde_json::Value)]) -> Result<()> {
    let mut t = String::from(
        "| kernel | release | hooks attached | refused, nothing serving instead (why) | WBINVD/INVD counted by | ioctl path | enforcement | WBINVD handler time | flush reach | blast radius |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (name, release, v) in rows {
        let hooks = v["hooks"].as_array().cloned().unwrap_or_default();
        let attached: Vec<&str> =
            hooks.iter().filter(|h| h["attached"] == true).filter_map(|h| h["hook"].as_str()).collect();
        let kprobes =
            attached.iter().filter(|h| h.starts_with("kprobe/") || h.starts_with("kretprobe/")).count();
        let group_of = |h: &serde_json::Value| h["hook"].as_str().and_then(ioasid_common::hooks::hook)?.group;
        let missing: Vec<String> = hooks
            .iter()
            .filter(|h| h["attached"] != true && h["standby"] != true)
            .filter(|h| group_of(h).is_none_or(|g| v["serving"][g].is_null()))
            .filter(|h| h["refusal"]["kind"] != "unneeded")
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
        let serving = |g: &str| v["serving"][g].as_str().map_or("-".to_string(), |h| format!("`{h}`"));
        let _ = writeln!(
            t,
            "| {name} | {release} | {} of {}{} | {} | {} | {} | {} | {} | {} | {} |",
            attached.len(),
            hooks.len(),
            if kprobes > 0 { format!(" ({kprobes} kprobes)") } else { String::new() },
            if missing.is_empty() { "-".to_string() } else { missing.join(", ") },
            v["count_source"].as_str().unwrap_or("?"),
            v["ioctl_hooks"].as_str().unwrap_or("?"),
            v["enforcement_mechanism"].as_str().unwrap_or("?"),
            v["cost_source"].as_str().unwrap_or("?"),
            if v["count_source"] == "handlers" {
                "handlers (KVM's dirty mask)".to_string()
            } else {
                serving("flush-cpus")
            },
            if v["blast_radius"]["on"] == true {
                serving("flush-ipi-start")
            } else {
                "not measured".to_string()
            },
        );
    }
    for (path, text) in matrix_docs(root)? {
        let new = crate::docs::replace_block(&text, MATRIX_BEGIN, MATRIX_END, &t)?;
        if new != text {
            std::fs::write(&path, new)?;
            eprintln!("lab: {} kernel matrix updated", path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_matrix_document_has_its_markers() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        assert_eq!(matrix_docs(root).unwrap().len(), MATRIX_DOCS.len());
        let dir = std::env::temp_dir().join(format!("ioasid-matrix-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("docs")).unwrap();
        std::fs::write(dir.join(crate::docs::KERNELS), format!("{MATRIX_BEGIN}\n{MATRIX_END}\n")).unwrap();
        std::fs::write(dir.join("README.md"), "no matrix here\n").unwrap();
        let err = format!("{:#}", matrix_docs(&dir).unwrap_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("README.md: the kernel matrix's markers"), "{err}");
    }

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
