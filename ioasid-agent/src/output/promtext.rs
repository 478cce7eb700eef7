//! A small parser of the Prometheus text exposition format (what `top` reads from /metrics).
//! Unknown or malformed lines are skipped, never a panic.

use std::collections::BTreeMap;

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let (name, mut rest) = line.split_at(name_end);
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(body)?;
        labels = parsed;
        rest = after;
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name: name.to_string(), labels, value })
}

/// Parses `k="v",k2="v2"}` (after the `{`); returns the labels and what follows the `}`.
fn parse_labels(s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut chars = s.char_indices();
    let mut key = String::new();
    while let Some((i, c)) = chars.next() {
        match c {
            '}' if key.trim().is_empty() => return Some((labels, &s[i + 1..])),
            ',' | ' ' if key.is_empty() => {}
            '=' => {
                if chars.next()?.1 != '"' {
                    return None;
                }
                let mut value = String::new();
                loop {
                    match chars.next()?.1 {
                        '\\' => match chars.next()?.1 {
                            'n' => value.push('\n'),
                            other => value.push(other),
                        },
                        '"' => break,
                        c => value.push(c),
                    }
                }
                labels.insert(std::mem::take(&mut key).trim().to_string(), value);
            }
            c => key.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_exposition() {
        let text = "# HELP x y\n# TYPE x counter\nioasid_build_info{version=\"0.1.0\"} 1\nioasid_vms 3\n\
                    ioasid_wbinvd_exits_total{path=\"emulated\",vm=\"a \\\"q\\\" ,b\"} 42\n\
                    ioasid_wbinvd_handler_seconds_bucket{vm=\"x\",le=\"+Inf\"} 7\nweird{a=\"1\",} 2.5e-3\n";
        let s = parse(text);
        assert_eq!(s.len(), 5);
        assert_eq!(s[1], Sample { name: "ioasid_vms".into(), labels: BTreeMap::new(), value: 3.0 });
        assert_eq!(s[2].labels["vm"], "a \"q\" ,b");
        assert_eq!(s[2].value, 42.0);
        assert_eq!(s[3].labels["le"], "+Inf");
        assert_eq!(s[4].value, 0.0025);
    }

    #[test]
    fn junk_is_skipped() {
        for junk in
            ["x{", "x{a=1} 2", "x{a=\"1\" 2", "x", "{a=\"b\"} 1", "x 1 2 3 junk", "x{a=\"\\", "x notanumber"]
        {
            let _ = parse(junk);
        }
        assert!(parse("x{a=\"1\" 2").is_empty());
        assert_eq!(parse("x 1 1700000000").len(), 1, "a timestamp is allowed");
    }
}
