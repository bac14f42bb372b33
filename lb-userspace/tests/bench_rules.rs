//! The end-to-end bench compares lb with rules shaped like kube-proxy's.
//! These tests check that those rules do what kube-proxy's do: in a lab
//! without the agent, a ClusterIP reaches every endpoint of its Service
//! through the iptables rules and through the nftables rules, and nothing
//! translates it when they are switched off.

mod common;

use std::{collections::BTreeSet, time::Duration};

use lb::bench::e2e::{self, Mode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_proxy_shaped_rules_spread_a_cluster_ip_over_its_endpoints() {
    let lab = e2e::workload_lab(
        &common::prefix('k'),
        std::path::Path::new(env!("CARGO_BIN_EXE_lb")),
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
    let node = lab.node_netns(1);
    e2e::load_rules(&node, &ports).expect("rules load");
    let vip = std::net::SocketAddr::from((web.cluster_ip, web.port));
    let client = ("default", "client");

    // Switched off, nothing answers on the ClusterIP.
    assert!(common::request(&lab, client, vip).await.is_err());

    for mode in [Mode::Iptables, Mode::Nftables] {
        e2e::switch(&node, mode, true).expect("switch on");
        let (answers, failures) = common::burst(&lab, client, vip, 30).await;
        e2e::switch(&node, mode, false).expect("switch off");
        assert!(failures.is_empty(), "{mode:?}: {failures:?}");
        let pods: BTreeSet<&String> = answers.keys().collect();
        assert_eq!(pods.len(), 3, "{mode:?}: answers from {answers:?}");
        // A one-endpoint Service goes to its one pod.
        let filler = ports
            .iter()
            .find(|p| p.name == "default/filler-4:http")
            .expect("filler");
        e2e::switch(&node, mode, true).expect("switch on");
        let answer = common::request(
            &lab,
            client,
            std::net::SocketAddr::from((filler.cluster_ip, 80)),
        )
        .await;
        e2e::switch(&node, mode, false).expect("switch off");
        let pod_ip = lab
            .store
            .list(lb::lab::kinds::Kind::Pod, Some("default"))
            .0
            .into_iter()
            .find(|p| p["metadata"]["name"].as_str() == answer.as_deref().ok())
            .and_then(|p| p["status"]["podIP"].as_str().map(String::from));
        assert_eq!(
            pod_ip.as_deref(),
            Some(filler.endpoints[0].ip().to_string().as_str()),
            "{mode:?}: {answer:?}"
        );
    }
    // Off again: back to no answer.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(common::request(&lab, client, vip).await.is_err());
}
