//! The ioctl requests ioasid watches: one list, with names, used by the kernel programs (the
//! filter), the agent (the `request` label), the guest (the requests it issues) and the tests.

/// One watched ioctl request (x86-64 encoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ioctl {
    pub cmd: u32,
    pub name: &'static str,
}

macro_rules! ioctls {
    ($( $(#[$m:meta])* $name:ident = $cmd:literal, )+) => {
        $( $(#[$m])* pub const $name: u32 = $cmd; )+
        /// Every watched request, with its name; every other ioctl returns at the first compare.
        pub const WATCHED_IOCTLS: &[Ioctl] = &[$( Ioctl { cmd: $name, name: stringify!($name) } ),+];
    };
}

ioctls! {
    /// On /dev/kvm: a new VM.
    KVM_CREATE_VM = 0xae01,
    /// On a VM fd: a new device (the kvm-vfio device is type 4).
    KVM_CREATE_DEVICE = 0xc00c_aee0,
    /// On a device fd: the incoherent-DMA enable is group 1 / attr 1 (FILE_ADD) here.
    KVM_SET_DEVICE_ATTR = 0x4018_aee1,
    KVM_HAS_DEVICE_ATTR = 0x4018_aee3,
    VFIO_CHECK_EXTENSION = 0x3b65,
    VFIO_SET_IOMMU = 0x3b66,
    VFIO_GROUP_SET_CONTAINER = 0x3b68,
    VFIO_GROUP_GET_DEVICE_FD = 0x3b6a,
    /// iommufd and VFIO cdev requests are _IO(';', n): no size encoded, match the exact value.
    VFIO_DEVICE_BIND_IOMMUFD = 0x3b76,
    VFIO_DEVICE_ATTACH_IOMMUFD_PT = 0x3b77,
    VFIO_DEVICE_DETACH_IOMMUFD_PT = 0x3b78,
    IOMMU_DESTROY = 0x3b80,
    IOMMU_IOAS_ALLOC = 0x3b81,
    IOMMU_HWPT_ALLOC = 0x3b89,
    IOMMU_GET_HW_INFO = 0x3b8a,
}

/// Modules whose files carry the watched requests (the owner of their file_operations): KVM's
/// file_operations are owned by the vendor module that registered KVM. A watched request on any
/// other file cannot reach KVM or VFIO, and is not reported (unprivileged noise).
pub const WATCHED_MODULES: [&str; 5] = ["kvm", "kvm_amd", "kvm_intel", "vfio", "iommufd"];

/// The first 16 bytes of `struct module.name` for each of [`WATCHED_MODULES`], as two
/// little-endian words: what the kernel programs compare.
pub const WATCHED_MODULE_KEYS: [[u64; 2]; 5] = {
    let mut keys = [[0u64; 2]; 5];
    let mut i = 0;
    while i < WATCHED_MODULES.len() {
        keys[i] = module_key(WATCHED_MODULES[i].as_bytes());
        i += 1;
    }
    keys
};

/// A module name (at most 15 bytes) as the kernel stores it, NUL-padded, in two words.
pub const fn module_key(name: &[u8]) -> [u64; 2] {
    let mut b = [0u8; 16];
    let mut i = 0;
    while i < name.len() && i < 15 {
        b[i] = name[i];
        i += 1;
    }
    let (mut lo, mut hi) = (0u64, 0u64);
    let mut j = 0;
    while j < 8 {
        lo |= (b[j] as u64) << (8 * j);
        hi |= (b[8 + j] as u64) << (8 * j);
        j += 1;
    }
    [lo, hi]
}

/// The `unlocked_ioctl` of every file the watched requests go to, where KVM, VFIO or iommufd is
/// built into the kernel (no owning module): /dev/kvm, VM, vCPU and device fds; the VFIO
/// container, group and device; /dev/iommu. Addresses from /proc/kallsyms.
pub const WATCHED_IOCTL_FNS: [&str; crate::config::WATCHED_IOCTL_FNS_LEN] = [
    "kvm_dev_ioctl",
    "kvm_vm_ioctl",
    "kvm_vcpu_ioctl",
    "kvm_device_ioctl",
    "vfio_fops_unl_ioctl",
    "vfio_group_fops_unl_ioctl",
    "vfio_device_fops_unl_ioctl",
    "iommufd_fops_ioctl",
];

/// True for an incoherent-DMA enable's shape: KVM_SET_DEVICE_ATTR, group 1, attr 1.
#[inline(always)]
pub fn is_file_add_shape(cmd: u32, group: u32, attr: u64) -> bool {
    cmd == KVM_SET_DEVICE_ATTR
        && group == crate::abi::KVM_DEV_VFIO_FILE
        && attr == crate::abi::KVM_DEV_VFIO_FILE_ADD
}

/// Not watched (a read of an attribute), named for tests that check it is ignored.
pub const KVM_GET_DEVICE_ATTR: u32 = 0x4018_aee2;

/// True for the watched requests. Unrelated requests, KVM_RUN included, leave after the
/// type-byte test or one compare. Bounded for the verifier.
#[inline(always)]
pub fn is_watched_ioctl(cmd: u32) -> bool {
    let ty = (cmd >> 8) & 0xff;
    if ty != 0xae && ty != 0x3b {
        return false;
    }
    let mut i = 0;
    while i < WATCHED_IOCTLS.len() {
        if WATCHED_IOCTLS[i].cmd == cmd {
            return true;
        }
        i += 1;
    }
    false
}

/// The name of a watched request, `None` for any other.
pub fn ioctl_name(cmd: u32) -> Option<&'static str> {
    WATCHED_IOCTLS.iter().find(|i| i.cmd == cmd).map(|i| i.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_ioctls() {
        for i in WATCHED_IOCTLS {
            assert!(is_watched_ioctl(i.cmd), "{}", i.name);
            assert_eq!(ioctl_name(i.cmd), Some(i.name));
        }
        assert_eq!(WATCHED_IOCTLS.len(), 15);
        assert_eq!(ioctl_name(KVM_SET_DEVICE_ATTR), Some("KVM_SET_DEVICE_ATTR"));
        assert!(!is_watched_ioctl(0xae80)); // KVM_RUN
        assert!(!is_watched_ioctl(KVM_GET_DEVICE_ATTR));
        // struct module.name as the kernel stores it: NUL-padded bytes, read as two LE words.
        assert_eq!(module_key(b"kvm"), [u64::from_le_bytes(*b"kvm\0\0\0\0\0"), 0]);
        assert_eq!(
            WATCHED_MODULE_KEYS[2],
            [u64::from_le_bytes(*b"kvm_inte"), u64::from_le_bytes(*b"l\0\0\0\0\0\0\0")]
        );
        assert_eq!(module_key(b"0123456789abcdefXYZ")[1] >> 56, 0, "a name keeps its NUL");
        assert!(!is_watched_ioctl(0x5401)); // TCGETS
        assert!(!is_watched_ioctl(0));
        assert_eq!(ioctl_name(0x5401), None);
    }
}
