//! The NetworkPolicy truth tables of the upstream Kubernetes e2e suite
//! (test/e2e/network/netpol), in the lab: namespaces x, y and z with pods a,
//! b and c each, all serving 80 and 81 over TCP and UDP, on two nodes. For
//! every case the policies are applied, then every pod pair is probed on each
//! port and protocol with real traffic and compared with the expected
//! reachability; mismatches print the four matrices. Between cases all
//! policies go and full reachability must come back.

mod common;

use std::{collections::BTreeMap, fmt, net::SocketAddr, time::Duration};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod as KPod},
    networking::v1::NetworkPolicy,
};
use kube::{
    api::{Api, DeleteParams, ListParams, PostParams},
    Client,
};
use lb::lab::{kinds::Kind, Lab};
use serde_json::{json, Value};

#[path = "netpol/cases.rs"]
mod cases;
use cases::{cases, Step};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pod {
    pub ns: &'static str,
    pub name: &'static str,
}

impl fmt::Display for Pod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ns, self.name)
    }
}

pub const fn pod(ns: &'static str, name: &'static str) -> Pod {
    Pod { ns, name }
}

pub const PODS: [Pod; 9] = [
    pod("x", "a"),
    pod("x", "b"),
    pod("x", "c"),
    pod("y", "a"),
    pod("y", "b"),
    pod("y", "c"),
    pod("z", "a"),
    pod("z", "b"),
    pod("z", "c"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

pub const PORTS: [(u16, Proto); 4] = [
    (80, Proto::Tcp),
    (81, Proto::Tcp),
    (80, Proto::Udp),
    (81, Proto::Udp),
];

/// One probe: can `from` reach `to` on `port`/`proto`?
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Probe {
    pub from: Pod,
    pub to: Pod,
    pub port: u16,
    pub proto: Proto,
}

impl Probe {
    pub fn tcp(&self) -> bool {
        self.proto == Proto::Tcp
    }
    pub fn udp(&self) -> bool {
        self.proto == Proto::Udp
    }
}

type Results = BTreeMap<Probe, bool>;

const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

/// Every probe, sent at once: one thread per client pod, inside its network
/// namespace, running that pod's 32 probes concurrently.
async fn probe_all(lab: &Lab, ips: &BTreeMap<Pod, String>) -> Results {
    let mut tasks = Vec::new();
    for from in PODS {
        let netns = lab.pod_netns(from.ns, from.name).expect("pod netns");
        let targets: Vec<(Probe, SocketAddr)> = PODS
            .iter()
            .filter(|to| **to != from)
            .flat_map(|to| {
                PORTS.iter().map(move |(port, proto)| {
                    let addr = format!("{}:{port}", ips[to]).parse().expect("address");
                    let probe = Probe {
                        from,
                        to: *to,
                        port: *port,
                        proto: *proto,
                    };
                    (probe, addr)
                })
            })
            .collect();
        tasks.push(tokio::task::spawn_blocking(move || {
            lb::netns::run_in(&netns, move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(futures::future::join_all(targets.into_iter().map(
                    |(probe, addr)| async move {
                        let answer = match probe.proto {
                            Proto::Tcp => lb::echo::http_get(addr, PROBE_TIMEOUT).await,
                            Proto::Udp => lb::echo::udp_request(addr, PROBE_TIMEOUT).await,
                        };
                        // Reached means the right pod answered.
                        (probe, answer.is_ok_and(|name| name == probe.to.name))
                    },
                )))
            })
            .expect("enter netns")
        }));
    }
    let mut results = Results::new();
    for t in tasks {
        results.extend(t.await.expect("probe thread"));
    }
    results
}

/// The four matrices (one per port and protocol), rows the clients; a cell
/// is "." for self, "ok" or "X", with "!" where it differs from `want`.
fn render(got: &Results, want: &dyn Fn(&Probe) -> bool) -> String {
    let mut out = String::new();
    for (port, proto) in PORTS {
        out.push_str(&format!("{proto:?} {port}\nfrom\\to"));
        for to in PODS {
            out.push_str(&format!(" {to:>4}"));
        }
        out.push('\n');
        for from in PODS {
            out.push_str(&format!("{from:<7}"));
            for to in PODS {
                let probe = Probe {
                    from,
                    to,
                    port,
                    proto,
                };
                let cell = match got.get(&probe) {
                    None => ".".to_string(),
                    Some(ok) => {
                        let text = if *ok { "ok" } else { "X" };
                        let mark = if *ok != want(&probe) { "!" } else { "" };
                        format!("{text}{mark}")
                    }
                };
                out.push_str(&format!(" {cell:>4}"));
            }
            out.push('\n');
        }
    }
    out
}

/// Probes until the results equal `want` everywhere, or gives the last
/// matrices. Agents apply a change within a second; the first probe waits
/// that long so that it cannot see the state from before the change.
async fn expect(
    lab: &Lab,
    ips: &BTreeMap<Pod, String>,
    want: &dyn Fn(&Probe) -> bool,
) -> Result<(), String> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = probe_all(lab, ips).await;
        let wrong = got.iter().filter(|(p, ok)| **ok != want(p)).count();
        if wrong == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "{wrong} probes differ (marked !):\n{}",
                render(&got, want)
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Every pod, through Service x/a (ClusterIP port 8080 -> x/a:80 TCP).
async fn expect_service(lab: &Lab, want: fn(Pod) -> bool) -> Result<(), String> {
    let vip = lab.store.get(Kind::Service, "x", "a").expect("service x/a")["spec"]["clusterIP"]
        .as_str()
        .expect("clusterIP")
        .to_string();
    let addr: SocketAddr = format!("{vip}:8080").parse().expect("address");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut wrong = Vec::new();
        for from in PODS {
            let netns = lab.pod_netns(from.ns, from.name).expect("pod netns");
            let ok = tokio::task::spawn_blocking(move || {
                lb::echo::http_get_in(&netns, addr, PROBE_TIMEOUT).is_ok_and(|n| n == "a")
            })
            .await
            .expect("probe");
            if ok != want(from) {
                wrong.push(format!("{from} -> x/a via {addr}: reached {ok}"));
            }
        }
        if wrong.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(wrong.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Each node reaches the pods it runs (kubelet probes), whatever the policy.
async fn expect_node_reaches_local_pods(
    lab: &Lab,
    ips: &BTreeMap<Pod, String>,
) -> Result<(), String> {
    let mut wrong = Vec::new();
    for to in PODS {
        let node = lab.store.get(Kind::Pod, to.ns, to.name).expect("pod")["spec"]["nodeName"]
            .as_str()
            .expect("scheduled")
            .to_string();
        let index: usize = node
            .trim_start_matches("node-")
            .parse()
            .expect("node index");
        let netns = lab.node_netns(index);
        let addr: SocketAddr = format!("{}:80", ips[&to]).parse().expect("address");
        let ok = tokio::task::spawn_blocking(move || {
            lb::echo::http_get_in(&netns, addr, Duration::from_secs(2)).is_ok()
        })
        .await
        .expect("probe");
        if !ok {
            wrong.push(format!("{node} -> {to}: not reached"));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("\n"))
    }
}

fn policy_object(ns: &str, policy: &Value) -> NetworkPolicy {
    let mut obj = policy.clone();
    obj["metadata"]["namespace"] = json!(ns);
    serde_json::from_value(obj).expect("a valid NetworkPolicy")
}

/// Creates the policy, or replaces the one of that name.
async fn apply_policy(client: &Client, ns: &str, policy: &Value) -> anyhow::Result<()> {
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    let mut obj = policy_object(ns, policy);
    let name = obj.metadata.name.clone().unwrap_or_default();
    match api.get_opt(&name).await? {
        Some(old) => {
            obj.metadata.resource_version = old.metadata.resource_version;
            api.replace(&name, &PostParams::default(), &obj).await?;
        }
        None => {
            api.create(&PostParams::default(), &obj).await?;
        }
    }
    Ok(())
}

async fn set_pod_labels(client: &Client, p: Pod, labels: &Value) -> anyhow::Result<()> {
    let api: Api<KPod> = Api::namespaced(client.clone(), p.ns);
    let mut obj = api.get(p.name).await?;
    obj.metadata.labels = Some(serde_json::from_value(labels.clone())?);
    api.replace(p.name, &PostParams::default(), &obj).await?;
    Ok(())
}

async fn set_namespace_labels(client: &Client, ns: &str, labels: &Value) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut obj = api.get(ns).await?;
    obj.metadata.labels = Some(serde_json::from_value(labels.clone())?);
    api.replace(ns, &PostParams::default(), &obj).await?;
    Ok(())
}

/// Runs one case's steps; the first failure ends it.
async fn run_case(
    lab: &Lab,
    client: &Client,
    ips: &BTreeMap<Pod, String>,
    steps: &[Step],
    touched_pods: &mut BTreeMap<Pod, Value>,
    touched_ns: &mut BTreeMap<&'static str, Value>,
) -> Result<(), String> {
    for (i, step) in steps.iter().enumerate() {
        let at = |e: String| format!("step {i}: {e}");
        match step {
            Step::Policy(ns, p) => apply_policy(client, ns, p)
                .await
                .map_err(|e| at(format!("applying policy: {e:#}")))?,
            Step::PodLabels(p, labels) => {
                let api: Api<KPod> = Api::namespaced(client.clone(), p.ns);
                let old = api.get(p.name).await.map_err(|e| at(e.to_string()))?;
                touched_pods
                    .entry(*p)
                    .or_insert(json!(old.metadata.labels.unwrap_or_default()));
                set_pod_labels(client, *p, labels)
                    .await
                    .map_err(|e| at(format!("{e:#}")))?;
            }
            Step::NamespaceLabels(ns, labels) => {
                let api: Api<Namespace> = Api::all(client.clone());
                let old = api.get(ns).await.map_err(|e| at(e.to_string()))?;
                touched_ns
                    .entry(ns)
                    .or_insert(json!(old.metadata.labels.unwrap_or_default()));
                set_namespace_labels(client, ns, labels)
                    .await
                    .map_err(|e| at(format!("{e:#}")))?;
            }
            Step::Expect(want) => expect(lab, ips, want.as_ref()).await.map_err(at)?,
            Step::ExpectService(want) => expect_service(lab, *want).await.map_err(at)?,
            Step::ExpectNodeReachesLocalPods => {
                expect_node_reaches_local_pods(lab, ips).await.map_err(at)?
            }
        }
    }
    Ok(())
}

/// Deletes every policy and puts the labels back.
async fn reset(
    client: &Client,
    touched_pods: &mut BTreeMap<Pod, Value>,
    touched_ns: &mut BTreeMap<&'static str, Value>,
) -> anyhow::Result<()> {
    for ns in ["x", "y", "z"] {
        let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
        for p in api.list(&ListParams::default()).await? {
            api.delete(
                &p.metadata.name.unwrap_or_default(),
                &DeleteParams::default(),
            )
            .await?;
        }
    }
    for (p, labels) in std::mem::take(touched_pods) {
        set_pod_labels(client, p, &labels).await?;
    }
    for (ns, labels) in std::mem::take(touched_ns) {
        set_namespace_labels(client, ns, &labels).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_network_policy_cases() {
    let lab = common::lab_with('e', common::test_manifests("netpol"), 2).await;
    let client = lb::agent::client(Some(&lab.kubeconfig_path()))
        .await
        .expect("client");
    let ips: BTreeMap<Pod, String> = PODS
        .iter()
        .map(|p| {
            let obj = lab.store.get(Kind::Pod, p.ns, p.name).expect("pod");
            let ip = obj["status"]["podIP"].as_str().expect("podIP").to_string();
            (*p, ip)
        })
        .collect();

    let all = cases(&|p: Pod| ips[&p].clone());
    assert!(all.len() >= 25, "the issue asks for at least 25 cases");
    expect(&lab, &ips, &|_| true)
        .await
        .unwrap_or_else(|e| panic!("before any policy, all should reach all:\n{e}"));
    let mut failures = Vec::new();
    let (mut touched_pods, mut touched_ns) = (BTreeMap::new(), BTreeMap::new());
    for case in &all {
        let started = std::time::Instant::now();
        let result = run_case(
            &lab,
            &client,
            &ips,
            &case.steps,
            &mut touched_pods,
            &mut touched_ns,
        )
        .await;
        eprintln!(
            "case {:<60} {} ({:.1}s)",
            case.name,
            if result.is_ok() { "ok" } else { "FAILED" },
            started.elapsed().as_secs_f32()
        );
        if let Err(e) = result {
            failures.push(format!("case {:?}: {e}", case.name));
        }
        reset(&client, &mut touched_pods, &mut touched_ns)
            .await
            .expect("removing the case's policies");
        if let Err(e) = expect(&lab, &ips, &|_| true).await {
            failures.push(format!(
                "after case {:?} its policies were deleted, yet: {e}",
                case.name
            ));
            break;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        all.len(),
        failures.join("\n\n")
    );
}
