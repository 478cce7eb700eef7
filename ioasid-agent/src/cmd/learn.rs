//! `ioasid-agent policy learn AUDIT.jsonl... [--margin 0.5] [--out FILE]`: a policy learned from
//! what ran, for the rollout audit -> learn -> review -> enforce.
//!
//! Every incoherent-DMA enable the logs show let through (allowed or audited) gets a rule that
//! lets it through again with the same decision; anything else is denied (`default: deny`).
//! Learned rules admit what ran and nothing else: the enables are grouped by VMM executable, uid
//! and VM name, where names that evidently share a pattern (`gpu-a100-1`, `gpu-a100-2`: the
//! same text up to their last separator) share one (`gpu-a100-*`), never a bare `*`; each rule
//! matches exactly its VMs' names, cgroups (their common prefix and `*` where they share one,
//! else each exactly) and PCI devices, and has a WBINVD budget at the highest storm rate the
//! logs recorded for the processes it admits (the same process as a learned enable, by host,
//! pid, VM name, uid, executable and cgroup) plus the margin. Names, paths and devices are anyone's choice: one
//! a policy cannot express exactly (control characters, a backslash) is reported and left out,
//! and learning goes on. The result is checked before it is written: it parses, every learned
//! request replays to its recorded decision, and a VM name never seen is denied.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
};

use anyhow::{bail, Context, Result};

use super::replay::{decision, for_each_line};
use crate::{
    engine::enforce,
    engine::policy::{
        Action, BudgetFile, DefaultSection, MatchFile, Policy, RuleFile, Uids, UnknownCoherency, MAX_RULES,
    },
    output::audit::{AuditRecord, Decision, RecordKind, StormRecord},
};

/// The separators a name's evident pattern ends at.
const SEPARATORS: &[char] = &['-', '_', '.', '/', ':'];

/// Whether `s` can be written as a glob matching exactly it (glob escaping covers `*?[]{}`;
/// control characters and `\` it cannot).
fn expressible(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c.is_control() || c == '\\')
}

/// A glob matching exactly the given values: the value, or `{a,b,...}` (commas escaped).
fn any_of(values: &[String]) -> String {
    let esc = |v: &String| globset::escape(v).replace(',', "[,]");
    match values {
        [one] => globset::escape(one),
        many => format!("{{{}}}", many.iter().map(esc).collect::<Vec<_>>().join(",")),
    }
}

/// A VM name's evident pattern: its text up to and including its last separator, if that
/// leaves at least two characters before it and something after it (`gpu-a100-1` -> `gpu-a100-`).
fn stem(name: &str) -> Option<&str> {
    let end = name.rfind(SEPARATORS)?;
    (end >= 2 && end + 1 < name.len()).then(|| &name[..=end])
}

/// The VM name patterns of one executable and uid's names: names sharing a stem with another
/// name share `stem*`; every other name is matched exactly. Pattern -> the names it covers.
fn clusters(names: &[String]) -> BTreeMap<String, Vec<String>> {
    let mut by_stem: BTreeMap<Option<&str>, Vec<String>> = BTreeMap::new();
    for n in names {
        by_stem.entry(stem(n)).or_default().push(n.clone());
    }
    let mut out = BTreeMap::new();
    for (s, mut ns) in by_stem {
        ns.sort();
        ns.dedup();
        match s {
            Some(s) if ns.len() >= 2 => {
                out.insert(format!("{}*", globset::escape(s)), ns);
            }
            _ => {
                for n in ns {
                    out.insert(globset::escape(&n), vec![n]);
                }
            }
        }
    }
    out
}

#[derive(Default)]
struct Group {
    vms: Vec<String>,
    cgroups: Vec<String>,
    devices: Vec<String>,
    /// A request with no device list (not a resolved VFIO file): the rule allows any device.
    any_device: bool,
    audited: usize,
    allowed: usize,
    peak_rate: Option<f64>,
}

