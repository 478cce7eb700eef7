//! Which VM manager runs a VMM, and what it calls the VM: the identity an owner knows it by
//! (Proxmox's VMID, KubeVirt's pod). A command line is anyone's choice (whoever has /dev/kvm),
//! a cgroup is not: only root, systemd or the kubelet place a process under `qemu.slice`,
//! `machine.slice` or `kubepods`. So a manager is named only where the cgroup says so, and a
//! field the command line gives is taken only where the cgroup agrees with it. Missing is
//! empty, never guessed.

use serde::{Deserialize, Serialize};

use crate::util::text_enum;

text_enum! {
    /// The VM manager (the `manager` label of `ioasid_vm_info`, and of audit records).
    #[derive(Default)]
    pub enum Manager {
        /// QEMU (or another VMM) started by hand or by something ioasid does not know.
        #[default]
        Qemu => "qemu",
        /// libvirt: its domain scope (`machine.slice/machine-qemu\x2dN\x2dNAME.scope`, or
        /// cgroupfs `machine/qemu-N-NAME.libvirt-qemu`).
        Libvirt => "libvirt",
        /// Proxmox VE: the scope `qemu.slice/N.scope` (N: the VMID), and `-id N` where given.
        Proxmox => "proxmox",
        /// KubeVirt: a virt-launcher pod's cgroup (`kubepods...pod<UID>`) and a
        /// `NAMESPACE_NAME` domain name.
        Kubevirt => "kubevirt",
        /// OpenStack Nova: a libvirt domain whose live status (which names the VMM's pid)
        /// carries `<nova:instance>` metadata (`host::libvirt`).
        Openstack => "openstack",
    }
}

/// What the VM's manager calls it, beyond QEMU's `-name`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Managed {
    pub manager: Manager,
    /// Proxmox's VMID (`qm list`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmid: Option<String>,
    /// The UID of KubeVirt's virt-launcher pod (joins with the pod's logs and events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// What OpenStack Nova knows the server by (from libvirt's status, read after the VMM is
    /// first seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nova: Option<crate::host::libvirt::Nova>,
}

impl Managed {
    /// What libvirt's status of the VMM's domain adds: libvirt as its manager (where nothing
    /// more specific named one), OpenStack where Nova's metadata is there. A Proxmox or
    /// KubeVirt VMM keeps its manager (KubeVirt's libvirt runs in the pod, not the host's).
    pub fn from_libvirt(&mut self, nova: Option<crate::host::libvirt::Nova>) {
        if !matches!(self.manager, Manager::Qemu | Manager::Libvirt) {
            return;
        }
        self.manager = if nova.is_some() { Manager::Openstack } else { Manager::Libvirt };
        self.nova = nova;
    }

    /// What libvirt's status said before (`old`), kept over a re-read of the same VMM from
    /// /proc, which cannot say it.
    pub fn keep_libvirt(&mut self, old: &Managed) {
        if matches!(old.manager, Manager::Libvirt | Manager::Openstack) && self.nova.is_none() {
            self.from_libvirt(old.nova.clone());
        }
    }
}

/// The manager of a VMM with command line `args`, cgroup path `cgroup` and VM name `vm`.
pub fn identify(args: &[String], cgroup: Option<&str>, vm: &str) -> Managed {
    let Some(cg) = cgroup else { return Managed::default() };
    if let Some(id) = proxmox_scope(cg) {
        // Proxmox's own QEMU also says `-id N` (a Proxmox patch; upstream QEMU has no such
        // option): where given, it must agree.
        if option(args, "-id").is_none_or(|v| v == id) {
            return Managed { manager: Manager::Proxmox, vmid: Some(id.to_string()), ..Managed::default() };
        }
    }
    if let Some(uid) = kubepods_pod(cg) {
        if vm.split_once('_').is_some_and(|(ns, name)| !ns.is_empty() && !name.is_empty()) {
            return Managed { manager: Manager::Kubevirt, pod_uid: Some(uid), ..Managed::default() };
        }
    }
    if libvirt_scope(cg) {
        return Managed { manager: Manager::Libvirt, ..Managed::default() };
    }
    Managed::default()
}

/// The last value of option `name` (`-id 101` or `-id=101`).
fn option<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let mut value = None;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == name {
            value = it.next().map(String::as_str);
        } else if let Some(v) = a.strip_prefix(name).and_then(|v| v.strip_prefix('=')) {
            value = Some(v);
        }
    }
    value
}

/// Proxmox's VM scope: `/qemu.slice/N.scope` (N: 1-9 digits, Proxmox VMIDs are 100-999999999).
fn proxmox_scope(cg: &str) -> Option<&str> {
    let id = cg.strip_prefix("/qemu.slice/")?.strip_suffix(".scope")?;
    (!id.is_empty() && id.len() <= 9 && id.bytes().all(|b| b.is_ascii_digit())).then_some(id)
}

