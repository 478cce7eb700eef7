//! From a kernel event to a decision, an action and an audit record.
//!
//! The kernel already decided (and signalled) for processes with a verdict. For `ASK` events
//! (no verdict yet, or a device-limited rule) the process is stopped and the decision is made
//! here from a fresh read of /proc and the VFIO device, then carried out with SIGKILL or SIGCONT.

use ioasid_common::{
    IoctlEvent, VmVerdict, DECISION_ALLOW, DECISION_ASK, DECISION_AUDIT, DECISION_DENY, IOCTL_F_DEVICE_KNOWN,
    IOCTL_F_FILE_FD_READ, IOCTL_F_RETURNED, IOCTL_F_SIGNAL_SENT, MECH_LSM, MECH_SIGKILL, MECH_STOP_ASK,
    RULE_DEFAULT,
};

use crate::{
    audit::{AuditRecord, Request},
    policy::{Action, Policy, Verdict},
    procfs::ProcessInfo,
    vfio::VfioFile,
};

/// The kernel verdict for a classified process.
pub fn kernel_verdict(v: &Verdict, generation: u32) -> VmVerdict {
    VmVerdict { decision: v.kernel_decision(), rule: v.kernel_rule(), generation, _pad: 0 }
}

/// What the agent must do after judging an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Followup {
    None,
    /// Resume a process stopped for the decision.
    Continue,
    /// Kill the process (a stopped process that was denied).
    Kill,
}

#[derive(Debug)]
pub struct Judgement {
    pub action: Action,
    pub followup: Followup,
    pub record: AuditRecord,
}

pub struct Context<'a> {
    pub policy: &'a Policy,
    pub generation: u32,
    pub host: &'a str,
    pub time: String,
}

/// Judges one FILE_ADD event from the process `p` (as read now, or as known) and VFIO file.
pub fn judge(ev: &IoctlEvent, p: &ProcessInfo, vfio: Option<VfioFile>, cx: &Context<'_>) -> Judgement {
    let sent = ev.flags & IOCTL_F_SIGNAL_SENT != 0;
    let ret = (ev.flags & IOCTL_F_RETURNED != 0).then_some(ev.ret);
    let (action, rule, mechanism, outcome, followup, reason) = match ev.decision {
        DECISION_ASK => {
            let verdict = cx.policy.evaluate(p);
            let devices = vfio.as_ref().map(|v| v.devices.clone()).unwrap_or_default();
            let (action, reason) = cx.policy.decide_device(&verdict, &devices);
            let stopped = ev.mechanism == MECH_STOP_ASK && sent;
            let (mechanism, outcome, followup) = match (stopped, action) {
                (true, Action::Deny) => ("stop-ask", "killed", Followup::Kill),
                (true, _) => ("stop-ask", "resumed", Followup::Continue),
                (false, Action::Deny) => ("none", "not-enforced", Followup::None),
                (false, _) => ("none", "completed", Followup::None),
            };
            (action, verdict.rule_name, mechanism, outcome, followup, reason)
        }
        d => {
            let action = match d {
                DECISION_ALLOW => Action::Allow,
                DECISION_AUDIT => Action::Audit,
                _ => Action::Deny,
            };
            let rule = if ev.rule == RULE_DEFAULT {
                "default".to_string()
            } else if ev.generation == cx.generation {
                cx.policy.rule_name(ev.rule).unwrap_or("?").to_string()
            } else {
                format!("rule#{} (policy generation {})", ev.rule + 1, ev.generation)
            };
            let (mechanism, outcome) = match (d, ev.mechanism) {
                (DECISION_DENY, MECH_LSM) => ("lsm", "blocked"),
                (DECISION_DENY, MECH_SIGKILL) if sent => ("sigkill", "killed"),
                (DECISION_DENY, MECH_SIGKILL) => ("sigkill", "signal-failed"),
                (DECISION_DENY, _) => ("none", "not-enforced"),
                _ => ("none", "completed"),
            };
            (action, rule, mechanism, outcome, Followup::None, None)
        }
    };
    let record = AuditRecord {
        event: crate::audit::EVENT_INCOHERENT_DMA.into(),
        time: cx.time.clone(),
        host: cx.host.to_string(),
        vm: p.vm.clone(),
        pid: ev.header.tgid,
        comm: p.comm.clone(),
        exe: p.exe.clone(),
        cgroup: p.cgroup.clone(),
        uid: p.uid,
        request: Request {
            ioctl: "KVM_SET_DEVICE_ATTR".into(),
            attr: "KVM_DEV_VFIO_FILE_ADD".into(),
            fd: ev.fd,
            file_fd: (ev.flags & IOCTL_F_FILE_FD_READ != 0).then_some(ev.file_fd),
            device_fd_known: ev.flags & IOCTL_F_DEVICE_KNOWN != 0,
        },
        vfio,
        kernel_coherent: match ev.kernel_coherent {
            ioasid_common::COHERENT_YES => Some(true),
            ioasid_common::COHERENT_NO => Some(false),
            _ => None,
        },
        rule,
        decision: action.decision().into(),
        mechanism: mechanism.into(),
        outcome: outcome.into(),
        ret,
        reason,
        policy: cx.policy.source.clone(),
    };
    Judgement { action, followup, record }
}

/// Replays a recorded decision against `policy`: what it would decide now.
pub fn replay(rec: &AuditRecord, policy: &Policy) -> (Action, String, Option<String>) {
    let verdict = policy.evaluate(&rec.process());
    let devices = rec.vfio.as_ref().map(|v| v.devices.clone()).unwrap_or_default();
    let (action, reason) = policy.decide_device(&verdict, &devices);
    (action, verdict.rule_name, reason)
}

