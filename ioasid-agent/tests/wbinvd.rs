//! Kernel tests: WBINVD/INVD accounting with real programs and real KVM guests.
//!
//! Kernels covered: this machine's (`cargo xtask test`) and the lab's Debian kernels
//! (`cargo xtask lab`; which test runs on which kernel: docs/testing.md); each test asks the
//! kernel what it provides (hooks, enforcement mechanism, the path KVM takes for WBINVD) and
//! asserts the outcome for it.

mod support;

use std::{os::unix::process::ExitStatusExt, process::Command, time::Duration};

use ioasid_agent::engine::record::Decision;
use support::*;

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn status_reports_every_hook() {
    require_kernel();
    let _g = serial();
    let out = Command::new(agent_path()).args(["status", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hooks = v["hooks"].as_array().unwrap();
    // One row per hook of the table, in the table's order.
    let table = ioasid_common::hooks::HOOKS;
    let labels: Vec<&str> = hooks.iter().map(|h| h["hook"].as_str().unwrap()).collect();
    assert_eq!(labels, table.iter().map(|h| h.hook).collect::<Vec<_>>());
    for h in hooks {
        let attached = h["attached"].as_bool().unwrap();
        // Required unless another hook does its work (the exit tracepoints where KVM's
        // handlers count).
        if h["optional"] == false && h["standby"] == false && h["refusal"]["kind"] != "unneeded" {
            assert!(attached, "required hook not attached: {h}");
        }
        if !attached {
            // A refusal or a standby always says why.
            assert!(h["reason"].as_str().is_some_and(|r| !r.is_empty()), "{h}");
        }
    }
    // Exactly one program family serves the ioctl path: the LSM where BPF LSM and trampolines
    // load (then no syscall tracepoint at all), else one program of each syscall pair (tp_btf
    // preferred where it loads).
    let attached = |n: &str| hooks.iter().any(|h| h["hook"] == n && h["attached"] == true);
    let syscall = [
        "tp_btf/sys_enter",
        "tp_btf/sys_exit",
        "tracepoint/syscalls/sys_enter_ioctl",
        "tracepoint/syscalls/sys_exit_ioctl",
    ];
    if v["ioctl_hooks"] == "functions" {
        for n in ioasid_common::hooks::FUNCTION_IOCTL_CORE {
            assert!(attached(n), "{n}: {v}");
        }
        assert!(syscall.iter().all(|n| !attached(n)), "no syscall tracepoint on the functions path: {v}");
    } else if v["ioctl_hooks"] == "lsm" {
        assert!(attached("lsm/file_ioctl") && attached("fexit/kvm_vfio_set_attr"), "{v}");
        assert!(syscall.iter().all(|n| !attached(n)), "no syscall tracepoint on the LSM path: {v}");
    } else {
        for pair in [[syscall[0], syscall[2]], [syscall[1], syscall[3]]] {
            let serving = pair.iter().filter(|n| attached(n)).count();
            assert_eq!(serving, 1, "{pair:?}: {hooks:?}");
        }
    }
    for (h, spec) in hooks.iter().zip(table) {
        assert_eq!(
            (h["optional"].as_bool(), h["purpose"].as_str()),
            (Some(spec.optional), Some(spec.purpose))
        );
    }
    let mech = v["enforcement_mechanism"].as_str().unwrap();
    let lsm = v["serving"]["lsm-ioctl"].is_string();
    assert_eq!(mech, if lsm { "lsm" } else { "sigkill" });
    // Each group of alternatives: at most one serves, and `serving` names it.
    let mut groups: Vec<&str> = table.iter().filter_map(|h| h.group).collect();
    groups.dedup();
    for g in groups {
        let members: Vec<&serde_json::Value> =
            hooks.iter().zip(table).filter(|(_, spec)| spec.group == Some(g)).map(|(h, _)| h).collect();
        let on: Vec<&str> =
            members.iter().filter(|h| h["attached"] == true).map(|h| h["hook"].as_str().unwrap()).collect();
        assert!(on.len() <= 1, "{g}: {on:?} all attached");
        assert_eq!(v["serving"][g].as_str(), on.first().copied(), "{g}: {v}");
    }

    // The table text form names the same hooks, one line each.
    let out = Command::new(agent_path()).arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let rows =
        text.lines().filter(|l| [" attached ", " refused ", " standby "].iter().any(|w| l.contains(w)));
    assert_eq!(rows.count(), hooks.len(), "{text}");
    // Forcing the classic tracepoints puts them in service.
    let out = Command::new(agent_path())
        .args(["status", "--json", "--ioctl-hooks", "tracepoint"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hooks = v["hooks"].as_array().unwrap();
    let classic = hooks.iter().find(|h| h["hook"] == "tracepoint/syscalls/sys_enter_ioctl").unwrap();
    assert_eq!(classic["attached"], true);
}

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn exact_counts_for_two_guests_at_once() {
    require_kernel();
    let _g = serial();
    let agent = Agent::start(&[]);
    let (a, b) = (unique("alpha"), unique("beta"));
    // Two VMs at once, different counts; each holds a moment so the agent sees it alive.
    let ga = guest(&[
        "--name",
        &format!("guest={a},debug-threads=on"),
        "--wbinvd",
        "25000",
        "--invd",
        "111",
        "--hold",
        "0.5",
    ]);
    let gb = guest(&["--name", &b, "--wbinvd", "3333", "--invd", "7", "--hold", "0.5"]);
    for g in [ga, gb] {
        let (status, summary, err) = finish(g);
        assert!(status.success(), "guest failed: {err}");
        assert!(summary["wbinvd"].as_u64().is_some(), "{summary}");
    }
    let m = agent.scrape();
    // This kernel emulates real-mode guests fully, so they arrive on the emulated path; a
    // hardware-exit guest is counted on `exit` by the same program family.
    let total = |fam: &str, vm: &str| {
        ["exit", "emulated"]
            .iter()
            .map(|p| sample(&m, fam, &[("vm", vm), ("path", p)]).unwrap_or(0.0))
            .sum::<f64>()
    };
    assert_eq!(total("ioasid_wbinvd_exits_total", &a), 25000.0, "{m}");
    assert_eq!(total("ioasid_invd_exits_total", &a), 111.0, "{m}");
    assert_eq!(total("ioasid_wbinvd_exits_total", &b), 3333.0, "{m}");
    assert_eq!(total("ioasid_invd_exits_total", &b), 7.0, "{m}");
    assert_eq!(sample(&m, "ioasid_events_dropped_total", &[]), Some(0.0));
    assert_eq!(sample(&m, "ioasid_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0));
    // The exit tracepoint runs only where KVM's handlers cannot count (this development
    // kernel: no trampolines); where they can, nothing runs on every VM exit.
    let tracepoints = sample(&m, "ioasid_wbinvd_count_source", &[("source", "tracepoints")]);
    let handlers = sample(&m, "ioasid_wbinvd_count_source", &[("source", "handlers")]);
    assert_eq!(tracepoints.zip(handlers).map(|(t, h)| t + h), Some(1.0), "{m}");
    assert_eq!(
        sample(&m, "ioasid_hook_attached", &[("hook", "tracepoint/kvm/kvm_exit")]),
        tracepoints,
        "{m}"
    );
    assert!(sample(&m, "ioasid_hook_attached", &[("hook", "fexit/kvm_emulate_wbinvd")]).is_some());
    // Every attached program's skipped runs are exported (the kernel counts them always).
    assert!(m.lines().any(|l| l.starts_with("ioasid_program_misses_total{")), "{m}");
    assert_eq!(sample(&m, "ioasid_kernel_errors_total", &[("kind", "read_error")]), Some(0.0));
    assert_eq!(sample(&m, "ioasid_kernel_errors_total", &[("kind", "counter_map_full")]), Some(0.0));
}

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn a_second_agent_refuses_to_start() {
    require_kernel();
    let _g = serial();
    let _agent = Agent::start(&[]);
    let out = Command::new(agent_path())
        .args(["run", "--listen", "127.0.0.1:0", "--audit-log", "/dev/null"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("another ioasid-agent") && err.contains(&_agent.pid().to_string()), "{err}");
}

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn a_guest_without_a_name_is_named_by_comm_and_pid() {
    require_kernel();
    let _g = serial();
    let agent = Agent::start(&[]);
    let g = guest(&["--wbinvd", "42", "--hold", "0.5"]);
    let pid = g.id();
    let (status, _, err) = finish(g);
    assert!(status.success(), "{err}");
    let vm = format!("ioasid-guest:{pid}");
    let m = agent.scrape();
    assert_eq!(wbinvd_total(&m, &vm), Some(42.0), "{m}");
}

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn exited_vms_are_kept_for_the_retention_then_dropped() {
    require_kernel();
    let _g = serial();
    let agent = Agent::start(&["--vm-retention", "1500ms"]);
    let name = unique("retained");
    let (status, _, err) = finish(guest(&["--name", &name, "--wbinvd", "10", "--hold", "0.4"]));
    assert!(status.success(), "{err}");
    let m = agent.scrape();
    assert_eq!(wbinvd_total(&m, &name), Some(10.0), "kept after exit:\n{m}");
    let gone = eventually(Duration::from_secs(5), || {
        sample(&agent.scrape(), "ioasid_wbinvd_exits_total", &[("vm", &name)]).is_none().then_some(())
    });
    assert!(gone.is_some(), "still reported after the retention:\n{}", agent.scrape());
}

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn the_host_totals_keep_the_counts_of_forgotten_vms() {
    require_kernel();
    let _g = serial();
    // Churn: short-lived VMs, each forgotten a second after it exits.
    let agent = Agent::start(&["--vm-retention", "1s"]);
    let names: Vec<String> = (0..6).map(|i| unique(&format!("churn-{i}"))).collect();
    let mut pids = Vec::new();
    for name in &names {
        let g = guest(&["--name", name, "--wbinvd", "10", "--invd", "2", "--hold", "0.1"]);
        pids.push(g.id());
        let (status, _, err) = finish(g);
        assert!(status.success(), "{err}");
    }
    let host = |m: &str, name: &str| {
        ["exit", "emulated"].iter().map(|p| sample(m, name, &[("path", p)]).unwrap_or(0.0)).sum::<f64>()
    };
    let forgotten = eventually(Duration::from_secs(8), || {
        let m = agent.scrape();
        names.iter().all(|n| sample(&m, "ioasid_wbinvd_exits_total", &[("vm", n)]).is_none()).then_some(m)
    });
    let m = forgotten.unwrap_or_else(|| panic!("per-VM series kept past the retention:\n{}", agent.scrape()));
    assert_eq!(host(&m, "ioasid_host_wbinvd_exits_total"), 60.0, "every WBINVD of the forgotten VMs:\n{m}");
    assert_eq!(host(&m, "ioasid_host_invd_exits_total"), 12.0, "every INVD of the forgotten VMs:\n{m}");
    assert_eq!(sample(&m, "ioasid_host_wbinvd_flushes_total", &[]), Some(0.0), "no VM had non-coherent DMA");
    // The programs keep a thread's WBINVD timing entry between its WBINVDs; a forgotten VM's
    // are removed with it, so the map does not fill with the threads of VMs long gone.
    let left = pending_entries(&pids);
    assert!(left.is_empty(), "timing entries of forgotten VMs' threads (tid, tgid): {left:?}");
}

/// The kernel's WBINVD timing entries (thread id, process) of the processes `pids`, read from
/// the one agent's `IOASID_PENDING` map (tests run one agent at a time).
fn pending_entries(pids: &[u32]) -> Vec<(u32, u32)> {
    use aya::maps::{HashMap, Map, MapData};
    use ioasid_common::{cost::Pending, names::MAP_PENDING};
    let infos = loaded_named(MAP_PENDING);
    assert_eq!(infos.len(), 1, "one agent's {MAP_PENDING} map");
    let data = MapData::from_id(infos[0].id()).expect("opening IOASID_PENDING");
    let map: HashMap<_, u32, Pending> = HashMap::try_from(Map::HashMap(data)).expect("a hash map");
    map.iter()
        .map_while(Result::ok)
        .filter(|(_, p)| pids.contains(&p.tgid))
        .map(|(t, p)| (t, p.tgid))
        .collect()
}

/// The kernel's loaded maps named `name` (tests run one agent at a time: one each).
fn loaded_named(name: &str) -> Vec<aya::maps::MapInfo> {
    aya::maps::loaded_maps().map_while(Result::ok).filter(|m| m.name_as_str() == Some(name)).collect()
}

/// The per-CPU hash maps (counters, WBINVD cost, blast radius) allocate an element when its key
/// first appears where the kernel's BPF allocator serves every program type (6.1 on), and are
/// preallocated before it (5.10, where the verifier warns about run-time allocation from
/// kprobe and tracepoint programs): preallocated, they hold 98,304 elements times 8 bytes per
/// possible CPU. The expectation comes from the kernel's release, not the agent's own test.
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn per_cpu_hashes_are_allocated_on_demand_where_the_kernel_allows() {
    use ioasid_common::names::{MAP_BLAST, MAP_COST, MAP_COUNTERS};
    require_kernel();
    let _g = serial();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let version = std::fs::read_to_string("/proc/sys/kernel/version").unwrap();
    let mut n = release.split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (n.next().unwrap_or(0), n.next().unwrap_or(0));
    let on_demand = (major, minor) >= (6, 1) && !version.contains("PREEMPT_RT");
    let agent = Agent::start(&[]);
    for name in [MAP_COUNTERS, MAP_COST, MAP_BLAST] {
        let flags: Vec<u32> = loaded_named(name).iter().map(|m| m.map_flags()).collect();
        // BPF_F_NO_PREALLOC is 1.
        let want = u32::from(on_demand);
        assert_eq!(
            flags,
            [want],
            "{name} on {}: one agent's map, flags {want}\n{}",
            release.trim(),
            agent.log()
        );
    }
}

#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn exposition_passes_promtool() {
    require_kernel();
    let _g = serial();
    let agent = Agent::start(&[]);
    let (status, _, err) =
        finish(guest(&["--name", &unique("lint"), "--wbinvd", "5", "--invd", "1", "--hold", "0.3"]));
    assert!(status.success(), "{err}");
    // An ordinary fd: the kernel answers EINVAL; the default policy audits and lets it live.
    let (status, summary, err) =
        finish(guest(&["--name", &unique("lint-dma"), "--file-add", "--hold", "0.3"]));
    assert!(status.success(), "{err}");
    assert_eq!(summary["file_add_errno"], libc::EINVAL, "{summary}");
    let text = agent.scrape();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; `cargo xtask setup` installs it)");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let complaints =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && complaints.trim().is_empty(), "promtool: {complaints}\n{text}");
    assert!(text.contains("ioasid_incoherent_dma_requests_total"), "{text}");
}

/// Pid reuse: a VMM started on the pid of a VM that exited within the retention window is a
/// VM of its own (a process is its pid and its start time): its own series, nothing merged into
/// or inherited from the dead VM's. The pid is reused on purpose through ns_last_pid.
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn a_vmm_on_a_reused_pid_is_a_vm_of_its_own() {
    require_kernel();
    let _g = serial();
    let agent = Agent::start(&[]);
    let (first, second) = (unique("pid-first"), unique("pid-second"));
    let g = guest(&["--name", &first, "--wbinvd", "50", "--hold", "0.3"]);
    let pid = g.id();
    let (status, _, err) = finish(g);
    assert!(status.success(), "{err}");
    assert_eq!(wbinvd_total(&agent.scrape(), &first), Some(50.0));
    // Let the agent see the exit (its liveness check runs about once a second).
    std::thread::sleep(Duration::from_millis(1500));
    let reused = spawn_on_pid(pid, || guest(&["--name", &second, "--wbinvd", "70", "--hold", "1.0"]));
    let g = reused.expect("could not start a guest on the exited guest's pid");
    let (status, _, err) = finish(g);
    assert!(status.success(), "{err}");
    let m = agent.scrape();
    assert_eq!(wbinvd_total(&m, &second), Some(70.0), "the new VM counts its own:\n{m}");
    assert_eq!(wbinvd_total(&m, &first), Some(50.0), "the exited VM keeps its own:\n{m}");
}

/// A starting agent finds every VMM (every process holding a KVM VM fd), idle and stopped
/// ones included, before it reports ready: named, with series of their own, and a stopped one
/// reported as such (nothing resumes it behind the operator's back).
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn a_starting_agent_finds_idle_and_stopped_vmms() {
    require_kernel();
    let _g = serial();
    let (idle, stopped) = (unique("idle"), unique("stopped"));
    let gi = GuestGuard::spawn(&["--name", &idle, "--hold", "30"]);
    let gs = GuestGuard::spawn(&["--name", &stopped, "--hold", "30"]);
    let ps = gs.pid();
    // Both have created their VM (and run nothing counted) before the agent starts.
    std::thread::sleep(Duration::from_millis(500) * slow());
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(ps as i32, libc::SIGSTOP) };
    assert!(eventually(Duration::from_secs(2), || (proc_state(ps)? == 'T').then_some(())).is_some());
    let agent = Agent::start(&[]);
    let m = agent.scrape();
    for vm in [&idle, &stopped] {
        let seen = sample(&m, "ioasid_incoherent_dma_requests_total", &[("vm", vm), ("decision", "allowed")]);
        assert_eq!(seen, Some(0.0), "{vm} not found at start:\n{m}");
    }
    assert_eq!(proc_state(ps), Some('T'), "the agent must not resume a VMM it did not stop");
    let log = agent.log();
    assert!(
        log.contains("a VMM is stopped, and not for a decision this agent can read")
            && log.contains(&stopped),
        "{log}"
    );
    drop((gi, gs));
}

/// A VMM gone before the agent could read its /proc is still named from its command line: the
/// kernel captured it when the VMM created its VM. Here the agent never sees an event (as under
/// a flood) and the guest has exited before the first sweep that counts it.
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn a_vmm_gone_before_it_was_read_is_named_from_its_captured_command_line() {
    require_kernel();
    let _g = serial();
    let agent = Agent::start(&["--test-drop-events", "--sweep-interval", "10s"]);
    let name = unique("short-lived");
    let g = guest(&["--name", &format!("guest={name},debug-threads=on"), "--wbinvd", "5"]);
    let pid = g.id();
    let (status, _, err) = finish(g);
    assert!(status.success(), "{err}");
    let m = agent.scrape();
    assert_eq!(wbinvd_total(&m, &name), Some(5.0), "not named from the captured command line:\n{m}");
    assert_eq!(wbinvd_total(&m, &format!("unknown:{pid}")), None, "{m}");
    assert!(agent.log().contains("named from the command line the kernel captured"), "{}", agent.log());
}

/// The kernel keys what it keeps per process by pid *and* start: a process that takes a dead
/// VMM's pid before the agent has seen the death (here: no sweep for 10 s) inherits neither its
/// verdict nor its counts. `gpu-1` is allowed, leaves its verdict in the kernel and exits;
/// `tenant-1`, forked (no exec) onto its pid at once, enables incoherent DMA microseconds after
/// creating its VM: judged by its own rule (deny), not by the allow it would have inherited.
/// `web-1`, on the same pid next, counts its own 70 WBINVD while the kernel still holds
/// `gpu-1`'s 50.
#[test]
#[cfg_attr(not(ioasid_kernel_tests), ignore = "kernel test: needs root, /dev/kvm and the real eBPF object")]
fn a_process_on_a_reused_pid_inherits_no_verdict_and_no_counts() {
    require_kernel();
    let _g = serial();
    let prefix = unique("heir");
    let dir = TempDir::new("heir");
    let path = dir.path("policy.yaml");
    write(
        &path,
        &format!("default:\n  incoherent_dma: audit\nrules:\n  - name: gpu\n    match: {{ vm: \"{prefix}-gpu-*\" }}\n    incoherent_dma: allow\n  - name: tenants\n    match: {{ vm: \"{prefix}-tenant-*\" }}\n    incoherent_dma: deny\n"),
    );
    let agent = Agent::start(&["--policy", path.to_str().unwrap(), "--sweep-interval", "10s"]);
    let (gpu, tenant, web) =
        (format!("{prefix}-gpu-1"), format!("{prefix}-tenant-1"), format!("{prefix}-web-1"));
    // The allowed VMM's verdict is in the kernel once its enable is decided.
    let g = GuestGuard::spawn(&["--name", &gpu, "--file-add", "--wbinvd", "50", "--hold", "60"]);
    let pid = g.pid();
    let r = agent.wait_record(&gpu);
    assert_eq!((r.decision, r.rule.as_str()), (Decision::Allowed, "gpu"), "{r:?}");
    let counted =
        eventually(Duration::from_secs(10), || (wbinvd_total(&agent.scrape(), &gpu)? >= 50.0).then_some(()));
    assert!(counted.is_some(), "{}", agent.scrape());
    drop(g);

    // Forked onto the pid, no exec: nothing but the pid and start tell it from the dead VMM.
    let pid_arg = pid.to_string();
    let (status, summary, err) = finish(guest(&["--fork-onto", &pid_arg, "--name", &tenant, "--file-add"]));
    assert_ne!(status.code(), Some(3), "no guest on the dead VMM's pid: {err}");
    let r = agent.wait_record(&tenant);
    assert_eq!((r.decision, r.rule.as_str()), (Decision::Denied, "tenants"), "inherited a verdict: {r:?}");
    assert_eq!((status.signal(), summary), (Some(libc::SIGKILL), serde_json::Value::Null), "{err}");

    let w = spawn_on_pid(pid, || guest(&["--name", &web, "--wbinvd", "70"]))
        .expect("no guest on the dead VMM's pid");
    let (status, _, err) = finish(w);
    assert!(status.success(), "{err}");
    let m = agent.scrape();
    assert_eq!(wbinvd_total(&m, &web), Some(70.0), "inherited counts:\n{m}");
    assert_eq!(wbinvd_total(&m, &gpu), Some(50.0), "the exited VM keeps its own:\n{m}");
}
