//! The EndpointSlice controller: for each Service with a selector, slices of
//! the matching Pods' addresses, grouped by resolved target ports (a named
//! targetPort resolves per Pod through its containers' named ports).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{
    endpoints_v1,
    kinds::Kind,
    objects::{is_terminating, labels_match, owner_ref, pod_ready, short_hash},
    store::{meta_str, Store},
};

pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const CONTROLLER: &str = "endpointslice-controller.lb-lab";
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

pub fn reconcile(store: &Store) {
    let (services, _) = store.list(Kind::Service, None);
    let (pods, _) = store.list(Kind::Pod, None);
    let (slices, _) = store.list(Kind::EndpointSlice, None);
    let mut wanted: BTreeMap<(String, String), Value> = BTreeMap::new();
    for svc in &services {
        let selector = &svc["spec"]["selector"];
        if selector.as_object().is_none_or(|s| s.is_empty())
            || svc["spec"]["type"] == "ExternalName"
        {
            continue;
        }
        for (name, slice) in desired_slices(svc, &pods) {
            wanted.insert((meta_str(svc, "namespace").to_string(), name), slice);
        }
    }
    endpoints_v1::reconcile(store, &services, wanted.values());
    let mut existing: BTreeMap<(String, String), &Value> = BTreeMap::new();
    for s in slices
        .iter()
        .filter(|s| s["metadata"]["labels"][MANAGED_BY] == CONTROLLER)
    {
        existing.insert(
            (
                meta_str(s, "namespace").to_string(),
                meta_str(s, "name").to_string(),
            ),
            s,
        );
    }
    for (key, slice) in &wanted {
        let result = match existing.get(key) {
            None => store.create(Kind::EndpointSlice, slice.clone()).map(|_| ()),
            Some(cur) if same_content(cur, slice) => Ok(()),
            Some(_) => store
                .replace(Kind::EndpointSlice, slice.clone())
                .map(|_| ()),
        };
        if let Err(e) = result {
            tracing::warn!("EndpointSlice {}/{}: {e}", key.0, key.1);
        }
    }
    for key in existing.keys().filter(|k| !wanted.contains_key(*k)) {
        let _ = store.delete(Kind::EndpointSlice, &key.0, &key.1);
    }
}
