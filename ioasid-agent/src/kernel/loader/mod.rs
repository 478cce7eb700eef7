//! Loading the kernel object and attaching every hook the kernel allows, from the one hook table
//! (`ioasid_common::hooks::HOOKS`).
//!
//! Required hooks (tracepoints) must attach or start-up fails with the reason. Optional hooks
//! (fentry/fexit/LSM: BPF trampolines) are attached where the kernel allows them; a refusal is
//! reported, never fatal. `ioasid-agent status` and `ioasid_hook_attached{hook}` show the table.

use std::fmt;

use aya::{
    maps::{Array, MapData},
    Ebpf, EbpfLoader,
};
use ioasid_common::{
    config::Control,
    cost::CostSource,
    hooks::{
        HookKind, HookSpec, BLAST_GROUPS, COUNT_TRACEPOINTS, FUNCTION_IOCTL_CORE, FUNCTION_IOCTL_HOOKS,
        FUNCTION_IOCTL_VFIO, GROUP_EMULATED_COUNT, GROUP_EMULATOR_HANDLER_END, GROUP_EMULATOR_HANDLER_START,
        GROUP_EXIT_HANDLER_END, GROUP_EXIT_HANDLER_START, GROUP_FLUSH_CPUS, GROUP_KERNEL_VERDICT,
        GROUP_VM_ENTRY, HANDLER_COST_GROUPS, HOOKS, HOOK_FENTRY_KVM_EMULATE_INVD,
        HOOK_FEXIT_HANDLE_FASTPATH_INVD, HOOK_FEXIT_KVM_VFIO_SET_ATTR, HOOK_KVM_EXIT, HOOK_LSM_FILE_IOCTL,
        HOOK_LSM_FILE_IOCTL_DENY, HOOK_TP_BTF_KVM_EMULATE_INSN, HOOK_TP_BTF_SYS_ENTER, LSM_IOCTL_HOOKS,
    },
    names::{GLOBAL_CONFIG, MAP_BLAST, MAP_CONTROL, MAP_COST, MAP_COUNTERS, PERSISTENT_MAPS},
};

mod attach;
mod config;
pub mod state;

pub use self::{
    attach::HookRefusal,
    config::{ioctl_fns, modules_fingerprint, FileFilter, FilterOff},
};
use self::{
    attach::{attach, Target},
    config::{prog_config, svm_without_nrips, KernelFacts, KernelLayout},
};
use crate::{
    kernel::tracefs::{TraceFs, TraceFsError},
    util::text_enum,
};

/// The per-CPU hash maps: allocated on demand where the kernel allows it (`load`).
pub(super) const PERCPU_HASHES: [&str; 3] = [MAP_COUNTERS, MAP_COST, MAP_BLAST];
/// include/uapi/linux/bpf.h
const BPF_F_NO_PREALLOC: u32 = 1;

/// The compiled kernel object (empty when the agent was built without the eBPF toolchain).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ioasid.bpf.o"));

/// True when this binary carries the real kernel object. Without it (built where the eBPF
/// toolchain is missing: `cargo check`, clippy, unit tests anywhere) nothing can be loaded.
pub fn object_built() -> bool {
    !OBJECT.is_empty()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookState {
    Attached,
    /// The kernel would not load or attach it, or it was not asked for.
    Refused(HookRefusal),
    /// Not attached because an alternative of its group serves (named here).
    Standby(&'static str),
}

#[derive(Debug, Clone)]
pub struct HookReport {
    pub spec: HookSpec,
    /// The program attached there: `spec.program`, or `spec.empty` with `--empty-programs`.
    pub program: &'static str,
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
    #[error(
        "this ioasid-agent was built without the eBPF toolchain (a stub object): it cannot load \
         its kernel programs. Build it with `cargo xtask build` (installs the toolchain)"
    )]
    NoObject,
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
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("required hook {hook} could not be attached: {reason}")]
    Required { hook: &'static str, reason: HookRefusal },
}

/// Which program family serves the ioctl path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoctlHooks {
    /// The functions family where trampolines load on KVM's ioctl functions, else the LSM family
    /// where BPF LSM and trampolines load (no syscall tracepoint at all), else tp_btf where the
    /// kernel allows it, else classic tracepoints.
    #[default]
    Auto,
    /// Only fentry programs on KVM's, VFIO's and iommufd's ioctl functions.
    Functions,
    /// Only the LSM family (lsm/file_ioctl + fexit/kvm_vfio_set_attr).
    Lsm,
    /// Only tp_btf sys_enter/sys_exit.
    TpBtf,
    /// Only the classic syscalls:sys_enter_ioctl/sys_exit_ioctl tracepoints.
    Tracepoint,
}

