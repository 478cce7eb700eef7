//! Untrusted text (VM names, command lines, comms: chosen by whoever starts a VMM) made safe
//! for line-based readers: the text log and the terminal. JSON and Prometheus output escape by
//! construction and take the raw string.

use std::borrow::Cow;

/// Control characters (newline, escape, DEL, C1...) and backslashes become `\n`, `\x1b`,
/// `\u{9b}`, `\\`: one line stays one line and no escape sequence reaches a terminal.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() || c == '\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 && c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("gpu-1"), "gpu-1");
        assert_eq!(escape("a\nb decision=allowed"), "a\\nb decision=allowed");
        assert_eq!(escape("\x1b[2J\u{9b}x\\"), "\\x1b[2J\\u{9b}x\\\\");
        assert!(!escape("x\r\n\t\x07").contains(|c: char| c.is_control()));
    }
}
