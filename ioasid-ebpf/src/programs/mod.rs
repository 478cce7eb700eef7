pub mod cost;
pub mod empty;
pub mod ioctl;
pub mod lifecycle;
pub mod wbinvd;

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    bpf_ktime_get_ns,
};
use ioasid_common::events::{EventHeader, EventKind};

/// (tgid, tid) of the current task.
#[inline(always)]
pub fn current_ids() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
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
