//! Kernel tests that need a real hypervisor host's kernel: a real VFIO device behind an IOMMU
//! without snoop control, BPF trampolines and LSM on module functions, hardware WBINVD exits.
//!
//! Kernels covered: the lab's stock Debian kernels (5.10 with and without BPF LSM, 6.1, 6.12,
//! 6.18, 7.3; `cargo xtask lab`, part of `cargo xtask test`), which run them with
//! `--include-ignored`. What a kernel offers is read from the kernel (its BTF, LSM list and the
//! agent's `status`), never from its version string. Elsewhere they are reported as
//! ignored, with the reason: the development kernel (6.18 PVM) has no VFIO, refuses
//! trampolines and LSM programs, and emulates every guest instruction (no hardware exits).

mod support;

use std::{path::PathBuf, process::Command, time::Duration};

use ioasid_agent::{
    engine::record::{Coherency, Decision, Mechanism, Outcome, RecordKind},
    host::vfio::{IommuCoherency, VfioKind},
};

use support::*;

const LAB_ONLY: &str = "needs a real hypervisor kernel (VFIO, trampolines, hardware exits): runs in the lab";

fn status() -> serde_json::Value {
    let out = Command::new(agent_path()).args(["status", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The hook that serves a group of alternatives, if one does.
fn serving<'a>(status: &'a serde_json::Value, group: &str) -> Option<&'a str> {
    status["serving"][group].as_str()
}

/// The BPF LSM is in the kernel's active LSM list (Debian 5.10 only with `lsm=...,bpf`).
fn bpf_lsm_active() -> bool {
    std::fs::read_to_string("/sys/kernel/security/lsm").is_ok_and(|l| l.split(',').any(|m| m.trim() == "bpf"))
}

/// Modules carry BTF (Linux 5.11+): trampolines on KVM's and VFIO's functions.
fn module_btf() -> bool {
    std::path::Path::new("/sys/kernel/btf/kvm").exists()
}

/// Hooks with no alternative that a kernel may lack, and why that loses nothing there.
const MAY_LACK: &[(&str, &str)] = &[
    ("fexit/kvm_vfio_set_attr", "serves only the observing LSM, which needs bpf_task_pt_regs (5.15+)"),
    ("fentry/kvm_emulate_invd", "5.10 has vendor INVD handlers only (there the tracepoints count)"),
    ("fexit/handle_fastpath_invd", "KVM's INVD fastpath came in ~6.18"),
    ("fentry/iommufd_fops_ioctl", "Debian's kernels build no iommufd (no CONFIG_IOMMUFD)"),
];

/// The IOMMU group of the device bound to vfio-pci (the lab's `edu` device).
fn vfio_group() -> PathBuf {
    let drv = std::fs::read_dir("/sys/bus/pci/drivers/vfio-pci").expect("vfio-pci is loaded in the lab");
    for e in drv.filter_map(Result::ok) {
        if let Ok(group) = std::fs::read_link(e.path().join("iommu_group")) {
            let n = group.file_name().unwrap().to_string_lossy().into_owned();
            return PathBuf::from(format!("/dev/vfio/{n}"));
        }
    }
    panic!("no device is bound to vfio-pci");
}

/// An agent whose policy denies incoherent DMA to every VM named `{prefix}-*`.
fn deny_agent(prefix: &str, extra: &[&str]) -> (Agent, TempDir) {
    let dir = TempDir::new("deny");
    let policy = dir.path("policy.yaml");
    write(
        &policy,
        &format!("rules:\n  - name: no-dma\n    match: {{ vm: \"{prefix}-*\" }}\n    incoherent_dma: deny\n"),
    );
    let mut args = vec!["--policy", policy.to_str().unwrap()];
    args.extend_from_slice(extra);
    (Agent::start(&args), dir)
}

/// A guest that issues every watched VFIO/iommufd request on the lab's VFIO group.
fn probe_vfio_group(prefix: &str) -> (std::process::ExitStatus, serde_json::Value, String) {
    let group = vfio_group();
    finish(guest(&["--name", &unique(prefix), "--vfio-probe", "--vfio-probe-file", group.to_str().unwrap()]))
}

/// A guest that adds the lab's real VFIO group to its VM `delay` seconds after start, then
/// does `extra` (its WBINVD work, FILE_DEL...).
fn vfio_guest(name: &str, delay: u32, extra: &[&str]) -> GuestGuard {
    let (delay, group) = (delay.to_string(), vfio_group());
    let mut args = vec!["--name", name, "--file-add", "--file-add-delay", &delay, "--vfio-group"];
    args.push(group.to_str().unwrap());
    args.extend_from_slice(extra);
    GuestGuard::spawn(&args)
}

fn nrips() -> Option<bool> {
    let v = std::fs::read_to_string("/sys/module/kvm_amd/parameters/nrips").ok()?;
    Some(matches!(v.trim(), "1" | "Y"))
}

#[test]
#[ignore = "needs a real hypervisor kernel (VFIO, trampolines, hardware exits): runs in the lab"]
fn hooks_on_module_functions_attach() {
    require_kernel();
    let _g = serial();
    let v = status();
    let group_of = |hook: &serde_json::Value| ioasid_common::hooks::hook(hook.as_str()?)?.group;
    for h in v["hooks"].as_array().unwrap() {
        if h["attached"] == true || h["standby"] == true {
            continue;
        }
        // Nothing refused that the kernel could give: a function it lacks (or has without BTF)
        // is served by an alternative of its group, or is one of the few with none.
        let kind = h["refusal"]["kind"].as_str().unwrap_or_default();
        let served = group_of(&h["hook"]).and_then(|g| serving(&v, g)).is_some();
        let ok = match kind {
            "absent" | "no-function-btf" => {
                served
                    || MAY_LACK.iter().any(|(hook, _)| h["hook"] == *hook)
                    // No module BTF (5.10): KVM's ioctl functions cannot be hooked; the
                    // syscall hooks serve the ioctl path.
                    || (!module_btf()
                        && ioasid_common::hooks::FUNCTION_IOCTL_HOOKS.iter().any(|f| h["hook"] == *f))
            }
            // A function this kernel's KVM does not call for it (__wbinvd beside wbinvd_ipi);
            // a program that reads KVM's structs where their layout is not in BTF (5.10).
            "not-this-kernel" | "no-layout" => served,
            // The VM-entry tracepoints, where the handlers' own hooks time every WBINVD; the
            // exit/emulation tracepoints and flush-cpus hooks, where they count and read reach.
            "unneeded" => v["cost_source"] == "handlers",
            // Debian 5.10 as shipped: no `bpf` in the LSM list; the kill enforces.
            "lsm-inactive" => !bpf_lsm_active(),
            // 5.10 with BPF LSM: the verifier refuses the observing program (no
            // bpf_task_pt_regs); the deny-only program serves.
            "kernel" => {
                h["hook"] == "lsm/file_ioctl" && serving(&v, "lsm-ioctl") == Some("lsm/file_ioctl:deny-only")
            }
            _ => false,
        };
        assert!(ok, "{LAB_ONLY}: hook not attached although the kernel could give it: {h}");
    }
    let want = if bpf_lsm_active() { "lsm" } else { "sigkill" };
    assert_eq!(v["enforcement_mechanism"], want, "{v}");
    if module_btf() {
        assert_eq!(
            v["ioctl_hooks"], "functions",
            "KVM's and VFIO's own ioctl functions where they can be hooked"
        );
    }
    assert_eq!(v["cost_source"], "handlers", "trampolines or kprobes on KVM's handlers: {v}");
    assert_eq!(v["blast_radius"]["on"], true, "{v}");
    for group in ["noncoherent-register", "noncoherent-unregister", "kernel-verdict"] {
        assert!(serving(&v, group).is_some(), "{group}: {v}");
    }
    let attached = |hook: &str| {
        v["hooks"].as_array().unwrap().iter().any(|h| h["hook"] == hook && h["attached"] == true)
    };
    if module_btf() {
        // Pay only where the work is: KVM's handler functions count, time and read each
        // flush's CPUs; nothing runs on every VM exit, emulated instruction or TLB shootdown.
        assert_eq!(v["count_source"], "handlers", "{v}");
        for hook in ["tracepoint/kvm/kvm_exit", "tracepoint/kvm/kvm_emulate_insn"] {
            assert!(!attached(hook), "{hook} attached although the handlers count: {v}");
        }
        assert!(serving(&v, "flush-cpus").is_none(), "a flush-cpus hook on a generic path: {v}");
        assert!(attached("fentry/kvm_emulate_invd"), "{v}");
    } else {
        // 5.10: no BTF for KVM's structs; the tracepoints count, smp_call_function_many reads
        // each flush's CPUs.
        assert_eq!(v["count_source"], "tracepoints", "{v}");
        assert!(serving(&v, "flush-cpus").is_some(), "{v}");
    }
    assert!(serving(&v, "vm-entry").is_none(), "no program on every VM entry where the handlers serve: {v}");
}

#[test]
#[ignore = "needs a real hypervisor kernel (VFIO, trampolines, hardware exits): runs in the lab"]
fn hardware_exits_are_counted_once() {
    require_kernel();
    let _g = serial();
    let agent = Agent::start(&[]);
    let name = unique("hw");
    let (status, summary, err) = finish(guest(&["--name", &name, "--wbinvd", "50", "--invd", "7"]));
    assert!(status.success(), "{err}");
    assert_eq!((summary["wbinvd"].as_u64(), summary["invd"].as_u64()), (Some(50), Some(7)));
    let want = [("ioasid_wbinvd_exits_total", "exit", 50.0), ("ioasid_invd_exits_total", "exit", 7.0)];
    let m = eventually(Duration::from_secs(5), || {
        let m = agent.scrape();
        want.iter().all(|(n, p, v)| sample(&m, n, &[("vm", &name), ("path", p)]) == Some(*v)).then_some(m)
    });
    // Without NRIP save KVM emulates each intercepted instruction to skip it: that emulation
    // is the same instruction, never a second count; with NRIP save there is none.
    let case = match nrips() {
        Some(false) => "SVM without NRIP save",
        Some(true) => "SVM with NRIP save",
        None => "VMX",
    };
    let m = m.unwrap_or_else(|| panic!("{case}: counts differ from 50 WBINVD / 7 INVD:\n{}", agent.scrape()));
    for n in ["ioasid_wbinvd_exits_total", "ioasid_invd_exits_total"] {
        let emulated = sample(&m, n, &[("vm", &name), ("path", "emulated")]).unwrap_or(0.0);
        assert_eq!(emulated, 0.0, "{case}: {n} counted the skip emulation");
    }
    // The exit handler ran once per WBINVD it was given (fexit); an emulator that reports
    // INVD as a WBINVD exit (QEMU 7.2's TCG) makes KVM run it for those too.
    let handled =
        sample(&m, "ioasid_wbinvd_handled_total", &[("vm", &name), ("path", "exit")]).unwrap_or(0.0);
    assert!(handled == 50.0 || handled == 57.0, "{handled}");
}

#[test]
#[ignore = "needs a real hypervisor kernel (VFIO, trampolines, hardware exits): runs in the lab"]
fn a_real_noncoherent_enable_makes_every_wbinvd_flush() {
    require_kernel();
    let _g = serial();
    let agent = Agent::start(&[]);
    let name = unique("nc");
    let hold = format!("{}", 3 * slow());
    let extra = ["--wbinvd", "100", "--migrate", "--file-del", "--file-del-delay", &hold, "--hold", &hold];
    let g = vfio_guest(&name, 0, &extra);
    // While the device is in: non-coherent, every WBINVD a real flush, some reaching both CPUs.
    let m = eventually(Duration::from_secs(10), || {
        let m = agent.scrape();
        (sample(&m, "ioasid_wbinvd_flushes_total", &[("vm", &name)]) == Some(100.0)).then_some(m)
    });
    let m = m.unwrap_or_else(|| panic!("flushes never reached 100:\n{}\n{}", agent.scrape(), agent.log()));
    assert_eq!(sample(&m, "ioasid_vm_noncoherent", &[("vm", &name)]), Some(1.0), "{m}");
    assert!(sample(&m, "ioasid_noncoherent_vms", &[]) >= Some(1.0));
    assert_eq!(sample(&m, "ioasid_wbinvd_cost_source", &[("source", "handlers")]), Some(1.0));
    assert_eq!(sample(&m, "ioasid_wbinvd_handler_seconds_count", &[("vm", &name)]), Some(100.0), "{m}");
    let bucket = |le| sample(&m, "ioasid_wbinvd_flush_cpus_bucket", &[("le", le)]).unwrap_or(0.0);
    let (zero, one, two) = (bucket("0"), bucket("1"), bucket("2"));
    let st = status();
    if serving(&st, "flush-cpus") == Some("fentry/smp_call_function_many") {
        // 5.10: KVM's smp_call_function_many never flushes the calling CPU, so a flush reaches
        // the other CPU (when the vCPU was there since its last WBINVD) or none at all.
        assert!(zero > 0.0, "every flush reached a CPU, but the vCPU mostly stays put:\n{m}");
        assert!(one > zero, "no flush reached the other CPU (le=0: {zero}, le=1: {one}):\n{m}");
        assert_eq!(two, one, "a flush counted the calling CPU, which 5.10 never flushes:\n{m}");
    } else {
        assert!(two > one, "no flush reached both CPUs (le=1: {one}, le=2: {two}):\n{m}");
    }
    let r = agent.wait_record(&name);
    assert_eq!((r.decision, r.ret), (Decision::Audited, Some(0)), "{r:?}");
    assert_eq!(r.kernel_coherent, Some(false), "the kernel's own verdict: {r:?}");
    assert_eq!(
        r.vfio.as_ref().map(|v| (v.kind, v.coherency)),
        Some((VfioKind::Group, IommuCoherency::NotEnforced)),
        "{r:?}"
    );
    // FILE_DEL: coherent again.
    let coherent = eventually(Duration::from_secs(10), || {
        let m = agent.scrape();
        (sample(&m, "ioasid_vm_noncoherent", &[("vm", &name)]) == Some(0.0)).then_some(())
    });
    assert!(coherent.is_some(), "still non-coherent after FILE_DEL:\n{}", agent.scrape());
    let (status, summary, err) = g.finish();
    assert!(status.success(), "{err}");
    assert_eq!((summary["file_add_errno"].as_i64(), summary["file_del_errno"].as_i64()), (Some(0), Some(0)));
    assert_eq!(summary["dma_cc"], 0, "the lab's IOMMU has no snoop control: {summary}");
}

#[test]
#[ignore = "needs a real hypervisor kernel (VFIO, trampolines, hardware exits): runs in the lab"]
fn an_lsm_denial_keeps_the_vm_coherent_and_alive() {
    require_kernel();
    let _g = serial();
    let prefix = unique("lsm");
    if !bpf_lsm_active() {
        // Debian 5.10 as shipped: the BPF LSM is off, the LSM hooks say so, and denial is the
        // in-kernel kill (a_noncoherent_enable_is_killed_in_the_kernel_with_enforce_with_signal; the
        // lab boots 5.10 a second time with BPF LSM for this test).
        let st = status();
        for hook in ["lsm/file_ioctl", "lsm/file_ioctl:deny-only"] {
            let h = st["hooks"].as_array().unwrap().iter().find(|h| h["hook"] == hook).unwrap();
            assert_eq!(h["refusal"]["kind"], "lsm-inactive", "{h}");
        }
        assert_eq!(st["enforcement_mechanism"], "sigkill", "{st}");
        eprintln!("BPF LSM inactive on this kernel: the LSM denial is shown in the boot with lsm=...,bpf");
        return;
    }
    let (agent, _dir) = deny_agent(&prefix, &[]);
    assert_eq!(enforcement(&agent), "lsm", "the BPF LSM is active: its program loads");
    let name = format!("{prefix}-tenant");
    let (status, summary, err) = vfio_guest(&name, 2 * slow(), &["--wbinvd", "20"]).finish();
    assert_denied("lsm", status, &summary, &err);
    assert_eq!(summary["wbinvd"], 20, "the VMM lives on and runs its guest: {summary}");
    let r = agent.wait_record(&name);
    assert_eq!((r.mechanism, r.outcome), (Mechanism::Lsm, Outcome::Blocked), "{r:?}");
    let m = eventually(Duration::from_secs(5), || {
        let m = agent.scrape();
        (sample(&m, "ioasid_wbinvd_exits_total", &[("vm", &name), ("path", "exit")]) == Some(20.0))
            .then_some(m)
    })
    .unwrap_or_else(|| agent.scrape());
    assert_eq!(sample(&m, "ioasid_wbinvd_flushes_total", &[("vm", &name)]).unwrap_or(0.0), 0.0, "{m}");
    assert_eq!(sample(&m, "ioasid_vm_noncoherent", &[("vm", &name)]), Some(0.0), "{m}");
}

/// `--enforce-with signal`: no program on any other ioctl; a deny kills the VMM's non-coherent
/// FILE_ADD in the kernel, from KVM's own ioctl function where it can be hooked (6.1+), else
/// from the syscall hook (5.10; the development kernel's tests show the same with tp_btf and
/// classic tracepoints).
#[test]
#[ignore = "needs a real hypervisor kernel (VFIO, trampolines, hardware exits): runs in the lab"]
fn a_noncoherent_enable_is_killed_in_the_kernel_with_enforce_with_signal() {
    require_kernel();
    let _g = serial();
    let prefix = unique("kill");
    let (agent, _dir) = deny_agent(&prefix, &["--enforce-with", "signal"]);
    assert_eq!(enforcement(&agent), "sigkill");
    let scrape = agent.scrape();
    let ioctl_path = ["functions", "lsm", "tp-btf", "tracepoint"]
        .into_iter()
        .find(|f| sample(&scrape, "ioasid_ioctl_path", &[("family", f)]) == Some(1.0))
        .unwrap_or_else(|| panic!("no ioctl path:\n{scrape}"))
        .to_string();
    assert_eq!(sample(&scrape, "ioasid_hook_attached", &[("hook", "lsm/file_ioctl")]), Some(0.0), "{scrape}");
    let name = format!("{prefix}-tenant");
    let (status, summary, err) = vfio_guest(&name, 2 * slow(), &["--wbinvd", "20"]).finish();
    assert_denied("sigkill", status, &summary, &err);
    let r = agent.wait_record(&name);
    assert_eq!(
        (r.mechanism, r.outcome, r.coherency),
        (Mechanism::Sigkill, Outcome::Killed, Some(Coherency::Noncoherent)),
        "the kernel knew the group non-coherent and killed the VMM alone: {r:?}\nagent log:\n{}",
        agent.log()
    );
    let said = eventually(Duration::from_secs(3), || {
        agent
            .log()
            .lines()
            .any(|l| l.contains("ioasid_ebpf") && l.contains("decision 3, signal 9 sent"))
            .then_some(())
    });
    assert!(said.is_some(), "no kernel log line:\n{}", agent.log());
    let m = agent.scrape();
    assert_eq!(
        sample(&m, "ioasid_vfio_file_adds_total", &[("vm", &name), ("coherency", "noncoherent")]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "ioasid_incoherent_dma_requests_total", &[("vm", &name), ("decision", "denied")]),
        Some(1.0)
    );
    assert_eq!(ioctl_path, if module_btf() { "functions" } else { "tp-btf" });
}

/// `--enforce-with signal`, a VMM that shares its address space with a CLONE_VM sibling running
/// a vCPU of the same VM: a SIGKILL from the kernel would kill the VMM alone and leave the sibling
/// running the VM with incoherent DMA. The kernel sees more users of the VMM's mm than it has
/// threads, stops it and asks instead; the agent kills the VMM and the sibling (kcmp).
#[test]
#[ignore = "needs a real hypervisor kernel (VFIO, trampolines, hardware exits): runs in the lab"]
fn a_noncoherent_enable_by_a_vmm_with_a_clone_vm_sibling_takes_the_sibling_too() {
    use std::os::unix::process::ExitStatusExt;
    require_kernel();
    let _g = serial();
    let prefix = unique("sibling");
    let (agent, dir) = deny_agent(&prefix, &["--enforce-with", "signal"]);
    let name = format!("{prefix}-tenant");
    let pidfile = dir.path("sibling.pid");
    let g = vfio_guest(&name, 2 * slow(), &["--clone-vm-sibling", pidfile.to_str().unwrap()]);
    let pid = g.pid();
    let stopped = eventually(Duration::from_secs(20) * slow(), || {
        (std::fs::read_to_string(&pidfile).is_ok() && agent.audit().iter().any(|r| r["vm"] == name.as_str()))
            .then_some(())
    });
    let sibling: u32 =
        std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    let gone = eventually(Duration::from_secs(5) * slow(), || {
        matches!(proc_state(sibling), None | Some('Z')).then_some(())
    });
    if gone.is_none() && sibling != 0 {
        // SAFETY: kill(2) of the test's own grandchild, left running by the failure.
        unsafe { libc::kill(sibling as i32, libc::SIGKILL) };
    }
    let (status, _, err) = g.finish();
    assert!(stopped.is_some() && sibling != 0, "no sibling or no record (pid {pid}): {err}\n{}", agent.log());
    assert!(gone.is_some(), "the CLONE_VM sibling {sibling} kept running the VM:\n{}", agent.log());
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?} {err}");
    let r = agent.wait_record(&name);
    assert_eq!(
        (r.decision, r.mechanism, r.outcome, r.coherency),
        (Decision::Denied, Mechanism::StopAsk, Outcome::Killed, Some(Coherency::Noncoherent)),
        "the kernel must ask, not kill the VMM alone: {r:?}"
    );
    let reason = r.reason.clone().unwrap_or_default();
    assert!(reason.contains("sharing its address space") && reason.contains(&sibling.to_string()), "{r:?}");
}