/// The exact text as a glob (metacharacters escaped) when all values agree, else their common
/// prefix and `*`; None when they share nothing (the key is left out: anything matches).
fn pattern(values: &[String]) -> Option<String> {
    let first = values.first()?;
    if values.iter().all(|v| v == first) {
        return Some(globset::escape(first));
    }
    let mut prefix: &str = first;
    for v in values {
        while !v.starts_with(prefix) {
            let mut end = prefix.len() - 1;
            while !prefix.is_char_boundary(end) {
                end -= 1;
            }
            prefix = &prefix[..end];
        }
    }
    (!prefix.is_empty()).then(|| format!("{}*", globset::escape(prefix)))
}

/// A comment line of the learned file: free text (VM names, paths: anyone's choice) escaped to
/// one line, so it can never end the comment and become YAML.
fn comment(indent: &str, text: &str) -> String {
    format!("{indent}# {}\n", crate::util::text::escape(text))
}

/// YAML of a value, from the policy file's own types (serde), indented.
fn yaml<T: serde::Serialize>(v: &T, indent: &str) -> Result<String> {
    let text = serde_norway::to_string(v).context("serialising the learned policy")?;
    Ok(text.lines().map(|l| format!("{indent}{l}\n")).collect())
}

/// The learned policy file: serialised from `PolicyFile`'s types, one rule per group, each
/// preceded by comments on what it saw.
fn render(
    logs: &[PathBuf],
    records: &[AuditRecord],
    denied: usize,
    bad: usize,
    groups: &mut BTreeMap<Key, Group>,
    left_out: &[String],
    margin: f64,
) -> Result<String> {
    let sources = logs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    let skipped = if bad > 0 { format!(", {bad} unreadable line(s) skipped") } else { String::new() };
    let mut y = comment(
        "",
        &format!(
            "Learned by `ioasid-agent policy learn` from {sources} ({} enables let through, {denied} denied ones not learned{skipped}).",
            records.len()
        ),
    );
    y += &comment(
        "",
        "Review before enforcing: every rule lets through what it saw; anything else is denied.",
    );
    for l in left_out {
        y += &comment("", &format!("Left out: {l}"));
    }
    let default = DefaultSection {
        incoherent_dma: Action::Deny,
        unknown_coherency: UnknownCoherency::Judge,
        wbinvd: BudgetFile::default(),
    };
    y += "default:\n";
    y += &yaml(&default, "  ")?;
    y += "rules:\n";
    for (i, (key, g)) in groups.iter_mut().enumerate() {
        let (rule, notes) = learned_rule(i, key, g, margin);
        for note in notes {
            y += &comment("  ", &note);
        }
        y += &yaml(&vec![rule], "  ")?;
    }
    Ok(y)
}

/// One group's rule, and the comments that explain it.
fn learned_rule(i: usize, (exe, uid, vm): &Key, g: &mut Group, margin: f64) -> (RuleFile, Vec<String>) {
    let uid = *uid;
    g.devices.sort();
    g.devices.dedup();
    let mut vms = g.vms.clone();
    vms.sort();
    vms.dedup();
    let mut notes = vec![format!(
        "{} enable(s) ({} allowed, {} audited) by {} VM(s): {}",
        g.allowed + g.audited,
        g.allowed,
        g.audited,
        vms.len(),
        vms.iter().take(8).cloned().collect::<Vec<_>>().join(", ") + if vms.len() > 8 { ", ..." } else { "" }
    )];
    let mut cgroups = g.cgroups.clone();
    cgroups.sort();
    cgroups.dedup();
    let matcher = MatchFile {
        vm: Some(vm.clone()),
        // Their common prefix where they share one, else each of them: never any cgroup.
        cgroup: pattern(&cgroups)
            .filter(|p| p.len() > 2)
            .or_else(|| (!cgroups.is_empty()).then(|| any_of(&cgroups))),
        exe: (!exe.is_empty()).then(|| globset::escape(exe)),
        uid: Some(Uids::One(uid)),
    };
    let devices = if g.any_device {
        notes.push("some enables named no PCI device (not a resolved VFIO file): any device".into());
        None
    } else {
        Some(g.devices.iter().map(|d| globset::escape(d)).collect())
    };
    let wbinvd = match g.peak_rate {
        Some(peak) => {
            notes.push(format!(
                "the highest WBINVD storm rate recorded for these VMs: {peak:.0}/s, plus {:.0} %",
                margin * 100.0
            ));
            Some(BudgetFile { rate: Some((peak * (1.0 + margin)).ceil()), ..BudgetFile::default() })
        }
        None => {
            notes.push("no WBINVD storm recorded for these VMs: the default budget applies".into());
            None
        }
    };
    let rule = RuleFile {
        name: format!("learned-{}", i + 1),
        matcher,
        incoherent_dma: Some(if g.audited > 0 { Action::Audit } else { Action::Allow }),
        unknown_coherency: None,
        devices,
        wbinvd,
    };
    (rule, notes)
}

