//! Which device a VFIO file is, and whether its IOMMU enforces DMA coherency.
//!
//! Resolved in userspace from the VMM's fd table and sysfs (both roots injectable for tests):
//! - group file `/dev/vfio/N` -> /sys/kernel/iommu_groups/N/devices/* (PCI addresses);
//!   `/dev/vfio/noiommu-N` -> no IOMMU at all (never coherent);
//! - cdev `/dev/vfio/devices/vfioX` -> /sys/class/vfio-dev/vfioX/device;
//! - coherency per device from its IOMMU: Intel VT-d enforces it when ECAP bit 7 (Snoop Control)
//!   is set; AMD-Vi always does; mdev devices have no IOMMU of their own (not enforced); anything
//!   else is unknown.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{host::procfs::ProcFs, util::text_enum};

text_enum! {
    /// Whether a device's IOMMU keeps its DMA coherent (snoop control).
    pub enum IommuCoherency {
        Enforced => "enforced",
        NotEnforced => "not-enforced",
        Unknown => "unknown",
    }
}

text_enum! {
    /// What a VFIO file is.
    pub enum VfioKind {
        Group => "group",
        Cdev => "cdev",
        Noiommu => "noiommu",
        NotVfio => "not-vfio",
        Unresolved => "unresolved",
    }
}

text_enum! {
    /// The IOMMU behind a VFIO file's devices.
    pub enum IommuKind {
        IntelVtd => "intel-vtd",
        AmdVi => "amd-vi",
        None => "none",
        Unknown => "unknown",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfioFile {
    /// What the fd points to.
    pub path: String,
    pub kind: VfioKind,
    /// PCI addresses (or mdev UUIDs) behind it.
    pub devices: Vec<String>,
    pub iommu: IommuKind,
    pub coherency: IommuCoherency,
}

#[derive(Debug, Clone)]
pub struct SysFs {
    root: PathBuf,
}

impl Default for SysFs {
    fn default() -> Self {
        Self::at("/sys")
    }
}

impl SysFs {
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn list(&self, rel: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root.join(rel))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    fn link_name(&self, rel: &str) -> Option<String> {
        std::fs::read_link(self.root.join(rel))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    /// Coherency of one device and the name of its IOMMU kind.
    fn device_coherency(&self, dev: &str) -> (IommuCoherency, IommuKind) {
        if is_uuid(dev) {
            return (IommuCoherency::NotEnforced, IommuKind::None); // mdev: no IOMMU of its own
        }
        let Some(unit) = self.link_name(&format!("bus/pci/devices/{dev}/iommu")) else {
            return (IommuCoherency::Unknown, IommuKind::Unknown);
        };
        if unit.starts_with("dmar") {
            let ecap =
                std::fs::read_to_string(self.root.join(format!("class/iommu/{unit}/intel-iommu/ecap")));
            let sc = ecap.ok().and_then(|s| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok());
            match sc {
                Some(ecap) if ecap & (1 << 7) != 0 => (IommuCoherency::Enforced, IommuKind::IntelVtd),
                Some(_) => (IommuCoherency::NotEnforced, IommuKind::IntelVtd),
                None => (IommuCoherency::Unknown, IommuKind::IntelVtd),
            }
        } else if unit.starts_with("ivhd") {
            (IommuCoherency::Enforced, IommuKind::AmdVi)
        } else {
            (IommuCoherency::Unknown, IommuKind::Unknown)
        }
    }
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(
            |(i, c)| {
                if [8, 13, 18, 23].contains(&i) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            },
        )
}

/// Resolves fd `fd` of process `pid`.
pub fn resolve(procfs: &ProcFs, sysfs: &SysFs, pid: u32, fd: i32) -> VfioFile {
    let target = match procfs.fd_target(pid, fd) {
        Ok(t) => t,
        Err(e) => {
            let why = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| format!("{e}: {s}"));
            return VfioFile {
                path: format!("<unresolved: {why}>"),
                kind: VfioKind::Unresolved,
                devices: vec![],
                iommu: IommuKind::Unknown,
                coherency: IommuCoherency::Unknown,
            };
        }
    };
    resolve_path(sysfs, &target)
}

/// The VFIO groups and devices process `pid` holds open, resolved. QEMU adds every one it holds
/// to its kvm-vfio device, so a VMM found holding one its IOMMU does not keep coherent runs with
/// non-coherent DMA even if it added it before the agent started.
pub fn held(procfs: &ProcFs, sysfs: &SysFs, pid: u32) -> Vec<(i32, VfioFile)> {
    procfs
        .fds(pid)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, t)| t.starts_with("/dev/vfio/") && t != Path::new("/dev/vfio/vfio"))
        .map(|(fd, t)| (fd, resolve_path(sysfs, &t)))
        .filter(|(_, f)| f.kind != VfioKind::NotVfio)
        .collect()
}

