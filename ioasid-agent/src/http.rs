//! The Prometheus endpoint: a deliberately small HTTP/1.1 server (GET /metrics, /healthz,
//! /readyz). Each scrape first asks the actor to sweep the kernel counters, so values are fresh.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, Semaphore},
};

use crate::telemetry::Metrics;

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
    crate::sys::monotonic_ns() / 1_000_000
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
                let actor = actor.clone();
                let metrics = metrics.clone();
                let health = Arc::clone(&health);
                tokio::spawn(async move {
                    match tokio::time::timeout(CONNECTION_DEADLINE, handle(sock, actor, metrics, &health))
                        .await
                    {
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

/// Parses the request line of a complete request head: (method, path).
pub fn parse_request(head: &[u8]) -> Option<(&str, &str)> {
    let head = std::str::from_utf8(head).ok()?;
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return None;
    }
    Some((method, target.split('?').next().unwrap_or(target)))
}

async fn handle(
    mut sock: TcpStream,
    actor: mpsc::Sender<Refresh>,
    metrics: Metrics,
    health: &Health,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        loop {
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok::<bool, std::io::Error>(true);
            }
            if buf.len() > MAX_REQUEST {
                return Ok(false);
            }
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(false);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let complete = match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(r) => r?,
        Err(_) => false,
    };
    let (status, ctype, body): (&str, &str, Vec<u8>) = match complete.then(|| parse_request(&buf)).flatten() {
        None => ("400 Bad Request", "text/plain", b"bad request\n".to_vec()),
        Some(("GET", "/metrics")) => {
            let (tx, rx) = oneshot::channel();
            if actor.send(Refresh(tx)).await.is_ok() {
                let _ = tokio::time::timeout(REFRESH_TIMEOUT, rx).await;
            }
            ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics.encode())
        }
        Some(("GET", "/healthz")) => match health.liveness() {
            None => ("200 OK", "text/plain", b"ok\n".to_vec()),
            Some(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n").into_bytes()),
        },
        Some(("GET", "/readyz")) if health.ready.load(Ordering::Relaxed) => {
            ("200 OK", "text/plain", b"ready\n".to_vec())
        }
        Some(("GET", "/readyz")) => {
            ("503 Service Unavailable", "text/plain", b"not ready: starting or stopping\n".to_vec())
        }
        Some(("GET", "/")) => (
            "200 OK",
            "text/html",
            b"<html><body><h1>ioasid-agent</h1><a href=\"/metrics\">/metrics</a></body></html>\n".to_vec(),
        ),
        Some(("GET", _)) => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
        Some(_) => ("405 Method Not Allowed", "text/plain", b"only GET\n".to_vec()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(&body).await?;
    sock.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Some(("GET", "/metrics")));
        assert_eq!(parse_request(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Some(("GET", "/metrics")));
        assert_eq!(parse_request(b"POST / HTTP/1.1\r\n\r\n"), Some(("POST", "/")));
        assert_eq!(parse_request(b"GET /metrics\r\n\r\n"), None);
        assert_eq!(parse_request(b"GET / SPDY/3\r\n\r\n"), None);
        assert_eq!(parse_request(b"\xff\xfe"), None);
        assert_eq!(parse_request(b""), None);
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
        let mut sock = TcpStream::connect(addr).await?;
        sock.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes()).await?;
        let mut out = String::new();
        sock.read_to_string(&mut out).await?;
        Ok(out)
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
}
