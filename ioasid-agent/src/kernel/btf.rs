//! Kernel-module BTF: where a function or tracepoint that is not in vmlinux lives.
//!
//! On distro kernels KVM and VFIO are modules: `kvm_emulate_wbinvd`, `emulator_wbinvd`,
//! `kvm_arch_register_noncoherent_dma`, `vfio_file_enforced_coherent` and the `kvm_entry`
//! tracepoint have their BTF in `/sys/kernel/btf/<module>`, split BTF on top of vmlinux's. A
//! trampoline program on them needs the type's id there and an fd of that module's BTF object
//! (`attach_btf_obj_fd`). aya 0.14 parses only whole BTF, so this module walks the split BTF
//! itself: just far enough to find a named FUNC or TYPEDEF. Bytes from sysfs are checked: a
//! malformed file is an error, never a panic.

use std::{
    os::fd::{FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

const BTF_MAGIC: u16 = 0xeb9f;
pub const KIND_TYPEDEF: u32 = 8;
pub const KIND_FUNC: u32 = 12;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not BTF or malformed ({what})")]
    Malformed { path: PathBuf, what: &'static str },
    #[error("no BPF BTF object is named {0:?}")]
    NoObject(String),
    #[error("bpf({cmd}) failed")]
    Syscall {
        cmd: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The parts of one BTF blob that a name lookup needs.
struct Blob<'a> {
    types: &'a [u8],
    strings: &'a [u8],
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off.checked_add(4)?)?.try_into().ok()?))
}

fn parse<'a>(data: &'a [u8], path: &Path) -> Result<Blob<'a>, BtfError> {
    let bad = |what| BtfError::Malformed { path: path.to_path_buf(), what };
    let magic =
        data.get(0..2).map(|m| u16::from_le_bytes([m[0], m[1]])).ok_or_else(|| bad("short header"))?;
    if magic != BTF_MAGIC {
        return Err(bad("magic"));
    }
    let hdr_len = u32_at(data, 4).ok_or_else(|| bad("short header"))? as usize;
    let field = |i: usize| u32_at(data, 8 + 4 * i).map(|v| v as usize).ok_or_else(|| bad("short header"));
    let (type_off, type_len, str_off, str_len) = (field(0)?, field(1)?, field(2)?, field(3)?);
    let section = |off: usize, len: usize| {
        let start = hdr_len.checked_add(off).ok_or_else(|| bad("section offset"))?;
        let end = start.checked_add(len).ok_or_else(|| bad("section length"))?;
        data.get(start..end).ok_or_else(|| bad("section past the end"))
    };
    Ok(Blob { types: section(type_off, type_len)?, strings: section(str_off, str_len)? })
}

/// Size of the data following a type's 12-byte header, by kind (include/uapi/linux/btf.h).
fn trailing(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        1 => 4,             // INT
        3 => 12,            // ARRAY
        4 | 5 => 12 * vlen, // STRUCT, UNION
        6 => 8 * vlen,      // ENUM
        13 => 8 * vlen,     // FUNC_PROTO
        14 => 4,            // VAR
        15 => 12 * vlen,    // DATASEC
        17 => 4,            // DECL_TAG
        19 => 12 * vlen,    // ENUM64
        2 | 7..=12 | 16 | 18 => 0,
        _ => return None,
    })
}

/// The outcome of a walk over a type section.
enum Walk {
    /// `f` matched the type with this id.
    Found(u32),
    /// No match (the section walked to its end).
    NotFound,
}

/// Walks the types, calling `f(kind, name_off)` for each; `None` if the section is malformed.
fn walk(types: &[u8], first_id: u32, mut f: impl FnMut(u32, u32) -> bool) -> Option<Walk> {
    let (mut off, mut id) = (0usize, first_id);
    while off < types.len() {
        let name_off = u32_at(types, off)?;
        let info = u32_at(types, off + 4)?;
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        if f(kind, name_off) {
            return Some(Walk::Found(id));
        }
        off = off.checked_add(12 + trailing(kind, vlen)?)?;
        id = id.checked_add(1)?;
    }
    (off == types.len()).then_some(Walk::NotFound)
}

