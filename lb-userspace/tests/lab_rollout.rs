//! The rolling-update exercise of the tutorials (seed 003), with the seed's
//! manifest as written (tests/manifests/rollout): while Deployment
//! example-2 (4 replicas, minReadySeconds 5, maxSurge and maxUnavailable
//! 25%) rolls to a new template three times in a row, one client outside
//! the cluster, sending requests without pause through NodePort 30000 of
//! both nodes, sees no failure.

mod common;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use lb::lab::{
    kinds::Kind,
    net,
    objects::{is_terminating, pod_ready},
    store::meta_str,
    Lab,
};
use serde_json::{json, Value};

const DEPLOYMENT: &str = "example-2";
const REPLICAS: usize = 4;
const NODE_PORT: u16 = 30000;

/// No rollout of the seed's Deployment can be quicker. At most 5 pods may
/// exist and 3 must stay available, so the new pods come in two waves of
/// two (`rollout::tests::a_rollout_waits_for_each_wave_of_new_pods`), and
/// old pods make room for the second wave only once the first has been
/// Ready for minReadySeconds (5 s). A Ready condition's time is in whole
/// seconds, as in Kubernetes, so that is more than 4 s of each wave's
/// readiness. (Before the lab honoured minReadySeconds one took 3.5 s.)
const MIN_ROLLOUT: Duration = Duration::from_secs(2 * (5 - 1));

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Waits until `addr` answers the outside client.
async fn wait_answers(netns: &str, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let netns = netns.to_string();
        let answer = tokio::task::spawn_blocking(move || {
            lb::echo::http_get_in(&netns, addr, Duration::from_secs(2))
        })
        .await
        .unwrap();
        match answer {
            Ok(_) => return,
            Err(e) => assert!(Instant::now() < deadline, "{addr} never answered: {e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One client thread in `netns`, taking `targets` in turn without pause,
/// with a new TCP connection per request (connect, GET, read to EOF,
/// close), until `stop`. It returns the answers and, for each failure, its
/// time and target.
fn start_client(
    netns: &str,
    targets: [SocketAddr; 2],
    stop: Arc<AtomicBool>,
) -> JoinHandle<anyhow::Result<(usize, Vec<String>)>> {
    lb::netns::spawn_in(netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("client runtime");
        let (mut ok, mut failed) = (0, Vec::new());
        for addr in targets.iter().cycle() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            match rt.block_on(lb::echo::http_get(*addr, Duration::from_secs(3))) {
                Ok(_) => ok += 1,
                Err(e) => failed.push(format!("at {:.3} to {addr}: {e:#}", unix_now())),
            }
        }
        (ok, failed)
    })
    .expect("a client in the outside namespace")
}

/// `kubectl rollout status`'s test: the status is of the current
/// generation, and every replica is updated and available, none old left.
fn rolled_out(d: &Value) -> bool {
    let n = |field: &str| d["status"][field].as_i64();
    let (generation, want) = (d["metadata"]["generation"].as_i64(), Some(REPLICAS as i64));
    generation.is_some()
        && n("observedGeneration") == generation
        && n("updatedReplicas") == want
        && n("availableReplicas") == want
        && n("replicas") == want
}

/// The Deployment's pods (terminating ones too).
fn pods(lab: &Lab) -> Vec<Value> {
    lab.pods_named("default", &format!("{DEPLOYMENT}-"))
}

/// Done when none of `old` is left (terminating ones included), the
/// replicas are new, ready pods, and the Deployment's status says the
/// rollout is complete; otherwise what is still missing.
fn progress(lab: &Lab, old: &BTreeSet<String>) -> Result<(), String> {
    let pods = pods(lab);
    let left: Vec<&str> = pods
        .iter()
        .map(|p| meta_str(p, "name"))
        .filter(|n| old.contains(*n))
        .collect();
    let new_ready = pods
        .iter()
        .filter(|p| !old.contains(meta_str(p, "name")))
        .filter(|p| pod_ready(p) && !is_terminating(p))
        .count();
    let d = lab
        .store
        .get(Kind::Deployment, "default", DEPLOYMENT)
        .map_err(|e| e.to_string())?;
    if left.is_empty() && new_ready == REPLICAS && rolled_out(&d) {
        return Ok(());
    }
    Err(format!(
        "old pods left {left:?}, {new_ready} new ready, generation {}, status {}",
        d["metadata"]["generation"], d["status"]
    ))
}

/// Waits for `progress` to be done; panics with what is missing after 120 s.
async fn wait_rolled_out(lab: &Lab, old: &BTreeSet<String>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match progress(lab, old) {
            Ok(()) => return,
            Err(missing) => assert!(
                Instant::now() < deadline,
                "{what} did not finish in 120 s: {missing}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Changes the pod template (an annotation, as `kubectl rollout restart`
/// does) and waits until the rollout is complete; returns how long it took.
async fn roll(lab: &Lab, deployments: &Api<Deployment>, revision: usize) -> Duration {
    let old: BTreeSet<String> = pods(lab)
        .iter()
        .map(|p| meta_str(p, "name").to_string())
        .collect();
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {"rollout": format!("v{revision}")}}}}});
    let started = Instant::now();
    eprintln!("rollout to v{revision} starts at {:.3}", unix_now());
    deployments
        .patch(DEPLOYMENT, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patching the pod template");
    wait_rolled_out(lab, &old, &format!("the rollout to v{revision}")).await;
    let took = started.elapsed();
    eprintln!(
        "rollout to v{revision} done at {:.3}, in {took:?}",
        unix_now()
    );
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_rolling_updates_behind_a_nodeport_lose_no_request() {
    let lab = common::lab_with('o', common::test_manifests("rollout"), 2).await;
    let targets = [1, 2].map(|i| SocketAddr::new(net::node_ip(i).into(), NODE_PORT));
    let ext = lab.ext_netns();
    for addr in targets {
        wait_answers(&ext, addr).await;
    }
    // The first pods become available minReadySeconds after they are Ready.
    wait_rolled_out(&lab, &BTreeSet::new(), "the first rollout").await;
    let kube = lb::agent::client(Some(&lab.kubeconfig_path()))
        .await
        .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(kube, "default");

    let stop = Arc::new(AtomicBool::new(false));
    let client = start_client(&ext, targets, stop.clone());
    let mut took = Vec::new();
    for revision in 2..=4 {
        took.push(roll(&lab, &deployments, revision).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = tokio::task::spawn_blocking(move || client.join().unwrap())
        .await
        .unwrap()
        .expect("the client ran in the outside namespace");
    eprintln!(
        "3 rollouts ({took:?}): {ok} requests succeeded, {} failed",
        failed.len()
    );
    assert!(ok > 50, "the client kept sending ({ok} requests)");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the rollouts: {failed:#?}\nnode 1's agent:\n{}\nnode 2's agent:\n{}",
        failed.len(),
        ok + failed.len(),
        common::agent_log_tail(&lab, 1, 30),
        common::agent_log_tail(&lab, 2, 30)
    );
    for (i, t) in took.iter().enumerate() {
        assert!(
            *t >= MIN_ROLLOUT,
            "rollout {} took {t:?}: with minReadySeconds 5 honoured it takes at least {MIN_ROLLOUT:?}",
            i + 1
        );
    }
}