text_enum! {
    /// How incoherent-DMA denials are enforced on this host: the `mechanism` label of
    /// `ioasid_enforcement_mechanism`.
    pub enum EnforcementMechanism {
        Lsm => "lsm",
        Sigkill => "sigkill",
        None => "none",
    }
}

text_enum! {
    /// Which program family serves the ioctl path: the `family` label of `ioasid_ioctl_path`.
    pub enum IoctlFamily {
        Functions => "functions",
        Lsm => "lsm",
        TpBtf => "tp-btf",
        Tracepoint => "tracepoint",
    }
}

/// Why blast radius is not measured: a group of `BLAST_GROUPS` that nothing serves, with why
/// each of its hooks was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlastOff {
    #[error("{}", refused.iter().map(|(h, r)| format!("{h}: {r}")).collect::<Vec<_>>().join("; "))]
    Refused { group: &'static str, refused: Vec<(&'static str, HookRefusal)> },
}

/// The LSM program beside the functions family: it refuses a denied FILE_ADD with EPERM before
/// it runs, and every ioctl on the host passes it, so it is attached only while a deny is in
/// force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LsmDeny {
    /// A deny is in force and `--enforce-with lsm`: attached.
    On,
    /// Nothing to refuse yet (no deny in the policy): loaded, not attached; a reload that
    /// brings a deny attaches it before the deny is in force.
    Off,
    /// Never attached (`--enforce-with signal`, or not enforcing): why.
    Never(&'static str),
}

/// How the agent wants the programs set up.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Enforce verdicts (false: observe and audit only).
    pub enforce: bool,
    /// Attach optional hooks (false: tracepoints only; for comparing).
    pub optional_hooks: bool,
    pub ioctl_hooks: IoctlHooks,
    /// Fail if a required hook cannot attach (false for `status`, which reports instead).
    pub strict: bool,
    /// Attach each hook's empty program instead of the real one: the benchmarks' baseline of
    /// what the attachment alone costs. Nothing is observed or enforced.
    pub empty_programs: bool,
    /// Count with the exit/emulation tracepoints even where the handlers could (benchmarks).
    pub count_with_tracepoints: bool,
    /// Whether the LSM program is attached beside the functions family to refuse denied
    /// FILE_ADDs with EPERM.
    pub lsm_deny: LsmDeny,
    /// Pin the persistent maps under this bpffs directory and adopt what a previous agent left
    /// there (`None`: every map starts afresh and dies with the agent, as for `status`).
    pub state_dir: Option<std::path::PathBuf>,
}

pub struct Loaded {
    pub ebpf: Ebpf,
    pub hooks: Vec<HookReport>,
    /// The LSM program, or the ioctl functions' programs, observe the ioctl path (no syscall
    /// tracepoint attached).
    pub lsm_observes: bool,
    /// The ioctl functions' fentry programs observe the ioctl path (nothing else pays).
    pub fns_observe: bool,
    /// Where the persistent maps are pinned, and which a previous agent left.
    pub state: Option<state::StateDir>,
    /// Whether only requests on KVM/VFIO/iommufd files are reported.
    pub file_filter: FileFilter,
    /// The WBINVD/INVD handlers' programs count every instruction and read each flush's reach:
    /// no program on every VM exit or emulated instruction.
    pub handlers_count: bool,
    /// The LSM program beside the functions family, attachable and detachable as denies come
    /// and go (None: it cannot be: another family, `--enforce-with signal`, no BPF LSM).
    pub lsm_switch: Option<LsmSwitch>,
    /// Hooks on functions of a module that was not loaded at start (VFIO, iommufd): attached
    /// when it loads (`attach_late`).
    pub late: Vec<HookReport>,
    /// What the control map holds.
    pub control: Control,
    /// The programs key per-process state by pid and start (the kernel's layout is known).
    pub starts_keyed: bool,
}

/// Attaches (`on`) or detaches the LSM program beside the functions family, with no moment
/// in which a deny is in force and unenforced: the caller attaches before writing a deny
/// and detaches after the last one is gone; while `lsm_enforces` is off the programs kill
/// instead. Returns whether it is attached now.
pub fn set_lsm_deny(
    ebpf: &mut Ebpf,
    switch: &mut LsmSwitch,
    control: &mut Control,
    on: bool,
) -> Result<bool, HookRefusal> {
    match (on, switch.link.take()) {
        (true, None) => {
            switch.link = Some(lsm_attach(ebpf, LSM_PROGRAM)?);
            control.lsm_enforces = 1;
        }
        (false, Some(link)) => {
            // Judged as the signal's first: a FILE_ADD in between is killed, never let by.
            control.lsm_enforces = 0;
            set_control(ebpf, *control).map_err(|e| HookRefusal::Kernel {
                errno: None,
                message: e.to_string(),
                verifier: None,
            })?;
            if let Err(e) = lsm_detach(ebpf, link) {
                // Still attached as far as anyone can tell (its link is gone: it stays
                // until the agent exits): it keeps refusing.
                control.lsm_enforces = 1;
                let _ = set_control(ebpf, *control);
                return Err(e);
            }
            return Ok(false);
        }
        (_, link) => {
            switch.link = link;
            return Ok(switch.link.is_some());
        }
    }
    set_control(ebpf, *control).map_err(|e| HookRefusal::Kernel {
        errno: None,
        message: e.to_string(),
        verifier: None,
    })?;
    Ok(true)
}

