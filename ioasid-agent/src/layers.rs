//! The layering rule of `lib.rs`, checked on the source: every `crate::` path in a layer names
//! only that layer or one listed below it.

use std::path::Path;

/// Each layer and the layers it may use (besides itself).
const ALLOWED: &[(&str, &[&str])] = &[
    ("util", &[]),
    ("host", &["util"]),
    ("engine", &["host", "util"]),
    ("output", &["engine", "host", "util"]),
    ("throttle", &["engine", "host", "util"]),
    ("kernel", &["output", "engine", "host", "util"]),
    ("agent", &["kernel", "throttle", "output", "engine", "host", "util"]),
    ("cmd", &["agent", "kernel", "throttle", "output", "engine", "host", "util"]),
];

/// The layers a source file's `crate::` paths name (`use crate::{a::.., b::..}` included).
fn named_layers(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: split at depth-0 commas.
            let mut depth = 0;
            let mut start = 0;
            let bytes = group.as_bytes();
            for (j, &b) in bytes.iter().enumerate() {
                match b {
                    b'{' => depth += 1,
                    b'}' if depth == 0 => {
                        out.push(first_word(&group[start..j]));
                        break;
                    }
                    b'}' => depth -= 1,
                    b',' if depth == 0 => {
                        out.push(first_word(&group[start..j]));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(first_word(rest));
        }
    }
    out.retain(|w| !w.is_empty());
    out
}

fn first_word(s: &str) -> String {
    s.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn imports_point_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut bad = Vec::new();
    let mut checked = 0;
    for (layer, allowed) in ALLOWED {
        let mut files = Vec::new();
        sources(&src.join(layer), &mut files);
        assert!(!files.is_empty(), "layer {layer} has no sources");
        for f in files {
            checked += 1;
            let text = std::fs::read_to_string(&f).unwrap();
            for named in named_layers(&text) {
                if named != *layer && !allowed.contains(&named.as_str()) {
                    bad.push(format!("{}: {layer} uses {named}", f.strip_prefix(&src).unwrap().display()));
                }
            }
        }
    }
    assert!(checked > 40, "only {checked} files checked");
    assert!(bad.is_empty(), "imports against the layering:\n{}", bad.join("\n"));
}

#[test]
fn every_top_level_module_is_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    for line in lib.lines().filter_map(|l| l.strip_prefix("pub mod ")) {
        let m = line.trim_end_matches(';');
        assert!(ALLOWED.iter().any(|(l, _)| *l == m), "{m} is public in lib.rs but not a layer");
    }
}

#[test]
fn the_check_sees_grouped_imports() {
    let text = "use crate::{engine::{a, b}, kernel::loader, util};\nlet x = crate::host::sys::f();";
    assert_eq!(named_layers(text), ["engine", "kernel", "util", "host"]);
}
