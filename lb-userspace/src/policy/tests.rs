//! Truth tables for the translation of NetworkPolicies, evaluated the way the
//! data path looks its maps up.

use super::*;
use lb_common::{policy::DIR_EGRESS, PROTO_TCP, PROTO_UDP};
use serde_json::json;

fn ns(name: &str) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"ns": name}}})).unwrap()
}

fn pod(ns: &str, name: &str, app: &str, ip: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [
            {"name": "http", "containerPort": 8080}, {"name": "dns", "containerPort": 5353, "protocol": "UDP"}]}]},
        "status": {"podIP": ip}}))
    .unwrap()
}

fn policy(ns: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}))
        .unwrap()
}

const XA: &str = "10.244.1.2";
const XB: &str = "10.244.1.3";
const YA: &str = "10.244.2.2";
const OUT: &str = "8.8.8.8";
const NODE: &str = "172.18.0.11";

/// (from, to, proto, port, allowed) with every local pod on node n1.
type Probe = (&'static str, &'static str, u8, u16, bool);

fn check(case: &str, policies: Vec<NetworkPolicy>, probes: &[Probe]) {
    let pods = [
        pod("x", "a", "a", XA, "n1"),
        pod("x", "b", "b", XB, "n1"),
        pod("y", "a", "a", YA, "n1"),
    ];
    let node = NodeContext {
        name: Some("n1".into()),
        addrs: vec![NODE.parse().unwrap()],
        ..Default::default()
    };
    let t = translate_policies(&pods, &[ns("x"), ns("y")], &policies, &node);
    let mut wrong = Vec::new();
    for (from, to, proto, port, want) in probes {
        let (f, to_ip): (Ipv4Addr, Ipv4Addr) = (from.parse().unwrap(), to.parse().unwrap());
        // A flow needs the sender's egress and the receiver's ingress.
        let egress = evaluate(&t.state, DIR_EGRESS, f, to_ip, *proto, *port).is_some();
        let ingress = evaluate(&t.state, DIR_INGRESS, to_ip, f, *proto, *port).is_some();
        if (egress && ingress) != *want {
            wrong.push(format!("{from} -> {to} proto {proto} port {port}: want {want}, egress {egress} ingress {ingress}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "case {case}:\n{}\nerrors: {:?}",
        wrong.join("\n"),
        t.errors
    );
}

#[test]
fn deny_all_ingress_in_one_namespace() {
    check(
        "default-deny-ingress (seed)",
        vec![policy(
            "x",
            "default-deny-ingress",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        )],
        &[
            (XB, XA, PROTO_TCP, 80, false),
            (YA, XA, PROTO_TCP, 80, false),
            (XA, YA, PROTO_TCP, 80, true),
            (NODE, XA, PROTO_TCP, 80, true),
        ],
    );
}

#[test]
fn allow_from_a_pod_selector_on_a_port() {
    check(
        "allow-frontend-to-nginx (seed) / db-policy (seed)",
        vec![policy(
            "x",
            "allow",
            json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}], "ports": [{"protocol": "TCP", "port": 80}]}]}),
        )],
        &[
            (XB, XA, PROTO_TCP, 80, true),
            (XB, XA, PROTO_TCP, 81, false),
            (XB, XA, PROTO_UDP, 80, false),
            (YA, XA, PROTO_TCP, 80, false), // same labels elsewhere: podSelector alone is this namespace
            (XA, XB, PROTO_TCP, 80, true),  // b is not selected
        ],
    );
}

