//! A small API server speaking the Kubernetes JSON list/watch protocol over
//! plain HTTP, for the kinds of `kinds.rs`. kube-rs talks to it unchanged;
//! kubectl finds its resources through discovery (`discovery.rs`).
//!
//! Fault injection for tests: `POST /lab/compact` (watches resuming from an
//! older resourceVersion get 410 Gone) and `POST /lab/drop-watches` (every
//! open watch stream ends).

use std::{collections::HashMap, convert::Infallible, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::{header, HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use serde_json::{json, Value};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::{
    discovery,
    kinds::Kind,
    printing,
    store::{meta_str, PageRequest, Store, StoreError},
};

pub fn router(store: Store) -> Router {
    Router::new().fallback(handle).with_state(store)
}

/// What a request path names.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, rest @ ..] => (Some(ns.to_string()), (*plural, rest)),
        [plural, rest @ ..] => (None, (*plural, rest)),
        _ => return None,
    };
    let kind = Kind::from_path(&gv, rest.0)?;
    let name = match rest.1 {
        [] => None,
        [name] | [name, "status"] => Some(name.to_string()),
        _ => return None,
    };
    Some(Target {
        kind,
        namespace,
        name,
    })
}

fn json_response(code: u16, v: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn error(e: &StoreError) -> Response {
    json_response(e.code(), &e.status())
}

async fn handle(
    State(store): State<Store>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    if store.is_down() {
        // As close to "connection refused" as a running listener gets.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONNECTION, "close")],
            "the lab API server is down",
        )
            .into_response();
    }
    match (method.as_str(), uri.path()) {
        // 1.32: the kubectl these machines have (a dispatcher that runs
        // the kubectl of the server's minor version) then runs its 1.32.
        ("GET", "/version") => {
            return json_response(
                200,
                &json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-lb-lab"}),
            )
        }
        ("GET", "/healthz" | "/readyz" | "/livez") => return "ok".into_response(),
        ("POST", "/lab/compact") => {
            store.compact();
            return json_response(200, &json!({"compacted": store.current_rv()}));
        }
        ("POST", "/lab/drop-watches") => {
            store.drop_watches();
            return json_response(200, &json!({}));
        }
        _ => {}
    }
    if method == Method::GET {
        if let Some(r) = discovery_response(&headers, uri.path()) {
            return r;
        }
    }
    let Some(t) = parse_path(uri.path()) else {
        return error(&StoreError::NotFound(format!(
            "the server could not find the requested resource ({})",
            uri.path()
        )));
    };
    let ns = t.namespace.clone().unwrap_or_default();
    match (method, t.name.as_deref()) {
        (Method::GET, None) => {
            let selector = match q
                .get("labelSelector")
                .map(|s| LabelSelector::parse(s))
                .transpose()
            {
                Ok(s) => s,
                Err(e) => return error(&StoreError::Invalid(e)),
            };
            if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
                watch(store, t, selector, &q)
            } else {
                list(&store, &t, selector.as_ref(), &q, as_table(&headers))
            }
        }
        (Method::GET, Some(name)) => match store.get(t.kind, &ns, name) {
            Ok(v) => match as_table(&headers) {
                Some(now) => {
                    let rv = meta_str(&v, "resourceVersion").to_string();
                    json_response(200, &printing::table(t.kind, &[v], &rv, now))
                }
                None => json_response(200, &v),
            },
            Err(e) => error(&e),
        },
        (Method::POST, None) => match body_object(&body, &t) {
            Ok(obj) => match store.create(t.kind, obj) {
                Ok(v) => json_response(201, &v),
                Err(e) => error(&e),
            },
            Err(e) => error(&e),
        },
        (Method::PUT, Some(name)) => match body_object(&body, &t) {
            Ok(obj) if meta_str(&obj, "name") != name => {
                error(&StoreError::Invalid("name in body and URL differ".into()))
            }
            Ok(obj) => match store.replace(t.kind, obj) {
                Ok(v) => json_response(200, &v),
                Err(e) => error(&e),
            },
            Err(e) => error(&e),
        },
        // JSON merge patch (RFC 7386), what kube's event recorder sends.
        (Method::PATCH, Some(name)) => {
            let patch: Value = match serde_json::from_slice(&body) {
                Ok(p) => p,
                Err(e) => return error(&StoreError::Invalid(format!("patch: {e}"))),
            };
            let merged = store.get(t.kind, &ns, name).map(|mut obj| {
                merge_patch(&mut obj, &patch);
                obj
            });
            match merged.and_then(|obj| store.replace(t.kind, obj)) {
                Ok(v) => json_response(200, &v),
                Err(e) => error(&e),
            }
        }
        (Method::DELETE, Some(name)) => match store.request_delete(t.kind, &ns, name) {
            Ok(v) => json_response(200, &v),
            Err(e) => error(&e),
        },
        (m, _) => json_response(
            405,
            &json!({"kind": "Status", "status": "Failure", "code": 405, "message": format!("method {m} not allowed")}),
        ),
    }
}

