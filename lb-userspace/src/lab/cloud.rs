//! The lab's cloud controller: gives each LoadBalancer Service an address
//! from the pool (see `net::LB_POOL`) in `status.loadBalancer.ingress`.

use std::{collections::BTreeSet, net::Ipv4Addr};

use serde_json::{json, Value};

use super::{controllers::ServiceRef, kinds::Kind, net::LB_POOL, store::Store};

fn ingress_ip(svc: &Value) -> Option<String> {
    svc["status"]["loadBalancer"]["ingress"][0]["ip"]
        .as_str()
        .map(str::to_string)
}

/// Gives an address to each of `services` that is a LoadBalancer without
/// one.
pub fn reconcile(store: &Store, services: &BTreeSet<ServiceRef>) {
    let waiting: Vec<Value> = {
        let inner = store.lock();
        services
            .iter()
            .filter_map(|(ns, name)| inner.get(Kind::Service, ns, name))
            .filter(|s| s["spec"]["type"] == "LoadBalancer" && ingress_ip(s).is_none())
            .cloned()
            .collect()
    };
    if waiting.is_empty() {
        return;
    }
    let mut used: BTreeSet<String> = store
        .lock()
        .list(Kind::Service, None)
        .into_iter()
        .filter_map(ingress_ip)
        .collect();
    for mut svc in waiting {
        let base = u32::from(LB_POOL.0);
        let Some(ip) = (10..250)
            .map(|i| Ipv4Addr::from(base + i).to_string())
            .find(|ip| !used.contains(ip))
        else {
            tracing::warn!("load balancer pool exhausted");
            return;
        };
        used.insert(ip.clone());
        svc["status"]["loadBalancer"] = json!({"ingress": [{"ip": ip, "ipMode": "VIP"}]});
        svc["metadata"]["resourceVersion"] = json!("");
        let _ = store.replace(Kind::Service, svc);
    }
}