/// The LSM program's link while attached (see [`set_lsm_deny`]).
pub struct LsmSwitch {
    link: Option<aya::programs::lsm::LsmLinkId>,
}

impl Loaded {
    fn attached(&self, hook: &str) -> bool {
        self.hooks.iter().any(|h| h.spec.hook == hook && h.attached())
    }

    /// Whether a hook of `group` is attached.
    fn served(&self, group: &str) -> bool {
        self.serving(group).is_some()
    }

    /// The hook that serves `group` (its first alternative that attached).
    pub fn serving(&self, group: &str) -> Option<&'static str> {
        self.hooks.iter().find(|h| h.spec.group == Some(group) && h.attached()).map(|h| h.spec.hook)
    }

    /// Which programs time WBINVD handling: the handlers' hooks where all four groups are served
    /// (fentry/fexit, or kprobes where kvm has no BTF), else tracepoint pairs.
    pub fn cost_source(&self) -> CostSource {
        if HANDLER_COST_GROUPS.iter().all(|g| self.served(g)) {
            CostSource::Handlers
        } else {
            CostSource::Tracepoints
        }
    }

    /// Which programs count WBINVD/INVD: `handlers` (KVM's handler functions only),
    /// `tracepoints` (every VM exit and emulated instruction) or `incomplete` (a path is not
    /// counted: a tracepoint refused, with `--no-strict`).
    pub fn count_source(&self) -> &'static str {
        if self.handlers_count {
            "handlers"
        } else if self.attached(HOOK_KVM_EXIT) && self.served(GROUP_EMULATED_COUNT) {
            "tracepoints"
        } else {
            "incomplete"
        }
    }

    /// Which program family serves the ioctl path.
    pub fn ioctl_family(&self) -> IoctlFamily {
        if self.fns_observe {
            IoctlFamily::Functions
        } else if self.lsm_observes {
            IoctlFamily::Lsm
        } else if self.attached(HOOK_TP_BTF_SYS_ENTER) {
            IoctlFamily::TpBtf
        } else {
            IoctlFamily::Tracepoint
        }
    }

    /// Whether the blast-radius hooks are attached (a flush IPI's start and end), or why not.
    pub fn blast_radius(&self) -> Result<(), BlastOff> {
        for group in BLAST_GROUPS {
            if !self.served(group) {
                let refused = self
                    .hooks
                    .iter()
                    .filter(|h| h.spec.group == Some(group))
                    .filter_map(|h| match &h.state {
                        HookState::Refused(r) => Some((h.spec.hook, r.clone())),
                        _ => None,
                    })
                    .collect();
                return Err(BlastOff::Refused { group, refused });
            }
        }
        Ok(())
    }

    pub fn lsm_attached(&self) -> bool {
        match &self.lsm_switch {
            Some(switch) => switch.link.is_some(),
            None => self.hooks.iter().any(|h| matches!(h.spec.kind, HookKind::Lsm { .. }) && h.attached()),
        }
    }

    /// The enforcement mechanism for denials on this host: the LSM where its program is
    /// attached, else SIGKILL; none when not enforcing (dry run).
    pub fn mechanism(&self, enforce: bool) -> EnforcementMechanism {
        match (enforce, self.lsm_attached()) {
            (false, _) => EnforcementMechanism::None,
            (true, true) => EnforcementMechanism::Lsm,
            (true, false) => EnforcementMechanism::Sigkill,
        }
    }
}

/// Whether `--ioctl-hooks` rules this hook out; the flag if so.
fn excluded(spec: &HookSpec, mode: IoctlHooks) -> Option<&'static str> {
    let ioctl = spec.is_ioctl_path();
    match (mode, spec.kind) {
        (IoctlHooks::Tracepoint, HookKind::BtfTracePoint { .. }) if ioctl => Some("--ioctl-hooks tracepoint"),
        (IoctlHooks::TpBtf, HookKind::TracePoint { .. }) if ioctl => Some("--ioctl-hooks tp-btf"),
        _ => None,
    }
}

