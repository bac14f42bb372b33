//! Deployments -> ReplicaSets -> Pods, with rolling updates (maxSurge 25%
//! rounded up, maxUnavailable 25% rounded down, as the defaults are).

use serde_json::{json, Value};

use super::{
    kinds::Kind,
    objects::{
        is_terminating, labels_match, owner, owner_ref, pod_ready, random_suffix, short_hash,
    },
    store::{meta_str, Store},
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

pub fn reconcile_deployments(store: &Store) {
    let (deployments, _) = store.list(Kind::Deployment, None);
    let (all_rs, _) = store.list(Kind::ReplicaSet, None);
    let (pods, _) = store.list(Kind::Pod, None);
    for d in &deployments {
        let (ns, name) = (meta_str(d, "namespace"), meta_str(d, "name"));
        let template = &d["spec"]["template"];
        let hash = short_hash(&template.to_string(), 10);
        let new_name = format!("{name}-{hash}");
        let owned: Vec<&Value> = all_rs
            .iter()
            .filter(|rs| meta_str(rs, "namespace") == ns && owner(rs, "Deployment") == Some(name))
            .collect();
        let desired = replicas(d);
        let old: Vec<&Value> = owned
            .iter()
            .copied()
            .filter(|rs| meta_str(rs, "name") != new_name)
            .collect();
        let old_total: i64 = old.iter().map(|rs| replicas(rs)).sum();
        let Some(new_rs) = owned.iter().find(|rs| meta_str(rs, "name") == new_name) else {
            let mut tpl = template.clone();
            tpl["metadata"]["labels"]["pod-template-hash"] = json!(hash);
            let mut selector = d["spec"]["selector"].clone();
            selector["matchLabels"]["pod-template-hash"] = json!(hash);
            let rs = json!({
                "metadata": {"name": new_name, "namespace": ns, "labels": tpl["metadata"]["labels"],
                             "ownerReferences": owner_ref(d)},
                "spec": {"replicas": if old_total == 0 { desired } else { 0 }, "selector": selector, "template": tpl},
            });
            if let Err(e) = store.create(Kind::ReplicaSet, rs) {
                tracing::warn!("creating ReplicaSet {new_name}: {e}");
            }
            continue;
        };
        let surge = ((desired + 3) / 4).max(1);
        let max_unavailable = desired / 4;
        let ready_of = |rs: &Value| {
            pods.iter()
                .filter(|p| {
                    owner(p, "ReplicaSet") == Some(meta_str(rs, "name"))
                        && meta_str(p, "namespace") == ns
                })
                .filter(|p| pod_ready(p) && !is_terminating(p))
                .count() as i64
        };
        // Scale the new ReplicaSet up as far as the surge allows.
        let new_target =
            (desired + surge - old_total).clamp(replicas(new_rs).min(desired), desired);
        set_replicas(store, new_rs, new_target);
        // Scale old ones down as far as availability allows.
        let total_ready: i64 = owned.iter().map(|rs| ready_of(rs)).sum();
        let new_unavailable = (replicas(new_rs) - ready_of(new_rs)).max(0);
        let mut removable = (total_ready - (desired - max_unavailable) - new_unavailable).max(0);
        if old_total > 0 && ready_of(new_rs) >= desired {
            removable = old_total; // fully rolled: drop the rest.
        }
        for rs in old {
            if removable == 0 {
                break;
            }
            let cut = replicas(rs).min(removable);
            removable -= cut;
            set_replicas(store, rs, replicas(rs) - cut);
        }
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