fn cstr(strings: &[u8], off: usize) -> Option<&[u8]> {
    let s = strings.get(off..)?;
    Some(&s[..s.iter().position(|b| *b == 0)?])
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
pub const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// vmlinux's BTF, read and indexed once per load (a loader asks it for member offsets, for the
/// type id of every hook it attaches and for the base of the modules' split BTF): parsing 5-6
/// MB of BTF, and scanning its ~100k types by name, is most of what a load costs before the
/// verifier, several seconds on an emulated machine.
pub struct Vmlinux {
    types: Types,
    /// (hash of kind and name, id) of each named struct, function and typedef, sorted by hash.
    names: Vec<(u64, u32)>,
}

/// FNV-1a of a kind and a name: the key of `Vmlinux::names`.
fn name_hash(kind: u32, name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ u64::from(kind);
    for b in name {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The kinds `Vmlinux::names` indexes.
const INDEXED: [u32; 3] = [KIND_STRUCT, KIND_TYPEDEF, KIND_FUNC];

impl Vmlinux {
    /// Reads and indexes `path` (normally /sys/kernel/btf/vmlinux).
    pub fn read(path: &Path) -> Result<Self, BtfError> {
        let data = read(path)?;
        let blob = parse(&data, path)?;
        let types = Types::index(blob.types.to_vec(), blob.strings.to_vec(), path)?;
        let mut names: Vec<(u64, u32)> = (1..types.at.len() as u32)
            .filter_map(|id| {
                let (name, kind, _, _) = types.header(id)?;
                if !INDEXED.contains(&kind) || name == 0 {
                    return None;
                }
                Some((name_hash(kind, cstr(&types.strings, name as usize)?), id))
            })
            .collect();
        names.sort_unstable();
        Ok(Self { types, names })
    }

    /// The id of the struct, function or typedef `name`.
    pub fn id(&self, kind: u32, name: &str) -> Option<u32> {
        self.types.named(kind, name, Some(&self.names))
    }

    /// The byte offsets of `(struct, member)` pairs, looking through anonymous struct/union
    /// members as C does (`mm_struct`'s fields sit in an anonymous struct). A member is found
    /// only if it is a pointer, an integer of at most 8 bytes (the programs read a word there
    /// and keep its low bytes, little-endian) or an array (a module's name); None for a pair
    /// that is not found so.
    pub fn member_offsets(&self, pairs: &[(&str, &str)]) -> Vec<Option<u32>> {
        let t = &self.types;
        pairs.iter().map(|(st, member)| t.path(st, member, Some(&self.names)).map(|(off, _)| off)).collect()
    }

    /// Where a module's split ids and string offsets start.
    fn base(&self) -> Base {
        Base { types: self.types.at.len() as u32 - 1, str_len: self.types.strings.len() }
    }
}

/// How a member found by [`member_paths`] is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    /// A pointer: read the address stored there. `to_struct`: to a struct or union the BTF
    /// defines (not a forward declaration, not `void`), which the verifier lets a program load
    /// through directly.
    Pointer { to_struct: bool },
    /// An array: its elements start there.
    Array,
    /// An integer of at most 8 bytes.
    Int,
}

/// The byte offsets of `(struct, "member.member...")` paths in a module's split BTF
/// (`/sys/kernel/btf/<module>` on top of `/sys/kernel/btf/vmlinux`; `vmlinux` alone for
/// built-in code), through embedded structs
/// and anonymous members; each with how its leaf is read. None for a path that is not found,
/// or whose leaf is not a pointer, an array or an integer of at most 8 bytes.
pub fn member_paths(
    vmlinux: &Vmlinux,
    sysfs_btf: &Path,
    module: &str,
    paths: &[(&str, &str)],
) -> Result<Vec<Option<(u32, Leaf)>>, BtfError> {
    if module == "vmlinux" {
        let t = &vmlinux.types;
        return Ok(paths.iter().map(|(st, path)| t.path(st, path, Some(&vmlinux.names))).collect());
    }
    let module_path = sysfs_btf.join(module);
    let split = read(&module_path)?;
    let split = parse(&split, &module_path)?;
    // Split BTF continues the base's type ids and string offsets: the two sections, laid end
    // to end, index as one.
    let types = [&vmlinux.types.types[..], split.types].concat();
    let strings = [&vmlinux.types.strings[..], split.strings].concat();
    let t = Types::index(types, strings, &module_path)?;
    Ok(paths.iter().map(|(st, path)| t.path(st, path, None)).collect())
}

struct Types {
    types: Vec<u8>,
    strings: Vec<u8>,
    /// Type id -> offset of its header in `types` (id 0 is void).
    at: Vec<usize>,
}

impl Types {
    fn index(types: Vec<u8>, strings: Vec<u8>, path: &Path) -> Result<Self, BtfError> {
        let mut at = vec![usize::MAX];
        let mut off = 0usize;
        while off < types.len() {
            at.push(off);
            let info =
                u32_at(&types, off + 4).ok_or(BtfError::Malformed { path: path.into(), what: "type" })?;
            let more = trailing((info >> 24) & 0x1f, (info & 0xffff) as usize)
                .ok_or(BtfError::Malformed { path: path.into(), what: "type kind" })?;
            off += 12 + more;
        }
        Ok(Self { types, strings, at })
    }

    /// `path` (dot-separated members) in struct `st`: its byte offset and how it is read.
    /// `index`: vmlinux's name index, where these are vmlinux's types.
    fn path(&self, st: &str, path: &str, index: Option<&[(u64, u32)]>) -> Option<(u32, Leaf)> {
        let mut id = self.named(KIND_STRUCT, st, index)?;
        let mut base = 0u32;
        let mut parts = path.split('.').peekable();
        while let Some(member) = parts.next() {
            let (off, ty) = self.member(id, member, base, 0)?;
            let (resolved, kind, size) = self.resolve(ty)?;
            if parts.peek().is_none() {
                let leaf = match kind {
                    KIND_PTR => Leaf::Pointer {
                        to_struct: self
                            .resolve(size)
                            .is_some_and(|(_, k, _)| k == KIND_STRUCT || k == KIND_UNION),
                    },
                    KIND_ARRAY => Leaf::Array,
                    KIND_INT if size <= 8 => Leaf::Int,
                    _ => return None,
                };
                return Some((off, leaf));
            }
            (id, base) = (resolved, off);
        }
        None
    }

    fn header(&self, id: u32) -> Option<(u32, u32, u32, u32)> {
        let off = *self.at.get(id as usize)?;
        let name = u32_at(&self.types, off)?;
        let info = u32_at(&self.types, off + 4)?;
        let size_or_type = u32_at(&self.types, off + 8)?;
        Some((name, (info >> 24) & 0x1f, info, size_or_type))
    }

    /// The first type of `kind` named `name`: looked up in `index` where there is one (only
    /// its candidates' names are compared), else by a walk over every type.
    fn named(&self, kind: u32, name: &str, index: Option<&[(u64, u32)]>) -> Option<u32> {
        let is = |id: &u32| {
            self.header(*id).is_some_and(|(n, k, _, _)| {
                k == kind && cstr(&self.strings, n as usize) == Some(name.as_bytes())
            })
        };
        match index {
            Some(index) => {
                let h = name_hash(kind, name.as_bytes());
                let from = index.partition_point(|(x, _)| *x < h);
                let mut candidates: Vec<u32> =
                    index[from..].iter().take_while(|(x, _)| *x == h).map(|(_, id)| *id).collect();
                candidates.sort_unstable();
                candidates.into_iter().find(is)
            }
            None => (1..self.at.len() as u32).find(is),
        }
    }

    /// Through typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<(u32, u32, u32)> {
        for _ in 0..16 {
            let (_, kind, _, next) = self.header(id)?;
            match kind {
                8 | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = next,
                _ => return Some((id, kind, next)),
            }
        }
        None
    }

    /// `member`'s byte offset in struct/union `id` (plus `base`), searching anonymous members,
    /// and its type id.
    fn member(&self, id: u32, member: &str, base: u32, depth: u32) -> Option<(u32, u32)> {
        if depth > 8 {
            return None;
        }
        let (_, kind, info, _) = self.header(id)?;
        if kind != KIND_STRUCT && kind != KIND_UNION {
            return None;
        }
        let kind_flag = info >> 31 != 0;
        let start = self.at[id as usize] + 12;
        for i in 0..(info & 0xffff) as usize {
            let m = start + 12 * i;
            let (name, ty, raw) =
                (u32_at(&self.types, m)?, u32_at(&self.types, m + 4)?, u32_at(&self.types, m + 8)?);
            let bits = if kind_flag { raw & 0x00ff_ffff } else { raw };
            if bits % 8 != 0 {
                continue; // a bitfield: never what the programs read
            }
            let off = base + bits / 8;
            if name == 0 {
                if let Some(found) = self.member(self.resolve(ty)?.0, member, off, depth + 1) {
                    return Some(found);
                }
            } else if cstr(&self.strings, name as usize) == Some(member.as_bytes()) {
                return Some((off, ty));
            }
        }
        None
    }
}

/// vmlinux's type count and string section length: where a module's split ids and string
/// offsets start.
struct Base {
    types: u32,
    str_len: usize,
}

fn read(path: &Path) -> Result<Vec<u8>, BtfError> {
    std::fs::read(path).map_err(|source| BtfError::Read { path: path.to_path_buf(), source })
}

/// Every kernel module's BTF, read once (the loader looks up several functions in it).
pub struct ModuleBtf {
    base: Base,
    /// (module name, its BTF file), sorted by name.
    modules: Vec<(String, PathBuf, Vec<u8>)>,
}

impl ModuleBtf {
    /// Reads every module's BTF file under `sysfs_btf` (normally /sys/kernel/btf), split BTF on
    /// top of `vmlinux`'s.
    pub fn read(vmlinux: &Vmlinux, sysfs_btf: &Path) -> Result<Self, BtfError> {
        let base = vmlinux.base();
        let dir = std::fs::read_dir(sysfs_btf)
            .map_err(|source| BtfError::Read { path: sysfs_btf.into(), source })?;
        let mut modules: Vec<(String, PathBuf, Vec<u8>)> = Vec::new();
        for e in dir.filter_map(Result::ok) {
            let Ok(name) = e.file_name().into_string() else { continue };
            if name != "vmlinux" {
                let path = sysfs_btf.join(&name);
                let data = read(&path)?;
                modules.push((name, path, data));
            }
        }
        modules.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self { base, modules })
    }

    /// The module that has `name` of `kind`, and the type's id in its split BTF.
    pub fn find(&self, name: &str, kind: u32) -> Result<Option<(String, u32)>, BtfError> {
        let base = &self.base;
        for (module, path, data) in &self.modules {
            let blob = parse(data, path)?;
            let found = walk(blob.types, base.types + 1, |k, name_off| {
                // Split BTF: offsets below the base's string section are vmlinux's strings,
                // which a module's own function names never are.
                let off = name_off as usize;
                k == kind
                    && off >= base.str_len
                    && cstr(blob.strings, off - base.str_len) == Some(name.as_bytes())
            });
            match found {
                Some(Walk::Found(id)) => return Ok(Some((module.clone(), id))),
                Some(Walk::NotFound) => {}
                None => return Err(BtfError::Malformed { path: path.clone(), what: "type section" }),
            }
        }
        Ok(None)
    }
}

