//! The control path is never the reason a packet is lost: the agent killed
//! and restarted, the API server's watches dropped, compacted (410 Gone),
//! streaming lists refused, or the API server gone for 30 seconds, maps
//! changed behind its back. Clients send requests without pause through a
//! ClusterIP and a NodePort and count every failure.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::{Load, LoadReport, OpenConnection};
use lb::lab::{kinds::Kind, net, Lab};
use serde_json::json;

const CLIENT: (&str, &str) = ("default", "client");

/// The nodeport lab: Deployment web (4 pods on 2 nodes) behind web-np.
async fn lab(letter: char) -> Lab {
    let lab = common::lab_with(letter, common::test_manifests("nodeport"), 2).await;
    let vip = common::vip(&lab, "web-np", 80);
    common::wait_backends(&lab, vip, lb_common::PROTO_TCP, 4).await;
    for node in 1..=2 {
        let np = SocketAddr::new(net::node_ip(node).into(), 30080);
        common::wait_backends_on(&lab, node, np, 4).await;
    }
    lab
}

/// A client pod through the ClusterIP, and the outside client through the
/// NodePort of each node.
fn load(lab: &Lab) -> Load {
    let vip = common::vip(lab, "web-np", 80);
    let client = lab.pod_netns(CLIENT.0, CLIENT.1).expect("client pod");
    let mut targets = vec![(client, vip)];
    for node in 1..=2 {
        targets.push((
            lab.ext_netns(),
            SocketAddr::new(net::node_ip(node).into(), 30080),
        ));
    }
    Load::start(targets)
}

fn assert_no_failure(reports: &[LoadReport]) {
    for r in reports {
        assert!(
            r.answered > 0 && r.failures.is_empty(),
            "{}: {} answered, {} failed: {:#?}",
            r.target,
            r.answered,
            r.failures.len(),
            r.failures
        );
    }
}

