//! An EndpointSlice as the agent decodes and keeps it: the fields the
//! translation reads, nothing else. k8s-openapi's `Endpoint` carries a
//! target reference (seven strings), hints, a hostname, a zone and the
//! deprecated topology map beside the addresses: 340 bytes each with them
//! all empty, which at 10,000 Services of 10 endpoints was a third of the
//! agent's memory (34 MB of 110, measured with heaptrack). Fields the API
//! sends that are not here are skipped as the JSON is read.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

pub use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort};

type Api = k8s_openapi::api::discovery::v1::EndpointSlice;

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub address_type: String,
    pub endpoints: Option<Vec<Endpoint>>,
    pub ports: Option<Vec<EndpointPort>>,
    /// The Service it belongs to, moved out of its labels when the agent
    /// stores it (`Slim`): a one-entry label map costs a whole B-tree node,
    /// 500 bytes, per slice.
    #[serde(skip)]
    pub service: Option<String>,
}

impl EndpointSlice {
    /// The name of the Service the slice belongs to (in its namespace): its
    /// `kubernetes.io/service-name` label.
    pub fn service_name(&self) -> Option<&str> {
        self.service.as_deref().or_else(|| {
            self.metadata
                .labels
                .as_ref()?
                .get(super::SERVICE_NAME_LABEL)
                .map(String::as_str)
        })
    }
}

/// Boxed strings and slices, not `String`s and `Vec`s: each is read
/// once and kept as it came, so the room a `Vec` keeps to grow, and its
/// capacity word, are waste (3 MB at 100,000 endpoints).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default)]
    pub addresses: Box<[Box<str>]>,
    pub conditions: Option<EndpointConditions>,
    /// Where the endpoint runs: a local one serves `Local` traffic policies.
    pub node_name: Option<Box<str>>,
}

impl k8s_openapi::Resource for EndpointSlice {
    const API_VERSION: &'static str = <Api as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Api as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Api as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Api as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Api as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::ListableResource for EndpointSlice {
    const LIST_KIND: &'static str = <Api as k8s_openapi::ListableResource>::LIST_KIND;
}

impl k8s_openapi::Metadata for EndpointSlice {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields kept read as k8s-openapi reads them; the rest is skipped.
    #[test]
    fn a_slice_decodes_to_the_fields_translation_reads() {
        let json = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
            "endpoints": [{"addresses": ["10.244.1.5"],
                           "conditions": {"ready": true, "serving": true, "terminating": false},
                           "nodeName": "node-1", "zone": "a", "hostname": "web-1",
                           "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"},
                           "hints": {"forZones": [{"name": "a"}]},
                           "deprecatedTopology": {"k": "v"}}]
        });
        let full: Api = serde_json::from_value(json.clone()).expect("k8s-openapi");
        let slim: EndpointSlice = serde_json::from_value(json).expect("slim");
        assert_eq!(slim.metadata, full.metadata);
        assert_eq!(slim.address_type, full.address_type);
        assert_eq!(slim.ports, full.ports);
        let (a, b) = (&slim.endpoints.unwrap()[0], &full.endpoints.unwrap()[0]);
        let addresses: Vec<&str> = a.addresses.iter().map(|x| &**x).collect();
        assert_eq!(
            (addresses, &a.conditions, a.node_name.as_deref()),
            (
                b.addresses.iter().map(String::as_str).collect(),
                &b.conditions,
                b.node_name.as_deref()
            )
        );
        let sizes = (
            std::mem::size_of::<Endpoint>(),
            std::mem::size_of::<k8s_openapi::api::discovery::v1::Endpoint>(),
        );
        assert!(sizes.0 * 3 < sizes.1, "{sizes:?}");
    }
}
