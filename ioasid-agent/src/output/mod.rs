//! What leaves the agent: the audit log and its sinks, the Prometheus registry and per-VM
//! series, the HTTP endpoint (/metrics, /healthz, /readyz) and the exposition-text reader
//! `top` uses.

pub mod audit;
pub mod http;
pub mod promtext;
pub mod telemetry;
