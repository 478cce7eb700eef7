//! The Prometheus endpoint, on hyper's HTTP/1 server: GET /metrics (the text format, or
//! OpenMetrics when the scraper asks for it; gzip when it accepts it), /healthz, /readyz. Each
//! scrape first asks the actor to sweep the kernel counters, so values are fresh. Anyone who can
//! reach the port may connect: connections are bounded in number and in life.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, Semaphore},
};

use crate::output::telemetry::Metrics;

/// A scrape's request to the actor: sweep the kernel counters now, then answer.
pub struct Refresh(pub oneshot::Sender<()>);

const MAX_REQUEST: usize = 8192;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once; the next one is closed at once. Anyone who can reach the port
/// may connect, so their number (each holds an fd) and their life are bounded.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection's whole life, writing included (a client that never reads is cut off).
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

/// What the probes answer from. Liveness (`/healthz`): the event loop has swept recently and
/// the ring buffer reader runs. Readiness (`/readyz`): every required hook is attached, the
/// VMMs that ran before are classified and open asks decided; false again while stopping.
#[derive(Debug)]
pub struct Health {
    /// CLOCK_MONOTONIC ms of the event loop's last sweep.
    beat_ms: AtomicU64,
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
            ring_alive: AtomicBool::new(true),
            ready: AtomicBool::new(false),
            stall_ms,
        })
    }

    pub fn beat(&self) {
        self.beat_ms.store(now_ms(), Ordering::Relaxed);
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

pub async fn serve(
    listener: TcpListener,
    actor: mpsc::Sender<Refresh>,
    metrics: Metrics,
    health: Arc<Health>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut refusing = false;
    loop {
        match listener.accept().await {
            Ok((sock, peer)) => {
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    if !refusing {
                        tracing::warn!(%peer, limit = MAX_CONNECTIONS, "HTTP connections at the limit: closing new ones");
                    }
                    refusing = true;
                    continue;
                };
                refusing = false;
                let (actor, metrics, health) = (actor.clone(), metrics.clone(), Arc::clone(&health));
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (actor, metrics, health) = (actor.clone(), metrics.clone(), Arc::clone(&health));
                        async move {
                            Ok::<_, std::convert::Infallible>(answer(req, actor, metrics, &health).await)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(READ_TIMEOUT)
                        .max_buf_size(MAX_REQUEST)
                        .keep_alive(true)
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), service);
                    match tokio::time::timeout(CONNECTION_DEADLINE, conn).await {
                        Ok(Err(e)) => tracing::debug!(error = %e, "HTTP connection"),
                        Err(_) => tracing::debug!("HTTP connection cut off at its deadline"),
                        Ok(Ok(())) => {}
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

type Body = http_body_util::Full<hyper::body::Bytes>;

fn reply(status: hyper::StatusCode, ctype: &str, body: Vec<u8>) -> hyper::Response<Body> {
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
    actor: mpsc::Sender<Refresh>,
    metrics: Metrics,
    health: &Health,
) -> hyper::Response<Body> {
    use hyper::{Method, StatusCode};
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", b"only GET\n".to_vec());
    }
    match req.uri().path() {
        "/metrics" => scrape(&req, actor, metrics).await,
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
/// asks for, gzip-compressed when it accepts that.
async fn scrape(
    req: &hyper::Request<hyper::body::Incoming>,
    actor: mpsc::Sender<Refresh>,
    metrics: Metrics,
) -> hyper::Response<Body> {
    use hyper::StatusCode;
    let (tx, rx) = oneshot::channel();
    let refresh = async {
        if actor.send(Refresh(tx)).await.is_ok() {
            let _ = rx.await;
        }
    };
    let _ = tokio::time::timeout(REFRESH_TIMEOUT, refresh).await;
    let text = metrics.encode();
    let openmetrics = accepts(req, hyper::header::ACCEPT, "application/openmetrics-text");
    let (body, ctype) =
        if openmetrics { (to_openmetrics(&text), OPENMETRICS_FORMAT) } else { (text, TEXT_FORMAT) };
    if accepts(req, hyper::header::ACCEPT_ENCODING, "gzip") {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        if let Ok(zipped) = gz.write_all(&body).and_then(|()| gz.finish()) {
            let mut r = reply(StatusCode::OK, ctype, zipped);
            r.headers_mut()
                .insert(hyper::header::CONTENT_ENCODING, hyper::header::HeaderValue::from_static("gzip"));
            return r;
        }
    }
    reply(StatusCode::OK, ctype, body)
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
        let mut sock = TcpStream::connect(addr).await?;
        sock.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n").as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        sock.read_to_end(&mut out).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Idle connections from anyone cannot pile up: past the limit new ones are closed, and a
    /// slot frees as soon as one goes.
    #[tokio::test]
    async fn connections_are_bounded() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, _rx) = mpsc::channel(1);
        tokio::spawn(serve(listener, tx, Metrics::new(), Health::new(Duration::from_millis(100))));
        assert!(get(addr, "/healthz").await.unwrap().ends_with("ok\n"));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Let the server accept them all before the extra one.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let extra = tokio::time::timeout(Duration::from_secs(2), get(addr, "/healthz")).await;
        match extra {
            Ok(Ok(answer)) => assert_eq!(answer, "", "served past the limit"),
            Ok(Err(_)) => {} // reset by the server: refused
            Err(_) => panic!("the extra connection was neither served nor closed"),
        }
        idle.pop();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(get(addr, "/healthz").await.unwrap().ends_with("ok\n"));
    }

    /// The probes mean something: /healthz fails once the ring reader stopped or the event
    /// loop stalled, /readyz only answers ready once the agent said so.
    #[tokio::test]
    async fn probes_report_the_agent_as_it_is() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let health = Health::new(Duration::from_millis(100));
        tokio::spawn(serve(listener, tx, Metrics::new(), Arc::clone(&health)));
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
        tokio::spawn(serve(listener, tx, Metrics::new(), Health::new(Duration::from_millis(100))));
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
