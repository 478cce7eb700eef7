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
        assert!(!is_watched_ioctl(0x5401)); // TCGETS
        assert!(!is_watched_ioctl(0));
        assert_eq!(ioctl_name(0x5401), None);
    }
}