/// The lab boots each kernel a second time with an IOMMU that has snoop control (VT-d ECAP
/// bit 7): its devices' DMA is always coherent. Only `snoop_control_*` tests run there.
#[test]
#[ignore = "needs an IOMMU with snoop control and a real VFIO device: runs in the lab's second boot"]
fn snoop_control_a_coherent_device_is_never_judged() {
    require_kernel();
    let _g = serial();
    let prefix = unique("coh");
    let (agent, _dir) = deny_agent(&prefix, &[]);
    // A NIC-VF-like device behind an IOMMU that keeps it coherent, under a deny rule: added,
    // never stopped or killed, not an incoherent-DMA enable; right after exec and later alike.
    for (n, delay) in [(1, 0), (2, 2 * slow())] {
        let name = format!("{prefix}-tenant-{n}");
        let (status, summary, err) = vfio_guest(&name, delay, &["--wbinvd", "10"]).finish();
        assert!(status.success(), "{name}: {err}");
        assert_eq!(
            (summary["file_add_errno"].as_i64(), summary["dma_cc"].as_i64()),
            (Some(0), Some(1)),
            "{summary}"
        );
        let r = agent.wait_record(&name);
        assert_eq!(
            (r.event, r.coherency, r.decision),
            (RecordKind::VfioFileAdd, Some(Coherency::Coherent), Decision::Allowed),
            "{r:?}"
        );
        assert_eq!(r.kernel_coherent, Some(true), "the kernel's own verdict: {r:?}");
        let m = agent.scrape();
        let adds = sample(&m, "ioasid_vfio_file_adds_total", &[("vm", &name), ("coherency", "coherent")]);
        assert_eq!(adds, Some(1.0), "{m}");
        for d in ["allowed", "audited", "denied"] {
            let n = sample(&m, "ioasid_incoherent_dma_requests_total", &[("vm", &name), ("decision", d)]);
            assert_eq!(n, Some(0.0), "not an incoherent-DMA enable ({d})");
        }
        assert_eq!(
            sample(&m, "ioasid_wbinvd_flushes_total", &[("vm", &name)]).unwrap_or(0.0),
            0.0,
            "no real flush"
        );
        assert_eq!(sample(&m, "ioasid_vm_noncoherent", &[("vm", &name)]), Some(0.0));
    }
}

