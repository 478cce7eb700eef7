//! Test harness for the kernel tests: the real agent binary, real guests, real scrapes.
#![allow(dead_code, reason = "each test binary uses a different part of the harness")]

use ioasid_agent::engine::record::{AuditRecord, Decision, Mechanism, RecordKind};
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

/// The agent binary: this build's, or `IOASID_AGENT` (the lab runs a snapshot of the build).
pub fn agent_path() -> PathBuf {
    std::env::var_os("IOASID_AGENT")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ioasid-agent")), PathBuf::from)
}

/// Kernel tests share the host's hooks: an agent judges every process on the host, so two
/// agents at once would both judge the same FILE_ADD. They run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Kernel tests run where the build found root, /dev/kvm and the real eBPF object (the
/// `ioasid_kernel_tests` cfg from build.rs); elsewhere the test runner reports them as ignored,
/// with the reason. `IOASID_SKIP_KERNEL_TESTS=1` at build time also ignores them. A kernel test
/// that runs checks again and fails, saying why, if the machine changed since the build.
pub fn require_kernel() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(root, "kernel test needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)");
    assert!(Path::new("/dev/kvm").exists(), "kernel test needs /dev/kvm");
}

/// A unique suffix so names never collide with another run's.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(unique(&format!("ioasid-test-{tag}")));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Agent {
    child: Child,
    pub addr: String,
    pub dir: TempDir,
    stderr_path: PathBuf,
    /// The agent's pinned kernel state (`--state-dir`), removed with the harness's agent unless
    /// a test passed its own.
    state: Option<StateDir>,
}

/// A `--state-dir` of its own on bpffs, removed on drop: each test's agent starts from fresh
/// kernel state unless the test hands the same one to a second agent (adoption).
pub struct StateDir(pub PathBuf);

