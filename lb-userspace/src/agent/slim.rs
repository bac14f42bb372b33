//! What the agent keeps of each watched object: only the fields its
//! translation reads, cut before the reflector stores the object. The
//! API's objects carry much the agent never looks at (managedFields,
//! annotations such as kubectl's last-applied-configuration, owner
//! references, an EndpointSlice's targetRefs and hints, a Pod's volumes,
//! images, environment and status conditions): at 10,000 Services and
//! 10,000 Pods that is most of the agent's memory. A field read by
//! `translate` or `policy` must be kept here: the tests below name them.

use crate::translate::EndpointSlice;
use k8s_openapi::{
    api::{
        core::v1::{Container, Namespace, Node, Pod, PodSpec, PodStatus, Service},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    Metadata,
};

/// Cuts an object down to what the agent reads: by default its metadata
/// (`slim_meta`); kinds with more to drop say so.
pub trait Slim: Metadata<Ty = ObjectMeta> {
    fn slim(&mut self) {
        slim_meta(self.metadata_mut());
    }
}

/// Name, namespace, labels and creation time: what every kind keeps of
/// its metadata. The uid and resourceVersion are not read (Events name
/// their object; the watcher keeps its own place in the stream, from the
/// objects before they are cut): dropped here, they are also gone from the
/// reflector's key of each object, 130 bytes an object in all.
fn slim_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.uid = None;
    meta.resource_version = None;
    meta.generation = None;
    meta.generate_name = None;
    meta.self_link = None;
}

/// serde grows a Vec by doubling as it decodes: a slice of 10 endpoints
/// keeps room for 16, each a few hundred bytes. Kept for the cache's life,
/// the room is worth trimming.
fn trim<T>(v: &mut Option<Vec<T>>) {
    if let Some(v) = v {
        v.shrink_to_fit();
    }
}

impl Slim for Service {
    fn slim(&mut self) {
        slim_meta(&mut self.metadata);
        if let Some(spec) = &mut self.spec {
            // kube-proxy's part of a Service is its addresses, ports and
            // policies: the selector is the endpoint controller's (its
            // map costs a B-tree node), the families and classes the
            // allocators'.
            spec.selector = None;
            spec.ip_families = None;
            spec.ip_family_policy = None;
            spec.load_balancer_class = None;
            spec.allocate_load_balancer_node_ports = None;
            spec.publish_not_ready_addresses = None;
            spec.traffic_distribution = None;
            trim(&mut spec.ports);
            trim(&mut spec.cluster_ips);
        }
        if let Some(status) = &mut self.status {
            status.conditions = None;
        }
    }
}

impl Slim for Namespace {}
impl Slim for NetworkPolicy {}

impl Slim for EndpointSlice {
    fn slim(&mut self) {
        slim_meta(&mut self.metadata);
        // The one label read (`service_name`), out of its map.
        self.service = self.service_name().map(str::to_owned);
        self.metadata.labels = None;
        // The rest of each endpoint was skipped as it was decoded
        // (`translate::slice`).
        trim(&mut self.endpoints);
        trim(&mut self.ports);
    }
}

impl Slim for Node {
    fn slim(&mut self) {
        slim_meta(&mut self.metadata);
        if let Some(status) = &mut self.status {
            status.images = None;
            status.conditions = None;
            status.node_info = None;
            status.volumes_attached = None;
            status.volumes_in_use = None;
        }
    }
}

/// A Pod is read for its labels, address, node and named container ports
/// (`policy::PodFacts::of`).
impl Slim for Pod {
    fn slim(&mut self) {
        slim_meta(&mut self.metadata);
        self.spec = self.spec.take().map(|s| PodSpec {
            node_name: s.node_name,
            host_network: s.host_network,
            containers: s
                .containers
                .into_iter()
                .map(|c| Container {
                    name: c.name,
                    ports: c.ports,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        self.status = self.status.take().map(|s| PodStatus {
            pod_ip: s.pod_ip,
            pod_ips: s.pod_ips,
            phase: s.phase,
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse::PodFacts;

    fn pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop",
                         "labels": {"app": "web"},
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"nodeName": "node-1", "volumes": [{"name": "data"}],
                     "containers": [{"name": "web", "image": "nginx",
                                     "env": [{"name": "A", "value": "1"}],
                                     "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": "10.244.1.5", "phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("pod")
    }

    #[test]
    fn a_slim_pod_gives_the_policy_engine_the_same_facts_and_drops_the_rest() {
        let full = pod();
        let mut slim = full.clone();
        slim.slim();
        assert!(PodFacts::of(&full) == PodFacts::of(&slim));
        assert!(slim.metadata.annotations.is_none() && slim.metadata.managed_fields.is_none());
        let spec = slim.spec.as_ref().expect("spec");
        assert!(spec.volumes.is_none() && spec.containers[0].image.is_none());
        assert!(spec.containers[0].env.is_none());
        assert!(slim.status.as_ref().is_some_and(|s| s.conditions.is_none()));
    }

    #[test]
    fn a_slim_service_and_slice_keep_every_field_translation_reads() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop",
                         "annotations": {"a": "b"}},
            "spec": {"clusterIP": "10.96.0.10", "type": "NodePort",
                     "selector": {"app": "web"}, "ipFamilies": ["IPv4"],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}
        }))
        .expect("service");
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "1"}]},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": true},
                           "nodeName": "node-1", "zone": "a",
                           "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"},
                           "hints": {"forZones": [{"name": "a"}]}}]
        }))
        .expect("slice");
        let (mut slim_svc, mut slim_slice) = (svc.clone(), slice.clone());
        slim_svc.slim();
        slim_slice.slim();
        let read = |s: &Service| {
            let node = crate::translate::NodeContext {
                name: Some("node-1".into()),
                addrs: vec!["172.18.0.2".parse().expect("address")],
                peers: vec![],
            };
            crate::translate::translate_service(s, &[], &node)
        };
        assert_eq!(read(&slim_svc), read(&svc));
        let spec = slim_svc.spec.as_ref().expect("spec");
        assert!(spec.selector.is_none() && spec.ip_families.is_none());
        assert_eq!(slim_slice.ports, slice.ports);
        assert_eq!(slim_slice.service_name(), Some("web"));
        assert!(slim_slice.metadata.labels.is_none());
        let first = |s: &EndpointSlice| s.endpoints.as_ref().and_then(|e| e.first()).cloned();
        let (Some(a), Some(b)) = (first(&slim_slice), first(&slice)) else {
            panic!("the slices lost their endpoint");
        };
        assert_eq!(a, b);
        assert!(slim_slice.metadata.owner_references.is_none());
    }
}
