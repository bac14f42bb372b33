//! The cases: the upstream e2e suite's, named as there, plus the policies of
//! the tutorials in shared/seeds. Each expectation is written from the
//! NetworkPolicy specification, not from the implementation.

use serde_json::{json, Value};

use super::{pod, Pod, Probe};

pub enum Step {
    /// Create, or replace, a policy in a namespace.
    Policy(&'static str, Value),
    PodLabels(Pod, Value),
    NamespaceLabels(&'static str, Value),
    /// Every pod pair, port and protocol against this truth function.
    Expect(Box<dyn Fn(&Probe) -> bool>),
    /// Every pod through Service x/a's ClusterIP (TCP, to x/a:80).
    ExpectService(fn(Pod) -> bool),
    ExpectNodeReachesLocalPods,
}

pub struct Case {
    pub name: &'static str,
    pub steps: Vec<Step>,
}

const XA: Pod = pod("x", "a");
const XB: Pod = pod("x", "b");
const XC: Pod = pod("x", "c");
const YA: Pod = pod("y", "a");
const YB: Pod = pod("y", "b");
const ZC: Pod = pod("z", "c");

fn np(name: &str, spec: Value) -> Value {
    json!({"metadata": {"name": name}, "spec": spec})
}

fn expect(f: impl Fn(&Probe) -> bool + 'static) -> Step {
    Step::Expect(Box::new(f))
}

fn case(name: &'static str, steps: Vec<Step>) -> Case {
    Case { name, steps }
}

fn in_x(policy: Value) -> Step {
    Step::Policy("x", policy)
}

/// x/a isolated for ingress: reached only when `allowed`.
fn ingress_to_xa(allowed: impl Fn(&Probe) -> bool + 'static) -> Step {
    expect(move |p| p.to != XA || allowed(p))
}

/// x/a isolated for egress: reaches only what is `allowed`.
fn egress_from_xa(allowed: impl Fn(&Probe) -> bool + 'static) -> Step {
    expect(move |p| p.from != XA || allowed(p))
}

fn sel(labels: Value) -> Value {
    json!({ "matchLabels": labels })
}

fn pod_a() -> Value {
    sel(json!({"pod": "a"}))
}

pub fn cases(ip: &dyn Fn(Pod) -> String) -> Vec<Case> {
    let yb_32 = format!("{}/32", ip(YB));
    vec![
        case(
            "should support a 'default-deny-ingress' policy",
            vec![
                in_x(np("deny-ingress", json!({"podSelector": {}, "policyTypes": ["Ingress"]}))),
                expect(|p| p.to.ns != "x"),
            ],
        ),
        case(
            "should support a 'default-deny-all' policy",
            vec![
                in_x(np("deny-all", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))),
                expect(|p| p.to.ns != "x" && p.from.ns != "x"),
            ],
        ),
        case(
            "should enforce policy to allow traffic from pods within server namespace based on PodSelector",
            vec![
                in_x(np("allow-b", json!({"podSelector": pod_a(), "ingress": [{"from": [{"podSelector": sel(json!({"pod": "b"}))}]}]}))),
                ingress_to_xa(|p| p.from == XB),
            ],
        ),
        case(
            "should enforce policy to allow ingress traffic from pods in all namespaces (port 80)",
            vec![
                in_x(np("allow-all-ns", json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 80}]}]}))),
                // A port without a protocol is TCP.
                ingress_to_xa(|p| p.port == 80 && p.tcp()),
            ],
        ),
        case(
            "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
            vec![
                in_x(np("allow-ns-y", json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": sel(json!({"ns": "y"}))}]}]}))),
                ingress_to_xa(|p| p.from.ns == "y"),
            ],
        ),
        case(
            "should enforce policy based on PodSelector with MatchExpressions",
            vec![
                in_x(np("allow-in-b", json!({"podSelector": pod_a(), "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b"]}]}}]}]}))),
                ingress_to_xa(|p| p.from == XB),
            ],
        ),
        case(
            "should enforce policy based on NamespaceSelector with MatchExpressions",
            vec![
                in_x(np("allow-not-x", json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}}]}]}))),
                ingress_to_xa(|p| p.from.ns != "x"),
            ],
        ),
        case(
            "should enforce policy based on PodSelector or NamespaceSelector",
            vec![
                in_x(np("allow-or", json!({"podSelector": pod_a(), "ingress": [{"from": [
                    {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}},
                    {"podSelector": sel(json!({"pod": "b"}))}]}]}))),
                ingress_to_xa(|p| p.from.ns != "x" || p.from == XB),
            ],
        ),
        case(
            "should enforce policy based on PodSelector and NamespaceSelector",
            vec![
                in_x(np("allow-and", json!({"podSelector": pod_a(), "ingress": [{"from": [
                    {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]},
                     "podSelector": sel(json!({"pod": "b"}))}]}]}))),
                ingress_to_xa(|p| p.from.ns != "x" && p.from.name == "b"),
            ],
        ),
        case(
            "should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
            vec![
                in_x(np("allow-multi", json!({"podSelector": pod_a(), "ingress": [{"from": [
                    {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["y", "z"]}]},
                     "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b", "c"]}]}}]}]}))),
                ingress_to_xa(|p| p.from.ns != "x" && p.from.name != "a"),
            ],
        ),
        case(
            "should enforce policy based on any PodSelectors",
            vec![
                in_x(np("allow-any-pod", json!({"podSelector": pod_a(), "ingress": [{"from": [{"podSelector": {}}]}]}))),
                ingress_to_xa(|p| p.from.ns == "x"),
            ],
        ),
        case(
            "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector (default namespace label)",
            vec![
                in_x(np("allow-y-a", json!({"podSelector": pod_a(), "ingress": [{"from": [
                    {"namespaceSelector": sel(json!({"kubernetes.io/metadata.name": "y"})), "podSelector": pod_a()}]}]}))),
                ingress_to_xa(|p| p.from == YA),
            ],
        ),
        case(
            "should enforce policy based on Ports",
            vec![
                in_x(np("allow-81", json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": sel(json!({"ns": "y"}))}],
                    "ports": [{"port": 81, "protocol": "TCP"}]}]}))),
                ingress_to_xa(|p| p.from.ns == "y" && p.port == 81 && p.tcp()),
            ],
        ),
        case(
            "should enforce multiple, stacked policies with overlapping podSelectors",
            vec![
                in_x(np("allow-80", json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": sel(json!({"ns": "y"}))}], "ports": [{"port": 80}]}]}))),
                in_x(np("allow-81", json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": sel(json!({"ns": "y"}))}], "ports": [{"port": 81}]}]}))),
                ingress_to_xa(|p| p.from.ns == "y" && p.tcp()),
            ],
        ),
        case(
            "should support allow-all policy",
            vec![
                in_x(np("deny-ingress", json!({"podSelector": {}, "policyTypes": ["Ingress"]}))),
                in_x(np("allow-all-to-a", json!({"podSelector": pod_a(), "ingress": [{}]}))),
                expect(|p| p.to.ns != "x" || p.to == XA),
            ],
        ),
        case(
            "should allow ingress access on one named port",
            vec![
                in_x(np("allow-named", json!({"podSelector": pod_a(), "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]}))),
                ingress_to_xa(|p| p.port == 80 && p.tcp()),
            ],
        ),
        case(
            "should allow ingress access from namespace on one named port",
            vec![
                in_x(np("allow-named-udp", json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": sel(json!({"ns": "y"}))}],
                    "ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]}))),
                ingress_to_xa(|p| p.from.ns == "y" && p.port == 81 && p.udp()),
            ],
        ),
        case(
            "should allow egress access on one named port",
            vec![
                in_x(np("egress-named", json!({"podSelector": pod_a(), "policyTypes": ["Egress"],
                    "egress": [{"ports": [{"port": "serve-80-udp", "protocol": "UDP"}]}]}))),
                egress_from_xa(|p| p.port == 80 && p.udp()),
            ],
        ),
        case(
            "should enforce updated policy",
            vec![
                in_x(np("allow-one", json!({"podSelector": pod_a(), "ingress": [{"from": [{"podSelector": sel(json!({"pod": "b"}))}]}]}))),
                ingress_to_xa(|p| p.from == XB),
                in_x(np("allow-one", json!({"podSelector": pod_a(), "ingress": [{"from": [{"podSelector": sel(json!({"pod": "c"}))}]}]}))),
                ingress_to_xa(|p| p.from == XC),
            ],
        ),
        case(
            "should allow ingress access from updated namespace",
            vec![
                in_x(np("allow-team", json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": sel(json!({"team": "t"}))}]}]}))),
                ingress_to_xa(|_| false),
                Step::NamespaceLabels("y", json!({"ns": "y", "kubernetes.io/metadata.name": "y", "team": "t"})),
                ingress_to_xa(|p| p.from.ns == "y"),
            ],
        ),
        case(
            "should allow ingress access from updated pod",
            vec![
                in_x(np("allow-probe", json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": sel(json!({"role": "probe"}))}]}]}))),
                ingress_to_xa(|_| false),
                Step::PodLabels(ZC, json!({"pod": "c", "app": "nginx", "role": "probe"})),
                ingress_to_xa(|p| p.from == ZC),
            ],
        ),
        case(
            "should deny ingress access to updated pod",
            vec![
                in_x(np("deny-target", json!({"podSelector": sel(json!({"target": "yes"})), "policyTypes": ["Ingress"]}))),
                expect(|_| true),
                Step::PodLabels(XA, json!({"pod": "a", "app": "db", "target": "yes"})),
                ingress_to_xa(|_| false),
            ],
        ),
        case(
            "should deny egress from pods based on PodSelector",
            vec![
                in_x(np("deny-egress-a", json!({"podSelector": pod_a(), "policyTypes": ["Egress"]}))),
                // x/a still answers what it is sent: replies are not new flows.
                egress_from_xa(|_| false),
            ],
        ),
        case(
            "should deny egress from all pods in a namespace",
            vec![
                in_x(np("deny-egress", json!({"podSelector": {}, "policyTypes": ["Egress"]}))),
                expect(|p| p.from.ns != "x"),
            ],
        ),
        case(
            "should work with Ingress, Egress specified together",
            vec![
                in_x(np("a-and-b", json!({"podSelector": pod_a(), "policyTypes": ["Ingress", "Egress"],
                    "ingress": [{"from": [{"podSelector": sel(json!({"pod": "b"}))}]}],
                    "egress": [{"to": [{"podSelector": sel(json!({"pod": "b"}))}]}]}))),
                expect(|p| (p.to != XA || p.from == XB) && (p.from != XA || p.to == XB)),
            ],
        ),
        case(
            "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)",
            vec![
                in_x(np("deny-egress-a", json!({"podSelector": pod_a(), "policyTypes": ["Egress"]}))),
                Step::Policy("y", np("allow-all-ingress", json!({"podSelector": {}, "ingress": [{}]}))),
                egress_from_xa(|_| false),
            ],
        ),
        case(
            "should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector",
            vec![
                in_x(np("egress-y-b", json!({"podSelector": pod_a(), "policyTypes": ["Egress"],
                    "egress": [{"to": [{"namespaceSelector": sel(json!({"ns": "y"})), "podSelector": sel(json!({"pod": "b"}))}]}]}))),
                egress_from_xa(|p| p.to == YB),
            ],
        ),
        case(
            "should enforce ingress policy allowing any port traffic to a server on a specific protocol",
            vec![
                in_x(np("udp-any-port", json!({"podSelector": pod_a(), "ingress": [{"ports": [{"protocol": "UDP"}]}]}))),
                ingress_to_xa(|p| p.udp()),
            ],
        ),
        case(
            "should enforce multiple ingress policies with ingress allow-all policy taking precedence",
            vec![
                in_x(np("allow-b-80", json!({"podSelector": pod_a(), "ingress": [{"from": [{"podSelector": sel(json!({"pod": "b"}))}], "ports": [{"port": 80}]}]}))),
                ingress_to_xa(|p| p.from == XB && p.port == 80 && p.tcp()),
                in_x(np("allow-all", json!({"podSelector": pod_a(), "ingress": [{}]}))),
                expect(|_| true),
            ],
        ),
        case(
            "should enforce multiple egress policies with egress allow-all policy taking precedence",
            vec![
                in_x(np("egress-b", json!({"podSelector": pod_a(), "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": sel(json!({"pod": "b"}))}]}]}))),
                egress_from_xa(|p| p.to == XB),
                in_x(np("egress-all", json!({"podSelector": pod_a(), "policyTypes": ["Egress"], "egress": [{}]}))),
                expect(|_| true),
            ],
        ),
        case(
            "should allow egress access to server in CIDR block",
            vec![
                in_x(np("egress-cidr", json!({"podSelector": pod_a(), "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": yb_32}}]}]}))),
                egress_from_xa(|p| p.to == YB),
            ],
        ),
        case(
            "should enforce except clause while egress access to server in CIDR block",
            vec![
                in_x(np("egress-except", json!({"podSelector": pod_a(), "policyTypes": ["Egress"],
                    "egress": [{"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": [yb_32]}}]}]}))),
                egress_from_xa(|p| p.to != YB),
            ],
        ),
        case(
            "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
            vec![
                in_x(np("egress-except", json!({"podSelector": pod_a(), "policyTypes": ["Egress"],
                    "egress": [{"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": [yb_32]}}]}]}))),
                egress_from_xa(|p| p.to != YB),
                in_x(np("egress-y-b", json!({"podSelector": pod_a(), "policyTypes": ["Egress"],
                    "egress": [{"to": [{"ipBlock": {"cidr": yb_32}}]}]}))),
                expect(|_| true),
            ],
        ),
        case(
            "should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector",
            vec![
                in_x(np("egress-all", json!({"podSelector": pod_a(), "policyTypes": ["Egress"], "egress": [{}]}))),
                expect(|_| true),
                in_x(np("deny-ingress-a", json!({"podSelector": pod_a(), "policyTypes": ["Ingress"]}))),
                ingress_to_xa(|_| false),
            ],
        ),
        case(
            "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP'",
            vec![
                in_x(np("sctp-80", json!({"podSelector": pod_a(), "ingress": [{"ports": [{"protocol": "SCTP", "port": 80}]}]}))),
                ingress_to_xa(|_| false),
            ],
        ),
        case(
            "should not allow access by TCP when a policy specifies only UDP",
            vec![
                in_x(np("udp-80", json!({"podSelector": pod_a(), "ingress": [{"ports": [{"protocol": "UDP", "port": 80}]}]}))),
                ingress_to_xa(|p| p.udp() && p.port == 80),
            ],
        ),
        case(
            "should support a port range (endPort) covering both ports",
            vec![
                in_x(np("tcp-80-81", json!({"podSelector": pod_a(), "ingress": [{"ports": [{"protocol": "TCP", "port": 80, "endPort": 81}]}]}))),
                ingress_to_xa(|p| p.tcp()),
            ],
        ),
        case(
            "should support a port range (endPort) from a namespace",
            vec![
                in_x(np("tcp-81-90", json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": sel(json!({"ns": "y"}))}],
                    "ports": [{"protocol": "TCP", "port": 81, "endPort": 90}]}]}))),
                ingress_to_xa(|p| p.from.ns == "y" && p.tcp() && p.port == 81),
            ],
        ),
        case(
            "should stop enforcing policies after they are deleted (label no longer selects)",
            vec![
                in_x(np("deny-target", json!({"podSelector": sel(json!({"app": "db"})), "policyTypes": ["Ingress"]}))),
                ingress_to_xa(|_| false),
                Step::PodLabels(XA, json!({"pod": "a"})),
                expect(|_| true),
            ],
        ),
        // The tutorials' policies (shared/seeds), on these pods: a is app=db,
        // b is app=web and role=frontend, c is app=nginx.
        case(
            "seed: deny-all (ingress: [])",
            vec![
                in_x(np("deny-all", json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}))),
                expect(|p| p.to.ns != "x"),
            ],
        ),
        case(
            "seed: db-policy (app=db from app=web on TCP 80)",
            vec![
                in_x(np("db-policy", json!({"podSelector": sel(json!({"app": "db"})), "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"podSelector": sel(json!({"app": "web"}))}], "ports": [{"protocol": "TCP", "port": 80}]}]}))),
                ingress_to_xa(|p| p.from == XB && p.port == 80 && p.tcp()),
            ],
        ),
        case(
            "seed: default-deny-ingress, allow-frontend-to-nginx, allow-all-egress",
            vec![
                in_x(np("default-deny-ingress", json!({"podSelector": {}, "policyTypes": ["Ingress"]}))),
                in_x(np("allow-frontend-to-nginx", json!({"podSelector": sel(json!({"app": "nginx"})), "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"podSelector": sel(json!({"role": "frontend"}))}], "ports": [{"protocol": "TCP", "port": 80}]}]}))),
                in_x(np("allow-all-egress", json!({"podSelector": {}, "egress": [{}], "policyTypes": ["Egress"]}))),
                expect(|p| p.to.ns != "x" || (p.to == XC && p.from == XB && p.port == 80 && p.tcp())),
            ],
        ),
        case(
            "policy applies after Service translation; a pod reaches itself through its Service",
            vec![
                in_x(np("allow-web", json!({"podSelector": pod_a(), "ingress": [{"from": [{"podSelector": sel(json!({"app": "web"}))}], "ports": [{"port": 80}]}]}))),
                ingress_to_xa(|p| p.from == XB && p.port == 80 && p.tcp()),
                Step::ExpectService(|from| from == XB || from == XA),
            ],
        ),
        case(
            "a node reaches its own pods under default-deny-all everywhere",
            vec![
                in_x(np("deny-all", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))),
                Step::Policy("y", np("deny-all", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))),
                Step::Policy("z", np("deny-all", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))),
                expect(|_| false),
                Step::ExpectNodeReachesLocalPods,
            ],
        ),
    ]
}
