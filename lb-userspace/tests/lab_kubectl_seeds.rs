//! The tutorials' manifests and commands, applied to one lab with the real
//! kubectl as a reader of `../shared/seeds/` would type them: the README's
//! demo, seed 001's Services, DNS names and NetworkPolicy, and seed 004's
//! Services (ClusterIP, NodePort, LoadBalancer, ExternalName, headless),
//! `kubectl create deployment`/`run`/`expose`, CoreDNS, its NetworkPolicies
//! (allow from a label, default deny, allow all egress) and exam question
//! 2's cross-namespace policy. Each step is checked for what it does to
//! traffic between pods, through lb, and for what kubectl prints.

mod common;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use common::kubectl::{rows, Kubectl, Run};
use lb::lab::{Lab, LabConfig};

fn seed(name: &str) -> String {
    common::test_manifests("seeds")
        .join(name)
        .to_str()
        .expect("path")
        .to_string()
}

/// `curl -s URL` from `ns/pod` through `kubectl exec`, `max_time` seconds.
async fn curl(k: &Kubectl, ns: &str, pod: &str, url: &str, max_time: u32) -> Run {
    let max_time = max_time.to_string();
    k.try_run(&[
        "exec",
        "-n",
        ns,
        pod,
        "--",
        "curl",
        "-s",
        "--max-time",
        &max_time,
        url,
    ])
    .await
}

/// `kubectl create ARGS --dry-run=client -o yaml | kubectl apply -f -`: the
/// object `kubectl create` makes, sent as JSON (`kubectl create` itself
/// sends protobuf, which the lab does not read; see the README).
async fn create(k: &Kubectl, args: &[&str]) {
    let mut dry = vec!["create"];
    dry.extend_from_slice(args);
    dry.extend_from_slice(&["--dry-run=client", "-o", "yaml"]);
    let yaml = k.run(&dry).await;
    let r = k.try_run_with_input(&["apply", "-f", "-"], &yaml).await;
    assert!(r.ok, "kubectl apply of {yaml}: {}", r.stderr);
}