impl StateDir {
    pub fn new() -> Self {
        Self(PathBuf::from("/sys/fs/bpf").join(unique("ioasid-test")))
    }
    pub fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Agent {
    pub fn start(extra: &[&str]) -> Self {
        let dir = TempDir::new("agent");
        let ready = dir.path("ready");
        let stderr_path = dir.path("agent.log");
        let log = std::fs::File::create(&stderr_path).unwrap();
        let own_state = !extra.contains(&"--state-dir");
        let state = own_state.then(StateDir::new);
        let child = Command::new(agent_path())
            .args(["--log", "info,ioasid_agent=debug", "run", "--listen", "127.0.0.1:0"])
            .args(if extra.contains(&"--sweep-interval") {
                &[][..]
            } else {
                &["--sweep-interval", "100ms"][..]
            })
            .arg("--ready-file")
            .arg(&ready)
            .arg("--audit-log")
            .arg(dir.path("audit.jsonl"))
            .args(extra)
            .args(state.iter().flat_map(|s| ["--state-dir".to_string(), s.arg().to_string()]))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting ioasid-agent");
        let mut agent = Self { child, addr: String::new(), dir, stderr_path, state };
        let deadline = Instant::now() + Duration::from_secs(30) * slow();
        loop {
            if let Ok(addr) = std::fs::read_to_string(&ready) {
                if !addr.is_empty() {
                    agent.addr = addr;
                    return agent;
                }
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("ioasid-agent exited during start-up ({status}):\n{}", agent.log());
            }
            assert!(Instant::now() < deadline, "ioasid-agent not ready after 30 s:\n{}", agent.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit lines are JSON"))
            .collect()
    }

    /// Waits until an audit record for `vm` exists and returns it.
    pub fn wait_audit(&self, vm: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10) * slow();
        loop {
            if let Some(r) = self.audit().into_iter().find(|r| r["vm"] == vm) {
                return r;
            }
            assert!(Instant::now() < deadline, "no audit record for {vm}; agent log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until an incoherent-DMA (or vfio-file-add) record for `vm` exists and returns it,
    /// typed as the agent writes it (records of other kinds for `vm`, a storm's, are passed over).
    pub fn wait_record(&self, vm: &str) -> AuditRecord {
        let enable = |r: &serde_json::Value| matches!(r["event"].as_str(), Some(e) if e == RecordKind::IncoherentDma.label() || e == RecordKind::VfioFileAdd.label());
        let deadline = Instant::now() + Duration::from_secs(10) * slow();
        loop {
            if let Some(r) = self.audit().into_iter().find(|r| r["vm"] == vm && enable(r)) {
                return serde_json::from_value(r.clone()).unwrap_or_else(|e| panic!("{e}: {r}"));
            }
            assert!(
                Instant::now() < deadline,
                "no incoherent-DMA record for {vm}; agent log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn scrape(&self) -> String {
        http_get(&self.addr, "/metrics")
    }

    /// SIGTERM and wait for a clean exit (the agent's files stay readable).
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10) * slow();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "agent did not stop on SIGTERM:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status once the agent has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10) * slow();
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` from `addr`; the status must be 200.
pub fn http_get(addr: &str, path: &str) -> String {
    let agent = ureq::Agent::new_with_config(
        ureq::config::Config::builder().timeout_global(Some(Duration::from_secs(10) * slow())).build(),
    );
    let url = format!("http://{addr}{path}");
    let mut resp = agent.get(&url).call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    resp.body_mut().read_to_string().unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// Whether `name` is a sample of a family the agent registers (the registry's own list, so a
/// misspelt name in a test fails here instead of reading as an absent series).
pub fn known_metric(name: &str) -> bool {
    static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| {
        ioasid_agent::output::telemetry::Metrics::new().docs.iter().map(|d| d.name.clone()).collect()
    });
    let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
    names.iter().any(|n| n == name || n == family)
}

/// The value of the sample `name{labels}` (labels given as `k="v"` pairs, any order).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    assert!(known_metric(name), "{name} is not a metric the agent registers");
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            return None;
        }
        let ok = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        ok.then(|| value.parse().ok()).flatten()
    })
}

/// A VM's guest WBINVD count over both paths KVM has: emulated on the development kernel,
/// hardware exits on real hosts (the lab). Each instruction counts on one path only.
pub fn wbinvd_total(text: &str, vm: &str) -> Option<f64> {
    let path = |p| sample(text, "ioasid_wbinvd_exits_total", &[("vm", vm), ("path", p)]);
    match (path("exit"), path("emulated")) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
    }
}

pub fn guest_path() -> PathBuf {
    if let Some(p) = std::env::var_os("IOASID_GUEST") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test> -> target/<profile>/ioasid-guest
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().and_then(Path::parent).map(|d| d.join("ioasid-guest")).unwrap();
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo build -p ioasid-guest`, done by `cargo xtask test`)",
        p.display()
    );
    p
}

pub fn guest(args: &[&str]) -> Child {
    Command::new(guest_path())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting ioasid-guest")
}

/// The state letter of /proc/PID/stat (R, S, T...), None once the process is gone.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().next()?.chars().next()
}

pub fn finish(child: Child) -> (ExitStatus, serde_json::Value, String) {
    let Output { status, stdout, stderr } = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    let summary =
        stdout.lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(serde_json::Value::Null);
    (status, summary, String::from_utf8_lossy(&stderr).into_owned())
}

/// Starts a child with `spawn` on `pid` (free: its process reaped) through ns_last_pid, at once,
/// as a busy host reuses pids; None if another fork kept taking it.
pub fn spawn_on_pid(pid: u32, spawn: impl Fn() -> Child) -> Option<Child> {
    for _ in 0..50 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).ok()?;
        let mut c = spawn();
        if c.id() == pid {
            return Some(c);
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    None
}

/// Polls `f` until it returns Some or the timeout passes.
/// In the lab (`IOASID_LAB=1`) the kernel under test runs under QEMU's software emulation,
/// some 10-50 times slower: waits for something to happen are scaled by this. Bounds that are
/// promises (e.g. "a storm is detected within a second") are asserted as such on the host.
pub fn slow() -> u32 {
    if std::env::var_os("IOASID_LAB").is_some() {
        8
    } else {
        1
    }
}

/// True in the lab, where the kernel under test runs under software emulation.
pub fn in_lab() -> bool {
    slow() > 1
}

/// Polls `f` until it returns Some or the timeout (scaled in the lab) passes.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout * slow();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Which mechanism enforces a denial the kernel can decide alone (a verdict already in the
/// kernel): `lsm` where the BPF LSM program is attached, else `sigkill`.
pub fn enforcement(agent: &Agent) -> String {
    let m = agent.scrape();
    let lsm = sample(&m, "ioasid_enforcement_mechanism", &[("mechanism", "lsm")]) == Some(1.0);
    if lsm { "lsm" } else { "sigkill" }.to_string()
}

/// Asserts a FILE_ADD was denied as the mechanism in force does it: the LSM returns EPERM to a
/// VMM that lives on; otherwise the kernel program's SIGKILL ends it.
pub fn assert_denied(mechanism: &str, status: ExitStatus, summary: &serde_json::Value, err: &str) {
    use std::os::unix::process::ExitStatusExt;
    match mechanism {
        "lsm" => {
            assert!(status.success(), "under the LSM the denied VMM lives on: {status:?} {err}");
            assert_eq!(summary["file_add_errno"], libc::EPERM, "the LSM answers EPERM: {summary}");
        }
        _ => {
            assert_eq!(status.signal(), Some(libc::SIGKILL), "the denied VMM must die by SIGKILL: {status:?}")
        }
    }
}

/// Asserts a denied FILE_ADD ended as its audit record says it was enforced: `lsm` means EPERM
/// to a VMM that lives on; `sigkill` and `stop-ask` mean the VMM died by SIGKILL.
pub fn assert_denied_as_recorded(
    r: &AuditRecord,
    status: ExitStatus,
    summary: &serde_json::Value,
    err: &str,
) {
    assert_eq!(r.decision, Decision::Denied, "{r:?}");
    assert!([Mechanism::Lsm, Mechanism::Sigkill, Mechanism::StopAsk].contains(&r.mechanism), "{r:?}");
    assert_denied(if r.mechanism == Mechanism::Lsm { "lsm" } else { "sigkill" }, status, summary, err);
}

/// A guest that is killed if the test ends (or fails) before it is finished: a VFIO group is
/// held by one process at a time, so a failed test must not keep it from the next one.
pub struct GuestGuard(Option<Child>);

impl GuestGuard {
    pub fn spawn(args: &[&str]) -> Self {
        Self(Some(guest(args)))
    }

    /// Kills `child` when dropped (a test that fails leaves no guest running).
    pub fn of(child: Child) -> Self {
        Self(Some(child))
    }

    pub fn finish(mut self) -> (ExitStatus, serde_json::Value, String) {
        finish(self.0.take().expect("finished once"))
    }

    pub fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }
}

impl Drop for GuestGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where cgroup v2 is mounted (the lab's /sys/fs/cgroup, this machine's /sys/fs/cgroup/unified):
/// the VM managers' cgroups are made there, as systemd and the kubelet make them.
pub fn cgroup2_root() -> std::path::PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mnt = mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            (f.get(dash + 1) == Some(&"cgroup2")).then(|| f[4].to_string())
        })
        .expect("a cgroup2 mount");
    std::path::PathBuf::from(mnt)
}

