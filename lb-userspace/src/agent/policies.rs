//! The NetworkPolicy side of the agent: the watchers' changes go into the
//! policy engine one object at a time, and what the engine says changed is
//! written (`policy_maps::apply_delta`). At start, after a relist, and on
//! the periodic resync, the engine is brought level with the caches whole
//! and the maps are read back and repaired against its state.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::{ObjectRef, Store};

use super::Caches;
use crate::{
    datapath::{policy_maps, Datapath},
    policy::{engine::ObjectKey, parse_policy, PodFacts, PolicyEngine},
    translate::{NodeContext, ObjectError},
};

/// A policy object that changed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PolicyObject {
    Pod(String, String),
    Namespace(String),
    NetworkPolicy(String, String),
}

/// What the next policy pass must do.
#[derive(Default)]
pub struct PolicyWork {
    /// Level the engine with the caches whole (start, relist, Node change).
    pub full: bool,
    /// Read the maps back and repair them (start, resync, a failed write).
    pub repair: bool,
    pub objects: BTreeSet<PolicyObject>,
}

impl PolicyWork {
    pub fn any(&self) -> bool {
        self.full || self.repair || !self.objects.is_empty()
    }
}

pub struct PolicySide {
    engine: PolicyEngine,
    pub errors: Vec<ObjectError>,
    /// The maps held the engine's state after the last pass.
    written: bool,
}

impl Default for PolicySide {
    fn default() -> Self {
        Self {
            engine: PolicyEngine::new(),
            errors: Vec::new(),
            written: false,
        }
    }
}

impl PolicySide {
    pub fn pass(
        &mut self,
        dp: &mut Datapath,
        caches: &Caches,
        node: &NodeContext,
        work: &PolicyWork,
        stats: &crate::metrics::Shared,
    ) {
        let started = std::time::Instant::now();
        self.engine.set_node(node);
        if work.full {
            self.level_with(caches);
        }
        for object in &work.objects {
            self.feed(object, caches);
        }
        let delta = self.engine.flush();
        // Only a repair of maps that held the state, with nothing new to
        // write, can tell drift from change.
        let drift_check = work.repair && self.written && delta.is_empty();
        let written = if work.repair || work.full || !self.written {
            policy_maps::apply(&mut dp.maps, self.engine.state())
        } else {
            policy_maps::apply_delta(&mut dp.maps, &delta).or_else(|e| {
                tracing::warn!("updating policy maps: {e:#}; reading them back");
                policy_maps::apply(&mut dp.maps, self.engine.state())
            })
        };
        stats.lock().alive();
        let state = self.engine.state();
        self.written = written.is_ok();
        match written {
            Ok(n @ 1..) if drift_check => {
                tracing::warn!(writes = n, "policy maps had drifted; repaired");
                stats.lock().drift_repairs += n as u64;
            }
            Ok(0) => {}
            Ok(n) => tracing::info!(
                writes = n,
                endpoints = state.endpoints.len(),
                rules = state.rules.len(),
                took_ms = started.elapsed().as_millis() as u64,
                "policy maps updated"
            ),
            Err(e) => {
                stats.lock().error("policy_write");
                tracing::error!("updating policy maps: {e:#}");
            }
        }
        let mut st = stats.lock();
        st.policies = self.engine.policy_count();
        st.policy_entries = state.rules.len();
        st.endpoints = state.endpoints.len();
        self.errors = self.engine.errors().cloned().collect();
    }

    /// Feeds one changed object, as the cache now has it (absent: gone).
    fn feed(&mut self, object: &PolicyObject, caches: &Caches) {
        match object {
            PolicyObject::Pod(ns, name) => {
                let pod = get(&caches.pods, ns, name);
                let key = (ns.clone(), name.clone());
                self.engine.set_pod(&key, pod.as_deref().map(PodFacts::of));
            }
            PolicyObject::Namespace(name) => {
                let n = caches.namespaces.get(&ObjectRef::<Namespace>::new(name));
                let labels = n.map(|n| n.metadata.labels.clone().unwrap_or_default());
                self.engine.set_namespace(name, labels);
            }
            PolicyObject::NetworkPolicy(ns, name) => {
                let p = get(&caches.policies, ns, name);
                let key = (ns.clone(), name.clone());
                self.engine.set_policy(&key, p.as_deref().map(parse_policy));
            }
        }
    }

    /// Feeds every cached object, and the absence of those the engine has
    /// that the caches no longer do (deletions a relist did not report).
    fn level_with(&mut self, caches: &Caches) {
        let namespaces: Vec<String> = caches
            .namespaces
            .state()
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        let gone: Vec<String> = self
            .engine
            .namespace_names()
            .filter(|n| !namespaces.contains(n))
            .cloned()
            .collect();
        for name in namespaces.into_iter().chain(gone) {
            self.feed(&PolicyObject::Namespace(name), caches);
        }
        let policies = keys_of(&caches.policies);
        let gone = gone_keys(self.engine.policy_keys(), &policies);
        for (ns, name) in policies.into_iter().chain(gone) {
            self.feed(&PolicyObject::NetworkPolicy(ns, name), caches);
        }
        let pods = keys_of(&caches.pods);
        let gone = gone_keys(self.engine.pod_keys(), &pods);
        for (ns, name) in pods.into_iter().chain(gone) {
            self.feed(&PolicyObject::Pod(ns, name), caches);
        }
    }
}

fn get<K>(store: &Store<K>, ns: &str, name: &str) -> Option<std::sync::Arc<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    store.get(&ObjectRef::new(name).within(ns))
}

fn keys_of<K>(store: &Store<K>) -> BTreeSet<ObjectKey>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .state()
        .iter()
        .map(|o| {
            let meta = o.meta();
            (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            )
        })
        .collect()
}

fn gone_keys<'a>(
    known: impl Iterator<Item = &'a ObjectKey>,
    now: &BTreeSet<ObjectKey>,
) -> Vec<ObjectKey> {
    known.filter(|k| !now.contains(*k)).cloned().collect()
}