/// The kernel tells a real VFIO file from any other: every watched VFIO/iommufd request on the
/// lab's VFIO group is reported, the same requests on /dev/null are only counted as ignored
/// (or, on the functions path, reach no program at all). On each ioctl path: KVM's and VFIO's
/// own functions, the LSM (given the file) and tp_btf (the fd looked up in the task's file
/// table); KVM's files are recognised by their module (kvm_amd), as every other lab test that
/// sees a FILE_ADD shows.
fn requests_on_real_vfio_files_only(family: &str) {
    require_kernel();
    let _g = serial();
    let st = status();
    assert_eq!(st["file_filter"]["on"], true, "{st}");
    if family == "functions" && !module_btf() {
        assert_ne!(st["ioctl_hooks"], "functions", "{st}");
        eprintln!("no module BTF on this kernel: the ioctl functions cannot be hooked");
        return;
    }
    if family == "lsm" && !(bpf_lsm_active() && module_btf()) {
        // The observing LSM needs BPF LSM and trampolines on kvm-vfio (5.15+ with `bpf` active):
        // status says why (the agent asked for it with `run --ioctl-hooks lsm` refuses to start).
        let h = st["hooks"].as_array().unwrap().iter().find(|h| h["hook"] == "lsm/file_ioctl").unwrap();
        assert_eq!(h["attached"], false, "{h}");
        assert!(matches!(h["refusal"]["kind"].as_str(), Some("lsm-inactive" | "kernel")), "{h}");
        assert_ne!(st["ioctl_hooks"], "lsm", "{st}");
        eprintln!("the observing LSM cannot serve on this kernel: {}", h["reason"]);
        return;
    }
    let agent = Agent::start(&["--ioctl-hooks", family]);
    let requests: Vec<&str> = ioasid_common::ioctl::WATCHED_IOCTLS
        .iter()
        .filter(|r| (r.cmd >> 8) & 0xff == 0x3b)
        .map(|r| r.name)
        .collect();
    let before = agent.scrape();
    let was = |m: &str, r: &str| sample(m, "ioasid_ioctls_total", &[("request", r)]).unwrap_or(0.0);
    let ignored = |m: &str| sample(m, "ioasid_ioctls_ignored_total", &[]).unwrap_or(0.0);
    let (status, summary, err) = probe_vfio_group("probe");
    assert!(status.success(), "{err}");
    assert_eq!(summary["vfio_probed"], requests.len());
    let seen = eventually(Duration::from_secs(5), || {
        let m = agent.scrape();
        requests.iter().all(|r| was(&m, r) >= was(&before, r) + 1.0).then_some(m)
    });
    let seen = seen
        .unwrap_or_else(|| panic!("not every request on the VFIO group was reported:\n{}", agent.scrape()));
    assert_eq!(ignored(&seen), ignored(&before), "nothing on the VFIO group is ignored");
    let (status, _, err) = finish(guest(&["--name", &unique("noise"), "--vfio-probe"]));
    assert!(status.success(), "{err}");
    let m = if family == "functions" {
        // No program runs for /dev/null's ioctls at all.
        std::thread::sleep(Duration::from_secs(2));
        let m = agent.scrape();
        assert_eq!(ignored(&m), ignored(&seen), "requests on /dev/null reached a program:\n{m}");
        m
    } else {
        let m = eventually(Duration::from_secs(5), || {
            let m = agent.scrape();
            (ignored(&m) >= ignored(&seen) + requests.len() as f64).then_some(m)
        });
        m.unwrap_or_else(|| panic!("the requests on /dev/null were not ignored:\n{}", agent.scrape()))
    };
    for r in &requests {
        assert_eq!(was(&m, r), was(&seen, r), "{r} on /dev/null was reported");
    }
}

