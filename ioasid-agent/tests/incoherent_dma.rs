//! Kernel tests: incoherent-DMA enables judged against a policy and enforced in the kernel.
//!
//! Kernels covered: this machine's (`cargo xtask test`) and the lab's Debian kernels
//! (`cargo xtask lab`; which test runs on which kernel: docs/testing.md); each test asks the
//! kernel what it provides (hooks, enforcement mechanism, the path KVM takes for WBINVD) and
//! asserts the outcome for it.
//!
//! The guest walks QEMU's path: KVM_CREATE_VM, KVM_CREATE_DEVICE(VFIO), then
//! KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE, FILE_ADD) with an ordinary fd, which the kernel
//! answers with EINVAL. With no delay it does so microseconds after exec, before the agent can
//! have classified it (the stop-and-ask path); with a delay the agent has compiled its verdict
//! into the kernel first (the in-kernel path).

mod support;

use std::{os::unix::process::ExitStatusExt, process::Command, time::Duration};

use ioasid_agent::{
    engine::{
        policy::{Action, PolicyFile},
        record::{Coherency, Decision, Mechanism, Outcome, RecordKind},
    },
    host::vfio::VfioKind,
};

use support::*;

fn policy(prefix: &str) -> String {
    format!(
        "default:\n  incoherent_dma: audit\nrules:\n  - name: gpu-tenants\n    match: {{ vm: \"{prefix}-gpu-*\" }}\n    incoherent_dma: allow\n  - name: everyone-else-untrusted\n    match: {{ vm: \"{prefix}-tenant-*\" }}\n    incoherent_dma: deny\n"
    )
}

