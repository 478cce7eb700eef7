pub mod cost;
pub mod ioctl;
pub mod lifecycle;
pub mod wbinvd;

use aya_ebpf::helpers::bpf_get_current_pid_tgid;

/// (tgid, tid) of the current task.
#[inline(always)]
pub fn current_ids() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}