/// Where KVM's and VFIO's own ioctl functions are hooked (the auto choice from 5.15 with
/// module BTF), every watched request on the lab's VFIO group is reported, and the same
/// requests on /dev/null reach no ioasid program at all (not even to be ignored).
#[test]
#[ignore = "needs a real hypervisor kernel (VFIO, trampolines, hardware exits): runs in the lab"]
fn vfio_requests_are_seen_on_the_vfio_functions_only() {
    requests_on_real_vfio_files_only("functions");
}

#[test]
#[ignore = "needs a real hypervisor kernel (VFIO, trampolines, hardware exits): runs in the lab"]
fn requests_on_real_vfio_files_only_lsm() {
    requests_on_real_vfio_files_only("lsm");
}

#[test]
#[ignore = "needs a real hypervisor kernel (VFIO, trampolines, hardware exits): runs in the lab"]
fn requests_on_real_vfio_files_only_tp_btf() {
    requests_on_real_vfio_files_only("tp-btf");
}

/// A guest whose vCPU thread stays on `cpu` (a busy VM pinned there), doing `args`.
fn pinned_guest(cpu: u32, args: &[&str]) -> std::process::Child {
    Command::new("taskset")
        .arg("-c")
        .arg(cpu.to_string())
        .arg(guest_path())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("taskset runs the guest")
}

