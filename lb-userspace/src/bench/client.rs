//! The end-to-end bench's client: blocking sockets on threads inside a
//! pod's network namespace, each request on a new TCP connection (as a
//! Service's new flows are what the rules and the data path decide on).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use crate::netns;

const TIMEOUT: Duration = Duration::from_secs(3);

/// One request: how long the connect took (SYN to SYN-ACK: the first packet's
/// trip through whatever translates it) and the whole connect, request and
/// answer.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub connect: Duration,
    pub total: Duration,
}

/// A small deterministic generator: which target each request goes to.
struct Picker(u64);

impl Picker {
    fn pick(&mut self, n: usize) -> usize {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }
}

/// Connects, sends a GET, reads the answer to its end. The answer must be a
/// 200 with a body (the echo pod's name).
fn request(addr: SocketAddr) -> Result<Sample> {
    request_from(None, addr)
}

/// A connection from `source` (any port), or from the routed address.
fn connect_from(source: Option<Ipv4Addr>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect_timeout(&addr, TIMEOUT);
    };
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::from((source, 0)).into())?;
    s.connect_timeout(&addr.into(), TIMEOUT)?;
    Ok(s.into())
}

/// `request`, from the address `source` of the client's namespace.
fn request_from(source: Option<Ipv4Addr>, addr: SocketAddr) -> Result<Sample> {
    let started = Instant::now();
    let mut s = connect_from(source, addr)?;
    let connect = started.elapsed();
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::with_capacity(256);
    s.read_to_end(&mut answer)?;
    let total = started.elapsed();
    if !answer.starts_with(b"HTTP/1.1 200") || !answer.ends_with(b"\n") {
        bail!(
            "{addr} answered {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(60)])
        );
    }
    Ok(Sample { connect, total })
}

/// What a run of requests gave.
#[derive(Debug, Default)]
pub struct Outcome {
    pub samples: Vec<Sample>,
    pub failures: Vec<String>,
    pub elapsed: Duration,
}

impl Outcome {
    /// Fails when more than one request in a hundred failed: the figures
    /// would then describe a broken path, not a slow one. Fewer failures
    /// are counted in the report.
    pub fn check(&self, what: &str) -> Result<()> {
        let n = self.samples.len() + self.failures.len();
        if self.failures.len() * 100 > n {
            bail!(
                "{what}: {} of {n} requests failed, first: {}",
                self.failures.len(),
                self.failures.first().map_or("", String::as_str)
            );
        }
        Ok(())
    }
}

/// `n` requests one after another from namespace `netns`, each to a target
/// picked at random (seeded, so every mode meets the same sequence).
pub fn sequential(netns: &str, targets: Vec<SocketAddr>, n: usize, seed: u64) -> Result<Outcome> {
    netns::run_in(netns, move || {
        let mut picker = Picker(seed | 1);
        let mut out = Outcome::default();
        let started = Instant::now();
        for _ in 0..n {
            let addr = targets[picker.pick(targets.len())];
            match request(addr) {
                Ok(s) => out.samples.push(s),
                Err(e) => out.failures.push(format!("{addr}: {e:#}")),
            }
        }
        out.elapsed = started.elapsed();
        out
    })
}

/// `workers` clients in namespace `netns` sending requests back to back
/// for `duration`; all their samples together.
pub fn concurrent(
    netns: &str,
    targets: Vec<SocketAddr>,
    workers: usize,
    duration: Duration,
    seed: u64,
) -> Result<Outcome> {
    let stop = Arc::new(AtomicBool::new(false));
    let targets = Arc::new(targets);
    let mut handles = Vec::new();
    for w in 0..workers {
        let (stop, targets) = (stop.clone(), targets.clone());
        handles.push(netns::spawn_in(netns, move || {
            let mut picker = Picker((seed + w as u64 * 7919) | 1);
            let mut out = Outcome::default();
            while !stop.load(Ordering::Relaxed) {
                let addr = targets[picker.pick(targets.len())];
                match request(addr) {
                    Ok(s) => out.samples.push(s),
                    Err(e) => out.failures.push(format!("{addr}: {e:#}")),
                }
            }
            out
        })?);
    }
    gather(handles, stop, duration)
}

/// A DNS-like query: a new UDP socket (a new source port) per query, one
/// datagram, one answer (the echo pod's name).
fn query_from(source: Option<Ipv4Addr>, addr: SocketAddr) -> Result<Sample> {
    let started = Instant::now();
    let sock = std::net::UdpSocket::bind((source.unwrap_or(Ipv4Addr::UNSPECIFIED), 0))?;
    sock.set_read_timeout(Some(TIMEOUT))?;
    sock.connect(addr)?;
    sock.send(b"query\n")?;
    let mut buf = [0u8; 512];
    let n = loop {
        match sock.recv(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r?,
        }
    };
    if n == 0 {
        bail!("{addr} answered an empty datagram");
    }
    let total = started.elapsed();
    Ok(Sample {
        connect: total,
        total,
    })
}

