//! The engine fed one change at a time ends where one fed everything at
//! once does (the same verdict for every flow between the pods), its deltas
//! rebuild its state exactly, and a change touches only what it must.

use std::collections::BTreeMap;

use lb_common::{
    policy::{DIR_EGRESS, DIR_INGRESS},
    PROTO_TCP, PROTO_UDP,
};
use serde_json::json;

use super::*;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const APPS: [&str; 3] = ["a", "b", "c"];

fn pod(ns: &str, i: usize, app: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": format!("p{i}"), "namespace": ns, "labels": {"app": app}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
            {"name": "http", "containerPort": 8080 + (i % 2)},
            {"name": "dns", "containerPort": 5353, "protocol": "UDP"}]}]},
        "status": {"podIP": format!("10.244.1.{}", 10 + i)}}))
    .unwrap()
}

fn namespace(name: &str, team: &str) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"team": team}}})).unwrap()
}

/// Policy templates: the ways peers and ports are written.
fn policy(ns: &str, t: usize) -> NetworkPolicy {
    let spec = match t {
        0 => json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress"]}),
        1 => json!({"podSelector": {"matchLabels": {"app": "a"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}],
                         "ports": [{"port": 80}, {"port": "http"}]}]}),
        2 => json!({"podSelector": {}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]}),
        3 => json!({"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchExpressions": [
                {"key": "app", "operator": "In", "values": ["a", "c"]}]}}],
                "ports": [{"port": "http"}, {"port": "dns", "protocol": "UDP"}]}]}),
        4 => json!({"podSelector": {"matchLabels": {"app": "c"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.1.0/28", "except": ["10.244.1.12/32"]}}]}]}),
        _ => json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
            "ingress": [{}], "egress": [{"to": [{"namespaceSelector": {}}]}]}),
    };
    serde_json::from_value(
        json!({"metadata": {"name": format!("t{t}"), "namespace": ns}, "spec": spec}),
    )
    .unwrap()
}

/// The cluster as the API has it.
#[derive(Default, Clone)]
struct Cluster {
    pods: BTreeMap<(String, String), Pod>,
    namespaces: BTreeMap<String, Namespace>,
    policies: BTreeMap<(String, String), NetworkPolicy>,
}

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn node() -> NodeContext {
    NodeContext {
        name: Some("n1".into()),
        addrs: vec!["172.18.0.11".parse().unwrap()],
        ..Default::default()
    }
}

/// Every flow between two of the cluster's pods on three ports: whether
/// the sender's egress and the receiver's ingress let it through.
fn verdicts(state: &PolicyState, c: &Cluster) -> Vec<(String, bool)> {
    let ips: Vec<Ipv4Addr> = c
        .pods
        .values()
        .filter_map(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse().ok())
        .collect();
    let mut out = Vec::new();
    for from in &ips {
        for to in &ips {
            for (proto, port) in [(PROTO_TCP, 80), (PROTO_TCP, 8080), (PROTO_UDP, 5353)] {
                let egress = evaluate(state, DIR_EGRESS, *from, *to, proto, port).is_some();
                let ingress = evaluate(state, DIR_INGRESS, *to, *from, proto, port).is_some();
                out.push((format!("{from} -> {to} {proto}/{port}"), egress && ingress));
            }
        }
    }
    out
}

/// Applies a delta to a copy of the maps.
fn apply(maps: &mut PolicyState, d: &PolicyDelta) {
    fn put<K: Ord + Copy, V: Copy>(m: &mut BTreeMap<K, V>, k: &K, v: &Option<V>) {
        match v {
            Some(v) => m.insert(*k, *v),
            None => m.remove(k),
        };
    }
    d.ipcache
        .iter()
        .for_each(|(k, v)| put(&mut maps.ipcache, k, v));
    d.rules.iter().for_each(|(k, v)| put(&mut maps.rules, k, v));
    d.endpoints
        .iter()
        .for_each(|(k, v)| put(&mut maps.endpoints, k, v));
    for (k, present) in &d.peer_nodes {
        if *present {
            maps.peer_nodes.insert(*k);
        } else {
            maps.peer_nodes.remove(k);
        }
    }
}

