//! NodePort, LoadBalancer and external IPs with real traffic from a client
//! outside the nodes (the uplink program: tc ingress on the lab nodes'
//! veths, as `--uplink-hook auto` picks; XDP in the tests that ask for it)
//! and from pods.

mod common;

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use lb::{
    echo::{http_get_answer_in, Answer},
    lab::{kinds::Kind, net, Lab},
};

async fn ask(netns: &str, addr: SocketAddr) -> anyhow::Result<Answer> {
    let netns = netns.to_string();
    tokio::task::spawn_blocking(move || http_get_answer_in(&netns, addr, Duration::from_secs(3)))
        .await?
}

/// `n` requests from the outside client; panics on any failure.
async fn from_outside(lab: &Lab, addr: SocketAddr, n: usize) -> Vec<Answer> {
    let ext = lab.ext_netns();
    // The agents program the frontends shortly after the pods are up.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = ask(&ext, addr).await {
        assert!(
            std::time::Instant::now() < deadline,
            "{addr} not reachable from outside: {e:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut out = Vec::new();
    for i in 0..n {
        out.push(
            ask(&ext, addr)
                .await
                .unwrap_or_else(|e| panic!("request {i} to {addr}: {e:#}")),
        );
    }
    out
}

fn node_addr(i: usize, port: u16) -> SocketAddr {
    SocketAddr::new(net::node_ip(i).into(), port)
}

async fn nodeport_lab(letter: char) -> Lab {
    common::lab_with(letter, common::test_manifests("nodeport"), 2).await
}

/// The uplink program's link pinned on node `i`: which hook runs it.
fn uplink_hooks(lab: &Lab, i: usize) -> Vec<String> {
    let dir = lab.pin_dir(i).join("uplink");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Through node 1 and node 2 in turn, pods on both nodes answer, and see
/// the entry node's address (externalTrafficPolicy: Cluster).
async fn reaches_pods_on_both_nodes_through_either_node(lab: &Lab) {
    for entry in [1, 2] {
        common::wait_backends_on(lab, entry, node_addr(entry, 30080), 4).await;
        let answers = from_outside(lab, node_addr(entry, 30080), 30).await;
        let nodes: BTreeSet<String> = answers
            .iter()
            .map(|a| common::node_of(lab, &a.pod))
            .collect();
        assert_eq!(
            nodes.len(),
            2,
            "through node {entry}: pods on both nodes answer (remote ones via SNAT): {answers:?}"
        );
        assert!(
            answers
                .iter()
                .all(|a| a.client.starts_with(&format!("{}:", net::node_ip(entry)))),
            "SNAT to node {entry}: {answers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodeport_from_outside_reaches_pods_on_both_nodes_through_either_node() {
    let lab = nodeport_lab('n').await;
    for i in [1, 2] {
        assert_eq!(
            uplink_hooks(&lab, i),
            ["eth0_ingress"],
            "a veth uplink gets the tc program"
        );
    }
    reaches_pods_on_both_nodes_through_either_node(&lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodeport_through_the_xdp_hook_reaches_pods_on_both_nodes() {
    let lab = common::lab_with_agent_args(
        'x',
        common::test_manifests("nodeport"),
        2,
        &["--uplink-hook", "xdp"],
    )
    .await;
    for i in [1, 2] {
        assert_eq!(uplink_hooks(&lab, i), ["eth0_xdp"], "asked for XDP");
    }
    reaches_pods_on_both_nodes_through_either_node(&lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_traffic_policy_local_keeps_the_client_address_and_uses_local_pods() {
    let lab = nodeport_lab('e').await;
    for entry in [1, 2] {
        let answers = from_outside(&lab, node_addr(entry, 30081), 20).await;
        for a in &answers {
            assert_eq!(
                common::node_of(&lab, &a.pod),
                lb::lab::node_name(entry),
                "only pods local to node {entry}: {a:?}"
            );
            assert!(
                a.client.starts_with(&format!("{}:", net::EXT_IP)),
                "client address kept: {a:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_ingress_and_external_ips_from_outside() {
    let lab = nodeport_lab('b').await;
    let mut lb_ip = None;
    for _ in 0..100 {
        let svc = lab.store.get(Kind::Service, "default", "web-lb").unwrap();
        lb_ip = svc["status"]["loadBalancer"]["ingress"][0]["ip"]
            .as_str()
            .map(str::to_string);
        if lb_ip.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lb_ip = lb_ip.expect("the lab's cloud controller assigns an ingress IP");
    common::wait_backends(
        &lab,
        format!("{lb_ip}:80").parse().unwrap(),
        lb_common::PROTO_TCP,
        4,
    )
    .await;
    let answers = from_outside(&lab, format!("{lb_ip}:80").parse().unwrap(), 20).await;
    assert!(
        answers
            .iter()
            .map(|a| &a.pod)
            .collect::<BTreeSet<_>>()
            .len()
            >= 2,
        "{answers:?}"
    );
    let answers = from_outside(&lab, "172.18.255.5:8000".parse().unwrap(), 10).await;
    assert_eq!(answers.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodeport_from_a_pod_to_its_own_node() {
    let lab = nodeport_lab('p').await;
    let node = common::node_of(&lab, "client");
    let index: usize = node.trim_start_matches("node-").parse().unwrap();
    let addr = node_addr(index, 30080);
    // Pods turn ready one by one; judge the spread only once the node has
    // all four in its map.
    common::wait_backends_on(&lab, index, addr, 4).await;
    common::wait_reachable(&lab, ("default", "client"), addr, Duration::from_secs(30)).await;
    let (answers, failures) = common::burst(&lab, ("default", "client"), addr, 20).await;
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(answers.len() >= 2, "{answers:?}");
}

/// A raw HTTP GET from the outside client: (status code, body).
async fn get_status(lab: &Lab, addr: SocketAddr) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let ext = lab.ext_netns();
    tokio::task::spawn_blocking(move || {
        lb::netns::run_in(&ext, move || -> anyhow::Result<(u16, String)> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            let code = resp.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
            let body = resp
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            Ok((code, body))
        })?
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_node_port_reports_local_endpoints() {
    let lab = nodeport_lab('c').await;
    let svc = lab.store.get(Kind::Service, "default", "one-lb").unwrap();
    let port = svc["spec"]["healthCheckNodePort"]
        .as_u64()
        .expect("healthCheckNodePort allocated") as u16;
    let pod = lab
        .pods_named("default", "one-")
        .into_iter()
        .next()
        .unwrap();
    let pod_node: usize = pod["spec"]["nodeName"]
        .as_str()
        .unwrap()
        .trim_start_matches("node-")
        .parse()
        .unwrap();
    let other = 3 - pod_node;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let here = get_status(&lab, node_addr(pod_node, port)).await;
        let there = get_status(&lab, node_addr(other, port)).await;
        if let (Ok((200, body)), Ok((503, other_body))) = (&here, &there) {
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["localEndpoints"], 1, "{body}");
            assert_eq!(v["service"]["name"], "one-lb");
            let v: serde_json::Value = serde_json::from_str(other_body).unwrap();
            assert_eq!(v["localEndpoints"], 0, "{other_body}");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node {pod_node}: {here:?}, node {other}: {there:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn lb_ip(lab: &Lab, name: &str) -> Option<String> {
    let svc = lab.store.get(Kind::Service, "default", name).ok()?;
    svc["status"]["loadBalancer"]["ingress"][0]["ip"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_source_ranges_from_outside() {
    let lab = nodeport_lab('g').await;
    for _ in 0..100 {
        if lb_ip(&lab, "web-lb-admits").is_some() && lb_ip(&lab, "web-lb-refuses").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admits: SocketAddr = format!("{}:80", lb_ip(&lab, "web-lb-admits").unwrap())
        .parse()
        .unwrap();
    let refuses: SocketAddr = format!("{}:80", lb_ip(&lab, "web-lb-refuses").unwrap())
        .parse()
        .unwrap();
    assert_eq!(from_outside(&lab, admits, 10).await.len(), 10);
    // The same client, the same pods, another Service: dropped.
    let err = ask(&lab.ext_netns(), refuses).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("within"),
        "dropped, so the client times out: {err:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodeport_without_endpoints_is_refused_at_once_from_outside() {
    let lab = nodeport_lab('y').await;
    // Once the agent is up (another NodePort answers), the empty one refuses.
    from_outside(&lab, node_addr(1, 30080), 1).await;
    let err = ask(&lab.ext_netns(), node_addr(1, 30090))
        .await
        .unwrap_err();
    let io = common::io_kind(&err);
    assert_eq!(io, Some(std::io::ErrorKind::ConnectionRefused), "{err:#}");
}

/// A NodePort client is judged by the backend's ingress policy with its own
/// identity, through either node: the node without the pod SNATs the flow,
/// so it judges the client itself before its address is hidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodeport_clients_are_judged_by_their_own_address_through_either_node() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use kube::api::{Api, PostParams};

    let lab = nodeport_lab('q').await;
    let client = lb::agent::client(Some(&lab.kubeconfig_path()))
        .await
        .unwrap();
    let policies: Api<NetworkPolicy> = Api::namespaced(client, "default");
    let allow_from = |cidr: &str| -> NetworkPolicy {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "one-from-outside", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "one"}},
                     "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}]}]}}))
        .unwrap()
    };
    let ext = lab.ext_netns();
    let client_ip = net::EXT_IP.to_string();
    for entry in [1, 2] {
        common::wait_backends_on(&lab, entry, node_addr(entry, 30091), 1).await;
    }
    // Allowed: the outside client by its own address, through both nodes,
    // though the pod sees the entry node's address (SNAT) through one.
    policies
        .create(
            &PostParams::default(),
            &allow_from(&format!("{client_ip}/32")),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for entry in [1, 2] {
        let answer = ask(&ext, node_addr(entry, 30091))
            .await
            .unwrap_or_else(|e| panic!("through node {entry}: {e:#}"));
        assert!(
            answer
                .client
                .starts_with(&format!("{}:", net::node_ip(entry))),
            "SNAT to the entry node: {answer:?}"
        );
    }
    // The pod client is not that address: refused at the pod.
    let pod = lab.pods_named("default", "one-").remove(0);
    let pod_addr: SocketAddr = format!("{}:8080", pod["status"]["podIP"].as_str().unwrap())
        .parse()
        .unwrap();
    assert!(common::request(&lab, ("default", "client"), pod_addr)
        .await
        .is_err());
    // Another address allowed instead: dropped through both nodes, at the
    // entry node (the pod's node would see only the entry node's address).
    let mut p = policies.get("one-from-outside").await.unwrap();
    p.spec = allow_from("172.18.0.200/32").spec;
    policies
        .replace("one-from-outside", &PostParams::default(), &p)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for entry in [1, 2] {
        let err = ask(&ext, node_addr(entry, 30091)).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("within"),
            "through node {entry}: dropped, so the client times out: {err:#}"
        );
    }
}