/// Blast radius: a non-coherent flusher whose vCPU moves between the two CPUs, and a busy VM
/// pinned to CPU 1. Each flush that reaches CPU 1 interrupts the victim: its IPIs received and
/// stolen time rise, the flusher's sent IPIs rise, the flusher's own CPU is nobody's loss, a
/// `wbinvd-blast` record names the victim, and a coherent flusher hurts nobody.
#[test]
#[ignore = "needs a real hypervisor kernel (VFIO, trampolines, hardware exits): runs in the lab"]
fn a_noncoherent_flush_hurts_the_vm_on_the_other_cpu() {
    require_kernel();
    let _g = serial();
    let st = status();
    assert_eq!(st["blast_radius"]["on"], true, "every lab kernel has a flush IPI hook: {st}");
    eprintln!(
        "blast radius from {} and {}",
        serving(&st, "flush-ipi-start").unwrap_or("?"),
        serving(&st, "flush-ipi-end").unwrap_or("?")
    );
    let agent = Agent::start(&[]);
    let (victim, flusher, coherent) = (unique("victim"), unique("flusher"), unique("coherent"));
    // Busy on CPU 1 for the whole test (its own WBINVD are no-ops: it is coherent).
    let v = GuestGuard::of(pinned_guest(
        1,
        &["--name", &victim, "--rate", "1000000", "--duration", &(20 * slow()).to_string()],
    ));
    std::thread::sleep(Duration::from_secs(1));
    let (status, summary, err) = vfio_guest(&flusher, 0, &["--wbinvd", "300", "--migrate"]).finish();
    assert!(status.success(), "{err}");
    assert_eq!(summary["dma_cc"], 0, "non-coherent: {summary}");
    let m = eventually(Duration::from_secs(5), || {
        let m = agent.scrape();
        (sample(&m, "ioasid_wbinvd_ipis_received_total", &[("vm", &victim)]).unwrap_or(0.0) > 0.0)
            .then_some(m)
    });
    let m = m.unwrap_or_else(|| panic!("the victim was never hit:\n{}\n{}", agent.scrape(), agent.log()));
    let get = |name: &str, vm: &str| sample(&m, name, &[("vm", vm)]).unwrap_or(0.0);
    let (sent, received, stolen) = (
        get("ioasid_wbinvd_ipis_sent_total", &flusher),
        get("ioasid_wbinvd_ipis_received_total", &victim),
        get("ioasid_wbinvd_stolen_seconds_total", &victim),
    );
    eprintln!(
        "blast radius: flusher sent {sent} IPIs (300 WBINVD in batches of 10, visiting CPU 1 between batches); victim on CPU 1 received {received}, lost {:.3} ms ({:.1} us each); host received {}",
        stolen * 1e3,
        stolen * 1e6 / received.max(1.0),
        get("ioasid_wbinvd_ipis_received_total", "host")
    );
    assert!(sent >= received && received > 0.0 && stolen > 0.0, "{m}");
    assert_eq!(
        get("ioasid_wbinvd_ipis_received_total", &flusher),
        0.0,
        "the flusher's own CPU is not a victim:\n{m}"
    );
    assert!(sample(&m, "ioasid_wbinvd_victim_stolen_ratio", &[("vm", &victim)]).is_some(), "{m}");
    // Who hurt whom: the flusher's record names the victim.
    let rec = eventually(Duration::from_secs(5), || {
        agent.audit().into_iter().find(|r| r["event"] == "wbinvd-blast" && r["vm"] == flusher.as_str())
    })
    .unwrap_or_else(|| panic!("no wbinvd-blast record:\n{}", agent.log()));
    assert!(rec["ipis_sent"].as_u64().unwrap_or(0) > 0, "{rec}");
    assert!(rec["victims"].as_array().unwrap().iter().any(|x| x["vm"] == victim.as_str()), "{rec}");
    // A coherent flusher: KVM never flushes for it, so nobody is hurt.
    let (status, _, err) = finish(guest(&["--name", &coherent, "--wbinvd", "300", "--migrate"]));
    assert!(status.success(), "{err}");
    std::thread::sleep(Duration::from_secs(1));
    let m = agent.scrape();
    assert_eq!(sample(&m, "ioasid_wbinvd_ipis_sent_total", &[("vm", &coherent)]), None, "{m}");
    drop(v);
}

