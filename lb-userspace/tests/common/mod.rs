//! Helpers for lab tests: a lab per test with its own prefix, removed when
//! the test ends (the Lab's Drop runs on panic too).

#![allow(dead_code)]

pub mod kubectl;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use lb::{
    echo::http_get_in,
    lab::{kinds::Kind, Lab, LabConfig},
};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A prefix unique to this test process and test: `<letter><4 hex>`.
pub fn prefix(letter: char) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = (std::process::id() + N.fetch_add(1, Ordering::Relaxed) * 7919) & 0xffff;
    format!("{letter}{n:04x}")
}

pub async fn demo_lab(letter: char) -> Lab {
    lab_with(letter, repo_root().join("manifests/demo"), 1).await
}

/// A lab with `nodes` nodes and the manifests in `manifests`, pods ready.
pub async fn lab_with(letter: char, manifests: PathBuf, nodes: usize) -> Lab {
    lab_with_agent_args(letter, manifests, nodes, &[]).await
}

/// `lab_with`, the agents given `args` besides the lab's own.
pub async fn lab_with_agent_args(
    letter: char,
    manifests: PathBuf,
    nodes: usize,
    args: &[&str],
) -> Lab {
    lab_with_config(letter, manifests, nodes, |cfg| {
        cfg.agent_args = args.iter().map(|a| a.to_string()).collect();
    })
    .await
}

/// `lab_with`, its configuration changed by `change` first.
pub async fn lab_with_config(
    letter: char,
    manifests: PathBuf,
    nodes: usize,
    change: impl FnOnce(&mut LabConfig),
) -> Lab {
    let mut cfg = LabConfig::new(&prefix(letter), env!("CARGO_BIN_EXE_lb"));
    cfg.manifests = Some(manifests);
    cfg.nodes = nodes;
    change(&mut cfg);
    let lab = Lab::up(cfg).await.expect("lab up");
    lab.wait_pods_ready(Duration::from_secs(60))
        .await
        .expect("pods ready");
    lab
}

pub fn test_manifests(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/manifests")
        .join(name)
}

/// `clusterIP:port` of Service `default/name`.
pub fn vip(lab: &Lab, name: &str, port: u16) -> SocketAddr {
    let svc = lab
        .store
        .get(Kind::Service, "default", name)
        .expect("service");
    let ip = svc["spec"]["clusterIP"]
        .as_str()
        .expect("clusterIP")
        .to_string();
    format!("{ip}:{port}").parse().expect("address")
}

