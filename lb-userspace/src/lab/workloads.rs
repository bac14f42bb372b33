//! Deployments -> ReplicaSets -> Pods, with rolling updates as Kubernetes'
//! deployment controller does them (the arithmetic is in `rollout.rs`): a
//! pod is available once it has been Ready for `minReadySeconds`; the new
//! ReplicaSet grows within `maxSurge` and old ones shrink only as far as
//! available pods allow under `maxUnavailable`; and the Deployment's status
//! says how far the rollout is, as `kubectl rollout status` reads it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::{
    kinds::Kind,
    objects::{
        is_terminating, labels_match, owner, owner_ref, pod_available, pod_ready, random_suffix,
        short_hash,
    },
    rollout::{self, Counts, Limits},
    store::{meta_str, now_rfc3339, Store, StoreError},
};

fn replicas(obj: &Value) -> i64 {
    obj["spec"]["replicas"].as_i64().unwrap_or(1)
}

fn set_replicas(store: &Store, rs: &Value, n: i64) {
    if replicas(rs) != n {
        let mut rs = rs.clone();
        rs["spec"]["replicas"] = json!(n);
        rs["metadata"]["resourceVersion"] = json!("");
        if let Err(e) = store.replace(Kind::ReplicaSet, rs) {
            tracing::warn!("scaling ReplicaSet: {e}");
        }
    }
}

/// One ReplicaSet's pods, as the rollout and the Deployment's status count
/// them (terminating pods count for nothing, as in Kubernetes).
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    /// Its spec.replicas.
    replicas: i64,
    /// Pods not terminating.
    active: i64,
    ready: i64,
    available: i64,
    /// Some pod is Ready but not yet available.
    becoming_available: bool,
}

impl Tally {
    fn of(rs: &Value, pods: &[Value], min_ready_secs: u64, now: Duration) -> Tally {
        let (ns, name) = (meta_str(rs, "namespace"), meta_str(rs, "name"));
        let mut t = Tally {
            replicas: replicas(rs),
            ..Tally::default()
        };
        let mine = pods.iter().filter(|p| {
            meta_str(p, "namespace") == ns
                && owner(p, "ReplicaSet") == Some(name)
                && !is_terminating(p)
        });
        for p in mine {
            t.active += 1;
            if pod_available(p, min_ready_secs, now) {
                t.available += 1;
            } else if pod_ready(p) {
                t.becoming_available = true;
            }
            t.ready += i64::from(pod_ready(p));
        }
        t
    }

    /// What the rollout counts. Pods beyond spec.replicas are about to be
    /// removed (the ReplicaSet controller has not run since it shrank), so
    /// they keep nothing available.
    fn counts(&self) -> Counts {
        Counts {
            replicas: self.replicas,
            available: self.available.min(self.replicas.max(0)),
        }
    }
}

/// One pass over every Deployment. Returns whether a pod is Ready but not
/// yet available: nothing in the store changes when it becomes available,
/// so the caller must run the pass again soon, as Kubernetes requeues a
/// ReplicaSet after minReadySeconds.
pub fn reconcile_deployments(store: &Store) -> bool {
    let (deployments, _) = store.list(Kind::Deployment, None);
    let (all_rs, _) = store.list(Kind::ReplicaSet, None);
    let (pods, _) = store.list(Kind::Pod, None);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut waiting = false;
    for d in &deployments {
        waiting |= reconcile_deployment(store, d, &all_rs, &pods, now);
    }
    waiting
}

