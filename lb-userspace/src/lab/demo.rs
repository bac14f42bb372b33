//! What `cargo xtask run` shows: requests from the client pod to a ClusterIP,
//! answered by different pods, and the commands to try it yourself.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use serde_json::Value;

use super::{kinds::Kind, store::meta_str, Lab};
use crate::echo::http_get_in;

/// The first ClusterIP Service with a port, and the first pod named client*.
fn pick(lab: &Lab) -> Result<(Value, String)> {
    let (services, _) = lab.store.list(Kind::Service, None);
    let svc = services
        .into_iter()
        .find(|s| {
            s["spec"]["clusterIP"]
                .as_str()
                .is_some_and(|ip| ip != "None")
                && s["spec"]["ports"][0]["port"].is_i64()
        })
        .context("no ClusterIP Service in the manifests")?;
    let ns = meta_str(&svc, "namespace").to_string();
    let client = lab
        .pods_named(&ns, "client")
        .into_iter()
        .next()
        .map(|p| meta_str(&p, "name").to_string())
        .context("no pod named client* next to the Service")?;
    Ok((svc, format!("{ns}/{client}")))
}

/// With a NetworkPolicy in the manifests: a pod it does not admit is
/// dropped, and `lb policy trace` explains both verdicts.
async fn show_policy(lab: &Lab, ns: &str, addr: SocketAddr) -> Result<()> {
    let Ok(netns) = lab.pod_netns(ns, "stranger") else {
        return Ok(());
    };
    println!(
        "\nThe same from pod {ns}/stranger, which NetworkPolicy allow-api-traffic does not admit:"
    );
    let answer =
        tokio::task::spawn_blocking(move || http_get_in(&netns, addr, Duration::from_secs(2)))
            .await?;
    match answer {
        Ok(pod) => println!("  answered by {pod} (the policy is not enforced!)"),
        Err(e) => println!("  dropped: {e:#}"),
    }
    let Some(target) = lab.pods_named(ns, "api").into_iter().next() else {
        return Ok(());
    };
    let target = format!("{ns}/{}", meta_str(&target, "name"));
    let port = target_port(lab, ns, "api").unwrap_or(addr.port());
    let client = crate::agent::client(Some(&lab.kubeconfig_path())).await?;
    for from in ["client", "stranger"] {
        println!("\n$ lb policy trace --from {ns}/{from} --to {target} --port {port}");
        crate::trace::run(
            client.clone(),
            &format!("{ns}/{from}"),
            &target,
            port,
            "TCP",
        )
        .await?;
    }
    Ok(())
}

/// The same through the real kubectl, when it is on the PATH: the lab is a
/// cluster to it, and cluster DNS resolves the Service's name in the pod.
async fn show_kubectl(lab: &Lab, client: &str, service: &str) {
    let url = format!("http://{service}/");
    let commands: [Vec<&str>; 2] = [
        vec!["get", "pods,svc", "-o", "wide"],
        vec!["exec", client, "--", "curl", "-s", "--max-time", "5", &url],
    ];
    for args in commands {
        let shown = args.join(" ");
        let kubeconfig = lab.kubeconfig_path();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("kubectl")
                .args(&args)
                .env("KUBECONFIG", kubeconfig)
                .output()
        })
        .await;
        println!("\n$ kubectl {shown}");
        match out {
            Ok(Ok(out)) => {
                print!("{}", String::from_utf8_lossy(&out.stdout));
                print!("{}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                println!("  (kubectl is not on the PATH; with it, the lab answers as a cluster)");
                return;
            }
            Ok(Err(e)) => println!("  kubectl did not run: {e}"),
            Err(e) => println!("  kubectl did not run: {e}"),
        }
    }
}

/// The container port of the first pod named `prefix`*.
fn target_port(lab: &Lab, ns: &str, prefix: &str) -> Option<u16> {
    let pod = lab.pods_named(ns, prefix).into_iter().next()?;
    let port = pod["spec"]["containers"][0]["ports"][0]["containerPort"].as_u64()?;
    u16::try_from(port).ok()
}

pub async fn show(lab: &Lab) -> Result<()> {
    let (svc, client) = pick(lab)?;
    let ip = svc["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let port = svc["spec"]["ports"][0]["port"].as_i64().unwrap_or(80);
    let addr: SocketAddr = format!("{ip}:{port}").parse()?;
    let (ns, name) = client.split_once('/').unwrap_or_default();
    let netns = lab.pod_netns(ns, name)?;
    println!(
        "\nService {}/{} has ClusterIP {ip}:{port}; asking it 12 times from pod {client}:",
        meta_str(&svc, "namespace"),
        meta_str(&svc, "name")
    );
    // The agent may still be writing the maps right after the pods came up.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut answers = BTreeMap::<String, usize>::new();
    let mut i = 0;
    while i < 12 {
        let netns = netns.clone();
        match tokio::task::spawn_blocking(move || http_get_in(&netns, addr, Duration::from_secs(2)))
            .await?
        {
            Ok(pod) => {
                i += 1;
                println!("  request {i:>2} -> answered by {pod}");
                *answers.entry(pod).or_default() += 1;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!("waiting for the data path: {e:#}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => return Err(e),
        }
    }
    println!("{} different pods answered: {answers:?}", answers.len());
    show_policy(lab, ns, addr).await?;
    show_kubectl(lab, name, meta_str(&svc, "name")).await;
    let exe = lab.lb_binary().display().to_string();
    let p = &lab.prefix;
    println!("\nTry it yourself (in another terminal):");
    println!("  {exe} lab exec --prefix {p} {client} -- curl -s http://{ip}:{port}/");
    println!("  for i in $(seq 5); do {exe} lab exec --prefix {p} {client} -- curl -s http://{ip}:{port}/; done");
    println!(
        "  bpftool map dump pinned {}/SERVICES",
        lab.pin_dir(1).display()
    );
    println!(
        "  {exe} flows --pin-dir {} --kubeconfig {}   # policy verdicts as they happen",
        lab.pin_dir(1).display(),
        lab.kubeconfig_path().display()
    );
    println!(
        "  KUBECONFIG={} kubectl get pods,svc,endpointslices -o wide   # if you have kubectl",
        lab.kubeconfig_path().display()
    );
    Ok(())
}
