//! A pod's first packet: a pod whose first act is to reach a Service by
//! name (an init container curling it: a DNS query to kube-dns's ClusterIP,
//! then a TCP connection to the Service's) gets both through lb, 100 times
//! out of 100. The veth is made, the chained `lb-cni` plugin returns only
//! once the agent has put its programs on it, then the pod's commands run
//! (`lab::sandbox`): as on a kind node with lb-cni chained after kindnet.
//! Without that step the first packets leave before the programs are on
//! the veth, find no Service and fail.

mod common;

use std::time::{Duration, Instant};

use lb::lab::kinds::Kind;
use serde_json::{json, Value};

const PODS: usize = 100;

/// A pod that fails at once unless its first request reaches `web`
/// (restartPolicy Never: a failed init container fails the pod, no retry).
fn first_request_pod(i: usize) -> Value {
    json!({
        "metadata": {"name": format!("first-{i}"), "namespace": "default",
                     "labels": {"app": "first-request"}},
        "spec": {
            "restartPolicy": "Never",
            "initContainers": [{
                "name": "first-request",
                "image": "curlimages/curl",
                "command": ["curl", "-sS", "--max-time", "5", "-o", "/dev/null", "http://web/"],
            }],
            "containers": [{"name": "main", "image": "lb-echo",
                            "ports": [{"name": "http", "containerPort": 8080}]}],
        },
    })
}

/// The pods' phases and their init containers' restarts, by name.
fn outcomes(lab: &lb::lab::Lab) -> Vec<(String, String, i64)> {
    let (pods, _) = lab.store.list(Kind::Pod, Some("default"));
    pods.iter()
        .filter(|p| p["metadata"]["labels"]["app"] == "first-request")
        .map(|p| {
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["status"]["phase"]
                    .as_str()
                    .unwrap_or("Pending")
                    .to_string(),
                p["status"]["initContainerStatuses"][0]["restartCount"]
                    .as_i64()
                    .unwrap_or(-1),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_reaches_a_service_by_name_with_its_first_packets_100_times_of_100() {
    let lab = common::lab_with('f', common::test_manifests("services"), 2).await;
    let web = common::vip(&lab, "web", 80);
    common::wait_backends(&lab, web, lb_common::PROTO_TCP, 4).await;
    // kube-dns's one pod behind its ClusterIP on both nodes: the name's
    // query goes there first.
    let dns: std::net::SocketAddr = "10.96.0.10:53".parse().unwrap();
    common::wait_backends(&lab, dns, lb_common::PROTO_UDP, 1).await;
    common::wait_reachable(&lab, ("default", "client"), web, Duration::from_secs(30)).await;

    let started = Instant::now();
    // In waves of 25, so that pod starts overlap as on a busy node.
    for wave in 0..PODS / 25 {
        for i in wave * 25..(wave + 1) * 25 {
            lab.store
                .create(Kind::Pod, first_request_pod(i))
                .expect("pod");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let now = outcomes(&lab);
        let failed: Vec<_> = now
            .iter()
            .filter(|(_, phase, _)| phase == "Failed")
            .collect();
        assert!(
            failed.is_empty(),
            "{} of {PODS} pods' first request failed: {failed:?}\nkubelet said: {}",
            failed.len(),
            failed
                .iter()
                .map(|(name, _, _)| pod_message(&lab, name))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let running = now
            .iter()
            .filter(|(_, phase, _)| phase == "Running")
            .count();
        if running == PODS {
            assert!(
                now.iter().all(|(_, _, restarts)| *restarts == 0),
                "init containers restarted: {now:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{running} of {PODS} pods running after {:?}: {now:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "{PODS} pods, each reaching web by name with its first packets: all running in {:?}",
        started.elapsed()
    );
}

fn pod_message(lab: &lb::lab::Lab, name: &str) -> String {
    lab.store
        .get(Kind::Pod, "default", name)
        .map(|p| format!("{name}: {}", p["status"]["message"]))
        .unwrap_or_default()
}
