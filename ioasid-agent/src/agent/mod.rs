//! The running agent: `daemon` wires the layers together (load, attach, serve, read the rings,
//! shut down) and `actor` is the event loop, the one owner of all mutable state.

pub mod actor;
pub mod daemon;
