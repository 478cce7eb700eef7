//! Decoding ring buffer records. Bytes from the kernel are checked, never trusted: a short,
//! unknown or inconsistent record is an error (counted and logged by the caller), not a panic.

use std::mem::size_of;

use ioasid_common::{EventHeader, IoctlEvent, TransitionEvent, EVENT_IOCTL, EVENT_NONCOHERENT};

#[derive(Debug, Clone, Copy)]
pub enum Event {
    Ioctl(IoctlEvent),
    Noncoherent(TransitionEvent),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its header ({need})")]
    Short { len: usize, need: usize },
    #[error("record kind {kind} is unknown")]
    UnknownKind { kind: u32 },
    #[error("record kind {kind} says {said} bytes; {len} arrived, {need} expected")]
    Size { kind: u32, said: u32, len: usize, need: usize },
}

fn read<T: Copy>(bytes: &[u8]) -> T {
    debug_assert!(bytes.len() >= size_of::<T>());
    // SAFETY: callers check the length; T is a plain-integer repr(C) type, valid for any bits;
    // read_unaligned tolerates the ring buffer's 8-byte alignment of records.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let need = size_of::<EventHeader>();
    if bytes.len() < need {
        return Err(DecodeError::Short { len: bytes.len(), need });
    }
    let header: EventHeader = read(bytes);
    let check = |need: usize| {
        if bytes.len() < need || header.size as usize != need {
            Err(DecodeError::Size { kind: header.kind, said: header.size, len: bytes.len(), need })
        } else {
            Ok(())
        }
    };
    match header.kind {
        EVENT_IOCTL => {
            check(size_of::<IoctlEvent>())?;
            Ok(Event::Ioctl(read(bytes)))
        }
        EVENT_NONCOHERENT => {
            check(size_of::<TransitionEvent>())?;
            Ok(Event::Noncoherent(read(bytes)))
        }
        kind => Err(DecodeError::UnknownKind { kind }),
    }
}

/// The comm as text (NUL-terminated in the kernel).
pub fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Human name of a watched ioctl request (the `request` label of `ioasid_ioctls_total`).
pub fn request_name(cmd: u32) -> &'static str {
    use ioasid_common::*;
    match cmd {
        KVM_CREATE_VM => "KVM_CREATE_VM",
        KVM_CREATE_DEVICE => "KVM_CREATE_DEVICE",
        KVM_SET_DEVICE_ATTR => "KVM_SET_DEVICE_ATTR",
        KVM_HAS_DEVICE_ATTR => "KVM_HAS_DEVICE_ATTR",
        VFIO_CHECK_EXTENSION => "VFIO_CHECK_EXTENSION",
        VFIO_SET_IOMMU => "VFIO_SET_IOMMU",
        VFIO_GROUP_SET_CONTAINER => "VFIO_GROUP_SET_CONTAINER",
        VFIO_GROUP_GET_DEVICE_FD => "VFIO_GROUP_GET_DEVICE_FD",
        VFIO_DEVICE_BIND_IOMMUFD => "VFIO_DEVICE_BIND_IOMMUFD",
        VFIO_DEVICE_ATTACH_IOMMUFD_PT => "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
        VFIO_DEVICE_DETACH_IOMMUFD_PT => "VFIO_DEVICE_DETACH_IOMMUFD_PT",
        IOMMU_IOAS_ALLOC => "IOMMU_IOAS_ALLOC",
        IOMMU_HWPT_ALLOC => "IOMMU_HWPT_ALLOC",
        IOMMU_GET_HW_INFO => "IOMMU_GET_HW_INFO",
        IOMMU_DESTROY => "IOMMU_DESTROY",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain repr(C) value for a fixture.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    fn ioctl_event() -> IoctlEvent {
        // SAFETY: all-zero is valid for this plain-integer type.
        let mut ev: IoctlEvent = unsafe { std::mem::zeroed() };
        ev.header.kind = EVENT_IOCTL;
        ev.header.size = size_of::<IoctlEvent>() as u32;
        ev.header.tgid = 77;
        ev.header.comm[..4].copy_from_slice(b"qemu");
        ev.cmd = ioasid_common::KVM_SET_DEVICE_ATTR;
        ev.ret = -22;
        ev
    }

    #[test]
    fn decodes_ioctl() {
        let Event::Ioctl(ev) = decode(&bytes_of(&ioctl_event())).unwrap() else { panic!("kind") };
        assert_eq!((ev.header.tgid, ev.ret, comm(&ev.header.comm).as_str()), (77, -22, "qemu"));
        assert_eq!(request_name(ev.cmd), "KVM_SET_DEVICE_ATTR");
    }

    #[test]
    fn rejects_bad_records() {
        let good = bytes_of(&ioctl_event());
        assert!(matches!(decode(&good[..10]), Err(DecodeError::Short { len: 10, .. })));
        assert!(matches!(decode(&good[..100]), Err(DecodeError::Size { .. })));
        let mut wrong_size = ioctl_event();
        wrong_size.header.size = 8;
        assert!(matches!(decode(&bytes_of(&wrong_size)), Err(DecodeError::Size { said: 8, .. })));
        let mut unknown = ioctl_event();
        unknown.header.kind = 99;
        assert_eq!(decode(&bytes_of(&unknown)).unwrap_err(), DecodeError::UnknownKind { kind: 99 });
        // Arbitrary bytes never panic.
        for len in 0..200 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = decode(&junk);
        }
    }

    #[test]
    fn comm_without_nul() {
        assert_eq!(comm(b"0123456789abcdef"), "0123456789abcdef");
        assert_eq!(comm(&[0; 16]), "");
    }
}