/// Loads the object and attaches every hook the kernel allows.
pub fn load(opts: &LoadOptions) -> Result<Loaded, LoadError> {
    if !object_built() {
        return Err(LoadError::NoObject);
    }
    let tracefs = TraceFs::locate_or_mount()?;
    let facts = KernelFacts::read();
    let KernelLayout { config, file_filter, ioctl_fns } = prog_config(&tracefs, &facts)?;
    let state = opts.state_dir.as_deref().map(|base| state::prepare(base, OBJECT)).transpose()?;
    let mut loader = EbpfLoader::new();
    // The object has no CO-RE relocations (a test holds it): aya needs no kernel BTF to load it,
    // and would parse all of vmlinux's for nothing.
    loader.btf(None).override_global(GLOBAL_CONFIG, &config, true);
    if facts.runtime_allocation() {
        // Per-CPU hash maps preallocate every element's per-CPU value: 98k elements times the
        // possible CPUs (over 200 MB of kernel memory on a 256-CPU host, and most of a map
        // creation's time), for a few keys per VM. Where the kernel's BPF allocator serves any
        // program type in any context (6.1+), they allocate an element when a key first
        // appears instead. The layout's hash keeps the object's flags: an agent adopts either.
        for map in PERCPU_HASHES {
            loader.map_flags(map, BPF_F_NO_PREALLOC);
        }
    }
    if let Some(state) = &state {
        for map in PERSISTENT_MAPS {
            loader.map_pin_path(map, state.pin_path(map));
        }
    }
    let ebpf = loader.load(OBJECT).map_err(LoadError::Object)?;
    let target = Target::new(&facts);
    let lsm_active = std::fs::read_to_string("/sys/kernel/security/lsm")
        .map(|l| l.split(',').any(|m| m.trim() == "bpf"))
        .ok();
    let kvm_layout = config.kvm.known != 0 && !opts.count_with_tracepoints;
    let mut attacher = Attacher {
        ebpf,
        opts,
        target,
        lsm_active,
        kvm_layout,
        layout_readable: config.kvm.known != 0,
        lsm_loaded: false,
        lsm_link: None,
    };
    let (early, fns_observe) = match attacher.functions_family()? {
        (early, true) => (early, true),
        // What the functions family's hooks got (why they were refused), then the LSM family.
        (mut early, false) => {
            early.extend(attacher.lsm_family()?);
            (early, false)
        }
    };
    let lsm_observes = fns_observe
        || LSM_IOCTL_HOOKS.iter().all(|l| early.iter().any(|(h, s)| h == l && *s == HookState::Attached));
    let observer = if fns_observe { FUNCTION_IOCTL_CORE[2] } else { LSM_IOCTL_HOOKS[0] };
    let hooks = attacher.all(&early, lsm_observes.then_some(observer))?;
    check_required(&hooks, lsm_observes, opts.strict)?;
    let handlers_count = handlers_count(&hooks, kvm_layout);
    let late = late_hooks(&hooks, fns_observe);
    let lsm_switch = (fns_observe && attacher.lsm_loaded && opts.enforce)
        .then(|| LsmSwitch { link: attacher.lsm_link.take() });
    let mut loaded = Loaded {
        ebpf: attacher.ebpf,
        hooks,
        lsm_observes,
        fns_observe,
        state,
        file_filter,
        handlers_count,
        lsm_switch,
        late,
        control: Control::OFF,
        starts_keyed: config.task_start_boottime != 0,
    };
    let control = Control {
        enforce: u32::from(opts.enforce),
        lsm_enforces: u32::from(loaded.lsm_attached()),
        cost_source: loaded.cost_source().wire(),
        skip_emulation: u32::from(svm_without_nrips()),
        lsm_observes: u32::from(lsm_observes),
        handlers_count: u32::from(handlers_count),
        fns_observe: u32::from(fns_observe),
        _pad: 0,
    };
    set_control(&mut loaded.ebpf, control)?;
    loaded.control = control;
    if loaded.file_filter == FileFilter::On {
        write_ioctl_fns(&mut loaded.ebpf, &ioctl_fns)?;
    }
    Ok(loaded)
}

/// What the hooks attached before the rest got, by hook label.
type Early = Vec<(&'static str, HookState)>;

/// The loaded object and what attaching its programs needs.
struct Attacher<'a> {
    ebpf: Ebpf,
    opts: &'a LoadOptions,
    target: Target<'a>,
    lsm_active: Option<bool>,
    /// KVM's struct layout is known (`KvmLayout`) and the handlers may count.
    kvm_layout: bool,
    /// KVM's struct layout is known (whatever `--count-with-tracepoints` says).
    layout_readable: bool,
    /// The LSM program is loaded for the functions family (attachable at a reload), and its
    /// link while attached.
    lsm_loaded: bool,
    lsm_link: Option<aya::programs::lsm::LsmLinkId>,
}

