//! Loading the kernel object and attaching every hook the kernel allows.
//!
//! Required hooks (tracepoints) must attach or start-up fails with the reason. Optional hooks
//! (fentry/fexit/LSM: BPF trampolines) are attached where the kernel allows them; a refusal is
//! reported, never fatal. `ioasid-agent status` and `ioasid_hook_attached{hook}` show the table.

use std::fmt;

use aya::{
    maps::{Array, MapData},
    programs::{BtfTracePoint, FEntry, FExit, Lsm, Program, ProgramError, TracePoint},
    Btf, Ebpf, EbpfLoader,
};
use ioasid_common as common;
use ioasid_common::{Control, ProgConfig};

use crate::tracefs::{TraceFs, TraceFsError};

/// The compiled kernel object.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ioasid.bpf.o"));

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    TracePoint { category: &'static str, name: &'static str },
    BtfTracePoint { name: &'static str },
    FEntry { function: &'static str },
    FExit { function: &'static str },
    Lsm { hook: &'static str },
}

/// One hook the agent knows.
#[derive(Debug, Clone, Copy)]
pub struct HookSpec {
    /// Stable label: the `hook` label of `ioasid_hook_attached`.
    pub hook: &'static str,
    pub program: &'static str,
    pub kind: HookKind,
    pub optional: bool,
    pub purpose: &'static str,
    /// Hooks sharing a group are alternatives, tried in table order: the first that attaches
    /// serves, the others stand by. A required group needs one of them.
    pub group: Option<&'static str>,
}

pub const HOOKS: &[HookSpec] = &[
    HookSpec {
        hook: "tracepoint/kvm/kvm_exit",
        program: common::PROG_KVM_EXIT,
        kind: HookKind::TracePoint { category: "kvm", name: "kvm_exit" },
        optional: false,
        purpose: "WBINVD/INVD hardware exits",
        group: None,
    },
    HookSpec {
        hook: "tracepoint/kvm/kvm_emulate_insn",
        program: common::PROG_KVM_EMULATE_INSN,
        kind: HookKind::TracePoint { category: "kvm", name: "kvm_emulate_insn" },
        optional: false,
        purpose: "WBINVD/INVD run by KVM's emulator",
        group: None,
    },
    HookSpec {
        hook: "tp_btf/kvm_entry",
        program: common::PROG_TP_BTF_KVM_ENTRY,
        kind: HookKind::BtfTracePoint { name: "kvm_entry" },
        optional: true,
        purpose: "ends a WBINVD's handling time at the next VM entry (cheapest)",
        group: Some("vm-entry"),
    },
    HookSpec {
        hook: "tracepoint/kvm/kvm_entry",
        program: common::PROG_KVM_ENTRY,
        kind: HookKind::TracePoint { category: "kvm", name: "kvm_entry" },
        optional: true,
        purpose: "ends a WBINVD's handling time at the next VM entry",
        group: Some("vm-entry"),
    },
    HookSpec {
        hook: "tp_btf/sys_enter",
        program: common::PROG_TP_BTF_SYS_ENTER,
        kind: HookKind::BtfTracePoint { name: "sys_enter" },
        optional: false,
        purpose: "KVM/VFIO/iommufd ioctls; judges and enforces FILE_ADD (cheapest)",
        group: Some("ioctl-enter"),
    },
    HookSpec {
        hook: "tp_btf/sys_exit",
        program: common::PROG_TP_BTF_SYS_EXIT,
        kind: HookKind::BtfTracePoint { name: "sys_exit" },
        optional: false,
        purpose: "ioctl results; kvm-vfio device fds (cheapest)",
        group: Some("ioctl-exit"),
    },
    HookSpec {
        hook: "tracepoint/syscalls/sys_enter_ioctl",
        program: common::PROG_SYS_ENTER_IOCTL,
        kind: HookKind::TracePoint { category: "syscalls", name: "sys_enter_ioctl" },
        optional: false,
        purpose: "KVM/VFIO/iommufd ioctls; judges and enforces FILE_ADD",
        group: Some("ioctl-enter"),
    },
    HookSpec {
        hook: "tracepoint/syscalls/sys_exit_ioctl",
        program: common::PROG_SYS_EXIT_IOCTL,
        kind: HookKind::TracePoint { category: "syscalls", name: "sys_exit_ioctl" },
        optional: false,
        purpose: "ioctl results; kvm-vfio device fds",
        group: Some("ioctl-exit"),
    },
    HookSpec {
        hook: "tracepoint/sched/sched_process_exec",
        program: common::PROG_SCHED_EXEC,
        kind: HookKind::TracePoint { category: "sched", name: "sched_process_exec" },
        optional: false,
        purpose: "drops a process's verdict when it execs",
        group: None,
    },
    HookSpec {
        hook: "fentry/kvm_emulate_wbinvd",
        program: common::PROG_FENTRY_KVM_EMULATE_WBINVD,
        kind: HookKind::FEntry { function: "kvm_emulate_wbinvd" },
        optional: true,
        purpose: "WBINVD exit handler start (exact handler time)",
        group: None,
    },
    HookSpec {
        hook: "fentry/emulator_wbinvd",
        program: common::PROG_FENTRY_EMULATOR_WBINVD,
        kind: HookKind::FEntry { function: "emulator_wbinvd" },
        optional: true,
        purpose: "WBINVD emulator handler start (exact handler time)",
        group: None,
    },
    HookSpec {
        hook: "fentry/wbinvd_on_cpus_mask",
        program: common::PROG_FENTRY_WBINVD_ON_CPUS_MASK,
        kind: HookKind::FEntry { function: "wbinvd_on_cpus_mask" },
        optional: true,
        purpose: "CPUs each WBINVD flush reaches",
        group: None,
    },
    HookSpec {
        hook: "fexit/kvm_emulate_wbinvd",
        program: common::PROG_FEXIT_KVM_EMULATE_WBINVD,
        kind: HookKind::FExit { function: "kvm_emulate_wbinvd" },
        optional: true,
        purpose: "WBINVD exit handler calls",
        group: None,
    },
    HookSpec {
        hook: "fexit/emulator_wbinvd",
        program: common::PROG_FEXIT_EMULATOR_WBINVD,
        kind: HookKind::FExit { function: "emulator_wbinvd" },
        optional: true,
        purpose: "WBINVD emulator handler calls",
        group: None,
    },
    HookSpec {
        hook: "lsm/file_ioctl",
        program: common::PROG_LSM_FILE_IOCTL,
        kind: HookKind::Lsm { hook: "file_ioctl" },
        optional: true,
        purpose: "denies FILE_ADD with -EPERM before it runs",
        group: None,
    },
    HookSpec {
        hook: "fexit/vfio_file_enforced_coherent",
        program: common::PROG_FEXIT_VFIO_FILE_ENFORCED_COHERENT,
        kind: HookKind::FExit { function: "vfio_file_enforced_coherent" },
        optional: true,
        purpose: "the kernel's own coherency verdict for each FILE_ADD",
        group: None,
    },
    HookSpec {
        hook: "fentry/kvm_arch_register_noncoherent_dma",
        program: common::PROG_FENTRY_REGISTER_NONCOHERENT,
        kind: HookKind::FEntry { function: "kvm_arch_register_noncoherent_dma" },
        optional: true,
        purpose: "a VM becomes non-coherent",
        group: None,
    },
    HookSpec {
        hook: "fentry/kvm_arch_unregister_noncoherent_dma",
        program: common::PROG_FENTRY_UNREGISTER_NONCOHERENT,
        kind: HookKind::FEntry { function: "kvm_arch_unregister_noncoherent_dma" },
        optional: true,
        purpose: "a VM is coherent again",
        group: None,
    },
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookState {
    Attached,
    /// The kernel would not load or attach it (the reason, with the kernel's error).
    Refused(String),
    /// Not attached because an alternative of its group serves (named here).
    Standby(&'static str),
}

#[derive(Debug, Clone)]
pub struct HookReport {
    pub spec: HookSpec,
    pub state: HookState,
}

impl HookReport {
    pub fn attached(&self) -> bool {
        self.state == HookState::Attached
    }
}

impl fmt::Display for HookReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let need = if self.spec.optional { "optional" } else { "required" };
        match &self.state {
            HookState::Attached => {
                write!(f, "{:<46} attached  ({need}) {}", self.spec.hook, self.spec.purpose)
            }
            HookState::Refused(why) => {
                write!(f, "{:<46} refused   ({need}) {}: {why}", self.spec.hook, self.spec.purpose)
            }
            HookState::Standby(by) => write!(
                f,
                "{:<46} standby   ({need}) {}: {by} serves instead",
                self.spec.hook, self.spec.purpose
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    TraceFs(#[from] TraceFsError),
    #[error("loading the ioasid eBPF object")]
    Object(#[source] aya::EbpfError),
    #[error("the object has no program {0} (built from another version?)")]
    MissingProgram(&'static str),
    #[error("the object has no map {0} (built from another version?)")]
    MissingMap(&'static str),
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("required hook {hook} could not be attached: {reason}")]
    Required { hook: &'static str, reason: String },
}

/// Which program family serves the ioctl path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum IoctlHooks {
    /// tp_btf where the kernel allows it (cheapest), else classic tracepoints.
    #[default]
    Auto,
    /// Only tp_btf sys_enter/sys_exit.
    TpBtf,
    /// Only the classic syscalls:sys_enter_ioctl/sys_exit_ioctl tracepoints.
    Tracepoint,
}

/// How the agent wants the programs set up.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Enforce verdicts (false: observe and audit only).
    pub enforce: bool,
    /// Attach optional hooks (false: tracepoints only; for comparing).
    pub optional_hooks: bool,
    pub ioctl_hooks: IoctlHooks,
    /// Fail if a required hook cannot attach (false for `status`, which reports instead).
    pub strict: bool,
}

pub struct Loaded {
    pub ebpf: Ebpf,
    pub hooks: Vec<HookReport>,
}

impl Loaded {
    fn attached(&self, hook: &str) -> bool {
        self.hooks.iter().any(|h| h.spec.hook == hook && h.attached())
    }

    /// Which programs time WBINVD handling: the handlers' fentry/fexit where all four attach,
    /// else tracepoint pairs. Returns the `Control::cost_source` value and its name.
    pub fn cost_source(&self) -> (u32, &'static str) {
        let handlers = [
            "fentry/kvm_emulate_wbinvd",
            "fexit/kvm_emulate_wbinvd",
            "fentry/emulator_wbinvd",
            "fexit/emulator_wbinvd",
        ];
        if handlers.iter().all(|h| self.attached(h)) {
            (common::COST_SOURCE_HANDLERS, "handlers")
        } else {
            (common::COST_SOURCE_TRACEPOINTS, "tracepoint-pairs")
        }
    }

    pub fn lsm_attached(&self) -> bool {
        self.hooks.iter().any(|h| matches!(h.spec.kind, HookKind::Lsm { .. }) && h.attached())
    }
}

/// Whether `--ioctl-hooks` rules this hook out; the flag value if so.
fn excluded(spec: &HookSpec, mode: IoctlHooks) -> Option<&'static str> {
    let ioctl = matches!(spec.group, Some("ioctl-enter" | "ioctl-exit"));
    match (mode, spec.kind) {
        (IoctlHooks::Tracepoint, HookKind::BtfTracePoint { .. }) if ioctl => Some("tracepoint"),
        (IoctlHooks::TpBtf, HookKind::TracePoint { .. }) if ioctl => Some("tp-btf"),
        _ => None,
    }
}

/// Reads the record layouts this kernel uses into the program configuration.
pub fn prog_config(tracefs: &TraceFs) -> Result<ProgConfig, TraceFsError> {
    let exit = tracefs.format("kvm", "kvm_exit")?;
    let emul = tracefs.format("kvm", "kvm_emulate_insn")?;
    let enter = tracefs.format("syscalls", "sys_enter_ioctl")?;
    let leave = tracefs.format("syscalls", "sys_exit_ioctl")?;
    Ok(ProgConfig {
        exit_reason: exit.field("exit_reason")?,
        exit_isa: exit.field("isa")?,
        exit_vcpu_id: exit.field("vcpu_id")?,
        emul_len: emul.field("len")?,
        emul_insn: emul.field("insn")?,
        emul_flags: emul.field("flags")?,
        emul_failed: emul.field("failed")?,
        ioctl_fd: enter.field("fd")?,
        ioctl_cmd: enter.field("cmd")?,
        ioctl_arg: enter.field("arg")?,
        ioctl_ret: leave.field("ret")?,
        agent_tgid: std::process::id(),
        emul_packed: u32::from(common::emul_is_packed(
            emul.field("len")?,
            emul.field("insn")?,
            emul.field("flags")?,
            emul.field("failed")?,
        )),
    })
}

/// Loads the object and attaches every hook the kernel allows.
pub fn load(opts: LoadOptions) -> Result<Loaded, LoadError> {
    let tracefs = TraceFs::locate_or_mount()?;
    let config = prog_config(&tracefs)?;
    let btf = Btf::from_sys_fs().ok();
    let mut ebpf = EbpfLoader::new()
        .btf(btf.as_ref())
        .override_global(common::GLOBAL_CONFIG, &config, true)
        .load(OBJECT)
        .map_err(LoadError::Object)?;
    let lsm_active = std::fs::read_to_string("/sys/kernel/security/lsm")
        .map(|l| l.split(',').any(|m| m.trim() == "bpf"))
        .ok();

    let mut hooks: Vec<HookReport> = Vec::with_capacity(HOOKS.len());
    for spec in HOOKS {
        let prog = ebpf.program_mut(spec.program).ok_or(LoadError::MissingProgram(spec.program))?;
        let serving = spec.group.and_then(|g| hooks.iter().find(|h| h.spec.group == Some(g) && h.attached()));
        let state = if let Some(by) = serving {
            HookState::Standby(by.spec.hook)
        } else if let Some(flag) = excluded(spec, opts.ioctl_hooks) {
            HookState::Refused(format!("not requested (--ioctl-hooks {flag})"))
        } else if spec.optional && !opts.optional_hooks {
            HookState::Refused("not requested (--no-optional-hooks)".into())
        } else {
            match attach(prog, spec.kind, btf.as_ref(), lsm_active) {
                Ok(()) => HookState::Attached,
                Err(why) => HookState::Refused(why),
            }
        };
        hooks.push(HookReport { spec: *spec, state });
    }
    // A required hook, or group of alternatives, that nothing serves is fatal.
    for h in hooks.iter().filter(|h| !h.spec.optional) {
        let served = match h.spec.group {
            Some(g) => hooks.iter().any(|o| o.spec.group == Some(g) && o.attached()),
            None => h.attached(),
        };
        if let (false, true, HookState::Refused(reason)) = (served, opts.strict, &h.state) {
            return Err(LoadError::Required { hook: h.spec.hook, reason: reason.clone() });
        }
    }
    let mut loaded = Loaded { ebpf, hooks };
    let control = Control {
        enforce: u32::from(opts.enforce),
        lsm_enforces: u32::from(loaded.lsm_attached()),
        cost_source: loaded.cost_source().0,
        _pad: 0,
    };
    set_control(&mut loaded.ebpf, control)?;
    Ok(loaded)
}

pub fn set_control(ebpf: &mut Ebpf, control: Control) -> Result<(), LoadError> {
    let map = ebpf.map_mut(common::MAP_CONTROL).ok_or(LoadError::MissingMap(common::MAP_CONTROL))?;
    let mut array: Array<&mut MapData, Control> =
        Array::try_from(map).map_err(|source| LoadError::Map { name: common::MAP_CONTROL, source })?;
    array.set(0, control, 0).map_err(|source| LoadError::Map { name: common::MAP_CONTROL, source })
}

fn attach(
    prog: &mut Program,
    kind: HookKind,
    btf: Option<&Btf>,
    lsm_active: Option<bool>,
) -> Result<(), String> {
    let need_btf = || btf.ok_or_else(|| "no kernel BTF at /sys/kernel/btf/vmlinux".to_string());
    match kind {
        HookKind::TracePoint { category, name } => {
            let tp: &mut TracePoint = prog.try_into().map_err(describe)?;
            tp.load().map_err(describe)?;
            tp.attach(category, name).map_err(describe)?;
        }
        HookKind::BtfTracePoint { name } => {
            let p: &mut BtfTracePoint = prog.try_into().map_err(describe)?;
            p.load(name, need_btf()?).map_err(describe)?;
            p.attach().map_err(describe)?;
        }
        HookKind::FEntry { function } => {
            let p: &mut FEntry = prog.try_into().map_err(describe)?;
            p.load(function, need_btf()?).map_err(describe)?;
            p.attach().map_err(describe)?;
        }
        HookKind::FExit { function } => {
            let p: &mut FExit = prog.try_into().map_err(describe)?;
            p.load(function, need_btf()?).map_err(describe)?;
            p.attach().map_err(describe)?;
        }
        HookKind::Lsm { hook } => {
            if lsm_active == Some(false) {
                return Err("the BPF LSM is not active (`bpf` missing from /sys/kernel/security/lsm; boot with lsm=...,bpf)".into());
            }
            let p: &mut Lsm = prog.try_into().map_err(describe)?;
            p.load(hook, need_btf()?).map_err(describe)?;
            p.attach().map_err(describe)?;
        }
    }
    Ok(())
}

/// One line: the kernel's answer, with the verifier's last lines when it said something.
fn describe(e: ProgramError) -> String {
    if let ProgramError::LoadError { io_error, verifier_log } = &e {
        let log = verifier_log.to_string();
        let tail: Vec<&str> = log.lines().map(str::trim).filter(|l| !l.is_empty()).rev().take(3).collect();
        let mut out = format!("BPF_PROG_LOAD: {io_error}");
        if !tail.is_empty() {
            out.push_str(" (verifier: ");
            out.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join(" | "));
            out.push(')');
        }
        return out;
    }
    let mut out = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every map and program named in ioasid-common exists in the built object, and every
    /// program is in the hook table.
    #[test]
    fn object_has_every_name() {
        let obj = aya_obj_names(OBJECT);
        for name in common::ALL_MAPS.iter().chain(common::ALL_PROGRAMS.iter()) {
            assert!(obj.iter().any(|s| s == name), "{name} missing from the object");
        }
        for prog in common::ALL_PROGRAMS {
            assert!(HOOKS.iter().any(|h| h.program == prog), "{prog} not in HOOKS");
        }
        assert!(obj.iter().any(|s| s == common::GLOBAL_CONFIG));
    }

    /// Symbol names of the ELF object (no kernel needed).
    fn aya_obj_names(data: &[u8]) -> Vec<String> {
        use object::{Object, ObjectSymbol};
        let file = object::File::parse(data).expect("the built object is ELF");
        file.symbols().filter_map(|s| s.name().ok().map(str::to_string)).collect()
    }
}
