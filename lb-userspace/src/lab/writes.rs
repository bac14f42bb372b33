//! The writes kubectl makes, one function a verb: create, replace, patch
//! (every patch type, and server-side apply), delete with propagation, and
//! the `scale` subresource. Each returns the status code and the object to
//! answer with; `apiserver.rs` turns them into HTTP.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::{
    gc,
    kinds::Kind,
    patch::{self, PatchType},
    printing,
    store::{meta_str, Store, StoreError},
    validation::{self, FieldValidation},
};

/// What a write request names: the kind, the namespace from the URL, and
/// the query.
pub struct Write<'a> {
    pub kind: Kind,
    pub namespace: Option<&'a str>,
    pub query: &'a HashMap<String, String>,
}

pub type Answer = Result<(u16, Value, Vec<String>), StoreError>;

impl Write<'_> {
    fn validation(&self) -> Result<FieldValidation, StoreError> {
        FieldValidation::from_query(self.query.get("fieldValidation").map(String::as_str))
            .map_err(StoreError::BadRequest)
    }

    /// The object in `body` (JSON, or YAML for apply), in the URL's namespace.
    fn object(&self, body: &[u8], yaml: bool) -> Result<Value, StoreError> {
        let mut obj: Value = if yaml {
            let text = std::str::from_utf8(body)
                .map_err(|e| StoreError::BadRequest(format!("request body: {e}")))?;
            serde_saphyr::from_str(text)
                .map_err(|e| StoreError::BadRequest(format!("request body is not YAML: {e}")))?
        } else {
            serde_json::from_slice(body).map_err(|e| {
                StoreError::BadRequest(format!("request body is not a JSON object: {e}"))
            })?
        };
        if !obj.is_object() {
            return Err(StoreError::BadRequest(
                "request body is not an object".into(),
            ));
        }
        if let Some(ns) = self.namespace {
            if !obj["metadata"].is_object() {
                obj["metadata"] = json!({});
            }
            obj["metadata"]["namespace"] = json!(ns);
        }
        Ok(obj)
    }

    pub fn create(&self, store: &Store, body: &[u8]) -> Answer {
        let obj = self.object(body, false)?;
        let warnings = validation::check(self.kind, &obj, self.validation()?)?;
        Ok((201, store.create(self.kind, obj)?, warnings))
    }

    pub fn replace(&self, store: &Store, name: &str, body: &[u8]) -> Answer {
        let obj = self.object(body, false)?;
        if meta_str(&obj, "name") != name {
            return Err(StoreError::BadRequest("name in body and URL differ".into()));
        }
        let warnings = validation::check(self.kind, &obj, self.validation()?)?;
        Ok((200, store.replace(self.kind, obj)?, warnings))
    }

    /// A patch of any type; server-side apply also creates. The object is
    /// read, patched and written back with its resourceVersion, so a write
    /// in between makes a retry, never a lost update.
    pub fn patch(&self, store: &Store, name: &str, content_type: &str, body: &[u8]) -> Answer {
        let ty = PatchType::from_content_type(content_type).ok_or_else(|| {
            StoreError::UnsupportedMedia(format!(
                "the body of the request was in an unknown format ({content_type}): accepted \
                 media types include application/json-patch+json, \
                 application/merge-patch+json, application/apply-patch+yaml, \
                 application/strategic-merge-patch+json"
            ))
        })?;
        let patch = match ty {
            PatchType::Apply => self.object(body, true)?,
            _ => serde_json::from_slice(body)
                .map_err(|e| StoreError::BadRequest(format!("patch: {e}")))?,
        };
        let ns = self.namespace.unwrap_or_default();
        let validation = self.validation()?;
        for _ in 0..10 {
            let current = match store.get(self.kind, ns, name) {
                Ok(c) => c,
                Err(StoreError::NotFound(_)) if ty == PatchType::Apply => {
                    if meta_str(&patch, "name") != name {
                        return Err(StoreError::BadRequest("name in body and URL differ".into()));
                    }
                    let warnings = validation::check(self.kind, &patch, validation)?;
                    return Ok((201, store.create(self.kind, patch.clone())?, warnings));
                }
                Err(e) => return Err(e),
            };
            let patched =
                patch::apply(self.kind, ty, &current, &patch).map_err(StoreError::BadRequest)?;
            let warnings =
                validation::check_change(self.kind, Some(&current), &patched, validation)?;
            match store.replace(self.kind, patched) {
                Err(StoreError::Conflict) => continue,
                r => return Ok((200, r?, warnings)),
            }
        }
        Err(StoreError::Conflict)
    }

    /// Deletion with `propagationPolicy` (query or DeleteOptions body):
    /// Background and Foreground leave the dependents to the garbage
    /// collector (the lab does not hold the owner back for Foreground);
    /// Orphan takes the owner reference off them first.
    pub fn delete(&self, store: &Store, name: &str, body: &[u8]) -> Answer {
        let ns = self.namespace.unwrap_or_default();
        let options: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let policy = self
            .query
            .get("propagationPolicy")
            .map(String::as_str)
            .or_else(|| options["propagationPolicy"].as_str())
            .unwrap_or("Background");
        if !matches!(policy, "Background" | "Foreground" | "Orphan") {
            return Err(StoreError::BadRequest(format!(
                "propagationPolicy {policy:?}: want Background, Foreground or Orphan"
            )));
        }
        if policy == "Orphan" {
            let obj = store.get(self.kind, ns, name)?;
            gc::orphan_dependents(store, meta_str(&obj, "uid"));
        }
        Ok((200, store.request_delete(self.kind, ns, name)?, vec![]))
    }

    fn scalable(&self) -> Result<(), StoreError> {
        if self.kind.has_scale() {
            Ok(())
        } else {
            Err(StoreError::NotFound(format!(
                "the server could not find the requested resource ({}/scale)",
                self.kind.plural()
            )))
        }
    }

    pub fn get_scale(&self, store: &Store, name: &str) -> Answer {
        self.scalable()?;
        let obj = store.get(self.kind, self.namespace.unwrap_or_default(), name)?;
        Ok((200, scale_of(&obj), vec![]))
    }

    /// PUT or PATCH of `.../scale`: the new Scale's spec.replicas goes into
    /// the object's; a resourceVersion in a PUT must match the object's.
    pub fn write_scale(
        &self,
        store: &Store,
        name: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Answer {
        self.scalable()?;
        let ns = self.namespace.unwrap_or_default();
        let sent: Value = serde_json::from_slice(body)
            .map_err(|e| StoreError::BadRequest(format!("Scale: {e}")))?;
        for _ in 0..10 {
            let mut obj = store.get(self.kind, ns, name)?;
            let scale = match content_type {
                None => sent.clone(),
                Some(ct) => {
                    let ty = PatchType::from_content_type(ct).ok_or_else(|| {
                        StoreError::UnsupportedMedia(format!("unknown patch type {ct}"))
                    })?;
                    patch::apply(self.kind, ty, &scale_of(&obj), &sent)
                        .map_err(StoreError::BadRequest)?
                }
            };
            let Some(replicas) = scale["spec"]["replicas"].as_i64().filter(|n| *n >= 0) else {
                return Err(StoreError::Invalid(
                    "Scale: spec.replicas must be a count of 0 or more".into(),
                ));
            };
            let given_rv = meta_str(&scale, "resourceVersion");
            if content_type.is_none()
                && !given_rv.is_empty()
                && given_rv != meta_str(&obj, "resourceVersion")
            {
                return Err(StoreError::Conflict);
            }
            obj["spec"]["replicas"] = json!(replicas);
            match store.replace(self.kind, obj) {
                Err(StoreError::Conflict) => continue,
                r => return Ok((200, scale_of(&r?), vec![])),
            }
        }
        Err(StoreError::Conflict)
    }
}

/// The autoscaling/v1 Scale of a Deployment or ReplicaSet.
pub fn scale_of(obj: &Value) -> Value {
    let m = &obj["metadata"];
    json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
                     "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"]},
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0),
                   "selector": printing::selector(&obj["spec"]["selector"])},
    })
}