pub struct Learned {
    pub yaml: String,
    pub learned: usize,
    pub denied: usize,
}

/// What the logs hold: the enables let through, the storms, and how many were denied or
/// unreadable.
#[derive(Default)]
struct Logs {
    records: Vec<AuditRecord>,
    storms: Vec<StormRecord>,
    denied: usize,
    bad: usize,
}

fn collect(logs: &[PathBuf]) -> Result<Logs> {
    let mut c = Logs::default();
    for path in logs {
        let mut unparsed = 0;
        // One line at a time: only the records learned from are kept, never the file's JSON.
        let unreadable = for_each_line(path, |line| {
            if line.value.get("event").and_then(|e| e.as_str()) == Some(RecordKind::WbinvdStorm.label()) {
                if let Ok(s) = serde_json::from_value::<StormRecord>(line.value) {
                    c.storms.push(s);
                }
                return;
            }
            match decision(&line) {
                Ok(Some(r)) if r.decision == Decision::Denied => c.denied += 1,
                Ok(Some(r)) => c.records.push(r),
                Ok(None) => {}
                Err(e) => {
                    unparsed += 1;
                    eprintln!("{}:{}: not a recorded request: {e}", path.display(), line.number);
                }
            }
        })?;
        c.bad += unreadable + unparsed;
    }
    Ok(c)
}

/// A group's key: executable, uid and VM name pattern.
type Key = (String, u32, String);

/// The enables learned, by the process that made them (host, pid, VM name), with their group.
type LearnedProcs<'a> = HashMap<(&'a str, u32, &'a str), Vec<(&'a AuditRecord, Key)>>;

/// The enables by (executable, uid, VM name pattern), with the storms of their VMs; and the
/// enables left out, with why.
fn group(c: &Logs) -> (BTreeMap<Key, Group>, Vec<String>) {
    let mut left_out = Vec::new();
    let mut kept: Vec<&AuditRecord> = Vec::new();
    for r in &c.records {
        let bad = [Some(&r.vm), r.exe.as_ref(), r.cgroup.as_ref()]
            .into_iter()
            .flatten()
            .chain(r.vfio.iter().flat_map(|v| v.devices.iter()))
            .find(|s| !expressible(s));
        match bad {
            Some(s) => left_out.push(format!(
                "{} (pid {}): {:?} cannot be matched exactly (control characters or a backslash)",
                r.vm, r.pid, s
            )),
            None => kept.push(r),
        }
    }
    let mut names: BTreeMap<(String, u32), Vec<String>> = BTreeMap::new();
    for r in &kept {
        names.entry((r.exe.clone().unwrap_or_default(), r.uid)).or_default().push(r.vm.clone());
    }
    let mut pattern_of: HashMap<(String, u32, String), String> = HashMap::new();
    for ((exe, uid), ns) in &names {
        for (pat, covered) in clusters(ns) {
            for n in covered {
                pattern_of.insert((exe.clone(), *uid, n), pat.clone());
            }
        }
    }
    let mut groups: BTreeMap<Key, Group> = BTreeMap::new();
    // The processes whose enables were learned, by (host, pid, VM name): a storm's rate is
    // learned only into the rule that admits the process that stormed.
    let mut learned_procs: LearnedProcs<'_> = HashMap::new();
    for r in kept {
        let exe = r.exe.clone().unwrap_or_default();
        let pat = pattern_of[&(exe.clone(), r.uid, r.vm.clone())].clone();
        let key = (exe, r.uid, pat);
        learned_procs.entry((r.host.as_str(), r.pid, r.vm.as_str())).or_default().push((r, key.clone()));
        let g = groups.entry(key).or_default();
        g.vms.push(r.vm.clone());
        if let Some(cg) = &r.cgroup {
            g.cgroups.push(cg.clone());
        }
        match r.vfio.as_ref().map(|v| &v.devices).filter(|d| !d.is_empty()) {
            Some(d) => g.devices.extend(d.iter().cloned()),
            None => g.any_device = true,
        }
        match r.decision {
            Decision::Audited => g.audited += 1,
            _ => g.allowed += 1,
        }
    }
    for s in &c.storms {
        let Some(procs) = learned_procs.get(&(s.host.as_str(), s.pid, s.vm.as_str())) else { continue };
        // The same process as an enable learned (its uid, executable and cgroup too, where the
        // storm record has them): never a namesake's storm, nor another user's.
        let same = |r: &AuditRecord| {
            s.uid.is_none_or(|u| u == r.uid)
                && s.exe.as_ref().is_none_or(|e| Some(e) == r.exe.as_ref())
                && s.cgroup.as_ref().is_none_or(|cg| Some(cg) == r.cgroup.as_ref())
        };
        if let Some((_, key)) = procs.iter().find(|(r, _)| same(r)) {
            if let Some(g) = groups.get_mut(key) {
                g.peak_rate = Some(g.peak_rate.map_or(s.rate, |p: f64| p.max(s.rate)));
            }
        }
    }
    // A policy holds at most MAX_RULES rules: the groups past it (fewest enables first) are
    // left out, said.
    if groups.len() > MAX_RULES {
        let mut by_size: Vec<(Key, usize)> = groups.iter().map(|(k, g)| (k.clone(), g.vms.len())).collect();
        by_size.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        for (k, n) in by_size.split_off(MAX_RULES) {
            groups.remove(&k);
            left_out.push(format!(
                "{n} enable(s) of {} (uid {}, VMs {}): past the {MAX_RULES} rules a policy holds",
                k.0, k.1, k.2
            ));
        }
    }
    (groups, left_out)
}

