//! Service features with real traffic in a two-node lab: TCP and UDP, several
//! ports, named target ports, backends on both nodes, headless and
//! ExternalName Services left alone, refusal without endpoints, terminating
//! endpoints.

mod common;

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use lb::{datapath::Maps, plan::backend_addr};
use lb_common::{PROTO_TCP, PROTO_UDP};

const CLIENT: (&str, &str) = ("default", "client");

/// The two-node Services lab, once the agents answer on web:80.
async fn services_lab(letter: char) -> lb::lab::Lab {
    let lab = common::lab_with(letter, common::test_manifests("services"), 2).await;
    common::wait_reachable(
        &lab,
        CLIENT,
        common::vip(&lab, "web", 80),
        Duration::from_secs(30),
    )
    .await;
    lab
}

async fn delete_pod(lab: &lb::lab::Lab, name: &str) {
    let client = lb::agent::client(Some(&lab.kubeconfig_path()))
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client, "default");
    pods.delete(name, &DeleteParams::default()).await.unwrap();
}

async fn wait_pod_gone(lab: &lb::lab::Lab, name: &str) {
    for _ in 0..200 {
        if lab
            .store
            .get(lb::lab::kinds::Kind::Pod, "default", name)
            .is_err()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("pod {name} never went away");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_udp_ports_with_named_target_ports_reach_pods_on_both_nodes() {
    let lab = services_lab('s').await;
    let http = common::vip(&lab, "web", 80);
    common::wait_backends(&lab, http, PROTO_TCP, 4).await;
    common::wait_backends(&lab, common::vip(&lab, "web", 53), PROTO_UDP, 4).await;

    let (answers, failures) = common::burst(&lab, CLIENT, http, 40).await;
    assert!(failures.is_empty(), "{failures:#?}");
    let nodes: BTreeSet<String> = answers.keys().map(|p| common::node_of(&lab, p)).collect();
    assert_eq!(
        nodes.len(),
        2,
        "40 requests should reach pods on both nodes: {answers:?}"
    );

    // Numeric targetPort on a second TCP port.
    let (answers, failures) = common::burst(&lab, CLIENT, common::vip(&lab, "web", 9100), 10).await;
    assert!(failures.is_empty() && !answers.is_empty(), "{failures:#?}");

    // UDP, named targetPort (dns -> 5353).
    let dns = common::vip(&lab, "web", 53);
    let mut udp = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..20 {
        let pod = common::udp_request(&lab, CLIENT, dns)
            .await
            .unwrap_or_else(|e| panic!("UDP request {i}: {e:#}"));
        *udp.entry(pod).or_default() += 1;
    }
    assert!(
        udp.len() >= 2,
        "20 UDP flows should reach at least 2 pods: {udp:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_and_external_name_services_get_no_frontend() {
    let lab = services_lab('h').await;
    let maps = Maps::open_pinned(&lab.pin_dir(1)).unwrap();
    let state = maps.state().unwrap();
    let mut frontends: Vec<(SocketAddr, u8)> = state
        .services
        .keys()
        .filter(|k| k.slot == 0)
        .map(|k| {
            let b = backend_addr(&lb_common::backend::Backend {
                addr: k.addr,
                port: k.port,
                proto: k.proto,
                flags: 0,
            });
            (SocketAddr::new(b.ip.into(), b.port), b.proto)
        })
        .collect();
    frontends.sort();
    let mut want = vec![
        (common::vip(&lab, "web", 80), PROTO_TCP),
        (common::vip(&lab, "web", 53), PROTO_UDP),
        (common::vip(&lab, "web", 9100), PROTO_TCP),
        (common::vip(&lab, "empty", 80), PROTO_TCP),
        (common::vip(&lab, "empty", 53), PROTO_UDP),
        (common::vip(&lab, "solo", 80), PROTO_TCP),
        (common::vip(&lab, "sticky", 80), PROTO_TCP),
        (common::vip(&lab, "node-local", 80), PROTO_TCP),
        // Cluster DNS, which every lab has as every kind cluster has.
        (SocketAddr::new(lb::lab::dns::DNS_IP.into(), 53), PROTO_UDP),
        (SocketAddr::new(lb::lab::dns::DNS_IP.into(), 53), PROTO_TCP),
    ];
    want.sort();
    assert_eq!(
        frontends, want,
        "exactly the ClusterIP Services' ports are programmed"
    );
    let log = std::fs::read_to_string(lab.log_path("agent-node-1")).unwrap();
    assert!(
        !log.contains("skipped"),
        "headless/ExternalName must not be reported as errors:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_without_endpoints_is_refused_at_once() {
    let lab = services_lab('r').await;
    let err = common::request(&lab, CLIENT, common::vip(&lab, "empty", 80))
        .await
        .unwrap_err();
    let io = common::io_kind(&err);
    assert_eq!(
        io,
        Some(std::io::ErrorKind::ConnectionRefused),
        "TCP: {err:#}"
    );
    let err = common::udp_request(&lab, CLIENT, common::vip(&lab, "empty", 53))
        .await
        .unwrap_err();
    let io = common::io_kind(&err);
    assert_eq!(
        io,
        Some(std::io::ErrorKind::ConnectionRefused),
        "UDP: {err:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_to_a_terminating_pod_keeps_working() {
    let lab = services_lab('t').await;
    let vip = common::vip(&lab, "web", 80);
    common::wait_reachable(&lab, CLIENT, vip, Duration::from_secs(30)).await;
    let netns = lab.pod_netns("default", "client").unwrap();
    let (first_tx, first_rx) = std::sync::mpsc::channel::<String>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    // A long-lived line-protocol connection from the client pod.
    let conversation = std::thread::spawn(move || {
        lb::netns::run_in(&netns, move || -> anyhow::Result<Vec<String>> {
            let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut r = BufReader::new(s.try_clone()?);
            let mut ask = |s: &mut TcpStream| -> anyhow::Result<String> {
                s.write_all(b"hello\n")?;
                let mut line = String::new();
                r.read_line(&mut line)?;
                Ok(line.trim().to_string())
            };
            let first = ask(&mut s)?;
            first_tx.send(first.clone())?;
            go_rx.recv()?;
            let mut answers = vec![first];
            for _ in 0..10 {
                std::thread::sleep(Duration::from_millis(100));
                answers.push(ask(&mut s)?);
            }
            Ok(answers)
        })
    });
    let pod = first_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("first answer");
    delete_pod(&lab, &pod).await;
    // Give the agent time to take the pod out of the Service first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    go_tx.send(()).unwrap();
    let answers = tokio::task::spawn_blocking(move || conversation.join().unwrap())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        answers.iter().all(|a| *a == pod),
        "every answer on the open connection from {pod}: {answers:?}"
    );
    // Meanwhile new connections avoid it.
    let (new, failures) = common::burst(&lab, CLIENT, vip, 10).await;
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        !new.contains_key(&pod),
        "new connections must avoid terminating {pod}: {new:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_terminating_pod_serves_until_it_is_gone_then_connections_are_refused() {
    let lab = services_lab('l').await;
    let vip = common::vip(&lab, "solo", 80);
    common::wait_reachable(&lab, CLIENT, vip, Duration::from_secs(30)).await;
    delete_pod(&lab, "solo").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (answers, failures) = common::burst(&lab, CLIENT, vip, 5).await;
    assert!(
        failures.is_empty(),
        "the serving, terminating pod still answers: {failures:#?}"
    );
    assert_eq!(answers.keys().collect::<Vec<_>>(), ["solo"]);
    wait_pod_gone(&lab, "solo").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = common::request(&lab, CLIENT, vip).await.unwrap_err();
    let io = common::io_kind(&err);
    assert_eq!(io, Some(std::io::ErrorKind::ConnectionRefused), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_affinity_and_internal_traffic_policy_local() {
    let lab = services_lab('a').await;
    let sticky = common::vip(&lab, "sticky", 80);
    common::wait_reachable(&lab, CLIENT, sticky, Duration::from_secs(30)).await;
    common::wait_backends(&lab, sticky, PROTO_TCP, 4).await;
    let (answers, failures) = common::burst(&lab, CLIENT, sticky, 20).await;
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(
        answers.len(),
        1,
        "sessionAffinity ClientIP: one pod answers every connection: {answers:?}"
    );

    let local = common::vip(&lab, "node-local", 80);
    common::wait_reachable(&lab, CLIENT, local, Duration::from_secs(30)).await;
    let (answers, failures) = common::burst(&lab, CLIENT, local, 20).await;
    assert!(failures.is_empty(), "{failures:#?}");
    let client_node = common::node_of(&lab, "client");
    for pod in answers.keys() {
        assert_eq!(
            common::node_of(&lab, pod),
            client_node,
            "internalTrafficPolicy Local: {answers:?}"
        );
    }
}

/// The stale-UDP-conntrack failure kube-proxy users report: a UDP "flow"
/// (one client socket) whose backend pod is gone must move to a live backend
/// at once instead of being black-holed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flow_moves_to_a_live_backend_as_soon_as_its_pod_is_gone() {
    let lab = services_lab('u').await;
    let dns = common::vip(&lab, "web", 53);
    let netns = lab.pod_netns("default", "client").unwrap();
    // One socket, so every datagram belongs to the same conntrack entry.
    let sock = lb::netns::run_in(&netns, || std::net::UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    sock.connect(dns).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let ask = |sock: &std::net::UdpSocket| -> std::io::Result<String> {
        common::retry_eintr(|| sock.send(b"ping\n"))?;
        let mut buf = [0u8; 256];
        let n = common::retry_eintr(|| sock.recv(&mut buf))?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    };
    let first = ask(&sock).unwrap();
    assert_eq!(ask(&sock).unwrap(), first, "the flow keeps its backend");
    delete_pod(&lab, &first).await;
    wait_pod_gone(&lab, &first).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let next =
        ask(&sock).unwrap_or_else(|e| panic!("the flow to gone {first} was black-holed: {e}"));
    assert_ne!(next, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hairpin_a_pod_reaching_itself_through_its_own_service() {
    let lab = services_lab('z').await;
    let vip = common::vip(&lab, "solo", 80);
    common::wait_reachable(&lab, ("default", "solo"), vip, Duration::from_secs(30)).await;
    let (answers, failures) = common::burst(&lab, ("default", "solo"), vip, 10).await;
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(answers.keys().collect::<Vec<_>>(), ["solo"]);
}
