use serde_json::json;

use super::*;

/// 2026-12-01T00:00:00Z, the objects' creation time below.
const CREATED: &str = "2026-12-01T00:00:00Z";

fn created_secs() -> i64 {
    seconds(CREATED).unwrap()
}

fn row(kind: Kind, obj: Value) -> Vec<Value> {
    let t = table(kind, &[obj], "7", created_secs() + 300);
    assert_eq!(t["kind"], "Table");
    assert_eq!(t["metadata"]["resourceVersion"], "7");
    let cells = t["rows"][0]["cells"].as_array().unwrap().clone();
    assert_eq!(
        cells.len(),
        t["columnDefinitions"].as_array().unwrap().len(),
        "one cell per column"
    );
    cells
}

fn strings_of(cells: &[Value]) -> Vec<String> {
    cells
        .iter()
        .map(|c| match c {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

#[test]
fn kubectl_accept_asks_for_a_table() {
    assert!(wants_table(
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
    ));
    assert!(!wants_table("application/json"));
    assert!(!wants_table(
        "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io"
    ));
}

#[test]
fn ages_as_apimachinery_writes_them() {
    for (secs, want) in [
        (-5, "<invalid>"),
        (-1, "0s"),
        (0, "0s"),
        (119, "119s"),
        (120, "2m"),
        (125, "2m5s"),
        (599, "9m59s"),
        (600, "10m"),
        (10_799, "179m"),
        (10_800, "3h"),
        (11_100, "3h5m"),
        (28_800, "8h"),
        (172_799, "47h"),
        (172_800, "2d"),
        (180_000, "2d2h"),
        (691_200, "8d"),
        (730 * 86_400, "2y"),
        (731 * 86_400, "2y1d"),
        (3_000 * 86_400, "8y"),
    ] {
        assert_eq!(human_duration(secs), want, "{secs} s");
    }
}

#[test]
fn services_print_type_addresses_and_ports() {
    let meta = json!({"name": "web", "namespace": "default", "creationTimestamp": CREATED});
    let cases = [
        (
            json!({"type": "ClusterIP", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                   "ports": [{"port": 80, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}],
                   "selector": {"tier": "web", "app": "web"}}),
            json!({}),
            [
                "web",
                "ClusterIP",
                "10.96.0.20",
                "<none>",
                "80/TCP,53/UDP",
                "5m",
                "app=web,tier=web",
            ],
        ),
        (
            json!({"type": "NodePort", "clusterIPs": ["10.96.0.21"],
                   "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}],
                   "externalIPs": ["172.18.0.50"]}),
            json!({}),
            [
                "web",
                "NodePort",
                "10.96.0.21",
                "172.18.0.50",
                "80:30080/TCP",
                "5m",
                "<none>",
            ],
        ),
        (
            json!({"type": "LoadBalancer", "clusterIPs": ["10.96.0.22"],
                   "ports": [{"port": 80, "nodePort": 31000, "protocol": "TCP"}]}),
            json!({}),
            [
                "web",
                "LoadBalancer",
                "10.96.0.22",
                "<pending>",
                "80:31000/TCP",
                "5m",
                "<none>",
            ],
        ),
        (
            json!({"type": "LoadBalancer", "clusterIPs": ["10.96.0.22"], "ports": []}),
            json!({"loadBalancer": {"ingress": [{"ip": "172.18.255.1"}]}}),
            [
                "web",
                "LoadBalancer",
                "10.96.0.22",
                "172.18.255.1",
                "<none>",
                "5m",
                "<none>",
            ],
        ),
        (
            json!({"type": "ClusterIP", "clusterIP": "None", "clusterIPs": ["None"]}),
            json!({}),
            [
                "web",
                "ClusterIP",
                "None",
                "<none>",
                "<none>",
                "5m",
                "<none>",
            ],
        ),
        (
            json!({"type": "ExternalName", "externalName": "example.com"}),
            json!({}),
            [
                "web",
                "ExternalName",
                "<none>",
                "example.com",
                "<none>",
                "5m",
                "<none>",
            ],
        ),
    ];
    for (spec, status, want) in cases {
        let svc = json!({"metadata": meta, "spec": spec, "status": status});
        assert_eq!(strings_of(&row(Kind::Service, svc)), want);
    }
}

#[test]
fn pods_print_ready_containers_status_and_where_they_run() {
    let running = json!({
        "metadata": {"name": "web-1", "creationTimestamp": CREATED},
        "spec": {"nodeName": "node-1", "containers": [{"name": "web"}, {"name": "side"}]},
        "status": {"phase": "Running", "podIP": "10.244.1.2", "podIPs": [{"ip": "10.244.1.2"}],
                   "containerStatuses": [
                       {"name": "web", "ready": true, "restartCount": 0, "state": {"running": {}}},
                       {"name": "side", "ready": false, "restartCount": 2, "state": {"running": {}}}]},
    });
    assert_eq!(
        strings_of(&row(Kind::Pod, running.clone())),
        [
            "web-1",
            "1/2",
            "Running",
            "2",
            "5m",
            "10.244.1.2",
            "node-1",
            "<none>",
            "<none>"
        ]
    );
    let mut terminating = running;
    terminating["metadata"]["deletionTimestamp"] = json!(CREATED);
    assert_eq!(strings_of(&row(Kind::Pod, terminating))[2], "Terminating");
    let pending = json!({
        "metadata": {"name": "web-2", "creationTimestamp": CREATED},
        "spec": {"containers": [{"name": "web"}]},
        "status": {"phase": "Pending"},
    });
    assert_eq!(
        strings_of(&row(Kind::Pod, pending)),
        ["web-2", "0/1", "Pending", "0", "5m", "<none>", "<none>", "<none>", "<none>"]
    );
}

#[test]
fn workloads_slices_policies_and_namespaces() {
    let deploy = json!({
        "metadata": {"name": "web", "creationTimestamp": CREATED},
        "spec": {"replicas": 4, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}}},
        "status": {"readyReplicas": 3, "updatedReplicas": 4, "availableReplicas": 3},
    });
    assert_eq!(
        strings_of(&row(Kind::Deployment, deploy)),
        ["web", "3/4", "4", "3", "5m", "web", "nginx:1.27", "app=web"]
    );
    let slice = json!({
        "metadata": {"name": "web-abc", "creationTimestamp": CREATED},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}, {"name": "metrics"}],
        "endpoints": [{"addresses": ["10.244.1.2"]}, {"addresses": ["10.244.1.3"]},
                      {"addresses": ["10.244.2.2"]}, {"addresses": ["10.244.2.3"]}],
    });
    assert_eq!(
        strings_of(&row(Kind::EndpointSlice, slice)),
        [
            "web-abc",
            "IPv4",
            "8080,metrics",
            "10.244.1.2,10.244.1.3,10.244.2.2 + 1 more...",
            "5m"
        ]
    );
    let policy = json!({
        "metadata": {"name": "deny", "creationTimestamp": CREATED},
        "spec": {"podSelector": {"matchLabels": {"app": "db"},
                 "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]},
                                      {"key": "canary", "operator": "DoesNotExist"}]}},
    });
    assert_eq!(
        strings_of(&row(Kind::NetworkPolicy, policy)),
        ["deny", "app=db,!canary,tier in (a,b)", "5m"]
    );
    let everything = json!({"metadata": {"name": "all", "creationTimestamp": CREATED},
                            "spec": {"podSelector": {}}});
    assert_eq!(
        strings_of(&row(Kind::NetworkPolicy, everything))[1],
        "<none>"
    );
    let ns = json!({"metadata": {"name": "default", "creationTimestamp": CREATED},
                    "status": {"phase": "Active"}});
    assert_eq!(
        strings_of(&row(Kind::Namespace, ns)),
        ["default", "Active", "5m"]
    );
}

