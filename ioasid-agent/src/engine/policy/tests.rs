use super::*;

const ISSUE_EXAMPLE: &str = "default:\n  incoherent_dma: audit\nrules:\n  - name: gpu-tenants\n    match: { vm: \"gpu-*\" }\n    incoherent_dma: allow\n  - name: everyone-else-untrusted\n    match: { vm: \"tenant-*\" }\n    incoherent_dma: deny\n";

fn proc(vm: &str) -> ProcessInfo {
    ProcessInfo {
        pid: 1,
        comm: "qemu".into(),
        vm: vm.into(),
        exe: Some("/usr/bin/qemu-system-x86_64".into()),
        cgroup: Some("/machine.slice/machine-qemu-1.scope".into()),
        uid: 107,
        start_time: 1,
        uuid: None,
        managed: Default::default(),
    }
}

#[test]
fn the_issue_example_means_what_it_says() {
    let p = Policy::parse(ISSUE_EXAMPLE, "example.yaml").unwrap();
    let v = p.evaluate(&proc("gpu-a100-1"));
    assert_eq!(
        (v.action, v.rule_name.as_str(), v.kernel_decision()),
        (Action::Allow, "gpu-tenants", Decision::Allow)
    );
    let v = p.evaluate(&proc("tenant-42"));
    assert_eq!((v.action, v.rule, v.kernel_decision()), (Action::Deny, Some(1), Decision::Deny));
    let v = p.evaluate(&proc("web"));
    assert_eq!((v.action, v.rule, v.rule_name.as_str()), (Action::Audit, None, "default"));
    assert_eq!(v.to_kernel(1, 0).rule, RULE_DEFAULT);
}

#[test]
fn embedded_default_audits_everything() {
    let p = Policy::embedded();
    assert_eq!(p.rule_count(), 0);
    assert_eq!(p.evaluate(&proc("anything")).action, Action::Audit);
}

#[test]
fn all_keys_must_match_and_first_rule_wins() {
    let text = "rules:\n  - name: strict\n    match: { vm: \"gpu-*\", uid: [0, 107], exe: \"/usr/bin/qemu-*\", cgroup: \"/machine.slice/*\" }\n    incoherent_dma: allow\n  - name: later\n    match: { vm: \"gpu-*\" }\n    incoherent_dma: deny\n";
    let p = Policy::parse(text, "t").unwrap();
    assert_eq!(p.evaluate(&proc("gpu-1")).rule_name, "strict");
    let mut other_uid = proc("gpu-1");
    other_uid.uid = 1000;
    assert_eq!(p.evaluate(&other_uid).rule_name, "later");
    let mut no_cgroup = proc("gpu-1");
    no_cgroup.cgroup = None;
    assert_eq!(p.evaluate(&no_cgroup).action, Action::Deny);
    // Default for a file without `default`: audit.
    assert_eq!(p.evaluate(&proc("x")).action, Action::Audit);
}

#[test]
fn device_limited_rules() {
    let text = "default: { incoherent_dma: deny }\nrules:\n  - name: gpus\n    match: { vm: \"gpu-*\" }\n    incoherent_dma: allow\n    devices: [\"0000:65:00.*\", \"0000:ca:00.0\"]\n";
    let p = Policy::parse(text, "t").unwrap();
    let v = p.evaluate(&proc("gpu-1"));
    assert_eq!(v.kernel_decision(), Decision::Ask);
    assert_eq!(p.decide_device(&v, &["0000:65:00.1".into()]).0, Action::Allow);
    assert_eq!(p.decide_device(&v, &["0000:65:00.0".into(), "0000:ca:00.0".into()]).0, Action::Allow);
    let (a, why) = p.decide_device(&v, &["0000:17:00.0".into()]);
    assert_eq!(a, Action::Deny);
    assert!(why.unwrap().contains("0000:17:00.0"));
    assert_eq!(p.decide_device(&v, &[]).0, Action::Deny);
    // Rules without devices ignore the device.
    let d = p.evaluate(&proc("web"));
    assert_eq!(p.decide_device(&d, &[]).0, Action::Deny);
}

