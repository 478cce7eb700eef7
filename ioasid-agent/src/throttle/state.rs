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

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub fn load(&self) -> Result<Vec<Entry>, ThrottleError> {
        match crate::host::files::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| ThrottleError::State { path: self.path.clone(), why: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(ThrottleError::Io { path: self.path.clone(), source: e }),
        }
    }

    /// What can be read of the file, for an agent starting: every entry it can read, and, if
    /// any of it could not be read (not JSON, an entry of another shape, unreadable bytes),
    /// the file itself kept aside under a new name (returned) so nothing of it is lost when the
    /// state is written next. A missing file is no state.
    pub fn salvage(&self) -> (Vec<Entry>, Option<Result<PathBuf, ThrottleError>>) {
        let bytes = match crate::host::files::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Vec::new(), None),
            Err(e) => {
                let err = ThrottleError::Io { path: self.path.clone(), source: e };
                return (Vec::new(), Some(self.set_aside().map_err(|_| err)));
            }
        };
        if let Ok(all) = serde_json::from_slice::<Vec<Entry>>(&bytes) {
            return (all, None);
        }
        // Entry by entry where the document is a JSON array; nothing where it is not.
        let values: Vec<serde_json::Value> = serde_json::from_slice(&bytes).unwrap_or_default();
        let read: Vec<Entry> = values.into_iter().filter_map(|v| serde_json::from_value(v).ok()).collect();
        (read, Some(self.set_aside()))
    }

    /// Renames the file to `<name>.unreadable-<unix seconds>[-n]`, never over another file.
    fn set_aside(&self) -> Result<PathBuf, ThrottleError> {
        let secs =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let name = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for n in 0..100 {
            let suffix = if n == 0 { String::new() } else { format!("-{n}") };
            let aside = self.path.with_file_name(format!("{name}.unreadable-{secs}{suffix}"));
            if aside.exists() {
                continue;
            }
            return std::fs::rename(&self.path, &aside).map(|()| aside).map_err(io(&self.path));
        }
        Err(ThrottleError::State { path: self.path.clone(), why: "no free name to keep it aside".into() })
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