fn summary(reports: &[LoadReport]) -> String {
    reports
        .iter()
        .map(|r| {
            format!(
                "{}: {} ok, {} failed",
                r.target,
                r.answered,
                r.failures.len()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Frontend `vip` (TCP) is programmed on every node with `n` backends
/// (`None`: absent everywhere).
async fn wait_frontend(lab: &Lab, vip: SocketAddr, n: Option<u16>) {
    let SocketAddr::V4(v4) = vip else {
        panic!("IPv4 only")
    };
    let key = lb::plan::service_key(*v4.ip(), v4.port(), lb_common::PROTO_TCP, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let counts: Vec<Option<u16>> = (1..=lab.nodes)
            .map(|node| {
                let maps = lb::datapath::Maps::open_pinned(&lab.pin_dir(node)).ok()?;
                maps.services.get(&key, 0).ok().map(|v| v.count)
            })
            .collect();
        if counts.iter().all(|c| *c == n) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{vip}: per node {counts:?}, want {n:?}\nagent on node 1:\n{}",
            common::agent_log_tail(lab, 1, 40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A ClusterIP Service in front of the web pods, created in the store.
fn web_service(name: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"selector": {"app": "web"}, "ports": [{"port": 9000, "targetPort": "http"}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_and_restarting_the_agents_loses_no_request_and_no_connection() {
    let mut lab = lab('k').await;
    let vip = common::vip(&lab, "web-np", 80);
    let conn = OpenConnection::open(&lab.pod_netns(CLIENT.0, CLIENT.1).unwrap(), vip).unwrap();
    let pod = conn.ask().await.expect("open connection answers");
    let before: Vec<usize> = (1..=2)
        .map(|n| {
            let maps = lb::datapath::Maps::open_pinned(&lab.pin_dir(n)).unwrap();
            maps.services.keys().count()
        })
        .collect();

    let load = load(&lab);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // kill -9: no chance to clean up, as in an OOM kill or a node hiccup.
    lab.kill_agent(1);
    lab.kill_agent(2);
    // The data path runs on alone from its pinned maps and links.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(conn.ask().await.expect("while no agent runs"), pod);
    // They come back to an API server that refuses streaming lists
    // (Kubernetes 1.33's default): they list in pages instead.
    lab.store.set_watch_list(false);
    lab.start_agent(1).unwrap();
    lab.start_agent(2).unwrap();
    common::wait_agent_ready(&lab, 1).await;
    common::wait_agent_ready(&lab, 2).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reports = load.stop().await;
    eprintln!("kill -9 and restart: {}", summary(&reports));
    assert_no_failure(&reports);
    assert_eq!(
        conn.ask().await.expect("after the restart"),
        pod,
        "the open connection keeps its pod"
    );
    let after: Vec<usize> = (1..=2)
        .map(|n| {
            let maps = lb::datapath::Maps::open_pinned(&lab.pin_dir(n)).unwrap();
            maps.services.keys().count()
        })
        .collect();
    assert_eq!(
        before, after,
        "adopted, not flushed and rebuilt differently"
    );
    // And the restarted agents still follow the API.
    lab.store
        .create(Kind::Service, web_service("after-restart"))
        .unwrap();
    wait_frontend(&lab, common::vip(&lab, "after-restart", 9000), Some(4)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_410_gone_and_an_absent_api_server_lose_nothing_and_converge() {
    let mut lab = lab('f').await;
    let load = load(&lab);

    // (The agents started on streaming lists, the lab serving them.)
    assert!(lab.store.watch_list());
    // A dropped watch: the agents watch again and see what follows.
    lab.store.drop_watches();
    lab.store
        .create(Kind::Service, web_service("after-drop"))
        .unwrap();
    let after_drop = common::vip(&lab, "after-drop", 9000);
    wait_frontend(&lab, after_drop, Some(4)).await;

    // 410 Gone: the history is compacted, so resuming fails and the agents
    // list again.
    lab.store.compact();
    lab.store.drop_watches();
    lab.store
        .create(Kind::Service, web_service("after-410"))
        .unwrap();
    let after_410 = common::vip(&lab, "after-410", 9000);
    wait_frontend(&lab, after_410, Some(4)).await;
    // A relist where streaming lists are refused (an API server downgraded
    // to 1.33): paged lists, and nothing lost.
    lab.store.set_watch_list(false);
    lab.store.compact();
    lab.store.drop_watches();
    lab.store
        .create(Kind::Service, web_service("paged"))
        .unwrap();
    wait_frontend(&lab, common::vip(&lab, "paged", 9000), Some(4)).await;
    lab.store.set_watch_list(true);

    // The API server gone for 30 seconds. Meanwhile the cluster changes:
    // one Service goes, another comes.
    lab.stop_api_server();
    tokio::time::sleep(Duration::from_secs(1)).await;
    lab.store
        .delete(Kind::Service, "default", "after-drop")
        .unwrap();
    // (Its own address: the lab would otherwise hand it the one just freed.)
    let mut during = web_service("during-outage");
    during["spec"]["clusterIP"] = json!("10.96.200.1");
    lab.store.create(Kind::Service, during).unwrap();
    tokio::time::sleep(Duration::from_secs(29)).await;
    // Still the last known state in the maps, still forwarding.
    wait_frontend(&lab, after_drop, Some(4)).await;
    wait_frontend(&lab, after_410, Some(4)).await;
    lab.start_api_server().await.unwrap();
    // Back: the agents list again and converge, with no stale entry left.
    wait_frontend(&lab, common::vip(&lab, "during-outage", 9000), Some(4)).await;
    wait_frontend(&lab, after_drop, None).await;
    let reports = load.stop().await;
    eprintln!("watch faults and outage: {}", summary(&reports));
    assert_no_failure(&reports);
    for node in 1..=2 {
        let scrape = common::agent_http(&lab, node, "/metrics").await.unwrap().1;
        assert_eq!(common::metric(&scrape, "lb_ready"), Some(1.0), "{scrape}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_removed_by_hand_with_bpftool_comes_back_and_is_counted() {
    let lab = common::lab_with_agent_args(
        'd',
        common::test_manifests("nodeport"),
        1,
        &["--resync-seconds", "2"],
    )
    .await;
    let vip = common::vip(&lab, "web-np", 80);
    common::wait_backends(&lab, vip, lb_common::PROTO_TCP, 4).await;
    let SocketAddr::V4(v4) = vip else {
        unreachable!()
    };
    let key = lb::plan::service_key(*v4.ip(), 80, lb_common::PROTO_TCP, 0);
    let hex: Vec<String> = bytemuck::bytes_of(&key)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let pin = lab.pin_dir(1).join("SERVICES");
    let out = std::process::Command::new("bpftool")
        .args(["map", "delete", "pinned"])
        .arg(&pin)
        .arg("key")
        .arg("hex")
        .args(&hex)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool map delete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The next resync (every 2 s here) writes it back, and says so.
    wait_frontend(&lab, vip, Some(4)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = common::agent_http(&lab, 1, "/metrics").await.unwrap().1;
        let repairs = common::metric(&scrape, "lb_drift_repairs_total").unwrap_or(0.0);
        if repairs >= 1.0 {
            eprintln!("drift repairs counted: {repairs}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{scrape}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    common::request(&lab, CLIENT, vip)
        .await
        .expect("served again");
}
