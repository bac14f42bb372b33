//! What the API server does to an object before storing it: defaulting and
//! allocation of ClusterIPs (10.96.0.0/12) and NodePorts (30000-32767),
//! honouring requested values and rejecting conflicts, as a cluster does.

use std::{collections::BTreeSet, net::Ipv4Addr};

use serde_json::{json, Value};

use super::{
    kinds::Kind,
    store::{meta_str, Inner, StoreError},
    validation,
};

/// kubeadm's default service range: room for a million Services (kind's
/// /16 holds 65,534, fewer than the 100,000 the scale bench programs).
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 12);
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<i64> = 30000..=32767;

pub fn admit(
    kind: Kind,
    obj: &mut Value,
    old: Option<&Value>,
    inner: &Inner,
) -> Result<(), StoreError> {
    well_typed(kind, obj)?;
    match kind {
        Kind::Service => admit_service(obj, old, inner),
        Kind::Deployment | Kind::ReplicaSet => {
            if obj["spec"]["replicas"].is_null() {
                obj["spec"]["replicas"] = json!(1);
            }
            Ok(())
        }
        Kind::Pod => {
            if obj["status"]["phase"].is_null() {
                obj["status"]["phase"] = json!("Pending");
            }
            Ok(())
        }
        Kind::Namespace => {
            // Since Kubernetes 1.21 every namespace carries its own name as a
            // label, so that policies can select namespaces by name.
            let name = meta_str(obj, "name").to_string();
            if !obj["metadata"]["labels"].is_object() {
                obj["metadata"]["labels"] = json!({});
            }
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
            // What the namespace controller reports (`kubectl get ns` prints it).
            if obj["status"]["phase"].is_null() {
                obj["status"]["phase"] = json!("Active");
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Rejects what a real API server cannot even decode (a string where a
/// number belongs...), so the agent's watchers see only well-typed objects,
/// as in a cluster. Semantic nonsense (port 70000, protocol "HTTP") passes,
/// as far as the API's schema lets it: the agent must cope with that.
fn well_typed(kind: Kind, obj: &Value) -> Result<(), StoreError> {
    validation::decoded(kind, obj)
        .map(drop)
        .map_err(|e| StoreError::Invalid(format!("{} is not well-typed: {e}", kind.name())))
}

fn in_service_cidr(ip: Ipv4Addr) -> bool {
    let mask = u32::MAX << (32 - SERVICE_CIDR.1);
    u32::from(ip) & mask == u32::from(SERVICE_CIDR.0) & mask
}

/// The same Service (namespace and name) as `obj`?
fn same_object(a: &Value, b: &Value) -> bool {
    meta_str(a, "namespace") == meta_str(b, "namespace")
        && meta_str(a, "name") == meta_str(b, "name")
}

fn admit_service(obj: &mut Value, old: Option<&Value>, inner: &Inner) -> Result<(), StoreError> {
    let svc_name = meta_str(obj, "name").to_string();
    let invalid = |m: String| {
        Err(StoreError::Invalid(format!(
            "Service \"{svc_name}\" is invalid: {m}"
        )))
    };
    if !obj["spec"].is_object() {
        obj["spec"] = json!({});
    }
    let spec = &obj["spec"];
    let svc_type = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    if !["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"].contains(&svc_type.as_str()) {
        return invalid(format!("spec.type: Unsupported value: {svc_type:?}"));
    }
    // Other Services, for NodePort conflicts only (ClusterIPs are indexed):
    // admission stays cheap with 10,000 Services.
    let others: Vec<&Value> = if svc_type == "NodePort" || svc_type == "LoadBalancer" {
        inner
            .list(Kind::Service, None)
            .into_iter()
            .filter(|s| !same_object(s, obj))
            .collect()
    } else {
        Vec::new()
    };
    let me = (
        meta_str(obj, "namespace").to_string(),
        meta_str(obj, "name").to_string(),
    );
    let taken = |ip: Ipv4Addr| inner.cluster_ips.get(&ip).is_some_and(|owner| *owner != me);

    // ClusterIP.
    let mut cluster_ip = spec["clusterIP"].as_str().unwrap_or("").to_string();
    if cluster_ip.is_empty() {
        cluster_ip = old
            .and_then(|o| o["spec"]["clusterIP"].as_str())
            .unwrap_or("")
            .to_string();
    }
    if svc_type == "ExternalName" {
        cluster_ip.clear();
    } else if cluster_ip != "None" {
        if cluster_ip.is_empty() {
            let base = u32::from(SERVICE_CIDR.0);
            let size = 1u32 << (32 - SERVICE_CIDR.1);
            // .1 is the kubernetes Service's by convention; .0 and the last
            // are not hosts. The lowest free one, as the first pass of an
            // allocator: the search starts above the highest taken address
            // (O(1) for sequential creation), then wraps around.
            let highest = inner
                .cluster_ips
                .keys()
                .next_back()
                .map_or(1, |ip| u32::from(*ip) - base);
            let Some(free) = (highest + 1..size - 1)
                .chain(2..=highest.min(size - 2))
                .map(|i| Ipv4Addr::from(base + i))
                .find(|ip| !taken(*ip))
            else {
                return invalid("no ClusterIP left in 10.96.0.0/12".into());
            };
            cluster_ip = free.to_string();
        } else {
            match cluster_ip.parse::<Ipv4Addr>() {
                Ok(ip) if in_service_cidr(ip) => {}
                _ => {
                    return invalid(format!(
                        "spec.clusterIP: Invalid value: {cluster_ip:?}: not in 10.96.0.0/12"
                    ))
                }
            }
            if cluster_ip.parse().is_ok_and(taken) {
                return invalid(format!("spec.clusterIP: Invalid value: {cluster_ip:?}: provided IP is already allocated"));
            }
        }
    }
    if cluster_ip.is_empty() {
        if let Some(m) = obj["spec"].as_object_mut() {
            m.remove("clusterIP");
            m.remove("clusterIPs");
        }
    } else {
        obj["spec"]["clusterIP"] = json!(cluster_ip);
        obj["spec"]["clusterIPs"] = json!([cluster_ip]);
    }
    obj["spec"]["type"] = json!(svc_type);

    // Ports: protocol and targetPort defaults, NodePorts.
    let wants_node_ports = svc_type == "NodePort" || svc_type == "LoadBalancer";
    let mut used_ports: BTreeSet<i64> = others
        .iter()
        .flat_map(|s| s["spec"]["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["nodePort"].as_i64())
        .chain(
            others
                .iter()
                .filter_map(|s| s["spec"]["healthCheckNodePort"].as_i64()),
        )
        .collect();
    // LoadBalancer with externalTrafficPolicy Local: a health check port
    // that answers how many endpoints the node has (for the cloud's LB).
    let wants_health_check =
        svc_type == "LoadBalancer" && obj["spec"]["externalTrafficPolicy"] == "Local";
    if wants_health_check {
        let requested = obj["spec"]["healthCheckNodePort"]
            .as_i64()
            .or_else(|| old.and_then(|o| o["spec"]["healthCheckNodePort"].as_i64()));
        let hc = match requested {
            Some(n) if !NODE_PORT_RANGE.contains(&n) || used_ports.contains(&n) => {
                return Err(StoreError::Invalid(format!("spec.healthCheckNodePort: Invalid value: {n}: not in range or already allocated")));
            }
            Some(n) => n,
            None => NODE_PORT_RANGE
                .clone()
                .rev()
                .find(|n| !used_ports.contains(n))
                .ok_or_else(|| StoreError::Invalid("no NodePort left".into()))?,
        };
        used_ports.insert(hc);
        obj["spec"]["healthCheckNodePort"] = json!(hc);
    } else if let Some(m) = obj["spec"].as_object_mut() {
        m.remove("healthCheckNodePort");
    }
    let old_ports = old
        .and_then(|o| o["spec"]["ports"].as_array().cloned())
        .unwrap_or_default();
    let Some(ports) = obj["spec"]["ports"].as_array_mut() else {
        return Ok(());
    };
    for (i, p) in ports.iter_mut().enumerate() {
        if p["protocol"].is_null() {
            p["protocol"] = json!("TCP");
        }
        if p["targetPort"].is_null() {
            p["targetPort"] = p["port"].clone();
        }
        if !wants_node_ports {
            if let Some(m) = p.as_object_mut() {
                m.remove("nodePort");
            }
            continue;
        }
        let requested = p["nodePort"].as_i64().or_else(|| {
            old_ports
                .iter()
                .find(|o| o["port"] == p["port"] && o["protocol"] == p["protocol"])
                .and_then(|o| o["nodePort"].as_i64())
        });
        let node_port = match requested {
            Some(n) if !NODE_PORT_RANGE.contains(&n) => {
                return Err(StoreError::Invalid(format!("spec.ports[{i}].nodePort: Invalid value: {n}: provided port is not in the valid range 30000-32767")));
            }
            Some(n) if used_ports.contains(&n) => {
                return Err(StoreError::Invalid(format!(
                    "spec.ports[{i}].nodePort: Invalid value: {n}: provided port is already allocated"
                )));
            }
            Some(n) => n,
            None => match NODE_PORT_RANGE.clone().find(|n| !used_ports.contains(n)) {
                Some(n) => n,
                None => return Err(StoreError::Invalid("no NodePort left".into())),
            },
        };
        used_ports.insert(node_port);
        p["nodePort"] = json!(node_port);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::store::Store;
    use super::*;

    fn svc(name: &str, spec: Value) -> Value {
        json!({"metadata": {"name": name, "namespace": "default"}, "spec": spec})
    }

    fn store() -> Store {
        let s = Store::new();
        s.create(Kind::Namespace, json!({"metadata": {"name": "default"}}))
            .unwrap();
        s
    }

    #[test]
    fn cluster_ips_are_allocated_requested_or_rejected() {
        let s = store();
        let a = s
            .create(Kind::Service, svc("a", json!({"ports": [{"port": 80}]})))
            .unwrap();
        assert_eq!(a["spec"]["clusterIP"], "10.96.0.2");
        assert_eq!(a["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(a["spec"]["ports"][0]["protocol"], "TCP");
        let b = s
            .create(Kind::Service, svc("b", json!({"clusterIP": "10.96.7.7"})))
            .unwrap();
        assert_eq!(b["spec"]["clusterIPs"], json!(["10.96.7.7"]));
        let dup = s.create(Kind::Service, svc("c", json!({"clusterIP": "10.96.7.7"})));
        assert_eq!(dup.map_err(|e| e.code()).err(), Some(422));
        let outside = s.create(Kind::Service, svc("d", json!({"clusterIP": "192.168.1.1"})));
        assert_eq!(outside.map_err(|e| e.code()).err(), Some(422));
        let headless = s
            .create(Kind::Service, svc("e", json!({"clusterIP": "None"})))
            .unwrap();
        assert_eq!(headless["spec"]["clusterIP"], "None");
        let ext = s
            .create(
                Kind::Service,
                svc(
                    "f",
                    json!({"type": "ExternalName", "externalName": "x.org"}),
                ),
            )
            .unwrap();
        assert!(ext["spec"]["clusterIP"].is_null());
        // An update without clusterIP keeps the allocated one.
        let a2 = s
            .replace(Kind::Service, svc("a", json!({"ports": [{"port": 81}]})))
            .unwrap();
        assert_eq!(a2["spec"]["clusterIP"], "10.96.0.2");
    }

    #[test]
    fn node_ports_are_allocated_requested_or_rejected() {
        let s = store();
        let a = s.create(Kind::Service, svc("a", json!({"type": "NodePort", "ports": [{"port": 80}, {"port": 81, "nodePort": 30080}]}))).unwrap();
        assert_eq!(a["spec"]["ports"][0]["nodePort"], 30000);
        assert_eq!(a["spec"]["ports"][1]["nodePort"], 30080);
        let conflict = s.create(
            Kind::Service,
            svc(
                "b",
                json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}),
            ),
        );
        assert_eq!(conflict.map_err(|e| e.code()).err(), Some(422));
        let range = s.create(
            Kind::Service,
            svc(
                "c",
                json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]}),
            ),
        );
        assert_eq!(range.map_err(|e| e.code()).err(), Some(422));
        let again = s
            .replace(
                Kind::Service,
                svc("a", json!({"type": "NodePort", "ports": [{"port": 80}]})),
            )
            .unwrap();
        assert_eq!(
            again["spec"]["ports"][0]["nodePort"], 30000,
            "kept on update"
        );
    }
}