fn bpf(cmd: libc::c_long, name: &'static str, attr: &mut [u8]) -> Result<i64, BtfError> {
    crate::host::sys::bpf(cmd, attr).map_err(|source| BtfError::Syscall { cmd: name, source })
}

/// An fd of the loaded BTF object named `module` (BPF_BTF_GET_NEXT_ID, BPF_BTF_GET_FD_BY_ID,
/// BPF_OBJ_GET_INFO_BY_FD).
pub fn module_fd(module: &str) -> Result<OwnedFd, BtfError> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;
    const BPF_BTF_GET_NEXT_ID: libc::c_long = 23;
    let mut id = 0u32;
    loop {
        let mut attr = [0u8; 16];
        attr[0..4].copy_from_slice(&id.to_le_bytes());
        match bpf(BPF_BTF_GET_NEXT_ID, "BPF_BTF_GET_NEXT_ID", &mut attr) {
            Ok(_) => id = u32::from_le_bytes([attr[4], attr[5], attr[6], attr[7]]),
            Err(BtfError::Syscall { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                return Err(BtfError::NoObject(module.to_string()));
            }
            Err(e) => return Err(e),
        }
        let mut attr = [0u8; 16];
        attr[0..4].copy_from_slice(&id.to_le_bytes());
        let Ok(fd) = bpf(BPF_BTF_GET_FD_BY_ID, "BPF_BTF_GET_FD_BY_ID", &mut attr) else { continue };
        // SAFETY: the kernel just returned this fd to us; we own it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut name = [0u8; 64];
        // struct bpf_btf_info { u64 btf; u32 btf_size; u32 id; u64 name; u32 name_len; u32 kernel_btf; }
        let mut info = [0u8; 32];
        info[16..24].copy_from_slice(&(name.as_mut_ptr() as u64).to_le_bytes());
        info[24..28].copy_from_slice(&(name.len() as u32).to_le_bytes());
        let mut attr = [0u8; 16];
        attr[0..4].copy_from_slice(&(std::os::fd::AsRawFd::as_raw_fd(&fd) as u32).to_le_bytes());
        attr[4..8].copy_from_slice(&(info.len() as u32).to_le_bytes());
        attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_le_bytes());
        if bpf(BPF_OBJ_GET_INFO_BY_FD, "BPF_OBJ_GET_INFO_BY_FD", &mut attr).is_err() {
            continue;
        }
        if cstr(&name, 0) == Some(module.as_bytes()) {
            return Ok(fd);
        }
    }
}

