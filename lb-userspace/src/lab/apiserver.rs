//! A small API server speaking the Kubernetes JSON list/watch protocol over
//! plain HTTP, for the kinds of `kinds.rs`. kube-rs talks to it unchanged;
//! kubectl finds its resources through discovery (`discovery.rs`).
//!
//! Fault injection for tests: `POST /lab/compact` (watches resuming from an
//! older resourceVersion get 410 Gone) and `POST /lab/drop-watches` (every
//! open watch stream ends).

use std::collections::HashMap;

use axum::{
    body::Bytes,
    extract::{Query, State},
    http::{header, HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use serde_json::{json, Value};

use super::{
    discovery, exec,
    kinds::Kind,
    logs, openapi, printing,
    selectors::Selectors,
    store::{meta_str, PageRequest, Store, StoreError},
    watches,
    writes::Write,
};

pub fn router(store: Store) -> Router {
    Router::new()
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/exec",
            axum::routing::any(exec::handler),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/log",
            axum::routing::get(logs::handler),
        )
        .fallback(handle)
        .with_state(store)
}

/// What a request path names.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) kind: Kind,
    /// The group/version the request named (Events are served under both
    /// v1 and events.k8s.io/v1, stored once).
    group_version: String,
    pub(super) namespace: Option<String>,
    name: Option<String>,
    scale: bool,
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
    // The status subresource takes whole objects here, as the lab's own
    // controllers write them.
    let (name, scale) = match rest.1 {
        [] => (None, false),
        [name] | [name, "status"] => (Some(name.to_string()), false),
        [name, "scale"] => (Some(name.to_string()), true),
        _ => return None,
    };
    Some(Target {
        kind,
        group_version: gv,
        namespace,
        name,
        scale,
    })
}

fn json_response(code: u16, v: &impl serde::Serialize) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = match serde_json::to_vec(v) {
        Ok(b) => b,
        Err(e) => return error(&StoreError::Invalid(format!("encoding the response: {e}"))),
    };
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub(super) fn error(e: &StoreError) -> Response {
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
        if let Some(doc) = openapi::answer(uri.path()) {
            return json_response(200, &doc);
        }
    }
    let Some(t) = parse_path(uri.path()) else {
        return error(&StoreError::NotFound(format!(
            "the server could not find the requested resource ({})",
            uri.path()
        )));
    };
    let ns = t.namespace.clone().unwrap_or_default();
    let write = Write {
        kind: t.kind,
        namespace: t.namespace.as_deref(),
        query: &q,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if matches!(method, Method::POST | Method::PUT) && !is_json(content_type) {
        return error(&StoreError::UnsupportedMedia(format!(
            "the body of the request was in an unknown format ({content_type}): the lab \
             reads application/json (kubectl create KIND sends protobuf: use kubectl create \
             ... --dry-run=client -o yaml | kubectl apply -f -)"
        )));
    }
    let answer = match (method, t.name.as_deref()) {
        (Method::GET, None) => {
            let selectors =
                match Selectors::from_query(q.get("labelSelector"), q.get("fieldSelector")) {
                    Ok(s) => s,
                    Err(e) => return error(&StoreError::BadRequest(e)),
                };
            if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
                let table = as_table(&headers).is_some();
                return watches::watch(store, t, selectors, &q, table);
            }
            return list(&store, &t, &selectors, &q, as_table(&headers));
        }
        (Method::GET, Some(name)) if t.scale => write.get_scale(&store, name),
        (Method::GET, Some(name)) => {
            return match store.get(t.kind, &ns, name) {
                Ok(v) => match as_table(&headers) {
                    Some(now) => {
                        let rv = meta_str(&v, "resourceVersion").to_string();
                        json_response(200, &printing::table(t.kind, &[v], &rv, now))
                    }
                    None => json_response(200, &v),
                },
                Err(e) => error(&e),
            }
        }
        (Method::POST, None) => write.create(&store, &body),
        (Method::PUT, Some(name)) if t.scale => write.write_scale(&store, name, None, &body),
        (Method::PUT, Some(name)) => write.replace(&store, name, &body),
        (Method::PATCH, Some(name)) if t.scale => {
            write.write_scale(&store, name, Some(content_type), &body)
        }
        (Method::PATCH, Some(name)) => write.patch(&store, name, content_type, &body),
        (Method::DELETE, Some(name)) => write.delete(&store, name, &body),
        (m, _) => {
            return json_response(
                405,
                &json!({"kind": "Status", "status": "Failure", "code": 405, "message": format!("method {m} not allowed")}),
            )
        }
    };
    match answer {
        Ok((code, mut obj, warnings)) => {
            // A typed client decodes the answer as the group it wrote to.
            if t.kind == Kind::Event && obj["kind"] == "Event" {
                obj["apiVersion"] = json!(t.group_version);
            }
            with_warnings(json_response(code, &obj), &warnings)
        }
        Err(e) => error(&e),
    }
}

