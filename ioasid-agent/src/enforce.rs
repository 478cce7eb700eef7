//! From an incoherent-DMA enable to a decision, what is left to carry out, and its audit record.
//!
//! The kernel already decided (and signalled) for processes with a verdict. For `Ask` requests
//! (no verdict yet, or a device-limited rule) the process is stopped and the decision is made
//! here from a fresh read of /proc and the VFIO device, then carried out with SIGKILL or
//! SIGCONT. Pure functions: the event loop applies the result.

use ioasid_common::verdict::Mechanism as KernelMechanism;

use crate::{
    audit::{AuditRecord, Decision, Mechanism, Outcome, RecordKind, Request},
    events::{EnableRequest, KernelJudged, RuleRef},
    policy::{Action, Policy},
    procfs::ProcessInfo,
    sys::Signal,
    vfio::VfioFile,
};

#[derive(Debug)]
pub struct Judgement {
    pub action: Action,
    /// What the agent must still send: SIGCONT to resume a stopped VMM, SIGKILL to end one.
    pub followup: Option<Signal>,
    pub record: AuditRecord,
}

pub struct Context<'a> {
    pub policy: &'a Policy,
    pub generation: u32,
    pub host: &'a str,
    pub time: String,
}

/// Judges one enable from the process `p` (as read now, or as known) and its VFIO file.
pub fn judge(req: &EnableRequest, p: &ProcessInfo, vfio: Option<VfioFile>, cx: &Context<'_>) -> Judgement {
    let sent = req.signal_sent;
    let (action, rule, mechanism, outcome, followup, reason) = match req.judged {
        KernelJudged::Ask => {
            let verdict = cx.policy.evaluate(p);
            let devices = vfio.as_ref().map(|v| v.devices.clone()).unwrap_or_default();
            let (action, reason) = cx.policy.decide_device(&verdict, &devices);
            let stopped = req.mechanism == KernelMechanism::StopAsk && sent;
            let (mechanism, outcome, followup) = match (stopped, action) {
                (true, Action::Deny) => (Mechanism::StopAsk, Outcome::Killed, Some(Signal::Kill)),
                (true, _) => (Mechanism::StopAsk, Outcome::Resumed, Some(Signal::Cont)),
                (false, Action::Deny) => (Mechanism::None, Outcome::NotEnforced, None),
                (false, _) => (Mechanism::None, Outcome::Completed, None),
            };
            (action, verdict.rule_name, mechanism, outcome, followup, reason)
        }
        KernelJudged::Verdict { action, rule, generation } => {
            let rule = match rule {
                RuleRef::Default => "default".to_string(),
                RuleRef::Index(i) if generation == cx.generation => {
                    cx.policy.rule_name(i).unwrap_or("?").to_string()
                }
                RuleRef::Index(i) => format!("rule#{} (policy generation {generation})", i + 1),
            };
            let (mechanism, outcome) = match (action, req.mechanism) {
                (Action::Deny, KernelMechanism::Lsm) => (Mechanism::Lsm, Outcome::Blocked),
                (Action::Deny, KernelMechanism::Sigkill) if sent => (Mechanism::Sigkill, Outcome::Killed),
                (Action::Deny, KernelMechanism::Sigkill) => (Mechanism::Sigkill, Outcome::SignalFailed),
                (Action::Deny, _) => (Mechanism::None, Outcome::NotEnforced),
                _ => (Mechanism::None, Outcome::Completed),
            };
            (action, rule, mechanism, outcome, None, None)
        }
    };
    let record = AuditRecord {
        event: RecordKind::IncoherentDma,
        time: cx.time.clone(),
        host: cx.host.to_string(),
        vm: p.vm.clone(),
        pid: req.origin.tgid,
        comm: p.comm.clone(),
        exe: p.exe.clone(),
        cgroup: p.cgroup.clone(),
        uid: p.uid,
        request: Request {
            ioctl: "KVM_SET_DEVICE_ATTR".into(),
            attr: "KVM_DEV_VFIO_FILE_ADD".into(),
            fd: req.fd,
            file_fd: req.file_fd,
            device_fd_known: req.device_fd_known,
        },
        vfio,
        kernel_coherent: req.kernel_coherent,
        rule,
        decision: action.into(),
        mechanism,
        outcome,
        ret: req.ret,
        reason,
        policy: cx.policy.source.clone(),
    };
    Judgement { action, followup, record }
}

