//! The garbage collector and the namespace controller, as far as the lab
//! needs them: an object whose every owner (by uid) is gone is deleted, so
//! `kubectl delete deploy` takes its ReplicaSets and their Pods with it
//! (propagation Background, kubectl's default); an object whose Namespace
//! is gone is deleted too. `Orphan` propagation strips the owner reference
//! from the dependents before the owner goes.

use std::collections::HashSet;

use serde_json::Value;

use super::{
    kinds::Kind,
    store::{meta_str, Key, Store},
};

/// The objects to delete now: every owner gone, or their namespace gone.
/// Events may name a namespace that never existed (the lab accepts them
/// anywhere), so only their owners count.
pub fn orphans<'a>(objects: impl Iterator<Item = (&'a Key, &'a Value)> + Clone) -> Vec<Key> {
    let uids: HashSet<&str> = objects
        .clone()
        .map(|(_, o)| meta_str(o, "uid"))
        .filter(|u| !u.is_empty())
        .collect();
    let namespaces: HashSet<&str> = objects
        .clone()
        .filter(|((kind, _, _), _)| *kind == Kind::Namespace)
        .map(|((_, _, name), _)| name.as_str())
        .collect();
    objects
        .filter(|((kind, ns, _), o)| {
            let owners = o["metadata"]["ownerReferences"].as_array();
            let owners_gone = owners.is_some_and(|refs| {
                !refs.is_empty()
                    && refs
                        .iter()
                        .all(|r| !uids.contains(r["uid"].as_str().unwrap_or("")))
            });
            let namespace_gone =
                kind.namespaced() && *kind != Kind::Event && !namespaces.contains(ns.as_str());
            owners_gone || namespace_gone
        })
        .map(|(k, _)| k.clone())
        .collect()
}

/// One pass: deletes what `orphans` names (Pods through the kubelet).
pub fn reconcile(store: &Store) {
    let doomed = {
        let inner = store.lock();
        orphans(inner.objects.iter())
    };
    for (kind, ns, name) in doomed {
        // Gone already (a racing delete) is what we wanted.
        let _ = store.request_delete(kind, &ns, &name);
    }
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
            .map(|((kind, _, _), o)| (*kind, o.clone()))
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
        let doomed = orphans(objects.iter().map(|(k, v)| (k, v)));
        let names: Vec<&str> = doomed.iter().map(|(_, _, n)| n.as_str()).collect();
        // The pod of the orphaned ReplicaSet goes on a later pass, once its
        // owner is gone: as the real collector, one level at a time.
        assert_eq!(names, ["orphan-rs", "svc"]);
    }
}