/// `Warning: 299 - "..."` headers, as kube-apiserver sends field
/// validation warnings (kubectl prints them).
fn with_warnings(mut r: Response, warnings: &[String]) -> Response {
    for w in warnings {
        let text = format!("299 - \"{}\"", w.replace('"', "'"));
        if let Ok(v) = header::HeaderValue::from_str(&text) {
            r.headers_mut().append(header::WARNING, v);
        }
    }
    r
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

/// When the request asks for a Table (`kubectl get`): the time to print
/// ages at, in seconds since the epoch.
fn as_table(headers: &HeaderMap) -> Option<i64> {
    let accept = headers.get(header::ACCEPT)?.to_str().ok()?;
    if !printing::wants_table(accept) {
        return None;
    }
    Some(unix_now())
}

pub(super) fn unix_now() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    i64::try_from(now).unwrap_or(i64::MAX)
}

/// A list, or its Table when `table` holds the time to print at.
fn list(
    store: &Store,
    t: &Target,
    selectors: &Selectors,
    q: &HashMap<String, String>,
    table: Option<i64>,
) -> Response {
    let page = match page_request(q) {
        Ok(p) => p,
        Err(e) => return error(&StoreError::Invalid(e)),
    };
    let keep = |o: &Value| selectors.matches(o);
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
    // Written straight from the store's objects: `json!` would copy each
    // into a new tree first.
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct List<'a> {
        kind: String,
        api_version: &'a str,
        metadata: Value,
        items: Vec<&'a Value>,
    }
    let list = List {
        kind: format!("{}List", t.kind.name()),
        api_version: t.kind.api_version(),
        metadata,
        items: items.iter().map(|o| &**o).collect(),
    };
    json_response(200, &list)
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

/// Created and replaced objects are read as JSON. The protobuf that
/// `kubectl create KIND` sends for built-in kinds (the lab has no schema to
/// decode it by) is refused with 415 and says so, rather than a parse error
/// that blames the body.
fn is_json(content_type: &str) -> bool {
    let media = content_type.split(';').next().unwrap_or("").trim();
    matches!(media, "application/json" | "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_json_and_protobuf_is_refused() {
        for (ct, json) in [
            ("application/json", true),
            ("application/json; charset=utf-8", true),
            ("", true),
            ("application/vnd.kubernetes.protobuf", false),
            ("application/cbor", false),
        ] {
            assert_eq!(is_json(ct), json, "{ct}");
        }
    }

    #[test]
    fn paths_name_kind_namespace_and_object() {
        // The group/version is checked once, below.
        let parsed = |p: &str| {
            parse_path(p).map(|t| Target {
                group_version: String::new(),
                ..t
            })
        };
        let t = |kind, ns: Option<&str>, name: Option<&str>| {
            Some(Target {
                kind,
                group_version: String::new(),
                namespace: ns.map(str::to_string),
                name: name.map(str::to_string),
                scale: false,
            })
        };
        assert_eq!(parsed("/api/v1/services"), t(Kind::Service, None, None));
        assert_eq!(
            parsed("/api/v1/namespaces/x/pods/p1"),
            t(Kind::Pod, Some("x"), Some("p1"))
        );
        assert_eq!(
            parsed("/api/v1/namespaces/x"),
            t(Kind::Namespace, None, Some("x"))
        );
        assert_eq!(
            parsed("/apis/discovery.k8s.io/v1/endpointslices"),
            t(Kind::EndpointSlice, None, None)
        );
        assert_eq!(
            parsed("/apis/networking.k8s.io/v1/namespaces/y/networkpolicies"),
            t(Kind::NetworkPolicy, Some("y"), None)
        );
        assert_eq!(
            parsed("/apis/events.k8s.io/v1/namespaces/y/events"),
            t(Kind::Event, Some("y"), None)
        );
        assert_eq!(
            parsed("/apis/apps/v1/namespaces/d/deployments/web/status"),
            t(Kind::Deployment, Some("d"), Some("web"))
        );
        assert_eq!(
            parsed("/apis/apps/v1/namespaces/d/deployments/web/scale"),
            Some(Target {
                kind: Kind::Deployment,
                group_version: String::new(),
                namespace: Some("d".into()),
                name: Some("web".into()),
                scale: true,
            })
        );
        assert_eq!(parsed("/api/v1/endpoints"), t(Kind::Endpoints, None, None));
        assert_eq!(parsed("/api/v2/services"), None);
        assert_eq!(parsed("/nonsense"), None);
        assert_eq!(
            parse_path("/apis/events.k8s.io/v1/namespaces/y/events").map(|t| t.group_version),
            Some("events.k8s.io/v1".to_string())
        );
    }
}
