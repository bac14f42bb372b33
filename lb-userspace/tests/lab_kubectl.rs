//! The tutorials' kubectl commands against a lab, with the real kubectl
//! (v1.32, on the PATH as on every machine of this kind): seed 003's
//! Deployment and NodePort Service applied as written, then the commands
//! the seeds use, each checked for its effect on the cluster and for what
//! kubectl prints.

mod common;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use common::kubectl::{rows, wait_for, Kubectl};
use lb::lab::{kinds::Kind, objects::is_terminating, store::meta_str, Lab, LabConfig};
use serde_json::Value;

fn manifest() -> PathBuf {
    common::test_manifests("rollout").join("example-2.yaml")
}

fn live_pods(lab: &Lab, label: &str) -> Vec<Value> {
    let (pods, _) = lab.store.list(Kind::Pod, Some("default"));
    pods.into_iter()
        .filter(|p| p["metadata"]["labels"]["app"] == label && !is_terminating(p))
        .collect()
}

/// A copy of `source` with `edit` applied to its text, in the lab's logs.
fn edited(lab: &Lab, name: &str, source: &Path, edit: impl Fn(&str) -> String) -> PathBuf {
    let text = std::fs::read_to_string(source).expect("manifest");
    let path = lab.kubeconfig_path().with_file_name(name);
    std::fs::write(&path, edit(&text)).expect("write manifest");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tutorials_kubectl_commands_work_against_the_lab() {
    let mut cfg = LabConfig::new(&common::prefix('k'), env!("CARGO_BIN_EXE_lb"));
    cfg.nodes = 2;
    let lab = Lab::up(cfg).await.expect("lab up");
    let k = Kubectl::new(&lab);
    let file = manifest();
    let file = file.to_str().expect("path");

    // apply creates; rollout status waits for minReadySeconds as a cluster does.
    let applied = k.run(&["apply", "-f", file]).await;
    assert!(
        applied.contains("deployment.apps/example-2 created"),
        "{applied}"
    );
    assert!(
        applied.contains("service/ex2-svc-external created"),
        "{applied}"
    );
    let status = k
        .run(&["rollout", "status", "deploy/example-2", "--timeout=120s"])
        .await;
    assert!(status.contains("successfully rolled out"), "{status}");
    assert_eq!(live_pods(&lab, "web").len(), 4);

    // get with -o wide and -l, jsonpath, endpoints, describe.
    let pods = rows(&k.run(&["get", "pods", "-l", "app=web", "-o", "wide"]).await);
    assert_eq!(pods[0][..3], ["NAME", "READY", "STATUS"]);
    assert_eq!(pods.len(), 5, "{pods:?}");
    assert!(
        pods[1..].iter().all(|r| r[1] == "1/1" && r[2] == "Running"),
        "{pods:?}"
    );
    let ips: Vec<String> = live_pods(&lab, "web")
        .iter()
        .map(|p| p["status"]["podIP"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        pods[1..].iter().all(|r| ips.contains(&r[5])),
        "{pods:?} {ips:?}"
    );
    let node_port = k
        .run(&[
            "get",
            "svc",
            "ex2-svc-external",
            "-o",
            "jsonpath={.spec.ports[0].nodePort}",
        ])
        .await;
    assert_eq!(node_port, "30000");
    let endpoints = k.run(&["get", "endpoints", "ex2-svc-external"]).await;
    assert_eq!(rows(&endpoints)[0], ["NAME", "ENDPOINTS", "AGE"]);
    let shown = endpoints.lines().nth(1).unwrap_or("");
    assert!(
        shown.contains(":80,") && shown.contains(" + 1 more..."),
        "{endpoints}"
    );
    let described = k.run(&["describe", "svc", "ex2-svc-external"]).await;
    for want in [
        "Selector:",
        "app=web",
        "NodePort:",
        "30000/TCP",
        "Endpoints:",
    ] {
        assert!(described.contains(want), "{want} not in:\n{described}");
    }
    assert!(
        ips.iter().any(|ip| described.contains(ip.as_str())),
        "{described}"
    );

    // apply again: unchanged; a misspelt field is refused as a cluster refuses it.
    let again = k.run(&["apply", "-f", file]).await;
    assert!(
        again.contains("deployment.apps/example-2 unchanged"),
        "{again}"
    );
    let misspelt = edited(&lab, "misspelt.yaml", Path::new(file), |t| {
        t.replacen("  replicas: 4", "  replicass: 4", 1)
    });
    let refused = k
        .try_run(&["apply", "-f", misspelt.to_str().expect("path")])
        .await;
    assert!(!refused.ok);
    assert!(
        refused
            .stderr
            .contains("strict decoding error: unknown field \"spec.replicass\""),
        "{}",
        refused.stderr
    );

    // label, annotate, scale.
    k.run(&["label", "deploy", "example-2", "tier=frontend"])
        .await;
    k.run(&["annotate", "svc", "ex2-svc-external", "owner=lab"])
        .await;
    let d = lab
        .store
        .get(Kind::Deployment, "default", "example-2")
        .expect("deployment");
    assert_eq!(d["metadata"]["labels"]["tier"], "frontend");
    assert_eq!(d["metadata"]["labels"]["app"], "web");
    let s = lab
        .store
        .get(Kind::Service, "default", "ex2-svc-external")
        .expect("service");
    assert_eq!(s["metadata"]["annotations"]["owner"], "lab");
    let by_label = k
        .run(&[
            "get",
            "deploy",
            "-l",
            "tier in (frontend,backend)",
            "-o",
            "name",
        ])
        .await;
    assert_eq!(by_label.trim(), "deployment.apps/example-2");
    // get -w: the list's Table, then a row per change from the watch's
    // Tables (the annotation below), the header once.
    let (watched, _) = tokio::join!(k.watch(&["deploy"], 4), async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        k.run(&["annotate", "deploy", "example-2", "watched=yes"])
            .await
    });
    let watched = rows(&watched);
    assert_eq!(watched[0][..2], ["NAME", "READY"], "{watched:?}");
    assert!(watched.len() >= 3, "a row from the watch: {watched:?}");
    assert_eq!(watched.iter().filter(|r| r[0] == "NAME").count(), 1);
    assert!(
        watched[1..].iter().all(|r| r[..2] == ["example-2", "4/4"]),
        "{watched:?}"
    );
    let scaled = k
        .run(&["scale", "deploy", "example-2", "--replicas=2"])
        .await;
    assert!(
        scaled.contains("deployment.apps/example-2 scaled"),
        "{scaled}"
    );
    wait_for(&lab, "2 pods after scale", |lab| {
        live_pods(lab, "web").len() == 2
    })
    .await;

    // set image rolls the Deployment to a new ReplicaSet.
    k.run(&["set", "image", "deploy/example-2", "web=nginx:1.27"])
        .await;
    let status = k
        .run(&["rollout", "status", "deploy/example-2", "--timeout=120s"])
        .await;
    assert!(status.contains("successfully rolled out"), "{status}");
    // Pods of the old ReplicaSet may still be terminating, as in a cluster.
    let images: Vec<String> = live_pods(&lab, "web")
        .iter()
        .map(|p| {
            p["spec"]["containers"][0]["image"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert!(
        images.len() == 2 && images.iter().all(|i| i == "nginx:1.27"),
        "{images:?}"
    );
    let printed = k
        .run(&[
            "get",
            "deploy",
            "example-2",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}",
        ])
        .await;
    assert_eq!(printed, "nginx:1.27");
    let (sets, _) = lab.store.list(Kind::ReplicaSet, Some("default"));
    assert_eq!(sets.len(), 2, "the old ReplicaSet stays, scaled to 0");

    // expose makes a Service that selects the pods and lb balances it.
    let exposed = k
        .run(&[
            "expose",
            "deploy",
            "example-2",
            "--name=ex2-internal",
            "--port=8080",
            "--target-port=80",
        ])
        .await;
    assert!(
        exposed.contains("service/ex2-internal exposed"),
        "{exposed}"
    );
    wait_for(&lab, "endpoints of ex2-internal", |lab| {
        lab.store
            .get(Kind::Endpoints, "default", "ex2-internal")
            .is_ok_and(|e| {
                e["subsets"][0]["addresses"]
                    .as_array()
                    .is_some_and(|a| a.len() == 2)
            })
    })
    .await;
    let client = meta_str(&live_pods(&lab, "web")[0], "name").to_string();
    common::wait_reachable(
        &lab,
        ("default", &client),
        common::vip(&lab, "ex2-internal", 8080),
        Duration::from_secs(30),
    )
    .await;

    // exec runs in the pod's network namespace: its address, the Service
    // through lb, and the command's exit code.
    let client_ip = live_pods(&lab, "web")[0]["status"]["podIP"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let addrs = k
        .run(&["exec", &client, "--", "ip", "-4", "-o", "addr", "show"])
        .await;
    assert!(addrs.contains(&client_ip), "{client_ip} not in:\n{addrs}");
    let url = format!("http://{}/", common::vip(&lab, "ex2-internal", 8080));
    let answer = k
        .run(&["exec", &client, "--", "curl", "-s", "--max-time", "5", &url])
        .await;
    let names: Vec<String> = live_pods(&lab, "web")
        .iter()
        .map(|p| meta_str(p, "name").to_string())
        .collect();
    assert!(
        names.iter().any(|n| answer.contains(n.as_str())),
        "{answer}"
    );
    // Cluster DNS: by the Service's name through the pod's search path, and
    // by its FQDN (both through kube-dns, itself a Service lb balances).
    for host in ["ex2-internal", "ex2-internal.default.svc.cluster.local"] {
        let url = format!("http://{host}:8080/");
        let answer = k
            .run(&["exec", &client, "--", "curl", "-s", "--max-time", "5", &url])
            .await;
        assert!(
            names.iter().any(|n| answer.contains(n.as_str())),
            "{url}: {answer}"
        );
    }
    let failed = k
        .try_run(&["exec", &client, "--", "sh", "-c", "echo oops >&2; exit 3"])
        .await;
    assert!(!failed.ok);
    assert!(failed.stderr.contains("oops"), "{}", failed.stderr);
    assert!(
        failed.stderr.contains("exit code 3") || failed.code == Some(3),
        "{}",
        failed.stderr
    );

    let echoed = k
        .try_run_with_input(&["exec", "-i", &client, "--", "cat"], "through stdin\n")
        .await;
    assert!(
        echoed.ok && echoed.stdout == "through stdin\n",
        "{}{}",
        echoed.stdout,
        echoed.stderr
    );

    // logs: what the pod's server wrote.
    let logs = k.run(&["logs", &client]).await;
    assert!(logs.contains(&format!("{client}: serving")), "{logs}");

    // delete -f takes the Deployment, its ReplicaSets and pods, and the Service.
    let deleted = k.run(&["delete", "-f", file]).await;
    assert!(
        deleted.contains("deployment.apps \"example-2\" deleted"),
        "{deleted}"
    );
    assert!(
        deleted.contains("service \"ex2-svc-external\" deleted"),
        "{deleted}"
    );
    wait_for(&lab, "ReplicaSets and pods gone", |lab| {
        lab.store
            .list(Kind::ReplicaSet, Some("default"))
            .0
            .is_empty()
            && lab.store.list(Kind::Pod, Some("default")).0.is_empty()
    })
    .await;
    assert!(lab
        .store
        .get(Kind::Endpoints, "default", "ex2-svc-external")
        .is_err());

    // Server-side apply creates too.
    let ssa = k.run(&["apply", "--server-side", "-f", file]).await;
    assert!(
        ssa.contains("deployment.apps/example-2 serverside-applied"),
        "{ssa}"
    );
    wait_for(&lab, "4 pods after server-side apply", |lab| {
        live_pods(lab, "web").len() == 4
    })
    .await;
}