pub fn learn(logs: &[PathBuf], margin: f64) -> Result<Learned> {
    if !(margin.is_finite() && (0.0..=10.0).contains(&margin)) {
        bail!("--margin must be between 0 and 10 (0.5 = 50 % above the observed peak)");
    }
    let c = collect(logs)?;
    if c.records.is_empty() {
        bail!("no incoherent-DMA enable that was let through in {logs:?}: nothing to learn");
    }
    let (mut groups, left_out) = group(&c);
    for l in &left_out {
        eprintln!("left out: {}", crate::util::text::escape(l));
    }
    let y = render(logs, &c.records, c.denied, c.bad, &mut groups, &left_out, margin)?;
    // Checked before it is written: it parses, each learned request replays unchanged, and the
    // same process under a name never seen is denied.
    let policy = Policy::parse(&y, "<learned>").context("the learned policy does not parse (a bug)")?;
    let learned: Vec<&AuditRecord> =
        c.records.iter().filter(|r| groups.values().any(|g| g.vms.contains(&r.vm))).collect();
    for r in &learned {
        let mut stranger = (*r).clone();
        stranger.vm = "ioasid-learn-never-seen".into();
        stranger.identity = Default::default();
        let d = enforce::replay(&stranger, &policy).decision;
        if d != Decision::Denied {
            bail!("the learned policy decides {d} for a VM it never saw (as {}): a bug", r.vm);
        }
    }
    for r in learned {
        let enforce::Replayed { decision: d, rule, .. } = enforce::replay(r, &policy);
        if d != r.decision {
            bail!(
                "the learned policy decides {d} for {} (recorded {}; rule {rule}): a bug",
                r.vm,
                r.decision
            );
        }
    }
    Ok(Learned { yaml: y, learned: c.records.len(), denied: c.denied })
}

pub fn run(
    logs: &[PathBuf],
    margin: f64,
    out: Option<&std::path::Path>,
    follow: Option<std::time::Duration>,
) -> Result<()> {
    let l = match follow {
        None => learn(logs, margin)?,
        Some(d) => {
            let seen = watch(logs, d)?;
            learn(&[seen.path().to_path_buf()], margin)?
        }
    };
    match out {
        Some(path) => {
            crate::host::files::write(path, l.yaml.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "{}: learned from {} enables ({} denied ones not learned); review it, then `policy check` and enforce",
                path.display(),
                l.learned,
                l.denied
            );
        }
        None => print!("{}", l.yaml),
    }
    Ok(())
}