/// One step of `d`'s rollout, as `rolloutRolling` takes it: the new
/// ReplicaSet grows if it can; only if it cannot do old ones shrink. Then
/// the status. Returns whether a pod is becoming available.
fn reconcile_deployment(
    store: &Store,
    d: &Value,
    all_rs: &[Value],
    pods: &[Value],
    now: Duration,
) -> bool {
    let (ns, name) = (meta_str(d, "namespace"), meta_str(d, "name"));
    let hash = short_hash(&d["spec"]["template"].to_string(), 10);
    let new_name = format!("{name}-{hash}");
    let desired = replicas(d);
    let limits = rollout::limits(&d["spec"]["strategy"]["rollingUpdate"], desired);
    let min_ready_secs = d["spec"]["minReadySeconds"].as_u64().unwrap_or(0);
    let mut owned: Vec<&Value> = all_rs
        .iter()
        .filter(|rs| meta_str(rs, "namespace") == ns && owner(rs, "Deployment") == Some(name))
        .collect();
    // Oldest first, as the oldest old ReplicaSet shrinks first.
    owned.sort_by_key(|rs| (meta_str(rs, "creationTimestamp"), meta_str(rs, "name")));
    let tallies: Vec<Tally> = owned
        .iter()
        .map(|rs| Tally::of(rs, pods, min_ready_secs, now))
        .collect();
    let waiting = tallies.iter().any(|t| t.becoming_available);
    let all: i64 = tallies.iter().map(|t| t.replicas).sum();
    let Some(new_at) = owned.iter().position(|rs| meta_str(rs, "name") == new_name) else {
        let n = rollout::new_replicas(desired, limits.surge, all, 0);
        create_replica_set(store, d, &hash, n);
        return waiting;
    };
    let new = tallies[new_at];
    let mut planned: Vec<i64> = tallies.iter().map(|t| t.replicas).collect();
    let grown = rollout::new_replicas(desired, limits.surge, all, new.replicas);
    if grown != new.replicas {
        planned[new_at] = grown;
    } else {
        let old_at: Vec<usize> = (0..owned.len()).filter(|i| *i != new_at).collect();
        let old: Vec<Counts> = old_at.iter().map(|i| tallies[*i].counts()).collect();
        let shrunk = rollout::old_replicas(desired, limits.unavailable, new.counts(), &old);
        for (i, n) in old_at.into_iter().zip(shrunk) {
            planned[i] = n;
        }
    }
    for (rs, n) in owned.iter().zip(&planned) {
        set_replicas(store, rs, *n);
    }
    let status = deployment_status(d, &new_name, &tallies[new_at], &tallies, &planned, limits);
    write_status(store, d, status);
    waiting
}

fn create_replica_set(store: &Store, d: &Value, hash: &str, replicas: i64) {
    let (ns, name) = (meta_str(d, "namespace"), meta_str(d, "name"));
    let new_name = format!("{name}-{hash}");
    let mut tpl = d["spec"]["template"].clone();
    tpl["metadata"]["labels"]["pod-template-hash"] = json!(hash);
    let mut selector = d["spec"]["selector"].clone();
    selector["matchLabels"]["pod-template-hash"] = json!(hash);
    let rs = json!({
        "metadata": {"name": new_name, "namespace": ns, "labels": tpl["metadata"]["labels"],
                     "ownerReferences": owner_ref(d)},
        "spec": {"replicas": replicas, "selector": selector, "template": tpl},
    });
    if let Err(e) = store.create(Kind::ReplicaSet, rs) {
        tracing::warn!("creating ReplicaSet {new_name}: {e}");
    }
}

