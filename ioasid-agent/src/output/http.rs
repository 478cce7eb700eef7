//! The Prometheus endpoint, on hyper's HTTP/1 server: GET /metrics (the text format, or
//! OpenMetrics when the scraper asks for it; gzip when it accepts it), /healthz, /readyz. Each
//! scrape first asks the actor to sweep the kernel counters (at most one sweep for a burst of
//! scrapes), so values are fresh. Anyone who can reach the port may connect: connections are
//! bounded in number, per peer and in life, an idle one is cut after 2 s, and when the table is
//! full a newcomer takes the place of the oldest connection of the peer holding the most, so
//! idle or flooding clients never starve the probes. Rendering runs on a blocking thread, once
//! per sweep and format however many scrape, never on the event loop's threads.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::output::telemetry::Metrics;

/// A scrape's request to the actor: sweep the kernel counters now, then answer.
pub struct Refresh(pub oneshot::Sender<()>);

const MAX_REQUEST: usize = 8192;
/// A request's head must arrive within this; a kept-alive connection idle this long is cut.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once. Anyone who can reach the port may connect, so their number
/// (each holds an fd) and their life are bounded.
pub const MAX_CONNECTIONS: usize = 32;
/// Connections of one peer address at once: its next one replaces its oldest.
pub const MAX_PER_PEER: usize = 8;
/// A connection's whole life, writing included (a client that never reads is cut off).
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

/// What the probes answer from. Liveness (`/healthz`): the event loop has swept recently and
/// the ring buffer reader runs. Readiness (`/readyz`): every required hook is attached, the
/// VMMs that ran before are classified and open asks decided; false again while stopping.
#[derive(Debug)]
pub struct Health {
    /// CLOCK_MONOTONIC ms of the event loop's last sweep.
    beat_ms: AtomicU64,
    /// Sweeps so far: what a rendered exposition is current to.
    sweeps: AtomicU64,
    ring_alive: AtomicBool,
    ready: AtomicBool,
    /// The event loop is stalled when it has not swept for this long.
    stall_ms: u64,
}

impl Health {
    pub fn new(sweep: Duration) -> Arc<Self> {
        let stall_ms = (sweep.as_millis() as u64 * 20).max(5_000);
        Arc::new(Self {
            beat_ms: AtomicU64::new(now_ms()),
            sweeps: AtomicU64::new(0),
            ring_alive: AtomicBool::new(true),
            ready: AtomicBool::new(false),
            stall_ms,
        })
    }

    /// The event loop swept.
    pub fn beat(&self) {
        self.beat_ms.store(now_ms(), Ordering::Relaxed);
        self.sweeps.fetch_add(1, Ordering::Release);
    }