#[test]
fn every_kind_has_a_cell_per_column_and_rows_carry_metadata() {
    let obj = json!({"metadata": {"name": "x", "namespace": "default", "uid": "u1",
                                  "labels": {"app": "x"}, "creationTimestamp": CREATED}});
    for kind in Kind::ALL {
        let t = table(kind, std::slice::from_ref(&obj), "1", created_secs());
        let columns = t["columnDefinitions"].as_array().unwrap().len();
        assert_eq!(
            t["rows"][0]["cells"].as_array().unwrap().len(),
            columns,
            "{kind:?}"
        );
        assert_eq!(t["rows"][0]["object"]["metadata"]["labels"]["app"], "x");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }
}

#[test]
fn endpoints_print_ip_port_pairs_the_first_three_then_a_count() {
    let ep = json!({
        "metadata": {"name": "web", "creationTimestamp": CREATED},
        "subsets": [{"addresses": [{"ip": "10.244.1.2"}, {"ip": "10.244.2.2"}],
                     "ports": [{"name": "http", "port": 8080}, {"name": "metrics", "port": 9090}]}],
    });
    assert_eq!(
        strings_of(&row(Kind::Endpoints, ep)),
        [
            "web",
            "10.244.1.2:8080,10.244.2.2:8080,10.244.1.2:9090 + 1 more...",
            "5m"
        ]
    );
    let empty = json!({"metadata": {"name": "none", "creationTimestamp": CREATED}});
    assert_eq!(
        strings_of(&row(Kind::Endpoints, empty)),
        ["none", "<none>", "5m"]
    );
}
