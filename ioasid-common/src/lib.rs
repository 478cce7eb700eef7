//! Wire types and constants shared by the ioasid kernel programs and the agent.
//!
//! Everything here crosses the user/kernel boundary: `#[repr(C)]`, fixed-width integers, explicit
//! padding, and a size assertion per type. Enum-like values travel as `u32`; each has a
//! `#[repr(u32)]` enum here with `TryFrom<u32>`, so the agent decodes them once, at the edge.
//! Nothing on the wire is a `bool`, a Rust enum or a `usize`.
//!
//! One module per feature:
//! - [`names`]: every map name and size (the programs' names are in [`hooks`]);
//! - [`hooks`]: the one table of every hook (program, attach point, required/optional, purpose);
//! - [`abi`]: x86 and KVM ABI constants; [`ioctl`]: the one list of watched ioctls, with names;
//! - [`counters`]: WBINVD/INVD counter keys and kernel statistics; [`cost`]: handler time;
//! - [`verdict`]: the policy as compiled into the kernel, and asks;
//! - [`events`]: ring buffer records; [`config`]: load-time configuration;
//! - [`decode`]: decoders the kernel runs, unit-tested here on the host.
#![no_std]

#[macro_use]
mod wire;

pub mod abi;
pub mod config;
pub mod cost;
pub mod counters;
pub mod decode;
pub mod events;
pub mod hooks;
pub mod ioctl;
pub mod judge;
pub mod names;
pub mod verdict;

pub use wire::UnknownValue;

#[cfg(feature = "user")]
mod pod {
    use crate::{config, cost, counters, events, verdict};
    // SAFETY: each of these is `repr(C)`, made only of integers and integer arrays with explicit
    // padding fields, so every bit pattern is a valid value.
    unsafe impl aya::Pod for counters::CounterKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for verdict::VmVerdict {}
    // SAFETY: as above.
    unsafe impl aya::Pod for verdict::FdKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for verdict::ProcKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for verdict::Asked {}
    // SAFETY: as above.
    unsafe impl aya::Pod for config::ProgConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for config::Control {}
    // SAFETY: as above.
    unsafe impl aya::Pod for events::IoctlEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for events::Cmdline {}
    // SAFETY: as above.
    unsafe impl aya::Pod for cost::CostKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for cost::Pending {}
    // SAFETY: as above.
    unsafe impl aya::Pod for cost::BlastKey {}
}
