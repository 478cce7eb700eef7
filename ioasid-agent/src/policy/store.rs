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
    /// Bumped by every successful reload; kernel verdicts carry it.
    pub generation: u32,
    path: Option<PathBuf>,
    hash: Option<u64>,
}

fn file_hash(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

impl PolicyStore {
    /// The policy at `path`, or the embedded default without one.
    pub fn open(path: Option<&Path>) -> Result<Self, PolicyError> {
        let (policy, hash) = match path {
            Some(p) => (Policy::load(p)?, file_hash(p)),
            None => (Policy::embedded(), None),
        };
        Ok(Self { policy, generation: 1, path: path.map(Path::to_path_buf), hash })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// True once each time the file's content changed since it was last loaded.
    pub fn changed(&mut self) -> bool {
        let Some(path) = &self.path else { return false };
        let h = file_hash(path);
        if h.is_some() && h != self.hash {
            self.hash = h;
            return true;
        }
        false
    }

    /// Loads the file again. `Ok(false)`: there is no file (the embedded default runs).
    pub fn reload(&mut self) -> Result<bool, PolicyError> {
        let Some(path) = self.path.clone() else { return Ok(false) };
        let policy = Policy::load(&path)?;
        self.hash = file_hash(&path);
        self.policy = policy;
        self.generation += 1;
        Ok(true)
    }
}
