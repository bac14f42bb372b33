//! `kubectl exec POD -- CMD` over the WebSocket protocol kubectl 1.32
//! speaks first (`v5.channel.k8s.io`, also `v4`): every binary message
//! starts with its channel (0 stdin, 1 stdout, 2 stderr, 3 the final
//! Status, 4 terminal resize, 255 "this channel is closed"). The command
//! runs on the host inside the pod's network namespace, as `lb lab exec`
//! runs it, so `kubectl exec client -- curl http://api-service` goes
//! through the load balancer as a pod's traffic does. There is no
//! terminal: `-t` is accepted and ignored (stdout and stderr stay apart).

use std::process::Stdio;

use axum::{
    body::Bytes,
    extract::{
        ws::{
            rejection::WebSocketUpgradeRejection, CloseFrame, Message, WebSocket, WebSocketUpgrade,
        },
        Path, State,
    },
    http::Uri,
    response::Response,
};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};

use super::{
    apiserver::error,
    kinds::Kind,
    store::{Store, StoreError},
};

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
const CLOSE: u8 = 255;

/// What an exec request asks for, from its query (`command` repeats).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExecRequest {
    pub command: Vec<String>,
    pub stdin: bool,
}

impl ExecRequest {
    pub fn from_query(query: &str) -> Result<Self, String> {
        let mut r = ExecRequest::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "command" => r.command.push(v.into_owned()),
                "stdin" => r.stdin = v == "true" || v == "1",
                _ => {}
            }
        }
        if r.command.is_empty() {
            return Err("you must specify at least 1 command".into());
        }
        Ok(r)
    }
}

pub async fn handler(
    State(store): State<Store>,
    Path((ns, name)): Path<(String, String)>,
    uri: Uri,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let request = match ExecRequest::from_query(uri.query().unwrap_or("")) {
        Ok(r) => r,
        Err(e) => return error(&StoreError::BadRequest(e)),
    };
    let pod = match store.get(Kind::Pod, &ns, &name) {
        Ok(p) => p,
        Err(e) => return error(&e),
    };
    let netns = match super::pod_netns(&pod) {
        Ok(n) => n,
        Err(e) => return error(&StoreError::BadRequest(e.to_string())),
    };
    let Ok(ws) = ws else {
        return error(&StoreError::BadRequest(
            "exec: the lab speaks only the WebSocket protocol (v5.channel.k8s.io)".into(),
        ));
    };
    ws.protocols(["v5.channel.k8s.io", "v4.channel.k8s.io"])
        .on_upgrade(move |socket| run(socket, netns, pod, request))
}

/// The Status sent on channel 3 when the command ends.
pub fn exit_status(code: Option<i32>) -> Value {
    match code {
        Some(0) => json!({"metadata": {}, "status": "Success"}),
        Some(n) => json!({"metadata": {}, "status": "Failure",
            "message": format!("command terminated with non-zero exit code: exit status {n}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": n.to_string()}]}}),
        None => json!({"metadata": {}, "status": "Failure",
            "message": "command terminated by a signal", "reason": "InternalError"}),
    }
}

/// A normal closure (1000): client-go reads it as the end of every stream;
/// a close without a code (1005) is an error to it.
fn normal_close() -> Message {
    Message::Close(Some(CloseFrame {
        code: 1000,
        reason: "".into(),
    }))
}

fn framed(channel: u8, data: &[u8]) -> Message {
    let mut m = Vec::with_capacity(data.len() + 1);
    m.push(channel);
    m.extend_from_slice(data);
    Message::Binary(Bytes::from(m))
}

/// Copies `from` to the socket as messages on `channel`.
async fn pump(mut from: impl AsyncRead + Unpin, channel: u8, out: mpsc::Sender<Message>) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || out.send(framed(channel, &buf[..n])).await.is_err() {
            return;
        }
    }
}

/// Runs the command in the pod's network namespace and its node's cgroup
/// of pods, as its containers run.
async fn run(socket: WebSocket, netns: String, pod: Value, request: ExecRequest) {
    let (mut sink, mut stream) = socket.split();
    let spawned = crate::netns::command_in_pod(&netns, &request.command[0]).and_then(|mut c| {
        super::cgroup::join_pod(&mut c, &netns, &pod)?;
        c.args(&request.command[1..])
            .stdin(if request.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(tokio::process::Command::from(c).spawn()?)
    });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let status = json!({"metadata": {}, "status": "Failure", "reason": "InternalError",
                                "message": format!("exec {:?}: {e:#}", request.command[0])});
            let _ = sink
                .send(framed(STATUS, status.to_string().as_bytes()))
                .await;
            let _ = sink.send(normal_close()).await;
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<Message>(64);
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(tokio::spawn(pump(out, STDOUT, tx.clone())));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(tokio::spawn(pump(err, STDERR, tx.clone())));
    }
    drop(tx);
    let mut stdin = child.stdin.take();
    // The client's messages: stdin data, and the end of stdin.
    let input = tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            let Message::Binary(data) = msg else {
                if matches!(msg, Message::Close(_)) {
                    return;
                }
                continue;
            };
            match data.first() {
                Some(&STDIN) => {
                    if let Some(w) = stdin.as_mut() {
                        if w.write_all(&data[1..]).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Some(&CLOSE) if data.get(1) == Some(&STDIN) => stdin = None,
                _ => {}
            }
        }
    });
    while let Some(msg) = rx.recv().await {
        if sink.send(msg).await.is_err() {
            break;
        }
    }
    for p in pumps {
        let _ = p.await;
    }
    let code = child.wait().await.ok().and_then(|s| s.code());
    let _ = sink
        .send(framed(STATUS, exit_status(code).to_string().as_bytes()))
        .await;
    let _ = sink.send(normal_close()).await;
    input.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_names_the_command_and_stdin() {
        let r = ExecRequest::from_query(
            "command=curl&command=-s&command=http%3A%2F%2Fapi-service%2F&container=c&stdin=true&stdout=true&tty=false",
        )
        .unwrap();
        assert_eq!(r.command, ["curl", "-s", "http://api-service/"]);
        assert!(r.stdin);
        assert!(ExecRequest::from_query("stdout=true").is_err());
    }

    #[test]
    fn a_non_zero_exit_is_a_failure_carrying_the_code() {
        assert_eq!(exit_status(Some(0))["status"], "Success");
        let failed = exit_status(Some(7));
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "7");
    }
}
