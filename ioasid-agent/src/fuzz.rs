//! Property-based fuzzing of everything that parses untrusted bytes: the ring-record decoder
//! (kernel bytes), the policy parser (files), the `-name` parser (any /dev/kvm user's command
//! line) and the audit-line reader of `replay`. No input may panic, and what is read stays
//! bounded by the input. CI runs the default number of cases; a longer run:
//! `PROPTEST_CASES=200000 cargo test -p ioasid-agent fuzz::`.

use proptest::prelude::*;

use crate::{engine::policy::Policy, host::procfs::vm_name_from_cmdline, kernel::decode};

/// Pieces of the policy language, glued at random: reaches far deeper into the parser and
/// compiler than random bytes do.
const POLICY_TOKENS: &[&str] = &[
    "default:",
    "rules:",
    "\n",
    "  ",
    "    ",
    "- ",
    "name: ",
    "match: ",
    "{",
    "}",
    "[",
    "]",
    ", ",
    ": ",
    "vm: ",
    "cgroup: ",
    "exe: ",
    "uids: ",
    "devices: ",
    "incoherent_dma: ",
    "deny",
    "allow",
    "audit",
    "unknown_coherency: ",
    "judge",
    "wbinvd: ",
    "rate: ",
    "cost_ratio: ",
    "window: ",
    "action: ",
    "kill",
    "stop",
    "alert",
    "1e309",
    "-1",
    "0",
    "NaN",
    "1000",
    "0.05",
    "10s",
    "0ms",
    "2h",
    "\"gpu-*\"",
    "\"[\"",
    "'*'",
    "&a ",
    "*a",
    "<<: *a",
    "? ",
    "# c",
    "~",
    "null",
    "!!str ",
    "\t",
    "0x10de:*",
    "\u{feff}",
];

proptest! {
    #[test]
    fn ring_records_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::event(&bytes);
    }

    /// Records with a valid header (kind, size) and random content: every field is exercised.
    #[test]
    fn well_framed_ring_records_never_panic(kind in 0u32..3, body in proptest::collection::vec(any::<u8>(), 256)) {
        use ioasid_common::events::{EventKind, IoctlEvent, TransitionEvent};
        let size = match EventKind::try_from(kind) {
            Ok(EventKind::Ioctl) => size_of::<IoctlEvent>(),
            Ok(EventKind::Noncoherent) => size_of::<TransitionEvent>(),
            Err(_) => 64,
        };
        let mut rec = body[..size.min(body.len())].to_vec();
        rec[..4].copy_from_slice(&kind.to_ne_bytes());
        rec[4..8].copy_from_slice(&(size as u32).to_ne_bytes());
        let _ = decode::event(&rec);
    }

    #[test]
    fn policy_bytes_never_panic(text in "\\PC{0,400}") {
        let _ = Policy::parse(&text, "fuzz.yaml");
    }

    #[test]
    fn policy_token_soup_never_panics(tokens in proptest::collection::vec(proptest::sample::select(POLICY_TOKENS), 0..120)) {
        let _ = Policy::parse(&tokens.concat(), "fuzz.yaml");
    }

    #[test]
    fn name_parser_never_panics_and_stays_bounded(args in proptest::collection::vec("(-name|--name|-name=|guest=|,|,,|=|\\PC{0,40}){1,4}", 0..8)) {
        if let Some(name) = vm_name_from_cmdline(&args) {
            prop_assert!(!name.is_empty() && name.len() <= crate::host::procfs::MAX_VM_NAME);
        }
    }

    /// A name QEMU would take (commas doubled) comes back as given.
    #[test]
    fn name_parser_reads_what_qemu_reads(name in "[^\\x00]{1,100}", form in 0usize..3) {
        let escaped = name.replace(',', ",,");
        let args: Vec<String> = match form {
            0 => vec!["qemu".into(), "-name".into(), format!("guest={escaped},debug-threads=on")],
            1 => vec!["qemu".into(), format!("--name=guest={escaped}")],
            _ => vec!["qemu".into(), "-name".into(), "old".into(), "-name".into(), format!("guest={escaped}")],
        };
        let got = vm_name_from_cmdline(&args);
        let mut want = name.clone();
        if want.len() > crate::host::procfs::MAX_VM_NAME {
            let mut end = crate::host::procfs::MAX_VM_NAME;
            while !want.is_char_boundary(end) {
                end -= 1;
            }
            want.truncate(end);
        }
        prop_assert_eq!(got, Some(want));
    }

    #[test]
    fn uuid_parser_never_panics(args in proptest::collection::vec("(-uuid|--uuid|-uuid=|[0-9a-fA-F-]{0,40}|\\PC{0,40})", 0..6)) {
        if let Some(u) = crate::host::procfs::uuid_from_cmdline(&args) {
            prop_assert_eq!(u.len(), 36);
        }
    }

    #[test]
    fn audit_lines_never_panic(line in "\\PC{0,300}") {
        let _ = serde_json::from_str::<crate::output::audit::AuditRecord>(&line);
    }
}
