//! Kernel state that outlives the agent: the maps of `PERSISTENT_MAPS`, pinned in bpffs under
//! the state directory (`--state-dir`, default /sys/fs/bpf/ioasid) and adopted by the next agent
//! (after a crash, a restart or an upgrade).
//!
//! The pins live in `<state-dir>/maps-<layout>`, where `<layout>` hashes each persistent map's
//! definition (type, key and value size, entries, flags) in the object: an agent only ever
//! adopts maps laid out as its programs expect. An upgrade that changes a layout cannot adopt
//! the old maps; it says so and removes them.
//!
//! Except the asks (`IOASID_ASKED`: which VMMs the kernel stopped for a decision, and their
//! FILE_ADD's fds): they are pinned beside, at `<state-dir>/asked-v1`, in a format frozen for
//! every later agent (a test holds its definition), so a VMM stopped for a decision is decided
//! by whichever agent comes next, whatever else its upgrade changed.

use std::{
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use ioasid_common::names::{MAP_ASKED, PERSISTENT_MAPS};

/// Where the asks are pinned under the state directory: version 1 of their format (a hash map
/// from tgid to `Asked`, 16 bytes), never changed in place.
pub const ASKED_PIN: &str = "asked-v1";

/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/sys/fs/bpf/ioasid";
/// Where bpffs is mounted when nothing is.
const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state directory {0} is not on a BPF filesystem (mount -t bpf bpf /sys/fs/bpf, or give --state-dir on one)"
    )]
    NotBpffs(PathBuf),
    #[error("reading the object's map definitions")]
    Object(#[source] aya_obj::ParseError),
}

/// The pin directory of this agent's map layout, and which maps a previous agent left there.
#[derive(Debug)]
pub struct StateDir {
    /// The state directory (`--state-dir`).
    pub base: PathBuf,
    /// The pin directory of this agent's map layout.
    pub dir: PathBuf,
    pub adopted: Vec<&'static str>,
}

impl StateDir {
    pub fn pin_path(&self, map: &str) -> PathBuf {
        pin_path(&self.base, &self.dir, map)
    }
}

fn pin_path(base: &Path, dir: &Path, map: &str) -> PathBuf {
    if map == MAP_ASKED {
        base.join(ASKED_PIN)
    } else {
        dir.join(map)
    }
}

/// Makes sure `base` is on bpffs (mounting it at /sys/fs/bpf where nothing is mounted), makes the
/// layout's pin directory and removes any other layout's.
pub fn prepare(base: &Path, object: &[u8]) -> Result<StateDir, StateError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StateError::Io { path, source }
    };
    if !on_bpffs(base) {
        if base.starts_with(BPFFS) && !on_bpffs(Path::new(BPFFS)) && Path::new(BPFFS).is_dir() {
            mount_bpffs(Path::new(BPFFS)).map_err(io(Path::new(BPFFS)))?;
        }
        if !on_bpffs(base) {
            return Err(StateError::NotBpffs(base.to_path_buf()));
        }
    }
    let dir = base.join(format!("maps-{:016x}", layout(object)?));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io(&dir))?;
    for entry in std::fs::read_dir(base).map_err(io(base))?.flatten() {
        let path = entry.path();
        let other = entry.file_name().to_str().is_some_and(|n| n.starts_with("maps-")) && path != dir;
        if other {
            // Agents before asked-v1 pinned the asks inside the layout directory, in the same
            // format: carried over, so an upgrade from them loses no VMM waiting for a decision.
            let old_asks = path.join(MAP_ASKED);
            let asks = base.join(ASKED_PIN);
            if old_asks.exists() && !asks.exists() {
                match std::fs::rename(&old_asks, &asks) {
                    Ok(()) => {
                        tracing::info!(from = %old_asks.display(), to = %asks.display(), "a previous agent's open asks carried over")
                    }
                    Err(e) => {
                        tracing::error!(path = %old_asks.display(), error = %e, "a previous agent's open asks could not be carried over: VMMs it stopped are decided by policy when found")
                    }
                }
            }
            tracing::warn!(path = %path.display(), "a previous agent's kernel state has another map layout (an upgrade changed it): it cannot be adopted and is removed");
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
        }
    }
    let adopted = PERSISTENT_MAPS.iter().copied().filter(|m| pin_path(base, &dir, m).exists()).collect();
    Ok(StateDir { base: base.to_path_buf(), dir, adopted })
}

