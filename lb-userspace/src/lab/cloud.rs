//! The lab's cloud controller: gives each LoadBalancer Service an address
//! from the pool (see `net::LB_POOL`) in `status.loadBalancer.ingress`.

use std::{collections::BTreeSet, net::Ipv4Addr};

use serde_json::json;

use super::{kinds::Kind, net::LB_POOL, store::Store};

pub fn reconcile(store: &Store) {
    let (services, _) = store.list(Kind::Service, None);
    let ingress_ip = |s: &serde_json::Value| {
        s["status"]["loadBalancer"]["ingress"][0]["ip"]
            .as_str()
            .map(str::to_string)
    };
    let mut used: BTreeSet<String> = services.iter().filter_map(ingress_ip).collect();
    for svc in &services {
        if svc["spec"]["type"] != "LoadBalancer" || ingress_ip(svc).is_some() {
            continue;
        }
        let base = u32::from(LB_POOL.0);
        let Some(ip) = (10..250)
            .map(|i| Ipv4Addr::from(base + i).to_string())
            .find(|ip| !used.contains(ip))
        else {
            tracing::warn!("load balancer pool exhausted");
            return;
        };
        used.insert(ip.clone());
        let mut svc = svc.clone();
        svc["status"]["loadBalancer"] = json!({"ingress": [{"ip": ip, "ipMode": "VIP"}]});
        svc["metadata"]["resourceVersion"] = json!("");
        let _ = store.replace(Kind::Service, svc);
    }
}