#[test]
fn namespace_selector_and_and_or_of_peers() {
    check(
        "namespaceSelector",
        vec![policy(
            "x",
            "ns",
            json!({"podSelector": {"matchLabels": {"app": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        )],
        &[
            (YA, XA, PROTO_TCP, 80, true),
            (XB, XA, PROTO_TCP, 80, false),
        ],
    );
    check(
        "namespaceSelector AND podSelector in one peer",
        vec![policy(
            "x",
            "and",
            json!({"podSelector": {"matchLabels": {"app": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "b"}}}]}]}),
        )],
        &[
            (XB, XA, PROTO_TCP, 80, true),
            (YA, XA, PROTO_TCP, 80, false),
        ],
    );
    check(
        "two peers OR",
        vec![policy(
            "x",
            "or",
            json!({"podSelector": {"matchLabels": {"app": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}, {"podSelector": {"matchLabels": {"app": "b"}}}]}]}),
        )],
        &[
            (XB, XA, PROTO_TCP, 80, true),
            (YA, XA, PROTO_TCP, 80, true),
            (OUT, XA, PROTO_TCP, 80, false),
        ],
    );
    check(
        "matchExpressions",
        vec![policy(
            "x",
            "expr",
            json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["a"]}]},
            "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["a"]}]}}]}]}),
        )],
        &[
            (XB, XA, PROTO_TCP, 80, true),
            (XA, XA, PROTO_TCP, 80, false),
        ],
    );
}

#[test]
fn ip_blocks_with_except_cover_pods_and_the_world() {
    check(
        "ipBlock except",
        vec![policy(
            "x",
            "cidr",
            json!({"podSelector": {"matchLabels": {"app": "a"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}]}]}),
        )],
        &[
            (XB, XA, PROTO_TCP, 80, true),
            (YA, XA, PROTO_TCP, 80, false),
            ("10.244.3.9", XA, PROTO_TCP, 80, true),
            (OUT, XA, PROTO_TCP, 80, false),
        ],
    );
    check(
        "egress to 0.0.0.0/0 except one pod",
        vec![policy(
            "x",
            "egress",
            json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [format!("{YA}/32")]}}]}]}),
        )],
        &[
            (XA, OUT, PROTO_TCP, 443, true),
            (XA, XB, PROTO_TCP, 80, true),
            (XA, YA, PROTO_TCP, 80, false),
        ],
    );
}

#[test]
fn ports_ranges_named_ports_and_protocols() {
    check(
        "endPort",
        vec![policy(
            "x",
            "range",
            json!({"podSelector": {"matchLabels": {"app": "a"}},
            "ingress": [{"ports": [{"port": 8000, "endPort": 8100}, {"protocol": "UDP", "port": "dns"}]}]}),
        )],
        &[
            (XB, XA, PROTO_TCP, 8000, true),
            (XB, XA, PROTO_TCP, 8100, true),
            (XB, XA, PROTO_TCP, 8101, false),
            (XB, XA, PROTO_UDP, 5353, true), // named port, resolved on the receiving pod
            (XB, XA, PROTO_UDP, 53, false),
        ],
    );
    check(
        "named egress port resolved on the destination",
        vec![policy(
            "x",
            "named",
            json!({"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "a"}}}], "ports": [{"port": "http"}]}]}),
        )],
        &[
            (XB, XA, PROTO_TCP, 8080, true),
            (XB, XA, PROTO_TCP, 80, false),
        ],
    );
}

#[test]
fn policy_types_empty_rules_allow_all_and_adding_up() {
    check(
        "egress rules only: Ingress and Egress both isolate",
        vec![policy(
            "x",
            "eg",
            json!({"podSelector": {"matchLabels": {"app": "a"}},
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]}),
        )],
        &[
            (XA, XB, PROTO_TCP, 80, true),
            (XA, YA, PROTO_TCP, 80, false),
            (XB, XA, PROTO_TCP, 80, false),
        ],
    );
    check(
        "allow-all-egress (seed) and ingress: [{}]",
        vec![
            policy(
                "x",
                "allow-all-egress",
                json!({"podSelector": {}, "egress": [{}], "policyTypes": ["Egress"]}),
            ),
            policy(
                "x",
                "allow-all-ingress",
                json!({"podSelector": {}, "ingress": [{}]}),
            ),
        ],
        &[
            (XA, OUT, PROTO_UDP, 53, true),
            (OUT, XA, PROTO_TCP, 1, true),
        ],
    );
    check(
        "two policies add up",
        vec![
            policy(
                "x",
                "p1",
                json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"ports": [{"port": 80}]}]}),
            ),
            policy(
                "x",
                "p2",
                json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"ports": [{"port": 81}]}]}),
            ),
        ],
        &[
            (XB, XA, PROTO_TCP, 80, true),
            (XB, XA, PROTO_TCP, 81, true),
            (XB, XA, PROTO_TCP, 82, false),
        ],
    );
}

