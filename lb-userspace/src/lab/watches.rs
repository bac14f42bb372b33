//! The API server's watches: a watch from a resourceVersion, from the
//! current state, or as a streaming list (`sendInitialEvents`), with
//! bookmarks that never run ahead of what the stream has passed on.

use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{json, Value};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::{
    apiserver::{error, unix_now, Target},
    kinds::Kind,
    printing,
    selectors::Selectors,
    store::{meta_str, Event, Store, StoreError},
};

/// One line of a watch: written from the stored object itself (`json!`
/// would copy it first).
fn watch_event(event_type: &str, object: &Value) -> Bytes {
    #[derive(serde::Serialize)]
    struct WatchEvent<'a> {
        #[serde(rename = "type")]
        event_type: &'a str,
        object: &'a Value,
    }
    let mut line = serde_json::to_vec(&WatchEvent { event_type, object }).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

pub(super) fn watch(
    store: Store,
    t: Target,
    selectors: Selectors,
    q: &HashMap<String, String>,
    table: bool,
) -> Response {
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1800);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    // Validated whenever given, as kube-apiserver validates it.
    let initial_events = q.contains_key("sendInitialEvents");
    if initial_events {
        if let Err(e) = streaming_list_allowed(&store, q, bookmarks) {
            return error(&e);
        }
    }
    let initial_events = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let rv_param = q.get("resourceVersion").cloned().unwrap_or_default();
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(1024);
    // `kubectl get -w` asks for Tables: each event's object is a Table of
    // one row (kubectl prints the header once, while the columns stay).
    let event = move |event_type: &str, obj: &Value| {
        if !table {
            return watch_event(event_type, obj);
        }
        let rv = meta_str(obj, "resourceVersion").to_string();
        let now = unix_now();
        watch_event(
            event_type,
            &printing::table(t.kind, std::slice::from_ref(obj), &rv, now),
        )
    };
    let wanted = move |kind: Kind, obj: &Value| {
        kind == t.kind
            && t.namespace
                .as_deref()
                .is_none_or(|ns| ns == meta_str(obj, "namespace"))
            && selectors.matches(obj)
    };
    let bookmark = move |rv: u64, initial_end: bool| {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        watch_event(
            "BOOKMARK",
            &json!({"kind": t.kind.name(), "apiVersion": t.kind.api_version(), "metadata": meta}),
        )
    };
    tokio::spawn(async move {
        let start = start_watch(&store, t.kind, &rv_param, initial_events);
        let WatchStart {
            current,
            mut sent_rv,
            backlog,
            mut events,
        } = match start {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Ok(watch_event("ERROR", &e.status()))).await;
                return;
            }
        };
        for obj in &current {
            if wanted(t.kind, obj) && tx.send(Ok(event("ADDED", obj))).await.is_err() {
                return;
            }
        }
        drop(current);
        // The state is all sent: the bookmark that says so, at the
        // resourceVersion it was read at (the backlog follows it).
        if initial_events && tx.send(Ok(bookmark(sent_rv, true))).await.is_err() {
            return;
        }
        for ev in &backlog {
            sent_rv = ev.rv;
            if wanted(ev.kind, &ev.object)
                && tx.send(Ok(event(ev.event_type, &ev.object))).await.is_err()
            {
                return;
            }
        }
        let mut epoch = store.watch_epoch.subscribe();
        epoch.borrow_and_update();
        let deadline = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(deadline);
        let period = Duration::from_secs(5);
        let mut periodic = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = epoch.changed() => return,
                // At the last event this watch has passed on, never the
                // store's newest: events still queued for it would be
                // skipped by a client that resumes from the bookmark.
                _ = periodic.tick(), if bookmarks => {
                    if tx.send(Ok(bookmark(sent_rv, false))).await.is_err() { return; }
                }
                ev = events.recv() => match ev {
                    Ok(ev) => {
                        sent_rv = ev.rv;
                        if wanted(ev.kind, &ev.object) && tx.send(Ok(event(ev.event_type, &ev.object))).await.is_err() {
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

/// Where a watch starts: the objects to send first as ADDED (none when it
/// resumes), the resourceVersion they were read at, the events after it
/// already recorded, and the live ones.
struct WatchStart {
    current: Vec<Arc<Value>>,
    sent_rv: u64,
    backlog: Vec<Event>,
    events: tokio::sync::broadcast::Receiver<Event>,
}

/// "" or "0", or a streaming list: the current state (the lab's state is
/// always at least as new as a resourceVersion it has handed out); any
/// other resourceVersion: resumed after it, or 410 Gone.
fn start_watch(
    store: &Store,
    kind: Kind,
    rv_param: &str,
    initial_events: bool,
) -> Result<WatchStart, StoreError> {
    let (current, rv) = match rv_param.parse::<u64>() {
        Ok(rv) if rv > 0 && !initial_events => (vec![], rv),
        _ => {
            let inner = store.lock();
            (inner.list_shared(kind, None), inner.rv)
        }
    };
    let (backlog, events) = store.watch_from(rv)?;
    Ok(WatchStart {
        current,
        sent_rv: rv,
        backlog,
        events,
    })
}

/// A streaming list (`sendInitialEvents=true`) is served as kube-apiserver
/// serves it: with `resourceVersionMatch=NotOlderThan` and bookmarks asked
/// for, and only while the WatchList feature is on (`Store::set_watch_list`).
fn streaming_list_allowed(
    store: &Store,
    q: &HashMap<String, String>,
    bookmarks: bool,
) -> Result<(), StoreError> {
    let refuse = |why: &str| Err(StoreError::Invalid(format!("sendInitialEvents: {why}")));
    if !store.watch_list() {
        return refuse("Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled");
    }
    if q.get("resourceVersionMatch").map(String::as_str) != Some("NotOlderThan") {
        return refuse("Forbidden: sendInitialEvents is forbidden for watch unless resourceVersionMatch is set to NotOlderThan");
    }
    let wants_events = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    if wants_events && !bookmarks {
        return refuse("Forbidden: sendInitialEvents requires setting allowWatchBookmarks=true");
    }
    Ok(())
}
