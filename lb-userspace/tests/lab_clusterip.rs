//! The walking skeleton end to end: the lab's API server and controllers,
//! the agent (a separate process, in the node's namespace, through kube-rs)
//! and the tc programs, with real TCP from a client pod to a ClusterIP.

mod common;

use std::{net::SocketAddr, time::Duration};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, ListParams};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusterip_spreads_over_pods_and_survives_a_backend_deletion() {
    let lab = common::demo_lab('c').await;
    let client = lb::agent::client(Some(&lab.kubeconfig_path()))
        .await
        .unwrap();
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc = services.get("api-service").await.unwrap();
    let ip = svc.spec.and_then(|s| s.cluster_ip).unwrap();
    let vip: SocketAddr = format!("{ip}:80").parse().unwrap();
    let from = ("default", "client");

    common::wait_reachable(&lab, from, vip, Duration::from_secs(30)).await;
    common::wait_backends(&lab, vip, lb_common::PROTO_TCP, 3).await;
    let (answers, failures) = common::burst(&lab, from, vip, 30).await;
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    assert!(
        answers.len() >= 2,
        "30 requests should reach at least 2 pods: {answers:?}"
    );

    // Delete one backend pod through the API, as kubectl would.
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let victim = answers.keys().next().unwrap().clone();
    pods.delete(&victim, &DeleteParams::default())
        .await
        .unwrap();
    // While it terminates and after it is gone, every request succeeds.
    let (_, failures) = common::burst(&lab, from, vip, 30).await;
    assert!(
        failures.is_empty(),
        "failed requests while {victim} terminates: {failures:#?}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .any(|p| p.metadata.name.as_deref() == Some(&victim))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{victim} never went away"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (after, failures) = common::burst(&lab, from, vip, 30).await;
    assert!(
        failures.is_empty(),
        "failed requests after {victim} is gone: {failures:#?}"
    );
    assert!(
        !after.contains_key(&victim),
        "{victim} is gone but answered: {after:?}"
    );
}
