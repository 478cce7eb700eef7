//! `ioasid-agent top`: a live per-VM view of a running agent, like kvm_stat.
//!
//! Reads the agent's /metrics (it loads nothing into the kernel), refreshes in place, and exits
//! cleanly on `q` or Ctrl-C, restoring the terminal. `--once` prints one frame and exits.

use std::{
    collections::BTreeMap,
    io::{IsTerminal, Write},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{cli::TopArgs, promtext};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Per-VM figures of one frame.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Row {
    pub vm: String,
    pub rate: f64,
    pub wbinvd: f64,
    pub invd: f64,
    pub handler_sum: f64,
    pub handler_count: f64,
    pub cost_ratio: f64,
    pub flushes: f64,
    pub storm: bool,
    pub alerts: f64,
    pub dma_allowed: f64,
    pub dma_audited: f64,
    pub dma_denied: f64,
    pub noncoherent: bool,
}

#[derive(Debug, Default)]
pub struct Frame {
    pub rows: Vec<Row>,
    pub mechanism: String,
    pub cost_source: String,
    pub hooks_attached: usize,
    pub hooks_total: usize,
    pub dropped: f64,
}

pub fn frame(text: &str) -> Frame {
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut f = Frame::default();
    for s in promtext::parse(text) {
        let vm = s.labels.get("vm").cloned();
        match (s.name.as_str(), vm) {
            ("ioasid_enforcement_mechanism", _) if s.value == 1.0 => {
                f.mechanism = s.labels.get("mechanism").cloned().unwrap_or_default();
            }
            ("ioasid_wbinvd_cost_source", _) if s.value == 1.0 => {
                f.cost_source = s.labels.get("source").cloned().unwrap_or_default();
            }
            ("ioasid_hook_attached", _) => {
                f.hooks_total += 1;
                f.hooks_attached += usize::from(s.value == 1.0);
            }
            ("ioasid_events_dropped_total", _) => f.dropped = s.value,
            (name, Some(vm)) => {
                let r = rows.entry(vm.clone()).or_insert_with(|| Row { vm, ..Row::default() });
                match name {
                    "ioasid_wbinvd_rate" => r.rate = s.value,
                    "ioasid_wbinvd_exits_total" => r.wbinvd += s.value,
                    "ioasid_invd_exits_total" => r.invd += s.value,
                    "ioasid_wbinvd_handler_seconds_sum" => r.handler_sum = s.value,
                    "ioasid_wbinvd_handler_seconds_count" => r.handler_count = s.value,
                    "ioasid_wbinvd_cost_ratio" => r.cost_ratio = s.value,
                    "ioasid_wbinvd_flushes_total" => r.flushes = s.value,
                    "ioasid_wbinvd_storm" => r.storm = s.value == 1.0,
                    "ioasid_vm_noncoherent" => r.noncoherent = s.value == 1.0,
                    "ioasid_dos_alerts_total" => r.alerts = s.value,
                    "ioasid_incoherent_dma_requests_total" => {
                        match s.labels.get("decision").map(String::as_str) {
                            Some("allowed") => r.dma_allowed = s.value,
                            Some("audited") => r.dma_audited = s.value,
                            Some("denied") => r.dma_denied = s.value,
                            _ => {}
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    f.rows = rows.into_values().collect();
    // Storming VMs first, then by rate.
    f.rows.sort_by(|a, b| b.storm.cmp(&a.storm).then(b.rate.total_cmp(&a.rate)).then(a.vm.cmp(&b.vm)));
    f
}

fn render(f: &Frame, url: &str, width: usize) -> String {
    let mut out = String::new();
    let now = crate::audit::rfc3339(std::time::SystemTime::now());
    out.push_str(&format!(
        "ioasid top  {url}  {}  hooks {}/{}  enforcement {}  cost source {}  dropped {}\n",
        &now[..19],
        f.hooks_attached,
        f.hooks_total,
        f.mechanism,
        f.cost_source,
        f.dropped
    ));
    out.push_str(&format!(
        "{:<24} {:>10} {:>12} {:>8} {:>10} {:>8} {:>9} {:>6} {:<7} {:<13} {}\n",
        "VM",
        "WBINVD/s",
        "WBINVD",
        "INVD",
        "HANDLER",
        "COST%",
        "FLUSHES",
        "ALERTS",
        "STATE",
        "DMA",
        "ENABLES a/u/d"
    ));
    for r in &f.rows {
        let avg_us = if r.handler_count > 0.0 { r.handler_sum / r.handler_count * 1e6 } else { 0.0 };
        // A VM name is chosen by whoever starts the VMM: no control character or escape
        // sequence reaches the operator's terminal.
        let mut vm = crate::text::escape(&r.vm).into_owned();
        if vm.chars().count() > 24 {
            vm = vm.chars().take(23).collect::<String>() + "~";
        }
        let line = format!(
            "{:<24} {:>10.0} {:>12.0} {:>8.0} {:>8.1}us {:>7.2}% {:>9.0} {:>6.0} {:<7} {:<13} {:.0}/{:.0}/{:.0}",
            vm,
            r.rate,
            r.wbinvd,
            r.invd,
            avg_us,
            r.cost_ratio * 100.0,
            r.flushes,
            r.alerts,
            if r.storm { "STORM" } else { "ok" },
            if r.noncoherent { "non-coherent" } else { "coherent" },
            r.dma_allowed,
            r.dma_audited,
            r.dma_denied
        );
        out.push_str(&line.chars().take(width.max(40)).collect::<String>());
        out.push('\n');
    }
    if f.rows.is_empty() {
        out.push_str("(no VMs yet)\n");
    }
    out.push_str("q or Ctrl-C to quit\n");
    out
}

fn scrape(addr: &str) -> Result<String> {
    let url = format!("http://{addr}/metrics");
    let agent = ureq::Agent::new_with_config(
        ureq::config::Config::builder().timeout_global(Some(Duration::from_secs(5))).build(),
    );
    let mut resp = agent.get(&url).call().with_context(|| format!("reading {url}"))?;
    resp.body_mut().read_to_string().with_context(|| format!("reading {url}"))
}

/// Restores the terminal when dropped (also on error paths).
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        // SAFETY: tcgetattr/tcsetattr on stdin with a valid termios buffer.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            t.c_lflag &= !(libc::ICANON | libc::ECHO);
            t.c_cc[libc::VMIN] = 0;
            t.c_cc[libc::VTIME] = 0;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            print!("\x1b[?1049h\x1b[?25l");
            let _ = std::io::stdout().flush();
            Some(Self { saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        print!("\x1b[?25h\x1b[?1049l");
        let _ = std::io::stdout().flush();
        // SAFETY: restoring the attributes read in `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// Waits up to `timeout` for a key; true if it was `q`.
fn quit_key(timeout: Duration) -> bool {
    let mut fds = libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on one valid pollfd.
    let n = unsafe { libc::poll(&mut fds, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
    if n > 0 && fds.revents & libc::POLLIN != 0 {
        let mut b = [0u8; 16];
        // SAFETY: read into a local buffer.
        let r = unsafe { libc::read(0, b.as_mut_ptr().cast(), b.len()) };
        return r > 0 && b[..r as usize].iter().any(|c| *c == b'q' || *c == b'Q' || *c == 3);
    }
    false
}

pub fn run(args: &TopArgs) -> Result<()> {
    let addr =
        args.url.trim_start_matches("http://").trim_end_matches('/').trim_end_matches("/metrics").to_string();
    if args.once {
        let f = frame(&scrape(&addr)?);
        print!("{}", render(&f, &addr, usize::MAX));
        return Ok(());
    }
    // SAFETY: installing async-signal-safe handlers that only store to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let _term = if interactive { RawTerminal::enter() } else { None };
    loop {
        let started = Instant::now();
        let body = match scrape(&addr) {
            Ok(b) => render(&frame(&b), &addr, terminal_width()),
            Err(e) => format!("ioasid top: {e:#}\n(retrying; q or Ctrl-C to quit)\n"),
        };
        print!("\x1b[H\x1b[2J{body}");
        let _ = std::io::stdout().flush();
        let wait = args.interval.saturating_sub(started.elapsed());
        if INTERRUPTED.load(Ordering::SeqCst) || quit_key(wait) || INTERRUPTED.load(Ordering::SeqCst) {
            return Ok(());
        }
    }
}

fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ fills a winsize.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0 {
            ws.ws_col as usize
        } else {
            160
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_from_metrics() {
        let text = "ioasid_enforcement_mechanism{mechanism=\"sigkill\"} 1\nioasid_enforcement_mechanism{mechanism=\"lsm\"} 0\n\
            ioasid_hook_attached{hook=\"a\"} 1\nioasid_hook_attached{hook=\"b\"} 0\n\
            ioasid_wbinvd_rate{vm=\"quiet\"} 5\nioasid_wbinvd_rate{vm=\"loud\"} 20000\nioasid_wbinvd_storm{vm=\"loud\"} 1\n\
            ioasid_wbinvd_exits_total{path=\"exit\",vm=\"loud\"} 10\nioasid_wbinvd_exits_total{path=\"emulated\",vm=\"loud\"} 30\n\
            ioasid_wbinvd_handler_seconds_sum{vm=\"loud\"} 0.004\nioasid_wbinvd_handler_seconds_count{vm=\"loud\"} 40\n\
            ioasid_incoherent_dma_requests_total{decision=\"denied\",vm=\"quiet\"} 2\n\
            ioasid_vm_noncoherent{vm=\"loud\"} 1\n";
        let f = frame(text);
        assert_eq!((f.mechanism.as_str(), f.hooks_attached, f.hooks_total), ("sigkill", 1, 2));
        assert_eq!(f.rows[0].vm, "loud");
        assert!(f.rows[0].storm);
        assert_eq!(f.rows[0].wbinvd, 40.0);
        assert_eq!(f.rows[1].dma_denied, 2.0);
        let out = render(&f, "x", 200);
        assert!(out.contains("STORM") && out.contains("100.0us") && out.contains("0/0/2"), "{out}");
        assert!(out.contains("non-coherent"), "{out}");
    }
}
