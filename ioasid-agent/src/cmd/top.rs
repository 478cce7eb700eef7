//! `ioasid-agent top`: a live per-VM view of a running agent, like kvm_stat.
//!
//! Reads the agent's /metrics (it loads nothing into the kernel). In a terminal it is a ratatui
//! table refreshed in place: `s` cycles the sort (WBINVD rate, cost share, WBINVD count, name),
//! `/` filters VMs by a substring of their name (Enter keeps it, Esc clears it), `v` switches to
//! the victims view (blast radius: flush IPIs sent and received, time stolen, and who took it
//! from each VM; filter to one VM to see it alone), `q` or Ctrl-C quits and restores the
//! terminal. `--once` (or no terminal) prints one plain frame and exits (`--victims`: that view).

use std::{
    collections::BTreeMap,
    io::IsTerminal,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{
    cmd::cli::{TopArgs, TopSort},
    output::promtext,
};

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
    /// Blast radius (absent where the kernel lacks the hooks).
    pub ipis_sent: f64,
    pub ipis_received: f64,
    pub stolen_seconds: f64,
    pub stolen_ratio: f64,
    pub victim_over: bool,
    /// Its top flushers over its last window: (flusher VM, seconds).
    pub hurt_by: Vec<(String, f64)>,
}

#[derive(Debug, Default)]
pub struct Frame {
    pub rows: Vec<Row>,
    pub mechanism: String,
    pub cost_source: String,
    pub hooks_attached: usize,
    pub hooks_total: usize,
    pub dropped: f64,
    /// The agent exports blast-radius series (the kernel has the hooks).
    pub blast: bool,
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
                    "ioasid_wbinvd_ipis_sent_total" => r.ipis_sent = s.value,
                    "ioasid_wbinvd_ipis_received_total" => r.ipis_received = s.value,
                    "ioasid_wbinvd_stolen_seconds_total" => r.stolen_seconds = s.value,
                    "ioasid_wbinvd_victim_stolen_ratio" => r.stolen_ratio = s.value,
                    "ioasid_wbinvd_victim_over_budget" => r.victim_over = s.value == 1.0,
                    "ioasid_wbinvd_victim_flusher_seconds" => {
                        if let Some(f) = s.labels.get("flusher") {
                            r.hurt_by.push((f.clone(), s.value));
                        }
                    }
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
    f.blast = text.lines().any(|l| l.starts_with("ioasid_wbinvd_ipis_"));
    for r in rows.values_mut() {
        r.hurt_by.sort_by(|a, b| b.1.total_cmp(&a.1));
    }
    f.rows = rows.into_values().collect();
    arrange(&mut f, TopSort::Rate, "");
    f
}

/// The victims view's columns: VM, IPIS SENT, IPIS RECV, STOLEN, STOLEN%, BUDGET, HURT BY.
fn victim_cells(r: &Row) -> [String; 7] {
    let hurt_by: Vec<String> =
        r.hurt_by.iter().map(|(f, s)| format!("{} {:.2}ms", crate::util::text::escape(f), s * 1e3)).collect();
    [
        crate::util::text::escape(&r.vm).into_owned(),
        format!("{:.0}", r.ipis_sent),
        format!("{:.0}", r.ipis_received),
        format!("{:.3}s", r.stolen_seconds),
        format!("{:.2}%", r.stolen_ratio * 100.0),
        if r.victim_over { "OVER".into() } else { "ok".into() },
        hurt_by.join(", "),
    ]
}

/// The victims view, most stolen time first.
fn render_victims(f: &Frame, width: usize) -> String {
    let mut out = String::new();
    if !f.blast {
        out.push_str("victims view: the agent measures no blast radius on this host (its kernel lacks the hooks; see `ioasid-agent status`)\n");
        return out;
    }
    out.push_str(&format!(
        "{:<24} {:>10} {:>10} {:>10} {:>8} {:<6} {}\n",
        "VM", "IPIS SENT", "IPIS RECV", "STOLEN", "STOLEN%", "BUDGET", "HURT BY (last window)"
    ));
    let mut rows: Vec<&Row> = f.rows.iter().collect();
    rows.sort_by(|a, b| b.stolen_seconds.total_cmp(&a.stolen_seconds).then(a.vm.cmp(&b.vm)));
    for r in rows {
        let [mut vm, sent, recv, stolen, share, budget, hurt] = victim_cells(r);
        if vm.chars().count() > 24 {
            vm = vm.chars().take(23).collect::<String>() + "~";
        }
        let line = format!("{vm:<24} {sent:>10} {recv:>10} {stolen:>10} {share:>8} {budget:<6} {hurt}");
        out.push_str(&line.chars().take(width.max(40)).collect::<String>());
        out.push('\n');
    }
    out
}