#[test]
fn wbinvd_budgets_inherit_from_the_default() {
    let text = "default:\n  incoherent_dma: audit\n  wbinvd: { rate: 500, window: 2s }\nrules:\n  - name: tenants\n    match: { vm: \"tenant-*\" }\n    wbinvd: { cost_ratio: 0.01, action: kill }\n  - name: gpu\n    match: { vm: \"gpu-*\" }\n    incoherent_dma: allow\n";
    let p = Policy::parse(text, "t").unwrap();
    let t = p.evaluate(&proc("tenant-1")).budget;
    assert_eq!(
        (t.rate, t.cost_ratio, t.window, t.action),
        (500.0, 0.01, Duration::from_secs(2), StormAction::Kill)
    );
    let g = p.evaluate(&proc("gpu-1")).budget;
    assert_eq!((g.rate, g.cost_ratio, g.action), (500.0, Budget::DEFAULT.cost_ratio, StormAction::Alert));
    // The tenant rule set only a budget: its incoherent_dma is the default's.
    assert_eq!(p.evaluate(&proc("tenant-1")).action, Action::Audit);
    assert_eq!(Policy::embedded().evaluate(&proc("x")).budget, Budget::DEFAULT);
    for (bad, want) in [
        ("default: { wbinvd: { rate: 0 } }\n", "wbinvd.rate must be a positive"),
        ("default: { wbinvd: { rate: -3 } }\n", "wbinvd.rate"),
        ("default: { wbinvd: { cost_ratio: 0 } }\n", "cost_ratio"),
        ("default: { wbinvd: { window: 10ms } }\n", "between 100ms and 1h"),
        ("default: { wbinvd: { window: soon } }\n", "wbinvd.window"),
        ("default: { wbinvd: { action: reboot } }\n", "unknown variant `reboot`"),
        ("default: { wbinvd: { burst: 3 } }\n", "unknown field `burst`"),
        ("rules:\n  - name: a\n    match: {}\n    wbinvd: { rate: .nan }\n", "rule 1 (\"a\")"),
    ] {
        let err = Policy::parse(bad, "b.yaml").expect_err(bad).to_string();
        assert!(err.contains(want), "{bad}: {err}");
    }
}

#[test]
fn bad_files_give_clear_errors() {
    let cases: &[(&str, &str)] = &[
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("default:\n  incoherent_dma: maybe\n", "unknown variant `maybe`"),
        ("default:\n  incoherent_dma: audit\n  budget: 3\n", "unknown field `budget`"),
        ("defaults:\n  incoherent_dma: audit\n", "unknown field `defaults`"),
        ("rules:\n  - name: a\n    match: { vmname: x }\n", "unknown field `vmname`"),
        ("rules:\n  - name: a\n", "missing field `match`"),
        ("rules:\n  - match: { vm: x }\n", "missing field `name`"),
        ("rules:\n  - name: \"\"\n    match: {}\n", "must not be empty"),
        ("rules:\n  - name: a\n    match: {}\n  - name: a\n    match: {}\n", "already exists"),
        ("rules:\n  - name: a\n    match: { vm: \"[\" }\n", "bad glob"),
        ("rules:\n  - name: a\n    match: { vm: \"\" }\n", "must not be empty"),
        ("rules:\n  - name: a\n    match: { uid: -1 }\n", "did not match any variant"),
        ("rules:\n  - name: a\n    match: { uid: [] }\n", "at least one uid"),
        ("rules:\n  - name: a\n    match: {}\n    devices: []\n", "`devices` is empty"),
        ("rules: 7\n", "invalid type"),
        ("- just\n- a list\n", "invalid type"),
        ("default: {incoherent_dma: audit\n", "line"),
        ("default:\n  incoherent_dma: audit\ndefault:\n  incoherent_dma: deny\n", "duplicate"),
    ];
    for (text, want) in cases {
        let err = Policy::parse(text, "bad.yaml").expect_err(text).to_string();
        assert!(err.contains(want), "{text:?}: {err}");
        assert!(err.starts_with("bad.yaml"), "{err}");
    }
    let err = Policy::parse("rules:\n  - name: a\n    match: { vmname: x }\n", "bad.yaml").unwrap_err();
    assert!(matches!(err, PolicyError::Syntax { line: 3, .. }), "{err:?}");
    assert!(Policy::load(Path::new("/nonexistent/p.yaml")).is_err());
}

