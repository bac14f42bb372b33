use super::*;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use slice::{Endpoint, EndpointConditions, EndpointPort};

fn svc(name: &str, spec: ServiceSpec) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

fn port(name: &str, port: i32, protocol: &str) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        protocol: Some(protocol.into()),
        ..Default::default()
    }
}

fn cluster_ip(ip: &str, ports: Vec<ServicePort>) -> ServiceSpec {
    ServiceSpec {
        cluster_ip: Some(ip.into()),
        cluster_ips: Some(vec![ip.into()]),
        ports: Some(ports),
        type_: Some("ClusterIP".into()),
        ..Default::default()
    }
}

fn endpoint(ip: &str, ready: Option<bool>) -> Endpoint {
    Endpoint {
        addresses: vec![Box::from(ip)].into(),
        conditions: Some(EndpointConditions {
            ready,
            serving: ready,
            terminating: Some(false),
        }),
        ..Default::default()
    }
}

fn slice(service: &str, ports: &[(&str, i32, &str)], endpoints: Vec<Endpoint>) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service}-abcde")),
            namespace: Some("default".into()),
            labels: Some([(SERVICE_NAME_LABEL.to_string(), service.to_string())].into()),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(endpoints),
        ports: Some(
            ports
                .iter()
                .map(|(n, p, proto)| EndpointPort {
                    name: Some(n.to_string()),
                    port: Some(*p),
                    protocol: Some(proto.to_string()),
                    app_protocol: None,
                })
                .collect(),
        ),
        service: None,
    }
}

fn b(ip: &str, port: u16, proto: u8) -> BackendAddr {
    BackendAddr {
        ip: ip.parse().unwrap(),
        port,
        proto,
        local: false,
    }
}