/// The node a pod runs on.
pub fn node_of(lab: &Lab, pod: &str) -> String {
    let p = lab.store.get(Kind::Pod, "default", pod).expect("pod");
    p["spec"]["nodeName"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// One UDP request from pod `ns/name` to `addr`.
pub async fn udp_request(
    lab: &Lab,
    from: (&str, &str),
    addr: SocketAddr,
) -> anyhow::Result<String> {
    let netns = lab.pod_netns(from.0, from.1)?;
    tokio::task::spawn_blocking(move || {
        lb::echo::udp_request_in(&netns, addr, Duration::from_secs(2))
    })
    .await?
}

/// One HTTP request from pod `ns/name` to `addr`; the answering pod's name.
pub async fn request(lab: &Lab, from: (&str, &str), addr: SocketAddr) -> anyhow::Result<String> {
    let netns = lab.pod_netns(from.0, from.1)?;
    tokio::task::spawn_blocking(move || http_get_in(&netns, addr, Duration::from_secs(3))).await?
}

/// Retries until a request succeeds (the agent programs the maps shortly
/// after the pods come up), or panics after `within`.
pub async fn wait_reachable(lab: &Lab, from: (&str, &str), addr: SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        match request(lab, from, addr).await {
            Ok(_) => return,
            Err(e) if Instant::now() > deadline => {
                panic!("{addr} not reachable from {from:?} after {within:?}: {e:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Sends `n` requests; returns answers per pod and the failures.
pub async fn burst(
    lab: &Lab,
    from: (&str, &str),
    addr: SocketAddr,
    n: usize,
) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut answers = BTreeMap::new();
    let mut failures = Vec::new();
    for i in 0..n {
        match request(lab, from, addr).await {
            Ok(pod) => *answers.entry(pod).or_insert(0) += 1,
            Err(e) => failures.push(format!("request {i}: {e:#}")),
        }
    }
    (answers, failures)
}

/// Waits until every node's agent has programmed frontend `addr`/`proto`
/// with `n` backends (agents apply API changes a little after they happen).
pub async fn wait_backends(lab: &Lab, addr: SocketAddr, proto: u8, n: u16) {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only")
    };
    let key = lb::plan::service_key(*v4.ip(), v4.port(), proto, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts: Vec<Option<u16>> = (1..=lab.nodes)
            .map(|node| {
                lb::datapath::Maps::open_pinned(&lab.pin_dir(node))
                    .ok()
                    .and_then(|m| m.services.get(&key, 0).ok())
                    .map(|v| v.count)
            })
            .collect();
        if counts.iter().all(|c| *c == Some(n)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr}: backends per node {counts:?}, want {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `wait_backends` for one node only (a NodePort on that node's address).
pub async fn wait_backends_on(lab: &Lab, node: usize, addr: SocketAddr, n: u16) {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only")
    };
    let key = lb::plan::service_key(*v4.ip(), v4.port(), lb_common::PROTO_TCP, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let count = lb::datapath::Maps::open_pinned(&lab.pin_dir(node))
            .ok()
            .and_then(|m| m.services.get(&key, 0).ok())
            .map(|v| v.count);
        if count == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} on node {node}: {count:?} backends, want {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The I/O error kind behind an error (connection refused, timed out...).
pub fn io_kind(err: &anyhow::Error) -> Option<std::io::ErrorKind> {
    err.chain()
        .find_map(|e| e.downcast_ref::<std::io::Error>())
        .map(|e| e.kind())
}

/// Makes a blocking socket call again when a signal interrupted it (EINTR,
/// `ErrorKind::Interrupted`). A signal caught in the test process (tokio's
/// SIGCHLD handler, which the lab's `ip` commands can bring in, for one)
/// may land on a test's thread during the call, and a call on a socket with
/// a timeout is not restarted then, even under SA_RESTART. std retries in
/// its loops (`read_to_end`, `read_line`, `write_all`, `connect_timeout`),
/// not in single calls such as `UdpSocket::recv` or `send`.
pub fn retry_eintr<T>(mut call: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            result => return result,
        }
    }
}

/// Clients sending requests without pause (each from inside a network
/// namespace, to an address), counting answers and failures until stopped.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    clients: Vec<(String, std::thread::JoinHandle<LoadTally>)>,
}

/// Answers and failures of one client.
type LoadTally = (usize, Vec<String>);

/// What one client of a `Load` saw.
#[derive(Debug)]
pub struct LoadReport {
    pub target: String,
    pub answered: usize,
    pub failures: Vec<String>,
}

impl Load {
    pub fn start(targets: Vec<(String, SocketAddr)>) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = targets
            .into_iter()
            .map(|(netns, addr)| {
                let stop = stop.clone();
                let name = format!("{netns} -> {addr}");
                let handle = std::thread::spawn(move || {
                    lb::netns::run_in(&netns, move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("runtime");
                        let (mut ok, mut failures) = (0, Vec::new());
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let started = Instant::now();
                            match rt.block_on(lb::echo::http_get(addr, Duration::from_secs(3))) {
                                Ok(_) => ok += 1,
                                Err(e) => failures.push(format!(
                                    "after {ok} answers, {:?} in: {e:#}",
                                    started.elapsed()
                                )),
                            }
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        (ok, failures)
                    })
                    .unwrap_or_else(|e| (0, vec![format!("entering {netns}: {e:#}")]))
                });
                (name, handle)
            })
            .collect();
        Load { stop, clients }
    }

    pub async fn stop(self) -> Vec<LoadReport> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            self.clients
                .into_iter()
                .map(|(target, h)| {
                    let (answered, failures) = h.join().expect("load client");
                    LoadReport {
                        target,
                        answered,
                        failures,
                    }
                })
                .collect()
        })
        .await
        .expect("load")
    }
}

/// A long-lived TCP connection (the echo servers' line protocol): `ask`
/// sends a line and returns the answering pod's name.
pub struct OpenConnection {
    ask: std::sync::mpsc::Sender<std::sync::mpsc::Sender<anyhow::Result<String>>>,
}

impl OpenConnection {
    pub fn open(netns: &str, addr: SocketAddr) -> anyhow::Result<OpenConnection> {
        use std::io::{BufRead, Write};
        let (tx, rx) =
            std::sync::mpsc::channel::<std::sync::mpsc::Sender<anyhow::Result<String>>>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let netns = netns.to_string();
        std::thread::spawn(move || {
            let _ = lb::netns::run_in(&netns, move || {
                let conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                    .and_then(|s| {
                        s.set_read_timeout(Some(Duration::from_secs(3)))?;
                        Ok(s)
                    });
                let mut s = match conn {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("connecting to {addr}: {e}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let Ok(clone) = s.try_clone() else { return };
                let mut r = std::io::BufReader::new(clone);
                while let Ok(reply) = rx.recv() {
                    let mut line = String::new();
                    let answer = s
                        .write_all(b"hello\n")
                        .and_then(|()| r.read_line(&mut line))
                        .map_err(anyhow::Error::from)
                        .and_then(|n| {
                            anyhow::ensure!(n > 0, "connection closed");
                            Ok(line.trim().to_string())
                        });
                    let _ = reply.send(answer);
                }
            });
        });
        ready_rx.recv_timeout(Duration::from_secs(5))??;
        Ok(OpenConnection { ask: tx })
    }

    pub async fn ask(&self) -> anyhow::Result<String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.ask.send(tx)?;
        tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(5)))
            .await?
            .map_err(|e| anyhow::anyhow!("no answer: {e}"))?
    }
}

