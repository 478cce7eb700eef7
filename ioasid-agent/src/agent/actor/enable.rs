//! The actor's FILE_ADD path: judging each one (`enforce`), carrying out what is left, counting
//! and auditing it; and the asks whose events never arrived.

use std::time::SystemTime;

use ioasid_common::{events::Coherency, verdict::Mechanism};

use super::Actor;
use crate::{
    engine::enforce,
    engine::events::{EnableRequest, KernelJudged},
    engine::policy::Action,
    engine::ports::Kernel,
    engine::record::Outcome,
    host::pidfd,
    host::procfs::{self, ProcError, ProcessInfo},
    host::sys::{monotonic_ns, Signal},
    host::vfio,
    util::text::escape,
    util::time::rfc3339,
};

/// The process an enable is judged as, why it could not be classified if it could not, and
/// why it can no longer be signalled if it has gone (exited, or its pid reused since).
struct Subject {
    info: ProcessInfo,
    unclassified: Option<String>,
    gone: Option<String>,
}

/// How long a stopped VMM whose /proc cannot be read is held unjudged before it is denied.
pub const UNCLASSIFIED_LIMIT_NS: u64 = 5_000_000_000;

impl<K: Kernel> Actor<K> {
    /// Judges one incoherent-DMA enable, carries out what is left to do, audits it. Each
    /// request is decided once: a stopped VMM's request by whoever takes the kernel's ask
    /// record first (its event, or the recovery of a lost one); the other finds it taken.
    pub(super) fn decide(&mut self, req: &EnableRequest, note: Option<&str>) {
        self.decide_as(req, note, true);
    }

    /// As `decide`; `resume: false` leaves an allowed VMM stopped (one found stopped by someone
    /// else: an operator, a storm's `stop`, an agent with another state directory).
    pub(super) fn decide_as(&mut self, req: &EnableRequest, note: Option<&str>, resume: bool) {
        // What libvirt's status said of VMMs since the last sweep: the record names the VM as
        // libvirt and Nova do (a VMM adds its device moments after it was first seen).
        self.apply_libvirt();
        let tgid = req.origin.tgid;
        let Some(Subject { info, unclassified, gone }) = self.subject(req) else { return };
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
        if !self.set.enforce && j.followup == Some(Signal::Kill) {
            // A dry run enforces nothing: a VMM stopped for a decision (a previous, enforcing
            // agent's ask) is resumed, and one that was let through is left alone.
            let stopped = req.mechanism == Mechanism::StopAsk && req.signal_sent;
            j.followup = stopped.then_some(Signal::Cont);
            j.record.outcome = Outcome::NotEnforced;
            j.record.reason = Some("dry run: denied by the policy, not enforced".into());
        }
        if let Some(note) = note.filter(|_| unclassified.is_none()) {
            j.record.reason = Some(note.to_string());
        }
        if !resume && j.followup == Some(Signal::Cont) {
            j.followup = None;
            j.record.outcome = Outcome::LeftStopped;
        }
        if let Some(sig) = j.followup {
            // Only to the process that made the request, through a pidfd bound to it: never
            // to another that took its pid, never "resumed" or "killed" for a dead one.
            if sig == Signal::Kill && gone.is_none() {
                self.kill_mm_siblings(tgid, &info, &mut j.record);
            }
            let sent = match gone {
                Some(why) => Err(why),
                None => pidfd::requester(&self.set.procfs, tgid, req.origin.ktime_ns)
                    .and_then(|start| self.kernel.signal(tgid, start, sig).map_err(|e| e.to_string())),
            };
            if let Err(why) = sent {
                tracing::info!(pid = tgid, signal = ?sig, why = %why, "the VMM judged is gone: nothing sent");
                j.record.outcome = Outcome::Gone;
                j.record.reason = Some(format!("no {sig:?} sent: {why}"));
            }
        }
        self.account(tgid, &info, j);
    }

    /// Kills every process sharing the denied VMM's address space (CLONE_VM siblings, found
    /// while the VMM still lives: it is stopped or about to be killed): any of them could run
    /// its VM on, incoherent DMA and all. Each through a pidfd of the process found; said in the
    /// record.
    fn kill_mm_siblings(
        &mut self,
        tgid: u32,
        info: &ProcessInfo,
        record: &mut crate::engine::record::AuditRecord,
    ) {
        let mut killed = Vec::new();
        for q in self.set.procfs.mm_siblings(tgid) {
            let Ok(start) = self.set.procfs.start_time(q) else { continue };
            match self.kernel.signal(q, start, Signal::Kill) {
                Ok(()) => killed.push(q.to_string()),
                Err(e) => {
                    tracing::warn!(pid = q, vmm = tgid, error = %e, "killing a process that shares a denied VMM's address space")
                }
            }
        }
        if killed.is_empty() {
            return;
        }
        tracing::warn!(pid = tgid, vm = %escape(&info.vm), siblings = %killed.join(","), "killed with the denied VMM: processes sharing its address space (CLONE_VM)");
        let also = format!("also killed, sharing its address space (CLONE_VM): {}", killed.join(", "));
        record.reason = Some(match record.reason.take() {
            Some(r) => format!("{r}; {also}"),
            None => also,
        });
    }

