//! `probe`: one GET of a running agent's /healthz or /readyz, for exec probes (Kubernetes) and
//! scripts. Exit 0 when the agent answers 200; else an error naming the status and the reason.

use std::{
    io::{Read, Write},
    net::TcpStream,
};

use anyhow::{bail, Context};

use crate::cmd::cli::{ProbeArgs, ProbeKind};

/// The most of an answer read: the probes' answers are one line.
const MAX_ANSWER: u64 = 4096;

pub fn run(args: &ProbeArgs) -> anyhow::Result<()> {
    let path = match args.what {
        ProbeKind::Live => "/healthz",
        ProbeKind::Ready => "/readyz",
    };
    let mut sock = TcpStream::connect_timeout(&args.addr, args.timeout)
        .with_context(|| format!("connecting to the agent at {}", args.addr))?;
    sock.set_read_timeout(Some(args.timeout))?;
    sock.set_write_timeout(Some(args.timeout))?;
    write!(sock, "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", args.addr)
        .with_context(|| format!("asking {} for {path}", args.addr))?;
    let mut answer = Vec::new();
    sock.take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .with_context(|| format!("reading {path} from {}", args.addr))?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.split_whitespace().nth(1).unwrap_or("none");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim();
    if status == "200" {
        println!("{path}: {body}");
        return Ok(());
    }
    bail!("{path} answered {status}: {}", crate::util::text::escape(body))
}