#[test]
fn a_policy_with_a_bad_cidr_isolates_and_allows_nothing() {
    let pods = [pod("x", "a", "a", XA, "n1"), pod("x", "b", "b", XB, "n1")];
    let bad = policy(
        "x",
        "bad",
        json!({"podSelector": {"matchLabels": {"app": "a"}},
        "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/99"}}]}]}),
    );
    let node = NodeContext {
        name: Some("n1".into()),
        addrs: vec![],
        ..Default::default()
    };
    let t = translate_policies(&pods, &[ns("x")], &[bad], &node);
    assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
    assert_eq!(
        evaluate(
            &t.state,
            DIR_INGRESS,
            XA.parse().unwrap(),
            XB.parse().unwrap(),
            PROTO_TCP,
            80
        ),
        None
    );
    assert_eq!(
        evaluate(
            &t.state,
            DIR_INGRESS,
            XB.parse().unwrap(),
            XA.parse().unwrap(),
            PROTO_TCP,
            80
        ),
        Some(0),
        "b is not selected"
    );
}

#[test]
fn bad_policies_are_reported_and_fail_closed_the_good_ones_still_apply() {
    let pods = [
        pod("x", "a", "a", XA, "n1"),
        pod("x", "b", "b", XB, "n1"),
        pod("y", "a", "a", YA, "n1"),
    ];
    let huge: Vec<String> = (0..5000).map(|i| format!("v{i}")).collect();
    let bad = [
        // (policy, what its error says)
        (
            policy(
                "x",
                "huge",
                json!({"podSelector": {"matchLabels": {"app": "a"}},
                "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": huge}]}}]}]}),
            ),
            "selector too large",
        ),
        (
            policy(
                "x",
                "operator",
                json!({"podSelector": {"matchLabels": {"app": "a"}},
                "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "Near"}]}}]}]}),
            ),
            "unknown selector operator",
        ),
        (
            policy(
                "x",
                "protocol",
                json!({"podSelector": {"matchLabels": {"app": "a"}},
                "ingress": [{"ports": [{"protocol": "ICMP", "port": 80}]}]}),
            ),
            "ICMP",
        ),
        (
            policy(
                "x",
                "port",
                json!({"podSelector": {"matchLabels": {"app": "a"}},
                "ingress": [{"ports": [{"protocol": "TCP", "port": 70000}]}]}),
            ),
            "70000",
        ),
        (
            policy(
                "x",
                "endport",
                json!({"podSelector": {"matchLabels": {"app": "a"}},
                "ingress": [{"ports": [{"protocol": "TCP", "port": 90, "endPort": 80}]}]}),
            ),
            "endPort",
        ),
    ];
    // y/a is isolated by a good policy admitting x/b: that must survive
    // every bad policy next to it.
    let good = policy(
        "y",
        "good",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "b"}}}]}]}),
    );
    let node = NodeContext {
        name: Some("n1".into()),
        ..Default::default()
    };
    for (bad, says) in bad {
        let name = bad.metadata.name.clone().unwrap_or_default();
        let t = translate_policies(&pods, &[ns("x"), ns("y")], &[bad, good.clone()], &node);
        assert!(
            t.errors
                .iter()
                .any(|e| e.object == format!("NetworkPolicy x/{name}") && e.message.contains(says)),
            "{name}: {:?}",
            t.errors
        );
        let verdict = |to: &str, from: &str| {
            evaluate(
                &t.state,
                DIR_INGRESS,
                to.parse().unwrap(),
                from.parse().unwrap(),
                PROTO_TCP,
                80,
            )
        };
        assert_eq!(
            verdict(XA, XB),
            None,
            "{name}: x/a isolated, nothing allowed"
        );
        assert!(
            verdict(YA, XB).is_some(),
            "{name}: the good policy still admits x/b"
        );
        assert_eq!(
            verdict(YA, XA),
            None,
            "{name}: the good policy still isolates"
        );
    }
}
