//! Helpers for lab tests: a lab per test with its own prefix, removed when
//! the test ends (the Lab's Drop runs on panic too).

#![allow(dead_code)]

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
    let mut cfg = LabConfig::new(&prefix(letter), env!("CARGO_BIN_EXE_lb"));
    cfg.manifests = Some(manifests);
    cfg.nodes = nodes;
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
