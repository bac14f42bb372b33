//! OpenAPI v3 as far as kubectl reads it: the root (`/openapi/v3`, one
//! entry a group version) and a document per group version whose
//! operations say which kind they take and that they accept
//! `fieldValidation`. From that kubectl learns that the server validates
//! fields itself (client-go `query_param_verifier_v3.go`), so `kubectl
//! apply` sends `fieldValidation=Strict` instead of downloading schemas to
//! validate on its side; `validation.rs` does the checking.
//!
//! The documents carry no schemas: kubectl then builds apply's strategic
//! merge patches from its own built-in types, as it does for every built-in
//! kind when a server's v3 document lacks them. `/openapi/v2` stays
//! absent (404): kubectl tolerates that once v3 answers.

use serde_json::{json, Map, Value};

use super::{discovery, kinds::Kind, objects::short_hash};

/// The answer for an `/openapi/...` path, if it names a document.
pub fn answer(path: &str) -> Option<Value> {
    let rest = path.strip_prefix("/openapi/v3")?;
    if rest.is_empty() || rest == "/" {
        return Some(root());
    }
    let wanted = rest.trim_start_matches('/');
    discovery::served()
        .find(|(g, v, _)| doc_path(g, v) == wanted)
        .map(|(g, v, kinds)| document(g, v, kinds))
}

/// `api/v1` or `apis/GROUP/VERSION`, as kubectl keys the root's paths.
fn doc_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn root() -> Value {
    let mut paths = Map::new();
    for (g, v, kinds) in discovery::served() {
        let path = doc_path(g, v);
        let hash = short_hash(&document(g, v, kinds).to_string(), 16).to_ascii_uppercase();
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")}),
        );
    }
    json!({"paths": paths})
}

fn query_parameter(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "description": description,
           "schema": {"type": "string", "uniqueItems": true}})
}

/// The operations on one object of `kind` and on its collection.
fn paths_of(group: &str, version: &str, kind: Kind) -> [(String, Value); 2] {
    let gvk = json!({"group": group, "version": version, "kind": kind.name()});
    let params = json!([
        query_parameter("dryRun", "When present, modifications are not persisted."),
        query_parameter("fieldManager", "The name of the actor making the change."),
        query_parameter(
            "fieldValidation",
            "How the server treats unknown fields: Ignore, Warn or Strict."
        ),
    ]);
    let op = |verb: &str| {
        json!({"operationId": format!("{verb}{}", kind.name()),
               "x-kubernetes-action": verb, "x-kubernetes-group-version-kind": gvk,
               "parameters": params, "responses": {"200": {"description": "OK"}}})
    };
    let prefix = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    let collection = if kind.namespaced() {
        format!("{prefix}/namespaces/{{namespace}}/{}", kind.plural())
    } else {
        format!("{prefix}/{}", kind.plural())
    };
    [
        (
            format!("{collection}/{{name}}"),
            json!({"get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete")}),
        ),
        (collection, json!({"get": op("list"), "post": op("post")})),
    ]
}

fn document(group: &str, version: &str, kinds: &[Kind]) -> Value {
    let mut paths = Map::new();
    for &kind in kinds {
        for (path, ops) in paths_of(group, version, kind) {
            paths.insert(path, ops);
        }
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0-lb-lab"},
        "paths": paths,
        "components": {"schemas": {}},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_lists_a_document_per_group_version_and_each_answers() {
        let root = answer("/openapi/v3").unwrap();
        let paths = root["paths"].as_object().unwrap();
        assert!(paths.contains_key("api/v1"));
        assert!(paths.contains_key("apis/apps/v1"));
        for entry in paths.values() {
            let url = entry["serverRelativeURL"].as_str().unwrap();
            let path = url.split('?').next().unwrap();
            assert!(answer(path).is_some(), "{url}");
        }
        assert!(answer("/openapi/v3/apis/nothing/v9").is_none());
        assert!(answer("/openapi/v2").is_none());
    }

    #[test]
    fn patch_operations_name_their_kind_and_take_field_validation() {
        let doc = answer("/openapi/v3/apis/apps/v1").unwrap();
        let patch =
            &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"],
            json!({"group": "apps", "version": "v1", "kind": "Deployment"})
        );
        assert!(patch["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "fieldValidation"));
        let core = answer("/openapi/v3/api/v1").unwrap();
        assert_eq!(
            core["paths"]["/api/v1/nodes/{name}"]["patch"]["x-kubernetes-group-version-kind"]
                ["group"],
            ""
        );
    }
}
