//! Attaching one hook: tracepoints by name, BTF-typed hooks (tp_btf, fentry, fexit) against
//! vmlinux or, for functions of modules such as kvm and vfio, against the module's BTF;
//! kprobes and kretprobes by name, where a function has no BTF (no module BTF before 5.11).

use std::path::Path;

use aya::programs::{BtfTracePoint, FEntry, FExit, KProbe, Lsm, Program, ProgramError, TracePoint};
use ioasid_common::hooks::{HookKind, HookSpec};

use crate::kernel::btf;

/// Why the kernel would not take a hook: what `status --json` reports (`refusal`) and the lab
/// classifies, never by its text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum HookRefusal {
    /// No vmlinux BTF to type the program against.
    #[error("no kernel BTF at /sys/kernel/btf/vmlinux")]
    NoBtf,
    /// The function or tracepoint does not exist on this kernel.
    #[error("this kernel has no {name} (not in vmlinux's BTF nor any module's)")]
    Absent { name: String },
    /// The function exists, but without BTF to type a trampoline against (a module's function on
    /// a kernel without module BTF): a kprobe twin serves where the kernel has kprobes.
    #[error("this kernel has {name} but no BTF for it (no module BTF before Linux 5.11)")]
    NoFunctionBtf { name: String },
    /// The kernel has no kprobes (CONFIG_KPROBES off).
    #[error("this kernel has no kprobes (no kprobe PMU, no kprobe_events)")]
    NoKprobes,
    /// The modules' BTF could not be read or opened.
    #[error("{what}: {error}")]
    ModuleBtf { what: String, error: String },
    /// The BPF LSM is not in the kernel's active LSM list.
    #[error(
        "the BPF LSM is not active (`bpf` missing from /sys/kernel/security/lsm; boot with lsm=...,bpf)"
    )]
    LsmInactive,
    /// The kernel refused to load or attach it (errno, and the verifier's last lines).
    #[error("{message}{}", verifier.as_ref().map(|v| format!(" (verifier: {v})")).unwrap_or_default())]
    Kernel { errno: Option<i32>, message: String, verifier: Option<String> },
    /// The kernel has the function, but its KVM does not call it for what the hook measures
    /// (`ioasid_common::hooks::ONLY_WHERE`).
    #[error("not used on this kernel: {why}")]
    NotThisKernel { why: &'static str },
    /// The program reads KVM's structs, whose layout this kernel's BTF does not give.
    #[error("KVM's struct layout is not in this kernel's BTF (the program reads the emulator's context)")]
    NoLayout,
    /// Another hook does its work here, at no cost to a hot path.
    #[error("not needed: {why}")]
    Unneeded { why: &'static str },
    /// The agent was asked not to attach it.
    #[error("not requested ({flag})")]
    NotRequested { flag: &'static str },
}

/// What attaching needs to know of the running kernel.
pub(super) struct Target<'a> {
    /// vmlinux's BTF, indexed by name (None: unreadable, no BTF-typed hook attaches).
    pub vmlinux: Option<&'a btf::Vmlinux>,
    /// The modules' BTF, read at the first lookup that needs it.
    pub modules: std::cell::OnceCell<Result<btf::ModuleBtf, btf::BtfError>>,
    /// /proc/kallsyms as read for this load (None: unreadable).
    pub kallsyms: Option<&'a str>,
    /// Its names, gathered at the first lookup that needs them.
    pub symbols: std::cell::OnceCell<std::collections::HashSet<&'a str>>,
}

impl<'a> Target<'a> {
    pub fn new(facts: &'a super::config::KernelFacts) -> Self {
        Self {
            vmlinux: facts.vmlinux.as_ref().ok(),
            modules: std::cell::OnceCell::new(),
            kallsyms: facts.kallsyms.as_deref().ok(),
            symbols: std::cell::OnceCell::new(),
        }
    }

    /// Whether the running kernel (or a loaded module) has a symbol `name`; None if kallsyms
    /// cannot be read.
    fn has_symbol(&self, name: &str) -> Option<bool> {
        let text = self.kallsyms?;
        let names =
            self.symbols.get_or_init(|| text.lines().filter_map(|l| l.split_whitespace().nth(2)).collect());
        Some(names.contains(name))
    }
}

/// Whether the kernel can attach kprobes: the kprobe PMU (perf_event_open) or tracefs's
/// kprobe_events.
fn kprobes_supported() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
        || Path::new("/sys/kernel/tracing/kprobe_events").exists()
        || Path::new("/sys/kernel/debug/tracing/kprobe_events").exists()
}

/// Where a BTF-typed attach point lives: vmlinux, or a module (the type's id in its split BTF,
/// and an fd of its BTF object).
enum Place {
    /// The type's id in vmlinux's BTF.
    Vmlinux(u32),
    Module(u32, std::os::fd::OwnedFd),
}