/// One random change to the cluster, fed to the engine too.
fn step(rng: &mut Rng, c: &mut Cluster, engine: &mut PolicyEngine) -> String {
    let ns = NAMESPACES[rng.below(3)];
    match rng.below(5) {
        0 | 1 => {
            let i = rng.below(12);
            let key = (ns.to_string(), format!("p{i}"));
            if rng.below(4) == 0 {
                c.pods.remove(&key);
                engine.set_pod(&key, None);
                format!("delete pod {ns}/p{i}")
            } else {
                let app = APPS[rng.below(3)];
                // The same name may move between namespaces: one address each.
                c.pods.retain(|k, _| k.1 != key.1 || k == &key);
                for other in NAMESPACES.iter().filter(|n| **n != ns) {
                    engine.set_pod(&(other.to_string(), key.1.clone()), None);
                }
                let p = pod(ns, i, app);
                engine.set_pod(&key, Some(PodFacts::of(&p)));
                c.pods.insert(key, p);
                format!("pod {ns}/p{i} app={app}")
            }
        }
        2 => {
            let team = ["blue", "red"][rng.below(2)];
            let n = namespace(ns, team);
            engine.set_namespace(ns, Some(n.metadata.labels.clone().unwrap_or_default()));
            c.namespaces.insert(ns.to_string(), n);
            format!("namespace {ns} team={team}")
        }
        _ => {
            let t = rng.below(6);
            let key = (ns.to_string(), format!("t{t}"));
            if c.policies.contains_key(&key) && rng.below(2) == 0 {
                c.policies.remove(&key);
                engine.set_policy(&key, None);
                format!("delete policy {ns}/t{t}")
            } else {
                let p = policy(ns, t);
                engine.set_policy(&key, Some(parse_policy(&p)));
                c.policies.insert(key, p);
                format!("policy {ns}/t{t}")
            }
        }
    }
}

#[test]
fn one_change_at_a_time_ends_where_everything_at_once_does() {
    for seed in [1u64, 7, 42] {
        let mut rng = Rng(seed);
        let mut c = Cluster::default();
        let mut engine = PolicyEngine::new();
        engine.set_node(&node());
        let mut maps = PolicyState::default();
        apply(&mut maps, &engine.flush());
        for i in 0..150 {
            let what = step(&mut rng, &mut c, &mut engine);
            apply(&mut maps, &engine.flush());
            assert_eq!(
                &maps,
                engine.state(),
                "seed {seed} step {i} ({what}): deltas"
            );
            let pods: Vec<Pod> = c.pods.values().cloned().collect();
            let nss: Vec<Namespace> = c.namespaces.values().cloned().collect();
            let nps: Vec<NetworkPolicy> = c.policies.values().cloned().collect();
            let fresh = translate_policies(&pods, &nss, &nps, &node());
            let (got, want) = (verdicts(&maps, &c), verdicts(&fresh.state, &c));
            let wrong: Vec<_> = got.iter().zip(&want).filter(|(g, w)| g != w).collect();
            assert!(wrong.is_empty(), "seed {seed} step {i} ({what}): {wrong:?}");
            assert_eq!(maps.endpoints.len(), fresh.state.endpoints.len());
        }
    }
}

#[test]
fn a_relabel_touches_its_pod_and_the_rules_that_select_it_not_the_cluster() {
    let mut engine = PolicyEngine::new();
    engine.set_node(&node());
    for (i, ns) in NAMESPACES.iter().enumerate() {
        engine.set_namespace(
            ns,
            Some([("team".to_string(), ["blue", "red"][i % 2].to_string())].into()),
        );
        for t in 0..6 {
            engine.set_policy(
                &(ns.to_string(), format!("t{t}")),
                Some(parse_policy(&policy(ns, t))),
            );
        }
    }
    for i in 0..90 {
        let p = pod(NAMESPACES[i % 3], i, APPS[(i / 3) % 3]);
        engine.set_pod(
            &(NAMESPACES[i % 3].to_string(), format!("p{i}")),
            Some(PodFacts::of(&p)),
        );
    }
    engine.flush();
    let before = engine.state().clone();
    // p30 (namespace x, app b) becomes app a: both identities are others'
    // too (p39's and p36's), so no rule elsewhere gains or loses one.
    let p = pod("x", 30, "a");
    engine.set_pod(&("x".into(), "p30".into()), Some(PodFacts::of(&p)));
    let delta = engine.flush();
    let ip = u32::from("10.244.1.40".parse::<Ipv4Addr>().unwrap()).to_be();
    let own_endpoint = before.endpoints[&ip].endpoint_id;
    assert_eq!(
        delta.ipcache.keys().collect::<Vec<_>>(),
        [&(ip, 32)],
        "only its own address"
    );
    assert!(
        delta
            .rules
            .keys()
            .all(|(k, _)| k.endpoint_id == own_endpoint),
        "only its own endpoint's rules: its old and new identities are others' too"
    );
    assert!(!delta.rules.is_empty());
    assert_eq!(
        engine.state().endpoints[&ip].endpoint_id,
        own_endpoint,
        "keeps its id"
    );
    let others = |s: &PolicyState| -> Vec<(u32, u16)> {
        s.endpoints
            .iter()
            .filter(|(a, _)| **a != ip)
            .map(|(a, e)| (*a, e.endpoint_id))
            .collect()
    };
    assert_eq!(
        others(engine.state()),
        others(&before),
        "no other endpoint renumbered"
    );
}
