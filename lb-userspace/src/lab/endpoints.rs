//! The EndpointSlice controller: for each Service with a selector, slices of
//! the matching Pods' addresses, grouped by resolved target ports (a named
//! targetPort resolves per Pod through its containers' named ports).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::{
    controllers::ServiceRef,
    endpoints_v1,
    kinds::Kind,
    objects::{is_terminating, labels_match, owner_ref, pod_ready, short_hash},
    store::{meta_str, Store},
};

pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const CONTROLLER: &str = "endpointslice-controller.lb-lab";
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";

/// The number a Service port's targetPort means for this pod, if any.
fn resolve_target_port(svc_port: &Value, pod: &Value) -> Option<i64> {
    let target = &svc_port["targetPort"];
    if let Some(n) = target.as_i64() {
        return Some(n);
    }
    let Some(name) = target.as_str() else {
        return svc_port["port"].as_i64();
    };
    if let Ok(n) = name.parse::<i64>() {
        return Some(n);
    }
    pod["spec"]["containers"].as_array()?.iter().find_map(|c| {
        c["ports"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_i64())
    })
}

/// The slices a Service should have, by name.
pub fn desired_slices(svc: &Value, pods: &[Value]) -> BTreeMap<String, Value> {
    let (ns, name) = (meta_str(svc, "namespace"), meta_str(svc, "name"));
    let selector = &svc["spec"]["selector"];
    let svc_ports = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
    let mut groups: BTreeMap<String, (Value, Vec<Value>)> = BTreeMap::new();
    for pod in pods {
        if meta_str(pod, "namespace") != ns || !labels_match(selector, &pod["metadata"]["labels"]) {
            continue;
        }
        let Some(ip) = pod["status"]["podIP"].as_str() else {
            continue;
        };
        let ports: Vec<Value> = svc_ports
            .iter()
            .filter_map(|sp| {
                let port = resolve_target_port(sp, pod)?;
                Some(
                    json!({"name": sp["name"].as_str().unwrap_or(""), "port": port,
                            "protocol": sp["protocol"].as_str().unwrap_or("TCP")}),
                )
            })
            .collect();
        let ports = Value::Array(ports);
        let terminating = is_terminating(pod);
        let serving = pod_ready(pod);
        let endpoint = json!({
            "addresses": [ip],
            "conditions": {"ready": serving && !terminating, "serving": serving, "terminating": terminating},
            "nodeName": pod["spec"]["nodeName"],
            "targetRef": {"kind": "Pod", "namespace": ns, "name": meta_str(pod, "name"), "uid": meta_str(pod, "uid")},
        });
        groups
            .entry(ports.to_string())
            .or_insert_with(|| (ports.clone(), vec![]))
            .1
            .push(endpoint);
    }
    if groups.is_empty() {
        groups.insert("[]".into(), (json!([]), vec![]));
    }
    groups
        .into_iter()
        .map(|(key, (ports, mut endpoints))| {
            endpoints.sort_by(|a, b| a["addresses"][0].as_str().cmp(&b["addresses"][0].as_str()));
            let slice_name = format!("{name}-{}", short_hash(&key, 5));
            let slice = json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": slice_name, "namespace": ns, "ownerReferences": owner_ref(svc),
                             "labels": {SERVICE_NAME: name, MANAGED_BY: CONTROLLER}},
                "addressType": "IPv4", "endpoints": endpoints, "ports": ports,
            });
            (slice_name, slice)
        })
        .collect()
}

fn same_content(a: &Value, b: &Value) -> bool {
    a["endpoints"] == b["endpoints"]
        && a["ports"] == b["ports"]
        && a["metadata"]["labels"] == b["metadata"]["labels"]
}

/// What the store holds now for one Service: the Service (if any), the
/// slices this controller wrote for it, by name, and its v1 Endpoints.
struct Current {
    svc: Option<Value>,
    slices: BTreeMap<String, Value>,
    endpoints: Option<Value>,
}

fn current(store: &Store, ns: &str, name: &str) -> Current {
    let inner = store.lock();
    // Slices are named after their Service: one short range of the store.
    let prefix = format!("{name}-");
    let slices = inner
        .with_prefix(Kind::EndpointSlice, ns, &prefix)
        .filter(|s| {
            s["metadata"]["labels"][MANAGED_BY] == CONTROLLER
                && s["metadata"]["labels"][SERVICE_NAME] == name
        })
        .map(|s| (meta_str(s, "name").to_string(), s.clone()))
        .collect();
    Current {
        svc: inner.get(Kind::Service, ns, name).cloned(),
        slices,
        endpoints: inner.get(Kind::Endpoints, ns, name).cloned(),
    }
}

/// Whether this controller keeps the Service's endpoints: it has a
/// selector and is not an ExternalName.
fn covered(svc: &Value) -> bool {
    svc["spec"]["selector"]
        .as_object()
        .is_some_and(|s| !s.is_empty())
        && svc["spec"]["type"] != "ExternalName"
}

/// Reconciles the slices and v1 Endpoints of `services` (each may be
/// gone, and then so go its slices and Endpoints).
pub fn reconcile(store: &Store, services: &BTreeSet<ServiceRef>) {
    let mut by_namespace: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (ns, name) in services {
        by_namespace.entry(ns).or_default().push(name);
    }
    for (ns, names) in by_namespace {
        let pods: Vec<Value> = store
            .lock()
            .list(Kind::Pod, Some(ns))
            .into_iter()
            .cloned()
            .collect();
        for name in names {
            reconcile_service(store, ns, name, &pods);
        }
    }
}

fn reconcile_service(store: &Store, ns: &str, name: &str, pods: &[Value]) {
    let cur = current(store, ns, name);
    let covered_svc = cur.svc.as_ref().filter(|svc| covered(svc));
    let wanted = covered_svc
        .map(|svc| desired_slices(svc, pods))
        .unwrap_or_default();
    for (slice_name, slice) in &wanted {
        let result = match cur.slices.get(slice_name) {
            None => store.create(Kind::EndpointSlice, slice.clone()).map(|_| ()),
            Some(have) if same_content(have, slice) => Ok(()),
            Some(_) => store
                .replace(Kind::EndpointSlice, slice.clone())
                .map(|_| ()),
        };
        if let Err(e) = result {
            tracing::warn!("EndpointSlice {ns}/{slice_name}: {e}");
        }
    }
    for slice_name in cur.slices.keys().filter(|k| !wanted.contains_key(*k)) {
        let _ = store.delete(Kind::EndpointSlice, ns, slice_name);
    }
    let want = covered_svc.map(|svc| {
        let slices: Vec<&Value> = wanted.values().collect();
        endpoints_v1::endpoints_for(svc, &slices)
    });
    endpoints_v1::reconcile(
        store,
        (ns, name),
        cur.svc.is_some(),
        want,
        cur.endpoints.as_ref(),
    );
}