/// VFIO loaded after the agent (libvirt loads vfio-pci when it starts a VM with a device to pass
/// through): its ioctl functions, and the kernel's coherency verdict, are hooked within a
/// second or two of the module loading, and then observe.
#[test]
#[ignore = "needs a real hypervisor kernel (VFIO, trampolines, hardware exits): runs in the lab"]
fn vfio_loaded_after_the_agent_is_hooked_when_it_loads() {
    require_kernel();
    let _g = serial();
    if !module_btf() {
        eprintln!("no module BTF on this kernel: the ioctl functions cannot be hooked");
        return;
    }
    let bb = std::env::var("IOASID_LAB_BUSYBOX").expect("the lab exports the path of its busybox");
    let run = |args: &[&str]| {
        let out = Command::new(&bb).args(args).output().unwrap();
        format!("{args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    // Unload VFIO (the lab loaded it at boot and gave it its device).
    let said: Vec<String> = ["vfio_pci", "vfio_pci_core", "vfio_iommu_type1", "vfio"]
        .iter()
        .map(|m| run(&["rmmod", m]))
        .collect();
    assert!(!std::path::Path::new("/sys/module/vfio").exists(), "vfio stays loaded: {said:?}");
    let agent = Agent::start(&[]);
    let hooks = [
        "fentry/vfio_fops_unl_ioctl",
        "fentry/vfio_group_fops_unl_ioctl",
        "fentry/vfio_device_fops_unl_ioctl",
    ];
    let m = agent.scrape();
    for h in hooks {
        assert_eq!(
            sample(&m, "ioasid_hook_attached", &[("hook", h)]),
            Some(0.0),
            "{h} before vfio loads:\n{m}"
        );
    }
    let said = [run(&["modprobe", "vfio-pci"]), run(&["modprobe", "vfio_iommu_type1"])];
    let _ = std::fs::write("/sys/bus/pci/drivers/vfio-pci/new_id", "1234 11e8");
    let on = eventually(Duration::from_secs(10), || {
        let m = agent.scrape();
        hooks.iter().all(|h| sample(&m, "ioasid_hook_attached", &[("hook", h)]) == Some(1.0)).then_some(m)
    });
    let m = on.unwrap_or_else(|| {
        panic!("not hooked after vfio loaded ({said:?}):\n{}\n{}", agent.scrape(), agent.log())
    });
    let verdict = ["fexit/vfio_file_enforced_coherent", "kretprobe/vfio_external_check_extension"];
    assert!(
        verdict.iter().any(|h| sample(&m, "ioasid_hook_attached", &[("hook", h)]) == Some(1.0)),
        "the kernel's coherency verdict is not hooked:\n{m}"
    );
    // And they observe: every watched request on the VFIO group is reported.
    let before = agent.scrape();
    let (status, summary, err) = probe_vfio_group("late");
    assert!(status.success(), "{err}");
    let set_container =
        |m: &str| sample(m, "ioasid_ioctls_total", &[("request", "VFIO_GROUP_SET_CONTAINER")]).unwrap_or(0.0);
    let seen = eventually(Duration::from_secs(5), || {
        (set_container(&agent.scrape()) > set_container(&before)).then_some(())
    });
    assert!(seen.is_some(), "{summary}: not reported:\n{}", agent.scrape());
}
