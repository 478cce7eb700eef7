//! `ioasid-agent run`: start-up and the event loop's plumbing.
//!
//! Tasks: the ring buffer reader (`ring`), the HTTP endpoint (`http`), the audit writers
//! (`audit`), and one actor (`actor`) that owns the kernel boundary and takes events, sweeps,
//! scrape refreshes, SIGHUP and policy-file changes one at a time.

use std::{net::SocketAddr, os::fd::OwnedFd, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    net::TcpListener,
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    agent::actor::{Actor, Settings},
    engine::policy::PolicyStore,
    engine::{events::Event, ports::AskGate},
    host::instance::Instance,
    host::procfs::ProcFs,
    host::sys::hostname,
    host::vfio::SysFs,
    kernel::loader::{self, EnforcementMechanism, HookState, IoctlFamily, LoadOptions, Loaded},
    kernel::ring::{self, Overflow},
    kernel::BpfKernel,
    output::audit::AuditLog,
    output::http,
    output::telemetry::Metrics,
    throttle::{Cgroups, StateFile, Throttler},
};

const EVENT_QUEUE: usize = 4096;
/// How long shutdown waits for the audit sinks to write what is queued.
const AUDIT_CLOSE: Duration = Duration::from_secs(5);
/// The least time between two sweeps a scrape asks for.
const SCRAPE_SWEEP_GAP: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub listen: SocketAddr,
    pub probe_listen: Option<SocketAddr>,
    pub policy: Option<PathBuf>,
    pub audit_log: PathBuf,
    pub audit_syslog: Option<PathBuf>,
    pub record: Option<PathBuf>,
    pub load: LoadOptions,
    pub sweep: Duration,
    pub retention: Duration,
    pub ready_file: Option<PathBuf>,
    pub lock_file: PathBuf,
    pub bpf_stats: bool,
    /// Where `action: throttle` keeps what it changed (so a next agent can put it back).
    pub throttle_state: PathBuf,
}

/// Faults injected for the kernel tests (cargo feature `fault-injection`, which only the tests
/// turn on); without the feature there are none and the fields do not exist.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Discard every ring buffer event (as a full queue would), to exercise the paths that
    /// must not depend on events.
    #[cfg(feature = "fault-injection")]
    pub drop_events: bool,
    /// Never read the decisions ring (the kernel's own fallback is exercised).
    #[cfg(feature = "fault-injection")]
    pub stall_decisions: bool,
}

impl Faults {
    fn drop_events(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.drop_events;
        #[cfg(not(feature = "fault-injection"))]
        false
    }

    fn stall_decisions(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.stall_decisions;
        #[cfg(not(feature = "fault-injection"))]
        false
    }
}

/// SIGHUP, SIGTERM and SIGINT, taken over before anything is attached: a signal that arrives
/// during start-up waits for the event loop instead of killing the agent mid-way (it would
/// leave VMMs it stopped undecided).
struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

