//! The garbage collector and the namespace controller, as far as the lab
//! needs them: an object whose every owner (by uid) is gone is deleted, so
//! `kubectl delete deploy` takes its ReplicaSets and their Pods with it
//! (propagation Background, kubectl's default); an object whose Namespace
//! is gone is deleted too. `Orphan` propagation strips the owner reference
//! from the dependents before the owner goes.

use std::collections::{BTreeSet, HashSet};

use serde_json::Value;

use super::{
    kinds::Kind,
    store::{meta_str, Event, Inner, Key, Store},
};

/// Whether the object at `key` should go: every owner gone, or its
/// namespace gone. Events may name a namespace that never existed (the lab
/// accepts them anywhere), so only their owners count.
pub fn doomed(
    (kind, ns, _): &Key,
    obj: &Value,
    uid_present: impl Fn(&str) -> bool,
    namespace_present: impl Fn(&str) -> bool,
) -> bool {
    let owners_gone = obj["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|refs| {
            !refs.is_empty()
                && refs
                    .iter()
                    .all(|r| !uid_present(r["uid"].as_str().unwrap_or("")))
        });
    let namespace_gone = kind.namespaced() && *kind != Kind::Event && !namespace_present(ns);
    owners_gone || namespace_gone
}

/// What a batch of events asks the collector to look at: the dependents
/// of what was deleted, the objects of deleted namespaces, and objects
/// written with owners (which may be gone already).
#[derive(Debug, Default)]
pub struct Collect {
    deleted_uids: HashSet<String>,
    deleted_namespaces: HashSet<String>,
    owned: Vec<Key>,
}

