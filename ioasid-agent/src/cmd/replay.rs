//! `ioasid-agent replay EVENTS.jsonl --policy PATH`: what a policy would decide for recorded
//! requests. Bad lines are reported with their line numbers; the others are still evaluated.

use std::io::{BufRead, Read};

/// The longest line `replay` reads (an audit record is a few hundred bytes).
const MAX_LINE: usize = 1 << 20;

use anyhow::{bail, Context, Result};

use crate::{
    audit::{AuditRecord, RecordKind},
    cli::ReplayArgs,
    enforce,
    policy::Policy,
};

pub fn run(args: &ReplayArgs) -> Result<()> {
    let policy = Policy::load(&args.policy)?;
    let file =
        std::fs::File::open(&args.events).with_context(|| format!("opening {}", args.events.display()))?;
    let (mut total, mut changed, mut bad, mut skipped) = (0usize, 0usize, 0usize, 0usize);
    if !args.json {
        println!("{:<24} {:<8} {:<10} {:<10} {:<24} REASON", "VM", "PID", "RECORDED", "DECISION", "RULE");
    }
    let mut reader = std::io::BufReader::new(file);
    let mut raw = Vec::new();
    for i in 0.. {
        raw.clear();
        // Bounded: a line longer than any record is reported, not read whole into memory.
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut raw)
            .with_context(|| format!("reading {}", args.events.display()))?;
        if n == 0 {
            break;
        }
        if raw.len() > MAX_LINE && !raw.ends_with(b"\n") {
            bad += 1;
            eprintln!("{}:{}: line longer than {MAX_LINE} bytes: skipped", args.events.display(), i + 1);
            // Skip the rest of the line.
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
                eprintln!("{}:{}: not UTF-8 ({e}): skipped", args.events.display(), i + 1);
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        // Audit logs also hold other events (WBINVD storms): only decisions are replayed.
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                bad += 1;
                eprintln!("{}:{}: not JSON: {e}", args.events.display(), i + 1);
                continue;
            }
        };
        if value.get("event").and_then(|e| e.as_str()).is_some_and(|e| e != RecordKind::IncoherentDma.label())
        {
            skipped += 1;
            continue;
        }
        let rec: AuditRecord = match serde_json::from_value(value) {
            Ok(r) => r,
            Err(e) => {
                bad += 1;
                eprintln!("{}:{}: not a recorded request: {e}", args.events.display(), i + 1);
                continue;
            }
        };
        total += 1;
        let (decision, rule, reason) = enforce::replay(&rec, &policy);
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
            println!(
                "{:<24} {:<8} {:<10} {:<10} {:<24} {}",
                rec.vm,
                rec.pid,
                rec.decision,
                decision,
                rule,
                reason.unwrap_or_default()
            );
        }
    }
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
