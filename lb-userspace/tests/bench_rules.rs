//! The end-to-end bench compares lb with rules shaped like kube-proxy's.
//! This test checks that those rules do what kube-proxy's do: in a lab
//! without the agent, a ClusterIP reaches every endpoint of its Service
//! through the iptables rules (from the pod they serve) and through the
//! nftables rules (from theirs), and nothing translates it for a pod that
//! neither serves. And the data path bench's cost probes and uplink
//! packets measure what they say they do.

mod common;

use std::{collections::BTreeSet, net::SocketAddr};

use lb::bench::e2e;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_proxy_shaped_rules_spread_a_cluster_ip_over_its_endpoints() {
    let lab = e2e::workload_lab(
        &common::prefix('k'),
        std::path::Path::new(env!("CARGO_BIN_EXE_lb")),
        false,
        false,
    )
    .await
    .expect("lab without agent");
    let echo = e2e::echo_pods(&lab).expect("echo pods");
    // Ten more Services of one endpoint each: the rules carry them all.
    e2e::add_fillers(&lab, 1, 11, &echo).expect("fillers");
    let ports = e2e::service_ports(&lab);
    assert_eq!(ports.len(), 11);
    let web = ports
        .iter()
        .find(|p| p.name == "default/web:http")
        .expect("web")
        .clone();
    assert_eq!(web.endpoints.len(), 3);
    let filler = ports
        .iter()
        .find(|p| p.name == "default/filler-4:http")
        .expect("filler")
        .clone();
    let node = lab.node_netns(1);
    let ip = |pod: &str| e2e::pod_ip(&lab, pod).expect("pod address");
    e2e::load_rules(&node, &ports, ip("client"), ip("client-2")).expect("rules load");
    // Loading again (the next Service count) keeps one hook, not two.
    e2e::load_rules(&node, &ports, ip("client"), ip("client-2")).expect("rules reload");
    let vip = SocketAddr::from((web.cluster_ip, web.port));

    // A pod neither rule set serves gets no answer on the ClusterIP.
    assert!(common::request(&lab, ("default", "direct"), vip)
        .await
        .is_err());

    for client in ["client", "client-2"] {
        let (answers, failures) = common::burst(&lab, ("default", client), vip, 30).await;
        assert!(failures.is_empty(), "{client}: {failures:?}");
        let pods: BTreeSet<&String> = answers.keys().collect();
        assert_eq!(pods.len(), 3, "{client}: answers from {answers:?}");
        // A one-endpoint Service goes to its one pod.
        let answer = common::request(
            &lab,
            ("default", client),
            SocketAddr::from((filler.cluster_ip, 80)),
        )
        .await
        .expect("filler answers");
        assert_eq!(
            ip(&answer),
            *filler.endpoints[0].ip(),
            "{client}: answered by {answer}"
        );
    }
    let hooks = lb::netns::command_in(&node, "iptables", false)
        .expect("iptables")
        .args(["-t", "nat", "-S", "PREROUTING"])
        .output()
        .expect("iptables -S");
    let hooks = String::from_utf8_lossy(&hooks.stdout);
    assert_eq!(hooks.matches("KUBE-SERVICES").count(), 1, "{hooks}");
}

/// Each cost probe passes the verifier and does its one operation on the
/// bench's packet and maps (`measure_probes` fails on a probe whose lookup
/// that must hit missed, or that changed the packet), and a path's model
/// names only probes that exist.
#[test]
fn every_cost_probe_does_its_operation() {
    use lb::bench::{costs, datapath::Scenario};
    let rows = costs::measure_probes(10, 1, 5).expect("every probe did its operation");
    let names: Vec<&str> = rows.iter().map(|m| m.label.as_str()).collect();
    let probes: Vec<&str> = costs::PROBES.iter().map(|p| p.id).collect();
    assert_eq!(names, probes);
    for scenario in Scenario::ALL {
        for (id, _) in costs::model(scenario) {
            assert!(probes.contains(id), "{scenario:?}: no probe {id}");
        }
    }
}

/// The uplink bench's packets do what its table says on both hooks: a new
/// flow from outside leaves DNATed to a backend and SNATed to the node, an
/// established one as its first packet did, a packet for no Service
/// unchanged (`uplink::measure` checks every run's verdict and bytes).
#[test]
fn the_uplink_bench_checks_every_path_on_both_hooks() {
    use lb::bench::uplink::{self, Hook, UplinkPath};
    for hook in Hook::ALL {
        for path in UplinkPath::ALL {
            let m = uplink::measure(path, hook, 10, 2, 20)
                .unwrap_or_else(|e| panic!("{}: {e:#}", uplink::label(path, hook)));
            assert_eq!(m.runs, 40);
            assert!(m.ns.median > 0.0, "{}: not timed", m.label);
        }
    }
}
