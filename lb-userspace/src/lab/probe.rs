//! `lb lab probe`: one request to an address, the way an application in a
//! pod makes it, reporting what the socket API showed: the answer (the
//! echo server's pod name), the peer the socket says it talks to
//! (`getpeername`, or a datagram's source from `recvfrom`), and the client
//! address the server saw. Run inside a pod (`lb lab exec`), it shows
//! socket LB at work: the peer is the Service's address, the answer a pod's.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{bail, Context, Result};

/// How the probe talks to the address.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ProbeMode {
    /// TCP connect, then an HTTP GET.
    Tcp,
    /// An unconnected UDP socket: sendto, then recvfrom.
    Udp,
    /// A connected UDP socket: connect, send, recv.
    UdpConnected,
    /// One connected UDP socket kept open: a request on it for each line
    /// read from stdin, each result (or `error=`) printed on its own line.
    UdpSession,
}

/// What the probe saw.
#[derive(Debug, PartialEq, Eq)]
pub struct ProbeResult {
    pub answer: String,
    pub peer: SocketAddr,
    /// The client as the server saw it (TCP only: the echo server's header).
    pub client: Option<String>,
}

impl std::fmt::Display for ProbeResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "answer={} peer={}", self.answer, self.peer)?;
        if let Some(c) = &self.client {
            write!(f, " client={c}")?;
        }
        Ok(())
    }
}

/// Parses a line `Display` wrote.
pub fn parse(line: &str) -> Result<ProbeResult> {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
    };
    Ok(ProbeResult {
        answer: field("answer").context("no answer=")?.to_string(),
        peer: field("peer").context("no peer=")?.parse()?,
        client: field("client").map(str::to_string),
    })
}

pub(super) fn retry_eintr<T>(mut call: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

pub fn run(mode: ProbeMode, addr: SocketAddr, timeout: Duration) -> Result<ProbeResult> {
    match mode {
        ProbeMode::Tcp => tcp(addr, timeout),
        ProbeMode::Udp => udp(addr, timeout, false),
        ProbeMode::UdpConnected => udp(addr, timeout, true),
        ProbeMode::UdpSession => udp_session(addr, timeout),
    }
}

/// `ProbeMode::UdpSession`: the result of the last request.
fn udp_session(addr: SocketAddr, timeout: Duration) -> Result<ProbeResult> {
    let s = udp_socket(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.connect(addr)?;
    let mut last = None;
    let mut out = std::io::stdout();
    for line in std::io::stdin().lines() {
        line?;
        let mut buf = [0u8; 512];
        let asked =
            retry_eintr(|| s.send(b"ping\n")).and_then(|_| retry_eintr(|| s.recv(&mut buf)));
        match asked {
            Ok(n) => {
                let seen = ProbeResult {
                    answer: String::from_utf8_lossy(&buf[..n]).trim().to_string(),
                    peer: s.peer_addr()?,
                    client: None,
                };
                writeln!(out, "{seen}")?;
                last = Some(seen);
            }
            Err(e) => writeln!(
                out,
                "error={:?} os={}",
                e.kind(),
                e.raw_os_error().unwrap_or(0)
            )?,
        }
        out.flush()?;
    }
    last.context("no request was answered")
}

fn tcp(addr: SocketAddr, timeout: Duration) -> Result<ProbeResult> {
    let mut s = retry_eintr(|| TcpStream::connect_timeout(&addr, timeout))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    let peer = s.peer_addr()?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut reader = BufReader::new(s);
    let mut client = None;
    let mut line = String::new();
    loop {
        line.clear();
        if retry_eintr(|| reader.read_line(&mut line))? == 0 {
            bail!("{addr} closed before its answer");
        }
        if let Some(c) = line.trim_end().strip_prefix("X-Client-Addr: ") {
            client = Some(c.to_string());
        }
        if line == "\r\n" {
            break;
        }
    }
    line.clear();
    retry_eintr(|| reader.read_line(&mut line))?;
    Ok(ProbeResult {
        answer: line.trim().to_string(),
        peer,
        client,
    })
}

/// A UDP socket of `addr`'s family (an IPv6 one for a v4-mapped address).
fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    if addr.is_ipv6() {
        UdpSocket::bind(("::", 0))
    } else {
        UdpSocket::bind(("0.0.0.0", 0))
    }
}

fn udp(addr: SocketAddr, timeout: Duration, connected: bool) -> Result<ProbeResult> {
    let s = udp_socket(addr)?;
    s.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 512];
    let (n, peer) = if connected {
        s.connect(addr)?;
        retry_eintr(|| s.send(b"ping\n"))?;
        let n =
            retry_eintr(|| s.recv(&mut buf)).with_context(|| format!("no answer from {addr}"))?;
        (n, s.peer_addr()?)
    } else {
        retry_eintr(|| s.send_to(b"ping\n", addr))?;
        retry_eintr(|| s.recv_from(&mut buf)).with_context(|| format!("no answer from {addr}"))?
    };
    Ok(ProbeResult {
        answer: String::from_utf8_lossy(&buf[..n]).trim().to_string(),
        peer,
        client: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_reads_back_from_its_line() {
        let r = ProbeResult {
            answer: "web-1".into(),
            peer: "10.96.0.10:80".parse().unwrap(),
            client: Some("10.244.1.5:40000".into()),
        };
        assert_eq!(parse(&r.to_string()).unwrap(), r);
        let udp = ProbeResult { client: None, ..r };
        assert_eq!(parse(&udp.to_string()).unwrap(), udp);
    }
}
