//! `kubectl logs POD`: the pod's output, which the lab's kubelet writes to
//! a file named in the pod's annotations. `tailLines` is honoured; `follow`
//! is not (the log so far is sent and the answer ends).

use axum::{
    extract::{Path, Query, State},
    http::header,
    response::{IntoResponse, Response},
};
use std::collections::HashMap;

use super::{
    apiserver::error,
    kinds::Kind,
    kubelet::LOG_ANNOTATION,
    store::{Store, StoreError},
};

/// The last `n` lines of `text` (all of it without `n`).
pub fn tail(text: &str, n: Option<usize>) -> &str {
    let Some(n) = n else { return text };
    let body = text.strip_suffix('\n').unwrap_or(text);
    if n == 0 {
        return "";
    }
    match body.rmatch_indices('\n').nth(n - 1) {
        Some((at, _)) => &text[at + 1..],
        None => text,
    }
}

pub async fn handler(
    State(store): State<Store>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let pod = match store.get(Kind::Pod, &ns, &name) {
        Ok(p) => p,
        Err(e) => return error(&e),
    };
    let Some(path) = pod["metadata"]["annotations"][LOG_ANNOTATION].as_str() else {
        return error(&StoreError::BadRequest(format!(
            "container of pod \"{name}\" is waiting to start"
        )));
    };
    let lines = match q.get("tailLines").map(|n| n.parse::<usize>()) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return error(&StoreError::BadRequest("tailLines: not a count".into())),
    };
    match tokio::fs::read_to_string(path).await {
        Ok(text) => (
            [(header::CONTENT_TYPE, "text/plain")],
            tail(&text, lines).to_string(),
        )
            .into_response(),
        Err(e) => error(&StoreError::BadRequest(format!(
            "log of pod \"{name}\": {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::tail;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", Some(2)), "b\nc\n");
        assert_eq!(tail("a\nb\nc", Some(1)), "c");
        assert_eq!(tail("a\nb\n", Some(5)), "a\nb\n");
        assert_eq!(tail("a\nb\n", Some(0)), "");
        assert_eq!(tail("a\nb\n", None), "a\nb\n");
    }
}
