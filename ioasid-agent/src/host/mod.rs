//! The host as files and syscalls: processes (`procfs`), VFIO devices and their IOMMU
//! (`vfio`), the single-instance marker (`instance`) and the raw syscalls (`sys`). Every reader
//! takes its root (`/proc`, `/sys`) from its caller, so tests point it at a fixture tree.

pub mod files;
pub mod instance;
pub mod libvirt;
pub mod manager;
pub mod pidfd;
pub mod procfs;
pub mod sys;
pub mod vfio;
