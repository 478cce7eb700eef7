//! The Prometheus endpoint: a deliberately small HTTP/1.1 server (GET /metrics, /healthz).
//! Each scrape first asks the actor to sweep the kernel counters, so values are fresh.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};

use crate::telemetry::Metrics;

/// A scrape's request to the actor: sweep the kernel counters now, then answer.
pub struct Refresh(pub oneshot::Sender<()>);

const MAX_REQUEST: usize = 8192;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn serve(listener: TcpListener, actor: mpsc::Sender<Refresh>, metrics: Metrics) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                let actor = actor.clone();
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(sock, actor, metrics).await {
                        tracing::debug!(error = %e, "HTTP connection");
                    }
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

async fn handle(mut sock: TcpStream, actor: mpsc::Sender<Refresh>, metrics: Metrics) -> std::io::Result<()> {
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
        Some(("GET", "/healthz")) => ("200 OK", "text/plain", b"ok\n".to_vec()),
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
}
