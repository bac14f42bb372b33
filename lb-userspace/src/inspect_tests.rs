use lb_common::{
    backend::Backend,
    policy::{EndpointInfo, PolicyKey},
    service::{ServiceKey, ServiceValue},
};

use super::*;
use crate::plan::service_key;

fn be(a: &str) -> u32 {
    u32::from(a.parse::<Ipv4Addr>().unwrap()).to_be()
}

/// A ClusterIP with two backends (one local) and ClientIP affinity, and a
/// NodePort whose slot names a backend missing from the map.
fn state() -> MapState {
    let mut s = MapState::default();
    let vip: Ipv4Addr = "10.96.0.2".parse().unwrap();
    s.services.insert(
        service_key(vip, 80, 6, 0),
        ServiceValue {
            count: 2,
            flags: SERVICE_F_CLUSTER_IP | SERVICE_F_AFFINITY,
            rev_nat_id: 5,
            affinity_timeout: 10800,
            ..Default::default()
        },
    );
    for (slot, id) in [(1, 7), (2, 9)] {
        s.services.insert(
            service_key(vip, 80, 6, slot),
            ServiceValue {
                backend_id: id,
                rev_nat_id: 5,
                ..Default::default()
            },
        );
    }
    s.backends.insert(
        7,
        Backend {
            addr: be("10.244.1.2"),
            port: 5000u16.to_be(),
            proto: 6,
            flags: BACKEND_F_LOCAL,
        },
    );
    s.backends.insert(
        9,
        Backend {
            addr: be("10.244.2.3"),
            port: 5000u16.to_be(),
            proto: 6,
            flags: 0,
        },
    );
    let node: Ipv4Addr = "172.18.0.2".parse().unwrap();
    s.services.insert(
        service_key(node, 30080, 17, 0),
        ServiceValue {
            count: 1,
            flags: SERVICE_F_NODE_PORT | SERVICE_F_LOCAL,
            rev_nat_id: 6,
            ..Default::default()
        },
    );
    s.services.insert(
        ServiceKey {
            slot: 1,
            ..service_key(node, 30080, 17, 0)
        },
        ServiceValue {
            backend_id: 42,
            rev_nat_id: 6,
            ..Default::default()
        },
    );
    s
}

#[test]
fn services_are_grouped_by_frontend_with_their_slots() {
    let v = services_view(&state());
    assert_eq!(v.len(), 2);
    assert_eq!(v[0].frontend, "10.96.0.2:80");
    assert_eq!(v[0].protocol, "TCP");
    assert_eq!(v[0].types, vec!["ClusterIP"]);
    assert_eq!(v[0].affinity_timeout_seconds, Some(10800));
    assert_eq!(
        v[0].backends,
        vec![
            SlotView {
                slot: 1,
                backend_id: 7,
                address: Some("10.244.1.2:5000".into()),
                local: true
            },
            SlotView {
                slot: 2,
                backend_id: 9,
                address: Some("10.244.2.3:5000".into()),
                local: false
            },
        ]
    );
    assert_eq!(v[1].frontend, "172.18.0.2:30080");
    assert_eq!(v[1].protocol, "UDP");
    assert_eq!(v[1].types, vec!["NodePort", "Local"]);
    assert_eq!(v[1].backends[0].address, None);

    let table = render_services(&v);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("FRONTEND"), "{table}");
    assert!(
        lines[1].starts_with("10.96.0.2:80")
            && lines[1].contains("(2 backends)")
            && lines[1].contains("[ClusterIP, ClientIP affinity 10800s]"),
        "{table}"
    );
    assert!(
        lines[2].contains("10.244.1.2:5000") && lines[2].ends_with("[local]"),
        "{table}"
    );
    assert!(lines[5].contains("(missing)"), "{table}");
}

#[test]
fn backends_list_every_entry() {
    let v = backends_view(&state());
    assert_eq!(
        v,
        vec![
            BackendView {
                id: 7,
                address: "10.244.1.2:5000".into(),
                protocol: "TCP".into(),
                local: true
            },
            BackendView {
                id: 9,
                address: "10.244.2.3:5000".into(),
                protocol: "TCP".into(),
                local: false
            },
        ]
    );
    let json: serde_json::Value =
        serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
    assert_eq!(json[1]["address"], "10.244.2.3:5000");
}