impl Attacher<'_> {
    fn attach(&mut self, spec: &HookSpec) -> Result<(&'static str, HookState), LoadError> {
        let program = if self.opts.empty_programs { spec.empty } else { spec.program };
        let prog = self.ebpf.program_mut(program).ok_or(LoadError::MissingProgram(program))?;
        let state = match attach(prog, spec, &self.target, self.lsm_active) {
            Ok(()) => HookState::Attached,
            Err(why) => HookState::Refused(why),
        };
        Ok((program, state))
    }

    /// Where trampolines load on KVM's own ioctl functions, fentry programs there (and fexit
    /// kvm_vfio_set_attr) serve the whole ioctl path: nothing else on the host pays. The LSM
    /// program is attached beside them only to refuse denied FILE_ADDs (`LoadOptions::lsm_deny`).
    /// Returns what each of its hooks got, and whether the family serves (false where
    /// `--ioctl-hooks` asks for another, or a hook of `FUNCTION_IOCTL_CORE` was refused).
    fn functions_family(&mut self) -> Result<(Early, bool), LoadError> {
        let mode = self.opts.ioctl_hooks;
        if !matches!(mode, IoctlHooks::Auto | IoctlHooks::Functions) || !self.opts.optional_hooks {
            return Ok((Vec::new(), false));
        }
        let mut early = Vec::new();
        for label in FUNCTION_IOCTL_HOOKS {
            let spec = ioasid_common::hooks::hook(label).expect("the ioctl function hooks are in the table");
            early.push((label, self.attach(spec)?.1));
        }
        // kvm_vfio_set_attr's fexit serves the LSM family too: attached here only where the
        // KVM functions took (else the LSM family attaches it).
        let core_took = FUNCTION_IOCTL_CORE[..3]
            .iter()
            .all(|l| early.iter().any(|(h, s)| h == l && *s == HookState::Attached));
        if core_took {
            let spec = ioasid_common::hooks::hook(HOOK_FEXIT_KVM_VFIO_SET_ATTR).expect("in the table");
            early.push((HOOK_FEXIT_KVM_VFIO_SET_ATTR, self.attach(spec)?.1));
        }
        let refused = FUNCTION_IOCTL_CORE.iter().find_map(|l| match early.iter().find(|(h, _)| h == l) {
            Some((_, HookState::Attached)) => None,
            Some((h, HookState::Refused(r))) => Some((*h, r.clone())),
            _ => Some((*l, HookRefusal::NotRequested { flag: "--no-optional-hooks" })),
        });
        if let Some((hook, reason)) = refused {
            if mode == IoctlHooks::Functions && self.opts.strict {
                return Err(LoadError::Required { hook, reason });
            }
            // The others of the family that attached do nothing (`Control::fns_observe` off).
            early.retain(|(h, _)| *h != HOOK_FEXIT_KVM_VFIO_SET_ATTR);
            return Ok((early, false));
        }
        let state = match self.opts.lsm_deny {
            LsmDeny::Never(why) => HookState::Refused(HookRefusal::Unneeded { why }),
            wanted => match self.lsm_load() {
                Err(refused) => HookState::Refused(refused),
                Ok(()) if wanted == LsmDeny::Off => {
                    HookState::Refused(HookRefusal::Unneeded { why: NO_DENY })
                }
                Ok(()) => match lsm_attach(&mut self.ebpf, lsm_program(self.opts.empty_programs)) {
                    Ok(link) => {
                        self.lsm_link = Some(link);
                        HookState::Attached
                    }
                    Err(refused) => HookState::Refused(refused),
                },
            },
        };
        let deny_only = match &state {
            HookState::Attached => HookState::Standby(HOOK_LSM_FILE_IOCTL),
            refused => refused.clone(),
        };
        early.push((HOOK_LSM_FILE_IOCTL, state));
        early.push((HOOK_LSM_FILE_IOCTL_DENY, deny_only));
        Ok((early, true))
    }

    /// Loads the observing LSM program (not attached), for `lsm_attach` now or at a reload.
    fn lsm_load(&mut self) -> Result<(), HookRefusal> {
        if self.lsm_active == Some(false) {
            return Err(HookRefusal::LsmInactive);
        }
        let name = lsm_program(self.opts.empty_programs);
        let prog = self.ebpf.program_mut(name).ok_or(HookRefusal::Absent { name: name.into() })?;
        let p: &mut aya::programs::Lsm = prog.try_into().map_err(attach::describe)?;
        attach::load_lsm(p, "file_ioctl", &self.target)?;
        self.lsm_loaded = true;
        Ok(())
    }

    /// Where BPF LSM and trampolines load, the LSM program and fexit kvm_vfio_set_attr serve
    /// the whole ioctl path and no syscall tracepoint is attached (unrelated syscalls pay
    /// nothing). Attached first; `--ioctl-hooks lsm` requires them.
    fn lsm_family(&mut self) -> Result<Early, LoadError> {
        let mut early = Vec::new();
        if matches!(self.opts.ioctl_hooks, IoctlHooks::Auto | IoctlHooks::Lsm) && self.opts.optional_hooks {
            for label in LSM_IOCTL_HOOKS {
                let spec = ioasid_common::hooks::hook(label).expect("the LSM ioctl hooks are in the table");
                early.push((label, self.attach(spec)?.1));
            }
        }
        let observes =
            early.len() == LSM_IOCTL_HOOKS.len() && early.iter().all(|(_, s)| *s == HookState::Attached);
        if self.opts.ioctl_hooks == IoctlHooks::Lsm && !observes && self.opts.strict {
            let reason = early.iter().find_map(|(_, s)| match s {
                HookState::Refused(r) => Some(r.clone()),
                _ => None,
            });
            let reason = reason.unwrap_or(HookRefusal::NotRequested { flag: "--no-optional-hooks" });
            return Err(LoadError::Required { hook: HOOK_LSM_FILE_IOCTL, reason });
        }
        Ok(early)
    }

    /// Every hook of the table, in order: attached, on standby for an alternative that serves,
    /// or refused.
    fn all(
        &mut self,
        early: &[(&'static str, HookState)],
        observer: Option<&'static str>,
    ) -> Result<Vec<HookReport>, LoadError> {
        let mut hooks: Vec<HookReport> = Vec::with_capacity(HOOKS.len());
        for spec in HOOKS {
            let program = if self.opts.empty_programs { spec.empty } else { spec.program };
            self.ebpf.program_mut(program).ok_or(LoadError::MissingProgram(program))?;
            let serving =
                spec.group.and_then(|g| hooks.iter().find(|h| h.spec.group == Some(g) && h.attached()));
            let state = if let Some((_, state)) = early.iter().find(|(l, _)| *l == spec.hook) {
                state.clone()
            } else if let (Some(by), true) = (observer, spec.is_ioctl_path()) {
                HookState::Standby(by)
            } else if FUNCTION_IOCTL_HOOKS.contains(&spec.hook) {
                // Attached with their family only (`functions_family`).
                HookState::Refused(HookRefusal::NotRequested { flag: "--ioctl-hooks" })
            } else if let Some(by) = serving {
                HookState::Standby(by.spec.hook)
            } else if (COUNT_TRACEPOINTS.contains(&spec.hook) || spec.group == Some(GROUP_FLUSH_CPUS))
                && handlers_count(&hooks, self.kvm_layout)
            {
                // Every VM exit, every emulated instruction, or (on_each_cpu_cond_mask,
                // smp_call_function_many) every multi-CPU TLB shootdown of the host would pay
                // for what the handlers' own programs already count and read.
                HookState::Refused(HookRefusal::Unneeded {
                    why: "the WBINVD/INVD handlers' own hooks count every instruction and read each flush's CPUs",
                })
            } else if spec.hook == HOOK_TP_BTF_KVM_EMULATE_INSN && !self.layout_readable {
                HookState::Refused(HookRefusal::NoLayout)
            } else if spec.group == Some(GROUP_VM_ENTRY) && handlers_served(&hooks) {
                // A VM entry closes a WBINVD's timing only where the handlers cannot: every
                // VM exit of every VM would pay for a tracepoint that counts nothing.
                HookState::Refused(HookRefusal::Unneeded {
                    why: "the WBINVD handlers' own exit hooks time every WBINVD",
                })
            } else if let Some(flag) = excluded(spec, self.opts.ioctl_hooks) {
                HookState::Refused(HookRefusal::NotRequested { flag })
            } else if spec.optional && !self.opts.optional_hooks {
                HookState::Refused(HookRefusal::NotRequested { flag: "--no-optional-hooks" })
            } else {
                self.attach(spec)?.1
            };
            hooks.push(HookReport { spec: *spec, program, state });
        }
        Ok(hooks)
    }
}

/// Whether each group of `HANDLER_COST_GROUPS` is served by a hook attached so far.
fn handlers_served(hooks: &[HookReport]) -> bool {
    HANDLER_COST_GROUPS.iter().all(|g| hooks.iter().any(|h| h.spec.group == Some(g) && h.attached()))
}

/// The observing LSM program (the one `functions_family` attaches for denials).
const LSM_PROGRAM: &str = "ioasid_lsm_file_ioctl";
const LSM_EMPTY_PROGRAM: &str = "ioasid_lsm_file_ioctl_empty";

/// Why the LSM program is not attached beside the functions family while nothing is denied.
pub const NO_DENY: &str =
    "no deny in the policy: nothing to refuse (a reload that brings one attaches it first)";

/// The LSM program beside the functions family: the real one, or with `--empty-programs` its
/// empty twin (the benchmarks' baseline of what a deny policy's attachment costs).
fn lsm_program(empty_programs: bool) -> &'static str {
    if empty_programs {
        LSM_EMPTY_PROGRAM
    } else {
        LSM_PROGRAM
    }
}