/// Replays a recorded decision against `policy`: what it would decide now.
pub fn replay(rec: &AuditRecord, policy: &Policy) -> (Decision, String, Option<String>) {
    let verdict = policy.evaluate(&rec.process());
    let devices = rec.vfio.as_ref().map(|v| v.devices.clone()).unwrap_or_default();
    let (action, reason) = policy.decide_device(&verdict, &devices);
    (action.into(), verdict.rule_name, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Origin;

    fn req(judged: KernelJudged, mechanism: KernelMechanism, sent: bool) -> EnableRequest {
        EnableRequest {
            origin: Origin { tgid: 99, comm: "qemu".into(), ktime_ns: 1 },
            fd: 12,
            file_fd: Some(13),
            device_fd_known: false,
            judged,
            mechanism,
            signal_sent: sent,
            ret: Some(-22),
            kernel_coherent: None,
        }
    }

    fn verdict(action: Action, rule: RuleRef, generation: u32) -> KernelJudged {
        KernelJudged::Verdict { action, rule, generation }
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

    fn summary(j: &Judgement) -> (Decision, Mechanism, Outcome, &str) {
        (j.record.decision, j.record.mechanism, j.record.outcome, j.record.rule.as_str())
    }

    #[test]
    fn kernel_decisions_become_records() {
        let policy = Policy::parse(POLICY, "p.yaml").unwrap();
        let cx = Context { policy: &policy, generation: 3, host: "h", time: "t".into() };
        let deny = verdict(Action::Deny, RuleRef::Index(1), 3);
        let j = judge(&req(deny, KernelMechanism::Sigkill, true), &proc("tenant-1"), None, &cx);
        assert_eq!(summary(&j), (Decision::Denied, Mechanism::Sigkill, Outcome::Killed, "tenants"));
        let r = &j.record;
        assert_eq!((r.ret, r.request.file_fd, r.request.device_fd_known), (Some(-22), Some(13), false));
        assert_eq!(j.followup, None);
        let j = judge(&req(deny, KernelMechanism::Sigkill, false), &proc("tenant-1"), None, &cx);
        assert_eq!(j.record.outcome, Outcome::SignalFailed);
        let j = judge(&req(deny, KernelMechanism::Lsm, false), &proc("tenant-1"), None, &cx);
        assert_eq!((j.record.mechanism, j.record.outcome), (Mechanism::Lsm, Outcome::Blocked));
        let j = judge(&req(deny, KernelMechanism::None, false), &proc("tenant-1"), None, &cx);
        assert_eq!(j.record.outcome, Outcome::NotEnforced);
        let allow = verdict(Action::Allow, RuleRef::Index(0), 3);
        let j = judge(&req(allow, KernelMechanism::None, false), &proc("gpu-1"), None, &cx);
        assert_eq!(summary(&j), (Decision::Allowed, Mechanism::None, Outcome::Completed, "gpu"));
        let audit = verdict(Action::Audit, RuleRef::Default, 3);
        let j = judge(&req(audit, KernelMechanism::None, false), &proc("web"), None, &cx);
        assert_eq!((j.record.decision, j.record.rule.as_str()), (Decision::Audited, "default"));
        // A verdict from an older policy generation names the rule by number.
        let old = verdict(Action::Allow, RuleRef::Index(0), 2);
        let j = judge(&req(old, KernelMechanism::None, false), &proc("gpu-1"), None, &cx);
        assert!(j.record.rule.contains("generation 2"), "{}", j.record.rule);
    }

    #[test]
    fn ask_is_decided_here() {
        let policy = Policy::parse(POLICY, "p.yaml").unwrap();
        let cx = Context { policy: &policy, generation: 1, host: "h", time: "t".into() };
        let ask = req(KernelJudged::Ask, KernelMechanism::StopAsk, true);
        let j = judge(&ask, &proc("tenant-9"), None, &cx);
        assert_eq!(
            (j.action, j.followup, j.record.outcome),
            (Action::Deny, Some(Signal::Kill), Outcome::Killed)
        );
        let j = judge(&ask, &proc("gpu-2"), None, &cx);
        assert_eq!(
            (j.action, j.followup, j.record.outcome),
            (Action::Allow, Some(Signal::Cont), Outcome::Resumed)
        );
        // Not stopped (dry run): nothing to carry out.
        let j = judge(&req(KernelJudged::Ask, KernelMechanism::None, false), &proc("tenant-9"), None, &cx);
        assert_eq!((j.followup, j.record.outcome), (None, Outcome::NotEnforced));
    }

    #[test]
    fn replay_uses_the_new_policy() {
        let policy = Policy::parse(POLICY, "p.yaml").unwrap();
        let cx = Context { policy: &policy, generation: 1, host: "h", time: "t".into() };
        let audit = verdict(Action::Audit, RuleRef::Default, 1);
        let rec = judge(&req(audit, KernelMechanism::None, false), &proc("tenant-5"), None, &cx).record;
        let (d, rule, _) = replay(&rec, &policy);
        assert_eq!((d, rule.as_str()), (Decision::Denied, "tenants"));
        assert_eq!(replay(&rec, &Policy::embedded()).0, Decision::Audited);
    }
}
