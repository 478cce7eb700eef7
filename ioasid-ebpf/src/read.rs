//! Small accessors for what the programs read from the kernel.

use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::TracePointContext};
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

/// Reads a kernel value at `addr` (faults safely).
#[inline(always)]
pub fn kread<T>(addr: u64) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel faults safely on any address.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(i64::from)
}

/// A kernel pointer, and how the programs read the fields behind it.
pub trait Kptr: Copy {
    /// The `T` at byte offset `off` (an offset from the configuration).
    fn field<T: Copy>(self, off: u32) -> Result<T, i64>;
    /// The pointer at byte offset `off` (NULL is an error).
    fn ptr(self, off: u32) -> Result<Self, i64>;
    /// The address as a number (a null check, an address for `bpf_probe_read_kernel`).
    fn addr(self) -> u64;
}

/// A pointer whose BTF type the verifier knows: a tp_btf/fentry/fexit argument, or a pointer
/// member loaded from one this way. Its fields are read with plain loads: the offsets come
/// from the read-only (frozen) configuration, so they are constants to the verifier, which
/// checks each access against the kernel's BTF and makes it fault-safe (a fault reads 0). No
/// helper call per field: every emulated instruction, and every WBINVD, reads some. A pointer
/// member loaded this way is typed only where it points to a struct the BTF defines (not a
/// forward declaration: see `KvmLayout::ctxt_typed`); a program loading through any other is
/// refused at load.
#[derive(Clone, Copy)]
pub struct Btf(pub *const u8);

/// An address known only as a number (read from memory as one, e.g. `ctxt->vcpu`, a `void *`):
/// read with `bpf_probe_read_kernel`.
#[derive(Clone, Copy)]
pub struct Raw(pub u64);

impl Kptr for Btf {
    #[inline(always)]
    fn field<T: Copy>(self, off: u32) -> Result<T, i64> {
        // SAFETY: see `Btf`: the verifier refuses at load (never runs) a load it cannot type.
        Ok(unsafe { core::ptr::read_volatile(self.0.wrapping_add(off as usize).cast::<T>()) })
    }

    #[inline(always)]
    fn ptr(self, off: u32) -> Result<Self, i64> {
        let p: *const u8 = self.field(off)?;
        if p.is_null() {
            return Err(-14);
        }
        Ok(Btf(p))
    }

    #[inline(always)]
    fn addr(self) -> u64 {
        self.0 as u64
    }
}

impl Kptr for Raw {
    #[inline(always)]
    fn field<T: Copy>(self, off: u32) -> Result<T, i64> {
        kread(self.0.wrapping_add(u64::from(off)))
    }

    #[inline(always)]
    fn ptr(self, off: u32) -> Result<Self, i64> {
        match self.field::<u64>(off)? {
            0 => Err(-14),
            p => Ok(Raw(p)),
        }
    }

    #[inline(always)]
    fn addr(self) -> u64 {
        self.0
    }
}