/// Attaches the (loaded) LSM program `name`: from then on it refuses denied FILE_ADDs.
pub fn lsm_attach(ebpf: &mut Ebpf, name: &str) -> Result<aya::programs::lsm::LsmLinkId, HookRefusal> {
    let prog = ebpf.program_mut(name).ok_or(HookRefusal::Absent { name: name.into() })?;
    let p: &mut aya::programs::Lsm = prog.try_into().map_err(attach::describe)?;
    p.attach().map_err(attach::describe)
}

/// Detaches it again (it stays loaded).
pub fn lsm_detach(ebpf: &mut Ebpf, link: aya::programs::lsm::LsmLinkId) -> Result<(), HookRefusal> {
    let prog = ebpf.program_mut(LSM_PROGRAM).ok_or(HookRefusal::Absent { name: LSM_PROGRAM.into() })?;
    let p: &mut aya::programs::Lsm = prog.try_into().map_err(attach::describe)?;
    p.detach(link).map_err(attach::describe)
}

/// The hooks refused only because their module was not loaded yet, that serve once it is: the
/// VFIO/iommufd ioctl functions where that family serves, and the kernel's coherency verdict
/// (a VFIO function) where nothing serves it. libvirt loads vfio-pci when it starts a VM with a
/// device to pass through, often after the agent.
fn late_hooks(hooks: &[HookReport], fns_observe: bool) -> Vec<HookReport> {
    let verdict_served = hooks.iter().any(|h| h.spec.group == Some(GROUP_KERNEL_VERDICT) && h.attached());
    hooks
        .iter()
        .filter(|h| matches!(h.state, HookState::Refused(HookRefusal::Absent { .. })))
        .filter(|h| {
            (fns_observe && FUNCTION_IOCTL_VFIO.contains(&h.spec.hook))
                || (!verdict_served && h.spec.group == Some(GROUP_KERNEL_VERDICT))
        })
        .cloned()
        .collect()
}

