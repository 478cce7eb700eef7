//! The CLI on bad input: clear errors, non-zero exit codes, never a panic. No root needed.

mod support;

use std::process::Command;

use support::{agent_path, write, TempDir};

fn agent(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_path()).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

/// The agent with `args`, its stderr piped (stdout dropped), for a test that watches it run.
fn spawn_agent(args: &[&str]) -> std::process::Child {
    Command::new(agent_path())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn policy_check_accepts_the_documented_example() {
    let dir = TempDir::new("cli");
    let p = dir.path("example.yaml");
    write(&p, "default:\n  incoherent_dma: audit\nrules:\n  - name: gpu-tenants\n    match: { vm: \"gpu-*\" }\n    incoherent_dma: allow\n  - name: everyone-else-untrusted\n    match: { vm: \"tenant-*\" }\n    incoherent_dma: deny\n");
    let (code, out, err) = agent(&["policy", "check", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("valid: 2 rule(s)"), "{out}");
    // The example policy shipped in the repository is valid too.
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/policy.yaml");
    let (code, out, err) = agent(&["policy", "check", shipped]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("note:"), "{out}");
    // A throttle budget too low to steer by is valid, and said.
    write(
        &p,
        "rules:\n  - name: tiny\n    match: { vm: \"t-*\" }\n    wbinvd: { rate: 5, action: throttle }\n",
    );
    let (code, out, err) = agent(&["policy", "check", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("note: rule \"tiny\": a throttle budget of 5/s is under the 20/s"), "{out}");
}

#[test]
fn policy_check_rejects_bad_files_with_location() {
    let dir = TempDir::new("cli");
    let cases: &[(&str, &[&str])] = &[
        ("default:\n  incoherent_dma: allow\n  extra: 1\n", &["bad.yaml:3:3", "unknown field `extra`"]),
        ("rules:\n  - name: x\n    match: { vm: \"[unclosed\" }\n", &["rule 1", "bad glob"]),
        (
            "rules:\n  - name: x\n    match: {}\n    incoherent_dma: perhaps\n",
            &["bad.yaml:4", "unknown variant `perhaps`", "`allow`, `audit`, `deny`"],
        ),
        ("\t- not yaml: [\n", &["bad.yaml"]),
        ("", &["empty"]),
        ("\u{0}\u{1}binary", &["bad.yaml"]),
    ];
    for (text, wants) in cases {
        let p = dir.path("bad.yaml");
        std::fs::write(&p, text).unwrap();
        let (code, _, err) = agent(&["policy", "check", p.to_str().unwrap()]);
        assert_eq!(code, 1, "{text:?}: {err}");
        for want in *wants {
            assert!(err.contains(want), "{text:?}: wanted {want:?} in: {err}");
        }
    }
    let (code, _, err) = agent(&["policy", "check", "/nonexistent/policy.yaml"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/policy.yaml") && err.contains("No such file"), "{err}");
    let (code, _, err) = agent(&["run", "--policy", "/nonexistent/policy.yaml"]);
    assert_eq!(code, 1, "run must refuse a missing policy: {err}");
}

#[test]
fn bad_flags_are_usage_errors() {
    for args in [
        &["run", "--listen", "not-an-address"][..],
        &["run", "--sweep-interval", "fast"],
        &["run", "--vm-retention", "-5s"],
        // Out of range: rejected before anything is attached, never a panic or a spinning core.
        &["run", "--sweep-interval", "1e-10"],
        &["run", "--sweep-interval", "0.000001"],
        &["top", "--interval", "1ms"],
        &["replay"],
        &["nonsense"],
    ] {
        let (code, _, err) = agent(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("error:"), "{err}");
    }
    let (code, out, _) = agent(&["--help"]);
    assert_eq!(code, 0);
    for word in ["run", "status", "policy", "replay"] {
        assert!(out.contains(word), "{out}");
    }
}

#[test]
fn replay_reports_bad_lines_and_still_evaluates_the_rest() {
    let dir = TempDir::new("cli");
    let pol = dir.path("p.yaml");
    write(&pol, "default:\n  incoherent_dma: deny\n");
    let events = dir.path("events.jsonl");
    let good = r#"{"time":"t","host":"h","vm":"gpu-1","pid":5,"comm":"qemu","exe":null,"cgroup":null,"uid":0,"request":{"ioctl":"KVM_SET_DEVICE_ATTR","attr":"KVM_DEV_VFIO_FILE_ADD","fd":3,"file_fd":4,"device_fd_known":true},"vfio":null,"rule":"default","decision":"audited","mechanism":"none","outcome":"completed","ret":-22,"reason":null,"policy":"x"}"#;
    // Lines 2 and 3 are not records, line 4 is not UTF-8, line 5 is far too long.
    let mut bytes = format!("{good}\nnot json\n{{\"vm\": 1}}\n").into_bytes();
    bytes.extend_from_slice(b"\xff\xfe{}\n");
    bytes.extend(std::iter::repeat_n(b'x', 3 << 20));
    bytes.extend_from_slice(format!("\n\n{good}\n").as_bytes());
    std::fs::write(&events, bytes).unwrap();
    let (code, out, err) = agent(&["replay", events.to_str().unwrap(), "--policy", pol.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    for n in 2..=5 {
        assert!(err.contains(&format!("events.jsonl:{n}:")), "line {n}: {err}");
    }
    assert!(err.contains("4 line(s)"), "{err}");
    assert_eq!(out.lines().filter(|l| l.contains("gpu-1") && l.contains("denied")).count(), 2, "{out}");
}

/// A FIFO (or a device) where a file is expected is an error at once, never a hang: `open(2)`
/// of a FIFO waits for a writer, so before the fix `policy check FIFO` (and `replay`, `policy
/// learn`) never returned.
#[test]
fn user_paths_that_are_fifos_are_errors_not_hangs() {
    let dir = TempDir::new("cli-fifo");
    let fifo = dir.path("policy.yaml");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let fifo = fifo.to_str().unwrap();
    for args in [
        vec!["policy", "check", fifo],
        vec!["replay", fifo, "--policy", fifo],
        vec!["policy", "learn", fifo],
        vec!["replay", "/dev/zero", "--policy", fifo],
    ] {
        let started = std::time::Instant::now();
        let mut child = spawn_agent(&args);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > std::time::Duration::from_secs(10) {
                let _ = child.kill();
                panic!("{args:?} hangs on a FIFO");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{args:?}: {err}");
        assert!(err.contains("not a regular file"), "{args:?}: {err}");
    }
}

/// A VM name is anyone's choice: one carrying terminal control sequences is printed escaped by
/// `replay`, never raw to the operator's terminal (before: `esc^[]0;OWNED^G^[[2J` reached it).
#[test]
fn replay_escapes_vm_names() {
    let dir = TempDir::new("cli");
    let pol = dir.path("p.yaml");
    write(&pol, "default:\n  incoherent_dma: audit\n");
    let events = dir.path("events.jsonl");
    let line = r#"{"time":"t","host":"h","vm":"esc\u001b]0;OWNED\u0007\u001b[2J","pid":5,"comm":"qemu","exe":null,"cgroup":null,"uid":0,"request":{"ioctl":"KVM_SET_DEVICE_ATTR","attr":"KVM_DEV_VFIO_FILE_ADD","fd":3,"file_fd":4,"device_fd_known":true},"vfio":null,"rule":"default","decision":"audited","mechanism":"none","outcome":"completed","ret":-22,"reason":null,"policy":"x"}"#;
    std::fs::write(&events, format!("{line}\n")).unwrap();
    let (code, out, err) = agent(&["replay", events.to_str().unwrap(), "--policy", pol.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
    assert!(out.contains(r"esc\x1b]0;OWNED\x07\x1b[2J"), "{out:?}");
}

/// `replay` and `learn` read a log one line at a time: 300 lines of 60 KB of small JSON values
/// (some 30,000 each, about 2 MB once parsed) never add up in memory (before: every line's
/// parsed value was kept, 12 times the input). Peak memory of each run, from wait4's rusage,
/// stays under 64 MB; a line over the 64 KiB bound is reported and skipped.
#[test]
fn replay_and_learn_stream_their_input() {
    let dir = TempDir::new("cli");
    let pol = dir.path("p.yaml");
    write(&pol, "default:\n  incoherent_dma: audit\n");
    let events = dir.path("events.jsonl");
    let pad = vec!["1"; 30_000].join(",");
    let mut text = String::new();
    for _ in 0..300 {
        text.push_str(&format!("{{\"event\":\"wbinvd-blast\",\"pad\":[{pad}]}}\n"));
    }
    text.push_str(&format!("{{\"pad\":\"{}\"}}\n", "x".repeat(70 << 10)));
    let line = r#"{"time":"t","host":"h","vm":"gpu-1","pid":5,"comm":"qemu","exe":"/q","cgroup":null,"uid":0,"request":{"ioctl":"KVM_SET_DEVICE_ATTR","attr":"KVM_DEV_VFIO_FILE_ADD","fd":3,"file_fd":4,"device_fd_known":true},"vfio":null,"rule":"default","decision":"audited","mechanism":"none","outcome":"completed","ret":-22,"reason":null,"policy":"x"}"#;
    text.push_str(line);
    text.push('\n');
    std::fs::write(&events, &text).unwrap();
    for args in [
        vec!["replay", events.to_str().unwrap(), "--policy", pol.to_str().unwrap()],
        vec!["policy", "learn", events.to_str().unwrap()],
    ] {
        #[allow(clippy::zombie_processes, reason = "reaped by wait4 below, which also gives its rusage")]
        let mut child = spawn_agent(&args);
        let mut err = String::new();
        let id = child.id() as i32;
        let mut stderr = child.stderr.take().unwrap();
        std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
        let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
        // SAFETY: wait4 on our own child, writing its status and rusage.
        let pid = unsafe { libc::wait4(id, &mut status, 0, &mut usage) };
        assert_eq!(pid, id);
        let peak_mb = usage.ru_maxrss / 1024;
        eprintln!("{}: peak {peak_mb} MB for a {} MB log", args[0], text.len() >> 20);
        assert!(peak_mb < 64, "{args:?}: peak {peak_mb} MB");
        assert!(err.contains("line longer than 65536 bytes: skipped"), "{args:?}: {err}");
    }
}