/// What a churn client sends: a TCP request per connection, or a UDP query
/// per socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Churn {
    Tcp,
    Udp,
}

/// How fast each churn client goes: without pause (a bench's ceiling), or
/// at most `per_client` requests a second (a test's defined load, which a
/// faster machine must not exceed: the tuples and conntrack entries a
/// load holds grow with its rate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    Unpaced,
    PerClient(u32),
}

/// A client's schedule at `Rate::PerClient`: request `n` is due `n`
/// intervals after the start. A client that fell behind (a slow request)
/// catches up by at most `CATCH_UP` of requests, not in one burst.
struct Pace {
    interval: Duration,
    due: Instant,
}

const CATCH_UP: Duration = Duration::from_millis(50);

impl Pace {
    fn new(rate: Rate) -> Option<Pace> {
        match rate {
            Rate::Unpaced => None,
            Rate::PerClient(n) => Some(Pace {
                interval: Duration::from_secs(1) / n.max(1),
                due: Instant::now(),
            }),
        }
    }

    /// Sleeps until the next request is due.
    fn wait(&mut self) {
        let now = Instant::now();
        if self.due > now {
            std::thread::sleep(self.due - now);
        } else if now - self.due > CATCH_UP {
            self.due = now - CATCH_UP;
        }
        self.due += self.interval;
    }
}

/// Churn: one client per address in `sources` (None: the namespace's own),
/// in namespace `netns`, each opening a new connection (or socket) per
/// request at `rate` for `duration`, to the targets in turn; all their
/// samples together. What users' clients do to a NodePort or a ClusterIP.
pub fn churn(
    netns: &str,
    kind: Churn,
    sources: &[Option<Ipv4Addr>],
    targets: Vec<SocketAddr>,
    (duration, rate): (Duration, Rate),
) -> Result<Outcome> {
    let stop = Arc::new(AtomicBool::new(false));
    let targets = Arc::new(targets);
    let mut handles = Vec::new();
    for (w, source) in sources.iter().copied().enumerate() {
        let (stop, targets) = (stop.clone(), targets.clone());
        handles.push(netns::spawn_in(netns, move || {
            let mut out = Outcome::default();
            let mut next = w;
            let mut pace = Pace::new(rate);
            while !stop.load(Ordering::Relaxed) {
                if let Some(p) = pace.as_mut() {
                    p.wait();
                }
                let addr = targets[next % targets.len()];
                next += 1;
                let res = match kind {
                    Churn::Tcp => request_from(source, addr),
                    Churn::Udp => query_from(source, addr),
                };
                match res {
                    Ok(s) => out.samples.push(s),
                    Err(e) => out.failures.push(format!(
                        "{}{addr} after {:?}: {e:#}",
                        source.map(|s| format!("{s} -> ")).unwrap_or_default(),
                        out.samples.len()
                    )),
                }
            }
            out
        })?);
    }
    gather(handles, stop, duration)
}

/// Lets the client threads run for `duration`, stops them, and puts
/// their samples together.
fn gather(
    handles: Vec<std::thread::JoinHandle<Result<Outcome>>>,
    stop: Arc<AtomicBool>,
    duration: Duration,
) -> Result<Outcome> {
    let started = Instant::now();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut all = Outcome::default();
    for h in handles {
        let out = h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        all.samples.extend(out.samples);
        all.failures.extend(out.failures);
    }
    all.elapsed = started.elapsed();
    Ok(all)
}

/// The `q` quantile (0..=1) of `values`, nearest rank.
pub fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = (q * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.01), 1.0);
        assert_eq!(quantile(&mut v, 0.5), 50.0);
        assert_eq!(quantile(&mut v, 0.99), 99.0);
        assert_eq!(quantile(&mut v, 1.0), 100.0);
        assert!(quantile(&mut [], 0.5).is_nan());
        let mut one = [7.0];
        assert_eq!(quantile(&mut one, 0.01), 7.0);
    }

    #[test]
    fn the_picker_covers_every_target_and_repeats_with_its_seed() {
        let mut a = Picker(42);
        let mut b = Picker(42);
        let mut seen = [0usize; 7];
        for _ in 0..7000 {
            let i = a.pick(7);
            assert_eq!(i, b.pick(7));
            seen[i] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }
}