impl Collect {
    pub fn note(&mut self, ev: &Event) {
        let obj = &ev.object;
        let (ns, name) = (meta_str(obj, "namespace"), meta_str(obj, "name"));
        if ev.event_type == "DELETED" {
            self.deleted_uids.insert(meta_str(obj, "uid").to_string());
            if ev.kind == Kind::Namespace {
                self.deleted_namespaces.insert(name.to_string());
            }
        } else if obj["metadata"]["ownerReferences"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
        {
            self.owned.push((ev.kind, ns.to_string(), name.to_string()));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.deleted_uids.is_empty() && self.owned.is_empty()
    }

    /// The objects to delete now, of those this batch touches.
    pub fn doomed(&self, inner: &Inner) -> Vec<Key> {
        let uid_present = |u: &str| inner.uids.contains(u);
        let namespace_present = |ns: &str| inner.get(Kind::Namespace, "", ns).is_some();
        let mut out: BTreeSet<Key> = self
            .owned
            .iter()
            .filter(|k| {
                inner
                    .objects
                    .get(*k)
                    .is_some_and(|o| doomed(k, o, uid_present, namespace_present))
            })
            .cloned()
            .collect();
        if self.deleted_uids.is_empty() {
            return out.into_iter().collect();
        }
        // Who owned what went is not indexed: one scan, without copies.
        let touched = |(kind, ns, _): &Key, o: &Value| {
            (kind.namespaced() && self.deleted_namespaces.contains(ns))
                || o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| {
                        refs.iter()
                            .any(|r| self.deleted_uids.contains(r["uid"].as_str().unwrap_or("")))
                    })
        };
        out.extend(
            inner
                .objects
                .iter()
                .filter(|(k, o)| touched(k, o) && doomed(k, o, uid_present, namespace_present))
                .map(|(k, _)| k.clone()),
        );
        out.into_iter().collect()
    }
}

/// The objects to delete of all there are.
pub fn orphans(inner: &Inner) -> Vec<Key> {
    let uid_present = |u: &str| inner.uids.contains(u);
    let namespace_present = |ns: &str| inner.get(Kind::Namespace, "", ns).is_some();
    inner
        .objects
        .iter()
        .filter(|(k, o)| doomed(k, o, uid_present, namespace_present))
        .map(|(k, _)| k.clone())
        .collect()
}

fn delete_all(store: &Store, doomed: Vec<Key>) {
    for (kind, ns, name) in doomed {
        // Gone already (a racing delete) is what we wanted.
        let _ = store.request_delete(kind, &ns, &name);
    }
}

/// Deletes (Pods through the kubelet) what `collect` dooms.
pub fn reconcile(store: &Store, collect: &Collect) {
    if collect.is_empty() {
        return;
    }
    let doomed = collect.doomed(&store.lock());
    delete_all(store, doomed);
}

/// Deletes everything `orphans` names.
pub fn reconcile_all(store: &Store) {
    let doomed = orphans(&store.lock());
    delete_all(store, doomed);
}

/// `propagationPolicy: Orphan`: the dependents of `owner_uid` keep living
/// without their owner reference.
pub fn orphan_dependents(store: &Store, owner_uid: &str) {
    let dependents: Vec<(Kind, Value)> = {
        let inner = store.lock();
        inner
            .objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == owner_uid))
            })
            .map(|((kind, _, _), o)| (*kind, Value::clone(o)))
            .collect()
    };
    for (kind, mut obj) in dependents {
        if let Some(refs) = obj["metadata"]["ownerReferences"].as_array_mut() {
            refs.retain(|r| r["uid"] != owner_uid);
        }
        obj["metadata"]["resourceVersion"] = Value::String(String::new());
        if let Err(e) = store.replace(kind, obj) {
            tracing::warn!("orphaning a dependent of {owner_uid}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(kind: Kind, ns: &str, name: &str, uid: &str, owner: Option<&str>) -> (Key, Value) {
        let mut o = json!({"metadata": {"name": name, "namespace": ns, "uid": uid}});
        if let Some(owner) = owner {
            o["metadata"]["ownerReferences"] = json!([{"kind": "X", "name": "x", "uid": owner}]);
        }
        ((kind, ns.to_string(), name.to_string()), o)
    }

    #[test]
    fn dependents_of_a_deleted_owner_and_objects_of_a_deleted_namespace_go() {
        let objects = [
            obj(Kind::Namespace, "", "default", "ns1", None),
            obj(
                Kind::ReplicaSet,
                "default",
                "live-rs",
                "rs1",
                Some("deploy1"),
            ),
            obj(Kind::Deployment, "default", "web", "deploy1", None),
            obj(
                Kind::ReplicaSet,
                "default",
                "orphan-rs",
                "rs2",
                Some("gone"),
            ),
            obj(Kind::Pod, "default", "pod-of-orphan", "p1", Some("rs2")),
            obj(Kind::Pod, "default", "bare-pod", "p2", None),
            obj(Kind::Service, "deleted-ns", "svc", "s1", None),
            obj(Kind::Event, "never-existed", "ev", "e1", None),
        ];
        let uids: HashSet<&str> = objects.iter().map(|(_, o)| meta_str(o, "uid")).collect();
        let namespaces: HashSet<&str> = objects
            .iter()
            .filter(|((kind, _, _), _)| *kind == Kind::Namespace)
            .map(|((_, _, name), _)| name.as_str())
            .collect();
        let names: Vec<&str> = objects
            .iter()
            .filter(|(k, o)| doomed(k, o, |u| uids.contains(u), |n| namespaces.contains(n)))
            .map(|((_, _, n), _)| n.as_str())
            .collect();
        // The pod of the orphaned ReplicaSet goes on a later pass, once its
        // owner is gone: as the real collector, one level at a time.
        assert_eq!(names, ["orphan-rs", "svc"]);
    }

    /// A batch's deletions doom the dependents of what went and nothing
    /// else; a dependent written after its owner went is doomed too.
    #[test]
    fn a_batch_dooms_the_dependents_of_what_it_deleted() {
        let store = Store::new();
        let mut events = store.subscribe();
        store
            .create(Kind::Namespace, json!({"metadata": {"name": "default"}}))
            .unwrap();
        let live = store
            .create(
                Kind::Service,
                json!({"metadata": {"name": "live", "namespace": "default"}}),
            )
            .unwrap();
        let owner = store
            .create(
                Kind::ReplicaSet,
                json!({"metadata": {"name": "rs", "namespace": "default"}}),
            )
            .unwrap();
        let owned = |name: &str, uid: &Value| {
            json!({"metadata": {"name": name, "namespace": "default",
                   "ownerReferences": [{"kind": "ReplicaSet", "name": "rs", "uid": uid}]}})
        };
        let uid = owner["metadata"]["uid"].clone();
        store.create(Kind::Pod, owned("mine", &uid)).unwrap();
        store
            .create(Kind::Pod, owned("other", &live["metadata"]["uid"]))
            .unwrap();
        while events.try_recv().is_ok() {}
        store.delete(Kind::ReplicaSet, "default", "rs").unwrap();
        store.create(Kind::Pod, owned("late", &uid)).unwrap();
        let mut collect = Collect::default();
        while let Ok(ev) = events.try_recv() {
            collect.note(&ev);
        }
        let mut names: Vec<String> = collect
            .doomed(&store.lock())
            .into_iter()
            .map(|(_, _, n)| n)
            .collect();
        names.sort();
        assert_eq!(names, ["late", "mine"]);
    }
}
