//! Decoding shared by the kernel programs and the tests: one implementation, tested on the host.

use crate::{
    abi::{
        KVM_ISA_SVM, KVM_ISA_VMX, SVM_EXIT_INVD, SVM_EXIT_WBINVD, VMX_EXIT_REASON_BASIC_MASK,
        VMX_EXIT_REASON_INVD, VMX_EXIT_REASON_WBINVD,
    },
    counters::Op,
};

/// Which instruction a kvm:kvm_exit record is for, if WBINVD or INVD.
#[inline(always)]
pub fn classify_exit(isa: u32, exit_reason: u64) -> Option<Op> {
    if isa == KVM_ISA_VMX {
        match exit_reason & VMX_EXIT_REASON_BASIC_MASK {
            VMX_EXIT_REASON_WBINVD => Some(Op::Wbinvd),
            VMX_EXIT_REASON_INVD => Some(Op::Invd),
            _ => None,
        }
    } else if isa == KVM_ISA_SVM {
        match exit_reason {
            SVM_EXIT_WBINVD => Some(Op::Wbinvd),
            SVM_EXIT_INVD => Some(Op::Invd),
            _ => None,
        }
    } else {
        None
    }
}

/// Which instruction the bytes of a kvm:kvm_emulate_insn record are: WBINVD for 0f 09 (with
/// `f3`, WBNOINVD, which KVM emulates the same way), INVD for 0f 08. Legacy prefixes are
/// skipped, and REX prefixes in 64-bit mode. Bounded for the verifier.
#[inline(always)]
pub fn classify_insn(insn: &[u8; 15], len: u8, long_mode: bool) -> Option<Op> {
    let len = if (len as usize) > insn.len() { insn.len() } else { len as usize };
    let mut i = 0usize;
    while i < 14 && i < len {
        let b = insn[i];
        let prefix = matches!(b, 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3)
            || (long_mode && (b & 0xf0) == 0x40);
        if !prefix {
            break;
        }
        i += 1;
    }
    if i + 2 > len || i >= 14 {
        return None;
    }
    if insn[i] != 0x0f {
        return None;
    }
    match insn[i + 1] {
        0x09 => Some(Op::Wbinvd),
        0x08 => Some(Op::Invd),
        _ => None,
    }
}

/// The instruction KVM's emulator decoded, from its context: `opcode_len` 2 (0f xx) with opcode
/// byte `b` 09 is WBINVD (WBNOINVD too: its f3 is a prefix), 08 INVD.
#[inline(always)]
pub fn classify_decoded(opcode_len: u8, b: u8) -> Option<Op> {
    match (opcode_len, b) {
        (2, 0x09) => Some(Op::Wbinvd),
        (2, 0x08) => Some(Op::Invd),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn(bytes: &[u8]) -> ([u8; 15], u8) {
        let mut b = [0u8; 15];
        b[..bytes.len()].copy_from_slice(bytes);
        (b, bytes.len() as u8)
    }

    #[test]
    fn exit_reasons() {
        let (w, i) = (Some(Op::Wbinvd), Some(Op::Invd));
        assert_eq!(classify_exit(KVM_ISA_VMX, 54), w);
        assert_eq!(classify_exit(KVM_ISA_VMX, 13), i);
        // VMX flags in the upper half (e.g. bit 31, failed VM entry; bit 27, enclave) are masked.
        assert_eq!(classify_exit(KVM_ISA_VMX, 0x0800_0036), w);
        assert_eq!(classify_exit(KVM_ISA_VMX, 0x89), None);
        assert_eq!(classify_exit(KVM_ISA_SVM, 0x89), w);
        assert_eq!(classify_exit(KVM_ISA_SVM, 0x76), i);
        // SVM codes are not masked: 0x10089 is not WBINVD.
        assert_eq!(classify_exit(KVM_ISA_SVM, 0x1_0089), None);
        assert_eq!(classify_exit(KVM_ISA_SVM, 54), None);
        assert_eq!(classify_exit(0, 54), None);
        assert_eq!(classify_exit(3, 0x89), None);
    }

    #[test]
    fn instruction_bytes() {
        let (w, i) = (Some(Op::Wbinvd), Some(Op::Invd));
        let cases: &[(&[u8], bool, Option<Op>)] = &[
            (&[0x0f, 0x09], false, w),
            (&[0x0f, 0x08], false, i),
            (&[0xf3, 0x0f, 0x09], false, w), // WBNOINVD
            (&[0x66, 0x2e, 0x0f, 0x09], false, w),
            (&[0x48, 0x0f, 0x09], true, w),     // REX in long mode
            (&[0x48, 0x0f, 0x09], false, None), // 0x48 is DEC eax outside long mode
            (&[0x0f, 0x0b], false, None),       // UD2
            (&[0x0f], false, None),             // truncated
            (&[0x90], false, None),
            (&[], false, None),
        ];
        for (bytes, long_mode, want) in cases {
            let (b, len) = insn(bytes);
            assert_eq!(classify_insn(&b, len, *long_mode), *want, "{bytes:02x?}");
        }
        // A length byte larger than the array must not read past it.
        let (b, _) = insn(&[0x0f, 0x09]);
        assert_eq!(classify_insn(&b, 200, false), w);
        // Fourteen prefixes and nothing else is not an instruction we count.
        let b = [0x66u8; 15];
        assert_eq!(classify_insn(&b, 15, false), None);
    }

    #[test]
    fn wire_enums_round_trip() {
        use crate::{counters::*, events::*, verdict::*};
        for d in Decision::ALL {
            assert_eq!(Decision::try_from(d.wire()), Ok(*d));
        }
        for s in Stat::ALL {
            assert_eq!(Stat::try_from(*s as u32), Ok(*s));
        }
        assert_eq!(Path::try_from(5), Ok(Path::Flushed));
        let e = Mechanism::try_from(9).unwrap_err();
        assert_eq!((e.what, e.value), ("Mechanism", 9));
        assert!(EventKind::try_from(0).is_err());
        assert_eq!(Coherency::try_from(2), Ok(Coherency::Noncoherent));
    }
}
