//! `lb echo`: the lab's stand-in for an application container. Answers on
//! each TCP and UDP port with the pod's name, so load balancing can be seen:
//! HTTP requests get an HTTP response; other TCP clients get one line per
//! line they send; UDP datagrams get one datagram back.
//!
//! On SIGTERM it keeps serving for a drain period before it exits, as an
//! application with a preStop hook does, so that endpoint removal can reach
//! the data path first.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream, UdpSocket},
    signal::unix::{signal, SignalKind},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(u16),
    Udp(u16),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (proto, port) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected tcp:PORT or udp:PORT"))?;
        let port: u16 = port.parse().map_err(|_| format!("{s:?}: bad port"))?;
        match proto {
            "tcp" => Ok(Listen::Tcp(port)),
            "udp" => Ok(Listen::Udp(port)),
            _ => Err(format!("{s:?}: protocol must be tcp or udp")),
        }
    }
}

pub async fn run(name: String, listen: Vec<Listen>, drain: Duration) -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    for l in &listen {
        let name = name.clone();
        match *l {
            Listen::Tcp(port) => {
                let lis = TcpListener::bind(("0.0.0.0", port))
                    .await
                    .with_context(|| format!("binding tcp:{port}"))?;
                tokio::spawn(async move {
                    while let Ok((stream, _)) = lis.accept().await {
                        tokio::spawn(serve_tcp(stream, name.clone()));
                    }
                });
            }
            Listen::Udp(port) => {
                let sock = UdpSocket::bind(("0.0.0.0", port))
                    .await
                    .with_context(|| format!("binding udp:{port}"))?;
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    let reply = format!("{name}\n");
                    while let Ok((_, peer)) = sock.recv_from(&mut buf).await {
                        let _ = sock.send_to(reply.as_bytes(), peer).await;
                    }
                });
            }
        }
    }
    // What `kubectl logs` of a lab pod shows (the kubelet sends stderr to
    // the pod's log).
    eprintln!("{name}: serving {listen:?}");
    // The kubelet waits for this line before it reports the pod ready.
    println!("ready");
    tokio::select! {
        _ = term.recv() => {
            eprintln!("SIGTERM: draining for {drain:?}");
            tokio::time::sleep(drain).await;
        }
        _ = int.recv() => {}
    }
    Ok(())
}

async fn serve_tcp(stream: TcpStream, name: String) {
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_secs(30), reader.read_line(&mut first)).await
    else {
        return;
    };
    if n == 0 {
        return;
    }
    if ["GET ", "HEAD ", "POST ", "PUT "]
        .iter()
        .any(|m| first.starts_with(m))
    {
        // Read the rest of the request head, then answer and close.
        let mut line = String::new();
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await
        {
            if n == 0 || line == "\r\n" || line == "\n" {
                break;
            }
            line.clear();
        }
        let body = format!("{name}\n");
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Client-Addr: {peer}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = reader.get_mut().write_all(resp.as_bytes()).await;
        let _ = reader.get_mut().shutdown().await;
        return;
    }
    // Line protocol: one answer per line, for as long as the client wants.
    let mut line = first;
    loop {
        if reader
            .get_mut()
            .write_all(format!("{name}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// What an echo server answered: its pod's name and the client address it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub pod: String,
    pub client: String,
}

/// Sends an HTTP GET to `addr` and returns the body (the answering pod's name).
pub async fn http_get(addr: std::net::SocketAddr, timeout: Duration) -> Result<String> {
    Ok(http_get_answer(addr, timeout).await?.pod)
}

/// Sends an HTTP GET to `addr`; the answering pod and the client it saw.
pub async fn http_get_answer(addr: std::net::SocketAddr, timeout: Duration) -> Result<Answer> {
    let fut = async {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        s.write_all(
            format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).await?;
        let Some((head, body)) = resp.split_once("\r\n\r\n") else {
            bail!("malformed HTTP response from {addr}: {resp:?}");
        };
        if !head.starts_with("HTTP/1.1 200") {
            bail!("{addr} answered {head:?}");
        }
        let client = head
            .lines()
            .find_map(|l| l.strip_prefix("X-Client-Addr: "))
            .unwrap_or_default()
            .to_string();
        Ok(Answer {
            pod: body.trim().to_string(),
            client,
        })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .with_context(|| format!("no answer from {addr} within {timeout:?}"))?
}

/// `http_get` from inside network namespace `netns` (a pod's).
pub fn http_get_in(netns: &str, addr: std::net::SocketAddr, timeout: Duration) -> Result<String> {
    Ok(http_get_answer_in(netns, addr, timeout)?.pod)
}

/// `http_get_answer` from inside network namespace `netns`.
pub fn http_get_answer_in(
    netns: &str,
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> Result<Answer> {
    crate::netns::run_in(netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(http_get_answer(addr, timeout))
    })?
}

/// Sends one UDP datagram to `addr` and returns the answer (the pod's name).
pub async fn udp_request(addr: std::net::SocketAddr, timeout: Duration) -> Result<String> {
    let sock = UdpSocket::bind(("0.0.0.0", 0)).await?;
    // Connected, so that an ICMP port unreachable surfaces as an error.
    sock.connect(addr).await?;
    sock.send(b"ping\n").await?;
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(timeout, sock.recv(&mut buf))
        .await
        .with_context(|| format!("no UDP answer from {addr} within {timeout:?}"))??;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// `udp_request` from inside network namespace `netns`.
pub fn udp_request_in(
    netns: &str,
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> Result<String> {
    crate::netns::run_in(netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(udp_request(addr, timeout))
    })?
}
