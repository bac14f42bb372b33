//! API discovery as kube-apiserver serves it, for the kinds of `kinds.rs`:
//! what kubectl asks before any command (`/api`, `/apis`), to learn which
//! resources exist, their verbs and short names (`svc`, `deploy`...).
//!
//! Two forms, chosen by the Accept header as kube-apiserver chooses: the
//! aggregated one (`apidiscovery.k8s.io/v2`, one answer for `/api` and one
//! for `/apis`, which kubectl 1.32 asks for first), and the legacy one
//! (`APIVersions`, `APIGroupList`, then an `APIResourceList` per group
//! version). kubectl reads the form from the response's Content-Type, not
//! from the body (client-go `discovery_client.go`).

use serde_json::{json, Value};

use super::kinds::Kind;

/// The Content-Type of an aggregated discovery answer.
pub const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// The verbs the lab's API server answers for every kind (`apiserver.rs`).
const VERBS: [&str; 7] = [
    "create", "delete", "get", "list", "patch", "update", "watch",
];

/// A group version the lab serves, in kube-apiserver's priority order
/// ("" is the core group).
struct GroupVersion {
    group: &'static str,
    version: &'static str,
    kinds: &'static [Kind],
}

static GROUPS: [GroupVersion; 5] = [
    GroupVersion {
        group: "",
        version: "v1",
        kinds: &[
            Kind::Namespace,
            Kind::Node,
            Kind::Pod,
            Kind::Service,
            Kind::Endpoints,
            Kind::Event,
        ],
    },
    GroupVersion {
        group: "apps",
        version: "v1",
        kinds: &[Kind::Deployment, Kind::ReplicaSet],
    },
    GroupVersion {
        group: "events.k8s.io",
        version: "v1",
        kinds: &[Kind::Event],
    },
    GroupVersion {
        group: "networking.k8s.io",
        version: "v1",
        kinds: &[Kind::NetworkPolicy],
    },
    GroupVersion {
        group: "discovery.k8s.io",
        version: "v1",
        kinds: &[Kind::EndpointSlice],
    },
];

impl GroupVersion {
    fn name(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Short names and categories belong to the kind's own group: the
    /// events.k8s.io copy of Event gets none, so that `ev` names one
    /// resource only (a real cluster gives both, and kubectl warns).
    fn is_home_of(&self, kind: Kind) -> bool {
        kind.api_version() == self.name()
    }
}

/// Whether an Accept header asks for aggregated discovery.
pub fn wants_aggregated(accept: &str) -> bool {
    accept.split(',').any(|media| {
        let params: Vec<&str> = media.split(';').map(str::trim).collect();
        params.contains(&"g=apidiscovery.k8s.io")
            && params.contains(&"v=v2")
            && params.contains(&"as=APIGroupDiscoveryList")
    })
}

/// The discovery answer for `path`, if it is a discovery path: its body,
/// and whether it is in the aggregated form. `server` is the address the
/// client reached (the Host header).
pub fn answer(path: &str, aggregated: bool, server: &str) -> Option<(Value, bool)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["api"] if aggregated => Some((aggregated_list(true), true)),
        ["apis"] if aggregated => Some((aggregated_list(false), true)),
        ["api"] => Some((api_versions(server), false)),
        ["apis"] => Some((group_list(), false)),
        ["api", version] => find("", version).map(|gv| (resource_list(gv), false)),
        ["apis", group] => GROUPS
            .iter()
            .find(|gv| gv.group == *group)
            .map(|gv| (group_entry(gv), false)),
        ["apis", group, version] => find(group, version).map(|gv| (resource_list(gv), false)),
        _ => None,
    }
}

/// Every group version the lab serves: (group, version, kinds).
pub fn served() -> impl Iterator<Item = (&'static str, &'static str, &'static [Kind])> {
    GROUPS.iter().map(|gv| (gv.group, gv.version, gv.kinds))
}

fn find(group: &str, version: &str) -> Option<&'static GroupVersion> {
    GROUPS
        .iter()
        .find(|gv| gv.group == group && gv.version == version)
}

fn api_versions(server: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}],
    })
}

fn group_entry(gv: &GroupVersion) -> Value {
    let version = json!({"groupVersion": gv.name(), "version": gv.version});
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": gv.group,
        "versions": [version],
        "preferredVersion": version,
    })
}