    pub fn ring_stopped(&self) {
        self.ring_alive.store(false, Ordering::Relaxed);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// None when alive, else why not.
    pub fn liveness(&self) -> Option<String> {
        if !self.ring_alive.load(Ordering::Relaxed) {
            return Some("the ring buffer reader stopped: no kernel events are read".into());
        }
        let age = now_ms().saturating_sub(self.beat_ms.load(Ordering::Relaxed));
        (age > self.stall_ms).then(|| format!("the event loop has not swept for {age} ms"))
    }
}

fn now_ms() -> u64 {
    crate::host::sys::monotonic_ns() / 1_000_000
}

/// The live connections: each one's peer and how to cut it, oldest first (ids only grow).
#[derive(Default)]
struct Table {
    next: u64,
    live: BTreeMap<u64, (IpAddr, oneshot::Sender<()>)>,
}

impl Table {
    /// Admits a connection from `peer`, cutting the one it replaces if the peer or the table
    /// is full: the peer's own oldest, else the oldest of the peer holding the most. A flood
    /// from a few addresses thus only ever displaces itself, and a newcomer (a probe, a
    /// scraper) is always let in.
    fn admit(&mut self, peer: IpAddr) -> (u64, oneshot::Receiver<()>, Option<IpAddr>) {
        let count = |ip: IpAddr| self.live.values().filter(|(p, _)| *p == ip).count();
        let victim_peer = if count(peer) >= MAX_PER_PEER {
            Some(peer)
        } else if self.live.len() >= MAX_CONNECTIONS {
            self.live.values().map(|(p, _)| *p).max_by_key(|p| count(*p))
        } else {
            None
        };
        if let Some(v) = victim_peer {
            if let Some(id) = self.live.iter().find(|(_, (p, _))| *p == v).map(|(id, _)| *id) {
                if let Some((_, cut)) = self.live.remove(&id) {
                    let _ = cut.send(());
                }
            }
        }
        let (tx, rx) = oneshot::channel();
        let id = self.next;
        self.next += 1;
        self.live.insert(id, (peer, tx));
        (id, rx, victim_peer)
    }
}

/// Serves `listener`: /metrics (refreshed by `actor`) and the probes, or the probes only when
/// there is no actor (the probe listener).
pub async fn serve(
    listener: TcpListener,
    actor: Option<mpsc::Sender<Refresh>>,
    metrics: Metrics,
    health: Arc<Health>,
) {
    let table = Arc::new(Mutex::new(Table::default()));
    let renders = Arc::new(tokio::sync::Mutex::new(Rendered::default()));
    let mut displacing = false;
    loop {
        match listener.accept().await {
            Ok((sock, peer)) => {
                let (id, cut, displaced) = table.lock().unwrap_or_else(|e| e.into_inner()).admit(peer.ip());
                match displaced {
                    Some(from) if !displacing => {
                        tracing::warn!(%peer, displaced = %from, limit = MAX_CONNECTIONS, per_peer = MAX_PER_PEER, "HTTP connections at the limit: the oldest of the busiest peer is cut for each new one");
                        displacing = true;
                    }
                    Some(_) => {}
                    None => displacing = false,
                }
                let (actor, metrics, health, renders, table) = (
                    actor.clone(),
                    metrics.clone(),
                    Arc::clone(&health),
                    Arc::clone(&renders),
                    Arc::clone(&table),
                );
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (actor, metrics, health, renders) =
                            (actor.clone(), metrics.clone(), Arc::clone(&health), Arc::clone(&renders));
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                answer(req, actor, metrics, &health, &renders).await,
                            )
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(READ_TIMEOUT)
                        .max_buf_size(MAX_REQUEST)
                        .keep_alive(true)
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), service);
                    tokio::select! {
                        r = tokio::time::timeout(CONNECTION_DEADLINE, conn) => match r {
                            Ok(Err(e)) => tracing::debug!(error = %e, "HTTP connection"),
                            Err(_) => tracing::debug!("HTTP connection cut off at its deadline"),
                            Ok(Ok(())) => {}
                        },
                        _ = cut => tracing::debug!(%peer, "HTTP connection cut for a newer one"),
                    }
                    table.lock().unwrap_or_else(|e| e.into_inner()).live.remove(&id);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The exposition as last rendered, per format (text or OpenMetrics, plain or gzip), and the
/// sweep it is current to: every scrape after the same sweep gets the same bytes.
#[derive(Default)]
struct Rendered {
    sweep: u64,
    bodies: [Option<hyper::body::Bytes>; 4],
}

type Body = http_body_util::Full<hyper::body::Bytes>;

fn reply(
    status: hyper::StatusCode,
    ctype: &str,
    body: impl Into<hyper::body::Bytes>,
) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(Body::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// True when the request's `name` header lists `token` (comma-separated, parameters ignored)
/// with a q-value above 0.
fn accepts(
    req: &hyper::Request<hyper::body::Incoming>,
    name: hyper::header::HeaderName,
    token: &str,
) -> bool {
    req.headers().get_all(name).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(
        |item| {
            let mut parts = item.split(';').map(str::trim);
            let first = parts.next().unwrap_or("");
            let zero =
                parts.any(|p| p.strip_prefix("q=").is_some_and(|q| q.parse::<f32>().is_ok_and(|q| q <= 0.0)));
            first.eq_ignore_ascii_case(token) && !zero
        },
    )
}

const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS_FORMAT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    actor: Option<mpsc::Sender<Refresh>>,
    metrics: Metrics,
    health: &Health,
    renders: &tokio::sync::Mutex<Rendered>,
) -> hyper::Response<Body> {
    use hyper::{Method, StatusCode};
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", b"only GET\n".to_vec());
    }
    match req.uri().path() {
        "/metrics" => match actor {
            Some(actor) => scrape(&req, actor, metrics, health, renders).await,
            None => {
                reply(StatusCode::NOT_FOUND, "text/plain", &b"this listener answers the probes only\n"[..])
            }
        },
        "/healthz" => match health.liveness() {
            None => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            Some(why) => {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{why}\n").into_bytes())
            }
        },
        "/readyz" if health.ready.load(Ordering::Relaxed) => {
            reply(StatusCode::OK, "text/plain", b"ready\n".to_vec())
        }
        "/readyz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            b"not ready: starting or stopping\n".to_vec(),
        ),
        "/" => reply(
            StatusCode::OK,
            "text/html",
            b"<html><body><h1>ioasid-agent</h1><a href=\"/metrics\">/metrics</a></body></html>\n".to_vec(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
    }
}

/// `/metrics`: fresh counters if the actor answers in time (a stalled actor delays no scrape past
/// REFRESH_TIMEOUT; the values are then those of its last sweep), in the format the scraper
/// asks for, gzip-compressed when it accepts that. Rendered on a blocking thread, once per sweep
/// and format.
async fn scrape(
    req: &hyper::Request<hyper::body::Incoming>,
    actor: mpsc::Sender<Refresh>,
    metrics: Metrics,
    health: &Health,
    renders: &tokio::sync::Mutex<Rendered>,
) -> hyper::Response<Body> {
    use hyper::StatusCode;
    let (tx, rx) = oneshot::channel();
    let refresh = async {
        if actor.send(Refresh(tx)).await.is_ok() {
            let _ = rx.await;
        }
    };
    let _ = tokio::time::timeout(REFRESH_TIMEOUT, refresh).await;
    let openmetrics = accepts(req, hyper::header::ACCEPT, "application/openmetrics-text");
    let gzip = accepts(req, hyper::header::ACCEPT_ENCODING, "gzip");
    let slot = usize::from(openmetrics) * 2 + usize::from(gzip);
    let body = {
        let mut r = renders.lock().await;
        let sweep = health.sweeps.load(Ordering::Acquire);
        if r.sweep != sweep {
            *r = Rendered { sweep, ..Rendered::default() };
        }
        match &r.bodies[slot] {
            Some(b) => b.clone(),
            None => {
                let rendered = tokio::task::spawn_blocking(move || render(&metrics, openmetrics, gzip)).await;
                let Ok(b) = rendered else {
                    return reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        b"rendering failed\n".to_vec(),
                    );
                };
                let b = hyper::body::Bytes::from(b);
                r.bodies[slot] = Some(b.clone());
                b
            }
        }
    };
    let ctype = if openmetrics { OPENMETRICS_FORMAT } else { TEXT_FORMAT };
    let mut r = reply(StatusCode::OK, ctype, body);
    if gzip {
        r.headers_mut()
            .insert(hyper::header::CONTENT_ENCODING, hyper::header::HeaderValue::from_static("gzip"));
    }
    r
}

/// The exposition in one format, gzip-compressed if asked.
fn render(metrics: &Metrics, openmetrics: bool, gzip: bool) -> Vec<u8> {
    let text = metrics.encode();
    let body = if openmetrics { to_openmetrics(&text) } else { text };
    if !gzip {
        return body;
    }
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    match gz.write_all(&body).and_then(|()| gz.finish()) {
        Ok(zipped) => zipped,
        // Writing into a Vec does not fail; were it to, an empty gzip stream is still valid.
        Err(_) => flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast())
            .finish()
            .unwrap_or_default(),
    }
}