/// Tries the `late` hooks again (a module was loaded): returns the labels of those attached now,
/// and keeps the others. Of the kernel-verdict group, the first that attaches serves.
pub fn attach_late(ebpf: &mut Ebpf, late: &mut Vec<HookReport>) -> Vec<&'static str> {
    let facts = KernelFacts::read();
    let target = Target::new(&facts);
    let mut attached = Vec::new();
    for h in late.iter_mut() {
        if h.spec.group.is_some_and(|g| attached.iter().any(|a: &&str| hook_group(a) == Some(g))) {
            continue;
        }
        let Some(prog) = ebpf.program_mut(h.program) else { continue };
        match attach(prog, &h.spec, &target, None) {
            Ok(()) => {
                h.state = HookState::Attached;
                attached.push(h.spec.hook);
            }
            Err(why) => h.state = HookState::Refused(why),
        }
    }
    late.retain(|h| {
        !h.attached() && !h.spec.group.is_some_and(|g| attached.iter().any(|a| hook_group(a) == Some(g)))
    });
    attached
}

fn hook_group(label: &str) -> Option<&'static str> {
    ioasid_common::hooks::hook(label)?.group
}

/// Whether the handlers' programs count every WBINVD/INVD (so no exit or emulation tracepoint
/// and no flush-cpus hook is needed): KVM's layout is known (they read the vCPU), the WBINVD
/// handlers are hooked by trampolines on both paths, and every INVD exit handler this kernel
/// has is hooked.
fn handlers_count(hooks: &[HookReport], kvm_layout: bool) -> bool {
    let served_by = |group: &str, trampoline: fn(&HookKind) -> bool| {
        hooks.iter().any(|h| h.spec.group == Some(group) && h.attached() && trampoline(&h.spec.kind))
    };
    let fentry = |k: &HookKind| matches!(k, HookKind::FEntry { .. });
    let fexit = |k: &HookKind| matches!(k, HookKind::FExit { .. });
    let state = |label: &str| hooks.iter().find(|h| h.spec.hook == label).map(|h| &h.state);
    kvm_layout
        && served_by(GROUP_EXIT_HANDLER_START, fentry)
        && served_by(GROUP_EMULATOR_HANDLER_START, fentry)
        && served_by(GROUP_EXIT_HANDLER_END, fexit)
        && served_by(GROUP_EMULATOR_HANDLER_END, fexit)
        && state(HOOK_FENTRY_KVM_EMULATE_INVD) == Some(&HookState::Attached)
        && matches!(
            state(HOOK_FEXIT_HANDLE_FASTPATH_INVD),
            Some(HookState::Attached | HookState::Refused(HookRefusal::Absent { .. }))
        )
}

