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

use anyhow::{bail, Context, Result};

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
    /// As `lb bench-client` prints it: samples as [connect, total] in
    /// nanoseconds.
    pub fn to_json(&self) -> serde_json::Value {
        let ns = |d: Duration| d.as_nanos() as u64;
        serde_json::json!({
            "samples": self.samples.iter().map(|s| [ns(s.connect), ns(s.total)]).collect::<Vec<_>>(),
            "failures": self.failures,
            "elapsed_ns": ns(self.elapsed),
        })
    }

    pub fn from_json(v: &serde_json::Value) -> Result<Outcome> {
        let samples = v["samples"]
            .as_array()
            .context("no samples")?
            .iter()
            .map(|s| {
                let at = |i: usize| s[i].as_u64().map(Duration::from_nanos);
                Some(Sample {
                    connect: at(0)?,
                    total: at(1)?,
                })
            })
            .collect::<Option<Vec<_>>>()
            .context("a malformed sample")?;
        Ok(Outcome {
            samples,
            failures: v["failures"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect(),
            elapsed: Duration::from_nanos(v["elapsed_ns"].as_u64().context("no elapsed_ns")?),
        })
    }

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
    netns::run_in(netns, move || sequential_here(&targets, n, seed))
}

/// `sequential` from this thread's network namespace.
pub fn sequential_here(targets: &[SocketAddr], n: usize, seed: u64) -> Outcome {
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
    // Threads start in the namespace of the thread that makes them.
    netns::run_in(netns, move || {
        concurrent_here(targets, workers, duration, seed)
    })?
}

/// `concurrent` from this thread's network namespace.
pub fn concurrent_here(
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
        handles.push(std::thread::spawn(move || {
            let mut picker = Picker((seed + w as u64 * 7919) | 1);
            let mut out = Outcome::default();
            while !stop.load(Ordering::Relaxed) {
                let addr = targets[picker.pick(targets.len())];
                match request(addr) {
                    Ok(s) => out.samples.push(s),
                    Err(e) => out.failures.push(format!("{addr}: {e:#}")),
                }
            }
            Ok(out)
        }));
    }
    gather(handles, stop, duration)
}

/// What a client process runs (`lb bench-client`): `sequential` or
/// `concurrent`.
#[derive(Clone, Copy, Debug)]
pub enum Job {
    Sequential {
        n: usize,
        seed: u64,
    },
    Concurrent {
        workers: usize,
        duration: Duration,
        seed: u64,
    },
}

impl Job {
    /// Runs the job from this thread's network namespace.
    pub fn run_here(self, targets: Vec<SocketAddr>) -> Result<Outcome> {
        match self {
            Job::Sequential { n, seed } => Ok(sequential_here(&targets, n, seed)),
            Job::Concurrent {
                workers,
                duration,
                seed,
            } => concurrent_here(targets, workers, duration, seed),
        }
    }

    fn args(self) -> Vec<String> {
        match self {
            Job::Sequential { n, seed } => vec![
                "--sequential".into(),
                n.to_string(),
                "--seed".into(),
                seed.to_string(),
            ],
            Job::Concurrent {
                workers,
                duration,
                seed,
            } => vec![
                "--workers".into(),
                workers.to_string(),
                "--duration-ms".into(),
                duration.as_millis().to_string(),
                "--seed".into(),
                seed.to_string(),
            ],
        }
    }
}

/// `job` run by a process of its own inside a pod: in its network
/// namespace `netns` and its node's cgroup `cgroup`, where socket LB sees
/// the process's sockets as an application's (the bench's own threads are
/// in no pod's cgroup).
pub fn in_pod_process(
    lb_binary: &std::path::Path,
    netns: &str,
    cgroup: &std::path::Path,
    targets: &[SocketAddr],
    job: Job,
) -> Result<Outcome> {
    let mut cmd = netns::command_in(netns, lb_binary, true)?;
    crate::lab::cgroup::join(&mut cmd, cgroup)?;
    // The targets go on stdin: 30,000 of them overflow an argument.
    let targets: Vec<String> = targets.iter().map(SocketAddr::to_string).collect();
    let mut child = cmd
        .arg("bench-client")
        .args(job.args())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting lb bench-client")?;
    child
        .stdin
        .take()
        .context("bench-client stdin")?
        .write_all(targets.join("\n").as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "lb bench-client failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("lb bench-client's output")?;
    Outcome::from_json(&v)
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
    fn an_outcome_reads_back_from_its_json() {
        let out = Outcome {
            samples: vec![Sample {
                connect: Duration::from_micros(61),
                total: Duration::from_micros(150),
            }],
            failures: vec!["10.96.0.11:80: refused".into()],
            elapsed: Duration::from_millis(900),
        };
        let back = Outcome::from_json(&out.to_json()).unwrap();
        assert_eq!(back.samples[0].connect, out.samples[0].connect);
        assert_eq!(back.samples[0].total, out.samples[0].total);
        assert_eq!(back.failures, out.failures);
        assert_eq!(back.elapsed, out.elapsed);
    }

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
