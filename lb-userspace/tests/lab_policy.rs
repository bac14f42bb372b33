//! NetworkPolicy with real traffic: a reachability matrix between pods x/a,
//! x/b and y/a (on two nodes), probed after each policy change and compared
//! with the expected one (printed on failure).

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, PostParams};
use lb::lab::{kinds::Kind, Lab};

const PODS: [(&str, &str); 3] = [("x", "a"), ("x", "b"), ("y", "a")];

async fn probe(lab: &Lab, from: (&str, &str), to: (&str, &str)) -> bool {
    let pod = lab.store.get(Kind::Pod, to.0, to.1).unwrap();
    let addr: SocketAddr = format!("{}:80", pod["status"]["podIP"].as_str().unwrap())
        .parse()
        .unwrap();
    let netns = lab.pod_netns(from.0, from.1).unwrap();
    tokio::task::spawn_blocking(move || {
        lb::echo::http_get_in(&netns, addr, Duration::from_millis(700)).is_ok()
    })
    .await
    .unwrap()
}

/// The matrix: one row per sender, one column per receiver ("." for self).
async fn matrix(lab: &Lab) -> String {
    let mut out = String::from("from\\to  x/a x/b y/a\n");
    for from in PODS {
        out.push_str(&format!("{:<8}", format!("{}/{}", from.0, from.1)));
        for to in PODS {
            let cell = if from == to {
                "."
            } else if probe(lab, from, to).await {
                "ok"
            } else {
                "X"
            };
            out.push_str(&format!(" {cell:>3}"));
        }
        out.push('\n');
    }
    out
}

/// Waits until the probed matrix equals `want` (policies apply within a
/// few hundred milliseconds; the deadline is generous for loaded machines).
async fn expect(lab: &Lab, case: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = matrix(lab).await;
        if got.trim_end() == want.trim_end() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "case {case}:\nwant\n{want}\ngot\n{got}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn policy(ns: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(
        serde_json::json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_policy_truth_table() {
    let lab = common::lab_with('w', common::test_manifests("policy"), 2).await;
    let client = lb::agent::client(Some(&lab.kubeconfig_path()))
        .await
        .unwrap();
    let x: Api<NetworkPolicy> = Api::namespaced(client, "x");

    expect(
        &lab,
        "no policy: all allowed",
        "from\\to  x/a x/b y/a\nx/a        .  ok  ok\nx/b       ok   .  ok\ny/a       ok  ok   .",
    )
    .await;

    // The tutorial's default deny for namespace x.
    x.create(
        &PostParams::default(),
        &policy(
            "x",
            "default-deny-ingress",
            serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        ),
    )
    .await
    .unwrap();
    expect(
        &lab,
        "default-deny-ingress in x",
        "from\\to  x/a x/b y/a\nx/a        .   X  ok\nx/b        X   .  ok\ny/a        X   X   .",
    )
    .await;

    // `lb flows` on x/a's node shows the drop, with pod names.
    let a_node = lab.store.get(Kind::Pod, "x", "a").unwrap()["spec"]["nodeName"]
        .as_str()
        .unwrap()
        .to_string();
    let index: usize = a_node.trim_start_matches("node-").parse().unwrap();
    let mut flows = std::process::Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["flows", "--pin-dir"])
        .arg(lab.pin_dir(index))
        .arg("--kubeconfig")
        .arg(lab.kubeconfig_path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await; // names loaded
    assert!(!probe(&lab, ("x", "b"), ("x", "a")).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = flows.kill();
    let out = tokio::task::spawn_blocking(move || flows.wait_with_output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains(" x/b:") && l.contains("-> x/a:80 TCP/80 ingress DROP")),
        "lb flows output:\n{text}"
    );

    // Allow b -> a on 80; a may send nothing (egress deny), yet a's replies
    // to b pass: the policy is stateful.
    x.create(
        &PostParams::default(),
        &policy("x", "allow-b-to-a", serde_json::json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}], "ports": [{"protocol": "TCP", "port": 80}]}]})),
    )
    .await
    .unwrap();
    expect(
        &lab,
        "allow b -> a:80, a egress denied",
        "from\\to  x/a x/b y/a\nx/a        .   X   X\nx/b       ok   .  ok\ny/a        X   X   .",
    )
    .await;

    // `lb policy trace` names the deciding policy, and agrees with the traffic.
    let trace = |from: &str, to: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lb"))
            .args([
                "policy",
                "trace",
                "--from",
                from,
                "--to",
                to,
                "--port",
                "80",
                "--kubeconfig",
            ])
            .arg(lab.kubeconfig_path())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, text) = trace("x/b", "x/a");
    assert!(
        ok && text.contains("ALLOW") && text.contains("x/allow-b-to-a ingress rule 0"),
        "{text}"
    );
    let (ok, text) = trace("y/a", "x/a");
    assert!(!ok && text.contains("DENY"), "{text}");
    let (ok, text) = trace("x/a", "x/b");
    assert!(
        !ok && text.contains("egress") && text.contains("deny"),
        "a's egress is denied: {text}"
    );

    // From namespace y too (namespaceSelector).
    x.create(
        &PostParams::default(),
        &policy("x", "allow-from-y", serde_json::json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]})),
    )
    .await
    .unwrap();
    expect(
        &lab,
        "plus namespaceSelector ns=y",
        "from\\to  x/a x/b y/a\nx/a        .   X   X\nx/b       ok   .  ok\ny/a       ok  ok   .",
    )
    .await;

    // A label change applies to new connections: b is no longer app=b.
    let kube = lb::agent::client(Some(&lab.kubeconfig_path()))
        .await
        .unwrap();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(kube, "x");
    let mut b = pods.get("b").await.unwrap();
    b.metadata.labels = Some([("app".to_string(), "c".to_string())].into());
    pods.replace("b", &PostParams::default(), &b).await.unwrap();
    expect(
        &lab,
        "x/b relabelled app=c",
        "from\\to  x/a x/b y/a\nx/a        .   X   X\nx/b        X   .  ok\ny/a       ok  ok   .",
    )
    .await;

    // Removing the policies opens everything again.
    for name in ["default-deny-ingress", "allow-b-to-a", "allow-from-y"] {
        x.delete(name, &DeleteParams::default()).await.unwrap();
    }
    expect(
        &lab,
        "policies removed",
        "from\\to  x/a x/b y/a\nx/a        .  ok  ok\nx/b       ok   .  ok\ny/a       ok  ok   .",
    )
    .await;

    // A policy with a bad CIDR: its pod is isolated with nothing allowed
    // (never more than the policy meant), the rest is untouched, and the
    // policy gets a Warning Event saying why.
    x.create(
        &PostParams::default(),
        &policy(
            "x",
            "bad-cidr",
            serde_json::json!({"podSelector": {"matchLabels": {"app": "a"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
        ),
    )
    .await
    .unwrap();
    expect(
        &lab,
        "x/a selected by a policy with a bad CIDR",
        "from\\to  x/a x/b y/a\nx/a        .  ok  ok\nx/b        X   .  ok\ny/a        X  ok   .",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (events, _) = lab.store.list(Kind::Event, Some("x"));
        let found = events.iter().find(|e| {
            e["regarding"]["kind"] == "NetworkPolicy" && e["regarding"]["name"] == "bad-cidr"
        });
        if let Some(e) = found {
            assert_eq!(e["type"], "Warning", "{e}");
            assert!(
                e["note"].as_str().unwrap_or("").contains("10.0.0.0/33"),
                "the note names the bad CIDR: {e}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no Event on x/bad-cidr: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    x.delete("bad-cidr", &DeleteParams::default())
        .await
        .unwrap();
}