/// Finds `name` of `kind` in vmlinux's BTF, else in the modules' (KVM and VFIO are modules on
/// distro kernels).
fn place(target: &Target<'_>, name: &str, kind: u32) -> Result<Place, HookRefusal> {
    let vmlinux = target.vmlinux.ok_or(HookRefusal::NoBtf)?;
    if let Some(id) = vmlinux.id(kind, name) {
        return Ok(Place::Vmlinux(id));
    }
    let module_btf = |what: String, e: &btf::BtfError| HookRefusal::ModuleBtf { what, error: e.to_string() };
    let modules = target.modules.get_or_init(|| btf::ModuleBtf::read(vmlinux, Path::new("/sys/kernel/btf")));
    let modules = modules.as_ref().map_err(|e| module_btf("reading module BTF".into(), e))?;
    match modules.find(name, kind) {
        Ok(Some((module, id))) => {
            let fd = btf::module_fd(&module)
                .map_err(|e| module_btf(format!("{name} is in module {module}'s BTF"), &e))?;
            Ok(Place::Module(id, fd))
        }
        Ok(None) if kind == btf::KIND_FUNC && target.has_symbol(name) == Some(true) => {
            Err(HookRefusal::NoFunctionBtf { name: name.to_string() })
        }
        Ok(None) => Err(HookRefusal::Absent { name: name.to_string() }),
        Err(e) => Err(module_btf(format!("looking for {name} in module BTF"), &e)),
    }
}

/// Loads and attaches a BTF-typed program (tp_btf, fentry, fexit): against vmlinux, or against
/// the module whose BTF has `$btf_name`.
macro_rules! btf_typed {
    ($prog:expr, $ty:ty, $name:expr, $btf_name:expr, $kind:expr, $target:expr) => {{
        let p: &mut $ty = $prog.try_into().map_err(describe)?;
        match place($target, $btf_name, $kind)? {
            Place::Vmlinux(id) => p.load_by_id(id),
            Place::Module(id, fd) => p.load_in_module(id, fd),
        }
        .map_err(describe)?;
        p.attach().map_err(describe)?;
    }};
}

pub(super) fn attach(
    prog: &mut Program,
    spec: &HookSpec,
    target: &Target<'_>,
    lsm_active: Option<bool>,
) -> Result<(), HookRefusal> {
    for only in ioasid_common::hooks::ONLY_WHERE.iter().filter(|o| o.hook == spec.hook) {
        // Unknown (no kallsyms): attached, as before this rule.
        if target.has_symbol(only.symbol).is_some_and(|has| has != only.present) {
            return Err(HookRefusal::NotThisKernel { why: only.why });
        }
    }
    match spec.kind {
        HookKind::TracePoint { category, name } => {
            let tp: &mut TracePoint = prog.try_into().map_err(describe)?;
            tp.load().map_err(describe)?;
            tp.attach(category, name).map_err(describe)?;
        }
        HookKind::BtfTracePoint { name } => {
            btf_typed!(prog, BtfTracePoint, name, &format!("btf_trace_{name}"), btf::KIND_TYPEDEF, target)
        }
        HookKind::FEntry { function } => btf_typed!(prog, FEntry, function, function, btf::KIND_FUNC, target),
        HookKind::FExit { function } => btf_typed!(prog, FExit, function, function, btf::KIND_FUNC, target),
        HookKind::KProbe { function } | HookKind::KRetProbe { function } => {
            if !kprobes_supported() {
                return Err(HookRefusal::NoKprobes);
            }
            if target.has_symbol(function) == Some(false) {
                return Err(HookRefusal::Absent { name: function.to_string() });
            }
            let p: &mut KProbe = prog.try_into().map_err(describe)?;
            p.load().map_err(describe)?;
            p.attach(function, 0).map_err(describe)?;
        }
        HookKind::Lsm { hook } => {
            if lsm_active == Some(false) {
                return Err(HookRefusal::LsmInactive);
            }
            let p: &mut Lsm = prog.try_into().map_err(describe)?;
            load_lsm(p, hook, target)?;
            p.attach().map_err(describe)?;
        }
    }
    Ok(())
}

/// Loads an LSM program against the hook `hook` (vmlinux's `bpf_lsm_<hook>`).
pub(super) fn load_lsm(p: &mut Lsm, hook: &str, target: &Target<'_>) -> Result<(), HookRefusal> {
    let vmlinux = target.vmlinux.ok_or(HookRefusal::NoBtf)?;
    let function = format!("bpf_lsm_{hook}");
    let id = vmlinux.id(btf::KIND_FUNC, &function).ok_or(HookRefusal::Absent { name: function })?;
    p.load_by_id(id).map_err(describe)
}

/// The kernel's answer: its errno, with the verifier's last lines when it said something.
pub(super) fn describe(e: ProgramError) -> HookRefusal {
    if let ProgramError::LoadError { io_error, verifier_log } = &e {
        let log = verifier_log.to_string();
        tracing::trace!(log = %log, "the verifier's whole log");
        // The verifier's statistics lines come last; the reason is just before them.
        let stats = ["verification time", "stack depth", "processed "];
        let tail: Vec<&str> = log
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !stats.iter().any(|p| l.starts_with(p)))
            .rev()
            .take(3)
            .collect();
        return HookRefusal::Kernel {
            errno: io_error.raw_os_error(),
            message: format!("BPF_PROG_LOAD: {io_error}"),
            verifier: (!tail.is_empty()).then(|| tail.into_iter().rev().collect::<Vec<_>>().join(" | ")),
        };
    }
    let mut message = e.to_string();
    let mut errno = None;
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        message.push_str(": ");
        message.push_str(&s.to_string());
        errno = errno.or_else(|| s.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error));
        src = s.source();
    }
    HookRefusal::Kernel { errno, message, verifier: None }
}
