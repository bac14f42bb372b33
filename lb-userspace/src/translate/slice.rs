//! An EndpointSlice as the agent decodes and keeps it: the fields the
//! translation reads, nothing else. k8s-openapi's `Endpoint` carries a
//! target reference (seven strings), hints, a hostname, a zone and the
//! deprecated topology map beside the addresses: 340 bytes each with them
//! all empty, which at 10,000 Services of 10 endpoints was a third of the
//! agent's memory (34 MB of 110, measured with heaptrack). Fields the API
//! sends that are not here are skipped as the JSON is read.

use std::{net::IpAddr, sync::Arc};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::protocol_number;

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

/// What translation reads of an EndpointSlice, parsed once, when the
/// agent stores it: each address an endpoint of its own, as an address,
/// with its conditions resolved. 32 bytes an endpoint, where the decoded
/// slice above holds 40 inline and three small strings, and an
/// `ObjectMeta` of 360 bytes per slice.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SliceFacts {
    pub namespace: Arc<str>,
    pub name: Box<str>,
    /// The Service it belongs to (its `kubernetes.io/service-name`).
    pub service: Option<Box<str>>,
    /// `addressType: IPv4`: the only slices the data path programs.
    pub ipv4: bool,
    pub ports: Box<[SlicePort]>,
    pub endpoints: Box<[EndpointFacts]>,
    /// Addresses of an IPv4 slice that are not IPv4 addresses (reported).
    pub bad_addresses: Box<[Box<str>]>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SlicePort {
    pub name: Box<str>,
    pub proto: Result<u8, Box<str>>,
    pub port: Option<i32>,
}

/// One address of an endpoint. A nil condition means "unknown": ready and
/// serving count as true, terminating as false, as the API documents.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointFacts {
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Where it runs (one shared copy of each node's name).
    pub node: Option<NodeName>,
}

/// A node's name, shared by every endpoint on it: one pointer each.
pub type NodeName = Arc<Box<str>>;

impl SliceFacts {
    pub fn of(slice: &EndpointSlice) -> Self {
        Self::named(
            slice,
            slice.metadata.namespace.as_deref().unwrap_or("").into(),
            &mut |n| Arc::new(n.into()),
        )
    }

    /// `of`, with its namespace given and node names from `node_name`
    /// (the cache shares both among its slices).
    pub fn named(
        slice: &EndpointSlice,
        namespace: Arc<str>,
        node_name: &mut dyn FnMut(&str) -> NodeName,
    ) -> Self {
        let ipv4 = slice.address_type == "IPv4";
        let mut endpoints = Vec::new();
        let mut bad = Vec::new();
        for ep in slice.endpoints.iter().flatten() {
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let node = ep.node_name.as_deref().map(&mut *node_name);
            for a in ep.addresses.iter() {
                let address = match a.parse::<IpAddr>() {
                    Ok(IpAddr::V4(v4)) => IpAddr::V4(v4),
                    Ok(v6) if !ipv4 => v6,
                    _ if ipv4 => {
                        bad.push(a.clone());
                        continue;
                    }
                    _ => continue, // an FQDN slice's names: no addresses
                };
                endpoints.push(EndpointFacts {
                    address,
                    ready,
                    serving: c.and_then(|c| c.serving).unwrap_or(ready),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                    node: node.clone(),
                });
            }
        }
        let ports = slice.ports.iter().flatten().map(|p| SlicePort {
            name: p.name.as_deref().unwrap_or("").into(),
            proto: protocol_number(p.protocol.as_deref()).map_err(String::into_boxed_str),
            port: p.port,
        });
        Self {
            namespace,
            name: slice.metadata.name.as_deref().unwrap_or("").into(),
            service: slice.service_name().map(Into::into),
            ipv4,
            ports: ports.collect(),
            endpoints: endpoints.into(),
            bad_addresses: bad.into(),
        }
    }

    /// `EndpointSlice namespace/name`, as errors name it.
    pub fn object(&self) -> String {
        format!("EndpointSlice {}/{}", self.namespace, self.name)
    }
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

    /// Each address an endpoint, conditions resolved as the API documents
    /// them, a bad address kept aside to be reported, a node's name shared.
    #[test]
    fn slice_facts_are_parsed_once_and_small() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "SCTP"}],
            "endpoints": [
                {"addresses": ["10.244.1.5", "10.244.1.6"], "nodeName": "node-1"},
                {"addresses": ["10.244.1.7"], "nodeName": "node-1",
                 "conditions": {"ready": false, "terminating": true}},
                {"addresses": ["fd00::1", "not-an-ip"]}]
        }))
        .expect("slice");
        let mut names: Vec<NodeName> = Vec::new();
        let mut node_name = |n: &str| {
            if let Some(x) = names.iter().find(|x| x.as_ref().as_ref() == n) {
                return x.clone();
            }
            names.push(Arc::new(n.into()));
            names[names.len() - 1].clone()
        };
        let facts = SliceFacts::named(&slice, "shop".into(), &mut node_name);
        assert_eq!(facts.object(), "EndpointSlice shop/web-abc");
        assert_eq!(facts.service.as_deref(), Some("web"));
        assert!(facts.ipv4);
        let seen: Vec<(String, bool, bool, bool)> = facts
            .endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.ready, e.serving, e.terminating))
            .collect();
        assert_eq!(
            seen,
            [
                ("10.244.1.5".into(), true, true, false),
                ("10.244.1.6".into(), true, true, false),
                ("10.244.1.7".into(), false, false, true),
            ]
        );
        let (a, b) = (&facts.endpoints[0].node, &facts.endpoints[2].node);
        assert!(a
            .as_ref()
            .zip(b.as_ref())
            .is_some_and(|(a, b)| Arc::ptr_eq(a, b)));
        assert_eq!(
            &*facts.bad_addresses,
            ["fd00::1".into(), "not-an-ip".into()]
        );
        assert!(facts.ports[0].proto.is_err());
        assert!(std::mem::size_of::<EndpointFacts>() <= 32);
    }
}
