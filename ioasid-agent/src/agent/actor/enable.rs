//! The actor's FILE_ADD path: judging each one (`enforce`), carrying out what is left, counting
//! and auditing it; and the asks whose events never arrived.

use std::time::SystemTime;

use ioasid_common::events::Coherency;

use super::Actor;
use crate::{
    engine::enforce,
    engine::events::{EnableRequest, KernelJudged},
    engine::policy::Action,
    engine::ports::Kernel,
    engine::record::Outcome,
    host::sys::monotonic_ns,
    host::vfio,
    util::text::escape,
    util::time::rfc3339,
};

/// How long a stopped VMM whose /proc cannot be read is held unjudged before it is denied.
pub const UNCLASSIFIED_LIMIT_NS: u64 = 5_000_000_000;

impl<K: Kernel> Actor<K> {
    /// Judges one incoherent-DMA enable, carries out what is left to do, audits it. Each
    /// request is decided once: a stopped VMM's request by whoever takes the kernel's ask
    /// record first (its event, or the recovery of a lost one); the other finds it taken.
    pub(super) fn decide(&mut self, req: &EnableRequest, note: Option<&str>) {
        let tgid = req.origin.tgid;
        let mut unclassified = None;
        let info = match req.judged {
            KernelJudged::Ask => {
                // The kernel stopped the process: judge it on what it is now. When its /proc
                // cannot be read (no fds or memory left), it is never judged by a fallback
                // identity: its ask stays open in the kernel and is retried from the record
                // each sweep; past UNCLASSIFIED_LIMIT_NS it is denied (fail closed).
                let fresh = self.set.procfs.info(tgid);
                let unreadable = match &fresh {
                    Err(e) if req.ask_recorded && !e.is_gone() => Some(e.to_string()),
                    _ => None,
                };
                if let Some(e) = unreadable {
                    let age = monotonic_ns().saturating_sub(req.origin.ktime_ns);
                    let open = self
                        .kernel
                        .asks()
                        .iter()
                        .any(|(t, a)| *t == tgid && a.ktime_ns == req.origin.ktime_ns);
                    if open && age < UNCLASSIFIED_LIMIT_NS {
                        tracing::warn!(pid = tgid, error = %e, "cannot read a stopped VMM's /proc: holding it unjudged, retried from the kernel's ask record");
                        return;
                    }
                    unclassified =
                        Some(format!("{e}; still after {} s", UNCLASSIFIED_LIMIT_NS / 1_000_000_000));
                }
                if req.ask_recorded && !self.kernel.take_ask(tgid, req.origin.ktime_ns) {
                    tracing::debug!(
                        pid = tgid,
                        "a stopped VMM's request was already decided: its late event is ignored"
                    );
                    return;
                }
                match fresh {
                    Ok(info) => {
                        self.acct.replace(info.clone());
                        self.write_verdict(&info);
                        info
                    }
                    Err(_) => self.classify(tgid, &req.origin.comm),
                }
            }
            KernelJudged::Verdict { .. } | KernelJudged::Observed => self.classify(tgid, &req.origin.comm),
        };
        let vfio = req.file_fd.map(|fd| vfio::resolve(&self.set.procfs, &self.set.sysfs, tgid, fd));
        let cx = enforce::Context {
            policy: &self.policy.policy,
            generation: self.policy.generation,
            host: &self.set.host,
            time: rfc3339(SystemTime::now()),
        };
        let mut j = enforce::judge(req, &info, vfio, &cx);
        if let Some(why) = &unclassified {
            tracing::error!(pid = tgid, error = %why, "a stopped VMM could not be classified: denied (fail closed)");
            j = enforce::fail_closed(j, why);
        }
        if !self.set.enforce && j.followup == Some(crate::host::sys::Signal::Kill) {
            // A dry run enforces nothing: a VMM stopped for a decision (a previous, enforcing
            // agent's ask) is resumed, and one that was let through is left alone.
            let stopped = req.mechanism == ioasid_common::verdict::Mechanism::StopAsk && req.signal_sent;
            j.followup = stopped.then_some(crate::host::sys::Signal::Cont);
            j.record.outcome = Outcome::NotEnforced;
            j.record.reason = Some("dry run: denied by the policy, not enforced".into());
        }
        let mut record = j.record;
        if let Some(note) = note.filter(|_| unclassified.is_none()) {
            record.reason = Some(note.to_string());
        }
        if let Some(sig) = j.followup {
            if let Err(e) = self.kernel.signal(tgid, sig) {
                record.outcome = Outcome::Gone;
                record.reason = Some(format!("{sig:?}: {e}"));
            }
        }
        self.series.file_add(&info.vm, j.coherency);
        if let Some(action) = j.action {
            self.series.request(&info.vm, action.into());
        }
        if j.disagreement {
            self.metrics.coherency_disagreements.inc();
            tracing::warn!(pid = tgid, vm = %escape(&info.vm), "the kernel's own coherency verdict disagrees with sysfs; the kernel's wins");
        }
        // A device the IOMMU does not keep coherent was really added: from now on KVM really
        // executes this VM's WBINVD. (Where the registration fentry hooks load, the kernel
        // also says so itself.)
        let added = record.ret == Some(0) && j.action != Some(Action::Deny);
        if added && j.coherency == Coherency::Noncoherent {
            self.mark_noncoherent(tgid);
        }
        if let Some(r) = &self.record {
            r.record_quiet(record.clone());
        }
        self.audit.record(record);
    }

    /// Decides for processes the kernel stopped to ask whose event never arrived (ring buffer
    /// full, or dropped): no VMM stays stopped. The kernel's ask record carries the fds.
    pub fn recover_asks(&mut self, older_than_ns: u64) {
        let now = monotonic_ns();
        let stale =
            self.kernel.asks().into_iter().filter(|(_, a)| now.saturating_sub(a.ktime_ns) >= older_than_ns);
        for (tgid, a) in stale.collect::<Vec<_>>() {
            let why = if a.ktime_ns < self.started_ns {
                tracing::warn!(pid = tgid, "a previous agent left this VMM stopped for a decision: deciding from the kernel's ask record");
                "asked before this agent started (adopted from the kernel's pinned state); decided from the kernel's ask record"
            } else {
                tracing::warn!(
                    pid = tgid,
                    "a stopped VMM's FILE_ADD event never arrived: deciding from the kernel's ask record"
                );
                "event lost; decided from the kernel's ask record"
            };
            self.decide(&EnableRequest::from_ask(tgid, &a), Some(why));
        }
    }
}
