use serde_json::json;

use super::*;

fn deployment() -> Value {
    json!({
        "metadata": {"name": "web", "labels": {"app": "web", "tier": "front"}, "finalizers": ["a"]},
        "spec": {
            "replicas": 4,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%"}},
            "template": {"spec": {"containers": [
                {"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 80, "name": "http"}],
                 "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                {"name": "sidecar", "image": "busybox"},
            ]}},
        },
    })
}

fn strategic_patch(kind: Kind, target: &Value, patch: Value) -> Value {
    apply(kind, PatchType::Strategic, target, &patch).unwrap()
}

#[test]
fn set_image_changes_one_container_and_keeps_the_rest() {
    // What `kubectl set image deploy/web web=nginx:1.28` sends.
    let out = strategic_patch(
        Kind::Deployment,
        &deployment(),
        json!({"spec": {"template": {"spec": {"containers": [{"name": "web", "image": "nginx:1.28"}]}}}}),
    );
    let containers = &out["spec"]["template"]["spec"]["containers"];
    assert_eq!(containers[0]["image"], "nginx:1.28");
    assert_eq!(containers[0]["ports"][0]["containerPort"], 80);
    assert_eq!(containers[1]["name"], "sidecar");
    assert_eq!(out["spec"]["replicas"], 4);
}

#[test]
fn keyed_lists_merge_add_and_delete_by_their_key() {
    let out = strategic_patch(
        Kind::Deployment,
        &deployment(),
        json!({"spec": {"template": {"spec": {"containers": [
            {"name": "web", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}],
             "ports": [{"containerPort": 443, "name": "https"}]},
            {"name": "sidecar", "$patch": "delete"},
        ]}}}}),
    );
    let containers = out["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1);
    assert_eq!(
        containers[0]["env"],
        json!([{"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "C", "value": "4"}])
    );
    assert_eq!(containers[0]["ports"].as_array().unwrap().len(), 2);
}

#[test]
fn service_ports_merge_by_port_and_policy_rules_are_replaced() {
    let svc = json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}]}});
    let out = strategic_patch(
        Kind::Service,
        &svc,
        json!({"spec": {"ports": [{"port": 443, "targetPort": 8443}]}}),
    );
    assert_eq!(out["spec"]["ports"].as_array().unwrap().len(), 2);
    let policy =
        json!({"spec": {"ingress": [{"from": [{"podSelector": {}}]}, {"ports": [{"port": 80}]}]}});
    let out = strategic_patch(
        Kind::NetworkPolicy,
        &policy,
        json!({"spec": {"ingress": [{"ports": [{"port": 443}]}]}}),
    );
    assert_eq!(out["spec"]["ingress"], json!([{"ports": [{"port": 443}]}]));
}

#[test]
fn directives_null_retain_keys_replace_and_primitive_lists() {
    let out = strategic_patch(
        Kind::Deployment,
        &deployment(),
        json!({
            "metadata": {"labels": {"tier": null}, "finalizers": ["b"],
                         "$setElementOrder/finalizers": ["a", "b"]},
            "spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}},
        }),
    );
    assert_eq!(out["metadata"]["labels"], json!({"app": "web"}));
    assert_eq!(out["metadata"]["finalizers"], json!(["a", "b"]));
    assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
    let out = strategic_patch(
        Kind::Deployment,
        &out,
        json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]},
               "spec": {"template": {"$patch": "replace", "spec": {"containers": []}}}}),
    );
    assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
    assert_eq!(out["spec"]["template"], json!({"spec": {"containers": []}}));
}

#[test]
fn merge_patch_replaces_lists_and_json_patch_applies_operations() {
    let out = apply(
        Kind::Deployment,
        PatchType::Merge,
        &deployment(),
        &json!({"metadata": {"labels": {"tier": null, "env": "lab"}},
                "spec": {"template": {"spec": {"containers": [{"name": "only"}]}}}}),
    )
    .unwrap();
    assert_eq!(
        out["metadata"]["labels"],
        json!({"app": "web", "env": "lab"})
    );
    assert_eq!(
        out["spec"]["template"]["spec"]["containers"],
        json!([{"name": "only"}])
    );
    let out = apply(
        Kind::Deployment,
        PatchType::Json,
        &deployment(),
        &json!([{"op": "replace", "path": "/spec/replicas", "value": 2},
                {"op": "remove", "path": "/metadata/labels/tier"}]),
    )
    .unwrap();
    assert_eq!(out["spec"]["replicas"], 2);
    assert_eq!(out["metadata"]["labels"], json!({"app": "web"}));
    let bad = apply(
        Kind::Deployment,
        PatchType::Json,
        &deployment(),
        &json!([{"op": "remove", "path": "/spec/nothing"}]),
    );
    assert!(bad.is_err());
    assert!(apply(Kind::Pod, PatchType::Strategic, &deployment(), &json!([1])).is_err());
}

#[test]
fn content_types_name_the_patch_types() {
    for (ct, ty) in [
        ("application/merge-patch+json", Some(PatchType::Merge)),
        (
            "application/strategic-merge-patch+json",
            Some(PatchType::Strategic),
        ),
        (
            "application/json-patch+json; charset=utf-8",
            Some(PatchType::Json),
        ),
        ("application/apply-patch+yaml", Some(PatchType::Apply)),
        ("application/json", None),
    ] {
        assert_eq!(PatchType::from_content_type(ct), ty, "{ct}");
    }
}
