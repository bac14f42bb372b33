//! Socket LB (`--socket-lb-cgroup`, the lab's node cgroups of pods): a
//! pod's connect() and sendmsg() to a Service go to a backend at the
//! socket, the socket still sees the Service as its peer, the tc programs
//! translate nothing for those flows, and what the socket hooks leave
//! (session affinity, a Service without backends) or share with the
//! per-packet path (internalTrafficPolicy, NetworkPolicy) behaves as
//! without them. Every request is a process in the pod (`lb lab
//! exec ... lb lab probe`), where the cgroup hooks see it.

mod common;

use std::collections::BTreeSet;

use lb_common::{PROTO_TCP, PROTO_UDP};

const CLIENT: (&str, &str) = ("default", "client");

fn node_index(node: &str) -> usize {
    node.trim_start_matches("node-").parse().expect("node-N")
}

async fn services_lab(letter: char) -> lb::lab::Lab {
    let lab = common::lab_with_config(letter, common::test_manifests("services"), 2, |cfg| {
        cfg.socket_lb = true;
    })
    .await;
    common::wait_backends(&lab, common::vip(&lab, "web", 80), PROTO_TCP, 4).await;
    common::wait_backends(&lab, common::vip(&lab, "web", 53), PROTO_UDP, 4).await;
    lab
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_go_straight_to_backends_and_the_socket_sees_the_service() {
    let lab = services_lab('k').await;
    let node = node_index(&common::node_of(&lab, CLIENT.1));
    let client_ip = lab
        .store
        .get(lb::lab::kinds::Kind::Pod, CLIENT.0, CLIENT.1)
        .unwrap()["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_string();
    let before = (
        common::datapath_count(&lab, node, "sock_translated").await,
        common::datapath_count(&lab, node, "new_flow").await,
    );

    let http = common::vip(&lab, "web", 80);
    let mut pods = BTreeSet::new();
    for _ in 0..20 {
        let seen = common::probe(&lab, CLIENT, "tcp", http).await.unwrap();
        assert_eq!(seen.peer, http, "getpeername shows the Service: {seen}");
        assert!(seen.answer.starts_with("web-"), "{seen}");
        let client = seen.client.clone().unwrap_or_default();
        assert!(
            client.starts_with(&format!("{client_ip}:")),
            "the backend sees the pod itself: {seen}"
        );
        pods.insert(seen.answer);
    }
    assert!(
        pods.len() >= 2,
        "20 connections reach several pods: {pods:?}"
    );

    let dns = common::vip(&lab, "web", 53);
    for mode in ["udp", "udp-connected"] {
        let seen = common::probe(&lab, CLIENT, mode, dns).await.unwrap();
        assert_eq!(
            seen.peer, dns,
            "{mode}: the answer comes from the Service: {seen}"
        );
        assert!(seen.answer.starts_with("web-"), "{mode}: {seen}");
    }

    // An IPv6 socket reaching the Service by its v4-mapped address (a
    // Java or dual-stack client), TCP and UDP.
    for (mode, vip) in [("tcp", http), ("udp", dns)] {
        let mapped: std::net::SocketAddr = format!("[::ffff:{}]:{}", vip.ip(), vip.port())
            .parse()
            .unwrap();
        let seen = common::probe(&lab, CLIENT, mode, mapped).await.unwrap();
        assert_eq!(seen.peer, mapped, "{mode} over IPv6: {seen}");
        assert!(seen.answer.starts_with("web-"), "{mode} over IPv6: {seen}");
    }

    let after = (
        common::datapath_count(&lab, node, "sock_translated").await,
        common::datapath_count(&lab, node, "new_flow").await,
    );
    assert!(
        after.0 - before.0 >= 24.0,
        "every connect and send translated at the socket: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.1, before.1,
        "the tc program translated none of those flows: {before:?} -> {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_refusal_and_internal_traffic_policy_behave_as_per_packet() {
    let lab = services_lab('q').await;
    let node = node_index(&common::node_of(&lab, CLIENT.1));
    let sticky = common::vip(&lab, "sticky", 80);
    common::wait_backends(&lab, sticky, PROTO_TCP, 4).await;
    let new_flows = common::datapath_count(&lab, node, "new_flow").await;
    let mut pods = BTreeSet::new();
    for _ in 0..8 {
        let seen = common::probe(&lab, CLIENT, "tcp", sticky).await.unwrap();
        assert_eq!(seen.peer, sticky, "{seen}");
        pods.insert(seen.answer);
    }
    assert_eq!(
        pods.len(),
        1,
        "sessionAffinity: ClientIP keeps one pod: {pods:?}"
    );
    assert!(
        common::datapath_count(&lab, node, "new_flow").await - new_flows >= 8.0,
        "the tc program translated the affinity Service's flows"
    );

    // internalTrafficPolicy: Local is in the node's map (local endpoints
    // only): the socket hook reads the same entries, so only pods on the
    // client's node answer, translated at the socket.
    let local = common::vip(&lab, "node-local", 80);
    let translated = common::datapath_count(&lab, node, "sock_translated").await;
    for _ in 0..8 {
        let seen = common::probe(&lab, CLIENT, "tcp", local).await.unwrap();
        assert_eq!(seen.peer, local, "{seen}");
        assert_eq!(
            common::node_of(&lab, &seen.answer),
            common::node_of(&lab, CLIENT.1),
            "internalTrafficPolicy: Local: {seen}"
        );
    }
    assert!(common::datapath_count(&lab, node, "sock_translated").await - translated >= 8.0);

    let empty = common::vip(&lab, "empty", 80);
    let refused = common::probe(&lab, CLIENT, "tcp", empty).await.unwrap_err();
    assert!(
        format!("{refused:#}").contains("refused"),
        "no backend: refused at once, as without socket LB: {refused:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_policy_judges_the_backend_a_socket_was_sent_to() {
    let lab = common::lab_with_config('w', common::repo_root().join("manifests/demo"), 1, |cfg| {
        cfg.socket_lb = true;
    })
    .await;
    let api = common::vip(&lab, "api-service", 80);
    common::wait_backends(&lab, api, PROTO_TCP, 3).await;
    let translated = common::datapath_count(&lab, 1, "sock_translated").await;
    let seen = common::probe(&lab, ("default", "client"), "tcp", api)
        .await
        .unwrap();
    assert_eq!(seen.peer, api, "{seen}");
    assert!(seen.answer.starts_with("api-"), "{seen}");
    let denied = common::probe(&lab, ("default", "stranger"), "tcp", api).await;
    assert!(
        denied.is_err(),
        "stranger is not allowed to the api pods: {denied:?}"
    );
    assert!(
        common::datapath_count(&lab, 1, "sock_translated").await - translated >= 2.0,
        "both connects were translated at the socket"
    );
    let drops = common::datapath_count(&lab, 1, "drop_policy").await;
    assert!(drops >= 1.0, "the stranger's SYN was dropped by policy");
}

/// A pod's UDP session: one connected socket, one request per line.
struct UdpSession {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl UdpSession {
    fn start(lab: &lb::lab::Lab, from: (&str, &str), addr: std::net::SocketAddr) -> UdpSession {
        let mut child = common::probe_command(lab, from, "udp-session", addr)
            .args(["--timeout-seconds", "2"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("lb lab exec");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        use tokio::io::AsyncBufReadExt;
        UdpSession {
            child,
            stdin,
            lines: tokio::io::BufReader::new(stdout).lines(),
        }
    }

    /// One request: what the socket saw, or the error it got.
    async fn ask(&mut self) -> Result<lb::lab::probe::ProbeResult, String> {
        use tokio::io::AsyncWriteExt;
        self.stdin.write_all(b"ask\n").await.expect("write");
        let line = self.lines.next_line().await.expect("read").expect("a line");
        lb::lab::probe::parse(&line).map_err(|_| line)
    }
}

/// The trap of socket LB (cilium#27300): a connected UDP socket sent to a
/// backend at connect() keeps that backend's address. When the backend's
/// pod goes, the socket is closed (its next call fails at once, not after
/// a timeout), and a new socket reaches a live pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_socket_pinned_to_a_gone_backend_is_closed() {
    let lab = services_lab('j').await;
    let dns = common::vip(&lab, "web", 53);
    let mut session = UdpSession::start(&lab, CLIENT, dns);
    let first = session.ask().await.expect("answered");
    assert_eq!(first.peer, dns, "{first}");
    assert_eq!(session.ask().await.expect("answered").answer, first.answer);

    let client = lb::agent::client(Some(&lab.kubeconfig_path()))
        .await
        .unwrap();
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, "default");
    pods.delete(&first.answer, &Default::default())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while lab
        .store
        .get(lb::lab::kinds::Kind::Pod, "default", &first.answer)
        .is_ok()
    {
        assert!(std::time::Instant::now() < deadline, "pod never went away");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let after = session.ask().await;
    let error = after.expect_err("the socket to the gone pod must not be answered");
    // A destroyed socket is disconnected: a send fails with EDESTADDRREQ
    // (89), a receive with ECONNABORTED (103). Left alone, the send would
    // pass and the receive time out (EAGAIN, 11).
    assert!(
        error.contains("os=89") || error.contains("os=103"),
        "closed at once, not left to time out: {error}"
    );
    drop(session.stdin);
    let _ = session.child.wait().await;

    let again = common::probe(&lab, CLIENT, "udp-connected", dns)
        .await
        .unwrap();
    assert_ne!(
        again.answer, first.answer,
        "a new socket reaches a live pod"
    );
    assert_eq!(again.peer, dns);
}

/// Only ClusterIPs are translated at the socket: a NodePort on a node's
/// address is left to the per-packet path (as from a pod without socket
/// LB). `sendmsg()` cannot tell a request from a UDP server's answer, and
/// pods answer SNATed NodePort clients at a node's address, on a port that
/// may be a NodePort's: translated, the answer went to another pod (1 UDP
/// query in 10,000 lost in `lab_churn` with socket LB on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ports_from_a_pod_stay_with_the_packet_path() {
    let lab = common::lab_with_config('n', common::test_manifests("nodeport"), 2, |cfg| {
        cfg.socket_lb = true;
    })
    .await;
    let node = node_index(&common::node_of(&lab, CLIENT.1));
    let addr = std::net::SocketAddr::new(lb::lab::net::node_ip(node).into(), 30080);
    common::wait_backends_on(&lab, node, addr, 4).await;
    let before = (
        common::datapath_count(&lab, node, "sock_translated").await,
        common::datapath_count(&lab, node, "new_flow").await,
    );
    for _ in 0..5 {
        let seen = common::probe(&lab, CLIENT, "tcp", addr).await.unwrap();
        assert_eq!(seen.peer, addr, "{seen}");
        assert!(seen.answer.starts_with("web-"), "{seen}");
    }
    let after = (
        common::datapath_count(&lab, node, "sock_translated").await,
        common::datapath_count(&lab, node, "new_flow").await,
    );
    assert_eq!(
        after.0, before.0,
        "no NodePort connect translated at the socket"
    );
    assert!(
        after.1 - before.1 >= 5.0,
        "the tc program translated them: {before:?} -> {after:?}"
    );
}