/// A cgroup made for a test VMM (parents too), removed (leaf first) when dropped.
pub struct Cg {
    leaf: std::path::PathBuf,
    /// What this test made, leaf first.
    made: Vec<std::path::PathBuf>,
}

impl Cg {
    pub fn make(rel: &str) -> Cg {
        let mut leaf = cgroup2_root();
        let mut made = Vec::new();
        for part in rel.trim_start_matches('/').split('/') {
            leaf.push(part);
            if !leaf.exists() {
                std::fs::create_dir(&leaf).unwrap_or_else(|e| panic!("creating {}: {e}", leaf.display()));
                made.push(leaf.clone());
            }
        }
        made.reverse();
        Cg { leaf, made }
    }

    pub fn procs(&self) -> std::path::PathBuf {
        self.leaf.join("cgroup.procs")
    }

    /// `program args` started inside it.
    pub fn spawn(&self, program: &std::ffi::OsStr, args: &[&str]) -> Child {
        spawn_in_cgroup(&self.procs(), program, args)
    }
}

impl Drop for Cg {
    fn drop(&mut self) {
        for d in &self.made {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// The cgroup KubeVirt's virt-launcher pod gives its VMM (kubelet's systemd driver, a burstable
/// pod with UID `pod`), under the cgroup v2 mount.
pub fn kubevirt_pod_cgroup(pod: &str) -> Cg {
    Cg::make(&format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{:x}.scope",
        pod.replace('-', "_"),
        std::process::id()
    ))
}

/// `program args` started inside the cgroup whose `cgroup.procs` is `procs` (it moves itself
/// there, then execs), output piped.
pub fn spawn_in_cgroup(procs: &Path, program: &std::ffi::OsStr, args: &[&str]) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(format!("echo $$ > '{}' && exec \"$0\" \"$@\"", procs.display()))
        .arg(program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A tiny QEMU machine under KVM for a `-bios` ROM: 16 MB, no devices but `isa-debug-exit`
/// (the ROM's way out), no display, no serial.
pub const QEMU_TINY: &[&str] = &[
    "-accel",
    "kvm",
    "-m",
    "16",
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-serial",
    "none",
    "-device",
    "isa-debug-exit,iobase=0xf4,iosize=0x04",
];