/// The coherency of a resolved VFIO file, as the kernel programs judge by it.
pub fn coherency(f: &VfioFile) -> ioasid_common::events::Coherency {
    match f.coherency {
        IommuCoherency::Enforced => ioasid_common::events::Coherency::Coherent,
        IommuCoherency::NotEnforced => ioasid_common::events::Coherency::Noncoherent,
        IommuCoherency::Unknown => ioasid_common::events::Coherency::Unknown,
    }
}

/// Whether a held VFIO file makes the VM non-coherent: anything not known to be coherent.
pub fn makes_noncoherent(f: &VfioFile) -> bool {
    f.coherency != IommuCoherency::Enforced
}

pub fn resolve_path(sysfs: &SysFs, target: &Path) -> VfioFile {
    let path = target.to_string_lossy().into_owned();
    let mut file = VfioFile {
        path: path.clone(),
        kind: VfioKind::NotVfio,
        devices: vec![],
        iommu: IommuKind::Unknown,
        coherency: IommuCoherency::Unknown,
    };
    if let Some(n) = path.strip_prefix("/dev/vfio/noiommu-") {
        file.kind = VfioKind::Noiommu;
        file.devices = sysfs.list(&format!("kernel/iommu_groups/{n}/devices"));
        file.iommu = IommuKind::None;
        file.coherency = IommuCoherency::NotEnforced;
        return file;
    }
    if let Some(name) = path.strip_prefix("/dev/vfio/devices/") {
        file.kind = VfioKind::Cdev;
        file.devices = sysfs.link_name(&format!("class/vfio-dev/{name}/device")).into_iter().collect();
    } else if let Some(n) =
        path.strip_prefix("/dev/vfio/").filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    {
        file.kind = VfioKind::Group;
        file.devices = sysfs.list(&format!("kernel/iommu_groups/{n}/devices"));
    } else {
        return file;
    }
    let verdicts: Vec<(IommuCoherency, IommuKind)> =
        file.devices.iter().map(|d| sysfs.device_coherency(d)).collect();
    file.coherency = if verdicts.is_empty() || verdicts.iter().any(|(c, _)| *c == IommuCoherency::Unknown) {
        if verdicts.iter().any(|(c, _)| *c == IommuCoherency::NotEnforced) {
            IommuCoherency::NotEnforced
        } else {
            IommuCoherency::Unknown
        }
    } else if verdicts.iter().all(|(c, _)| *c == IommuCoherency::Enforced) {
        IommuCoherency::Enforced
    } else {
        IommuCoherency::NotEnforced
    };
    if let Some((_, iommu)) = verdicts.first() {
        file.iommu = *iommu;
    }
    file
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tree(PathBuf);
    impl Tree {
        fn new(tag: &str) -> Self {
            let d = std::env::temp_dir().join(format!("ioasid-sysfs-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Self(d)
        }
        fn dir(&self, rel: &str) {
            std::fs::create_dir_all(self.0.join(rel)).unwrap();
        }
        fn file(&self, rel: &str, text: &str) {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        fn link(&self, rel: &str, to: &str) {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(to, p).unwrap();
        }
    }
    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn intel_group_with_and_without_snoop_control() {
        let t = Tree::new("intel");
        t.dir("kernel/iommu_groups/12/devices/0000:65:00.0");
        t.link("bus/pci/devices/0000:65:00.0/iommu", "../../../devices/virtual/iommu/dmar3");
        t.file("class/iommu/dmar3/intel-iommu/ecap", "f0205ef\n");
        let fs = SysFs::at(&t.0);
        let f = resolve_path(&fs, Path::new("/dev/vfio/12"));
        assert_eq!(
            (f.kind.label(), f.devices.clone(), f.iommu.label()),
            ("group", vec!["0000:65:00.0".to_string()], "intel-vtd")
        );
        // 0x...ef has bit 7 set: Snoop Control present.
        assert_eq!(f.coherency, IommuCoherency::Enforced);
        t.file("class/iommu/dmar3/intel-iommu/ecap", "0x f0205f\n");
        assert_eq!(resolve_path(&fs, Path::new("/dev/vfio/12")).coherency, IommuCoherency::Unknown);
        t.file("class/iommu/dmar3/intel-iommu/ecap", "f02057\n");
        assert_eq!(resolve_path(&fs, Path::new("/dev/vfio/12")).coherency, IommuCoherency::NotEnforced);
    }

    #[test]
    fn amd_cdev_mdev_noiommu_and_others() {
        let t = Tree::new("amd");
        t.link("class/vfio-dev/vfio0/device", "../../../devices/pci0000:00/0000:c1:00.0");
        t.link("bus/pci/devices/0000:c1:00.0/iommu", "../../ivhd0");
        t.link("class/vfio-dev/vfio1/device", "../../../devices/mdev/0b5b3a0e-4d5f-4a7a-9c7e-1b2d3c4e5f60");
        t.dir("kernel/iommu_groups/3/devices/0000:00:02.0");
        let fs = SysFs::at(&t.0);
        let f = resolve_path(&fs, Path::new("/dev/vfio/devices/vfio0"));
        assert_eq!(
            (f.kind.label(), f.iommu.label(), f.coherency),
            ("cdev", "amd-vi", IommuCoherency::Enforced)
        );
        let f = resolve_path(&fs, Path::new("/dev/vfio/devices/vfio1"));
        assert_eq!(f.coherency, IommuCoherency::NotEnforced);
        let f = resolve_path(&fs, Path::new("/dev/vfio/noiommu-3"));
        assert_eq!(
            (f.kind.label(), f.coherency, f.devices.len()),
            ("noiommu", IommuCoherency::NotEnforced, 1)
        );
        let f = resolve_path(&fs, Path::new("/dev/null"));
        assert_eq!((f.kind.label(), f.coherency), ("not-vfio", IommuCoherency::Unknown));
        // A group whose device has no iommu link: unknown.
        let f = resolve_path(&fs, Path::new("/dev/vfio/3"));
        assert_eq!(f.coherency, IommuCoherency::Unknown);
        let f = resolve_path(&fs, Path::new("/dev/vfio/vfio"));
        assert_eq!(f.kind.label(), "not-vfio");
    }

    #[test]
    fn vfio_files_a_vmm_already_holds() {
        let t = Tree::new("held");
        t.dir("kernel/iommu_groups/12/devices/0000:65:00.0");
        t.link("bus/pci/devices/0000:65:00.0/iommu", "../../../devices/virtual/iommu/dmar3");
        t.file("class/iommu/dmar3/intel-iommu/ecap", "f02057\n"); // no Snoop Control
        t.link("proc/77/fd/3", "/dev/kvm");
        t.link("proc/77/fd/4", "anon_inode:kvm-vm");
        t.link("proc/77/fd/5", "/dev/vfio/vfio");
        t.link("proc/77/fd/6", "/dev/vfio/12");
        t.link("proc/77/fd/7", "/dev/null");
        let procfs = ProcFs::at(t.0.join("proc"));
        let files = held(&procfs, &SysFs::at(&t.0), 77);
        assert_eq!(files.len(), 1, "{files:?}");
        let (fd, file) = &files[0];
        assert!(*fd >= 0);
        assert_eq!((file.kind.label(), file.coherency), ("group", IommuCoherency::NotEnforced));
        assert!(makes_noncoherent(file));
        assert_eq!(coherency(file), ioasid_common::events::Coherency::Noncoherent);
        t.file("class/iommu/dmar3/intel-iommu/ecap", "f020df\n"); // Snoop Control
        assert!(!makes_noncoherent(&held(&procfs, &SysFs::at(&t.0), 77)[0].1));
        assert!(held(&procfs, &SysFs::at(&t.0), 78).is_empty(), "a gone process holds nothing");
    }

    #[test]
    fn resolves_a_real_fd() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let f = resolve(&ProcFs::default(), &SysFs::default(), std::process::id(), fd);
        assert_eq!((f.path.as_str(), f.kind.label()), ("/dev/null", "not-vfio"));
        let f = resolve(&ProcFs::default(), &SysFs::default(), std::process::id(), 9999);
        assert_eq!(f.kind.label(), "unresolved");
    }
}
