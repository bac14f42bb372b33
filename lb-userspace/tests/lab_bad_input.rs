//! Bad objects next to good ones: each bad one is skipped with a log line
//! and a Warning Event on it; everything else is still programmed, and the
//! agent keeps running.

mod common;

use std::{net::SocketAddr, time::Duration};

use lb::lab::kinds::Kind;
use serde_json::{json, Value};

fn service(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default"}, "spec": spec})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_objects_get_events_and_the_rest_is_programmed() {
    let lab = common::lab_with('b', common::test_manifests("bad-input"), 1).await;
    let web = json!({"app": "web"});
    let http = json!([{"port": 80, "targetPort": "http"}]);
    // (kind, name, object, what its Event must say)
    let bad: Vec<(Kind, &str, Value, &str)> = vec![
        (
            Kind::Service,
            "bad-protocol",
            service(
                "bad-protocol",
                json!({"selector": web, "ports": [{"port": 80, "protocol": "HTTP"}]}),
            ),
            "HTTP",
        ),
        (
            Kind::Service,
            "bad-external-ip",
            service(
                "bad-external-ip",
                json!({"selector": web, "ports": http, "externalIPs": ["300.1.1.1"]}),
            ),
            "300.1.1.1",
        ),
        (
            Kind::Service,
            "bad-source-range",
            service(
                "bad-source-range",
                json!({"type": "LoadBalancer", "selector": web, "ports": http,
                "loadBalancerSourceRanges": ["10.0.0.0/40"]}),
            ),
            "10.0.0.0/40",
        ),
        // Two Services on one external IP and port: the second loses it.
        (
            Kind::Service,
            "conflict-b",
            service(
                "conflict-b",
                json!({"selector": web, "ports": http, "externalIPs": ["172.18.255.7"]}),
            ),
            "already",
        ),
        // A selector-less Service with hand-made endpoints, some broken.
        (
            Kind::EndpointSlice,
            "manual-1",
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": "manual-1", "namespace": "default",
                                "labels": {"kubernetes.io/service-name": "manual"}},
                   "addressType": "IPv4",
                   "ports": [{"name": "", "port": 70000, "protocol": "TCP"}],
                   "endpoints": [{"addresses": ["10.244.1.250"]}]}),
            "70000",
        ),
        (
            Kind::EndpointSlice,
            "manual-2",
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": "manual-2", "namespace": "default",
                                "labels": {"kubernetes.io/service-name": "manual"}},
                   "addressType": "IPv4",
                   "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
                   "endpoints": [{"addresses": ["not-an-ip"]}, {"addresses": ["10.244.1.251"]}, {"addresses": ["10.244.1.251"]}]}),
            "not-an-ip",
        ),
        (
            Kind::NetworkPolicy,
            "huge-selector",
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": "huge-selector", "namespace": "default"},
                   "spec": {"podSelector": {"matchLabels": {"app": "nobody"}},
                            "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                                {"key": "app", "operator": "In",
                                 "values": (0..5000).map(|i| format!("v{i}")).collect::<Vec<_>>()}]}}]}]}}),
            "too large",
        ),
    ];
    lab.store
        .create(
            Kind::Service,
            service(
                "conflict-a",
                json!({"selector": web, "ports": http, "externalIPs": ["172.18.255.7"]}),
            ),
        )
        .unwrap();
    lab.store
        .create(
            Kind::Service,
            service(
                "manual",
                json!({"ports": [{"port": 80, "targetPort": 8080}]}),
            ),
        )
        .unwrap();
    for (kind, name, obj, _) in &bad {
        lab.store
            .create(*kind, obj.clone())
            .unwrap_or_else(|e| panic!("{name}: the API takes it, the agent must cope: {e:?}"));
    }

    // Every bad object gets its Event, saying what is wrong.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut missing: Vec<String>;
    loop {
        let (events, _) = lab.store.list(Kind::Event, Some("default"));
        missing = bad
            .iter()
            .filter(|(kind, name, _, says)| {
                !events.iter().any(|e| {
                    e["regarding"]["kind"] == kind.name()
                        && e["regarding"]["name"] == *name
                        && e["type"] == "Warning"
                        && e["note"].as_str().is_some_and(|n| n.contains(says))
                })
            })
            .map(|(kind, name, _, says)| format!("{} {name} (saying {says:?})", kind.name()))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no Event for {missing:#?}; events: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The good ones work: the Service, the first claimant of the external
    // IP (from outside), the good endpoint of the hand-made slices.
    let good = common::vip(&lab, "good", 80);
    common::wait_backends(&lab, good, lb_common::PROTO_TCP, 2).await;
    common::request(&lab, ("default", "client"), good)
        .await
        .expect("Service good");
    let external: SocketAddr = "172.18.255.7:80".parse().unwrap();
    common::wait_backends(&lab, external, lb_common::PROTO_TCP, 2).await;
    let netns = lab.ext_netns();
    tokio::task::spawn_blocking(move || {
        lb::echo::http_get_in(&netns, external, Duration::from_secs(3))
    })
    .await
    .unwrap()
    .expect("conflict-a keeps its external IP");
    common::wait_backends(
        &lab,
        common::vip(&lab, "manual", 80),
        lb_common::PROTO_TCP,
        1,
    )
    .await;

    // The agent runs on, and its metrics count what it skipped.
    let (code, _) = common::agent_http(&lab, 1, "/readyz").await.unwrap();
    assert_eq!(code, 200);
    let scrape = common::agent_http(&lab, 1, "/metrics").await.unwrap().1;
    assert!(
        common::metric(&scrape, "lb_invalid_objects{kind=\"Service\"}").unwrap_or(0.0) >= 4.0,
        "{scrape}"
    );
    assert!(
        common::metric(&scrape, "lb_invalid_objects{kind=\"NetworkPolicy\"}").unwrap_or(0.0) >= 1.0,
        "{scrape}"
    );
    let log = std::fs::read_to_string(lab.log_path("agent-node-1")).unwrap_or_default();
    for (kind, name, _, _) in &bad {
        assert!(
            log.lines()
                .any(|l| l.contains("skipped")
                    && l.contains(&format!("{} default/{name}", kind.name()))),
            "no log line for {} {name}",
            kind.name()
        );
    }
}
