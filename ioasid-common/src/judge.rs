//! The kernel's judgement of one FILE_ADD, as a pure function: what it knows (the file's
//! coherency as the agent resolved it, the process's verdict, whether it enforces and how, the
//! room left in the decisions ring) in; the decision, its mechanism and the return value out.
//! Every kernel path (sys_enter, the observing LSM, the enforcing-only LSM, a swapped fd) uses
//! it, and it is unit-tested on the host.

use crate::{
    abi::{EPERM, SIGKILL, SIGSTOP},
    events::Coherency,
    verdict::{Decision, Mechanism, VmVerdict, RULE_NONE},
};

/// What the kernel knows when a FILE_ADD enters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileAdd {
    /// The file's coherency as the agent resolved it for the fd (`Unknown` if it has not).
    pub coherency: Coherency,
    /// The process's verdict, if the agent has classified it.
    pub verdict: Option<VmVerdict>,
    /// Verdicts are enforced (false: a dry run, observe only).
    pub enforce: bool,
    /// The LSM program is attached: a denial is refused with -EPERM instead of SIGKILL.
    pub lsm_enforces: bool,
    /// Fewer than `DECISIONS_RESERVE` events fit the decisions ring.
    pub ring_low: bool,
    /// The calling process shares its address space with another process (a CLONE_VM
    /// sibling, which can run the same VM): a signal from here would kill the caller alone.
    pub shared_mm: bool,
}

/// The kernel's judgement of one FILE_ADD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judged {
    pub decision: Decision,
    /// How it is carried out (`None` when nothing is: allowed, audited, observed, dry run).
    pub mechanism: Mechanism,
    /// The verdict's rule and policy generation ([`RULE_NONE`]: no verdict applied).
    pub rule: u32,
    pub generation: u32,
}

impl Judged {
    /// A FILE_ADD on a file the kernel cannot tell is KVM's (an unrecognised file at the LSM,
    /// e.g. a kvm-vfio device of a module reloaded a moment ago): refused, never let through
    /// unjudged.
    pub const UNRECOGNISED: Judged =
        Judged { decision: Decision::Deny, mechanism: Mechanism::Lsm, rule: RULE_NONE, generation: 0 };

    /// The return value of the LSM hook for it: -EPERM when the LSM refuses it, else 0 (the
    /// ioctl runs).
    pub const fn lsm_return(&self) -> i32 {
        lsm_return(self.mechanism)
    }

    /// The signal the kernel sends the calling process for it: SIGKILL for a denial it cannot
    /// refuse, SIGSTOP to ask the agent.
    pub const fn signal(&self) -> Option<u32> {
        match self.mechanism {
            Mechanism::Sigkill => Some(SIGKILL),
            Mechanism::StopAsk => Some(SIGSTOP),
            _ => None,
        }
    }
}

/// The one mapping from how a FILE_ADD is enforced to what the LSM hook returns: -EPERM when
/// the LSM refuses it, else 0.
pub const fn lsm_return(mechanism: Mechanism) -> i32 {
    match mechanism {
        Mechanism::Lsm => -EPERM,
        _ => 0,
    }
}