#[test]
fn only_bounded_regular_files_are_read() {
    let dir = std::env::temp_dir().join(format!("ioasid-policy-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = Policy::load(&dir).unwrap_err().to_string();
    assert!(err.contains("not a regular file"), "{err}");
    let big = dir.join("big.yaml");
    std::fs::write(&big, vec![b'#'; (MAX_POLICY_BYTES + 10) as usize]).unwrap();
    let err = Policy::load(&big).unwrap_err().to_string();
    assert!(err.contains("larger than"), "{err}");
    let err = Policy::load(std::path::Path::new("/dev/zero")).unwrap_err().to_string();
    assert!(err.contains("not a regular file"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn deep_nesting_is_refused_before_the_yaml_parser() {
    use super::file::{MAX_INDENT, MAX_NESTING};
    // Flow collections: 200 KB of `[`.
    let deep = format!("rules: {}\n", "[".repeat(200_000));
    match Policy::parse(&deep, "deep.yaml") {
        Err(PolicyError::Syntax { line: 1, message, .. }) => {
            assert!(message.contains("nested too deep"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // Block structure: `- ` after `- ` on one line, and plain indentation.
    let dashes = format!("rules:\n  {}x\n", "- ".repeat(MAX_INDENT));
    assert!(matches!(Policy::parse(&dashes, "d.yaml"), Err(PolicyError::Syntax { line: 2, .. })));
    let mut stairs = String::from("default:\n");
    for i in 1..=40 {
        stairs.push_str(&format!("{}k{i}:\n", "  ".repeat(i)));
    }
    assert!(matches!(Policy::parse(&stairs, "s.yaml"), Err(PolicyError::Syntax { line: 34, .. })));
    // Within the limits, brackets in quotes and comments do not count.
    let ok = format!(
        "default: {{ incoherent_dma: audit }}  # {}\nrules:\n  - name: \"{}\"\n    match: {{ vm: \"a\" }}\n    incoherent_dma: allow\n",
        "[".repeat(MAX_NESTING * 2),
        "{".repeat(MAX_NESTING * 2)
    );
    Policy::parse(&ok, "ok.yaml").unwrap();
}

#[test]
fn a_policy_has_a_deny_when_anything_can_be_denied() {
    assert!(!Policy::embedded().has_deny(), "the embedded default audits");
    let p = |text: &str| Policy::parse(text, "t").unwrap();
    assert!(p("default: { incoherent_dma: deny }\n").has_deny());
    assert!(p("rules:\n  - name: a\n    match: { vm: \"x*\" }\n    incoherent_dma: deny\n").has_deny());
    assert!(p("rules:\n  - name: a\n    match: { vm: \"x*\" }\n    devices: [\"0000:01:00.0\"]\n").has_deny());
    assert!(!p("rules:\n  - name: a\n    match: { vm: \"x*\" }\n    incoherent_dma: allow\n").has_deny());
}

/// A throttle budget a throttle cannot steer by is valid, and said (by `policy check` and at
/// load): the VMM would be held at the floor, not at the budget.
#[test]
fn a_throttle_budget_under_the_floor_is_noted() {
    let p = |text: &str| Policy::parse(text, "t").unwrap();
    assert!(Policy::embedded().notes().is_empty());
    let under = p("default: { wbinvd: { rate: 5, action: throttle } }\nrules:\n  - name: \"gpu\\x1b\"\n    match: { vm: \"g*\" }\n    wbinvd: { rate: 10, action: throttle }\n  - name: alerts\n    match: { vm: \"a*\" }\n    wbinvd: { rate: 1, action: alert }\n  - name: fine\n    match: { vm: \"f*\" }\n    wbinvd: { rate: 20, action: throttle }\n");
    let notes = under.notes();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes[0].starts_with("the default: a throttle budget of 5/s is under the 20/s"), "{notes:?}");
    assert!(notes[1].starts_with("rule \"gpu\\x1b\": a throttle budget of 10/s"), "{notes:?}");
}
