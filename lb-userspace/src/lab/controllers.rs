//! The lab's controllers, driven by the store's events as kube-controller-
//! manager's are by its informers: each batch of events names what it
//! touches (`Work`), and only that is reconciled. A Service's change costs
//! that Service's slices, Endpoints and load-balancer address; a Pod's
//! costs the Services whose selectors match its labels, before or after;
//! a deletion costs the garbage collector one look at the dependents of
//! what went. At 10,000 Services the earlier whole-store passes took 250
//! to 600 ms after every change, and that was the control bench's tail.
//!
//! The kubelet also runs every half second, as it watches processes too.
//! The Deployment controller runs every half second while a pod is
//! becoming available (Ready, not yet for minReadySeconds): time, not the
//! store, moves that rollout on. A first pass, and a pass after events
//! were missed (the broadcast lagged), takes everything.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Duration,
};

use serde_json::Value;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::{
    cloud, endpoints, gc,
    kinds::Kind,
    kubelet::Kubelet,
    objects::labels_match,
    store::{meta_str, Event, Store},
    workloads,
};

/// (namespace, name) of a Service.
pub type ServiceRef = (String, String);

/// What one batch of events asks the controllers to look at.
#[derive(Debug, Default)]
pub struct Work {
    /// Look at everything: the first pass, or events were missed.
    pub everything: bool,
    /// A Deployment, ReplicaSet or owned Pod changed.
    pub workloads: bool,
    pub services: BTreeSet<ServiceRef>,
    /// Pods that changed, by namespace, with every label set they had in
    /// this batch and the one before it.
    pub pods: BTreeMap<String, Vec<Value>>,
    pub collect: gc::Collect,
}

impl Work {
    fn everything() -> Self {
        Work {
            everything: true,
            workloads: true,
            ..Default::default()
        }
    }

    fn is_empty(&self) -> bool {
        !self.everything
            && !self.workloads
            && self.services.is_empty()
            && self.pods.is_empty()
            && self.collect.is_empty()
    }
}

/// The labels each Pod had when last seen: a Pod that leaves a Service's
/// selector must still mark that Service.
#[derive(Default)]
pub struct PodLabels(HashMap<(String, String), Value>);

impl PodLabels {
    /// Every Pod's labels as the store has them now: for a pass over
    /// everything, after which events are noted against them.
    fn of_store(store: &Store) -> Self {
        let inner = store.lock();
        let labels = inner
            .list(Kind::Pod, None)
            .into_iter()
            .map(|p| {
                let key = (
                    meta_str(p, "namespace").to_string(),
                    meta_str(p, "name").to_string(),
                );
                (key, p["metadata"]["labels"].clone())
            })
            .collect();
        PodLabels(labels)
    }

