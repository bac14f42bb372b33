//! The rolling-update exercise of the tutorials (seed 003): while a
//! Deployment behind a NodePort Service rolls to a new template, a client
//! outside the cluster sending requests without pause sees no failure.

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use lb::lab::{kinds::Kind, net, store::meta_str};

// Open defect: with the client at ~1,000 new connections a second, exactly
// one request in 4,000-8,000 times out (connection made, no answer within
// 3 s) during the rollout. Refusals from connections that followed an old
// connection's 5-tuple to a terminating pod are fixed (a SYN is balanced
// again); the cause of the timeout is not known yet. Run it with
// `cargo test --test lab_rollout -- --ignored`.
#[ignore = "one request in ~6,000 times out during the rollout (open defect, see README)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_behind_a_nodeport_loses_no_request() {
    let lab = common::lab_with('o', common::test_manifests("nodeport"), 2).await;
    let addr = std::net::SocketAddr::new(net::node_ip(1).into(), 30080);
    let ext = lab.ext_netns();
    let deadline = Instant::now() + Duration::from_secs(30);
    while lb::echo::http_get_in(&ext, addr, Duration::from_secs(2)).is_err() {
        assert!(Instant::now() < deadline, "NodePort never became reachable");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let old_pods: Vec<String> = lab
        .pods_named("default", "web-")
        .iter()
        .map(|p| meta_str(p, "name").to_string())
        .collect();

    // A client sending without pause, in the outside namespace.
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0usize, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match lb::echo::http_get_in(&ext, addr, Duration::from_secs(3)) {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        let t = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default();
                        failed.push(format!("at {:.3}: {e:#}", t.as_secs_f64()))
                    }
                }
            }
            (ok, failed)
        })
    };

    // Change the pod template, as `kubectl set image` would.
    let kube = lb::agent::client(Some(&lab.kubeconfig_path()))
        .await
        .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(kube, "default");
    let patch =
        serde_json::json!({"spec": {"template": {"metadata": {"annotations": {"rollout": "v2"}}}}});
    let mut d = deployments.get("web").await.unwrap();
    let mut value = serde_json::to_value(&d).unwrap();
    json_merge(&mut value, &patch);
    d = serde_json::from_value(value).unwrap();
    deployments
        .replace("web", &Default::default(), &d)
        .await
        .unwrap();

    // Wait until every old pod is gone and four new ones are ready.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pods = lab.store.list(Kind::Pod, Some("default")).0;
        let web: Vec<_> = pods
            .iter()
            .filter(|p| meta_str(p, "name").starts_with("web-"))
            .collect();
        let old_left = web
            .iter()
            .any(|p| old_pods.iter().any(|o| o == meta_str(p, "name")));
        let new_ready = web
            .iter()
            .filter(|p| !old_pods.iter().any(|o| o == meta_str(p, "name")))
            .filter(|p| lb::lab::objects::pod_ready(p) && !lb::lab::objects::is_terminating(p))
            .count();
        if !old_left && new_ready == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rollout did not finish: {:?}",
            web.iter().map(|p| meta_str(p, "name")).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = tokio::task::spawn_blocking(move || client.join().unwrap())
        .await
        .unwrap();
    eprintln!("rollout: {ok} requests succeeded, {} failed", failed.len());
    assert!(ok > 50, "the client kept sending ({ok} requests)");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the rollout: {failed:#?}\nnode 1's agent:\n{}\nnode 2's agent:\n{}",
        failed.len(),
        ok + failed.len(),
        common::agent_log_tail(&lab, 1, 30),
        common::agent_log_tail(&lab, 2, 30)
    );
}

fn json_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                json_merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (t, p) => *t = p.clone(),
    }
}