/// A required hook, or group of alternatives, that nothing serves is fatal (when strict).
fn check_required(hooks: &[HookReport], lsm_observes: bool, strict: bool) -> Result<(), LoadError> {
    for h in hooks.iter().filter(|h| !h.spec.optional) {
        if let HookState::Refused(HookRefusal::Unneeded { .. }) = h.state {
            continue;
        }
        let served = match h.spec.group {
            _ if lsm_observes && h.spec.is_ioctl_path() => true,
            Some(g) => hooks.iter().any(|o| o.spec.group == Some(g) && o.attached()),
            None => h.attached(),
        };
        if let (false, true, HookState::Refused(reason)) = (served, strict, &h.state) {
            return Err(LoadError::Required { hook: h.spec.hook, reason: reason.clone() });
        }
    }
    Ok(())
}

/// Writes the watched ioctl functions' addresses (see `MAP_IOCTL_FNS`).
pub fn write_ioctl_fns(ebpf: &mut Ebpf, fns: &[u64]) -> Result<(), LoadError> {
    let name = ioasid_common::names::MAP_IOCTL_FNS;
    let map = ebpf.map_mut(name).ok_or(LoadError::MissingMap(name))?;
    let mut array: Array<&mut MapData, u64> =
        Array::try_from(map).map_err(|source| LoadError::Map { name, source })?;
    for (i, a) in fns.iter().enumerate() {
        array.set(i as u32, *a, 0).map_err(|source| LoadError::Map { name, source })?;
    }
    Ok(())
}

pub fn set_control(ebpf: &mut Ebpf, control: Control) -> Result<(), LoadError> {
    let map = ebpf.map_mut(MAP_CONTROL).ok_or(LoadError::MissingMap(MAP_CONTROL))?;
    let mut array: Array<&mut MapData, Control> =
        Array::try_from(map).map_err(|source| LoadError::Map { name: MAP_CONTROL, source })?;
    array.set(0, control, 0).map_err(|source| LoadError::Map { name: MAP_CONTROL, source })
}

#[cfg(test)]
mod tests {
    use ioasid_common::names::ALL_MAPS;

    use super::*;

    /// The object and the hook table agree: every map named in ioasid-common and every program
    /// of the table exists in the built object, and every program in the object is in the
    /// table, as a hook's program or its empty baseline (so no program is loaded that nothing
    /// attaches, and none is forgotten).
    #[test]
    #[cfg_attr(ioasid_stub_object, ignore = "built without the eBPF toolchain: no object to check")]
    fn object_and_hook_table_agree() {
        use object::{Object, ObjectSection, ObjectSymbol, SymbolSection};
        let file = object::File::parse(OBJECT).expect("the built object is ELF");
        let names: Vec<String> = file.symbols().filter_map(|s| s.name().ok().map(str::to_string)).collect();
        for name in ALL_MAPS.iter().chain([&GLOBAL_CONFIG]) {
            assert!(names.iter().any(|s| s == name), "{name} missing from the object");
        }
        // Programs: function symbols in executable sections.
        let programs: Vec<String> = file
            .symbols()
            .filter(|s| s.kind() == object::SymbolKind::Text && s.is_global())
            .filter(|s| match s.section() {
                SymbolSection::Section(i) => file
                    .section_by_index(i)
                    .ok()
                    .and_then(|sec| sec.name().ok().map(|n| n != ".text"))
                    .unwrap_or(false),
                _ => false,
            })
            .filter_map(|s| s.name().ok().map(str::to_string))
            .collect();
        for h in HOOKS {
            for program in [h.program, h.empty] {
                assert!(programs.iter().any(|p| p == program), "{program} ({}) not in the object", h.hook);
            }
        }
        for p in &programs {
            assert!(
                HOOKS.iter().any(|h| h.program == p || h.empty == p),
                "program {p} of the object is not in the hook table"
            );
        }
        assert_eq!(programs.len(), 2 * HOOKS.len(), "{programs:?}");
    }
}
