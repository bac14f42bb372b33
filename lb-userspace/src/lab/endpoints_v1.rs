//! v1 Endpoints, mirrored from the EndpointSlices the lab's slice controller
//! wants, as kube-controller-manager's endpoints controller keeps them:
//! `kubectl get endpoints` and `kubectl describe svc` read these. lb itself
//! reads only EndpointSlices.

use serde_json::{json, Value};

use super::{
    kinds::Kind,
    store::{meta_str, Store},
};

/// The Endpoints of `svc` for its slices: one subset per slice (a slice
/// holds the endpoints that share one set of ports), ready endpoints in
/// `addresses`, not-ready ones in `notReadyAddresses`, terminating ones
/// left out (the controller's default without publishNotReadyAddresses).
pub fn endpoints_for(svc: &Value, slices: &[&Value]) -> Value {
    let mut subsets = Vec::new();
    for slice in slices {
        let mut ready = Vec::new();
        let mut not_ready = Vec::new();
        for e in slice["endpoints"].as_array().into_iter().flatten() {
            let conditions = &e["conditions"];
            if conditions["terminating"] == true {
                continue;
            }
            for ip in e["addresses"].as_array().into_iter().flatten() {
                let mut address = json!({"ip": ip, "targetRef": e["targetRef"]});
                if let Some(node) = e["nodeName"].as_str() {
                    address["nodeName"] = json!(node);
                }
                if conditions["ready"] == true {
                    ready.push(address);
                } else {
                    not_ready.push(address);
                }
            }
        }
        if ready.is_empty() && not_ready.is_empty() {
            continue;
        }
        let mut subset = json!({"ports": slice["ports"]});
        if !ready.is_empty() {
            subset["addresses"] = json!(ready);
        }
        if !not_ready.is_empty() {
            subset["notReadyAddresses"] = json!(not_ready);
        }
        subsets.push(subset);
    }
    let mut ep = json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": meta_str(svc, "name"), "namespace": meta_str(svc, "namespace")},
    });
    if let Some(labels) = svc["metadata"]["labels"].as_object() {
        ep["metadata"]["labels"] = json!(labels);
    }
    if !subsets.is_empty() {
        ep["subsets"] = json!(subsets);
    }
    ep
}

/// Writes one Service's Endpoints: `want` when the slice controller covers
/// the Service (it has a selector), and deletes them when the Service is
/// gone. Endpoints of a Service without a selector are the user's, as in
/// Kubernetes.
pub fn reconcile(
    store: &Store,
    (ns, name): (&str, &str),
    service_present: bool,
    want: Option<Value>,
    have: Option<&Value>,
) {
    let result = match (want, have) {
        (None, Some(_)) if !service_present => store.delete(Kind::Endpoints, ns, name).map(|_| ()),
        (None, _) => Ok(()),
        (Some(ep), None) => store.create(Kind::Endpoints, ep).map(|_| ()),
        (Some(ep), Some(cur))
            if cur["subsets"] == ep["subsets"]
                && cur["metadata"]["labels"] == ep["metadata"]["labels"] =>
        {
            Ok(())
        }
        (Some(ep), Some(_)) => store.replace(Kind::Endpoints, ep).map(|_| ()),
    };
    if let Err(e) = result {
        tracing::warn!("Endpoints {ns}/{name}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(ip: &str, pod: &str, ready: bool, terminating: bool) -> Value {
        json!({"addresses": [ip], "nodeName": "lab-node-1",
               "conditions": {"ready": ready, "serving": ready, "terminating": terminating},
               "targetRef": {"kind": "Pod", "namespace": "default", "name": pod, "uid": "u"}})
    }

    #[test]
    fn ready_endpoints_are_addresses_unready_ones_not_ready_terminating_ones_gone() {
        let svc =
            json!({"metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}}});
        let http = json!({"ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [endpoint("10.244.1.2", "a", true, false),
                          endpoint("10.244.1.3", "b", false, false),
                          endpoint("10.244.1.4", "c", false, true)]});
        let other = json!({"ports": [{"name": "http", "port": 9090, "protocol": "TCP"}],
            "endpoints": [endpoint("10.244.2.2", "d", true, false)]});
        let ep = endpoints_for(&svc, &[&http, &other]);
        assert_eq!(ep["metadata"]["name"], "web");
        assert_eq!(ep["metadata"]["labels"]["app"], "web");
        let subsets = ep["subsets"].as_array().unwrap();
        assert_eq!(subsets.len(), 2);
        assert_eq!(subsets[0]["addresses"][0]["ip"], "10.244.1.2");
        assert_eq!(subsets[0]["addresses"][0]["targetRef"]["name"], "a");
        assert_eq!(subsets[0]["addresses"][0]["nodeName"], "lab-node-1");
        assert_eq!(subsets[0]["notReadyAddresses"][0]["ip"], "10.244.1.3");
        assert_eq!(subsets[0]["addresses"].as_array().unwrap().len(), 1);
        assert_eq!(subsets[0]["ports"][0]["port"], 8080);
        assert_eq!(subsets[1]["addresses"][0]["ip"], "10.244.2.2");
        assert!(subsets[1].get("notReadyAddresses").is_none());
    }

    #[test]
    fn a_service_without_endpoints_has_no_subsets() {
        let svc = json!({"metadata": {"name": "web", "namespace": "default"}});
        let empty = json!({"ports": [], "endpoints": []});
        let ep = endpoints_for(&svc, &[&empty]);
        assert!(ep.get("subsets").is_none());
        assert!(ep["metadata"].get("labels").is_none());
    }
}
