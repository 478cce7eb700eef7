//! Guest code for ioasid's test guests: a few bytes of 16-bit real-mode x86, assembled by hand.
//! Shared by `ioasid-guest` (through /dev/kvm), `ioasid-bench`, and the QEMU test (as a flat
//! `-bios` ROM). Every loop counts in ECX, so counts up to 2^32 - 1 are exact.

/// Port the looping code writes to after each round, so the host can pace or time it.
pub const PACE_PORT: u8 = 0x10;
pub const WBINVD: [u8; 2] = [0x0f, 0x09];
pub const INVD: [u8; 2] = [0x0f, 0x08];

/// `mov ecx, n; test ecx, ecx; jz skip; L: <insn>; dec ecx; jnz L; skip:`
pub fn counted_loop(code: &mut Vec<u8>, n: u32, insn: [u8; 2]) {
    code.extend_from_slice(&[0x66, 0xb9]);
    code.extend_from_slice(&n.to_le_bytes());
    code.extend_from_slice(&[0x66, 0x85, 0xc9, 0x74, 0x06]);
    code.extend_from_slice(&insn);
    code.extend_from_slice(&[0x66, 0x49, 0x75, 0xfa]);
}

/// Exactly `wbinvd` WBINVD then `invd` INVD, then `tail`.
pub fn counted(wbinvd: u32, invd: u32, tail: &[u8]) -> Vec<u8> {
    let mut code = Vec::new();
    counted_loop(&mut code, wbinvd, WBINVD);
    counted_loop(&mut code, invd, INVD);
    code.extend_from_slice(tail);
    code
}

/// `hlt`: ends a run with KVM_EXIT_HLT.
pub const HALT: [u8; 1] = [0xf4];

/// `top: <body>; out PACE_PORT, al; jmp top`: one KVM_RUN per round.
pub fn paced(body: &[u8]) -> Vec<u8> {
    let mut code = body.to_vec();
    code.extend_from_slice(&[0xe6, PACE_PORT]);
    let back = -(code.len() as i32 + 2);
    code.extend_from_slice(&[0xeb, back as i8 as u8]);
    code
}

/// A WBINVD storm: `batch` WBINVD per round.
pub fn storm(batch: u32) -> Vec<u8> {
    let mut body = Vec::new();
    counted_loop(&mut body, batch, WBINVD);
    paced(&body)
}

/// Port the migrating code writes to between rounds: an exit with no WBINVD.
pub const VISIT_PORT: u8 = 0x11;

/// A WBINVD storm that also exits once between rounds without executing WBINVD (`out
/// VISIT_PORT`), so the host can load the vCPU on another CPU in between.
pub fn migrating(batch: u32) -> Vec<u8> {
    let mut body = Vec::new();
    counted_loop(&mut body, batch, WBINVD);
    body.extend_from_slice(&[0xe6, VISIT_PORT]);
    paced(&body)
}

/// `n` rounds of `dec ecx; jnz` (2 ordinary instructions each), per KVM_RUN.
pub fn spin(n: u32) -> Vec<u8> {
    let mut body = vec![0x66, 0xb9];
    body.extend_from_slice(&n.to_le_bytes());
    body.extend_from_slice(&[0x66, 0x49, 0x75, 0xfc]);
    paced(&body)
}

/// A 64 KiB flat BIOS image running `code`: QEMU maps it at 0xF0000 and the CPU starts in its
/// last 16 bytes, where a far jump goes to F000:0000.
pub fn bios_rom(code: &[u8]) -> Vec<u8> {
    assert!(code.len() < 0xfff0, "guest code too large for the ROM");
    let mut image = vec![0xf4u8; 0x10000];
    image[..code.len()].copy_from_slice(code);
    image[0xfff0..0xfff5].copy_from_slice(&[0xea, 0x00, 0x00, 0x00, 0xf0]);
    image
}

/// `xor al, al; out 0xf4, al; hlt; jmp $-1`: exits QEMU through isa-debug-exit (status 1).
pub const QEMU_EXIT: [u8; 7] = [0x30, 0xc0, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_where_they_should() {
        // counted_loop: jz skips 6 bytes to the end, jnz goes back 6 to the instruction.
        let mut c = Vec::new();
        counted_loop(&mut c, 3, WBINVD);
        assert_eq!(c.len(), 17);
        assert_eq!(&c[9..11], &[0x74, 0x06]);
        assert_eq!(c[11..13], WBINVD);
        assert_eq!(&c[15..17], &[0x75, 0xfa]);
        // paced: the final short jump lands on offset 0.
        let p = storm(5);
        let end = p.len() as i32;
        assert_eq!(end + i32::from(p[p.len() - 1] as i8), 0);
        let s = spin(5);
        assert_eq!(s.len() as i32 + i32::from(s[s.len() - 1] as i8), 0);
        // spin's jnz goes back to the dec.
        assert_eq!(&s[6..10], &[0x66, 0x49, 0x75, 0xfc]);
        let rom = bios_rom(&counted(1, 1, &QEMU_EXIT));
        assert_eq!((rom.len(), rom[0xfff0]), (0x10000, 0xea));
    }
}
