//! Health check node ports: for a LoadBalancer Service with
//! `externalTrafficPolicy: Local`, each node answers on the Service's
//! `healthCheckNodePort` with 200 and its number of local endpoints, or 503
//! when it has none, so that a cloud load balancer sends traffic only to
//! nodes that can serve it locally (as kube-proxy does).

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, RwLock},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, Router};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::translate::{slices_by_service, NodeContext, ServiceFacts, SliceFacts};

/// What one health check port reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// The health check ports this node must serve, and what each reports.
pub fn health_checks<S: Borrow<ServiceFacts>, E: Borrow<SliceFacts>>(
    services: &[S],
    slices: &[E],
    node: &NodeContext,
) -> BTreeMap<u16, HealthCheck> {
    let mut out = BTreeMap::new();
    let mut by_service = None;
    for svc in services {
        let svc: &ServiceFacts = svc.borrow();
        let Some(port) = svc.health_check_node_port else {
            continue;
        };
        // Indexed once, on the first Service that needs it (most clusters
        // have none, and this runs on every pass of the agent).
        let own = by_service
            .get_or_insert_with(|| slices_by_service(slices))
            .get(&(&*svc.namespace, &*svc.name));
        let addrs: BTreeSet<IpAddr> = own
            .into_iter()
            .flatten()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| node.runs(e))
            .filter(|e| e.ready)
            .map(|e| e.address)
            .collect();
        out.insert(
            port,
            HealthCheck {
                namespace: svc.namespace.to_string(),
                name: svc.name.to_string(),
                local_endpoints: addrs.len(),
            },
        );
    }
    out
}

type Shared = Arc<RwLock<HealthCheck>>;

async fn answer(State(hc): State<Shared>) -> impl IntoResponse {
    let hc = hc.read().map(|h| h.clone()).unwrap_or_default();
    let code = if hc.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"service": {"namespace": hc.namespace, "name": hc.name},
                      "localEndpoints": hc.local_endpoints, "serviceProxyHealthy": true});
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
}

/// The listeners, one per health check port.
#[derive(Default)]
pub struct HealthServers {
    running: BTreeMap<u16, (Shared, JoinHandle<()>)>,
}

impl HealthServers {
    /// Starts, updates and stops listeners to match `want`.
    pub async fn sync(&mut self, want: &BTreeMap<u16, HealthCheck>) {
        self.running.retain(|port, (_, task)| {
            let keep = want.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for (port, hc) in want {
            if let Some((shared, _)) = self.running.get(port) {
                if let Ok(mut cur) = shared.write() {
                    *cur = hc.clone();
                }
                continue;
            }
            match tokio::net::TcpListener::bind(("0.0.0.0", *port)).await {
                Ok(listener) => {
                    let shared: Shared = Arc::new(RwLock::new(hc.clone()));
                    let app = Router::new().fallback(answer).with_state(shared.clone());
                    let task = tokio::spawn(async move {
                        let _ = axum::serve(listener, app).await;
                    });
                    tracing::info!(port, service = %format!("{}/{}", hc.namespace, hc.name), "serving health check");
                    self.running.insert(*port, (shared, task));
                }
                Err(e) => tracing::warn!(port, "health check port: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::{EndpointSlice, SERVICE_NAME_LABEL};
    use k8s_openapi::api::core::v1::Service;

    #[test]
    fn only_load_balancers_with_local_policy_get_a_health_check_counting_local_ready_endpoints() {
        let svc = |name: &str, ty: &str, policy: &str, port: i32| -> Service {
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "d"},
                "spec": {"type": ty, "externalTrafficPolicy": policy, "healthCheckNodePort": port}}))
            .unwrap()
        };
        let slice = |svc: &str, eps: serde_json::Value| -> EndpointSlice {
            serde_json::from_value(
                json!({"metadata": {"name": format!("{svc}-x"), "namespace": "d",
                "labels": {SERVICE_NAME_LABEL: svc}}, "addressType": "IPv4", "endpoints": eps}),
            )
            .unwrap()
        };
        let services = [
            svc("a", "LoadBalancer", "Local", 32000),
            svc("b", "LoadBalancer", "Cluster", 32001),
            svc("c", "NodePort", "Local", 32002),
        ]
        .map(|s| ServiceFacts::of(&s));
        let slices = [SliceFacts::of(&slice(
            "a",
            json!([
                {"addresses": ["10.244.1.2"], "nodeName": "n1", "conditions": {"ready": true}},
                {"addresses": ["10.244.1.3"], "nodeName": "n1", "conditions": {"ready": false}},
                {"addresses": ["10.244.2.2"], "nodeName": "n2", "conditions": {"ready": true}},
            ]),
        ))];
        let node = |n: &str| NodeContext {
            name: Some(n.into()),
            addrs: vec![],
            ..Default::default()
        };
        let n1 = health_checks(&services, &slices, &node("n1"));
        assert_eq!(n1.keys().copied().collect::<Vec<_>>(), [32000]);
        assert_eq!(n1[&32000].local_endpoints, 1);
        assert_eq!(
            health_checks(&services, &slices, &node("n3"))[&32000].local_endpoints,
            0
        );
    }
}