/// Judges one FILE_ADD.
pub fn judge(f: &FileAdd) -> Judged {
    // Not an incoherent-DMA enable: the file's IOMMU keeps its DMA coherent. Observed, whatever
    // the verdict or the ring.
    if f.coherency == Coherency::Coherent {
        return Judged {
            decision: Decision::Observed,
            mechanism: Mechanism::None,
            rule: RULE_NONE,
            generation: 0,
        };
    }
    let (mut decision, rule, generation) = match (f.coherency, f.verdict) {
        (_, None) => (Decision::Ask, RULE_NONE, 0),
        (c, Some(v)) => {
            let d = Decision::try_from(v.decision).unwrap_or(Decision::Ask);
            let d = match (c, d) {
                (Coherency::Unknown, _) if v.unknown_allowed != 0 => Decision::Observed,
                // Never kill for a device the agent could not resolve yet: it may be coherent.
                (Coherency::Unknown, Decision::Deny) => Decision::Ask,
                // A verdict is never `None`; a map holding one is treated as no verdict.
                (_, Decision::None) => Decision::Ask,
                (_, d) => d,
            };
            (d, v.rule, v.generation)
        }
    };
    if !f.enforce {
        return Judged { decision, mechanism: Mechanism::None, rule, generation };
    }
    // An enable the kernel would let through while its event might not fit the decisions ring:
    // stop and ask instead. The ask record is then the request's record, and the agent decides
    // and audits it even if the event is lost.
    if matches!(decision, Decision::Allow | Decision::Audit | Decision::Observed) && f.ring_low {
        decision = Decision::Ask;
    }
    // A denial the LSM cannot refuse, by a process whose address space another process shares:
    // a SIGKILL from here would leave that one running the VM. Stopped and asked instead: the
    // agent kills every process of that address space.
    if decision == Decision::Deny && !f.lsm_enforces && f.shared_mm {
        decision = Decision::Ask;
    }
    let mechanism = match decision {
        Decision::Deny if f.lsm_enforces => Mechanism::Lsm,
        Decision::Deny => Mechanism::Sigkill,
        Decision::Ask => Mechanism::StopAsk,
        _ => Mechanism::None,
    };
    Judged { decision, mechanism, rule, generation }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(d: Decision, unknown_allowed: bool) -> Option<VmVerdict> {
        Some(VmVerdict {
            decision: d.wire(),
            rule: 3,
            generation: 7,
            unknown_allowed: u32::from(unknown_allowed),
            start: 0,
        })
    }

    fn add(coherency: Coherency, verdict: Option<VmVerdict>) -> FileAdd {
        FileAdd { coherency, verdict, enforce: true, lsm_enforces: false, ring_low: false, shared_mm: false }
    }

    #[test]
    fn coherent_files_are_observed_never_signalled() {
        for v in [None, verdict(Decision::Deny, false), verdict(Decision::Allow, true)] {
            let j = judge(&add(Coherency::Coherent, v));
            assert_eq!((j.decision, j.mechanism, j.signal()), (Decision::Observed, Mechanism::None, None));
        }
    }

    #[test]
    fn no_verdict_asks() {
        let j = judge(&add(Coherency::Noncoherent, None));
        assert_eq!((j.decision, j.mechanism, j.rule), (Decision::Ask, Mechanism::StopAsk, RULE_NONE));
        assert_eq!((j.signal(), j.lsm_return()), (Some(SIGSTOP), 0));
    }

    #[test]
    fn a_deny_is_refused_by_the_lsm_or_killed() {
        let mut f = add(Coherency::Noncoherent, verdict(Decision::Deny, false));
        let j = judge(&f);
        assert_eq!(
            (j.decision, j.mechanism, j.signal(), j.lsm_return()),
            (Decision::Deny, Mechanism::Sigkill, Some(SIGKILL), 0)
        );
        assert_eq!((j.rule, j.generation), (3, 7));
        f.lsm_enforces = true;
        let j = judge(&f);
        assert_eq!((j.mechanism, j.signal(), j.lsm_return()), (Mechanism::Lsm, None, -EPERM));
    }

    #[test]
    fn a_deny_by_a_process_sharing_its_address_space_is_asked_unless_the_lsm_refuses_it() {
        let mut f = add(Coherency::Noncoherent, verdict(Decision::Deny, false));
        f.shared_mm = true;
        let j = judge(&f);
        assert_eq!((j.decision, j.mechanism, j.signal()), (Decision::Ask, Mechanism::StopAsk, Some(SIGSTOP)));
        assert_eq!((j.rule, j.generation), (3, 7), "the verdict it was judged by is kept");
        f.lsm_enforces = true;
        let j = judge(&f);
        assert_eq!((j.decision, j.mechanism, j.lsm_return()), (Decision::Deny, Mechanism::Lsm, -EPERM));
        // Nothing else changes for it.
        let mut f = add(Coherency::Noncoherent, verdict(Decision::Allow, false));
        f.shared_mm = true;
        assert_eq!(judge(&f).mechanism, Mechanism::None);
    }

    #[test]
    fn unknown_coherency_follows_the_policy_on_every_path() {
        // Let through unjudged where the policy says so, even under a deny.
        let j = judge(&add(Coherency::Unknown, verdict(Decision::Deny, true)));
        assert_eq!((j.decision, j.mechanism), (Decision::Observed, Mechanism::None));
        // Judged, but a deny for a file that may be coherent is asked about, on the LSM path too.
        let mut f = add(Coherency::Unknown, verdict(Decision::Deny, false));
        f.lsm_enforces = true;
        let j = judge(&f);
        assert_eq!((j.decision, j.mechanism, j.lsm_return()), (Decision::Ask, Mechanism::StopAsk, 0));
        let j = judge(&add(Coherency::Unknown, verdict(Decision::Audit, false)));
        assert_eq!(j.decision, Decision::Audit);
    }

    #[test]
    fn a_low_ring_turns_what_would_pass_into_an_ask() {
        for d in [Decision::Allow, Decision::Audit] {
            let mut f = add(Coherency::Noncoherent, verdict(d, false));
            f.ring_low = true;
            assert_eq!(judge(&f).decision, Decision::Ask);
        }
        // Unknown coherency let through by the policy is asked about too; a coherent file is
        // no enable at all and passes.
        let mut f = add(Coherency::Unknown, verdict(Decision::Deny, true));
        f.ring_low = true;
        assert_eq!(judge(&f).mechanism, Mechanism::StopAsk);
        let mut f = add(Coherency::Coherent, None);
        f.ring_low = true;
        assert_eq!(judge(&f).mechanism, Mechanism::None);
        // A deny stays a deny.
        let mut f = add(Coherency::Noncoherent, verdict(Decision::Deny, false));
        f.ring_low = true;
        assert_eq!(judge(&f).decision, Decision::Deny);
    }

    #[test]
    fn a_dry_run_enforces_nothing() {
        let mut f = add(Coherency::Noncoherent, verdict(Decision::Deny, false));
        f.enforce = false;
        f.ring_low = true;
        let j = judge(&f);
        assert_eq!(
            (j.decision, j.mechanism, j.signal(), j.lsm_return()),
            (Decision::Deny, Mechanism::None, None, 0)
        );
    }

    #[test]
    fn an_unrecognised_file_is_refused() {
        assert_eq!(Judged::UNRECOGNISED.lsm_return(), -EPERM);
        assert_eq!(Judged::UNRECOGNISED.signal(), None);
    }
}