/// FNV-1a over each persistent map's definition, in `PERSISTENT_MAPS` order.
fn layout(object: &[u8]) -> Result<u64, StateError> {
    let obj = aya_obj::Object::parse(object).map_err(StateError::Object)?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    // The asks are not part of a layout: their format is frozen (ASKED_PIN).
    for name in PERSISTENT_MAPS.iter().filter(|m| **m != MAP_ASKED) {
        eat(name.as_bytes());
        if let Some(m) = obj.maps.get(*name) {
            for v in [m.map_type(), m.key_size(), m.value_size(), m.max_entries(), m.map_flags()] {
                eat(&v.to_le_bytes());
            }
        }
    }
    Ok(h)
}

/// True if `path`, or its nearest existing ancestor, is on bpffs.
fn on_bpffs(path: &Path) -> bool {
    let Some(existing) = path.ancestors().find(|p| p.exists()) else { return false };
    let Ok(c) = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs writes one struct statfs; c is a valid NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

fn mount_bpffs(path: &Path) -> std::io::Result<()> {
    crate::host::sys::mount(c"bpf", c"bpf", path)?;
    tracing::info!(path = %path.display(), "mounted the BPF filesystem");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(ioasid_stub_object, ignore = "built without the eBPF toolchain: no object to hash")]
    fn layout_is_stable_and_covers_every_persistent_map() {
        let a = layout(crate::kernel::loader::OBJECT).unwrap();
        assert_eq!(a, layout(crate::kernel::loader::OBJECT).unwrap());
        let obj = aya_obj::Object::parse(crate::kernel::loader::OBJECT).unwrap();
        for m in PERSISTENT_MAPS {
            assert!(obj.maps.contains_key(m), "{m} is not in the object");
        }
    }

    /// The asks' pinned format is version 1 for good: every later agent must read what an
    /// earlier one's kernel state holds. Changing it means a new ASKED_PIN (and reading v1).
    #[test]
    #[cfg_attr(ioasid_stub_object, ignore = "built without the eBPF toolchain: no object to read")]
    fn the_asks_format_is_frozen() {
        let obj = aya_obj::Object::parse(crate::kernel::loader::OBJECT).unwrap();
        let m = &obj.maps[MAP_ASKED];
        let hash = aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_HASH as u32;
        assert_eq!(
            (m.map_type(), m.key_size(), m.value_size(), m.max_entries(), m.map_flags()),
            (hash, 4, 16, 4096, 0),
            "IOASID_ASKED changed: pin it under a new name (asked-v2) and keep reading asked-v1"
        );
        assert_eq!(ASKED_PIN, "asked-v1");
    }

    /// The loader hands aya no kernel BTF (parsing vmlinux's costs seconds on an emulated
    /// machine): that holds only while the object needs no CO-RE relocation.
    #[test]
    #[cfg_attr(ioasid_stub_object, ignore = "built without the eBPF toolchain: no object to read")]
    fn the_object_needs_no_kernel_btf_to_load() {
        let obj = aya_obj::Object::parse(crate::kernel::loader::OBJECT).unwrap();
        assert!(
            !obj.has_btf_relocations(),
            "the object has CO-RE relocations: load it with Btf::from_sys_fs() (kernel::loader::load)"
        );
    }

    /// Only legacy map definitions (a `maps` section) can have their flags set at load (the
    /// per-CPU hashes, allocated on demand where the kernel allows it).
    #[test]
    #[cfg_attr(ioasid_stub_object, ignore = "built without the eBPF toolchain: no object to read")]
    fn the_per_cpu_hashes_flags_can_be_set_at_load() {
        let obj = aya_obj::Object::parse(crate::kernel::loader::OBJECT).unwrap();
        for name in crate::kernel::loader::PERCPU_HASHES {
            match &obj.maps[name] {
                aya_obj::Map::Legacy(m) => assert_eq!(m.def.map_flags, 0, "{name}"),
                aya_obj::Map::Btf(_) => panic!("{name} is a BTF map definition: aya cannot set its flags"),
            }
        }
    }

    #[test]
    fn a_directory_off_bpffs_is_refused() {
        let dir = std::env::temp_dir().join(format!("ioasid-state-{}", std::process::id()));
        match prepare(&dir, crate::kernel::loader::OBJECT) {
            Err(StateError::NotBpffs(p)) => assert_eq!(p, dir),
            other => panic!("{other:?}"),
        }
        assert!(!dir.exists());
    }
}
