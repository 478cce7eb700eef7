//! Ring buffer records in, domain events out. Bytes from the kernel are checked, never
//! trusted: a short, unknown or inconsistent record, or an enumeration value out of range, is
//! an error (counted and logged by the caller), never a panic.

use std::mem::size_of;

use ioasid_common::{
    abi::{KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_DEL},
    events::{
        Coherency, EventHeader, EventKind, IoctlEvent, TransitionEvent, IOCTL_F_ASK_RECORDED,
        IOCTL_F_ATTR_READ, IOCTL_F_DEVICE_KNOWN, IOCTL_F_FD_SWAPPED, IOCTL_F_FILE_FD_READ, IOCTL_F_RETURNED,
        IOCTL_F_SIGNAL_SENT,
    },
    ioctl::{
        ioctl_name, KVM_CREATE_DEVICE, KVM_CREATE_VM, KVM_SET_DEVICE_ATTR, VFIO_DEVICE_BIND_IOMMUFD,
        VFIO_GROUP_GET_DEVICE_FD, VFIO_GROUP_SET_CONTAINER,
    },
    verdict::{Decision, Mechanism, RULE_DEFAULT, RULE_NONE},
    UnknownValue,
};

use crate::engine::{
    events::{EnableRequest, Event, IoctlSeen, KernelJudged, Origin, RuleRef, Transition},
    policy::Action,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its header ({need})")]
    Short { len: usize, need: usize },
    #[error("record kind: {0}")]
    Kind(UnknownValue),
    #[error("record kind {kind:?} says {said} bytes; {len} arrived, {need} expected")]
    Size { kind: EventKind, said: u32, len: usize, need: usize },
    #[error("ioctl record: {0}")]
    Value(UnknownValue),
    #[error("ioctl record: request {cmd:#x} is not a watched ioctl")]
    Request { cmd: u32 },
    #[error("ioctl record: decision {decision:?} has rule {rule:#x}")]
    Rule { decision: Decision, rule: u32 },
}