    /// Notes one event in `work`.
    pub fn note(&mut self, work: &mut Work, ev: &Event) {
        let obj = &ev.object;
        let (ns, name) = (meta_str(obj, "namespace"), meta_str(obj, "name"));
        match ev.kind {
            Kind::Service | Kind::Endpoints => {
                work.services.insert((ns.to_string(), name.to_string()));
            }
            // Slices this controller wrote and someone changed or deleted.
            Kind::EndpointSlice
                if obj["metadata"]["labels"][endpoints::MANAGED_BY] == endpoints::CONTROLLER =>
            {
                if let Some(svc) = obj["metadata"]["labels"][endpoints::SERVICE_NAME].as_str() {
                    work.services.insert((ns.to_string(), svc.to_string()));
                }
            }
            Kind::Pod => {
                // Only a ReplicaSet's pods move the workload controllers.
                work.workloads |= obj["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|r| !r.is_empty());
                let key = (ns.to_string(), name.to_string());
                let labels = obj["metadata"]["labels"].clone();
                let before = if ev.event_type == "DELETED" {
                    self.0.remove(&key)
                } else {
                    self.0.insert(key, labels.clone())
                };
                let seen = work.pods.entry(ns.to_string()).or_default();
                seen.extend(before);
                seen.push(labels);
            }
            Kind::Deployment | Kind::ReplicaSet => work.workloads = true,
            _ => {}
        }
        work.collect.note(ev);
    }
}

/// The Services whose selectors match any of the label sets that changed
/// in their namespace.
fn services_of_pods(store: &Store, pods: &BTreeMap<String, Vec<Value>>) -> Vec<ServiceRef> {
    let inner = store.lock();
    let mut out = Vec::new();
    for (ns, label_sets) in pods {
        for svc in inner.list(Kind::Service, Some(ns)) {
            let selector = &svc["spec"]["selector"];
            if selector.as_object().is_some_and(|s| !s.is_empty())
                && label_sets.iter().any(|l| labels_match(selector, l))
            {
                out.push((ns.clone(), meta_str(svc, "name").to_string()));
            }
        }
    }
    out
}

/// Every Service, for a pass over everything.
fn all_services(store: &Store) -> Vec<ServiceRef> {
    let inner = store.lock();
    let mut keys: Vec<ServiceRef> = inner
        .list(Kind::Service, None)
        .into_iter()
        .map(|s| {
            (
                meta_str(s, "namespace").to_string(),
                meta_str(s, "name").to_string(),
            )
        })
        .collect();
    // Endpoints and slices left by Services that are gone.
    for kind in [Kind::Endpoints, Kind::EndpointSlice] {
        for o in inner.list(kind, None) {
            let name = match kind {
                Kind::Endpoints => meta_str(o, "name"),
                _ if o["metadata"]["labels"][endpoints::MANAGED_BY] == endpoints::CONTROLLER => o
                    ["metadata"]["labels"][endpoints::SERVICE_NAME]
                    .as_str()
                    .unwrap_or(""),
                _ => continue,
            };
            keys.push((meta_str(o, "namespace").to_string(), name.to_string()));
        }
    }
    keys
}

/// Runs the controllers until the store's event channel closes.
pub async fn run(store: Store, kubelet: Kubelet) {
    let mut events = store.subscribe();
    let mut labels = PodLabels::default();
    let mut work = Work::everything();
    let mut becoming_available = false;
    loop {
        if work.everything {
            // Labels seen before a gap may be stale, and a Pod never seen
            // has none here: start from the store (the pass below covers
            // whatever changed before this read).
            labels = PodLabels::of_store(&store);
        }
        let started = std::time::Instant::now();
        pass(&store, &kubelet, &work, &mut becoming_available);
        let took = started.elapsed();
        if took > Duration::from_millis(20) {
            tracing::info!(
                took_ms = took.as_millis() as u64,
                services = work.services.len(),
                everything = work.everything,
                "lab controllers' pass"
            );
        }
        work = Work::default();
        tokio::select! {
            r = events.recv() => match r {
                Ok(ev) => labels.note(&mut work, &ev),
                Err(RecvError::Lagged(_)) => work = Work::everything(),
                Err(RecvError::Closed) => return,
            },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        loop {
            match events.try_recv() {
                Ok(ev) => labels.note(&mut work, &ev),
                Err(TryRecvError::Lagged(_)) => work = Work::everything(),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => return,
            }
        }
    }
}

/// One pass over what `work` names (the kubelet runs every time).
fn pass(store: &Store, kubelet: &Kubelet, work: &Work, becoming_available: &mut bool) {
    if work.workloads || *becoming_available {
        *becoming_available = workloads::reconcile_deployments(store);
    }
    if work.workloads {
        workloads::reconcile_replicasets(store);
    }
    kubelet.reconcile();
    if work.is_empty() {
        return;
    }
    let services: BTreeSet<ServiceRef> = if work.everything {
        all_services(store).into_iter().collect()
    } else {
        let mut s = work.services.clone();
        s.extend(services_of_pods(store, &work.pods));
        s
    };
    endpoints::reconcile(store, &services);
    cloud::reconcile(store, &services);
    if work.everything {
        gc::reconcile_all(store);
    } else {
        gc::reconcile(store, &work.collect);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A pod's relabel marks the Service it left and the one it joined,
    /// and nothing else; a Service's own change marks it alone.
    #[test]
    fn a_relabel_marks_the_services_it_leaves_and_joins() {
        let store = Store::new();
        let mut events = store.subscribe();
        store
            .create(Kind::Namespace, json!({"metadata": {"name": "default"}}))
            .unwrap();
        for app in ["a", "b", "c"] {
            let svc = json!({"metadata": {"name": app, "namespace": "default"},
                             "spec": {"selector": {"app": app}, "ports": [{"port": 80}]}});
            store.create(Kind::Service, svc).unwrap();
        }
        let pod = |app: &str| json!({"metadata": {"name": "p", "namespace": "default", "labels": {"app": app}}});
        store.create(Kind::Pod, pod("a")).unwrap();
        let mut labels = PodLabels::default();
        let mut drain = |labels: &mut PodLabels| {
            let mut work = Work::default();
            while let Ok(ev) = events.try_recv() {
                labels.note(&mut work, &ev);
            }
            work
        };
        let work = drain(&mut labels);
        assert_eq!(work.services.len(), 3, "each Service marks itself");
        assert!(!work.workloads, "a pod without an owner is no workload's");

        store.replace(Kind::Pod, pod("b")).unwrap();
        let work = drain(&mut labels);
        assert!(work.services.is_empty());
        let mut touched = services_of_pods(&store, &work.pods);
        touched.sort();
        let names: Vec<&str> = touched.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["a", "b"]);

        store.delete(Kind::Pod, "default", "p").unwrap();
        let work = drain(&mut labels);
        let names: Vec<String> = services_of_pods(&store, &work.pods)
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        assert_eq!(names, ["b"]);
    }
}