/// `d`'s status as Kubernetes' `calculateStatus` and `syncRolloutStatus`
/// write it: pod counts over its ReplicaSets (`new` is the one of the
/// current template), and the replicas this pass gave them (`planned`).
fn deployment_status(
    d: &Value,
    new_name: &str,
    new: &Tally,
    tallies: &[Tally],
    planned: &[i64],
    limits: Limits,
) -> Value {
    let desired = replicas(d);
    let sum = |f: fn(&Tally) -> i64| tallies.iter().map(f).sum::<i64>();
    let (active, ready, available) = (sum(|t| t.active), sum(|t| t.ready), sum(|t| t.available));
    let unavailable = (planned.iter().sum::<i64>() - available).max(0);
    let complete = new.active == desired && active == desired && available == desired;
    let available_condition = if available >= desired - limits.unavailable {
        (
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.",
        )
    } else {
        (
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.",
        )
    };
    let progressing = if complete {
        (
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{new_name}\" has successfully progressed."),
        )
    } else {
        (
            "ReplicaSetUpdated",
            format!("ReplicaSet \"{new_name}\" is progressing."),
        )
    };
    let (old, now) = (&d["status"]["conditions"], now_rfc3339());
    let (status, reason, message) = available_condition;
    json!({
        "observedGeneration": d["metadata"]["generation"].as_i64().unwrap_or(1),
        "replicas": active,
        "updatedReplicas": new.active,
        "readyReplicas": ready,
        "availableReplicas": available,
        "unavailableReplicas": unavailable,
        "conditions": [
            condition(old, "Available", status, reason, message, &now),
            condition(old, "Progressing", "True", progressing.0, &progressing.1, &now),
        ],
    })
}

/// A Deployment condition. Its lastTransitionTime stays while its status
/// does, its lastUpdateTime while it says the same, so that an unchanged
/// status is not written again.
fn condition(
    old: &Value,
    kind: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: &str,
) -> Value {
    let prev = old
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind));
    let same = |field: &str, v: &str| prev.is_some_and(|c| c[field] == v);
    let kept = |field: &str, keep: bool| match prev {
        Some(c) if keep => c[field].clone(),
        _ => json!(now),
    };
    let same_status = same("status", status);
    let unchanged = same_status && same("reason", reason) && same("message", message);
    json!({"type": kind, "status": status, "reason": reason, "message": message,
           "lastUpdateTime": kept("lastUpdateTime", unchanged),
           "lastTransitionTime": kept("lastTransitionTime", same_status)})
}

/// Writes `d`'s status if it changed. `d` keeps the resourceVersion it was
/// listed with: if a client changed the Deployment since, the write fails
/// rather than undo that change, and the pass the change causes writes it.
fn write_status(store: &Store, d: &Value, status: Value) {
    if d["status"] == status {
        return;
    }
    let mut d = d.clone();
    d["status"] = status;
    match store.replace(Kind::Deployment, d) {
        Ok(_) | Err(StoreError::Conflict) => {}
        Err(e) => tracing::warn!("Deployment status: {e}"),
    }
}

pub fn reconcile_replicasets(store: &Store) {
    let (all_rs, _) = store.list(Kind::ReplicaSet, None);
    let (pods, _) = store.list(Kind::Pod, None);
    for rs in &all_rs {
        let (ns, name) = (meta_str(rs, "namespace"), meta_str(rs, "name"));
        let selector = &rs["spec"]["selector"]["matchLabels"];
        let mut mine: Vec<&Value> = pods
            .iter()
            .filter(|p| meta_str(p, "namespace") == ns && owner(p, "ReplicaSet") == Some(name))
            .filter(|p| !is_terminating(p) && labels_match(selector, &p["metadata"]["labels"]))
            .collect();
        let want = replicas(rs).max(0) as usize;
        for _ in mine.len()..want {
            let mut pod = rs["spec"]["template"].clone();
            pod["metadata"]["name"] = json!(format!("{name}-{}", random_suffix(5)));
            pod["metadata"]["namespace"] = json!(ns);
            pod["metadata"]["ownerReferences"] = owner_ref(rs);
            if let Err(e) = store.create(Kind::Pod, pod) {
                tracing::warn!("creating pod for {name}: {e}");
            }
        }
        if mine.len() > want {
            // Remove not-ready pods first, then the newest.
            mine.sort_by_key(|p| {
                (
                    pod_ready(p),
                    std::cmp::Reverse(meta_str(p, "creationTimestamp").to_string()),
                )
            });
            for p in &mine[..mine.len() - want] {
                let _ = store.request_delete(Kind::Pod, ns, meta_str(p, "name"));
            }
        }
    }
}