/// (case, services, slices, expected (vip, port, proto, backends), expected error count)
type Case = (
    &'static str,
    Vec<Service>,
    Vec<EndpointSlice>,
    Vec<(&'static str, u16, u8, Vec<BackendAddr>)>,
    usize,
);

fn cases() -> Vec<Case> {
    vec![
        (
            "ClusterIP with two ready endpoints",
            vec![svc(
                "web",
                cluster_ip("10.96.0.10", vec![port("http", 80, "TCP")]),
            )],
            vec![slice(
                "web",
                &[("http", 8080, "TCP")],
                vec![
                    endpoint("10.244.1.3", Some(true)),
                    endpoint("10.244.1.2", None),
                ],
            )],
            vec![(
                "10.96.0.10",
                80,
                PROTO_TCP,
                vec![
                    b("10.244.1.2", 8080, PROTO_TCP),
                    b("10.244.1.3", 8080, PROTO_TCP),
                ],
            )],
            0,
        ),
        (
            "not-ready endpoints are left out",
            vec![svc(
                "web",
                cluster_ip("10.96.0.10", vec![port("http", 80, "TCP")]),
            )],
            vec![slice(
                "web",
                &[("http", 8080, "TCP")],
                vec![endpoint("10.244.1.3", Some(false))],
            )],
            vec![("10.96.0.10", 80, PROTO_TCP, vec![])],
            0,
        ),
        (
            "two ports, resolved by name, TCP and UDP",
            vec![svc(
                "dns",
                cluster_ip(
                    "10.96.0.53",
                    vec![port("dns", 53, "UDP"), port("dns-tcp", 53, "TCP")],
                ),
            )],
            vec![slice(
                "dns",
                &[("dns-tcp", 5353, "TCP"), ("dns", 1053, "UDP")],
                vec![endpoint("10.244.1.9", Some(true))],
            )],
            vec![
                (
                    "10.96.0.53",
                    53,
                    PROTO_UDP,
                    vec![b("10.244.1.9", 1053, PROTO_UDP)],
                ),
                (
                    "10.96.0.53",
                    53,
                    PROTO_TCP,
                    vec![b("10.244.1.9", 5353, PROTO_TCP)],
                ),
            ],
            0,
        ),
        (
            "slices of other services and duplicates are ignored",
            vec![svc(
                "web",
                cluster_ip("10.96.0.10", vec![port("", 80, "TCP")]),
            )],
            vec![
                slice(
                    "web",
                    &[("", 80, "TCP")],
                    vec![endpoint("10.244.1.2", Some(true))],
                ),
                slice(
                    "web",
                    &[("", 80, "TCP")],
                    vec![endpoint("10.244.1.2", Some(true))],
                ),
                slice(
                    "other",
                    &[("", 80, "TCP")],
                    vec![endpoint("10.244.9.9", Some(true))],
                ),
            ],
            vec![(
                "10.96.0.10",
                80,
                PROTO_TCP,
                vec![b("10.244.1.2", 80, PROTO_TCP)],
            )],
            0,
        ),
        (
            "headless and ExternalName get no frontend and no error",
            vec![
                svc("headless", cluster_ip("None", vec![port("", 80, "TCP")])),
                svc(
                    "ext",
                    ServiceSpec {
                        type_: Some("ExternalName".into()),
                        external_name: Some("example.org".into()),
                        ..Default::default()
                    },
                ),
            ],
            vec![],
            vec![],
            0,
        ),
        (
            "a bad clusterIP skips that Service only",
            vec![
                svc("bad", cluster_ip("10.96.0.300", vec![port("", 80, "TCP")])),
                svc("good", cluster_ip("10.96.0.11", vec![port("", 80, "TCP")])),
            ],
            vec![],
            vec![("10.96.0.11", 80, PROTO_TCP, vec![])],
            1,
        ),
        (
            "an unsupported protocol or port skips that port only",
            vec![svc(
                "mixed",
                cluster_ip(
                    "10.96.0.12",
                    vec![
                        port("a", 80, "SCTP"),
                        port("b", 70000, "TCP"),
                        port("c", 81, "TCP"),
                    ],
                ),
            )],
            vec![],
            vec![("10.96.0.12", 81, PROTO_TCP, vec![])],
            2,
        ),
        (
            "a bad endpoint address is reported, the good ones kept",
            vec![svc(
                "web",
                cluster_ip("10.96.0.10", vec![port("", 80, "TCP")]),
            )],
            vec![slice(
                "web",
                &[("", 80, "TCP")],
                vec![
                    endpoint("not-an-ip", Some(true)),
                    endpoint("10.244.1.2", Some(true)),
                ],
            )],
            vec![(
                "10.96.0.10",
                80,
                PROTO_TCP,
                vec![b("10.244.1.2", 80, PROTO_TCP)],
            )],
            1,
        ),
        (
            "two Services claiming one external IP and port: the older keeps it",
            vec![
                created(
                    "aa-newer",
                    "2026-01-03T00:00:00Z",
                    with_external_ip(cluster_ip("10.96.0.21", vec![port("", 80, "TCP")])),
                ),
                created(
                    "zz-older",
                    "2026-01-02T00:00:00Z",
                    with_external_ip(cluster_ip("10.96.0.20", vec![port("", 80, "TCP")])),
                ),
            ],
            vec![],
            vec![
                ("10.96.0.20", 80, PROTO_TCP, vec![]),
                ("172.18.255.5", 80, PROTO_TCP, vec![]),
                ("10.96.0.21", 80, PROTO_TCP, vec![]),
            ],
            1,
        ),
        (
            "slice ports out of range or of an unknown protocol are reported",
            vec![svc(
                "web",
                cluster_ip("10.96.0.10", vec![port("http", 80, "TCP")]),
            )],
            vec![
                slice(
                    "web",
                    &[("http", 70000, "TCP")],
                    vec![endpoint("10.244.1.2", Some(true))],
                ),
                slice(
                    "web",
                    &[("http", 8080, "HTTP")],
                    vec![endpoint("10.244.1.3", Some(true))],
                ),
                slice(
                    "web",
                    &[("http", 8080, "TCP")],
                    vec![endpoint("10.244.1.4", Some(true))],
                ),
            ],
            vec![(
                "10.96.0.10",
                80,
                PROTO_TCP,
                vec![b("10.244.1.4", 8080, PROTO_TCP)],
            )],
            2,
        ),
        (
            "an endpoint listed twice, in two slices, is one backend",
            vec![svc(
                "web",
                cluster_ip("10.96.0.10", vec![port("http", 80, "TCP")]),
            )],
            vec![
                slice(
                    "web",
                    &[("http", 8080, "TCP")],
                    vec![
                        endpoint("10.244.1.2", Some(true)),
                        endpoint("10.244.1.2", Some(true)),
                    ],
                ),
                slice(
                    "web",
                    &[("http", 8080, "TCP")],
                    vec![endpoint("10.244.1.2", Some(true))],
                ),
            ],
            vec![(
                "10.96.0.10",
                80,
                PROTO_TCP,
                vec![b("10.244.1.2", 8080, PROTO_TCP)],
            )],
            0,
        ),
    ]
}

fn created(name: &str, at: &str, spec: ServiceSpec) -> Service {
    let mut s = svc(name, spec);
    s.metadata.creation_timestamp = serde_json::from_value(serde_json::json!(at)).ok();
    s
}

fn with_external_ip(mut spec: ServiceSpec) -> ServiceSpec {
    spec.external_ips = Some(vec!["172.18.255.5".into()]);
    spec
}

#[test]
fn not_ready_endpoints_are_retained_for_established_flows() {
    let t = translate(
        &[svc(
            "web",
            cluster_ip("10.96.0.10", vec![port("http", 80, "TCP")]),
        )],
        &[slice(
            "web",
            &[("http", 8080, "TCP")],
            vec![
                endpoint("10.244.1.3", Some(false)),
                endpoint("10.244.1.2", Some(true)),
            ],
        )],
        &NodeContext::default(),
    );
    assert_eq!(
        t.services[0].backends,
        vec![b("10.244.1.2", 8080, PROTO_TCP)]
    );
    assert_eq!(
        t.services[0].retained,
        vec![b("10.244.1.3", 8080, PROTO_TCP)]
    );
}

fn terminating(ip: &str, serving: bool) -> Endpoint {
    Endpoint {
        addresses: vec![Box::from(ip)].into(),
        conditions: Some(EndpointConditions {
            ready: Some(false),
            serving: Some(serving),
            terminating: Some(true),
        }),
        ..Default::default()
    }
}

#[test]
fn serving_terminating_endpoints_are_used_only_without_ready_ones() {
    let services = [svc(
        "web",
        cluster_ip("10.96.0.10", vec![port("", 80, "TCP")]),
    )];
    let with_ready = translate(
        &services,
        &[slice(
            "web",
            &[("", 80, "TCP")],
            vec![
                terminating("10.244.1.3", true),
                endpoint("10.244.1.2", Some(true)),
            ],
        )],
        &NodeContext::default(),
    );
    assert_eq!(
        with_ready.services[0].backends,
        vec![b("10.244.1.2", 80, PROTO_TCP)]
    );
    assert_eq!(
        with_ready.services[0].retained,
        vec![b("10.244.1.3", 80, PROTO_TCP)]
    );
    let only_terminating = translate(
        &services,
        &[slice(
            "web",
            &[("", 80, "TCP")],
            vec![
                terminating("10.244.1.3", true),
                terminating("10.244.1.4", false),
            ],
        )],
        &NodeContext::default(),
    );
    assert_eq!(
        only_terminating.services[0].backends,
        vec![b("10.244.1.3", 80, PROTO_TCP)],
        "serving ones only"
    );
    assert_eq!(
        only_terminating.services[0].retained,
        vec![b("10.244.1.4", 80, PROTO_TCP)]
    );
}

#[test]
fn translation_table() {
    for (case, services, slices, want, want_errors) in cases() {
        let t = translate(&services, &slices, &NodeContext::default());
        let got: Vec<_> = t
            .services
            .iter()
            .map(|s| (s.vip.to_string(), s.port, s.proto, s.backends.clone()))
            .collect();
        let want: Vec<_> = want
            .into_iter()
            .map(|(vip, port, proto, backends)| (vip.to_string(), port, proto, backends))
            .collect();
        assert_eq!(got, want, "case: {case}");
        assert_eq!(
            t.errors.len(),
            want_errors,
            "case: {case}: errors {:?}",
            t.errors
        );
    }
}

#[test]
fn cidrs_parse_with_host_bits_masked_or_fail() {
    for (s, want) in [
        ("10.1.2.3/8", Ok(("10.0.0.0", 8))),
        ("172.18.0.100/32", Ok(("172.18.0.100", 32))),
        ("0.0.0.0/0", Ok(("0.0.0.0", 0))),
        ("10.0.0.0/33", Err(())),
        ("10.0.0.0", Err(())),
        ("300.0.0.0/8", Err(())),
        ("fd00::/8", Err(())),
    ] {
        let got = parse_cidr(s)
            .map(|(ip, len)| (ip.to_string(), len))
            .map_err(|_| ());
        assert_eq!(got, want.map(|(ip, len)| (ip.to_string(), len)), "{s}");
    }
}

#[test]
fn a_bad_source_range_leaves_out_the_load_balancer_addresses_only() {
    let lb = |ranges: &[&str]| -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "lb", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                     "ports": [{"port": 80, "nodePort": 30000}], "loadBalancerSourceRanges": ranges},
            "status": {"loadBalancer": {"ingress": [{"ip": "172.18.255.10"}]}}}))
        .unwrap()
    };
    let node = NodeContext {
        name: Some("n1".into()),
        addrs: vec!["172.18.0.11".parse().unwrap()],
        ..Default::default()
    };
    let good = translate(&[lb(&["172.18.0.0/24"])], &[] as &[EndpointSlice], &node);
    let kinds: Vec<(String, u16)> = good
        .services
        .iter()
        .map(|s| (s.vip.to_string(), s.flags))
        .collect();
    assert_eq!(
        kinds.len(),
        3,
        "ClusterIP, NodePort and LoadBalancer: {kinds:?}"
    );
    let lb_frontend = good
        .services
        .iter()
        .find(|s| s.vip.to_string() == "172.18.255.10")
        .unwrap();
    assert_eq!(
        lb_frontend.source_ranges,
        vec![("172.18.0.0".parse().unwrap(), 24)]
    );
    assert!(lb_frontend.flags & lb_common::service::SERVICE_F_SOURCE_RANGES != 0);

    let bad = translate(
        &[lb(&["172.18.0.0/24", "not-a-cidr"])],
        &[] as &[EndpointSlice],
        &node,
    );
    assert_eq!(
        bad.services.len(),
        2,
        "the LoadBalancer address is left out"
    );
    assert!(bad
        .services
        .iter()
        .all(|s| s.vip.to_string() != "172.18.255.10"));
    assert_eq!(bad.errors.len(), 1, "{:?}", bad.errors);
}
