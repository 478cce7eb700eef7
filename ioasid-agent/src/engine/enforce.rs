//! From a FILE_ADD to a decision, what is left to carry out, and its audit record.
//!
//! Only an incoherent-DMA enable is judged: a file whose IOMMU keeps DMA coherent is observed
//! and audited (`vfio-file-add`), never judged, stopped or counted as an enable; one of unknown
//! coherency is judged as non-coherent unless the policy says `unknown_coherency: allow`. The
//! kernel already decided (and signalled) for processes with a verdict and a file it knew. For
//! `Ask` requests (no verdict yet, a device-limited rule, or a deny for a file of unknown
//! coherency) the process is stopped and the decision is made here from a fresh read of /proc
//! and the VFIO device, then carried out with SIGKILL or SIGCONT. Pure functions: the event
//! loop applies the result.

use ioasid_common::events::Coherency;

use crate::{
    engine::events::{EnableRequest, KernelJudged, RuleRef},
    engine::policy::{Action, Policy, UnknownCoherency},
    engine::record::{AuditRecord, Decision, Mechanism, Outcome, RecordKind, Request, VmIdentity},
    host::procfs::ProcessInfo,
    host::sys::Signal,
    host::vfio::{IommuCoherency, VfioFile},
};

#[derive(Debug)]
pub struct Judgement {
    /// The policy's action, or None when the FILE_ADD was not an incoherent-DMA enable (a
    /// coherent file, or one of unknown coherency the policy lets through): not judged.
    pub action: Option<Action>,
    /// The coherency it was judged by.
    pub coherency: Coherency,
    /// The kernel's own verdict disagreed with what the agent resolved.
    pub disagreement: bool,
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

/// The coherency a FILE_ADD is judged by: the kernel's own verdict where its hook loads, else
/// what the agent resolves now (sysfs), else what it had resolved for the fd (the kernel's
/// map). Also whether the kernel's verdict disagreed with the agent's.
pub fn coherency(req: &EnableRequest, vfio: Option<&VfioFile>) -> (Coherency, bool) {
    let resolved = match vfio.map(|v| v.coherency) {
        Some(IommuCoherency::Enforced) => Coherency::Coherent,
        Some(IommuCoherency::NotEnforced) => Coherency::Noncoherent,
        _ => req.file_coherency,
    };
    match req.kernel_coherent {
        None => (resolved, false),
        Some(k) => {
            let kernel = if k { Coherency::Coherent } else { Coherency::Noncoherent };
            (kernel, resolved != Coherency::Unknown && resolved != kernel)
        }
    }
}

/// How a FILE_ADD was ruled on: the action (None: not an incoherent-DMA enable, not judged),
/// the rule, how it was enforced with what outcome, the signal still to send, and why.
struct Ruling {
    action: Option<Action>,
    rule: String,
    mechanism: Mechanism,
    outcome: Outcome,
    followup: Option<Signal>,
    reason: Option<String>,
}

/// Judges one FILE_ADD from the process `p` (as read now, or as known) and its VFIO file.
pub fn judge(req: &EnableRequest, p: &ProcessInfo, vfio: Option<VfioFile>, cx: &Context<'_>) -> Judgement {
    let (coherency, disagreement) = coherency(req, vfio.as_ref());
    let verdict = cx.policy.evaluate(p);
    let judged = coherency == Coherency::Noncoherent
        || (coherency == Coherency::Unknown && verdict.unknown == UnknownCoherency::Judge);
    let stopped = req.mechanism == Mechanism::StopAsk && req.signal_sent;
    let ruling = match req.judged {
        // What the kernel did for a file it knew to be non-coherent stands (it judged right).
        KernelJudged::Verdict { action, rule, generation }
            if judged || req.file_coherency == Coherency::Noncoherent || rule == RuleRef::FdSwapped =>
        {
            kernel_ruling(req, cx, judged, KernelVerdict { action, rule, generation })
        }
        // Not an incoherent-DMA enable: observed; a VMM stopped to ask goes on.
        _ if !judged => {
            let (mechanism, outcome, followup) = if stopped {
                (Mechanism::StopAsk, Outcome::Resumed, Some(Signal::Cont))
            } else {
                (Mechanism::None, Outcome::Completed, None)
            };
            Ruling { action: None, rule: verdict.rule_name, mechanism, outcome, followup, reason: None }
        }
        // An enable the kernel asked about, or let through not knowing what it was: decided
        // here. (Let through: the kernel's map said coherent or unknown-and-allowed, the
        // kernel's own verdict says non-coherent. If the policy denies it, it is killed now.)
        _ => {
            let devices = vfio.as_ref().map(|v| v.devices.clone()).unwrap_or_default();
            let (action, reason) = cx.policy.decide_device(&verdict, &devices);
            let (mechanism, outcome, followup) = match (stopped, action, req.judged) {
                (true, Action::Deny, _) => (Mechanism::StopAsk, Outcome::Killed, Some(Signal::Kill)),
                (true, _, _) => (Mechanism::StopAsk, Outcome::Resumed, Some(Signal::Cont)),
                (false, Action::Deny, KernelJudged::Ask) => (Mechanism::None, Outcome::NotEnforced, None),
                (false, Action::Deny, _) => (Mechanism::Sigkill, Outcome::Killed, Some(Signal::Kill)),
                (false, _, _) => (Mechanism::None, Outcome::Completed, None),
            };
            Ruling { action: Some(action), rule: verdict.rule_name, mechanism, outcome, followup, reason }
        }
    };
    let disagreed = disagreement
        .then(|| "the kernel's own coherency verdict disagreed with sysfs; the kernel's wins".to_string());
    let followup = ruling.followup;
    let action = ruling.action;
    let record =
        record(req, p, vfio, coherency, Ruling { reason: ruling.reason.or(disagreed), ..ruling }, cx);
    Judgement { action, coherency, disagreement, followup, record }
}

/// The verdict the kernel applied by itself.
struct KernelVerdict {
    action: Action,
    rule: RuleRef,
    generation: u32,
}

/// A verdict the kernel applied stands: its rule by name, its mechanism and outcome.
fn kernel_ruling(req: &EnableRequest, cx: &Context<'_>, judged: bool, v: KernelVerdict) -> Ruling {
    let sent = req.signal_sent;
    let swapped = (v.rule == RuleRef::FdSwapped).then(|| {
        "a kvm-vfio device was put on the fd while FILE_ADD ran (another file when the request began): never judged, treated as a denial".to_string()
    });
    let rule = match v.rule {
        RuleRef::FdSwapped => "fd-swapped".to_string(),
        RuleRef::Default => "default".to_string(),
        RuleRef::Index(i) if v.generation == cx.generation => {
            cx.policy.rule_name(i).unwrap_or("?").to_string()
        }
        RuleRef::Index(i) => format!("rule#{} (policy generation {})", i + 1, v.generation),
    };
    let (mechanism, outcome) = match (v.action, req.mechanism) {
        (Action::Deny, Mechanism::Lsm) => (Mechanism::Lsm, Outcome::Blocked),
        (Action::Deny, Mechanism::Sigkill) if sent => (Mechanism::Sigkill, Outcome::Killed),
        (Action::Deny, Mechanism::Sigkill) => (Mechanism::Sigkill, Outcome::SignalFailed),
        (Action::Deny, _) => (Mechanism::None, Outcome::NotEnforced),
        _ => (Mechanism::None, Outcome::Completed),
    };
    let action = (judged || swapped.is_some()).then_some(v.action);
    Ruling { action, rule, mechanism, outcome, followup: None, reason: swapped }
}

/// The audit record of a ruling.
fn record(
    req: &EnableRequest,
    p: &ProcessInfo,
    vfio: Option<VfioFile>,
    coherency: Coherency,
    r: Ruling,
    cx: &Context<'_>,
) -> AuditRecord {
    AuditRecord {
        event: if r.action.is_some() { RecordKind::IncoherentDma } else { RecordKind::VfioFileAdd },
        time: cx.time.clone(),
        host: cx.host.to_string(),
        vm: p.vm.clone(),
        identity: VmIdentity::of(p),
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
        coherency: Some(coherency),
        rule: r.rule,
        decision: r.action.map_or(Decision::Allowed, Decision::from),
        mechanism: r.mechanism,
        outcome: r.outcome,
        ret: req.ret,
        reason: r.reason,
        policy: cx.policy.source.clone(),
    }
}

/// A stopped VMM that could not be classified (its /proc could not be read: fds, memory)
/// within the hold limit is denied and killed, never judged by a fallback identity: the
/// agent fails closed. `why` says what could not be read.
pub fn fail_closed(mut j: Judgement, why: &str) -> Judgement {
    j.action = Some(Action::Deny);
    j.followup = Some(Signal::Kill);
    j.record.event = RecordKind::IncoherentDma;
    j.record.decision = Decision::Denied;
    j.record.rule = "unclassified".into();
    j.record.mechanism = Mechanism::StopAsk;
    j.record.outcome = Outcome::Killed;
    j.record.reason = Some(format!("could not be classified ({why}): denied, failing closed"));
    j
}

/// What a policy decides for a recorded request.
#[derive(Debug, Clone, PartialEq)]
pub struct Replayed {
    pub decision: Decision,
    pub rule: String,
    pub reason: Option<String>,
}

/// Replays a recorded decision against `policy`: what it would decide now.
pub fn replay(rec: &AuditRecord, policy: &Policy) -> Replayed {
    let verdict = policy.evaluate(&rec.process());
    let coherency = rec.coherency.unwrap_or(Coherency::Unknown);
    if coherency == Coherency::Coherent
        || (coherency == Coherency::Unknown && verdict.unknown == UnknownCoherency::Allow)
    {
        return Replayed {
            decision: Decision::Allowed,
            rule: verdict.rule_name,
            reason: Some(format!("not judged: coherency {}", coherency.label())),
        };
    }
    let devices = rec.vfio.as_ref().map(|v| v.devices.clone()).unwrap_or_default();
    let (action, reason) = policy.decide_device(&verdict, &devices);
    Replayed { decision: action.into(), rule: verdict.rule_name, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::events::Origin;

    fn req(judged: KernelJudged, mechanism: Mechanism, sent: bool) -> EnableRequest {
        EnableRequest {
            origin: Origin { tgid: 99, comm: "qemu".into(), ktime_ns: 1 },
            fd: 12,
            file_fd: Some(13),
            device_fd_known: false,
            judged,
            mechanism,
            signal_sent: sent,
            ask_recorded: sent,
            ret: Some(-22),
            kernel_coherent: None,
            file_coherency: Coherency::Noncoherent,
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
            uuid: None,
            managed: Default::default(),
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
        let j = judge(&req(deny, Mechanism::Sigkill, true), &proc("tenant-1"), None, &cx);
        assert_eq!(summary(&j), (Decision::Denied, Mechanism::Sigkill, Outcome::Killed, "tenants"));
        let r = &j.record;
        assert_eq!((r.ret, r.request.file_fd, r.request.device_fd_known), (Some(-22), Some(13), false));
        assert_eq!(j.followup, None);
        let j = judge(&req(deny, Mechanism::Sigkill, false), &proc("tenant-1"), None, &cx);
        assert_eq!(j.record.outcome, Outcome::SignalFailed);
        let j = judge(&req(deny, Mechanism::Lsm, false), &proc("tenant-1"), None, &cx);
        assert_eq!((j.record.mechanism, j.record.outcome), (Mechanism::Lsm, Outcome::Blocked));
        let j = judge(&req(deny, Mechanism::None, false), &proc("tenant-1"), None, &cx);
        assert_eq!(j.record.outcome, Outcome::NotEnforced);
        let allow = verdict(Action::Allow, RuleRef::Index(0), 3);
        let j = judge(&req(allow, Mechanism::None, false), &proc("gpu-1"), None, &cx);
        assert_eq!(summary(&j), (Decision::Allowed, Mechanism::None, Outcome::Completed, "gpu"));
        let audit = verdict(Action::Audit, RuleRef::Default, 3);
        let j = judge(&req(audit, Mechanism::None, false), &proc("web"), None, &cx);
        assert_eq!((j.record.decision, j.record.rule.as_str()), (Decision::Audited, "default"));
        // A verdict from an older policy generation names the rule by number.
        let old = verdict(Action::Allow, RuleRef::Index(0), 2);
        let j = judge(&req(old, Mechanism::None, false), &proc("gpu-1"), None, &cx);
        assert!(j.record.rule.contains("generation 2"), "{}", j.record.rule);
    }

    #[test]
    fn ask_is_decided_here() {
        let policy = Policy::parse(POLICY, "p.yaml").unwrap();
        let cx = Context { policy: &policy, generation: 1, host: "h", time: "t".into() };
        let ask = req(KernelJudged::Ask, Mechanism::StopAsk, true);
        let j = judge(&ask, &proc("tenant-9"), None, &cx);
        assert_eq!(
            (j.action, j.followup, j.record.outcome),
            (Some(Action::Deny), Some(Signal::Kill), Outcome::Killed)
        );
        let j = judge(&ask, &proc("gpu-2"), None, &cx);
        assert_eq!(
            (j.action, j.followup, j.record.outcome),
            (Some(Action::Allow), Some(Signal::Cont), Outcome::Resumed)
        );
        // Not stopped (dry run): nothing to carry out.
        let j = judge(&req(KernelJudged::Ask, Mechanism::None, false), &proc("tenant-9"), None, &cx);
        assert_eq!((j.followup, j.record.outcome), (None, Outcome::NotEnforced));
    }

    #[test]
    fn only_incoherent_enables_are_judged() {
        let policy = Policy::parse(POLICY, "p.yaml").unwrap();
        let cx = Context { policy: &policy, generation: 1, host: "h", time: "t".into() };
        // The kernel knew the file coherent: observed, never judged.
        let mut r = req(KernelJudged::Observed, Mechanism::None, false);
        r.file_coherency = Coherency::Coherent;
        let j = judge(&r, &proc("tenant-1"), None, &cx);
        assert_eq!((j.action, j.followup, j.record.event), (None, None, RecordKind::VfioFileAdd));
        // Stopped to ask (unknown to the kernel), then the kernel's own verdict says coherent:
        // resumed, not judged.
        let mut r = req(KernelJudged::Ask, Mechanism::StopAsk, true);
        r.file_coherency = Coherency::Unknown;
        r.kernel_coherent = Some(true);
        let j = judge(&r, &proc("tenant-1"), None, &cx);
        assert_eq!((j.action, j.followup, j.record.outcome), (None, Some(Signal::Cont), Outcome::Resumed));
        // Unknown coherency is judged as non-coherent by default...
        r.kernel_coherent = None;
        let j = judge(&r, &proc("tenant-1"), None, &cx);
        assert_eq!((j.action, j.followup), (Some(Action::Deny), Some(Signal::Kill)));
        // ...unless the policy lets it through.
        let allow = Policy::parse("default: { unknown_coherency: allow }\nrules:\n  - name: t\n    match: { vm: \"tenant-*\" }\n    incoherent_dma: deny\n", "p.yaml").unwrap();
        let cx = Context { policy: &allow, generation: 1, host: "h", time: "t".into() };
        let j = judge(&r, &proc("tenant-1"), None, &cx);
        assert_eq!(
            (j.action, j.followup, j.record.coherency),
            (None, Some(Signal::Cont), Some(Coherency::Unknown))
        );
        // The kernel's verdict wins a disagreement with sysfs, and it is said.
        let mut r = req(KernelJudged::Observed, Mechanism::None, false);
        r.file_coherency = Coherency::Coherent;
        r.kernel_coherent = Some(false);
        let j = judge(
            &r,
            &proc("tenant-1"),
            None,
            &Context { policy: &policy, generation: 1, host: "h", time: "t".into() },
        );
        assert!(j.disagreement);
        assert_eq!(
            (j.action, j.followup, j.record.mechanism),
            (Some(Action::Deny), Some(Signal::Kill), Mechanism::Sigkill)
        );
    }

    #[test]
    fn replay_uses_the_new_policy() {
        let policy = Policy::parse(POLICY, "p.yaml").unwrap();
        let cx = Context { policy: &policy, generation: 1, host: "h", time: "t".into() };
        let audit = verdict(Action::Audit, RuleRef::Default, 1);
        let rec = judge(&req(audit, Mechanism::None, false), &proc("tenant-5"), None, &cx).record;
        let Replayed { decision: d, rule, .. } = replay(&rec, &policy);
        assert_eq!((d, rule.as_str()), (Decision::Denied, "tenants"));
        assert_eq!(replay(&rec, &Policy::embedded()).decision, Decision::Audited);
    }
}