/// Waits until `curl` from `ns/pod` to `url` succeeds (`answers`) or is
/// refused or dropped (`!answers`), as NetworkPolicy takes effect; returns
/// the answer. Panics after 30 s.
async fn wait_curl(k: &Kubectl, (ns, pod): (&str, &str), url: &str, answers: bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = curl(k, ns, pod, url, 2).await;
        if r.ok == answers {
            return r.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "{ns}/{pod} -> {url}: wanted answers={answers} for 30 s; last: {} {}",
            r.stdout,
            r.stderr
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until `getent ahostsv4 NAME` in `ns/pod` (through the pod's
/// resolv.conf and the lab's kube-dns) gives exactly `want`, as the DNS pod
/// catches up with the cluster. Panics after 30 s.
async fn wait_resolves(k: &Kubectl, (ns, pod): (&str, &str), name: &str, want: &BTreeSet<String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = k
            .try_run(&["exec", "-n", ns, pod, "--", "getent", "ahostsv4", name])
            .await;
        let got: BTreeSet<String> = r
            .stdout
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        if &got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} in {ns}/{pod}: {got:?}, not {want:?}, for 30 s: {}",
            r.stderr
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until no pod matches `selector` in `ns`, terminating ones included.
async fn wait_no_pods(k: &Kubectl, ns: &str, selector: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pod_names(k, ns, selector).await.is_empty() {
        assert!(Instant::now() < deadline, "pods {selector} still there");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn pod_names(k: &Kubectl, ns: &str, selector: &str) -> String {
    k.run(&["get", "pods", "-n", ns, "-l", selector, "-o", "name"])
        .await
        .trim()
        .to_string()
}

/// The pod IPs of pods matching `selector` in `ns`, by jsonpath.
async fn pod_ips(k: &Kubectl, ns: &str, selector: &str) -> BTreeSet<String> {
    let out = k
        .run(&[
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            selector,
            "-o",
            "jsonpath={.items[*].status.podIP}",
        ])
        .await;
    out.split_whitespace().map(str::to_string).collect()
}

async fn wait_ready(k: &Kubectl, ns: &str, pods: &[&str]) {
    let mut args = vec!["wait", "-n", ns, "--for=condition=Ready", "--timeout=60s"];
    let names: Vec<String> = pods.iter().map(|p| format!("pod/{p}")).collect();
    args.extend(names.iter().map(String::as_str));
    k.run(&args).await;
}

/// `text` with each line's runs of blanks made one space: what `describe`
/// prints, without its column alignment.
fn squeezed(text: &str) -> String {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The row of `name` in `kubectl get svc`'s table.
fn svc_row(table: &str, name: &str) -> Vec<String> {
    rows(table)
        .into_iter()
        .find(|r| r.first().is_some_and(|n| n == name))
        .unwrap_or_else(|| panic!("{name} not in:\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_manifests_behave_as_in_kind() {
    let cfg = LabConfig::new(&common::prefix('s'), env!("CARGO_BIN_EXE_lb"));
    let lab = Lab::up(cfg).await.expect("lab up");
    let k = Kubectl::new(&lab);
    readme_demo(&k).await;
    seed_001_services(&k).await;
    seed_001_policy(&k).await;
    seed_004_services(&k).await;
    seed_004_dns(&k).await;
    seed_004_policies(&k).await;
    seed_004_db_policy(&k).await;
}

/// The README's kind walk-through: `kubectl apply -f manifests/demo/`, then
/// `kubectl exec client -- curl -s http://api-service/`.
async fn readme_demo(k: &Kubectl) {
    let demo = common::repo_root().join("manifests/demo");
    let demo = demo.to_str().expect("path");
    let applied = k.run(&["apply", "-f", demo]).await;
    assert!(applied.contains("service/api-service created"), "{applied}");
    k.run(&["rollout", "status", "deploy/api", "--timeout=60s"])
        .await;
    wait_ready(k, "default", &["client", "stranger"]).await;
    let answer = wait_curl(k, ("default", "client"), "http://api-service/", true).await;
    assert!(answer.starts_with("api-"), "{answer}");
    wait_curl(k, ("default", "stranger"), "http://api-service/", false).await;
    let deleted = k.run(&["delete", "-f", demo]).await;
    assert!(
        deleted.contains("networkpolicy.networking.k8s.io \"allow-api-traffic\" deleted"),
        "{deleted}"
    );
    // Seed 001 has pods labelled app=api too.
    wait_no_pods(k, "default", "app in (api,frontend,stranger)").await;
}

/// Seed 001, "Service Types" and "Working with Services" and "DNS".
async fn seed_001_services(k: &Kubectl) {
    k.run(&["apply", "-f", &seed("001-workloads.yaml")]).await;
    k.run(&["rollout", "status", "deploy/nextgen-app", "--timeout=60s"])
        .await;
    wait_ready(k, "default", &["api", "web", "other"]).await;
    let applied = k.run(&["apply", "-f", &seed("001-services.yaml")]).await;
    for svc in ["app-service", "app-nodeport", "app-lb"] {
        assert!(
            applied.contains(&format!("service/{svc} created")),
            "{applied}"
        );
    }
    let table = k.run(&["get", "services"]).await;
    assert_eq!(
        rows(&table)[0],
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ]
    );
    let row = svc_row(&table, "app-service");
    assert_eq!(row[1..5], ["ClusterIP", &row[2], "<none>", "80/TCP"]);
    assert_eq!(svc_row(&table, "app-nodeport")[4], "80:30080/TCP");
    let lb_row = svc_row(&k.run(&["get", "svc"]).await, "app-lb");
    assert_eq!(lb_row[1], "LoadBalancer");
    assert!(
        lb_row[3].parse::<std::net::Ipv4Addr>().is_ok(),
        "the lab's cloud gives an address: {lb_row:?}"
    );

    let app_ips = pod_ips(k, "default", "app=nextgen-app").await;
    assert_eq!(app_ips.len(), 2, "{app_ips:?}");
    let described = squeezed(&k.run(&["describe", "svc", "app-service"]).await);
    for want in [
        "Type: ClusterIP",
        "TargetPort: 3000/TCP",
        "Selector: app=nextgen-app",
    ] {
        assert!(described.contains(want), "{want} not in:\n{described}");
    }
    let endpoints = k.run(&["get", "endpoints", "app-service"]).await;
    for ip in &app_ips {
        assert!(
            endpoints.contains(&format!("{ip}:3000")),
            "{ip}:3000 not in:\n{endpoints}"
        );
    }

    // "Every service gets a DNS entry", in three spellings.
    for url in [
        "http://app-service",
        "http://app-service.default",
        "http://app-service.default.svc.cluster.local",
    ] {
        let answer = wait_curl(k, ("default", "web"), url, true).await;
        assert!(answer.starts_with("nextgen-app-"), "{url}: {answer}");
    }
    // "DNS for Pods": <pod-ip-dashed>.<namespace>.pod.cluster.local.
    let ip = app_ips.iter().next().expect("an app pod");
    let name = format!("{}.default.pod.cluster.local", ip.replace('.', "-"));
    wait_resolves(k, ("default", "web"), &name, &BTreeSet::from([ip.clone()])).await;
}

/// Seed 001, "Network Policies": only app=web reaches the api pods, on 3000.
async fn seed_001_policy(k: &Kubectl) {
    let api_ip = pod_ips(k, "default", "app=api").await;
    let url = format!("http://{}:3000/", api_ip.iter().next().expect("api pod"));
    wait_curl(k, ("default", "other"), &url, true).await;
    let applied = k.run(&["apply", "-f", &seed("001-policy.yaml")]).await;
    assert!(
        applied.contains("networkpolicy.networking.k8s.io/allow-web-to-api created"),
        "{applied}"
    );
    wait_curl(k, ("default", "other"), &url, false).await;
    let answer = wait_curl(k, ("default", "web"), &url, true).await;
    assert_eq!(answer.trim(), "api");
    // Pods the policy does not select are not isolated.
    wait_curl(k, ("default", "other"), "http://app-service", true).await;
}

/// Seed 004, "Kubernetes Services": kubectl create/expose, then the seed's
/// manifests; its NodePort 30080 collides with seed 001's, as it would in
/// one kind cluster, until that one goes.
async fn seed_004_services(k: &Kubectl) {
    create(k, &["deployment", "nginx", "--image=nginx", "--replicas=2"]).await;
    k.run(&["rollout", "status", "deploy/nginx", "--timeout=60s"])
        .await;
    let exposed = k
        .run(&[
            "expose",
            "deployment",
            "nginx",
            "--port=80",
            "--target-port=80",
            "--type=NodePort",
        ])
        .await;
    assert!(exposed.contains("service/nginx exposed"), "{exposed}");
    let answer = wait_curl(k, ("default", "other"), "http://nginx", true).await;
    assert!(answer.starts_with("nginx-"), "{answer}");

    let refused = k
        .try_run(&["apply", "-f", &seed("004-services.yaml")])
        .await;
    assert!(!refused.ok, "{}", refused.stdout);
    assert!(
        refused.stderr.contains(
            "spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated"
        ),
        "{}",
        refused.stderr
    );
    k.run(&["delete", "svc", "app-nodeport"]).await;
    let applied = k.run(&["apply", "-f", &seed("004-services.yaml")]).await;
    assert!(
        applied.contains("service/nginx-nodeport created"),
        "{applied}"
    );
    let node_port = k
        .run(&[
            "get",
            "service",
            "nginx-nodeport",
            "-o",
            "jsonpath={.spec.ports[0].nodePort}",
        ])
        .await;
    assert_eq!(node_port, "30080");
    let table = k.run(&["get", "svc"]).await;
    let external = svc_row(&table, "external-service");
    assert_eq!(
        external[1..4],
        ["ExternalName", "<none>", "api.example.com"]
    );
    assert_eq!(svc_row(&table, "headless-service")[2], "None");
    let lb_ip = k
        .run(&[
            "get",
            "service",
            "nginx-lb",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ])
        .await;
    assert!(lb_ip.parse::<std::net::Ipv4Addr>().is_ok(), "{lb_ip:?}");
}

/// Seed 004, "Service Discovery and DNS" and "Troubleshooting".
async fn seed_004_dns(k: &Kubectl) {
    let coredns = k
        .run(&["get", "pods", "-n", "kube-system", "-l", "k8s-app=kube-dns"])
        .await;
    let coredns = rows(&coredns);
    assert_eq!(coredns.len(), 2, "{coredns:?}");
    assert!(coredns[1][0].starts_with("coredns-"), "{coredns:?}");
    assert_eq!(coredns[1][1..3], ["1/1", "Running"]);

    k.run(&["run", "frontend", "--image=nginx", "-l", "role=frontend"])
        .await;
    k.run(&["run", "backend", "--image=nginx", "-l", "app=nginx"])
        .await;
    wait_ready(k, "default", &["frontend", "backend"]).await;
    let conf = k
        .run(&["exec", "frontend", "--", "cat", "/etc/resolv.conf"])
        .await;
    assert!(conf.contains("nameserver 10.96.0.10"), "{conf}");
    assert!(
        conf.contains("search default.svc.cluster.local svc.cluster.local cluster.local"),
        "{conf}"
    );
    for url in [
        "http://nginx-service/",
        "http://nginx-service.default.svc.cluster.local/",
    ] {
        let answer = wait_curl(k, ("default", "frontend"), url, true).await;
        assert!(
            answer.starts_with("nginx-") || answer.trim() == "backend",
            "{url}: {answer}"
        );
    }
    // A headless Service resolves to its ready pods: the Deployment's two
    // and the `kubectl run` backend, which has the label too.
    let nginx = pod_ips(k, "default", "app=nginx").await;
    assert_eq!(nginx.len(), 3, "{nginx:?}");
    wait_resolves(k, ("default", "frontend"), "headless-service", &nginx).await;
    let cluster_ip = k
        .run(&[
            "get",
            "svc",
            "nginx-service",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .await;
    let cluster_ip = BTreeSet::from([cluster_ip]);
    wait_resolves(k, ("default", "frontend"), "nginx-service", &cluster_ip).await;
}

/// Seed 004, "Network Policies": allow app=nginx from role=frontend on 80,
/// deny all other ingress in the namespace, allow all egress.
async fn seed_004_policies(k: &Kubectl) {
    k.run(&["run", "visitor", "--image=nginx"]).await;
    wait_ready(k, "default", &["visitor"]).await;
    wait_curl(k, ("default", "visitor"), "http://nginx-service/", true).await;
    let applied = k.run(&["apply", "-f", &seed("004-policy.yaml")]).await;
    for name in [
        "allow-frontend-to-nginx",
        "default-deny-ingress",
        "allow-all-egress",
    ] {
        assert!(
            applied.contains(&format!("networkpolicy.networking.k8s.io/{name} created")),
            "{applied}"
        );
    }
    wait_curl(k, ("default", "visitor"), "http://nginx-service/", false).await;
    // By name: DNS from a pod whose namespace denies all ingress works, its
    // replies being part of a connection the pod made.
    wait_curl(k, ("default", "frontend"), "http://nginx-service/", true).await;
    // default-deny now isolates the nextgen-app pods; seed 001's policy
    // still lets web reach the api pod.
    wait_curl(k, ("default", "web"), "http://app-service/", false).await;
    let api_ip = pod_ips(k, "default", "app=api").await;
    let url = format!("http://{}:3000/", api_ip.iter().next().expect("api pod"));
    wait_curl(k, ("default", "web"), &url, true).await;

    let listed = rows(&k.run(&["get", "networkpolicies"]).await);
    assert_eq!(listed[0], ["NAME", "POD-SELECTOR", "AGE"]);
    let selector_of = |name: &str| {
        listed
            .iter()
            .find(|r| r[0] == name)
            .map(|r| r[1].clone())
            .unwrap_or_else(|| panic!("{name} not in {listed:?}"))
    };
    assert_eq!(selector_of("allow-frontend-to-nginx"), "app=nginx");
    assert_eq!(selector_of("default-deny-ingress"), "<none>");
    assert_eq!(selector_of("allow-web-to-api"), "app=api");
    let described = squeezed(
        &k.run(&["describe", "networkpolicy", "allow-frontend-to-nginx"])
            .await,
    );
    for want in [
        "Name: allow-frontend-to-nginx",
        "PodSelector: app=nginx",
        "Allowing ingress traffic:",
        "To Port: 80/TCP",
        "PodSelector: role=frontend",
        "Policy Types: Ingress",
    ] {
        assert!(described.contains(want), "{want} not in:\n{described}");
    }
}

/// Seed 004, exam question 2: app=web pods of namespace app, and only they,
/// reach app=db on 3306 (a pod labelled app=web elsewhere does not).
async fn seed_004_db_policy(k: &Kubectl) {
    create(k, &["namespace", "app"]).await;
    k.run(&[
        "run",
        "db",
        "-n",
        "app",
        "-l",
        "app=db",
        "--image=lb-echo",
        "--port=3306",
    ])
    .await;
    for (name, label) in [("web", "app=web"), ("other", "app=other")] {
        k.run(&[
            "run",
            name,
            "-n",
            "app",
            "-l",
            label,
            "--image=curlimages/curl",
            "--",
            "sleep",
            "infinity",
        ])
        .await;
    }
    wait_ready(k, "app", &["db", "web", "other"]).await;
    let db_ip = pod_ips(k, "app", "app=db").await;
    let db = format!("http://{}:3306/", db_ip.iter().next().expect("db pod"));
    wait_curl(k, ("app", "other"), &db, true).await;
    let applied = k.run(&["apply", "-f", &seed("004-db-policy.yaml")]).await;
    assert!(
        applied.contains("networkpolicy.networking.k8s.io/db-policy created"),
        "{applied}"
    );
    wait_curl(k, ("app", "other"), &db, false).await;
    let answer = wait_curl(k, ("app", "web"), &db, true).await;
    assert_eq!(answer.trim(), "db");
    wait_curl(k, ("default", "web"), &db, false).await;
}