fn read<T: Copy>(bytes: &[u8]) -> T {
    debug_assert!(bytes.len() >= size_of::<T>());
    // SAFETY: callers check the length; T is a plain-integer repr(C) type, valid for any bits;
    // read_unaligned tolerates the ring buffer's 8-byte alignment of records.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

pub fn event(bytes: &[u8]) -> Result<Event, DecodeError> {
    let need = size_of::<EventHeader>();
    if bytes.len() < need {
        return Err(DecodeError::Short { len: bytes.len(), need });
    }
    let header: EventHeader = read(bytes);
    let kind = EventKind::try_from(header.kind).map_err(DecodeError::Kind)?;
    let check = |need: usize| {
        if bytes.len() < need || header.size as usize != need {
            Err(DecodeError::Size { kind, said: header.size, len: bytes.len(), need })
        } else {
            Ok(())
        }
    };
    match kind {
        EventKind::Ioctl => {
            check(size_of::<IoctlEvent>())?;
            ioctl(&read(bytes))
        }
        EventKind::Noncoherent => {
            check(size_of::<TransitionEvent>())?;
            let ev: TransitionEvent = read(bytes);
            Ok(Event::Transition(Transition {
                origin: origin(&ev.header),
                kvm: ev.kvm,
                register: ev.register != 0,
            }))
        }
    }
}

fn origin(h: &EventHeader) -> Origin {
    Origin { tgid: h.tgid, comm: comm(&h.comm), ktime_ns: h.ktime_ns }
}

fn ioctl(ev: &IoctlEvent) -> Result<Event, DecodeError> {
    let request = ioctl_name(ev.cmd).ok_or(DecodeError::Request { cmd: ev.cmd })?;
    let decision = Decision::try_from(ev.decision).map_err(DecodeError::Value)?;
    let ret = (ev.flags & IOCTL_F_RETURNED != 0).then_some(ev.ret);
    let judged = match decision {
        Decision::None => {
            return Ok(Event::Ioctl(IoctlSeen {
                origin: origin(&ev.header),
                request,
                fd: ev.fd,
                creates_vm_or_device: matches!(ev.cmd, KVM_CREATE_VM | KVM_CREATE_DEVICE),
                vfio_file: matches!(
                    ev.cmd,
                    VFIO_GROUP_SET_CONTAINER | VFIO_GROUP_GET_DEVICE_FD | VFIO_DEVICE_BIND_IOMMUFD
                ),
                file_del: ev.cmd == KVM_SET_DEVICE_ATTR
                    && ev.flags & IOCTL_F_ATTR_READ != 0
                    && ev.attr_group == KVM_DEV_VFIO_FILE
                    && ev.attr_attr == KVM_DEV_VFIO_FILE_DEL,
                ret,
                group: ev.attr_group,
                attr: ev.attr_attr,
            }));
        }
        Decision::Ask => KernelJudged::Ask,
        Decision::Observed => KernelJudged::Observed,
        d => {
            let rule = match ev.rule {
                RULE_DEFAULT => RuleRef::Default,
                RULE_NONE if ev.flags & IOCTL_F_FD_SWAPPED != 0 && d == Decision::Deny => RuleRef::FdSwapped,
                RULE_NONE => return Err(DecodeError::Rule { decision: d, rule: ev.rule }),
                i => RuleRef::Index(i),
            };
            let action = Action::from_kernel(d).ok_or(DecodeError::Rule { decision: d, rule: ev.rule })?;
            KernelJudged::Verdict { action, rule, generation: ev.generation }
        }
    };
    let kernel_coherent = match Coherency::try_from(ev.kernel_coherent).map_err(DecodeError::Value)? {
        Coherency::Unknown => None,
        Coherency::Coherent => Some(true),
        Coherency::Noncoherent => Some(false),
    };
    let file_coherency = Coherency::try_from(ev.file_coherency).map_err(DecodeError::Value)?;
    Ok(Event::Enable(EnableRequest {
        origin: origin(&ev.header),
        fd: ev.fd,
        file_fd: (ev.flags & IOCTL_F_FILE_FD_READ != 0).then_some(ev.file_fd),
        device_fd_known: ev.flags & IOCTL_F_DEVICE_KNOWN != 0,
        judged,
        mechanism: Mechanism::try_from(ev.mechanism).map_err(DecodeError::Value)?,
        signal_sent: ev.flags & IOCTL_F_SIGNAL_SENT != 0,
        ask_recorded: ev.flags & IOCTL_F_ASK_RECORDED != 0,
        ret,
        kernel_coherent,
        file_coherency,
    }))
}

/// The comm as text (NUL-terminated in the kernel).
pub fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
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
        ev.header.kind = EventKind::Ioctl.wire();
        ev.header.size = size_of::<IoctlEvent>() as u32;
        ev.header.tgid = 77;
        ev.header.comm[..4].copy_from_slice(b"qemu");
        ev.cmd = KVM_SET_DEVICE_ATTR;
        ev.ret = -22;
        ev.rule = RULE_NONE;
        ev
    }

    #[test]
    fn decodes_an_ioctl_and_an_enable() {
        let mut raw = ioctl_event();
        raw.cmd = KVM_CREATE_VM;
        raw.flags = IOCTL_F_RETURNED;
        let Event::Ioctl(ev) = event(&bytes_of(&raw)).unwrap() else { panic!("kind") };
        assert_eq!((ev.origin.tgid, ev.ret, ev.origin.comm.as_str()), (77, Some(-22), "qemu"));
        assert_eq!((ev.request, ev.creates_vm_or_device), ("KVM_CREATE_VM", true));

        let mut raw = ioctl_event();
        raw.decision = Decision::Deny.wire();
        raw.mechanism = Mechanism::Sigkill.wire();
        raw.rule = 2;
        raw.generation = 5;
        raw.file_fd = 9;
        raw.kernel_coherent = Coherency::Noncoherent.wire();
        raw.flags = IOCTL_F_FILE_FD_READ | IOCTL_F_SIGNAL_SENT;
        let Event::Enable(ev) = event(&bytes_of(&raw)).unwrap() else { panic!("kind") };
        assert_eq!(
            ev.judged,
            KernelJudged::Verdict { action: Action::Deny, rule: RuleRef::Index(2), generation: 5 }
        );
        assert_eq!(
            (ev.file_fd, ev.ret, ev.kernel_coherent, ev.signal_sent),
            (Some(9), None, Some(false), true)
        );
        raw.decision = Decision::Ask.wire();
        raw.rule = RULE_NONE;
        let Event::Enable(ev) = event(&bytes_of(&raw)).unwrap() else { panic!("kind") };
        assert_eq!(ev.judged, KernelJudged::Ask);
    }

    #[test]
    fn rejects_bad_records() {
        let good = bytes_of(&ioctl_event());
        assert!(matches!(event(&good[..10]), Err(DecodeError::Short { len: 10, .. })));
        assert!(matches!(event(&good[..100]), Err(DecodeError::Size { .. })));
        let mut wrong_size = ioctl_event();
        wrong_size.header.size = 8;
        assert!(matches!(event(&bytes_of(&wrong_size)), Err(DecodeError::Size { said: 8, .. })));
        let mut unknown = ioctl_event();
        unknown.header.kind = 99;
        assert!(matches!(event(&bytes_of(&unknown)), Err(DecodeError::Kind(UnknownValue { value: 99, .. }))));
        let mut bad = ioctl_event();
        bad.decision = 42;
        assert!(matches!(event(&bytes_of(&bad)), Err(DecodeError::Value(_))));
        let mut bad = ioctl_event();
        bad.decision = Decision::Allow.wire();
        assert!(matches!(event(&bytes_of(&bad)), Err(DecodeError::Rule { .. })), "a verdict needs a rule");
        let mut bad = ioctl_event();
        bad.cmd = 0x5401;
        assert_eq!(event(&bytes_of(&bad)), Err(DecodeError::Request { cmd: 0x5401 }));
        // Arbitrary bytes never panic.
        for len in 0..200 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = event(&junk);
        }
    }

    #[test]
    fn comm_without_nul() {
        assert_eq!(comm(b"0123456789abcdef"), "0123456789abcdef");
        assert_eq!(comm(&[0; 16]), "");
    }
}
