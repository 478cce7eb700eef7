pub mod cost;
pub mod empty;
pub mod ioctl;
pub mod lifecycle;
pub mod wbinvd;

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    bpf_ktime_get_ns,
    generated::{bpf_get_current_task, bpf_get_current_task_btf},
};
use ioasid_common::{
    counters::Stat,
    events::{EventHeader, EventKind},
    verdict::{start_ticks, ProcKey},
};

use crate::{
    maps::{config, stat_inc},
    read::{Btf, Kptr, Raw},
};

/// (tgid, tid) of the current task.
#[inline(always)]
pub fn current_ids() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// The current process's start (`current->group_leader->start_boottime` in /proc clock ticks,
/// see `start_ticks`): with the tgid, it names the process, so nothing keyed by both is ever
/// inherited by another process on a reused pid. 0 where the layout is not known (or a read
/// fails, counted): the state is then keyed by the tgid alone, as the agent is told.
#[inline(always)]
pub fn current_start() -> u64 {
    if config().task_start_boottime == 0 {
        return 0;
    }
    // SAFETY: a helper without arguments; the task is then read only through
    // bpf_probe_read_kernel (faults safely).
    start_of(Raw(unsafe { bpf_get_current_task() }))
}

/// The start of `task`'s process, read as `P` reads (see `current_start`); the caller checked
/// that the layout is known.
#[inline(always)]
fn start_of<P: Kptr>(task: P) -> u64 {
    let cfg = config();
    match task.ptr(cfg.task_group_leader).and_then(|l| l.field::<u64>(cfg.task_start_boottime)) {
        Ok(ns) => start_ticks(ns),
        Err(_) => {
            stat_inc(Stat::ReadErrors);
            0
        }
    }
}

/// The current process: its tgid and start.
#[inline(always)]
pub fn me() -> ProcKey {
    ProcKey { tgid: current_ids().0, _pad: 0, start: current_start() }
}

/// `me()` for the BTF-typed programs (fentry/fexit, tp_btf; `bpf_get_current_task_btf` is
/// 5.11+): the same two fields, read with plain loads instead of two helper calls (see
/// [`Btf`]). A program of another type calling it is refused at load.
#[inline(always)]
pub fn me_btf() -> ProcKey {
    // A constant to the verifier (the configuration is read-only): where the layout is not
    // known, the loads of `start_of` are never checked, so they cannot be refused.
    let start = if config().task_start_boottime != 0 {
        // SAFETY: a helper without arguments; it returns the current task, BTF-typed.
        start_of(Btf(unsafe { bpf_get_current_task_btf() } as *const u8))
    } else {
        0
    };
    ProcKey { tgid: current_ids().0, _pad: 0, start }
}

/// The header of a ring record of `kind` and `size` bytes, about the current task, now.
#[inline(always)]
pub fn header(kind: EventKind, size: usize, tgid: u32, tid: u32) -> EventHeader {
    let uid_gid = bpf_get_current_uid_gid();
    EventHeader {
        kind: kind.wire(),
        size: size as u32,
        // SAFETY: helper calls without pointer arguments.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        tgid,
        tid,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        // SAFETY: as above.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}
