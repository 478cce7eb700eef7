//! Decisions: the policy, the judgement of an enable, WBINVD storms, per-VM accounting and
//! blast radius, and the records they produce. No aya and no sockets here: the engine reads the
//! host through `host/`'s injectable types and the kernel through the traits in `ports`, which
//! `kernel/` implements (a test checks that nothing here names `kernel/`, `output/`,
//! `throttle/`, `agent/` or `cmd/`).

pub mod accounting;
pub mod blast;
pub mod enforce;
pub mod events;
pub mod policy;
pub mod ports;
pub mod record;
pub mod storm;