/// A file that removes itself.
pub struct Collected(PathBuf);

impl Collected {
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Collected {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads `logs` from their start and then as they grow, for `d`, into one file: what a running
/// agent wrote before and during the watch. A log renamed away (rotation) is still read as it
/// grows (the agent may write a last record there before it reopens the path), and the new file
/// at the path is followed from its start.
pub fn watch(logs: &[PathBuf], d: std::time::Duration) -> Result<Collected> {
    let dir = std::env::temp_dir();
    let path =
        dir.join(format!("ioasid-learn-{}-{}.jsonl", std::process::id(), crate::host::sys::monotonic_ns()));
    let sink = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let collected = Collected(path);
    let followed = logs
        .iter()
        .map(|p| {
            let f = crate::host::files::open_read(p).with_context(|| format!("opening {}", p.display()))?;
            Ok(Followed { path: p.clone(), file: Some(f), rest: Vec::new() })
        })
        .collect::<Result<_>>()?;
    let mut follower = Follower { followed, rotated: Vec::new(), sink };
    let deadline = std::time::Instant::now() + d;
    eprintln!("watching {} log(s) for {:?}", logs.len(), d);
    loop {
        let last = std::time::Instant::now() >= deadline;
        follower.poll()?;
        if last {
            break;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        std::thread::sleep(std::time::Duration::from_millis(200).min(left));
    }
    follower.finish()?;
    Ok(collected)
}

/// A log followed by its path. Its bytes past the last complete line wait for the rest: lines
/// of two files (a rotated one and the new one) are never interleaved mid-line.
struct Followed {
    path: PathBuf,
    file: Option<std::fs::File>,
    rest: Vec<u8>,
}

/// The logs followed, those rotated away (still read as they grow), and where lines go.
struct Follower {
    followed: Vec<Followed>,
    rotated: Vec<(std::fs::File, Vec<u8>)>,
    sink: std::fs::File,
}

/// Appends the complete lines `file` has grown by to `sink`, keeping an incomplete last one.
fn drain(file: &mut std::fs::File, rest: &mut Vec<u8>, sink: &mut std::fs::File) -> Result<()> {
    use std::io::{Read as _, Write as _};
    file.read_to_end(rest).context("reading a log")?;
    if let Some(end) = rest.iter().rposition(|b| *b == b'\n') {
        sink.write_all(&rest[..=end]).context("collecting the logs")?;
        rest.drain(..=end);
    }
    Ok(())
}

impl Follower {
    fn poll(&mut self) -> Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        for (file, rest) in &mut self.rotated {
            drain(file, rest, &mut self.sink)?;
        }
        for f in &mut self.followed {
            if let Some(file) = f.file.as_mut() {
                drain(file, &mut f.rest, &mut self.sink)
                    .with_context(|| format!("reading {}", f.path.display()))?;
            }
            // Rotated (the path names another file now): keep reading the old one as it
            // grows, and follow the new one from its start.
            let held = f.file.as_ref().and_then(|f| f.metadata().ok()).map(|m| (m.dev(), m.ino()));
            let now = std::fs::metadata(&f.path).ok().map(|m| (m.dev(), m.ino()));
            if now.is_some() && now != held {
                if let Some(old) = std::mem::replace(&mut f.file, crate::host::files::open_read(&f.path).ok())
                {
                    self.rotated.push((old, std::mem::take(&mut f.rest)));
                }
            }
        }
        Ok(())
    }

    /// A last line without its newline (cut off by the deadline) is kept whole or not at all:
    /// `learn` reports a line it cannot parse.
    fn finish(mut self) -> Result<()> {
        use std::io::Write as _;
        let rests = self.rotated.iter().map(|(_, r)| r).chain(self.followed.iter().map(|f| &f.rest));
        for rest in rests.filter(|r| !r.is_empty()) {
            self.sink
                .write_all(rest)
                .and_then(|()| self.sink.write_all(b"\n"))
                .context("collecting the logs")?;
        }
        self.sink.flush().context("collecting the logs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::policy::PolicyFile;

    fn line(vm: &str, exe: &str, uid: u32, cgroup: &str, devices: &[&str], decision: &str) -> String {
        serde_json::json!({
            "schema": 1, "id": "x-1", "event": "incoherent-dma", "time": "2026-11-28T00:00:00Z", "host": "h",
            "vm": vm, "pid": 7, "comm": "qemu", "exe": exe, "cgroup": cgroup, "uid": uid,
            "request": {"ioctl": "KVM_SET_DEVICE_ATTR", "attr": "KVM_DEV_VFIO_FILE_ADD", "fd": 5, "file_fd": 6, "device_fd_known": true},
            "vfio": {"path": "/dev/vfio/12", "kind": "group", "devices": devices, "iommu": "intel-vtd", "coherency": "not-enforced"},
            "coherency": "noncoherent", "rule": "default", "decision": decision, "mechanism": "none",
            "outcome": "completed", "ret": 0, "reason": null, "policy": "p"
        })
        .to_string()
    }

    /// A VM name is anyone's choice (whoever has /dev/kvm): one built to close the comment and
    /// write a rule of its own writes no rule and stays a one-line comment of the learned file.
    #[test]
    fn vm_names_cannot_write_rules() {
        let dir = std::env::temp_dir().join(format!("ioasid-learn-inject-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("audit.jsonl");
        let hostile = "x\n  - name: pwn\n    match: {}\n    incoherent_dma: audit\n#";
        let exe = "/usr/bin/qemu-system-x86_64";
        std::fs::write(
            &log,
            line(hostile, exe, 0, "/machine.slice/a.scope", &["0000:65:00.0"], "audited") + "\n",
        )
        .unwrap();
        let l = learn(std::slice::from_ref(&log), 0.5).unwrap();
        let f: PolicyFile = serde_norway::from_str(&l.yaml).unwrap();
        // A name with line breaks cannot be matched exactly: left out (no rule admits it), and
        // said in one comment line.
        assert!(f.rules.is_empty(), "{}", l.yaml);
        assert!(
            l.yaml
                .lines()
                .any(|line| line.starts_with("# Left out: x\\n  - name: pwn")
                    && line.contains("incoherent_dma")),
            "{}",
            l.yaml
        );
        assert!(!l.yaml.lines().any(|line| line.trim_start().starts_with("- name: pwn")), "{}", l.yaml);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn learns_groups_patterns_devices_and_budgets() {
        let dir = std::env::temp_dir().join(format!("ioasid-learn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("audit.jsonl");
        let storm = serde_json::json!({
            "event": "wbinvd-storm", "time": "t", "host": "h", "vm": "gpu-b", "pid": 7, "rule": "default",
            "state": "raised", "rate": 2000.0, "cost_ratio": 0.1, "budget_rate": 1000.0, "budget_cost_ratio": 0.05,
            "window_seconds": 1.0, "action": "alert", "outcome": "alerted", "policy": "p"
        });
        let lines = [
            line(
                "gpu-a",
                "/usr/bin/qemu-system-x86_64",
                107,
                "/machine.slice/machine-qemu-1.scope",
                &["0000:65:00.0"],
                "audited",
            ),
            line(
                "gpu-b",
                "/usr/bin/qemu-system-x86_64",
                107,
                "/machine.slice/machine-qemu-2.scope",
                &["0000:ca:00.0"],
                "audited",
            ),
            line("ml_job[1]", "/usr/libexec/qemu-kvm", 0, "/kubepods.slice/pod1", &[], "allowed"),
            line(
                "tenant-x",
                "/usr/bin/qemu-system-x86_64",
                107,
                "/machine.slice/x.scope",
                &["0000:01:00.0"],
                "denied",
            ),
            storm.to_string(),
            "not json".to_string(),
        ];
        std::fs::write(&log, lines.join("\n") + "\n").unwrap();
        let l = learn(std::slice::from_ref(&log), 0.5).unwrap();
        let y = &l.yaml;
        assert_eq!((l.learned, l.denied), (3, 1), "{y}");
        // Read back with the policy's own file types (the learned file is serialised from them).
        let f: PolicyFile = serde_norway::from_str(y).unwrap();
        assert_eq!(f.default.incoherent_dma, Action::Deny, "{y}");
        let gpu = &f.rules[0];
        assert_eq!(gpu.matcher.vm.as_deref(), Some("gpu-*"), "{y}");
        assert_eq!(gpu.matcher.cgroup.as_deref(), Some("/machine.slice/machine-qemu-*"), "{y}");
        assert_eq!(
            gpu.devices.as_deref(),
            Some(&["0000:65:00.0".to_string(), "0000:ca:00.0".to_string()][..])
        );
        assert_eq!(gpu.wbinvd.as_ref().and_then(|b| b.rate), Some(3000.0), "peak 2000/s + 50 %: {y}");
        // Glob metacharacters in a name are matched literally.
        assert!(f.rules.iter().any(|r| r.matcher.vm.as_deref() == Some("ml_job[[]1[]]")), "{y}");
        assert!(y.contains("1 unreadable line(s) skipped"), "{y}");
        let p = Policy::parse(y, "learned").unwrap();
        let rec = |vm: &str, exe: &str, uid: u32, cgroup: &str, dev: &str| -> AuditRecord {
            serde_json::from_str(&line(vm, exe, uid, cgroup, &[dev], "audited")).unwrap()
        };
        // Seen: decided as recorded; anything else: denied.
        let seen = rec(
            "gpu-a",
            "/usr/bin/qemu-system-x86_64",
            107,
            "/machine.slice/machine-qemu-1.scope",
            "0000:65:00.0",
        );
        assert_eq!(enforce::replay(&seen, &p).decision, Decision::Audited);
        let other_device = rec(
            "gpu-a",
            "/usr/bin/qemu-system-x86_64",
            107,
            "/machine.slice/machine-qemu-1.scope",
            "0000:99:00.0",
        );
        assert_eq!(enforce::replay(&other_device, &p).decision, Decision::Denied);
        let tenant =
            rec("tenant-x", "/usr/bin/qemu-system-x86_64", 107, "/machine.slice/x.scope", "0000:01:00.0");
        assert_eq!(enforce::replay(&tenant, &p).decision, Decision::Denied);
        assert!(learn(std::slice::from_ref(&log), -1.0).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A budget is learned only from storms of the processes the rule admits: a namesake's storm
    /// (another pid), or one by the same pid as another uid, executable or cgroup, inflates
    /// nothing. Before, any storm of a VM of that name set the budget (`gpu-9` got 18,360/s from
    /// a guest nobody admitted).
    #[test]
    fn a_budget_is_learned_only_from_the_identity_the_rule_admits() {
        let dir = std::env::temp_dir().join(format!("ioasid-learn-budget-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("audit.jsonl");
        let exe = "/usr/bin/qemu-system-x86_64";
        let cg = "/machine.slice/gpu-9.scope";
        let storm = |pid: u32, extra: serde_json::Value, rate: f64| {
            let mut v = serde_json::json!({
                "event": "wbinvd-storm", "time": "t", "host": "h", "vm": "gpu-9", "pid": pid, "rule": "default",
                "state": "raised", "rate": rate, "cost_ratio": 0.1, "budget_rate": 1000.0, "budget_cost_ratio": 0.05,
                "window_seconds": 1.0, "action": "alert", "outcome": "alerted", "policy": "p"
            });
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            v.to_string()
        };
        let budget = |lines: &[String]| {
            std::fs::write(&log, lines.join("\n") + "\n").unwrap();
            let l = learn(std::slice::from_ref(&log), 0.5).unwrap();
            let f: PolicyFile = serde_norway::from_str(&l.yaml).unwrap();
            assert_eq!(f.rules.len(), 1, "{}", l.yaml);
            f.rules[0].wbinvd.as_ref().and_then(|b| b.rate)
        };
        let enable = line("gpu-9", exe, 0, cg, &["0000:65:00.0"], "audited");
        // Another process named gpu-9 (pid 9), storming: nobody admitted it.
        assert_eq!(budget(&[enable.clone(), storm(9, serde_json::json!({}), 18_360.0)]), None);
        // The admitted pid, but as another uid, executable or cgroup (the pid was reused).
        for other in [
            serde_json::json!({"uid": 1000, "exe": exe, "cgroup": cg}),
            serde_json::json!({"uid": 0, "exe": "/tmp/evil", "cgroup": cg}),
            serde_json::json!({"uid": 0, "exe": exe, "cgroup": "/user.slice"}),
        ] {
            assert_eq!(budget(&[enable.clone(), storm(7, other.clone(), 18_360.0)]), None, "{other}");
        }
        // The admitted process itself (older records carry no uid, exe or cgroup: host, pid
        // and name then).
        let itself = serde_json::json!({"uid": 0, "exe": exe, "cgroup": cg});
        assert_eq!(budget(&[enable.clone(), storm(7, itself, 2_000.0)]), Some(3_000.0));
        assert_eq!(budget(&[enable, storm(7, serde_json::json!({}), 4_000.0)]), Some(6_000.0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Three VMs of one QEMU, uid and cgroup enable under audit: the learned policy lets those
    /// three through again and denies a never-seen name of the same process; hostile names are
    /// left out with a comment while learning goes on.
    #[test]
    fn a_learned_policy_admits_no_stranger() {
        let dir = std::env::temp_dir().join(format!("ioasid-learn-stranger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("audit.jsonl");
        let exe = "/usr/bin/qemu-system-x86_64";
        let cg = "/machine.slice/qemu.scope";
        let dev = ["0000:65:00.0"];
        let mut lines: Vec<String> = ["gpu-a100-1", "gpu-a100-2", "tenant-x"]
            .iter()
            .map(|vm| line(vm, exe, 0, cg, &dev, "audited"))
            .collect();
        // Anyone's names: a trailing backslash, a DEL, a comma and braces (escaped in a glob).
        for hostile in ["bad\\", "del\u{7f}", "a,{b}"] {
            lines.push(line(hostile, exe, 0, cg, &dev, "audited"));
        }
        std::fs::write(&log, lines.join("\n") + "\n").unwrap();
        let l = learn(std::slice::from_ref(&log), 0.5).unwrap();
        let y = &l.yaml;
        let f: PolicyFile = serde_norway::from_str(y).unwrap();
        let vms: Vec<&str> = f.rules.iter().filter_map(|r| r.matcher.vm.as_deref()).collect();
        assert_eq!(
            vms,
            vec!["a,{b}".replace('{', "[{]").replace('}', "[}]").as_str(), "gpu-a100-*", "tenant-x"],
            "{y}"
        );
        assert!(y.contains("# Left out: bad\\\\") && y.contains("# Left out: del\\x7f"), "{y}");
        let p = Policy::parse(y, "learned").unwrap();
        let rec = |vm: &str| -> AuditRecord {
            serde_json::from_str(&line(vm, exe, 0, cg, &dev, "audited")).unwrap()
        };
        for seen in ["gpu-a100-1", "gpu-a100-2", "tenant-x", "a,{b}"] {
            assert_eq!(enforce::replay(&rec(seen), &p).decision, Decision::Audited, "{seen}: {y}");
        }
        for stranger in ["intruder-1", "tenant-y", "gpu-a100", "bad\\"] {
            assert_eq!(enforce::replay(&rec(stranger), &p).decision, Decision::Denied, "{stranger}: {y}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn clusters_share_a_pattern_only_where_evident() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let keys = |a: &[&str]| clusters(&v(a)).into_keys().collect::<Vec<_>>();
        assert_eq!(keys(&["gpu-a100-1", "gpu-a100-2", "tenant-x"]), v(&["gpu-a100-*", "tenant-x"]));
        assert_eq!(keys(&["x", "y"]), v(&["x", "y"]));
        assert_eq!(keys(&["a-1", "b-1"]), v(&["a-1", "b-1"]), "no stem of fewer than 2 characters");
        assert_eq!(keys(&["db-", "db-1"]), v(&["db-", "db-1"]), "a stem needs something after it");
        assert_eq!(any_of(&v(&["a", "b,c"])), "{a,b[,]c}");
    }

    #[test]
    fn patterns() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(pattern(&v(&["a"])), Some("a".into()));
        assert_eq!(pattern(&v(&["gpu-1", "gpu-22"])), Some("gpu-*".into()));
        assert_eq!(pattern(&v(&["x", "y"])), None);
        assert_eq!(pattern(&v(&["é1", "é2"])), Some("é*".into()));
        assert_eq!(pattern(&[]), None);
    }
}
