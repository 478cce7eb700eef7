//! Small accessors for what the programs read from the kernel.

use aya_ebpf::programs::TracePointContext;
use ioasid_common::config::Field;

/// Reads an unsigned tracepoint field of 1, 2, 4 or 8 bytes at the offset tracefs gave.
/// Fields whose format changes width between kernels (e.g. SVM exit codes becoming u64)
/// read correctly either way.
#[inline(always)]
pub fn field_u64(ctx: &TracePointContext, field: Field) -> Result<u64, i64> {
    let off = field.offset as usize;
    // SAFETY: `read_at` uses bpf_probe_read_kernel, which faults safely on a bad offset.
    unsafe {
        match field.size {
            8 => ctx.read_at::<u64>(off).map_err(i64::from),
            4 => ctx.read_at::<u32>(off).map(u64::from).map_err(i64::from),
            2 => ctx.read_at::<u16>(off).map(u64::from).map_err(i64::from),
            1 => ctx.read_at::<u8>(off).map(u64::from).map_err(i64::from),
            _ => Err(-22),
        }
    }
}
