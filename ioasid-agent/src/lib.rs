//! ioasid-agent: the daemon and CLI, as a library (the binary is `main.rs`; the integration
//! tests use the typed records and metric names from here).
//!
//! The tree is the architecture; each layer may use only the layers listed below it (checked
//! by the test `layers::imports_point_down`):
//!
//! ```text
//! cmd/      the CLI and its subcommands                     -> anything below
//! agent/    daemon (wiring) and actor (the event loop)      -> kernel, throttle, output, engine, host, util
//! kernel/   aya: load, attach, BTF, tracefs, rings, decode  -> output, engine, host, util
//! throttle/ cgroup limits and the duty cycle                -> engine, host, util
//! output/   audit log and sinks, metrics, HTTP              -> engine, host, util
//! engine/   policy, judgement, storms, accounting, records  -> host, util
//! host/     procfs, sysfs (VFIO), syscalls                  -> util
//! util/     text, units, time                               -> nothing
//! ```

pub mod agent;
pub mod cmd;
pub mod engine;
pub mod host;
pub mod kernel;
pub mod output;
pub mod throttle;
pub mod util;

#[cfg(test)]
mod docs_current;
#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod layers;
