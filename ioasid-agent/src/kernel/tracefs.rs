//! Tracepoint record layouts, read from tracefs `format` files at run time.
//!
//! The kernel programs read tracepoint fields at the offsets found here (passed in as a global),
//! so a field that moves or widens between kernels (SVM exit codes becoming u64) is read right.

use std::path::{Path, PathBuf};

use ioasid_common::config::Field;

#[derive(Debug, thiserror::Error)]
pub enum TraceFsError {
    #[error("tracefs is not mounted and mounting it at {path} failed")]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading tracepoint format {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line}: {message}")]
    Parse { path: PathBuf, line: usize, message: String },
    #[error("tracepoint {tracepoint} has no field `{field}` (fields: {available})")]
    MissingField { tracepoint: String, field: String, available: String },
}

/// A mounted tracefs.
#[derive(Debug, Clone)]
pub struct TraceFs {
    root: PathBuf,
}

impl TraceFs {
    pub const DEFAULT: &'static str = "/sys/kernel/tracing";

    /// A tracefs at `root` (tests point this at a fixture tree).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Finds tracefs, mounting it at /sys/kernel/tracing if no mount is there.
    pub fn locate_or_mount() -> Result<Self, TraceFsError> {
        for root in [Self::DEFAULT, "/sys/kernel/debug/tracing"] {
            if Path::new(root).join("events").is_dir() {
                return Ok(Self::at(root));
            }
        }
        mount_tracefs(Path::new(Self::DEFAULT))?;
        Ok(Self::at(Self::DEFAULT))
    }

    #[cfg(test)]
    pub fn exists(&self, category: &str, name: &str) -> bool {
        self.root.join("events").join(category).join(name).is_dir()
    }

    pub fn format(&self, category: &str, name: &str) -> Result<Format, TraceFsError> {
        let path = self.root.join("events").join(category).join(name).join("format");
        let text = std::fs::read_to_string(&path)
            .map_err(|source| TraceFsError::Read { path: path.clone(), source })?;
        Format::parse(&format!("{category}:{name}"), &path, &text)
    }
}

fn mount_tracefs(path: &Path) -> Result<(), TraceFsError> {
    crate::host::sys::mount(c"tracefs", c"nodev", path)
        .map_err(|source| TraceFsError::Mount { path: path.to_path_buf(), source })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatField {
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// The parsed `format` file of one tracepoint.
#[derive(Debug, Clone)]
pub struct Format {
    tracepoint: String,
    fields: Vec<FormatField>,
}

impl Format {
    /// Parses lines like `\tfield:unsigned int exit_reason;\toffset:8;\tsize:4;\tsigned:0;`.
    pub fn parse(tracepoint: &str, path: &Path, text: &str) -> Result<Self, TraceFsError> {
        let mut fields = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            let Some(rest) = line.strip_prefix("field:") else {
                continue;
            };
            let perr =
                |message: String| TraceFsError::Parse { path: path.to_path_buf(), line: i + 1, message };
            let mut decl = None;
            let mut offset = None;
            let mut size = None;
            for (j, part) in rest.split(';').enumerate() {
                let part = part.trim();
                if j == 0 {
                    decl = Some(part);
                } else if let Some(v) = part.strip_prefix("offset:") {
                    offset = Some(v.parse::<u32>().map_err(|e| perr(format!("bad offset {v:?}: {e}")))?);
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = Some(v.parse::<u32>().map_err(|e| perr(format!("bad size {v:?}: {e}")))?);
                }
            }
            let decl =
                decl.filter(|d| !d.is_empty()).ok_or_else(|| perr("empty field declaration".into()))?;
            // The name is the last word of the declaration, without any array suffix.
            let last = decl.rsplit(|c: char| c.is_whitespace()).next().unwrap_or(decl);
            let name = last.split('[').next().unwrap_or(last).trim_start_matches('*');
            if name.is_empty() {
                return Err(perr(format!("no field name in {decl:?}")));
            }
            let (Some(offset), Some(size)) = (offset, size) else {
                return Err(perr(format!("field {name} lacks offset or size")));
            };
            fields.push(FormatField { name: name.to_string(), offset, size });
        }
        Ok(Self { tracepoint: tracepoint.to_string(), fields })
    }

    pub fn field(&self, name: &str) -> Result<Field, TraceFsError> {
        self.fields
            .iter()
            .find(|f| f.name == name)
            .map(|f| Field { offset: f.offset, size: f.size })
            .ok_or_else(|| TraceFsError::MissingField {
                tracepoint: self.tracepoint.clone(),
                field: name.to_string(),
                available: self.fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", "),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVM_EXIT: &str = "name: kvm_exit\nID: 2091\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\n\tfield:unsigned int exit_reason;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:unsigned long guest_rip;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:u32 isa;\toffset:24;\tsize:4;\tsigned:0;\n\tfield:unsigned int vcpu_id;\toffset:56;\tsize:4;\tsigned:0;\n\nprint fmt: \"vcpu %u reason %s\", REC->vcpu_id\n";
    const EMULATE: &str = "format:\n\tfield:__u8 len;\toffset:20;\tsize:1;\tsigned:0;\n\tfield:__u8 insn[15];\toffset:21;\tsize:15;\tsigned:0;\n\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n";

    #[test]
    fn parses_kvm_exit() {
        let f = Format::parse("kvm:kvm_exit", Path::new("x"), KVM_EXIT).unwrap();
        assert_eq!(f.field("exit_reason").unwrap(), Field { offset: 8, size: 4 });
        assert_eq!(f.field("isa").unwrap(), Field { offset: 24, size: 4 });
        assert_eq!(f.field("vcpu_id").unwrap(), Field { offset: 56, size: 4 });
        assert_eq!(f.field("common_type").unwrap(), Field { offset: 0, size: 2 });
        let err = f.field("info1").unwrap_err().to_string();
        assert!(err.contains("no field `info1`") && err.contains("exit_reason"), "{err}");
    }

    #[test]
    fn parses_arrays_and_data_loc() {
        let f = Format::parse("kvm:kvm_emulate_insn", Path::new("x"), EMULATE).unwrap();
        assert_eq!(f.field("insn").unwrap(), Field { offset: 21, size: 15 });
        assert_eq!(f.field("filename").unwrap(), Field { offset: 8, size: 4 });
    }

    #[test]
    fn rejects_bad_numbers_with_line() {
        let err = Format::parse("a:b", Path::new("/f"), "format:\n\tfield:int x;\toffset:zz;\tsize:4;\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/f: line 2") && err.contains("bad offset"), "{err}");
        let err = Format::parse("a:b", Path::new("/f"), "\tfield:int x;\tsize:4;\n").unwrap_err().to_string();
        assert!(err.contains("lacks offset"), "{err}");
    }

    #[test]
    fn reads_from_a_tree() {
        let dir = std::env::temp_dir().join(format!("ioasid-tracefs-{}", std::process::id()));
        let ev = dir.join("events/kvm/kvm_exit");
        std::fs::create_dir_all(&ev).unwrap();
        std::fs::write(ev.join("format"), KVM_EXIT).unwrap();
        let fs = TraceFs::at(&dir);
        assert!(fs.exists("kvm", "kvm_exit"));
        assert!(!fs.exists("kvm", "kvm_entry"));
        assert_eq!(fs.format("kvm", "kvm_exit").unwrap().field("isa").unwrap().offset, 24);
        assert!(matches!(fs.format("kvm", "nope"), Err(TraceFsError::Read { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
