//! The audit records: what the engine decided, as the log and `replay` read it. Serde types, so
//! the writer serialises them and the readers (`replay`, `policy learn`, the tests) parse them
//! back with the same definitions.

use serde::{Deserialize, Serialize};

mod kinds;

pub use ioasid_common::{events::Coherency, verdict::Mechanism};

pub use self::kinds::{Decision, Outcome, RecordKind, StormOutcome, StormState};
use crate::host::{
    libvirt::{Nova, Owner},
    manager::{Managed, Manager},
    procfs::ProcessInfo,
    vfio::VfioFile,
};

/// The ioctl an audit record is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// e.g. KVM_SET_DEVICE_ATTR
    pub ioctl: String,
    /// e.g. KVM_DEV_VFIO_FILE_ADD
    pub attr: String,
    /// The kvm device fd the ioctl was issued on.
    pub fd: i32,
    /// The VFIO file fd passed in `addr`, when it could be read.
    pub file_fd: Option<i32>,
    /// The fd was seen being created by KVM_CREATE_DEVICE(VFIO) (false: created before the
    /// agent started, or passed in; judged all the same).
    pub device_fd_known: bool,
}

fn incoherent_dma() -> RecordKind {
    RecordKind::IncoherentDma
}

/// Who knows the VM by what: its manager (`manager`), KubeVirt's namespace and name (domain
/// `NAMESPACE_NAME`, in a virt-launcher pod) and pod UID, Proxmox's VMID, and the VM's UUID
/// (`-uuid`, or Proxmox's `-smbios type=1,uuid=`): the fields of a record that join with the
/// manager's own (flattened into the record). Missing is absent, never guessed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmIdentity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager: Option<Manager>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// OpenStack: the server's project, user (names and IDs) and flavor; `name` is the
    /// server's name.
    #[serde(flatten)]
    pub owner: Owner,
}

impl VmIdentity {
    pub fn of(p: &ProcessInfo) -> Self {
        let kubevirt = p.kubevirt();
        let nova = p.managed.nova.clone().unwrap_or_default();
        Self {
            manager: Some(p.managed.manager),
            namespace: kubevirt.map(|(ns, _)| ns.to_string()),
            name: kubevirt.map(|(_, n)| n.to_string()).or(nova.name),
            uuid: p.uuid.clone(),
            vmid: p.managed.vmid.clone(),
            pod_uid: p.managed.pod_uid.clone(),
            owner: nova.owner,
        }
    }

    /// Nova's identity as recorded (None unless the manager was OpenStack).
    fn nova(&self) -> Option<crate::host::libvirt::Nova> {
        (self.manager == Some(Manager::Openstack))
            .then(|| Nova { name: self.name.clone(), owner: self.owner.clone() })
    }
}

/// A FILE_ADD: an incoherent-DMA decision (`incoherent-dma`), or a file that was not an
/// incoherent-DMA enable (`vfio-file-add`: coherent, or unknown and let through).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// `incoherent-dma`.
    #[serde(default = "incoherent_dma")]
    pub event: RecordKind,
    /// RFC 3339, UTC.
    pub time: String,
    /// The node (`NODE_NAME`, else the host name).
    pub host: String,
    pub vm: String,
    #[serde(flatten)]
    pub identity: VmIdentity,
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub cgroup: Option<String>,
    pub uid: u32,
    pub request: Request,
    pub vfio: Option<VfioFile>,
    /// The kernel's own verdict (fexit vfio_file_enforced_coherent), where that hook loads.
    #[serde(default)]
    pub kernel_coherent: Option<bool>,
    /// The coherency the request was judged by (the kernel's own verdict, else sysfs's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coherency: Option<Coherency>,
    /// Matched rule name, or `default`.
    pub rule: String,
    pub decision: Decision,
    pub mechanism: Mechanism,
    pub outcome: Outcome,
    /// The ioctl's return value, when it ran.
    pub ret: Option<i64>,
    pub reason: Option<String>,
    /// The policy file the decision came from.
    pub policy: String,
}

/// A WBINVD storm raised or cleared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StormRecord {
    /// `wbinvd-storm`.
    pub event: RecordKind,
    pub time: String,
    pub host: String,
    pub vm: String,
    #[serde(flatten)]
    pub identity: VmIdentity,
    pub pid: u32,
    /// The VMM's uid, executable and cgroup (absent from older agents' records:
    /// `policy learn` then matches a storm to an enable by host, pid and VM name alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    pub rule: String,
    pub state: StormState,
    /// WBINVD per second over the window.
    pub rate: f64,
    /// Handler time over wall time over the window.
    pub cost_ratio: f64,
    pub budget_rate: f64,
    pub budget_cost_ratio: f64,
    pub window_seconds: f64,
    pub action: crate::engine::policy::StormAction,
    pub outcome: StormOutcome,
    /// Why a signal failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub policy: String,
}

/// Who one flusher's WBINVD flushes interrupted over its window: at most once per window while
/// it flushes, with its top victims (the largest stolen time first).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlastRecord {
    /// `wbinvd-blast`.
    pub event: RecordKind,
    pub time: String,
    pub host: String,
    /// The flusher.
    pub vm: String,
    #[serde(flatten)]
    pub identity: VmIdentity,
    pub pid: u32,
    pub window_seconds: f64,
    /// Flush IPIs to other CPUs over the window (idle CPUs included).
    pub ipis_sent: u64,
    pub victims: Vec<crate::engine::blast::Victim>,
    pub policy: String,
}

impl AuditRecord {
    /// The process as the policy saw it (for replay).
    pub fn process(&self) -> ProcessInfo {
        ProcessInfo {
            pid: self.pid,
            comm: self.comm.clone(),
            vm: self.vm.clone(),
            exe: self.exe.clone(),
            cgroup: self.cgroup.clone(),
            uid: self.uid,
            start_time: 0,
            uuid: self.identity.uuid.clone(),
            managed: Managed {
                manager: self.identity.manager.unwrap_or_default(),
                vmid: self.identity.vmid.clone(),
                pod_uid: self.identity.pod_uid.clone(),
                nova: self.identity.nova(),
            },
        }
    }
}

/// The record format's version, in every record (`schema`). Bumped when a field changes meaning
/// or goes away; new fields may appear within a version.
pub const SCHEMA: u32 = 1;