/// The pod UID of a cgroup under the kubelet's `kubepods` (systemd driver:
/// `kubepods-burstable-pod<UID with _>.slice`; cgroupfs: `/kubepods/burstable/pod<UID>/...`),
/// if it is a well-formed UUID.
fn kubepods_pod(cg: &str) -> Option<String> {
    let mut parts = cg.split('/').filter(|p| !p.is_empty());
    if !parts.next()?.starts_with("kubepods") {
        return None;
    }
    parts.find_map(|p| {
        let uid = match p.strip_suffix(".slice") {
            Some(slice) => slice.rsplit_once("-pod")?.1.replace('_', "-"),
            None => p.strip_prefix("pod")?.to_string(),
        };
        crate::host::procfs::well_formed_uuid(&uid).then(|| uid.to_ascii_lowercase())
    })
}

/// libvirt's domain scope or cgroupfs directory.
fn libvirt_scope(cg: &str) -> bool {
    let mut parts = cg.split('/').filter(|p| !p.is_empty());
    match (parts.next(), parts.next()) {
        (Some("machine.slice"), Some(scope)) => {
            scope.starts_with("machine-qemu\\x2d") && scope.ends_with(".scope")
        }
        (Some("machine"), Some(dir)) => dir.starts_with("qemu-") && dir.ends_with(".libvirt-qemu"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    const POD: &str = "3f2b9c1e-8d4a-4e6b-9a7c-1d2e3f4a5b6c";

    #[test]
    fn managers_are_named_where_the_cgroup_says_so() {
        let kvm = args(&["/usr/bin/kvm", "-id", "101", "-name", "win11,debug-threads=on"]);
        assert_eq!(
            identify(&kvm, Some("/qemu.slice/101.scope"), "win11"),
            Managed { manager: Manager::Proxmox, vmid: Some("101".into()), ..Managed::default() }
        );
        // The command line alone claims nothing (another scope, no cgroup), and one that
        // disagrees with the scope is not believed; without `-id` (upstream QEMU) the scope says.
        assert_eq!(identify(&kvm, Some("/user.slice/101.scope"), "win11"), Managed::default());
        assert_eq!(identify(&kvm, Some("/qemu.slice/102.scope"), "win11"), Managed::default());
        assert_eq!(identify(&kvm, None, "win11"), Managed::default());
        assert_eq!(identify(&kvm, Some("/qemu.slice/1x.scope"), "win11"), Managed::default());
        assert_eq!(
            identify(&args(&["kvm"]), Some("/qemu.slice/101.scope"), "win11").vmid.as_deref(),
            Some("101")
        );

        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-ab12.scope",
            POD.replace('-', "_")
        );
        let cgroupfs = format!("/kubepods/besteffort/pod{POD}/0123abcd");
        for cg in [systemd.as_str(), cgroupfs.as_str()] {
            assert_eq!(
                identify(&args(&["qemu-kvm"]), Some(cg), "default_vm1"),
                Managed { manager: Manager::Kubevirt, pod_uid: Some(POD.into()), ..Managed::default() },
                "{cg}"
            );
            // Not KubeVirt's domain name: not KubeVirt.
            assert_eq!(identify(&args(&["qemu-kvm"]), Some(cg), "vm1"), Managed::default());
        }
        assert_eq!(identify(&args(&["q"]), Some("/kubepods/podnot-a-uuid/x"), "a_b"), Managed::default());
        // A name with `_` outside KubeVirt: no namespace guessed.
        assert_eq!(identify(&args(&["q"]), Some("/user.slice/x.scope"), "a_b"), Managed::default());

        let libvirt = Managed { manager: Manager::Libvirt, ..Managed::default() };
        assert_eq!(
            identify(&args(&["q"]), Some("/machine.slice/machine-qemu\\x2d3\\x2dgpu.scope"), "gpu"),
            libvirt
        );
        assert_eq!(
            identify(&args(&["q"]), Some("/machine/qemu-3-gpu.libvirt-qemu/emulator"), "gpu"),
            libvirt
        );
        assert_eq!(identify(&args(&["q"]), Some("/machine.slice/other.scope"), "gpu"), Managed::default());
    }

    /// libvirt's status (which names the VMM's pid) makes a VMM libvirt's, or OpenStack's with
    /// Nova's metadata; a Proxmox or KubeVirt VMM keeps what its cgroup says.
    #[test]
    fn libvirts_status_names_libvirt_or_openstack_and_nothing_else() {
        let nova = crate::host::libvirt::Nova { name: Some("gpu-train-7".into()), ..Default::default() };
        let mut m = Managed::default();
        m.from_libvirt(None);
        assert_eq!(m.manager, Manager::Libvirt);
        m.from_libvirt(Some(nova.clone()));
        assert_eq!((m.manager, m.nova.as_ref()), (Manager::Openstack, Some(&nova)));
        for manager in [Manager::Proxmox, Manager::Kubevirt] {
            let mut m = Managed { manager, ..Managed::default() };
            m.from_libvirt(Some(nova.clone()));
            assert_eq!((m.manager, m.nova), (manager, None));
        }
    }
}