/// An agent enforcing `policy(prefix)` with `extra` flags; the TempDir holds the policy file.
fn agent_with_policy(prefix: &str, extra: &[&str]) -> (Agent, TempDir) {
    let dir = TempDir::new("policy");
    let path = dir.path("policy.yaml");
    write(&path, &policy(prefix));
    let mut args = vec!["--policy", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    (Agent::start(&args), dir)
}

fn file_add(name: &str, delay: &str) -> (std::process::ExitStatus, serde_json::Value, String) {
    finish(guest(&[
        "--name",
        &format!("guest={name},debug-threads=on"),
        "--file-add",
        "--file-add-delay",
        delay,
    ]))
}

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn allow_audit_and_deny_right_after_exec_tp_btf() {
    allow_audit_and_deny_right_after_exec("tp-btf");
}

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn allow_audit_and_deny_right_after_exec_classic_tracepoints() {
    allow_audit_and_deny_right_after_exec("tracepoint");
}

fn allow_audit_and_deny_right_after_exec(ioctl_hooks: &str) {
    require_kernel();
    let _g = serial();
    let prefix = unique("t");
    let (agent, _policy) = agent_with_policy(&prefix, &["--ioctl-hooks", ioctl_hooks]);

    // allow: the kernel's own EINVAL, and an `allowed` record.
    let gpu = format!("{prefix}-gpu-1");
    let (status, summary, err) = file_add(&gpu, "0");
    assert!(status.success(), "{err}");
    assert_eq!(summary["file_add_errno"], 22);
    let r = agent.wait_record(&gpu);
    assert_eq!((r.decision, r.rule.as_str()), (Decision::Allowed, "gpu-tenants"), "{r:?}");
    assert_eq!(r.ret, Some(-22));
    assert_eq!(r.request.attr, "KVM_DEV_VFIO_FILE_ADD");
    let vfio = r.vfio.as_ref().expect("the file was resolved");
    assert_eq!((vfio.path.as_str(), vfio.kind), ("/dev/null", VfioKind::NotVfio));

    // audit (default): EINVAL and an `audited` record.
    let web = format!("{prefix}-web-1");
    let (status, summary, err) = file_add(&web, "0");
    assert!(status.success(), "{err}");
    assert_eq!(summary["file_add_errno"], 22);
    let r = agent.wait_record(&web);
    assert_eq!((r.decision, r.rule.as_str()), (Decision::Audited, "default"), "{r:?}");

    // deny, issued microseconds after exec: judged by its own rule, never by a default. Before
    // the agent has named it, the kernel stops it and the agent kills it before the ioctl ever
    // returns to it (stop-ask: always on this machine); if the agent named it first (possible
    // under the lab's emulation), the kernel's verdict denies it.
    let tenant = format!("{prefix}-tenant-1");
    let (status, summary, err) = file_add(&tenant, "0");
    let rec = agent.wait_record(&tenant);
    assert_eq!((rec.decision, rec.rule.as_str()), (Decision::Denied, "everyone-else-untrusted"), "{rec:?}");
    assert_denied_as_recorded(&rec, status, &summary, &err);
    if !in_lab() {
        assert_eq!((rec.mechanism, rec.outcome), (Mechanism::StopAsk, Outcome::Killed), "{rec:?}");
        assert_eq!(summary, serde_json::Value::Null, "it must not get to print anything");
    }
    // Every field a reader relies on is in the line itself.
    let r = agent.wait_audit(&tenant);
    for key in [
        "time",
        "host",
        "vm",
        "pid",
        "exe",
        "cgroup",
        "uid",
        "request",
        "rule",
        "decision",
        "mechanism",
        "outcome",
    ] {
        assert!(!r[key].is_null(), "audit record lacks {key}: {r}");
    }

    let m = agent.scrape();
    assert_eq!(
        sample(&m, "ioasid_incoherent_dma_requests_total", &[("vm", &gpu), ("decision", "allowed")]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "ioasid_incoherent_dma_requests_total", &[("vm", &web), ("decision", "audited")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "ioasid_incoherent_dma_requests_total", &[("vm", &tenant), ("decision", "denied")]),
        Some(1.0)
    );
    // The mechanism for verdicts the kernel applies alone: the LSM where it is attached.
    let lsm = sample(&m, "ioasid_hook_attached", &[("hook", "lsm/file_ioctl")]) == Some(1.0);
    let mechanism = if lsm { "lsm" } else { "sigkill" };
    assert_eq!(sample(&m, "ioasid_enforcement_mechanism", &[("mechanism", mechanism)]), Some(1.0), "{m}");
}

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn deny_with_the_verdict_already_in_the_kernel_tp_btf() {
    deny_with_the_verdict_already_in_the_kernel("tp-btf");
}

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn deny_with_the_verdict_already_in_the_kernel_classic_tracepoints() {
    deny_with_the_verdict_already_in_the_kernel("tracepoint");
}

fn deny_with_the_verdict_already_in_the_kernel(ioctl_hooks: &str) {
    require_kernel();
    let _g = serial();
    let prefix = unique("k");
    let (agent, _policy) = agent_with_policy(&prefix, &["--ioctl-hooks", ioctl_hooks]);
    // The agent classifies the VM at KVM_CREATE_VM; FILE_ADD comes later, with a deny verdict
    // already in the kernel. The file is not one whose coherency the agent resolved (an
    // ordinary fd, as any file can be until the agent sees it in use): the kernel never kills
    // blind for a file that may be coherent. It stops the VMM and asks; the agent resolves the
    // file (unknown coherency: judged as non-coherent by default) and kills it. The ioctl ran
    // before the VMM stopped: its result is in the record. (A file the agent resolved as
    // non-coherent is refused in the kernel alone, by the LSM or SIGKILL: the lab shows it.)
    let tenant = format!("{prefix}-tenant-2");
    let (status, _, _) = file_add(&tenant, &format!("{}", 0.5 * f64::from(slow())));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    let r = agent.wait_record(&tenant);
    // The kvm-vfio device fd is learnt from KVM_CREATE_DEVICE's result at sys_exit; the LSM
    // path (no syscall tracepoint) does not see it.
    let lsm_path = sample(&agent.scrape(), "ioasid_ioctl_path", &[("family", "lsm")]) == Some(1.0);
    assert_eq!(r.request.device_fd_known, !lsm_path, "{r:?}");
    assert_eq!(
        (r.decision, r.mechanism, r.outcome, r.coherency),
        (Decision::Denied, Mechanism::StopAsk, Outcome::Killed, Some(Coherency::Unknown)),
        "{r:?}"
    );
    assert_eq!(r.ret, Some(-22), "{r:?}");
    // The kernel program said so itself, through aya-log, in the agent's log.
    let said = eventually(Duration::from_secs(3), || {
        agent
            .log()
            .lines()
            .any(|l| l.contains("ioasid_ebpf") && l.contains("decision 4, signal 19 sent"))
            .then_some(())
    });
    assert!(said.is_some(), "no kernel log line:\n{}", agent.log());

    let gpu = format!("{prefix}-gpu-2");
    let (status, summary, err) = file_add(&gpu, &format!("{}", 0.5 * f64::from(slow())));
    assert!(status.success(), "{err}");
    assert_eq!(summary["file_add_errno"], 22);
    let r = agent.wait_record(&gpu);
    assert_eq!(
        (r.decision, r.mechanism, r.outcome),
        (Decision::Allowed, Mechanism::None, Outcome::Completed),
        "{r:?}"
    );
}

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn unknown_coherency_can_be_let_through() {
    require_kernel();
    let _g = serial();
    let prefix = unique("u");
    let dir = TempDir::new("policy");
    let path = dir.path("policy.yaml");
    write(&path, &format!("default:\n  unknown_coherency: allow\nrules:\n  - name: untrusted\n    match: {{ vm: \"{prefix}-tenant-*\" }}\n    incoherent_dma: deny\n"));
    let agent = Agent::start(&["--policy", path.to_str().unwrap()]);
    // A file whose coherency is unknown (an ordinary fd here), under a deny rule, with
    // `unknown_coherency: allow`: not an incoherent-DMA enable. Observed and audited as a VFIO
    // file add, never stopped or killed, not counted as an enable; right after exec (no
    // verdict yet: stopped, asked, resumed) and with the verdict in the kernel alike.
    for (name, delay) in [("tenant-1", 0.0), ("tenant-2", 0.5)] {
        let vm = format!("{prefix}-{name}");
        let (status, summary, err) = file_add(&vm, &format!("{}", delay * f64::from(slow())));
        assert!(status.success(), "{vm}: {err}");
        assert_eq!(summary["file_add_errno"], 22, "the kernel's own EINVAL: {summary}");
        let r = agent.wait_record(&vm);
        assert_eq!(
            (r.event, r.coherency, r.decision),
            (RecordKind::VfioFileAdd, Some(Coherency::Unknown), Decision::Allowed),
            "{r:?}"
        );
        let m = eventually(Duration::from_secs(3), || {
            let m = agent.scrape();
            (sample(&m, "ioasid_vfio_file_adds_total", &[("vm", &vm), ("coherency", "unknown")]) == Some(1.0))
                .then_some(m)
        })
        .unwrap_or_else(|| agent.scrape());
        assert_eq!(
            sample(&m, "ioasid_vfio_file_adds_total", &[("vm", &vm), ("coherency", "unknown")]),
            Some(1.0),
            "{m}"
        );
        for d in ["allowed", "audited", "denied"] {
            let n = sample(&m, "ioasid_incoherent_dma_requests_total", &[("vm", &vm), ("decision", d)]);
            assert_eq!(n, Some(0.0), "{vm}: not an incoherent-DMA enable ({d})");
        }
    }
}

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn dry_run_audits_denials_without_enforcing() {
    require_kernel();
    let _g = serial();
    let prefix = unique("d");
    let (agent, _policy) = agent_with_policy(&prefix, &["--dry-run"]);
    let tenant = format!("{prefix}-tenant-3");
    // Not stopped (dry run), it lives a moment as a VMM does, so the agent reads who it is.
    let hold = format!("{}", 0.5 * f64::from(slow()));
    let (status, summary, err) =
        finish(guest(&["--name", &format!("guest={tenant}"), "--file-add", "--hold", &hold]));
    assert!(status.success(), "dry run must not kill: {err}");
    assert_eq!(summary["file_add_errno"], 22);
    let r = agent.wait_record(&tenant);
    assert_eq!((r.decision, r.outcome), (Decision::Denied, Outcome::NotEnforced), "{r:?}");
    let m = agent.scrape();
    assert_eq!(sample(&m, "ioasid_enforcement_mechanism", &[("mechanism", "none")]), Some(1.0));
}

/// `ioasid-agent status --json`.
fn status_json() -> serde_json::Value {
    let out = std::process::Command::new(agent_path()).args(["status", "--json"]).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn reload_is_atomic_and_keeps_the_last_good_policy() {
    require_kernel();
    let _g = serial();
    let prefix = unique("r");
    let dir = TempDir::new("policy");
    let path = dir.path("policy.yaml");
    write(&path, "default:\n  incoherent_dma: audit\n");
    let agent = Agent::start(&["--policy", path.to_str().unwrap()]);
    // Where KVM's own ioctl functions serve, nothing refuses while nothing is denied: the LSM
    // program (every ioctl of the host would pass it) is attached only with a deny in force.
    let functions = sample(&agent.scrape(), "ioasid_ioctl_path", &[("family", "functions")]) == Some(1.0);
    let with_deny = status_json()["enforcement_mechanism"].as_str().unwrap().to_string();
    if functions {
        assert_eq!(enforcement(&agent), "sigkill", "an audit-only policy attached the LSM");
    }

    // A VM that is already running when the policy changes is judged by the new policy. (A
    // changed file applies once two checks a second apart agree: within about 2 s.)
    let vm = format!("{prefix}-tenant-live");
    let delay = format!("{}", 2 * slow() + 3);
    let live = guest(&["--name", &vm, "--file-add", "--file-add-delay", &delay]);
    std::thread::sleep(Duration::from_millis(300) * slow());

    // A change on disk is picked up; SIGHUP also reloads.
    write(&path, &policy(&prefix));
    let reloaded = eventually(Duration::from_secs(5), || {
        (sample(&agent.scrape(), "ioasid_policy_reloads_total", &[("result", "success")]) == Some(1.0))
            .then_some(())
    });
    assert!(reloaded.is_some(), "file change not picked up:\n{}", agent.log());
    if functions {
        assert_eq!(enforcement(&agent), with_deny, "a deny came: the LSM is attached where it can be");
    }
    // The running VM must be judged by the new policy.
    let (status, summary, err) = finish(live);
    assert_denied_as_recorded(&agent.wait_record(&vm), status, &summary, &err);

    // A bad file is rejected and the last good policy stays in force.
    write(&path, "default:\n  incoherent_dma: sometimes\n");
    let rejected = eventually(Duration::from_secs(5), || {
        (sample(&agent.scrape(), "ioasid_policy_reloads_total", &[("result", "failure")]) == Some(1.0))
            .then_some(())
    });
    assert!(rejected.is_some(), "bad file not rejected:\n{}", agent.log());
    assert!(agent.log().contains("last good policy stays in force"), "{}", agent.log());
    let tenant = format!("{prefix}-tenant-after");
    let (status, summary, err) = file_add(&tenant, "0");
    // Denied right after exec (stop-ask), or by the verdict if the agent named it first.
    assert_denied_as_recorded(&agent.wait_record(&tenant), status, &summary, &err);

    write(&path, "default:\n  incoherent_dma: allow\n");
    agent.signal(libc::SIGHUP);
    let ok = eventually(Duration::from_secs(5), || {
        (sample(&agent.scrape(), "ioasid_policy_reloads_total", &[("result", "success")]) >= Some(2.0))
            .then_some(())
    });
    assert!(ok.is_some(), "{}", agent.log());
    if functions {
        assert_eq!(enforcement(&agent), "sigkill", "the last deny went: the LSM is detached");
    }
    let (status, summary, err) = file_add(&format!("{prefix}-tenant-allowed"), "0");
    assert!(status.success(), "{err}");
    assert_eq!(summary["file_add_errno"], 22);
}

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn recorded_requests_replay_against_another_policy() {
    require_kernel();
    let _g = serial();
    let prefix = unique("p");
    let dir = TempDir::new("replay");
    let record = dir.path("events.jsonl");
    let agent = Agent::start(&["--record", record.to_str().unwrap(), "--dry-run"]);
    for vm in [format!("{prefix}-gpu-1"), format!("{prefix}-tenant-1")] {
        let (status, _, err) = file_add(&vm, "0");
        assert!(status.success(), "{err}");
        agent.wait_audit(&vm);
    }
    drop(agent);
    let pol = dir.path("strict.yaml");
    write(&pol, &policy(&prefix));
    let out = Command::new(agent_path())
        .args(["replay", record.to_str().unwrap(), "--policy", pol.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let by_vm = |vm: &str| lines.iter().find(|l| l["vm"] == vm).unwrap().clone();
    let g = by_vm(&format!("{prefix}-gpu-1"));
    assert_eq!((g["recorded"].as_str(), g["decision"].as_str()), (Some("audited"), Some("allowed")));
    let t = by_vm(&format!("{prefix}-tenant-1"));
    assert_eq!(
        (t["decision"].as_str(), t["rule"].as_str()),
        (Some("denied"), Some("everyone-else-untrusted"))
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 decided differently"));
}

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn watched_requests_on_other_files_never_drown_a_decision() {
    require_kernel();
    let _g = serial();
    let prefix = unique("noise");
    let (agent, _policy) = agent_with_policy(&prefix, &[]);
    let requests: Vec<&str> = ioasid_common::ioctl::WATCHED_IOCTLS
        .iter()
        .filter(|r| (r.cmd >> 8) & 0xff == 0x3b)
        .map(|r| r.name)
        .collect();
    assert_eq!(requests.len(), 11);
    let before = agent.scrape();
    let ignored_before = sample(&before, "ioasid_ioctls_ignored_total", &[]).unwrap_or(0.0);
    // Four processes loop every watched VFIO/iommufd request number on /dev/null (anyone can)
    // while real VMMs enable incoherent DMA.
    const ROUNDS: u32 = 20_000;
    let rounds = ROUNDS.to_string();
    let noise: Vec<_> = (0..4)
        .map(|i| {
            guest(&["--name", &format!("{prefix}-noise-{i}"), "--vfio-probe", "--vfio-probe-repeat", &rounds])
        })
        .collect();
    let vms: Vec<String> = (0..10).map(|i| format!("{prefix}-gpu-{i}")).collect();
    for vm in &vms {
        let (status, summary, err) = file_add(vm, "0");
        assert!(status.success(), "{err}");
        assert_eq!(summary["file_add_errno"], 22);
    }
    for n in noise {
        let (status, summary, err) = finish(n);
        assert!(status.success(), "{err}");
        assert_eq!(summary["vfio_probed"], u64::from(ROUNDS) * 11);
    }
    // Every enable has exactly one record, allowed by its rule.
    for vm in &vms {
        agent.wait_audit(vm);
        let recs: Vec<_> = agent.audit().into_iter().filter(|r| r["vm"] == vm.as_str()).collect();
        assert_eq!(recs.len(), 1, "{recs:?}");
        assert_eq!(recs[0]["decision"], "allowed", "{}", recs[0]);
    }
    // The noise is counted as ignored (where a hook sees every ioctl: the syscall hooks, the
    // observing LSM), or reaches no program at all (KVM's and VFIO's own functions), and is
    // reported nowhere else: no ioctl series, no event, no drop.
    let functions = sample(&before, "ioasid_ioctl_path", &[("family", "functions")]) == Some(1.0);
    let want = ignored_before + if functions { 0.0 } else { f64::from(4 * 11 * ROUNDS) };
    let m = eventually(Duration::from_secs(5), || {
        let m = agent.scrape();
        (sample(&m, "ioasid_ioctls_ignored_total", &[]).unwrap_or(0.0) >= want).then_some(m)
    });
    let m = m.unwrap_or_else(|| panic!("the noise was not counted as ignored:\n{}", agent.scrape()));
    if functions {
        let ignored = sample(&m, "ioasid_ioctls_ignored_total", &[]).unwrap_or(0.0);
        assert_eq!(ignored, ignored_before, "the noise reached a program on the functions path:\n{m}");
    }
    for r in &requests {
        let was = sample(&before, "ioasid_ioctls_total", &[("request", r)]).unwrap_or(0.0);
        assert_eq!(sample(&m, "ioasid_ioctls_total", &[("request", r)]).unwrap_or(0.0), was, "{r}");
    }
    assert_eq!(sample(&m, "ioasid_events_dropped_total", &[]), Some(0.0));
    assert_eq!(sample(&m, "ioasid_kernel_errors_total", &[("kind", "decision_dropped")]), Some(0.0));
}

/// The agent never reads the decisions ring (as if it were stalled): the kernel lets enables
/// through while their events fit, then stops and asks about each; the agent decides those from
/// the kernel's ask records. No enable goes unrecorded, none is lost.
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn an_enable_is_asked_about_when_its_event_would_not_fit() {
    use ioasid_common::names::{DECISIONS_RESERVE, DECISIONS_RING_BYTES};
    require_kernel();
    let _g = serial();
    let prefix = unique("full");
    let (agent, _policy) = agent_with_policy(&prefix, &["--test-stall-decisions"]);
    // An event takes 152 bytes of the ring (144 and the ring's 8-byte header).
    let fit = (DECISIONS_RING_BYTES - DECISIONS_RESERVE).div_ceil(152);
    let (repeat, asked) = (fit + 4, 4usize);
    let vm = format!("{prefix}-gpu-1");
    let (status, summary, err) = finish(guest(&[
        "--name",
        &vm,
        "--file-add",
        // Classified before its first FILE_ADD: the kernel has its verdict (allow).
        "--file-add-delay",
        "1",
        "--file-add-repeat",
        &repeat.to_string(),
    ]));
    assert!(status.success(), "the allowed VMM must be resumed each time: {err}");
    assert_eq!(summary["file_add_errno"], 22);
    let recs = eventually(Duration::from_secs(5), || {
        let recs: Vec<_> = agent.audit().into_iter().filter(|r| r["vm"] == vm.as_str()).collect();
        (recs.len() >= asked).then_some(recs)
    })
    .unwrap_or_else(|| panic!("no records for the asks; agent log:\n{}", agent.log()));
    assert_eq!(recs.len(), asked, "{recs:?}");
    for r in &recs {
        assert_eq!(
            (r["decision"].as_str(), r["outcome"].as_str()),
            (Some("allowed"), Some("resumed")),
            "{r}"
        );
        assert!(r["reason"].as_str().unwrap_or("").contains("event lost"), "{r}");
    }
    let m = agent.scrape();
    assert_eq!(sample(&m, "ioasid_kernel_errors_total", &[("kind", "decision_dropped")]), Some(0.0), "{m}");
}

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn a_stopped_vmm_is_decided_even_if_its_event_is_lost() {
    require_kernel();
    let _g = serial();
    let prefix = unique("lost");
    // The agent discards every kernel event, as if its ring buffer were always full.
    let (agent, _policy) = agent_with_policy(&prefix, &["--test-drop-events"]);
    let started = std::time::Instant::now();
    let (status, _, _) = file_add(&format!("{prefix}-tenant-1"), "0");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    let (status, summary, err) = file_add(&format!("{prefix}-gpu-1"), "0");
    assert!(status.success(), "the allowed VMM must be resumed: {err}");
    assert_eq!(summary["file_add_errno"], 22);
    assert!(started.elapsed() < Duration::from_secs(5) * slow(), "took {:?}", started.elapsed());
    for (vm, decision, outcome) in
        [("tenant-1", Decision::Denied, Outcome::Killed), ("gpu-1", Decision::Allowed, Outcome::Resumed)]
    {
        let r = agent.wait_record(&format!("{prefix}-{vm}"));
        assert_eq!((r.decision, r.outcome), (decision, outcome), "{r:?}");
        assert!(r.reason.as_deref().unwrap_or("").contains("event lost"), "{r:?}");
        // The fds come from the kernel's ask record: the device's and the file's.
        let (fd, file_fd) = (r.request.fd, r.request.file_fd);
        assert!(fd > 2 && file_fd.is_some_and(|f| f > 2) && Some(fd) != file_fd, "{r:?}");
    }
    assert!(sample(&agent.scrape(), "ioasid_events_dropped_total", &[]).unwrap() > 0.0);
}

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn a_graceful_shutdown_decides_every_stopped_vmm() {
    require_kernel();
    let _g = serial();
    let prefix = unique("bye");
    let (mut agent, _policy) = agent_with_policy(&prefix, &["--test-drop-events"]);
    let vm = format!("{prefix}-gpu-1");
    let g = guest(&["--name", &vm, "--file-add", "--hold", "0.2"]);
    let pid = g.id();
    // The kernel stops it at FILE_ADD; its event is lost, and the agent stops before its
    // half-second recovery would have decided.
    let stopped = eventually(Duration::from_secs(2), || (proc_state(pid)? == 'T').then_some(()));
    assert!(stopped.is_some(), "the VMM was not stopped for a decision");
    let status = agent.stop();
    assert!(status.success(), "{status:?}\n{}", agent.log());
    let (status, summary, err) = finish(g);
    assert!(status.success(), "the allowed VMM must have been resumed: {err}");
    assert_eq!(summary["file_add_errno"], 22);
    let r = agent.audit().into_iter().find(|r| r["vm"] == vm.as_str()).expect("audited before exit");
    assert_eq!((r["decision"].as_str(), r["outcome"].as_str()), (Some("allowed"), Some("resumed")), "{r}");
}

/// One agent per host whatever its lock file: a second agent with a lock file of its own
/// refuses to start while the first runs and names it; once the first is SIGKILLed (no clean-up
/// of its own) a new agent starts at once. `status` is not an agent and runs beside one.
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn one_agent_per_host_whatever_its_lock_file() {
    require_kernel();
    let _g = serial();
    let dir = TempDir::new("instance");
    let lock = |name: &str| dir.path(name).to_str().unwrap().to_string();
    let mut first = Agent::start(&["--dry-run", "--lock-file", &lock("a.lock")]);
    // Its probes: ready (hooks attached, VMMs classified), alive (loop and ring reader).
    assert_eq!(http_get(&first.addr, "/readyz"), "ready\n");
    assert_eq!(http_get(&first.addr, "/healthz"), "ok\n");
    let second = Command::new(agent_path())
        .args(["run", "--dry-run", "--listen", "127.0.0.1:0", "--lock-file", &lock("b.lock")])
        .arg("--audit-log")
        .arg(dir.path("b.jsonl"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (status, err) = wait_output(second, Duration::from_secs(20) * slow());
    assert_eq!(status.code(), Some(1), "a second agent must refuse to run: {err}");
    assert!(
        err.contains("another ioasid-agent is running") && err.contains(&format!("pid {}", first.pid())),
        "{err}"
    );
    let status = Command::new(agent_path()).args(["status", "--json"]).output().unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    first.signal(libc::SIGKILL);
    let killed = eventually(Duration::from_secs(5), || first.try_exit());
    assert!(killed.is_some(), "the first agent did not die");
    let mut third = Agent::start(&["--dry-run", "--lock-file", &lock("c.lock")]);
    assert!(third.stop().success(), "{}", third.log());
}

/// Waits for `child` (stderr piped) with a deadline; kills it if it is still running.
fn wait_output(mut child: std::process::Child, limit: Duration) -> (std::process::ExitStatus, String) {
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("still running after {limit:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// An agent killed (SIGKILL: no shutdown of its own) while two VMMs, `PREFIX-gpu-1` and
/// `PREFIX-tenant-1`, are stopped for its decision (their events dropped, so the agent dies
/// before its own recovery would decide): what the next agent inherits. `policy` is the policy
/// text; `before` runs on the first agent before the VMMs ask.
struct Crashed {
    state: StateDir,
    _policy: TempDir,
    policy: std::path::PathBuf,
    allowed: String,
    denied: String,
    ga: std::process::Child,
    gd: std::process::Child,
}

impl Crashed {
    fn new<T>(prefix: &str, policy: &str, before: impl FnOnce(&Agent) -> T) -> (Self, T) {
        let state = StateDir::new();
        let dir = TempDir::new("policy");
        let path = dir.path("policy.yaml");
        write(&path, policy);
        let mut first = Agent::start(&[
            "--policy",
            path.to_str().unwrap(),
            "--state-dir",
            state.arg(),
            "--test-drop-events",
        ]);
        let seen = before(&first);
        let (allowed, denied) = (format!("{prefix}-gpu-1"), format!("{prefix}-tenant-1"));
        let ga = guest(&["--name", &allowed, "--file-add", "--hold", "0.2"]);
        let gd = guest(&["--name", &denied, "--file-add", "--hold", "0.2"]);
        let (pa, pd) = (ga.id(), gd.id());
        let stopped = eventually(Duration::from_secs(2), || {
            (proc_state(pa)? == 'T' && proc_state(pd)? == 'T').then_some(())
        });
        first.signal(libc::SIGKILL);
        assert!(stopped.is_some(), "the VMMs were not stopped for a decision");
        assert!(eventually(Duration::from_secs(5), || first.try_exit()).is_some(), "the agent did not die");
        assert!(first.audit().iter().all(|r| r["vm"] != allowed.as_str() && r["vm"] != denied.as_str()));
        (Self { state, _policy: dir, policy: path, allowed, denied, ga, gd }, seen)
    }

    /// The next agent, with the same policy and state directory.
    fn next_agent(&self) -> Agent {
        Agent::start(&["--policy", self.policy.to_str().unwrap(), "--state-dir", self.state.arg()])
    }
}

/// An agent killed during stop-and-ask (SIGKILL: no shutdown of its own) leaves its VMMs
/// stopped and its open asks in the pinned kernel state; nothing decides while no agent runs.
/// The next agent with the same state directory adopts the asks and decides each within 1 s of
/// starting (allowed: resumed; denied: killed), audited as adopted; counters the kernel kept
/// continue instead of restarting at 0.
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn a_killed_agents_open_asks_are_decided_by_the_next() {
    require_kernel();
    let _g = serial();
    let prefix = unique("crash");
    let counted = format!("{prefix}-wb");
    // A guest the first agent counts, still running when the next one starts.
    let (c, (wb, before)) = Crashed::new(&prefix, &policy(&prefix), |first| {
        let wb = GuestGuard::spawn(&["--name", &counted, "--wbinvd", "300", "--hold", "60"]);
        let n = eventually(Duration::from_secs(10), || {
            wbinvd_total(&first.scrape(), &counted).filter(|n| *n >= 300.0)
        })
        .expect("the WBINVD guest was not counted");
        (wb, n)
    });
    let Crashed { ref allowed, ref denied, .. } = c;
    let (pa, pd) = (c.ga.id(), c.gd.id());
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        (proc_state(pa), proc_state(pd)),
        (Some('T'), Some('T')),
        "nothing decides while no agent runs"
    );

    let second = c.next_agent();
    let ready = std::time::Instant::now();
    let decided = eventually(Duration::from_secs(5), || {
        (proc_state(pa) != Some('T') && proc_state(pd) != Some('T')).then_some(())
    });
    assert!(decided.is_some(), "the adopted asks were not decided:\n{}", second.log());
    let took = ready.elapsed();
    assert!(took < Duration::from_secs(1) * slow(), "decided {took:?} after the agent was ready");
    let (status, summary, err) = finish(c.ga);
    assert!(status.success(), "the allowed VMM must be resumed: {err}");
    assert_eq!(summary["file_add_errno"], 22);
    let (status, _, _) = finish(c.gd);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    for (vm, decision, outcome) in
        [(denied, Decision::Denied, Outcome::Killed), (allowed, Decision::Allowed, Outcome::Resumed)]
    {
        let r = second.wait_record(vm);
        assert_eq!((r.decision, r.outcome), (decision, outcome), "{r:?}");
        assert!(r.reason.as_deref().unwrap_or("").contains("before this agent started"), "{r:?}");
    }
    let after = wbinvd_total(&second.scrape(), &counted);
    assert!(after.is_some_and(|n| n >= before), "counted {before} before the restart, {after:?} after");
    drop(wb);
}

/// What asked is what gets signalled, or nothing: two VMMs stopped for a decision die while no
/// agent runs. One (allowed) is a zombie its parent has not reaped; the other's (denied) pid is
/// taken by an innocent process. The next agent adopts both asks: it resumes no zombie, kills
/// no innocent process, and audits both `gone`.
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn a_dead_askers_pid_is_never_signalled() {
    require_kernel();
    let _g = serial();
    let prefix = unique("reuse");
    // Deny by default, as the issue's host: a decision for the pid's new process would kill it.
    let policy = format!("default:\n  incoherent_dma: deny\nrules:\n  - name: gpu\n    match: {{ vm: \"{prefix}-gpu-*\" }}\n    incoherent_dma: allow\n");
    let (mut c, ()) = Crashed::new(&prefix, &policy, |_| ());
    let (pa, pd) = (c.ga.id(), c.gd.id());
    // Both killed by someone else while stopped; the denied one is reaped and its pid reused.
    c.ga.kill().unwrap();
    c.gd.kill().unwrap();
    assert_eq!(c.gd.wait().unwrap().signal(), Some(libc::SIGKILL));
    assert!(eventually(Duration::from_secs(2), || (proc_state(pa)? == 'Z').then_some(())).is_some());
    let sleep = || std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let mut innocent = spawn_on_pid(pd, sleep).expect("no process could be started on the dead VMM's pid");

    let second = c.next_agent();
    // Neither can be read any more (a zombie's command line is empty, the other pid shows the
    // innocent process), and the previous agent that named them is gone: each is known by its
    // pid, never by what holds the pid now.
    for (pid, why) in [(pa, "zombie"), (pd, "started after the request")] {
        let r = second.wait_record(&format!("unknown:{pid}"));
        assert_eq!(r.outcome, Outcome::Gone, "{r:?}");
        assert!(r.reason.as_deref().unwrap_or("").contains(why), "{r:?}");
    }
    assert!(second.audit().iter().all(|r| r["comm"] != "sleep"), "{:?}", second.audit());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(innocent.try_wait().unwrap(), None, "the innocent process on the reused pid was signalled");
    assert_eq!(proc_state(pd), Some('S'), "the innocent process was stopped or killed");
    let _ = innocent.kill();
    let _ = innocent.wait();
    let _ = c.ga.wait();
}

/// `--audit-log -`: records go to stdout (container log pipelines), one JSON object per line
/// with its schema and unique id; the agent's own log stays on stderr.
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn audit_records_to_stdout() {
    use std::io::BufRead;
    require_kernel();
    let _g = serial();
    let prefix = unique("stdout");
    let dir = TempDir::new("stdout");
    let path = dir.path("policy.yaml");
    write(&path, &policy(&prefix));
    let ready = dir.path("ready");
    let state = StateDir::new();
    let mut agent = Command::new(agent_path())
        .args(["run", "--listen", "127.0.0.1:0", "--audit-log", "-", "--policy", path.to_str().unwrap()])
        .args(["--state-dir", state.arg(), "--ready-file", ready.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(30), || std::fs::read_to_string(&ready)
        .ok()
        .filter(|a| !a.is_empty()))
    .is_some());
    let vm = format!("{prefix}-gpu-1");
    let (status, _, err) = file_add(&vm, "0");
    assert!(status.success(), "{err}");
    let mut lines = std::io::BufReader::new(agent.stdout.take().unwrap()).lines();
    let line = lines.next().expect("a record on stdout").unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let _ = agent.wait();
    let r: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(
        (r["schema"].as_u64(), r["vm"].as_str(), r["decision"].as_str()),
        (Some(1), Some(vm.as_str()), Some("allowed")),
        "{r}"
    );
    assert!(r["id"].as_str().is_some_and(|id| id.ends_with("-1")), "{r}");
}

/// `--audit-syslog SOCKET`: every record also reaches a real syslog daemon (rsyslog, from
/// Debian: `cargo xtask setup` installs it) as an RFC 5424 message it parses as such: facility
/// authpriv, warning for a denial, APP-NAME ioasid-agent, MSGID the record's event, the JSON
/// record (schema, id) as the message.
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn audit_records_reach_a_real_syslog_daemon() {
    require_kernel();
    let _g = serial();
    let dir = TempDir::new("syslog");
    let (sock, out, pid) = (dir.path("log.sock"), dir.path("out.log"), dir.path("rsyslogd.pid"));
    let conf = dir.path("rsyslog.conf");
    write(
        &conf,
        &format!(
            "global(workDirectory=\"{d}\")\nmodule(load=\"imuxsock\" SysSock.Use=\"off\")\n\
             input(type=\"imuxsock\" Socket=\"{s}\" UseSpecialParser=\"off\" ParseHostname=\"on\")\n\
             *.* action(type=\"omfile\" file=\"{o}\" template=\"RSYSLOG_SyslogProtocol23Format\")\n",
            d = dir.0.display(),
            s = sock.display(),
            o = out.display()
        ),
    );
    let mut rsyslogd = Command::new("rsyslogd")
        .args(["-n", "-f", conf.to_str().unwrap(), "-i", pid.to_str().unwrap()])
        .spawn()
        .expect("rsyslogd (Debian package rsyslog; `cargo xtask setup` installs it)");
    assert!(
        eventually(Duration::from_secs(10), || sock.exists().then_some(())).is_some(),
        "rsyslogd made no socket"
    );
    let prefix = unique("syslog");
    let (agent, _policy) = agent_with_policy(&prefix, &["--audit-syslog", sock.to_str().unwrap()]);
    let vm = format!("{prefix}-tenant-1");
    let (status, _, _) = file_add(&vm, "0");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    let ours = agent.wait_audit(&vm);
    let line = eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(&out).ok()?.lines().find(|l| l.contains(&vm)).map(str::to_string)
    });
    let _ = rsyslogd.kill();
    let _ = rsyslogd.wait();
    let line = line.unwrap_or_else(|| {
        panic!("rsyslog got no record for {vm}:\n{}", std::fs::read_to_string(&out).unwrap_or_default())
    });
    eprintln!("rsyslog's copy: {line}");
    // <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG, as rsyslog parsed and re-wrote it.
    let fields: Vec<&str> = line.splitn(8, ' ').collect();
    assert_eq!(fields[0], "<84>1", "authpriv.warning for a denial: {line}");
    assert_eq!(
        (fields[3], fields[4], fields[5], fields[6]),
        ("ioasid-agent", agent.pid().to_string().as_str(), "incoherent-dma", "-"),
        "{line}"
    );
    let msg: serde_json::Value = serde_json::from_str(fields[7]).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(
        (msg["schema"].as_u64(), msg["decision"].as_str(), msg["vm"].as_str()),
        (Some(1), Some("denied"), Some(vm.as_str()))
    );
    assert_eq!(msg["id"], ours["id"], "the same record as the audit log's");
}

/// Audit -> learn -> review -> enforce, on a real audit log: an agent with the embedded default
/// policy audits two VMMs' enables; `policy learn` writes a policy from that log which `policy
/// check` accepts and under which `replay` of the same log decides nothing differently, while a
/// VM it never saw is denied.
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn a_learned_policy_replays_what_ran_and_denies_the_rest() {
    require_kernel();
    let _g = serial();
    let prefix = unique("learn");
    let mut agent = Agent::start(&[]);
    for vm in ["gpu-1", "gpu-2"] {
        let (status, _, err) = file_add(&format!("{prefix}-{vm}"), "0");
        assert!(status.success(), "{err}");
        let r = agent.wait_record(&format!("{prefix}-{vm}"));
        assert_eq!(r.decision, Decision::Audited, "{r:?}");
    }
    assert!(agent.stop().success());
    let log = agent.dir.path("audit.jsonl");
    let learned = agent.dir.path("learned.yaml");
    let run = |args: &[&str]| {
        let out = Command::new(agent_path()).args(args).output().unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{args:?}: {text}");
        text
    };
    run(&["policy", "learn", log.to_str().unwrap(), "--out", learned.to_str().unwrap()]);
    let yaml = std::fs::read_to_string(&learned).unwrap();
    let policy = learned_policy(&yaml);
    assert!(
        policy.rules.iter().any(|r| r.matcher.vm.as_deref() == Some(&format!("{prefix}-gpu-*")))
            && policy.default.incoherent_dma == Action::Deny,
        "{yaml}"
    );
    assert!(run(&["policy", "check", learned.to_str().unwrap()]).contains("valid: 1 rule(s)"));
    let replay = run(&["replay", log.to_str().unwrap(), "--policy", learned.to_str().unwrap()]);
    assert!(
        replay.contains("2 request(s) evaluated") && replay.contains("0 decided differently"),
        "{replay}"
    );
    // A VM it never saw, under the learned policy: denied.
    let agent2 = Agent::start(&["--policy", learned.to_str().unwrap()]);
    let stranger = format!("{prefix}-tenant-1");
    let (status, _, _) = file_add(&stranger, "0");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert_eq!(agent2.wait_record(&stranger).decision, Decision::Denied);
}

/// Learning live: `policy learn --follow` watches the audit log a running agent writes, across
/// a rotation, and learns from every enable it saw, before and during the watch.
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn learning_live_follows_the_log_across_a_rotation() {
    require_kernel();
    let _g = serial();
    let prefix = unique("follow");
    let agent = Agent::start(&[]);
    let log = agent.dir.path("audit.jsonl");
    let rotated = agent.dir.path("audit.jsonl.1");
    let learned = agent.dir.path("learned.yaml");
    let (status, _, err) = file_add(&format!("{prefix}-gpu-1"), "0");
    assert!(status.success(), "{err}");
    agent.wait_audit(&format!("{prefix}-gpu-1"));
    let watcher = Command::new(agent_path())
        .args([
            "policy",
            "learn",
            log.to_str().unwrap(),
            "--follow",
            "4s",
            "--out",
            learned.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // Rotated away mid-watch (as logrotate does); the agent reopens the path by itself.
    std::fs::rename(&log, &rotated).unwrap();
    for vm in ["gpu-2", "gpu-3"] {
        let (status, _, err) = file_add(&format!("{prefix}-{vm}"), "0");
        assert!(status.success(), "{err}");
    }
    let all_logged = eventually(Duration::from_secs(3), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default()
            + &std::fs::read_to_string(&rotated).unwrap_or_default();
        (text.contains(&format!("{prefix}-gpu-2")) && text.contains(&format!("{prefix}-gpu-3"))).then_some(())
    });
    assert!(all_logged.is_some(), "{}", agent.log());
    let out = watcher.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("learned from 3 enables"), "one before the watch, two during it: {text}");
    let yaml = std::fs::read_to_string(&learned).unwrap();
    let policy = learned_policy(&yaml);
    assert!(
        policy.rules.iter().any(|r| r.matcher.vm.as_deref() == Some(&format!("{prefix}-gpu-*"))),
        "{yaml}"
    );
}

/// A learned policy file, read with the agent's own policy file types.
fn learned_policy(yaml: &str) -> PolicyFile {
    serde_norway::from_str(yaml).unwrap_or_else(|e| panic!("{e}: {yaml}"))
}

/// A policy file replaced by a FIFO: the once-a-second change check must not wait on it (open(2)
/// of a FIFO waits for a writer). Before the fix the event loop stopped there, every VMM that
/// asked stayed stopped and /healthz failed; now the FIFO is not a policy, the last good one
/// stays in force and a VMM that asks is decided at once.
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn a_policy_file_replaced_by_a_fifo_blocks_nothing() {
    require_kernel();
    let _g = serial();
    let prefix = unique("fifo");
    let (agent, dir) = agent_with_policy(&prefix, &[]);
    let path = dir.path("policy.yaml");
    std::fs::remove_file(&path).unwrap();
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // Two change checks (once a second) see the FIFO.
    std::thread::sleep(Duration::from_millis(2500));
    let tenant = format!("{prefix}-tenant-1");
    let started = std::time::Instant::now();
    // Killed by the guard if the test fails: a VMM the agent never decides stays stopped.
    let g = GuestGuard::spawn(&["--name", &format!("guest={tenant},debug-threads=on"), "--file-add"]);
    let r = agent.wait_record(&tenant);
    let (status, summary, err) = g.finish();
    assert_eq!((r.decision, r.rule.as_str()), (Decision::Denied, "everyone-else-untrusted"), "{r:?}");
    assert_denied_as_recorded(&r, status, &summary, &err);
    assert!(started.elapsed() < Duration::from_secs(5) * slow(), "decided in {:?}", started.elapsed());
    assert_eq!(http_get(&agent.addr, "/healthz"), "ok\n");
}

/// A free TCP port on the loopback (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `ioasid-agent probe live|ready --addr A`: exit code and output.
fn probe(what: &str, addr: &str) -> (i32, String) {
    let out =
        Command::new(agent_path()).args(["probe", what, "--addr", addr, "--timeout", "1s"]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Scrapers flood the metrics listener: 32 keep-alive connections pipelining /metrics as fast as
/// the agent answers. Every VMM asked about is still decided, and every probe of the probe
/// listener answered; the decision time with and without the flood is printed (measured side by
/// side: `cargo xtask bench` is where ratios are judged).
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn decisions_and_probes_hold_under_a_scrape_flood() {
    require_kernel();
    let _g = serial();
    let probes = format!("127.0.0.1:{}", free_port());
    let agent = Agent::start(&["--probe-listen", &probes]);
    assert_eq!(probe("live", &probes), (0, "/healthz: ok\n".to_string()));
    assert_eq!(probe("ready", &probes).0, 0);
    let prefix = unique("flood");
    let decide = |tag: &str| -> Vec<f64> {
        (0..8)
            .map(|i| {
                let t = std::time::Instant::now();
                let (status, _, err) =
                    finish(guest(&["--name", &format!("{prefix}-{tag}-{i}"), "--file-add"]));
                assert!(status.success(), "{err}");
                t.elapsed().as_secs_f64()
            })
            .collect()
    };
    let quiet = decide("quiet");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // From four addresses, 8 connections each: all 32 admitted (the agent keeps 8 per peer).
    let scrapers: Vec<_> = (0..32u8)
        .map(|i| {
            let (addr, stop, scraped) = (agent.addr.parse().unwrap(), stop.clone(), scraped.clone());
            std::thread::spawn(move || {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async move {
                    let from = std::net::SocketAddr::from(([127, 0, 0, 1 + i % 4], 0));
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let sock = tokio::net::TcpSocket::new_v4().unwrap();
                        sock.bind(from).unwrap();
                        let Ok(mut s) = sock.connect(addr).await else { continue };
                        // Four requests pipelined per write, on one kept-alive connection.
                        let req = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(4);
                        let mut buf = vec![0u8; 1 << 16];
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            if s.write_all(req.as_bytes()).await.is_err() {
                                break;
                            }
                            let read = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
                            match read {
                                Ok(Ok(n)) if n > 0 => {
                                    scraped.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                                }
                                _ => break,
                            };
                        }
                    }
                })
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let flooded = decide("flooded");
    let answered = (0..20).filter(|_| probe("live", &probes).0 == 0).count();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in scrapers {
        s.join().unwrap();
    }
    assert_eq!(answered, 20, "probes answered during the flood");
    let scrapes = scraped.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{scrapes} scrape reads during the flood");
    assert!(scrapes > 100, "the flood did not scrape");
    let records = agent.audit();
    let decided = records.iter().filter(|r| r["vm"].as_str().is_some_and(|v| v.starts_with(&prefix))).count();
    assert_eq!(decided, 16, "every enable decided and audited");
    let p50 = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (q, f) = (p50(quiet), p50(flooded));
    eprintln!(
        "a guest's life with its decision, p50: {q:.4} s quiet, {f:.4} s under the scrape flood ({:.2}x)",
        f / q
    );
    // Nothing answers after the agent stops: the probe says so, with an error.
    drop(agent);
    let (code, text) = probe("live", &probes);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("connecting to the agent"), "{text}");
}

/// Anyone with /dev/kvm floods: one VMM issues 20,000 FILE_ADDs in a burst while three others
/// are denied. Every denial has its record; the flood's records past its burst are counted into
/// `incoherent-dma-aggregated` records, none dropped.
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn a_flood_of_enables_never_pushes_out_another_vms_record() {
    require_kernel();
    let _g = serial();
    let prefix = unique("flood-add");
    let (agent, _policy) = agent_with_policy(&prefix, &[]);
    let flooder = format!("{prefix}-noisy");
    // Classified before it floods: each FILE_ADD is then judged in the kernel (audit).
    let flood =
        guest(&["--name", &flooder, "--file-add", "--file-add-delay", "0.3", "--file-add-repeat", "20000"]);
    std::thread::sleep(Duration::from_millis(250));
    let tenants: Vec<String> = (0..3).map(|i| format!("{prefix}-tenant-{i}")).collect();
    let denied: Vec<_> =
        tenants.iter().map(|t| guest(&["--name", t, "--file-add", "--file-add-delay", "0.1"])).collect();
    let (status, summary, err) = finish(flood);
    assert!(status.success(), "{err}");
    assert_eq!(summary["file_add_errno"], 22);
    for d in denied {
        let _ = finish(d);
    }
    for t in &tenants {
        let r = agent.wait_record(t);
        assert_eq!(r.decision, Decision::Denied, "{r:?}");
    }
    // The flood: its burst one by one, the rest counted in aggregated records.
    let counted = eventually(Duration::from_secs(5), || {
        let recs = agent.audit();
        let one_by_one =
            recs.iter().filter(|r| r["vm"] == flooder.as_str() && r["event"] == "incoherent-dma").count();
        let aggregated: u64 = recs
            .iter()
            .filter(|r| r["vm"] == flooder.as_str() && r["event"] == "incoherent-dma-aggregated")
            .map(|r| r["count"].as_u64().unwrap())
            .sum();
        // Written once a second: wait for every aggregated count to be in a record.
        let m = agent.scrape();
        let total = sample(&m, "ioasid_audit_records_aggregated_total", &[]).unwrap_or(0.0);
        (aggregated > 0 && aggregated as f64 == total).then_some((one_by_one, aggregated, m))
    });
    let (one_by_one, aggregated, m) = counted.expect("the flood's aggregated records were not written");
    let dropped: f64 = ["file", "syslog"]
        .iter()
        .filter_map(|s| sample(&m, "ioasid_audit_records_dropped_total", &[("sink", s)]))
        .sum();
    let events_dropped = sample(&m, "ioasid_events_dropped_total", &[]).unwrap_or(0.0);
    eprintln!("flood of 20000 FILE_ADDs: {one_by_one} records one by one, {aggregated} aggregated, {events_dropped} events dropped in the kernel, {dropped} records dropped");
    assert_eq!(dropped, 0.0, "no audit record dropped:\n{m}");
    assert!(one_by_one <= 200, "the flood was not aggregated: {one_by_one} records one by one");
    // Every FILE_ADD of the flood is in a record, counted, unless the kernel's ring dropped its
    // event (counted too).
    assert!(
        one_by_one as f64 + aggregated as f64 + events_dropped >= 20_000.0,
        "{one_by_one} + {aggregated} + {events_dropped}"
    );
}

/// An upgrade that changes the map layout, from an agent that pinned its asks inside its layout
/// directory: the agent is killed while two VMMs wait for their decision; its pins are left as
/// such an agent leaves them (`maps-<another layout>/IOASID_ASKED`). The next agent cannot adopt
/// that layout and removes it, but carries the asks over (`asked-v1`) and decides both.
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn open_asks_survive_a_map_layout_change() {
    require_kernel();
    let _g = serial();
    let prefix = unique("layout");
    let (c, ()) = Crashed::new(&prefix, &policy(&prefix), |_| ());
    let Crashed { ref state, ref allowed, ref denied, .. } = c;
    let (pa, pd) = (c.ga.id(), c.gd.id());
    // As an agent of another layout, from before asked-v1, leaves its state.
    let layout = std::fs::read_dir(&state.0)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("maps-"))
        .expect("no layout directory");
    let other = state.0.join("maps-0000000000000000");
    std::fs::rename(&layout, &other).unwrap();
    std::fs::rename(state.0.join("asked-v1"), other.join("IOASID_ASKED")).unwrap();

    let second = c.next_agent();
    let decided = eventually(Duration::from_secs(5), || {
        (proc_state(pa) != Some('T') && proc_state(pd) != Some('T')).then_some(())
    });
    assert!(decided.is_some(), "the asks did not survive the layout change:\n{}", second.log());
    assert!(!other.exists(), "the other layout's pins were not removed");
    let (status, _, err) = finish(c.ga);
    assert!(status.success(), "the allowed VMM must be resumed: {err}");
    let (status, _, _) = finish(c.gd);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    for (vm, decision, outcome) in
        [(denied, Decision::Denied, Outcome::Killed), (allowed, Decision::Allowed, Outcome::Resumed)]
    {
        let r = second.wait_record(vm);
        assert_eq!((r.decision, r.outcome), (decision, outcome), "{r:?}");
    }
    assert!(second.log().contains("open asks carried over"), "{}", second.log());
}

/// A VMM denied its enable is killed with every process sharing its address space: a sibling
/// it created with CLONE_VM (not a thread) before the FILE_ADD, running a vCPU of the same VM,
/// would otherwise go on running it, incoherent DMA and all (KVM serves any process of the
/// VM's mm). Found with kcmp(2) while the VMM is stopped for the decision, killed through a
/// pidfd each, named in the record.
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn a_denied_vmms_clone_vm_sibling_dies_with_it() {
    require_kernel();
    let _g = serial();
    let prefix = unique("sibling");
    let (agent, policy) = agent_with_policy(&prefix, &[]);
    let tenant = format!("{prefix}-tenant-1");
    let pidfile = policy.path("sibling.pid");
    let mut g = Command::new(guest_path())
        .args(["--name", &tenant, "--file-add", "--file-add-delay", "0.2", "--clone-vm-sibling"])
        .arg(&pidfile)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = g.wait().unwrap();
    let sibling: u32 = std::fs::read_to_string(&pidfile).expect("no sibling started").trim().parse().unwrap();
    let gone =
        eventually(Duration::from_secs(3), || matches!(proc_state(sibling), None | Some('Z')).then_some(()));
    if gone.is_none() {
        // SAFETY: kill(2) of the test's own grandchild, left running by the failure.
        unsafe { libc::kill(sibling as i32, libc::SIGKILL) };
        panic!("the CLONE_VM sibling {sibling} kept running the VM:\n{}", agent.log());
    }
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    let r = agent.wait_record(&tenant);
    assert_eq!((r.decision, r.outcome), (Decision::Denied, Outcome::Killed), "{r:?}");
    let reason = r.reason.clone().unwrap_or_default();
    assert!(reason.contains("sharing its address space") && reason.contains(&sibling.to_string()), "{r:?}");
}
