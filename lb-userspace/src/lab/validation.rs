//! Field validation (`?fieldValidation=Strict|Warn|Ignore`), as
//! kube-apiserver decodes objects: a field the API type does not have is an
//! error (Strict, what `kubectl apply` sends), a warning (Warn, the default)
//! or nothing (Ignore). The API types are k8s-openapi's: an object is
//! decoded into its type and encoded again, and every field that did not
//! come back is unknown.

use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

use super::{kinds::Kind, store::StoreError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValidation {
    Strict,
    Warn,
    Ignore,
}

impl FieldValidation {
    pub fn from_query(v: Option<&str>) -> Result<Self, String> {
        match v {
            None | Some("" | "Warn") => Ok(FieldValidation::Warn),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some(other) => Err(format!(
                "fieldValidation {other:?}: want Strict, Warn or Ignore"
            )),
        }
    }
}

/// Checks `obj` as `mode` asks; the warnings to send back as `Warning`
/// headers.
pub fn check(kind: Kind, obj: &Value, mode: FieldValidation) -> Result<Vec<String>, StoreError> {
    check_change(kind, None, obj, mode)
}

/// As `check`, for `obj` written over `before` (a patch): only the unknown
/// fields the write brings count, not ones the object already had.
pub fn check_change(
    kind: Kind,
    before: Option<&Value>,
    obj: &Value,
    mode: FieldValidation,
) -> Result<Vec<String>, StoreError> {
    if mode == FieldValidation::Ignore {
        return Ok(vec![]);
    }
    let had = before
        .and_then(|b| unknown_fields(kind, b).ok())
        .unwrap_or_default();
    let unknown = match unknown_fields(kind, obj) {
        Ok(u) => u,
        // A body the type cannot hold at all (a string where a number goes)
        // is a bad request whatever the mode, as in kube-apiserver.
        Err(e) => {
            return Err(StoreError::BadRequest(format!(
                "{} in version \"{}\" cannot be handled as a {}: {e}",
                kind.name(),
                version(kind),
                kind.name()
            )))
        }
    };
    let unknown: Vec<String> = unknown.into_iter().filter(|f| !had.contains(f)).collect();
    if unknown.is_empty() {
        return Ok(vec![]);
    }
    let listed: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    match mode {
        FieldValidation::Strict => Err(StoreError::BadRequest(format!(
            "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
            kind.name(),
            version(kind),
            kind.name(),
            listed.join(", ")
        ))),
        _ => Ok(listed),
    }
}

fn version(kind: Kind) -> &'static str {
    let v = kind.api_version();
    v.rsplit('/').next().unwrap_or(v)
}

/// The fields of `obj` its API type does not have, as dotted paths with
/// list positions (`spec.template.spec.containers[0].imagee`).
pub fn unknown_fields(kind: Kind, obj: &Value) -> Result<Vec<String>, String> {
    let Some(back) = decoded(kind, obj)? else {
        return Ok(vec![]);
    };
    let mut unknown = Vec::new();
    dropped(obj, &back, &mut String::new(), &mut unknown);
    Ok(unknown)
}

/// `obj` decoded into its API type and encoded again; an error if it does
/// not decode. Events (core and events.k8s.io share the store) are taken as
/// they come: `None`.
pub fn decoded(kind: Kind, obj: &Value) -> Result<Option<Value>, String> {
    use k8s_openapi::api::{apps, core, discovery, networking};
    match kind {
        Kind::Namespace => round_trip::<core::v1::Namespace>(obj),
        Kind::Node => round_trip::<core::v1::Node>(obj),
        Kind::Pod => round_trip::<core::v1::Pod>(obj),
        Kind::Service => round_trip::<core::v1::Service>(obj),
        Kind::Endpoints => round_trip::<core::v1::Endpoints>(obj),
        Kind::EndpointSlice => round_trip::<discovery::v1::EndpointSlice>(obj),
        Kind::NetworkPolicy => round_trip::<networking::v1::NetworkPolicy>(obj),
        Kind::Deployment => round_trip::<apps::v1::Deployment>(obj),
        Kind::ReplicaSet => round_trip::<apps::v1::ReplicaSet>(obj),
        Kind::Event => return Ok(None),
    }
    .map(Some)
}

fn round_trip<T: DeserializeOwned + Serialize>(obj: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(obj.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(typed).map_err(|e| e.to_string())
}

/// Paths present (and not null) in `sent` but absent from `back`.
fn dropped(sent: &Value, back: &Value, path: &mut String, out: &mut Vec<String>) {
    match (sent, back) {
        (Value::Object(s), Value::Object(b)) => {
            for (k, v) in s {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                match b.get(k) {
                    None if !v.is_null() => out.push(path.clone()),
                    Some(bv) => dropped(v, bv, path, out),
                    None => {}
                }
                path.truncate(len);
            }
        }
        (Value::Array(s), Value::Array(b)) => {
            for (i, (sv, bv)) in s.iter().zip(b).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                dropped(sv, bv, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn deployment(extra_container_field: Option<(&str, Value)>) -> Value {
        let mut c = json!({"name": "web", "image": "nginx"});
        if let Some((k, v)) = extra_container_field {
            c[k] = v;
        }
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "web", "labels": {"app": "web"}},
               "spec": {"selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}},
                                     "spec": {"containers": [c]}}}})
    }

    #[test]
    fn known_fields_pass_and_misspelt_ones_are_named_by_path() {
        assert_eq!(
            unknown_fields(Kind::Deployment, &deployment(None)).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            unknown_fields(Kind::Deployment, &deployment(Some(("imagee", json!("x"))))).unwrap(),
            ["spec.template.spec.containers[0].imagee"]
        );
        let mut svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                             "spec": {"portss": [{"port": 80}], "ports": [{"port": 80, "targetPort": "http"}]}});
        assert_eq!(
            unknown_fields(Kind::Service, &svc).unwrap(),
            ["spec.portss"]
        );
        svc["spec"]["portss"] = Value::Null;
        assert!(unknown_fields(Kind::Service, &svc).unwrap().is_empty());
    }

    #[test]
    fn strict_rejects_warn_warns_ignore_ignores() {
        let bad = deployment(Some(("imagee", json!("x"))));
        let err = check(Kind::Deployment, &bad, FieldValidation::Strict).unwrap_err();
        assert_eq!(err.code(), 400);
        assert_eq!(
            err.to_string(),
            "Deployment in version \"v1\" cannot be handled as a Deployment: strict decoding \
             error: unknown field \"spec.template.spec.containers[0].imagee\""
        );
        assert_eq!(
            check(Kind::Deployment, &bad, FieldValidation::Warn).unwrap(),
            ["unknown field \"spec.template.spec.containers[0].imagee\""]
        );
        assert!(check(Kind::Deployment, &bad, FieldValidation::Ignore)
            .unwrap()
            .is_empty());
        let wrong_type = deployment(Some(("ports", json!("eighty"))));
        assert_eq!(
            check(Kind::Deployment, &wrong_type, FieldValidation::Ignore)
                .map(|w| w.len())
                .ok(),
            Some(0),
            "Ignore skips decoding altogether"
        );
        assert_eq!(
            check(Kind::Deployment, &wrong_type, FieldValidation::Warn)
                .unwrap_err()
                .code(),
            400
        );
    }
}