/// The discovery answer for `path`, in the form the Accept header asks for.
fn discovery_response(headers: &HeaderMap, path: &str) -> Option<Response> {
    let text = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
    let aggregated = discovery::wants_aggregated(text(header::ACCEPT).unwrap_or(""));
    let server = text(header::HOST).unwrap_or("127.0.0.1");
    let (body, aggregated) = discovery::answer(path, aggregated, server)?;
    let content_type = if aggregated {
        discovery::AGGREGATED
    } else {
        "application/json"
    };
    Some(([(header::CONTENT_TYPE, content_type)], body.to_string()).into_response())
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn body_object(body: &[u8], t: &Target) -> Result<Value, StoreError> {
    let mut obj: Value = serde_json::from_slice(body)
        .map_err(|e| StoreError::Invalid(format!("request body is not a JSON object: {e}")))?;
    if let Some(ns) = &t.namespace {
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        obj["metadata"]["namespace"] = json!(ns);
    }
    Ok(obj)
}

/// When the request asks for a Table (`kubectl get`): the time to print
/// ages at, in seconds since the epoch.
fn as_table(headers: &HeaderMap) -> Option<i64> {
    let accept = headers.get(header::ACCEPT)?.to_str().ok()?;
    if !printing::wants_table(accept) {
        return None;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Some(i64::try_from(now).unwrap_or(i64::MAX))
}

/// A list, or its Table when `table` holds the time to print at.
fn list(
    store: &Store,
    t: &Target,
    selector: Option<&LabelSelector>,
    q: &HashMap<String, String>,
    table: Option<i64>,
) -> Response {
    let page = match page_request(q) {
        Ok(p) => p,
        Err(e) => return error(&StoreError::Invalid(e)),
    };
    let keep = |o: &Value| selector.is_none_or(|s| s.matches(o));
    let (items, more, rv) = match store.list_page(t.kind, t.namespace.as_deref(), &page, keep) {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let (true, Some(last)) = (more, items.last()) {
        metadata["continue"] = json!(continue_token(rv, last));
    }
    if let Some(now) = table {
        let mut printed = printing::table(t.kind, &items, &rv.to_string(), now);
        printed["metadata"] = metadata;
        return json_response(200, &printed);
    }
    json_response(
        200,
        &json!({"kind": format!("{}List", t.kind.name()), "apiVersion": t.kind.api_version(),
                "metadata": metadata, "items": items}),
    )
}

/// `limit` (absent or 0: everything) and `continue` of a list request.
fn page_request(q: &HashMap<String, String>) -> Result<PageRequest, String> {
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None | Some(Ok(0)) => usize::MAX,
        Some(Ok(n)) => n,
        Some(Err(_)) => return Err(format!("limit: not a count: {:?}", q.get("limit"))),
    };
    let after =
        match q.get("continue").filter(|c| !c.is_empty()) {
            None => None,
            Some(token) => Some(parse_continue(token).ok_or_else(|| {
                format!("continue: {token:?} is not a token this server gave out")
            })?),
        };
    Ok(PageRequest { limit, after })
}

/// The token for the page after `last`: the list's resourceVersion and
/// where it stopped (names and namespaces hold no `/`).
fn continue_token(rv: u64, last: &Value) -> String {
    format!(
        "{rv}/{}/{}",
        meta_str(last, "namespace"),
        meta_str(last, "name")
    )
}

fn parse_continue(token: &str) -> Option<(u64, String, String)> {
    let mut parts = token.splitn(3, '/');
    let rv = parts.next()?.parse().ok()?;
    let ns = parts.next()?.to_string();
    let name = parts.next()?.to_string();
    Some((rv, ns, name))
}

fn watch_event(event_type: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": event_type, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch(
    store: Store,
    t: Target,
    selector: Option<LabelSelector>,
    q: &HashMap<String, String>,
) -> Response {
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1800);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let rv_param = q.get("resourceVersion").cloned().unwrap_or_default();
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(1024);
    let wanted = move |kind: Kind, obj: &Value| {
        kind == t.kind
            && t.namespace
                .as_deref()
                .is_none_or(|ns| ns == meta_str(obj, "namespace"))
            && selector.as_ref().is_none_or(|s| s.matches(obj))
    };
    tokio::spawn(async move {
        // "" or "0": start from the current state, sent as ADDED events.
        let start = match rv_param.parse::<u64>() {
            Ok(rv) if rv > 0 => store
                .watch_from(rv)
                .map(|(backlog, rx)| (vec![], backlog, rx)),
            _ => {
                let inner = store.lock();
                let rv = inner.rv;
                let current: Vec<(Kind, Value)> = inner
                    .list(t.kind, None)
                    .into_iter()
                    .map(|o| (t.kind, o.clone()))
                    .collect();
                drop(inner);
                store
                    .watch_from(rv)
                    .map(|(backlog, rx)| (current, backlog, rx))
            }
        };
        let (current, backlog, mut events) = match start {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Ok(watch_event("ERROR", &e.status()))).await;
                return;
            }
        };
        for (kind, obj) in &current {
            if wanted(*kind, obj) && tx.send(Ok(watch_event("ADDED", obj))).await.is_err() {
                return;
            }
        }
        for ev in &backlog {
            if wanted(ev.kind, &ev.object)
                && tx
                    .send(Ok(watch_event(ev.event_type, &ev.object)))
                    .await
                    .is_err()
            {
                return;
            }
        }
        let mut epoch = store.watch_epoch.subscribe();
        epoch.borrow_and_update();
        let deadline = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(deadline);
        let mut bookmark = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = epoch.changed() => return,
                _ = bookmark.tick(), if bookmarks => {
                    let obj = json!({"kind": t.kind.name(), "apiVersion": t.kind.api_version(),
                                     "metadata": {"resourceVersion": store.current_rv().to_string()}});
                    if tx.send(Ok(watch_event("BOOKMARK", &obj))).await.is_err() { return; }
                }
                ev = events.recv() => match ev {
                    Ok(ev) => {
                        if wanted(ev.kind, &ev.object) && tx.send(Ok(watch_event(ev.event_type, &ev.object))).await.is_err() {
                            return;
                        }
                    }
                    // Too slow a reader: like an apiserver, make it relist.
                    Err(RecvError::Lagged(_)) => {
                        let _ = tx.send(Ok(watch_event("ERROR", &StoreError::Gone(0).status()))).await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
    });
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Equality-based label selectors: `a=b`, `a==b`, `a!=b`, `a`, `!a`.
#[derive(Debug, Clone)]
pub struct LabelSelector(Vec<(String, Op)>);

#[derive(Debug, Clone)]
enum Op {
    Eq(String),
    Ne(String),
    Exists,
    Absent,
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let req = if let Some((k, v)) = part.split_once("!=") {
                (k.trim().to_string(), Op::Ne(v.trim().to_string()))
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (k.trim().to_string(), Op::Eq(v.trim().to_string()))
            } else if let Some(k) = part.strip_prefix('!') {
                (k.trim().to_string(), Op::Absent)
            } else if part.contains(' ') || part.contains('(') {
                return Err(format!("unsupported label selector {part:?}"));
            } else {
                (part.to_string(), Op::Exists)
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        self.0.iter().all(|(k, op)| {
            let v = labels[k].as_str();
            match op {
                Op::Eq(want) => v == Some(want),
                Op::Ne(want) => v != Some(want),
                Op::Exists => v.is_some(),
                Op::Absent => v.is_none(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_merges_objects_removes_nulls_replaces_the_rest() {
        let mut obj = json!({"a": {"b": 1, "c": 2}, "d": [1], "e": "x"});
        merge_patch(
            &mut obj,
            &json!({"a": {"b": 5, "c": null}, "d": [2, 3], "f": {"g": 1}}),
        );
        assert_eq!(
            obj,
            json!({"a": {"b": 5}, "d": [2, 3], "e": "x", "f": {"g": 1}})
        );
    }

    #[test]
    fn paths_name_kind_namespace_and_object() {
        let t = |kind, ns: Option<&str>, name: Option<&str>| {
            Some(Target {
                kind,
                namespace: ns.map(str::to_string),
                name: name.map(str::to_string),
            })
        };
        assert_eq!(parse_path("/api/v1/services"), t(Kind::Service, None, None));
        assert_eq!(
            parse_path("/api/v1/namespaces/x/pods/p1"),
            t(Kind::Pod, Some("x"), Some("p1"))
        );
        assert_eq!(
            parse_path("/api/v1/namespaces/x"),
            t(Kind::Namespace, None, Some("x"))
        );
        assert_eq!(
            parse_path("/apis/discovery.k8s.io/v1/endpointslices"),
            t(Kind::EndpointSlice, None, None)
        );
        assert_eq!(
            parse_path("/apis/networking.k8s.io/v1/namespaces/y/networkpolicies"),
            t(Kind::NetworkPolicy, Some("y"), None)
        );
        assert_eq!(
            parse_path("/apis/events.k8s.io/v1/namespaces/y/events"),
            t(Kind::Event, Some("y"), None)
        );
        assert_eq!(
            parse_path("/apis/apps/v1/namespaces/d/deployments/web/status"),
            t(Kind::Deployment, Some("d"), Some("web"))
        );
        assert_eq!(parse_path("/api/v2/services"), None);
        assert_eq!(parse_path("/nonsense"), None);
    }

    #[test]
    fn label_selectors() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        for (sel, want) in [
            ("app=web", true),
            ("app==web,tier", true),
            ("app!=web", false),
            ("!tier", false),
            ("db", false),
            ("", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&obj),
                want,
                "{sel}"
            );
        }
        assert!(LabelSelector::parse("app in (a,b)").is_err());
    }
}