pub async fn run(cfg: RunConfig, faults: Faults) -> Result<()> {
    let signals = Signals {
        hup: signal(SignalKind::hangup())?,
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
    };
    let _instance = Instance::acquire(&cfg.lock_file)?;
    let metrics = Metrics::new();
    let policy = open_policy(&cfg)?;
    let node = node_name();
    let syslog =
        cfg.audit_syslog.clone().map(|socket| crate::output::audit::Syslog { socket, host: node.clone() });
    let audit = AuditLog::start_with(&cfg.audit_log, metrics.audit_counters(), syslog, None)?;
    let record = cfg
        .record
        .as_deref()
        .map(|p| AuditLog::start_with(p, metrics.audit_counters(), None, Some("record")))
        .transpose()?;
    let mut load = cfg.load.clone();
    if load.lsm_deny == loader::LsmDeny::On && !policy.policy.has_deny() {
        // Pay for what the policy asks: nothing refuses, so no program on every ioctl.
        load.lsm_deny = loader::LsmDeny::Off;
    }
    let loaded = loader::load(&load)?;
    if let Some(state) = loaded.state.as_ref().filter(|s| !s.adopted.is_empty()) {
        tracing::info!(dir = %state.dir.display(), maps = ?state.adopted, "adopting the kernel state a previous agent left (open asks, counters, non-coherent VMs)");
    }
    report_hooks(&loaded, &metrics, cfg.load.enforce);
    let bpf_stats = cfg.bpf_stats.then(enable_bpf_stats).flatten();
    let blast_on = loaded.blast_radius().is_ok();
    let (mut kernel, rings) = BpfKernel::new(loaded, bpf_stats.is_some())?;
    ring::forward_kernel_log(kernel.ebpf_mut());
    let gate = ask_gate(&mut kernel);
    let serving = serve(&cfg, &metrics).await?;
    let mut ev_rx = read_rings(rings, &metrics, &serving.health, faults)?;
    let settings = Settings {
        procfs: ProcFs::default(),
        sysfs: SysFs::default(),
        host: node,
        retention: cfg.retention,
        sweep_interval: cfg.sweep,
        enforce: cfg.load.enforce,
    };
    let mut actor = Actor::new(kernel, settings, policy, metrics, audit, record);
    start_actor(&mut actor, &cfg, blast_on, gate);
    if let Some(path) = &cfg.ready_file {
        crate::host::files::write(path, serving.local.to_string().as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let Serving { health, mut refresh, .. } = serving;
    health.set_ready(true);
    event_loop(&mut actor, &mut ev_rx, &mut refresh, cfg.sweep, &health, signals).await?;
    health.set_ready(false);
    // Queued events first, then any ask still open: no VMM stays stopped behind a restart.
    while let Ok(ev) = ev_rx.try_recv() {
        actor.on_event(ev);
    }
    actor.recover_asks(0);
    actor.release_throttles();
    actor.close_audit(AUDIT_CLOSE);
    tracing::info!("shutting down: detaching every hook");
    Ok(())
}

/// The HTTP endpoint, serving: where it listens, its probes, and the actor's side of scrape
/// refreshes.
struct Serving {
    local: SocketAddr,
    health: Arc<http::Health>,
    refresh: mpsc::Receiver<http::Refresh>,
}

async fn serve(cfg: &RunConfig, metrics: &Metrics) -> Result<Serving> {
    let listener =
        TcpListener::bind(cfg.listen).await.with_context(|| format!("listening on {}", cfg.listen))?;
    let local = listener.local_addr()?;
    let (refresh_tx, refresh) = mpsc::channel::<http::Refresh>(64);
    let health = http::Health::new(cfg.sweep);
    tokio::spawn(http::serve(listener, Some(refresh_tx), metrics.clone(), Arc::clone(&health)));
    tracing::info!(listen = %local, "serving /metrics");
    if let Some(addr) = cfg.probe_listen {
        let probes =
            TcpListener::bind(addr).await.with_context(|| format!("listening for probes on {addr}"))?;
        tracing::info!(listen = %probes.local_addr()?, "serving the probes (/healthz, /readyz)");
        tokio::spawn(http::serve(probes, None, metrics.clone(), Arc::clone(&health)));
    }
    Ok(Serving { local, health, refresh })
}

/// Starts the readers of both kernel rings into one queue for the actor.
fn read_rings(
    rings: crate::kernel::Rings,
    metrics: &Metrics,
    health: &Arc<http::Health>,
    faults: Faults,
) -> Result<mpsc::Receiver<Event>> {
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
    let (on_events, on_decisions) = match faults.drop_events() {
        true => (Overflow::DiscardAll, Overflow::DiscardAll),
        false => (Overflow::DropNewest, Overflow::Wait),
    };
    ring::spawn_reader(rings.events, ev_tx.clone(), metrics.clone(), on_events, Arc::clone(health))
        .context("polling the events ring buffer")?;
    if !faults.stall_decisions() {
        ring::spawn_reader(rings.decisions, ev_tx, metrics.clone(), on_decisions, Arc::clone(health))
            .context("polling the decisions ring buffer")?;
    }
    Ok(ev_rx)
}

/// A second fd on the asks map for the duty-cycle threads, or None (then no duty cycle).
fn ask_gate(kernel: &mut BpfKernel) -> Option<Arc<dyn AskGate>> {
    match kernel.ask_gate() {
        Ok(g) => Some(Arc::new(g)),
        Err(e) => {
            tracing::warn!(error = %e, "no second fd on the asks map: a duty cycle could continue a VMM stopped to ask, so duty-cycle throttling is off");
            None
        }
    }
}

/// Before the first event: blast radius on or off, throttles a previous agent left put back,
/// the VMMs already running classified, and every ask a previous agent left open decided.
fn start_actor(
    actor: &mut Actor<BpfKernel>,
    cfg: &RunConfig,
    blast_on: bool,
    gate: Option<Arc<dyn AskGate>>,
) {
    if blast_on {
        actor.enable_blast();
    } else {
        tracing::info!("blast radius (victims of WBINVD flushes) unavailable: the kernel refused fentry/fexit wbinvd_ipi (see status); its series stay absent");
    }
    // Put back whatever a previous agent left throttled, before anything else can change.
    actor.set_throttler(Throttler::recover(
        StateFile::new(cfg.throttle_state.clone()),
        Cgroups::discover(),
        gate,
    ));
    if let Some(r) = crate::host::libvirt::Reader::start(crate::host::libvirt::RUN_DIR.into()) {
        actor.set_libvirt(r);
    }
    // Classify VMMs that were running before the agent started (every process holding a KVM
    // VM fd, and any other the counters name), then decide every ask a previous agent left
    // open (its VMM is stopped, waiting).
    actor.discover();
    actor.sweep();
    actor.recover_asks(0);
}

/// One message at a time until SIGTERM or SIGINT: events, scrape refreshes, sweeps, policy
/// file checks, SIGHUP.
async fn event_loop(
    actor: &mut Actor<BpfKernel>,
    events: &mut mpsc::Receiver<Event>,
    refresh: &mut mpsc::Receiver<http::Refresh>,
    sweep: Duration,
    health: &http::Health,
    signals: Signals,
) -> Result<()> {
    let mut tick = tokio::time::interval(sweep);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    let Signals { mut hup, mut term, mut int } = signals;
    let mut reloads = Reloads::new();
    let mut waiting: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    let mut last_sweep = tokio::time::Instant::now();
    let refresh_at = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(refresh_at);
    loop {
        tokio::select! {
            Some(ev) = events.recv() => actor.on_event(ev),
            // A scrape waits for a sweep that starts after it asked (fresh values), but not
            // one within SCRAPE_SWEEP_GAP of the last: however many scrape, the loop sweeps at
            // most 20 times a second for them, one sweep answering all that wait.
            Some(http::Refresh(done)) = refresh.recv() => {
                if waiting.is_empty() {
                    refresh_at.as_mut().reset(last_sweep + SCRAPE_SWEEP_GAP.min(sweep / 2));
                }
                waiting.push(done);
            }
            () = &mut refresh_at, if !waiting.is_empty() => {
                actor.sweep();
                actor.export_program_stats();
                health.beat();
                last_sweep = tokio::time::Instant::now();
                tick.reset();
                for done in waiting.drain(..) {
                    let _ = done.send(());
                }
            }
            _ = tick.tick() => {
                actor.sweep();
                if !waiting.is_empty() {
                    actor.export_program_stats();
                }
                health.beat();
                last_sweep = tokio::time::Instant::now();
                for done in waiting.drain(..) {
                    let _ = done.send(());
                }
            }
            _ = watch.tick() => if actor.policy_file_changed() {
                reloads.start(actor, "file changed");
            },
            _ = hup.recv() => reloads.start(actor, "SIGHUP"),
            Some((why, parsed)) = reloads.done.recv() => {
                actor.apply_reload(why, parsed);
                reloads.finished(actor);
            }
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    }
}

type Parsed = Result<(crate::engine::policy::Policy, Vec<u8>), crate::engine::policy::PolicyError>;

/// Policy reloads parse on a thread of their own: decisions, scrapes and shutdown never wait
/// for a parse. One at a time; a trigger during a parse runs one more once it is done.
struct Reloads {
    tx: mpsc::Sender<(&'static str, Parsed)>,
    done: mpsc::Receiver<(&'static str, Parsed)>,
    running: bool,
    again: Option<&'static str>,
}

impl Reloads {
    fn new() -> Self {
        let (tx, done) = mpsc::channel(1);
        Self { tx, done, running: false, again: None }
    }

    fn start(&mut self, actor: &Actor<BpfKernel>, why: &'static str) {
        if self.running {
            self.again = Some(why);
            return;
        }
        let Some(path) = actor.reload_path(why) else { return };
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new().name("policy-parse".into()).spawn(move || {
            let _ = tx.blocking_send((why, crate::engine::policy::Policy::load_bytes(&path)));
        });
        match spawned {
            Ok(_) => self.running = true,
            Err(e) => {
                tracing::error!(trigger = why, error = %e, "could not start a policy parse; the policy in force stays")
            }
        }
    }

    fn finished(&mut self, actor: &Actor<BpfKernel>) {
        self.running = false;
        if let Some(why) = self.again.take() {
            self.start(actor, why);
        }
    }
}

fn open_policy(cfg: &RunConfig) -> Result<PolicyStore> {
    let store = PolicyStore::open(cfg.policy.as_deref())?;
    match cfg.policy.as_deref() {
        Some(path) => {
            let p = &store.policy;
            tracing::info!(policy = %path.display(), rules = p.rule_count(), default = ?p.default, "policy loaded");
        }
        None => tracing::info!(
            "no --policy given: running the embedded default policy (audit every incoherent-DMA enable, deny nothing)"
        ),
    }
    Ok(store)
}

/// The node audit records name: `NODE_NAME` (Kubernetes' downward API) where set and sane,
/// else the host name. In a pod the host name is the pod's, not the node's.
fn node_name() -> String {
    match std::env::var("NODE_NAME") {
        Ok(n) if !n.is_empty() && n.len() <= 253 && n.bytes().all(|b| b.is_ascii_graphic()) => n,
        Ok(n) if !n.is_empty() => {
            tracing::warn!(node = %crate::util::text::escape(&n), "NODE_NAME is not a node name: using the host name");
            hostname()
        }
        _ => hostname(),
    }
}

/// One log line per hook, and the hook, mechanism and cost-source gauges.
fn report_hooks(loaded: &Loaded, metrics: &Metrics, enforce: bool) {
    for h in &loaded.hooks {
        match &h.state {
            HookState::Attached => {
                tracing::info!(hook = h.spec.hook, optional = h.spec.optional, "hook attached")
            }
            HookState::Refused(why) => {
                tracing::warn!(hook = h.spec.hook, optional = h.spec.optional, reason = %why, "hook refused by the kernel")
            }
            HookState::Standby(by) => {
                tracing::info!(hook = h.spec.hook, serving = by, "hook on standby: an alternative serves")
            }
        }
        metrics.hook_attached.with_label_values(&[h.spec.hook]).set(i64::from(h.attached()));
    }
    let mechanism = loaded.mechanism(enforce);
    for m in EnforcementMechanism::ALL {
        metrics.enforcement_mechanism.with_label_values(&[m.label()]).set(i64::from(*m == mechanism));
    }
    tracing::info!(mechanism = mechanism.label(), "incoherent-DMA enforcement");
    let source = loaded.cost_source();
    for s in ioasid_common::cost::CostSource::ALL {
        metrics.wbinvd_cost_source.with_label_values(&[s.label()]).set(i64::from(*s == source));
    }
    tracing::info!(source = source.label(), "WBINVD handler time source");
    let counts = loaded.count_source();
    for s in ["handlers", "tracepoints", "incomplete"] {
        metrics.wbinvd_count_source.with_label_values(&[s]).set(i64::from(s == counts));
    }
    tracing::info!(source = counts, "WBINVD/INVD count source");
    let family = loaded.ioctl_family();
    for f in IoctlFamily::ALL {
        metrics.ioctl_path.with_label_values(&[f.label()]).set(i64::from(*f == family));
    }
    tracing::info!(family = family.label(), "ioctl path");
}

/// Keeps kernel BPF run-time statistics on while the returned fd lives.
fn enable_bpf_stats() -> Option<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .inspect_err(|e| tracing::warn!(error = %e, "could not enable BPF run-time statistics"))
        .ok()
}