/// Keeps the VMs whose name contains `filter` (any case), sorted by `sort`: storming VMs first
/// for the rate and cost orders, then the largest.
pub fn arrange(f: &mut Frame, sort: TopSort, filter: &str) {
    let filter = filter.to_lowercase();
    f.rows.retain(|r| filter.is_empty() || r.vm.to_lowercase().contains(&filter));
    f.rows.sort_by(|a, b| {
        let by = match sort {
            TopSort::Rate => b.storm.cmp(&a.storm).then(b.rate.total_cmp(&a.rate)),
            TopSort::Cost => b.storm.cmp(&a.storm).then(b.cost_ratio.total_cmp(&a.cost_ratio)),
            TopSort::Wbinvd => b.wbinvd.total_cmp(&a.wbinvd),
            TopSort::Name => std::cmp::Ordering::Equal,
        };
        by.then(a.vm.cmp(&b.vm))
    });
}

/// One VM's columns, as text: VM, WBINVD/s, WBINVD, INVD, HANDLER, COST%, FLUSHES, ALERTS,
/// STATE, DMA, ENABLES a/u/d. A VM name is chosen by whoever starts the VMM: escaped, so no
/// control character or escape sequence reaches the operator's terminal.
fn cells(r: &Row) -> [String; 11] {
    let avg_us = if r.handler_count > 0.0 { r.handler_sum / r.handler_count * 1e6 } else { 0.0 };
    [
        crate::util::text::escape(&r.vm).into_owned(),
        format!("{:.0}", r.rate),
        format!("{:.0}", r.wbinvd),
        format!("{:.0}", r.invd),
        format!("{avg_us:.1}us"),
        format!("{:.2}%", r.cost_ratio * 100.0),
        format!("{:.0}", r.flushes),
        format!("{:.0}", r.alerts),
        if r.storm { "STORM".into() } else { "ok".into() },
        if r.noncoherent { "non-coherent".into() } else { "coherent".into() },
        format!("{:.0}/{:.0}/{:.0}", r.dma_allowed, r.dma_audited, r.dma_denied),
    ]
}

/// The first line of every frame: the agent, the time, its hooks, mechanism and drops.
fn title(f: &Frame, url: &str) -> String {
    let now = crate::util::time::rfc3339(std::time::SystemTime::now());
    format!(
        "ioasid top  {url}  {}  hooks {}/{}  enforcement {}  cost source {}  dropped {}",
        &now[..19],
        f.hooks_attached,
        f.hooks_total,
        f.mechanism,
        f.cost_source,
        f.dropped
    )
}

