//! The state file: what the agent changed and what to put back, written before each change so
//! that whatever happens next (a crash, a kill, an upgrade) the next agent can undo it.

use std::{io::Write as _, path::PathBuf};

use serde::{Deserialize, Serialize};

use super::{io, ThrottleError};
use crate::util::text_enum;

/// What the agent changed, with what to put back: one entry of the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Saved {
    /// cgroup v2: `dir/cpu.max` held `previous` (e.g. `max 100000`).
    CpuMax { dir: PathBuf, previous: String },
    /// cgroup v1: `dir/cpu.cfs_period_us` and `dir/cpu.cfs_quota_us` held these.
    CfsQuota { dir: PathBuf, period: String, quota: String },
    /// Stopped and continued by the agent; only SIGCONT to put back.
    DutyCycle,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub pid: u32,
    /// The process's start time (clock ticks since boot, /proc/PID/stat): a pid reused by another
    /// process is never signalled.
    pub start_time: u64,
    pub vm: String,
    pub saved: Saved,
}

text_enum! {
    /// How a VMM is throttled (in audit reasons and logs).
    pub enum ThrottleMethod {
        CgroupV2 => "cgroup-v2 cpu.max",
        CgroupV1 => "cgroup-v1 cpu.cfs_quota_us",
        DutyCycle => "duty cycle (the VMM has no cgroup of its own)",
    }
}

impl Entry {
    pub fn method(&self) -> ThrottleMethod {
        match self.saved {
            Saved::CpuMax { .. } => ThrottleMethod::CgroupV2,
            Saved::CfsQuota { .. } => ThrottleMethod::CgroupV1,
            Saved::DutyCycle => ThrottleMethod::DutyCycle,
        }
    }
}

/// The persisted entries: one JSON document, replaced atomically (written, synced, renamed)
/// before each change is applied and after each is undone.
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: PathBuf) -> Self {
        StateFile { path }
    }

    pub fn load(&self) -> Result<Vec<Entry>, ThrottleError> {
        match crate::host::files::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| ThrottleError::State { path: self.path.clone(), why: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(ThrottleError::Io { path: self.path.clone(), source: e }),
        }
    }

    pub fn store(&self, entries: &[Entry]) -> Result<(), ThrottleError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let text = serde_json::to_vec_pretty(entries).expect("entries serialize");
        f.write_all(&text).and_then(|()| f.sync_all()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))
    }
}