#[test]
fn conntrack_entries_show_translation_idle_time_and_flags() {
    let key = ConntrackKey {
        saddr: be("10.244.1.9"),
        daddr: be("10.96.0.2"),
        sport: 40000u16.to_be(),
        dport: 80u16.to_be(),
        proto: 6,
        direction: CT_FORWARD,
        pad0: 0,
    };
    let entry = ConntrackEntry {
        last_seen_ns: 5_000_000_000,
        nat_addr: be("10.244.1.2"),
        nat_port: 5000u16.to_be(),
        rev_nat_id: 5,
        backend_id: 7,
        flags: CT_F_CLOSING,
        ..Default::default()
    };
    let reply = ConntrackKey {
        direction: CT_REPLY,
        ..key
    };
    let external = ConntrackEntry {
        flags: CT_F_EXTERNAL,
        snat_addr: be("172.18.0.2"),
        snat_port: 61000u16.to_be(),
        ..entry
    };
    let v = conntrack_view(&[(reply, external), (key, entry)], 12_500_000_000);
    assert_eq!(v[0].kind, "forward");
    assert_eq!(v[0].source, "10.244.1.9:40000");
    assert_eq!(v[0].destination, "10.96.0.2:80");
    assert_eq!(v[0].nat.as_deref(), Some("10.244.1.2:5000"));
    assert_eq!(v[0].idle_seconds, 7);
    assert_eq!(v[0].flags, vec!["closing"]);
    assert_eq!(v[0].snat, None);
    assert_eq!(v[1].kind, "reply");
    assert_eq!(v[1].snat.as_deref(), Some("172.18.0.2:61000"));
    let table = render_conntrack(&v);
    assert!(
        table
            .lines()
            .nth(2)
            .unwrap()
            .ends_with("external,snat 172.18.0.2:61000"),
        "{table}"
    );
}

#[test]
fn policy_rules_show_wildcards_and_port_ranges() {
    let mut s = PolicyState::default();
    s.endpoints.insert(
        be("10.244.1.2"),
        EndpointInfo {
            endpoint_id: 3,
            flags: ENDPOINT_F_INGRESS_ISOLATED,
        },
    );
    let key = |proto, identity, port: u16| PolicyKey {
        endpoint_id: 3,
        direction: DIR_INGRESS,
        proto,
        identity,
        port: port.to_be(),
        pad0: 0,
    };
    // TCP 5000 from identity 300; ports 8000-8003 (endPort) from anyone;
    // everything from the world.
    s.rules.insert((key(6, 300, 5000), 16), 1);
    s.rules.insert((key(6, 0, 8000), 14), 2);
    s.rules.insert((key(0, IDENTITY_WORLD, 0), 0), 3);
    s.ipcache.insert((be("10.244.1.2"), 32), 300);
    s.ipcache.insert((be("0.0.0.0"), 0), IDENTITY_WORLD);
    let v = policy_view(&s);
    assert_eq!(
        v.endpoints,
        vec![EndpointView {
            address: "10.244.1.2".into(),
            endpoint_id: 3,
            ingress_isolated: true,
            egress_isolated: false
        }]
    );
    let rules: Vec<(String, String, String, u32)> = v
        .rules
        .iter()
        .map(|r| {
            (
                r.protocol.clone(),
                r.identity.clone(),
                r.ports.clone(),
                r.rule_id,
            )
        })
        .collect();
    assert!(rules.contains(&("TCP".into(), "300".into(), "5000".into(), 1)));
    assert!(rules.contains(&("TCP".into(), "any".into(), "8000-8003".into(), 2)));
    assert!(rules.contains(&("ANY".into(), "world".into(), "any".into(), 3)));
    assert!(render_policy(&v).contains("10.244.1.2              3  ingress"));

    let ids = identities_view(&s);
    assert_eq!(ids[0].prefix, "0.0.0.0/0");
    assert_eq!(ids[0].name, "world");
    assert_eq!(ids[1].prefix, "10.244.1.2/32");
    let table = render_identities(&ids);
    assert!(table.contains("0.0.0.0/0            2 (world)"), "{table}");
    assert!(table.contains("10.244.1.2/32        300\n"), "{table}");
}
