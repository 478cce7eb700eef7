//! `ioasid-agent replay EVENTS.jsonl --policy PATH`: what a policy would decide for recorded
//! requests. Bad lines are reported with their line numbers; the others are still evaluated.

use std::io::{BufRead, Read};

/// The longest line `replay` and `learn` read: an audit record is a few hundred bytes, one
/// naming a VM by a 10 KB name some 20 KB (names, paths and devices are anyone's choice).
const MAX_LINE: usize = 64 << 10;

use anyhow::{bail, Context, Result};

use crate::{
    cmd::cli::ReplayArgs,
    engine::enforce,
    engine::policy::Policy,
    output::audit::{AuditRecord, RecordKind},
};

/// One line of a recorded file: its number and the JSON object on it.
pub struct Line {
    pub number: usize,
    pub value: serde_json::Value,
}

/// Reads JSON lines (an audit log, a `--record` file) one at a time, each handed to `each` and
/// dropped: memory stays bounded by one line whatever the file's size. Every line is bounded
/// too: a line longer than MAX_LINE, not UTF-8 or not JSON is reported by number on stderr and
/// skipped. Returns how many lines were not readable.
pub fn for_each_line(path: &std::path::Path, mut each: impl FnMut(Line)) -> Result<usize> {
    let file = crate::host::files::open_read(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let (mut bad, mut raw) = (0usize, Vec::new());
    for i in 0.. {
        raw.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut raw)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        if raw.len() > MAX_LINE && !raw.ends_with(b"\n") {
            bad += 1;
            eprintln!("{}:{}: line longer than {MAX_LINE} bytes: skipped", path.display(), i + 1);
            let mut rest = Vec::new();
            loop {
                rest.clear();
                let m = (&mut reader).take(MAX_LINE as u64).read_until(b'\n', &mut rest)?;
                if m == 0 || rest.ends_with(b"\n") {
                    break;
                }
            }
            continue;
        }
        let line = match std::str::from_utf8(&raw) {
            Ok(l) => l,
            Err(e) => {
                bad += 1;
                eprintln!("{}:{}: not UTF-8 ({e}): skipped", path.display(), i + 1);
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(value) => each(Line { number: i + 1, value }),
            Err(e) => {
                bad += 1;
                eprintln!("{}:{}: not JSON: {e}", path.display(), i + 1);
            }
        }
    }
    Ok(bad)
}

/// The line as a recorded incoherent-DMA decision: Ok(None) for another kind of record.
pub fn decision(line: &Line) -> std::result::Result<Option<AuditRecord>, serde_json::Error> {
    let kind = line.value.get("event").and_then(|e| e.as_str());
    if kind.is_some_and(|e| e != RecordKind::IncoherentDma.label()) {
        return Ok(None);
    }
    serde_json::from_value(line.value.clone()).map(Some)
}

pub fn run(args: &ReplayArgs) -> Result<()> {
    let policy = Policy::load(&args.policy)?;
    let (mut total, mut changed, mut skipped, mut unparsed) = (0usize, 0usize, 0usize, 0usize);
    if !args.json {
        println!("{:<24} {:<8} {:<10} {:<10} {:<24} REASON", "VM", "PID", "RECORDED", "DECISION", "RULE");
    }
    let unreadable = for_each_line(&args.events, |line| {
        let rec = match decision(&line) {
            Ok(Some(r)) => r,
            Ok(None) => {
                skipped += 1;
                return;
            }
            Err(e) => {
                unparsed += 1;
                eprintln!("{}:{}: not a recorded request: {e}", args.events.display(), line.number);
                return;
            }
        };
        let i = line.number - 1;
        total += 1;
        let enforce::Replayed { decision, rule, reason } = enforce::replay(&rec, &policy);
        if decision != rec.decision {
            changed += 1;
        }
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "line": i + 1, "time": rec.time, "vm": rec.vm, "pid": rec.pid,
                    "recorded": rec.decision, "decision": decision, "rule": rule, "reason": reason,
                })
            );
        } else {
            // VM names (anyone with /dev/kvm picks them) and the texts around them reach a
            // terminal: escaped, so no control sequence does.
            let esc = crate::util::text::escape;
            println!(
                "{:<24} {:<8} {:<10} {:<10} {:<24} {}",
                esc(&rec.vm),
                rec.pid,
                rec.decision,
                decision,
                esc(&rule),
                esc(&reason.unwrap_or_default())
            );
        }
    })?;
    let bad = unreadable + unparsed;
    if skipped > 0 {
        eprintln!("{skipped} other audit event(s) (not incoherent-DMA decisions) skipped");
    }
    eprintln!(
        "{total} request(s) evaluated against {}; {changed} decided differently than recorded",
        args.policy.display()
    );
    if bad > 0 {
        bail!("{bad} line(s) of {} could not be read (see above)", args.events.display());
    }
    Ok(())
}
