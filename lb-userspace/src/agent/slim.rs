//! What the agent keeps of each object its reflectors store (Nodes, Pods,
//! Namespaces, NetworkPolicies; Services and EndpointSlices have caches of
//! their own, `cache`): only the fields its translation reads, cut before
//! the reflector stores the object. The API's objects carry much the
//! agent never looks at (managedFields, annotations such as kubectl's
//! last-applied-configuration, owner references, a Pod's volumes, images,
//! environment and status conditions): at 10,000 Pods that is most of
//! what the policy side holds. A field read by `policy` must be kept
//! here: the tests below name them.

use k8s_openapi::{
    api::{
        core::v1::{Container, Namespace, Node, Pod, PodSpec, PodStatus},
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

impl Slim for Namespace {}
impl Slim for NetworkPolicy {}

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
}