fn group_list() -> Value {
    let groups: Vec<Value> = GROUPS
        .iter()
        .filter(|gv| !gv.group.is_empty())
        .map(|gv| {
            let mut g = group_entry(gv);
            if let Some(o) = g.as_object_mut() {
                o.remove("kind");
                o.remove("apiVersion");
            }
            g
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// The legacy `APIResourceList` of a group version: subresources are
/// entries named `parent/sub`.
fn resource_list(gv: &GroupVersion) -> Value {
    let mut resources = Vec::new();
    for &kind in gv.kinds {
        let mut r = json!({
            "name": kind.plural(),
            "singularName": kind.singular(),
            "namespaced": kind.namespaced(),
            "kind": kind.name(),
            "verbs": VERBS,
        });
        if gv.is_home_of(kind) {
            r["shortNames"] = json!(kind.short_names());
            if kind.in_category_all() {
                r["categories"] = json!(["all"]);
            }
        }
        resources.push(r);
        if kind.has_status() {
            resources.push(json!({
                "name": format!("{}/status", kind.plural()),
                "singularName": "",
                "namespaced": kind.namespaced(),
                "kind": kind.name(),
                "verbs": ["get", "patch", "update"],
            }));
        }
        if kind.has_scale() {
            resources.push(json!({
                "name": format!("{}/scale", kind.plural()),
                "singularName": "",
                "namespaced": kind.namespaced(),
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv.name(),
        "resources": resources,
    })
}

/// The aggregated `APIGroupDiscoveryList` of the core group (`core`) or of
/// the named groups.
fn aggregated_list(core: bool) -> Value {
    let items: Vec<Value> = GROUPS
        .iter()
        .filter(|gv| gv.group.is_empty() == core)
        .map(|gv| {
            let resources: Vec<Value> = gv.kinds.iter().map(|&k| discovered(gv, k)).collect();
            json!({
                "metadata": {"name": gv.group},
                "versions": [{"version": gv.version, "freshness": "Current", "resources": resources}],
            })
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    })
}

fn discovered(gv: &GroupVersion, kind: Kind) -> Value {
    let response_kind = json!({"group": gv.group, "version": gv.version, "kind": kind.name()});
    let mut r = json!({
        "resource": kind.plural(),
        "responseKind": response_kind,
        "scope": if kind.namespaced() { "Namespaced" } else { "Cluster" },
        "singularResource": kind.singular(),
        "verbs": VERBS,
    });
    if gv.is_home_of(kind) {
        r["shortNames"] = json!(kind.short_names());
        if kind.in_category_all() {
            r["categories"] = json!(["all"]);
        }
    }
    let mut subresources = Vec::new();
    if kind.has_status() {
        subresources.push(json!({
            "subresource": "status",
            "responseKind": response_kind,
            "verbs": ["get", "patch", "update"],
        }));
    }
    if kind.has_scale() {
        subresources.push(json!({
            "subresource": "scale",
            "responseKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"},
            "verbs": ["get", "patch", "update"],
        }));
    }
    if !subresources.is_empty() {
        r["subresources"] = json!(subresources);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBECTL_ACCEPT: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";

    #[test]
    fn the_accept_header_chooses_the_form() {
        assert!(wants_aggregated(KUBECTL_ACCEPT));
        assert!(wants_aggregated(
            "application/json; as=APIGroupDiscoveryList; v=v2; g=apidiscovery.k8s.io"
        ));
        assert!(!wants_aggregated("application/json, */*"));
        assert!(!wants_aggregated(
            "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"
        ));
    }

    /// Every kind the lab serves is discovered where its apiVersion says,
    /// with its plural, kind and scope, in both forms.
    #[test]
    fn every_served_kind_is_discovered_in_its_group_in_both_forms() {
        for kind in Kind::ALL {
            let (group, version) = match kind.api_version().split_once('/') {
                Some((g, v)) => (g, v),
                None => ("", kind.api_version()),
            };
            let path = if group.is_empty() {
                format!("/api/{version}")
            } else {
                format!("/apis/{group}/{version}")
            };
            let (legacy, aggregated) = answer(&path, false, "x").expect("served");
            assert!(!aggregated);
            let found = legacy["resources"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["name"] == kind.plural())
                .unwrap_or_else(|| panic!("{kind:?} not in {path}"));
            assert_eq!(found["kind"], kind.name());
            assert_eq!(found["namespaced"], kind.namespaced());
            let (all, _) =
                answer(if group.is_empty() { "/api" } else { "/apis" }, true, "x").expect("served");
            let item = all["items"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["metadata"]["name"] == group)
                .unwrap_or_else(|| panic!("group {group:?} aggregated"));
            let r = item["versions"][0]["resources"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["resource"] == kind.plural())
                .unwrap_or_else(|| panic!("{kind:?} aggregated"));
            assert_eq!(r["responseKind"]["kind"], kind.name());
            assert_eq!(r["shortNames"], json!(kind.short_names()));
        }
    }

    #[test]
    fn short_names_and_categories_as_kube_apiserver_gives_them() {
        let (core, _) = answer("/api/v1", false, "x").unwrap();
        let svc = core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "services")
            .unwrap();
        assert_eq!(svc["shortNames"], json!(["svc"]));
        assert_eq!(svc["categories"], json!(["all"]));
        assert!(core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "pods/status"));
        let (events, _) = answer("/apis/events.k8s.io/v1", false, "x").unwrap();
        assert!(
            events["resources"][0].get("shortNames").is_none(),
            "ev names core Events only"
        );
        let (groups, _) = answer("/apis", false, "x").unwrap();
        let names: Vec<&str> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|g| g["name"].as_str())
            .collect();
        assert_eq!(
            names,
            [
                "apps",
                "events.k8s.io",
                "networking.k8s.io",
                "discovery.k8s.io"
            ]
        );
        assert!(answer("/apis/batch/v1", false, "x").is_none());
        assert!(answer("/api/v1/services", false, "x").is_none());
    }
}
