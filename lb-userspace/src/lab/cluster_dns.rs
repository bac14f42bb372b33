//! The cluster DNS a kind cluster comes with, installed in every lab: the
//! `coredns` Deployment (one replica; its pods run `lb lab dns`, see
//! `dns_server.rs`) and the `kube-dns` Service on 10.96.0.10, UDP and TCP
//! port 53, load-balanced by lb like any Service.

use serde_json::{json, Value};

use super::{
    dns::DNS_IP,
    kinds::Kind,
    store::{Store, StoreError},
};

/// What marks a pod as the cluster DNS server: the label CoreDNS's pods carry.
const LABEL: (&str, &str) = ("k8s-app", "kube-dns");
const IMAGE: &str = "registry.k8s.io/coredns/coredns:v1.11.3";

/// What the cluster DNS adds to an agent's counts once its pod is ready:
/// (frontends, backends), one of each per port (UDP and TCP 53).
pub const PROGRAMMED: (f64, f64) = (2.0, 2.0);

pub fn is_dns_pod(pod: &Value) -> bool {
    pod["metadata"]["namespace"] == "kube-system"
        && pod["metadata"]["labels"][LABEL.0] == LABEL.1
        && pod["spec"]["containers"][0]["image"] == IMAGE
}

pub fn objects() -> [(Kind, Value); 2] {
    let ports = json!([
        {"name": "dns", "containerPort": 53, "protocol": "UDP"},
        {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
    ]);
    [
        (
            Kind::Service,
            json!({"metadata": {"name": "kube-dns", "namespace": "kube-system",
                                "labels": {LABEL.0: LABEL.1, "kubernetes.io/name": "CoreDNS"}},
                   "spec": {"clusterIP": DNS_IP.to_string(), "selector": {LABEL.0: LABEL.1},
                            "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                                      {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}]}}),
        ),
        (
            Kind::Deployment,
            json!({"metadata": {"name": "coredns", "namespace": "kube-system",
                                "labels": {LABEL.0: LABEL.1}},
                   "spec": {"replicas": 1, "selector": {"matchLabels": {LABEL.0: LABEL.1}},
                            "template": {"metadata": {"labels": {LABEL.0: LABEL.1}},
                                         "spec": {"containers": [{"name": "coredns", "image": IMAGE,
                                                                  "ports": ports}]}}}}),
        ),
    ]
}

pub fn install(store: &Store) -> Result<(), StoreError> {
    for (kind, obj) in objects() {
        store.create(kind, obj)?;
    }
    Ok(())
}