#[cfg(test)]
mod tests {
    /// On this machine's own kernel: task_struct.mm and mm_struct's arg_start/arg_end (inside
    /// an anonymous struct) are found, 8-byte aligned, arg_end right after arg_start.
    #[test]
    fn finds_members_in_this_kernels_btf() {
        let vmlinux = std::path::Path::new("/sys/kernel/btf/vmlinux");
        if !vmlinux.exists() {
            eprintln!("no /sys/kernel/btf/vmlinux on this machine: nothing to check");
            return;
        }
        let found = super::Vmlinux::read(vmlinux).unwrap().member_offsets(&[
            ("task_struct", "mm"),
            ("mm_struct", "arg_start"),
            ("mm_struct", "arg_end"),
            ("task_struct", "nope"),
        ]);
        let (mm, start, end) = (found[0].unwrap(), found[1].unwrap(), found[2].unwrap());
        assert!(mm > 0 && mm % 8 == 0 && start % 8 == 0, "{found:?}");
        assert_eq!(end, start + 8, "{found:?}");
        assert_eq!(found[3], None);
    }

    use super::*;

    /// A BTF blob with the given types (header, type section, string section).
    fn blob(types: &[(u32, u32, u32, &[u8])], strings: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        for (name_off, kind, vlen, extra) in types {
            t.extend_from_slice(&name_off.to_le_bytes());
            t.extend_from_slice(&((kind << 24) | vlen).to_le_bytes());
            t.extend_from_slice(&0u32.to_le_bytes());
            t.extend_from_slice(extra);
        }
        let mut b = Vec::new();
        b.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        b.extend_from_slice(&24u32.to_le_bytes());
        for v in [0, t.len() as u32, t.len() as u32, strings.len() as u32] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&t);
        b.extend_from_slice(strings);
        b
    }

    /// A pointer member to a struct the BTF defines is one the verifier lets a program load
    /// through; one to a forward declaration is not (Debian 6.12's kvm module types
    /// `kvm_vcpu.arch.emulate_ctxt` so).
    #[test]
    fn tells_a_pointer_to_a_defined_struct_from_one_to_a_declaration() {
        let strings = b"\0int\0ctxt\0x\0vcpu\0declared\0defined\0n\0".to_vec();
        let (int, ctxt, x, vcpu, declared, defined, n) = (1, 5, 10, 12, 17, 26, 34);
        let mut types = Vec::new();
        let mut ty = |name: u32, kind: u32, vlen: u32, size_or_type: u32, extra: &[u32]| {
            for w in [name, (kind << 24) | vlen, size_or_type].iter().chain(extra) {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        ty(int, 1, 0, 4, &[32]); // [1] int
        ty(ctxt, 7, 0, 0, &[]); // [2] struct ctxt; (a declaration)
        ty(ctxt, KIND_STRUCT, 1, 4, &[x, 1, 0]); // [3] struct ctxt { int x; }
        ty(0, KIND_PTR, 0, 2, &[]); // [4] struct ctxt * (declared)
        ty(0, KIND_PTR, 0, 3, &[]); // [5] struct ctxt * (defined)
        ty(vcpu, KIND_STRUCT, 4, 28, &[declared, 4, 0, defined, 5, 64, n, 1, 128, x, 7, 192]); // [6]
        ty(0, KIND_PTR, 0, 0, &[]); // [7] void * (type id 0: no type to resolve)
        let t = Types::index(types, strings, std::path::Path::new("test")).unwrap();
        assert_eq!(t.path("vcpu", "declared", None), Some((0, Leaf::Pointer { to_struct: false })));
        assert_eq!(t.path("vcpu", "defined", None), Some((8, Leaf::Pointer { to_struct: true })));
        assert_eq!(t.path("vcpu", "n", None), Some((16, Leaf::Int)));
        assert_eq!(t.path("vcpu", "x", None), Some((24, Leaf::Pointer { to_struct: false })));
    }

    #[test]
    fn finds_a_function_in_a_module_split_btf() {
        let dir = std::env::temp_dir().join(format!("ioasid-btf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // vmlinux: INT "int", FUNC_PROTO with 2 params, FUNC "vfs_read".
        let base_strs = b"\0int\0vfs_read\0";
        let vmlinux = blob(&[(1, 1, 0, &[0; 4]), (0, 13, 2, &[0; 16]), (5, 12, 0, &[])], base_strs);
        std::fs::write(dir.join("vmlinux"), vmlinux).unwrap();
        // kvm: a STRUCT with one member, FUNC "kvm_emulate_wbinvd", TYPEDEF "btf_trace_kvm_entry".
        let strs = b"\0kvm_vcpu\0kvm_emulate_wbinvd\0btf_trace_kvm_entry\0";
        let o = base_strs.len() as u32;
        let kvm = blob(&[(o + 1, 4, 1, &[0; 12]), (o + 10, 12, 0, &[]), (o + 29, 8, 0, &[])], strs);
        std::fs::write(dir.join("kvm"), kvm).unwrap();
        std::fs::write(dir.join("junk"), b"\x9f\xeb\x01\x00\xff\xff").unwrap();
        let vm = Vmlinux::read(&dir.join("vmlinux")).unwrap();
        let found = ModuleBtf::read(&vm, &dir).and_then(|b| b.find("kvm_emulate_wbinvd", KIND_FUNC));
        // A malformed file is an error naming it, not a panic.
        assert!(matches!(found, Err(BtfError::Malformed { .. })), "{found:?}");
        std::fs::remove_file(dir.join("junk")).unwrap();
        let btf = ModuleBtf::read(&vm, &dir).unwrap();
        // Split ids continue after vmlinux's three types.
        assert_eq!(btf.find("kvm_emulate_wbinvd", KIND_FUNC).unwrap(), Some(("kvm".into(), 5)));
        assert_eq!(btf.find("btf_trace_kvm_entry", KIND_TYPEDEF).unwrap(), Some(("kvm".into(), 6)));
        assert_eq!(btf.find("kvm_emulate_wbinvd", KIND_TYPEDEF).unwrap(), None);
        assert_eq!(btf.find("vfs_read", KIND_FUNC).unwrap(), None, "vmlinux's are not modules'");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
