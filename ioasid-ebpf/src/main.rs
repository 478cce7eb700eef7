//! ioasid kernel programs.
//!
//! - `programs::wbinvd`: counts guest WBINVD/INVD on both paths KVM has (hardware exits and the
//!   instruction emulator), exactly, in per-CPU maps.
//! - `programs::ioctl`: observes the KVM/VFIO/iommufd ioctls that can turn on incoherent DMA,
//!   judges each KVM_DEV_VFIO_FILE_ADD against the compiled policy and enforces the verdict.
//! - `programs::lifecycle`: process exec (drops a stale verdict) and the kernel's own
//!   non-coherent DMA transitions where trampolines load.
#![no_std]
#![no_main]
// BPF inline assembly (the atomic add in maps.rs); Debian's rustc builds this crate with RUSTC_BOOTSTRAP.
#![feature(asm_experimental_arch)]

mod maps;
mod programs;
mod read;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic; this is never executed.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