/// True for the kernel decision values that mean an incoherent-DMA enable was judged.
pub fn is_enable(decision: u32) -> bool {
    matches!(decision, DECISION_ALLOW | DECISION_AUDIT | DECISION_DENY | DECISION_ASK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ioasid_common::{EVENT_IOCTL, KVM_SET_DEVICE_ATTR};

    fn ev(decision: u32, mechanism: u32, flags: u32, rule: u32, generation: u32) -> IoctlEvent {
        // SAFETY: all-zero is valid for this plain-integer type.
        let mut e: IoctlEvent = unsafe { std::mem::zeroed() };
        e.header.kind = EVENT_IOCTL;
        e.header.tgid = 99;
        e.cmd = KVM_SET_DEVICE_ATTR;
        e.fd = 12;
        e.file_fd = 13;
        e.ret = -22;
        e.decision = decision;
        e.mechanism = mechanism;
        e.flags = flags | IOCTL_F_RETURNED | IOCTL_F_FILE_FD_READ;
        e.rule = rule;
        e.generation = generation;
        e
    }

    fn proc(vm: &str) -> ProcessInfo {
        ProcessInfo {
            pid: 99,
            comm: "qemu".into(),
            vm: vm.into(),
            exe: None,
            cgroup: None,
            uid: 0,
            start_time: 1,
        }
    }

    const POLICY: &str = "default: { incoherent_dma: audit }\nrules:\n  - name: gpu\n    match: { vm: \"gpu-*\" }\n    incoherent_dma: allow\n  - name: tenants\n    match: { vm: \"tenant-*\" }\n    incoherent_dma: deny\n";

    #[test]
    fn kernel_decisions_become_records() {
        let policy = Policy::parse(POLICY, "p.yaml").unwrap();
        let cx = Context { policy: &policy, generation: 3, host: "h", time: "t".into() };
        let j =
            judge(&ev(DECISION_DENY, MECH_SIGKILL, IOCTL_F_SIGNAL_SENT, 1, 3), &proc("tenant-1"), None, &cx);
        let r = &j.record;
        assert_eq!(
            (r.decision.as_str(), r.mechanism.as_str(), r.outcome.as_str(), r.rule.as_str()),
            ("denied", "sigkill", "killed", "tenants")
        );
        assert_eq!((r.ret, r.request.file_fd, r.request.device_fd_known), (Some(-22), Some(13), false));
        assert_eq!(j.followup, Followup::None);
        let j = judge(&ev(DECISION_DENY, MECH_LSM, 0, 1, 3), &proc("tenant-1"), None, &cx);
        assert_eq!((j.record.mechanism.as_str(), j.record.outcome.as_str()), ("lsm", "blocked"));
        let j = judge(&ev(DECISION_DENY, 0, 0, 1, 3), &proc("tenant-1"), None, &cx);
        assert_eq!(j.record.outcome, "not-enforced");
        let j = judge(&ev(DECISION_ALLOW, 0, 0, 0, 3), &proc("gpu-1"), None, &cx);
        assert_eq!(
            (j.record.decision.as_str(), j.record.outcome.as_str(), j.record.rule.as_str()),
            ("allowed", "completed", "gpu")
        );
        let j = judge(&ev(DECISION_AUDIT, 0, 0, RULE_DEFAULT, 3), &proc("web"), None, &cx);
        assert_eq!((j.record.decision.as_str(), j.record.rule.as_str()), ("audited", "default"));
        // A verdict from an older policy generation names the rule by number.
        let j = judge(&ev(DECISION_ALLOW, 0, 0, 0, 2), &proc("gpu-1"), None, &cx);
        assert!(j.record.rule.contains("generation 2"), "{}", j.record.rule);
    }

    #[test]
    fn ask_is_decided_here() {
        let policy = Policy::parse(POLICY, "p.yaml").unwrap();
        let cx = Context { policy: &policy, generation: 1, host: "h", time: "t".into() };
        let j = judge(
            &ev(DECISION_ASK, MECH_STOP_ASK, IOCTL_F_SIGNAL_SENT, u32::MAX, 0),
            &proc("tenant-9"),
            None,
            &cx,
        );
        assert_eq!(
            (j.action, j.followup, j.record.outcome.as_str()),
            (Action::Deny, Followup::Kill, "killed")
        );
        let j = judge(
            &ev(DECISION_ASK, MECH_STOP_ASK, IOCTL_F_SIGNAL_SENT, u32::MAX, 0),
            &proc("gpu-2"),
            None,
            &cx,
        );
        assert_eq!(
            (j.action, j.followup, j.record.outcome.as_str()),
            (Action::Allow, Followup::Continue, "resumed")
        );
        // Not stopped (dry run): nothing to carry out.
        let j = judge(&ev(DECISION_ASK, 0, 0, u32::MAX, 0), &proc("tenant-9"), None, &cx);
        assert_eq!((j.followup, j.record.outcome.as_str()), (Followup::None, "not-enforced"));
    }

    #[test]
    fn replay_uses_the_new_policy() {
        let policy = Policy::parse(POLICY, "p.yaml").unwrap();
        let cx = Context { policy: &policy, generation: 1, host: "h", time: "t".into() };
        let rec = judge(&ev(DECISION_AUDIT, 0, 0, RULE_DEFAULT, 1), &proc("tenant-5"), None, &cx).record;
        let (a, rule, _) = replay(&rec, &policy);
        assert_eq!((a, rule.as_str()), (Action::Deny, "tenants"));
        assert_eq!(replay(&rec, &Policy::embedded()).0, Action::Audit);
    }
}
