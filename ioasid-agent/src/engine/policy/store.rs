//! The policy in force: the compiled policy, its generation, and the file it came from (watched
//! for changes by content hash). A reload is atomic: the new file is validated and compiled
//! first; if it is bad, the last good policy stays in force.

use std::{
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
};

use super::{Policy, PolicyError};

pub struct PolicyStore {
    pub policy: Policy,
    /// SHA-256 (hex) of the bytes of the policy in force (`ioasid_policy_info`), so a fleet can
    /// see which policy each host runs.
    pub sha256: String,
    /// Bumped by every successful reload; kernel verdicts carry it.
    pub generation: u32,
    path: Option<PathBuf>,
    hash: Option<u64>,
    /// New content seen at the last check: applied only once the next check sees it unchanged
    /// (a file caught mid-write, not renamed into place, is not applied until it is stable).
    pending: Option<u64>,
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// The hash of a regular file's content (bounded like a policy load), if it can be read.
fn file_hash(path: &Path) -> Option<u64> {
    use std::io::Read;
    let file = crate::host::files::open_read(path).ok()?;
    let mut bytes = Vec::new();
    file.take(super::MAX_POLICY_BYTES + 1).read_to_end(&mut bytes).ok()?;
    Some(hash(&bytes))
}

impl PolicyStore {
    /// The policy at `path`, or the embedded default without one.
    pub fn open(path: Option<&Path>) -> Result<Self, PolicyError> {
        let (policy, hash, sha256) = match path {
            Some(p) => {
                let (policy, bytes) = Policy::load_bytes(p)?;
                (policy, Some(hash(&bytes)), sha256(&bytes))
            }
            None => (Policy::embedded(), None, sha256(super::EMBEDDED_DEFAULT.as_bytes())),
        };
        for note in policy.notes() {
            tracing::warn!(policy = %policy.source, "{note}");
        }
        Ok(Self { policy, sha256, generation: 1, path: path.map(Path::to_path_buf), hash, pending: None })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// True once each time the file's content changed since it was last loaded and then stayed
    /// the same for one check interval.
    pub fn changed(&mut self) -> bool {
        let Some(path) = &self.path else { return false };
        let h = file_hash(path);
        if h.is_none() || h == self.hash {
            self.pending = None;
            return false;
        }
        if self.pending == h {
            self.pending = None;
            self.hash = h;
            return true;
        }
        self.pending = h;
        false
    }

    /// Puts a policy parsed from the file (off the event loop: `Policy::load_bytes`) in force.
    /// Records the hash of the bytes parsed: a file rewritten during a slow reload differs from
    /// it, and is loaded at the next check.
    pub fn install(&mut self, policy: Policy, bytes: &[u8]) {
        for note in policy.notes() {
            tracing::warn!(policy = %policy.source, "{note}");
        }
        self.hash = Some(hash(bytes));
        self.sha256 = sha256(bytes);
        self.policy = policy;
        self.generation += 1;
    }
}
