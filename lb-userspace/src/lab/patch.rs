//! The patch types kube-apiserver takes, by Content-Type: JSON merge patch
//! (RFC 7386, `json_patch::merge`: `kubectl label`, `annotate`, `scale`), strategic merge patch
//! (`kubectl apply`, `set image`, `patch`: lists of containers, ports, env...
//! merge by key instead of being replaced), JSON patch (RFC 6902, through the
//! `json-patch` crate) and server-side apply.
//!
//! Server-side apply here merges the applied configuration as a strategic
//! merge patch would (list-map keys as merge keys) and records no
//! managedFields: fields an applier stops setting stay, and there are no
//! conflicts between managers. That is the part of SSA the lab leaves out.

use serde_json::{Map, Value};

use super::kinds::Kind;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Strategic,
    Json,
    Apply,
}

impl PatchType {
    pub fn from_content_type(content_type: &str) -> Option<PatchType> {
        let media = content_type.split(';').next().unwrap_or("").trim();
        match media {
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/json-patch+json" => Some(PatchType::Json),
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                Some(PatchType::Apply)
            }
            _ => None,
        }
    }
}

/// `target` with `patch` applied.
pub fn apply(kind: Kind, ty: PatchType, target: &Value, patch: &Value) -> Result<Value, String> {
    let mut out = target.clone();
    match ty {
        // RFC 7386 (7396): objects merge key by key, null removes.
        PatchType::Merge => json_patch::merge(&mut out, patch),
        PatchType::Strategic | PatchType::Apply => {
            if !patch.is_object() {
                return Err("a strategic merge patch must be a JSON object".into());
            }
            strategic(kind, &mut out, patch, &mut Vec::new());
        }
        PatchType::Json => {
            let ops: json_patch::Patch =
                serde_json::from_value(patch.clone()).map_err(|e| format!("json patch: {e}"))?;
            json_patch::patch(&mut out, &ops).map_err(|e| format!("json patch: {e}"))?;
        }
    }
    Ok(out)
}

/// How a list field merges in a strategic merge patch (the
/// `patchStrategy`/`patchMergeKey` tags of the Kubernetes API types).
#[derive(Debug, PartialEq, Eq)]
enum ListStrategy {
    /// Items with the same value of this field merge; others are added.
    MergeByKey(&'static str),
    /// A set of scalars: the union.
    MergeScalars,
    /// The patch's list replaces the target's.
    Replace,
}

/// The strategy of the list at `path` (field names from the object's root,
/// list positions left out) in an object of `kind`.
fn list_strategy(kind: Kind, path: &[String]) -> ListStrategy {
    let field = path.last().map_or("", String::as_str);
    let parent = path.len().checked_sub(2).map_or("", |i| path[i].as_str());
    let in_container = matches!(
        parent,
        "containers" | "initContainers" | "ephemeralContainers"
    );
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates" => ListStrategy::MergeByKey("name"),
        "env" if in_container => ListStrategy::MergeByKey("name"),
        "volumeMounts" if in_container => ListStrategy::MergeByKey("mountPath"),
        "volumeDevices" if in_container => ListStrategy::MergeByKey("devicePath"),
        "ports" if in_container => ListStrategy::MergeByKey("containerPort"),
        "ports" if kind == Kind::Service && path.len() == 2 => ListStrategy::MergeByKey("port"),
        "hostAliases" => ListStrategy::MergeByKey("ip"),
        "topologySpreadConstraints" => ListStrategy::MergeByKey("topologyKey"),
        "ownerReferences" if parent == "metadata" => ListStrategy::MergeByKey("uid"),
        "conditions" if parent == "status" => ListStrategy::MergeByKey("type"),
        "finalizers" if parent == "metadata" => ListStrategy::MergeScalars,
        _ => ListStrategy::Replace,
    }
}

const DIRECTIVE: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const SET_ORDER: &str = "$setElementOrder/";
const DELETE_FROM: &str = "$deleteFromPrimitiveList/";

/// Strategic merge of `patch` (an object) into `target` at `path`.
fn strategic(kind: Kind, target: &mut Value, patch: &Value, path: &mut Vec<String>) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if patch.get(DIRECTIVE).and_then(Value::as_str) == Some("replace") {
        *target = without_directives(&Value::Object(patch.clone()));
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in patch {
        if k == DIRECTIVE || k == RETAIN_KEYS || k.starts_with(SET_ORDER) {
            continue;
        }
        if let Some(field) = k.strip_prefix(DELETE_FROM) {
            if let (Some(Value::Array(items)), Some(gone)) = (t.get_mut(field), v.as_array()) {
                items.retain(|i| !gone.contains(i));
            }
            continue;
        }
        path.push(k.clone());
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(o) if o.get(DIRECTIVE).and_then(Value::as_str) == Some("delete") => {
                t.remove(k);
            }
            Value::Array(items) => {
                let merged = merge_list(kind, t.get(k), items, path);
                t.insert(k.clone(), merged);
            }
            _ => strategic(kind, t.entry(k.clone()).or_insert(Value::Null), v, path),
        }
        path.pop();
    }
    if let Some(Value::Array(keep)) = patch.get(RETAIN_KEYS) {
        t.retain(|k, _| keep.iter().any(|r| r.as_str() == Some(k)));
    }
}

fn merge_list(
    kind: Kind,
    current: Option<&Value>,
    patch: &[Value],
    path: &mut Vec<String>,
) -> Value {
    let current = current
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    match list_strategy(kind, path) {
        ListStrategy::Replace => Value::Array(patch.iter().map(without_directives).collect()),
        ListStrategy::MergeScalars => {
            let mut out = current;
            for item in patch {
                if !out.contains(item) {
                    out.push(item.clone());
                }
            }
            Value::Array(out)
        }
        ListStrategy::MergeByKey(key) => {
            let mut out = current;
            for item in patch {
                let id = &item[key];
                let at = out.iter().position(|o| &o[key] == id && !id.is_null());
                let delete = item.get(DIRECTIVE).and_then(Value::as_str) == Some("delete");
                match (at, delete) {
                    (Some(i), true) => {
                        out.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => strategic(kind, &mut out[i], item, path),
                    (None, false) => out.push(without_directives(item)),
                }
            }
            Value::Array(out)
        }
    }
}

/// A patch fragment as an object: `$` directives (and nulls, which mean
/// "absent") taken out, all the way down.
fn without_directives(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(k, v)| !k.starts_with('$') && !v.is_null())
                .map(|(k, v)| (k.clone(), without_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_directives).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
#[path = "patch_tests.rs"]
mod tests;