    /// Who asks, as the policy must see them: for a stopped VMM (an ask), what it is now, read
    /// afresh. None when there is nothing to decide now: its /proc cannot be read yet (its ask
    /// stays open in the kernel and is retried from the record each sweep, until
    /// UNCLASSIFIED_LIMIT_NS, then it is denied: fail closed, never a fallback identity), or
    /// its request was already decided.
    fn subject(&mut self, req: &EnableRequest) -> Option<Subject> {
        let tgid = req.origin.tgid;
        if !matches!(req.judged, KernelJudged::Ask) {
            return Some(Subject {
                info: self.classify(tgid, &req.origin.comm),
                unclassified: None,
                gone: None,
            });
        }
        // The process on the pid now may not be the one that asked (it died, a new one took
        // the pid while no agent ran): then it is judged as what asked, and nothing is sent.
        let gone = pidfd::requester(&self.set.procfs, tgid, req.origin.ktime_ns).err();
        let fresh = match &gone {
            None => self.set.procfs.info(tgid),
            Some(_) => Err(ProcError::Gone { pid: tgid }),
        };
        let mut unclassified = None;
        if let (Err(e), true) = (&fresh, req.ask_recorded) {
            if !e.is_gone() {
                let age = monotonic_ns().saturating_sub(req.origin.ktime_ns);
                let open =
                    self.kernel.asks().iter().any(|(t, a)| *t == tgid && a.ktime_ns == req.origin.ktime_ns);
                if open && age < UNCLASSIFIED_LIMIT_NS {
                    tracing::warn!(pid = tgid, error = %e, "cannot read a stopped VMM's /proc: holding it unjudged, retried from the kernel's ask record");
                    return None;
                }
                unclassified = Some(format!("{e}; still after {} s", UNCLASSIFIED_LIMIT_NS / 1_000_000_000));
            }
        }
        if req.ask_recorded && !self.kernel.take_ask(tgid, req.origin.ktime_ns) {
            tracing::debug!(
                pid = tgid,
                "a stopped VMM's request was already decided: its late event is ignored"
            );
            return None;
        }
        let info = match fresh {
            Ok(info) => {
                let info = self.acct.replace(info).clone();
                self.write_verdict(&info);
                info
            }
            Err(_) if gone.is_some() => self.former(tgid, req),
            Err(_) => self.classify(tgid, &req.origin.comm),
        };
        Some(Subject { info, unclassified, gone })
    }

    /// What asked, when its pid no longer shows it: the agent's own record of it (if that
    /// process started before the request), else the command line the kernel captured when it
    /// created its VM, else its pid. Never the process that holds the pid now.
    fn former(&self, tgid: u32, req: &EnableRequest) -> ProcessInfo {
        if let Some(p) =
            self.acct.find(tgid).filter(|p| pidfd::started_before(p.info.start_time, req.origin.ktime_ns))
        {
            return p.info.clone();
        }
        // The command line the kernel captured, if its process started before the request.
        if let Some(info) = self
            .kernel
            .cmdline(tgid)
            .and_then(|c| procfs::info_from_captured(tgid, &c))
            .filter(|i| i.start_time == 0 || pidfd::started_before(i.start_time, req.origin.ktime_ns))
        {
            return info;
        }
        let comm = if req.origin.comm.is_empty() { "unknown" } else { req.origin.comm.as_str() };
        ProcessInfo {
            pid: tgid,
            comm: comm.to_string(),
            vm: format!("{comm}:{tgid}"),
            exe: None,
            cgroup: None,
            uid: u32::MAX,
            start_time: 0,
            uuid: None,
            managed: Default::default(),
        }
    }

    /// Counts a decided enable, marks the VM non-coherent if a non-coherent file was really
    /// added, and writes its record.
    fn account(&mut self, tgid: u32, info: &ProcessInfo, j: enforce::Judgement) {
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
        let added = j.record.ret == Some(0) && j.action != Some(Action::Deny);
        if added && j.coherency == Coherency::Noncoherent {
            self.mark_noncoherent(tgid);
        }
        if let Some(r) = &self.record {
            r.record_quiet(j.record.clone());
        }
        self.audit.record(j.record);
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
