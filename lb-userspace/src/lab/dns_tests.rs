use hickory_proto::op::Query;
use serde_json::json;

use super::*;

fn zone() -> Zone {
    let services: Vec<Service> = [
        json!({"metadata": {"name": "api-service", "namespace": "default"},
               "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
        json!({"metadata": {"name": "db", "namespace": "default"},
               "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}}),
        json!({"metadata": {"name": "search", "namespace": "default"},
               "spec": {"type": "ExternalName", "externalName": "search.example.com"}}),
    ]
    .into_iter()
    .map(|v| serde_json::from_value(v).unwrap())
    .collect();
    let slices: Vec<EndpointSlice> = [json!({
        "metadata": {"name": "db-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.1.3"], "conditions": {"ready": true}},
                      {"addresses": ["10.244.2.3"], "conditions": {"ready": true}},
                      {"addresses": ["10.244.2.4"], "conditions": {"ready": false}}],
    })]
    .into_iter()
    .map(|v| serde_json::from_value(v).unwrap())
    .collect();
    Zone::from_objects(&services, &slices, ["default".to_string()])
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn rdatas(a: Answer) -> Vec<String> {
    match a {
        Answer::Records(r) => r.iter().map(|r| r.data().to_string()).collect(),
        other => vec![format!("{other:?}")],
    }
}

#[test]
fn services_resolve_to_cluster_ips_endpoints_or_names() {
    let z = zone();
    for (q, t, want) in [
        (
            "api-service.default.svc.cluster.local.",
            RecordType::A,
            vec!["10.96.0.20"],
        ),
        (
            "API-Service.default.svc.cluster.local",
            RecordType::A,
            vec!["10.96.0.20"],
        ),
        (
            "db.default.svc.cluster.local.",
            RecordType::A,
            vec!["10.244.1.3", "10.244.2.3"],
        ),
        (
            "search.default.svc.cluster.local.",
            RecordType::A,
            vec!["search.example.com."],
        ),
        (
            "_http._tcp.api-service.default.svc.cluster.local.",
            RecordType::SRV,
            vec!["0 100 80 api-service.default.svc.cluster.local."],
        ),
        (
            "10-244-1-3.default.pod.cluster.local.",
            RecordType::A,
            vec!["10.244.1.3"],
        ),
        (
            "api-service.default.svc.cluster.local.",
            RecordType::AAAA,
            vec!["NoData"],
        ),
        (
            "nothing.default.svc.cluster.local.",
            RecordType::A,
            vec!["NxDomain"],
        ),
        (
            "api-service.other.svc.cluster.local.",
            RecordType::A,
            vec!["NxDomain"],
        ),
        (
            "_pg._udp.db.default.svc.cluster.local.",
            RecordType::SRV,
            vec!["NxDomain"],
        ),
        (
            "10-244-1-3.nons.pod.cluster.local.",
            RecordType::A,
            vec!["NxDomain"],
        ),
        ("default.svc.cluster.local.", RecordType::A, vec!["NoData"]),
        ("example.com.", RecordType::A, vec!["Refused"]),
    ] {
        assert_eq!(rdatas(resolve(&z, &name(q), t)), want, "{q} {t}");
    }
}

#[test]
fn a_request_gets_a_response_with_its_id_question_and_code() {
    let z = zone();
    let ask = |q: &str, t: RecordType| {
        let mut m = Message::new();
        m.set_id(4242).set_recursion_desired(true);
        m.add_query(Query::query(name(q), t));
        Message::from_vec(&respond(&z, &m.to_vec().unwrap()).unwrap()).unwrap()
    };
    let r = ask("api-service.default.svc.cluster.local.", RecordType::A);
    assert_eq!(r.id(), 4242);
    assert_eq!(r.message_type(), MessageType::Response);
    assert_eq!(r.response_code(), ResponseCode::NoError);
    assert_eq!(r.queries().len(), 1);
    assert_eq!(r.answers()[0].data().to_string(), "10.96.0.20");
    assert_eq!(
        ask("nothing.default.svc.cluster.local.", RecordType::A).response_code(),
        ResponseCode::NXDomain
    );
    assert!(respond(&z, b"\x00\x01garbage").is_none());
}