/// GETs `path` of the agent's metrics server on node `node`.
pub async fn agent_http(lab: &Lab, node: usize, path: &str) -> anyhow::Result<(u16, String)> {
    let (netns, path) = (lab.node_netns(node), path.to_string());
    tokio::task::spawn_blocking(move || lb::lab::agent_get_in(&netns, &path)).await?
}

/// Waits until node `node`'s agent answers /readyz with 200.
pub async fn wait_agent_ready(lab: &Lab, node: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = agent_http(lab, node, "/readyz").await {
            return;
        }
        assert!(Instant::now() < deadline, "agent on node {node} not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of a metric line `name` (with its labels) in a scrape.
pub fn metric(scrape: &str, name: &str) -> Option<f64> {
    lb::lab::metric(scrape, name)
}

/// The last `n` lines of node `node`'s agent log (for failure messages).
pub fn agent_log_tail(lab: &Lab, node: usize, n: usize) -> String {
    let text =
        std::fs::read_to_string(lab.log_path(&format!("agent-node-{node}"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `lb lab exec NS/POD -- lb lab probe MODE ADDR`: one request from a
/// process in the pod (its network namespace and its node's cgroup, where
/// socket LB sees it), as a user would run it.
pub async fn probe(
    lab: &Lab,
    from: (&str, &str),
    mode: &str,
    addr: SocketAddr,
) -> anyhow::Result<lb::lab::probe::ProbeResult> {
    let out = probe_command(lab, from, mode, addr)
        .env("RUST_BACKTRACE", "0")
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        anyhow::bail!(
            "probe {mode} {addr} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    lb::lab::probe::parse(stdout.trim())
}

/// The command `probe` runs: `lb lab exec NS/POD -- lb lab probe MODE ADDR`.
pub fn probe_command(
    lab: &Lab,
    from: (&str, &str),
    mode: &str,
    addr: SocketAddr,
) -> tokio::process::Command {
    let lb_bin = env!("CARGO_BIN_EXE_lb");
    let mut cmd = tokio::process::Command::new(lb_bin);
    cmd.args(["lab", "exec", "--prefix", &lab.prefix])
        .arg(format!("{}/{}", from.0, from.1))
        .args(["--", lb_bin, "lab", "probe", mode])
        .arg(addr.to_string());
    cmd
}

/// A data path counter of node `node` (`lb_datapath_packets_total`).
pub async fn datapath_count(lab: &Lab, node: usize, reason: &str) -> f64 {
    let (_, scrape) = agent_http(lab, node, "/metrics").await.expect("metrics");
    metric(
        &scrape,
        &format!("lb_datapath_packets_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}
