//! The cluster DNS a kind cluster comes with, installed in every lab: the
//! `coredns` Deployment (one replica; its pods run `lb lab dns`, see
//! `dns_server.rs`) and the `kube-dns` Service on 10.96.0.10, UDP and TCP
//! port 53, load-balanced by lb like any Service.

use serde_json::{json, Value};

use super::{
    dns::DNS_IP,
    kinds::Kind,
    probe::retry_eintr,
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

/// Whether the cluster DNS server in network namespace `netns` (its pod's)
/// answers `name` with an address now: asked over UDP from inside, as a
/// pod's resolver asks. False on no answer within `wait`.
pub fn answers(netns: &str, name: &str, wait: std::time::Duration) -> anyhow::Result<bool> {
    use hickory_proto::{
        op::{Message, Query},
        rr::{Name, RecordType},
    };
    let mut query = Message::new();
    query.set_id(0x1b);
    query.set_recursion_desired(true);
    query.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    let request = query.to_vec()?;
    let reply = crate::netns::run_in(netns, move || -> std::io::Result<Vec<u8>> {
        let sock = std::net::UdpSocket::bind(("127.0.0.1", 0))?;
        sock.set_read_timeout(Some(wait))?;
        sock.connect(("127.0.0.1", 53))?;
        retry_eintr(|| sock.send(&request))?;
        let mut buf = vec![0u8; 4096];
        let n = retry_eintr(|| sock.recv(&mut buf))?;
        buf.truncate(n);
        Ok(buf)
    })?;
    match reply {
        Ok(bytes) => Ok(!Message::from_vec(&bytes)?.answers().is_empty()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

pub fn install(store: &Store) -> Result<(), StoreError> {
    for (kind, obj) in objects() {
        store.create(kind, obj)?;
    }
    Ok(())
}