fn render(f: &Frame, url: &str, width: usize) -> String {
    let mut out = title(f, url);
    out.push('\n');
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
        let [mut vm, rate, wbinvd, invd, handler, cost, flushes, alerts, state, dma, enables] = cells(r);
        if vm.chars().count() > 24 {
            vm = vm.chars().take(23).collect::<String>() + "~";
        }
        let line = format!(
            "{vm:<24} {rate:>10} {wbinvd:>12} {invd:>8} {handler:>10} {cost:>8} {flushes:>9} {alerts:>6} {state:<7} {dma:<13} {enables}"
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

pub fn run(args: &TopArgs) -> Result<()> {
    let addr =
        args.url.trim_start_matches("http://").trim_end_matches('/').trim_end_matches("/metrics").to_string();
    let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    if args.once || !interactive {
        let mut f = frame(&scrape(&addr)?);
        arrange(&mut f, args.sort, args.filter.as_deref().unwrap_or(""));
        if args.victims {
            print!("{}", render_victims(&f, usize::MAX));
        } else {
            print!("{}", render(&f, &addr, usize::MAX));
        }
        return Ok(());
    }
    let mut ui = Ui {
        sort: args.sort,
        filter: args.filter.clone().unwrap_or_default(),
        editing: false,
        victims: args.victims,
    };
    // ratatui::init: raw mode and the alternate screen, restored on exit and on panic.
    let mut terminal = ratatui::init();
    let result = ui.run(&mut terminal, &addr, args.interval);
    ratatui::restore();
    result
}

struct Ui {
    sort: TopSort,
    filter: String,
    /// Typing a filter after `/`.
    editing: bool,
    /// The victims view (`v`).
    victims: bool,
}

impl Ui {
    fn run(&mut self, terminal: &mut ratatui::DefaultTerminal, addr: &str, interval: Duration) -> Result<()> {
        use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
        let mut last: Result<Frame, anyhow::Error> = Err(anyhow::anyhow!("connecting"));
        let mut next_scrape = Instant::now();
        loop {
            if Instant::now() >= next_scrape {
                last = scrape(addr).map(|b| frame(&b));
                next_scrape = Instant::now() + interval;
            }
            terminal.draw(|fr| self.draw(fr, addr, &last))?;
            let wait = next_scrape.saturating_duration_since(Instant::now());
            if !event::poll(wait)? {
                continue;
            }
            let Event::Key(key) = event::read()? else { continue };
            if key.kind != KeyEventKind::Press {
                continue;
            }
            let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
            if ctrl_c {
                return Ok(());
            }
            if self.editing {
                match key.code {
                    KeyCode::Enter => self.editing = false,
                    KeyCode::Esc => {
                        self.editing = false;
                        self.filter.clear();
                    }
                    KeyCode::Backspace => {
                        self.filter.pop();
                    }
                    KeyCode::Char(c) if !c.is_control() && self.filter.len() < 64 => self.filter.push(c),
                    _ => {}
                }
                continue;
            }
            match key.code {
                KeyCode::Char('q' | 'Q') => return Ok(()),
                KeyCode::Char('s') => self.sort = self.sort.next(),
                KeyCode::Char('v') => self.victims = !self.victims,
                KeyCode::Char('/') => self.editing = true,
                KeyCode::Esc => self.filter.clear(),
                _ => {}
            }
        }
    }

    /// The VMs, one row each, storms in red, the sort column underlined.
    fn table(&self, shown: &Frame) -> ratatui::widgets::Table<'static> {
        use ratatui::{
            layout::Constraint,
            style::{Modifier, Style, Stylize},
            widgets::{Block, Cell, Row as TRow, Table},
        };
        let sorted = |label: &'static str, key: TopSort| -> Cell<'static> {
            if key == self.sort {
                Cell::from(format!("{label}v")).add_modifier(Modifier::UNDERLINED)
            } else {
                Cell::from(label)
            }
        };
        let header = TRow::new(vec![
            sorted("VM", TopSort::Name),
            sorted("WBINVD/s", TopSort::Rate),
            sorted("WBINVD", TopSort::Wbinvd),
            Cell::from("INVD"),
            Cell::from("HANDLER"),
            sorted("COST%", TopSort::Cost),
            Cell::from("FLUSHES"),
            Cell::from("ALERTS"),
            Cell::from("STATE"),
            Cell::from("DMA"),
            Cell::from("ENABLES a/u/d"),
        ])
        .style(Style::new().reversed());
        let rows: Vec<TRow<'static>> = shown
            .rows
            .iter()
            .map(|r| {
                let row = TRow::new(cells(r));
                if r.storm {
                    row.red().bold()
                } else {
                    row
                }
            })
            .collect();
        let widths = [
            Constraint::Min(24),
            Constraint::Length(10),
            Constraint::Length(12),
            Constraint::Length(8),
            Constraint::Length(10),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(6),
            Constraint::Length(6),
            Constraint::Length(12),
            Constraint::Length(13),
        ];
        let title = if shown.rows.is_empty() { " no VMs " } else { " VMs " };
        Table::new(rows, widths).header(header).block(Block::bordered().title(title))
    }

    fn draw(&self, fr: &mut ratatui::Frame, addr: &str, last: &Result<Frame, anyhow::Error>) {
        use ratatui::{
            layout::{Constraint, Layout},
            style::Stylize,
            text::Line,
            widgets::{Block, Paragraph},
        };
        let [head, body, foot] =
            Layout::vertical([Constraint::Length(1), Constraint::Min(3), Constraint::Length(1)])
                .areas(fr.area());
        let f = match last {
            Ok(f) => f,
            Err(e) => {
                fr.render_widget(Paragraph::new(format!("ioasid top {addr}: {e:#} (retrying)")), head);
                return;
            }
        };
        fr.render_widget(Paragraph::new(title(f, addr)).bold(), head);
        let mut shown = Frame { rows: f.rows.clone(), blast: f.blast, ..Frame::default() };
        arrange(&mut shown, self.sort, &self.filter);
        if self.victims {
            let text = render_victims(&shown, body.width as usize);
            fr.render_widget(
                Paragraph::new(text).block(Block::bordered().title(" victims of WBINVD flushes ")),
                body,
            );
            fr.render_widget(Paragraph::new(Line::from("v: back  /: filter  q or Ctrl-C: quit")), foot);
            return;
        }
        fr.render_widget(self.table(&shown), body);
        let filter = if self.editing {
            format!("filter: {}_  (Enter keeps it, Esc clears it)", self.filter)
        } else if self.filter.is_empty() {
            "s: sort  /: filter  v: victims  q or Ctrl-C: quit".to_string()
        } else {
            format!("filter: {}  s: sort  /: filter  Esc: clear  q: quit", self.filter)
        };
        fr.render_widget(Paragraph::new(Line::from(format!("sort: {}  {filter}", self.sort.label()))), foot);
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

    #[test]
    fn sort_and_filter() {
        let row = |vm: &str, rate: f64, cost: f64, wb: f64, storm: bool| Row {
            vm: vm.into(),
            rate,
            cost_ratio: cost,
            wbinvd: wb,
            storm,
            ..Row::default()
        };
        let rows = vec![
            row("b-gpu", 10.0, 0.5, 900.0, false),
            row("a-web", 500.0, 0.01, 5.0, false),
            row("c-loop", 1.0, 0.02, 50.0, true),
        ];
        let order = |sort, filter: &str| {
            let mut f = Frame { rows: rows.clone(), ..Frame::default() };
            arrange(&mut f, sort, filter);
            f.rows.iter().map(|r| r.vm.clone()).collect::<Vec<_>>()
        };
        assert_eq!(order(TopSort::Rate, ""), ["c-loop", "a-web", "b-gpu"], "storms first, then the rate");
        assert_eq!(order(TopSort::Cost, ""), ["c-loop", "b-gpu", "a-web"]);
        assert_eq!(order(TopSort::Wbinvd, ""), ["b-gpu", "c-loop", "a-web"]);
        assert_eq!(order(TopSort::Name, ""), ["a-web", "b-gpu", "c-loop"]);
        assert_eq!(order(TopSort::Name, "GPU"), ["b-gpu"], "any case");
        assert!(order(TopSort::Rate, "nothing").is_empty());
        assert_eq!(TopSort::Name.next(), TopSort::Rate);
    }

    #[test]
    fn victims_view() {
        let text = "ioasid_wbinvd_ipis_sent_total{vm=\"gpu\"} 40\n\
                    ioasid_wbinvd_ipis_received_total{vm=\"db\"} 30\n\
                    ioasid_wbinvd_stolen_seconds_total{vm=\"db\"} 0.25\n\
                    ioasid_wbinvd_victim_stolen_ratio{vm=\"db\"} 0.02\n\
                    ioasid_wbinvd_victim_over_budget{vm=\"db\"} 1\n\
                    ioasid_wbinvd_victim_flusher_seconds{vm=\"db\",flusher=\"other\"} 0.001\n\
                    ioasid_wbinvd_victim_flusher_seconds{vm=\"db\",flusher=\"gpu\"} 0.012\n\
                    ioasid_wbinvd_ipis_received_total{vm=\"host\"} 2\n";
        let f = frame(text);
        assert!(f.blast);
        let out = render_victims(&f, usize::MAX);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[1].starts_with("db ") && lines[1].contains("OVER"), "{out}");
        assert!(lines[1].contains("gpu 12.00ms, other 1.00ms"), "most first: {out}");
        assert!(lines.iter().any(|l| l.starts_with("gpu ") && l.contains(" 40 ")), "{out}");
        let none = render_victims(&frame("ioasid_wbinvd_rate{vm=\"a\"} 1\n"), 80);
        assert!(none.contains("lacks the hooks"), "{none}");
    }
}