/// The Prometheus text format (0.0.4) as OpenMetrics 1.0.0: a counter family is named without
/// its `_total` suffix (its samples keep it), `"` is escaped in HELP, and the exposition ends
/// with `# EOF`. Everything else (gauges, histograms, labels, values) reads the same.
pub fn to_openmetrics(text: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(text);
    let counters: std::collections::HashSet<&str> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let family = |name: &str| -> String {
        if counters.contains(name) {
            name.strip_suffix("_total").unwrap_or(name).to_string()
        } else {
            name.to_string()
        }
    };
    let mut out = String::with_capacity(text.len() + 16);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {}\n", family(name), help.replace('"', "\\\"")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let kind = if kind == "untyped" { "unknown" } else { kind };
            out.push_str(&format!("# TYPE {} {kind}\n", family(name)));
        } else if line.is_empty() {
            continue;
        } else {
            // A counter sample without the suffix gets it (all of ioasid's have it already).
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..name_end];
            if counters.contains(name) && !name.ends_with("_total") {
                out.push_str(name);
                out.push_str("_total");
                out.push_str(&line[name_end..]);
            } else {
                out.push_str(line);
            }
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_from_the_text_format() {
        let text = b"# HELP ioasid_x_total Things \"counted\".\n# TYPE ioasid_x_total counter\nioasid_x_total{vm=\"a\"} 3\n\
# HELP ioasid_g A gauge.\n# TYPE ioasid_g gauge\nioasid_g 1\n# HELP odd A counter without the suffix.\n# TYPE odd counter\nodd 2\n";
        let om = String::from_utf8(to_openmetrics(text)).unwrap();
        assert_eq!(
            om,
            "# HELP ioasid_x Things \\\"counted\\\".\n# TYPE ioasid_x counter\nioasid_x_total{vm=\"a\"} 3\n\
# HELP ioasid_g A gauge.\n# TYPE ioasid_g gauge\nioasid_g 1\n# HELP odd A counter without the suffix.\n# TYPE odd counter\nodd_total 2\n# EOF\n"
        );
    }

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    async fn get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
        get_with(addr, path, "").await
    }

    async fn get_with(addr: std::net::SocketAddr, path: &str, headers: &str) -> std::io::Result<String> {
        get_from_with([127, 0, 0, 1], addr, path, headers).await
    }

    async fn get_from(from: [u8; 4], addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
        get_from_with(from, addr, path, "").await
    }

    /// A GET from the loopback address `from` (any of 127.0.0.0/8 is local on Linux).
    async fn get_from_with(
        from: [u8; 4],
        addr: std::net::SocketAddr,
        path: &str,
        headers: &str,
    ) -> std::io::Result<String> {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind(std::net::SocketAddr::from((from, 0)))?;
        let mut sock = s.connect(addr).await?;
        sock.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n").as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        sock.read_to_end(&mut out).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Slowloris: 48 idle connections held open and reopened as they are cut leave every probe
    /// answered (50 of 50), and the server never holds more than its per-peer share of them.
    #[tokio::test]
    async fn idle_connections_never_starve_the_probes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, _rx) = mpsc::channel(1);
        tokio::spawn(serve(listener, Some(tx), Metrics::new(), Health::new(Duration::from_millis(100))));
        let stop = Arc::new(AtomicBool::new(false));
        let mut attackers = Vec::new();
        for _ in 0..48 {
            let stop = Arc::clone(&stop);
            attackers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    // Connect, send half a request head, wait to be cut, reconnect.
                    let Ok(mut sock) = TcpStream::connect(addr).await else { continue };
                    let _ = sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await;
                    let mut buf = [0u8; 64];
                    let _ = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The kubelet probes from another address than the attackers' (the node's).
        let mut answered = 0;
        for _ in 0..50 {
            let probe =
                tokio::time::timeout(Duration::from_secs(1), get_from([127, 0, 0, 2], addr, "/healthz"))
                    .await;
            if probe.is_ok_and(|r| r.is_ok_and(|a| a.ends_with("ok\n"))) {
                answered += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        for a in attackers {
            a.abort();
        }
        assert_eq!(answered, 50, "probes answered under a slowloris of 48 connections");
    }

    /// The table admits every newcomer: a full peer displaces its own oldest connection, a full
    /// table the oldest of the peer holding the most; the cut connection is told.
    #[test]
    fn a_newcomer_displaces_the_busiest_peers_oldest() {
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        let mut t = Table::default();
        let mut cuts = Vec::new();
        for _ in 0..MAX_PER_PEER {
            let (_, cut, displaced) = t.admit(ip(1));
            assert_eq!(displaced, None);
            cuts.push(cut);
        }
        let (_, _, displaced) = t.admit(ip(1));
        assert_eq!(displaced, Some(ip(1)));
        assert!(cuts[0].try_recv().is_ok(), "the peer's oldest was cut");
        // Fill the table from other peers: 3 each.
        let mut n = 2;
        while t.live.len() < MAX_CONNECTIONS {
            for _ in 0..3 {
                if t.live.len() < MAX_CONNECTIONS {
                    assert_eq!(t.admit(ip(n)).2, None);
                }
            }
            n += 1;
        }
        // A probe from the node: the busiest peer (10.0.0.1, 8) loses its oldest.
        let (_, _, displaced) = t.admit(ip(200));
        assert_eq!(displaced, Some(ip(1)));
        assert_eq!(t.live.len(), MAX_CONNECTIONS);
        assert!(cuts[1].try_recv().is_ok());
    }

    /// The probe listener answers the probes and nothing else, whatever the main one does.
    #[tokio::test]
    async fn the_probe_listener_answers_only_the_probes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Health::new(Duration::from_millis(100));
        health.set_ready(true);
        tokio::spawn(serve(listener, None, Metrics::new(), health));
        assert!(get(addr, "/healthz").await.unwrap().starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.unwrap().starts_with("HTTP/1.1 200"));
        let m = get(addr, "/metrics").await.unwrap();
        assert!(m.starts_with("HTTP/1.1 404") && m.contains("probes only"), "{m}");
    }

    /// The probes mean something: /healthz fails once the ring reader stopped or the event
    /// loop stalled, /readyz only answers ready once the agent said so.
    #[tokio::test]
    async fn probes_report_the_agent_as_it_is() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let health = Health::new(Duration::from_millis(100));
        tokio::spawn(serve(listener, Some(tx), Metrics::new(), Arc::clone(&health)));
        assert!(get(addr, "/healthz").await.unwrap().starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.unwrap().starts_with("HTTP/1.1 503"));
        health.set_ready(true);
        assert!(get(addr, "/readyz").await.unwrap().starts_with("HTTP/1.1 200"));
        // A loop that has not swept for longer than the stall bound.
        health.beat_ms.store(now_ms() - health.stall_ms - 1, Ordering::Relaxed);
        let answer = get(addr, "/healthz").await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("has not swept"), "{answer}");
        health.beat();
        assert!(get(addr, "/healthz").await.unwrap().starts_with("HTTP/1.1 200"));
        health.ring_stopped();
        let answer = get(addr, "/healthz").await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("ring buffer reader"), "{answer}");
    }

    /// The scraper chooses: OpenMetrics when it asks for it (as Prometheus does by default),
    /// the text format otherwise; gzip when it accepts it. Bad requests get an HTTP error.
    #[tokio::test]
    async fn metrics_are_negotiated() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::channel::<Refresh>(1);
        // The actor's side: every refresh answered at once.
        tokio::spawn(async move {
            while let Some(Refresh(done)) = rx.recv().await {
                let _ = done.send(());
            }
        });
        tokio::spawn(serve(listener, Some(tx), Metrics::new(), Health::new(Duration::from_millis(100))));
        let text = get(addr, "/metrics").await.unwrap();
        assert!(
            text.contains("content-type: text/plain; version=0.0.4") && !text.contains("# EOF"),
            "{text}"
        );
        let prometheus = "Accept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n";
        let om = get_with(addr, "/metrics", prometheus).await.unwrap();
        assert!(
            om.contains("content-type: application/openmetrics-text; version=1.0.0")
                && om.ends_with("# EOF\n"),
            "{om}"
        );
        assert!(om.contains("# TYPE ioasid_events_dropped counter\n"), "{om}");
        let refused =
            get_with(addr, "/metrics", "Accept: application/openmetrics-text;q=0\r\n").await.unwrap();
        assert!(!refused.contains("# EOF"), "q=0 is a refusal");
        let zipped = get_with(addr, "/metrics", "Accept-Encoding: gzip\r\n").await.unwrap_or_default();
        assert!(
            zipped.contains("content-encoding: gzip"),
            "{}",
            zipped.lines().take(6).collect::<Vec<_>>().join("\n")
        );
        let bad = get_with(addr, "/metrics", "Bad Header\r\n").await.unwrap();
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        assert!(get(addr, "/nope").await.unwrap().starts_with("HTTP/1.1 404"));
    }
}
