//! The lab's scheduler and kubelet: puts Pods on nodes, gives each a network
//! namespace, an address from its node's pod CIDR and an echo server on its
//! container ports, reports readiness, and tears Pods down on deletion
//! (SIGTERM, a grace period, then the namespace goes).

use std::{
    collections::{BTreeSet, HashMap},
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{
    kinds::Kind,
    net::{self, Names},
    objects::is_terminating,
    sandbox::{self, InitOutcome},
    store::{meta_str, now_rfc3339, Store},
};
use crate::netns;

/// Annotation naming the pod's network namespace (read by `lb lab exec`).
pub const NETNS_ANNOTATION: &str = "lab.lb.dev/netns";
/// Where the pod's output goes: what `kubectl logs` reads.
pub const LOG_ANNOTATION: &str = "lab.lb.dev/log";
/// How long a terminating pod may take before it is killed.
const MAX_GRACE: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Starting,
    Running,
    Stopping,
}

struct PodRuntime {
    k: u32,
    ip: Ipv4Addr,
    phase: Phase,
    child: Option<Child>,
}

#[derive(Default)]
struct State {
    pods: HashMap<String, PodRuntime>,
    next_k: u32,
    used_ips: BTreeSet<Ipv4Addr>,
}

#[derive(Clone)]
pub struct Kubelet {
    store: Store,
    names: Names,
    /// Node names; node i+1 is `nodes[i]`.
    nodes: Vec<String>,
    lb_binary: PathBuf,
    log_dir: PathBuf,
    /// The lab's kubeconfig, for the cluster DNS pod.
    kubeconfig: PathBuf,
    state: Arc<Mutex<State>>,
    /// Agents run: the chained `lb-cni` plugin runs after the veth is made
    /// (`sandbox::cni_add`), as on a kind node with lb installed, and the
    /// pod's commands start only once lb's programs are on its veth.
    /// Otherwise its first packets would bypass Services and policy.
    pub wait_for_datapath: bool,
}

impl Kubelet {
    pub fn new(
        store: Store,
        names: Names,
        nodes: Vec<String>,
        lb_binary: PathBuf,
        log_dir: PathBuf,
        kubeconfig: PathBuf,
    ) -> Self {
        Self {
            store,
            names,
            nodes,
            lb_binary,
            log_dir,
            kubeconfig,
            state: Arc::default(),
            wait_for_datapath: false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n == name).map(|i| i + 1)
    }

    pub fn reconcile(&self) {
        let (pods, _) = self.store.list(Kind::Pod, None);
        self.schedule(&pods);
        let present: BTreeSet<&str> = pods.iter().map(|p| meta_str(p, "uid")).collect();
        for pod in &pods {
            let uid = meta_str(pod, "uid").to_string();
            let Some(node) = pod["spec"]["nodeName"]
                .as_str()
                .and_then(|n| self.node_index(n))
            else {
                continue;
            };
            let phase = self.lock().pods.get(&uid).map(|r| r.phase);
            match (is_terminating(pod), phase) {
                (false, None) => self.start(pod.clone(), node),
                (true, None) => {
                    let _ = self.store.delete(
                        Kind::Pod,
                        meta_str(pod, "namespace"),
                        meta_str(pod, "name"),
                    );
                }
                (true, Some(Phase::Starting | Phase::Running)) => self.stop(uid, Some(pod.clone())),
                _ => {}
            }
        }
        let orphans: Vec<String> = self
            .lock()
            .pods
            .iter()
            .filter(|(uid, r)| !present.contains(uid.as_str()) && r.phase != Phase::Stopping)
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in orphans {
            self.stop(uid, None);
        }
    }

    /// Binds unscheduled pods to the node with the fewest pods.
    fn schedule(&self, pods: &[Value]) {
        let mut load: HashMap<&str, usize> = self.nodes.iter().map(|n| (n.as_str(), 0)).collect();
        for p in pods {
            if let Some(n) = p["spec"]["nodeName"].as_str().and_then(|n| load.get_mut(n)) {
                *n += 1;
            }
        }
        for pod in pods
            .iter()
            .filter(|p| p["spec"]["nodeName"].is_null() && !is_terminating(p))
        {
            let Some(node) = self
                .nodes
                .iter()
                .min_by_key(|n| load.get(n.as_str()).copied().unwrap_or(0))
            else {
                return;
            };
            if let Some(n) = load.get_mut(node.as_str()) {
                *n += 1;
            }
            let mut pod = pod.clone();
            pod["spec"]["nodeName"] = json!(node);
            pod["metadata"]["resourceVersion"] = json!("");
            let _ = self.store.replace(Kind::Pod, pod);
        }
    }

    fn start(&self, pod: Value, node: usize) {
        let uid = meta_str(&pod, "uid").to_string();
        let (k, ip) = {
            let mut st = self.lock();
            let (net, _) = net::pod_cidr(node);
            let base = u32::from(net);
            let Some(ip) = (2..255)
                .map(|i| Ipv4Addr::from(base + i))
                .find(|ip| !st.used_ips.contains(ip))
            else {
                tracing::error!("node {node}: pod CIDR exhausted");
                return;
            };
            st.used_ips.insert(ip);
            st.next_k += 1;
            let k = st.next_k;
            st.pods.insert(
                uid.clone(),
                PodRuntime {
                    k,
                    ip,
                    phase: Phase::Starting,
                    child: None,
                },
            );
            (k, ip)
        };
        let this = self.clone();
        tokio::spawn(async move {
            let name = format!("{}/{}", meta_str(&pod, "namespace"), meta_str(&pod, "name"));
            match this.run_pod(&pod, node, k, ip).await {
                Ok((child, init)) => {
                    if let Some(r) = this.lock().pods.get_mut(&uid) {
                        r.child = Some(child);
                        if r.phase == Phase::Starting {
                            r.phase = Phase::Running;
                        }
                    }
                    this.set_status(&pod, (node, ip, k), &init);
                }
                Err(e) => {
                    tracing::error!("pod {name} failed to start: {e:#}");
                    let mut failed = pod.clone();
                    failed["status"] = json!({"phase": "Failed", "message": format!("{e:#}")});
                    failed["metadata"]["resourceVersion"] = json!("");
                    let _ = this.store.replace(Kind::Pod, failed);
                }
            }
        });
    }

    async fn run_pod(
        &self,
        pod: &Value,
        node: usize,
        k: u32,
        ip: Ipv4Addr,
    ) -> Result<(Child, Vec<InitOutcome>)> {
        net::create_pod(&self.names, node, k, ip).await?;
        if self.wait_for_datapath {
            let pin_dir = super::node_pin_dir(&self.names.prefix, node);
            sandbox::cni_add(&self.lb_binary, &self.names, (node, k), &pin_dir).await?;
        }
        net::write_resolv_conf(&self.names.pod_ns(k), meta_str(pod, "namespace"))?;
        let log = std::fs::File::create(self.pod_log(pod))?;
        let cgroup = super::cgroup::node_cgroup(&self.names.prefix, &super::node_name(node))?;
        let init = sandbox::run_init_containers(pod, &self.names.pod_ns(k), &cgroup, &log).await?;
        let mut cmd = if super::cluster_dns::is_dns_pod(pod) {
            // The DNS server watches the API from the host and answers in
            // the pod's namespace (`dns_server.rs`).
            let mut cmd = netns::host_command_dying_with_parent(&self.lb_binary);
            cmd.args([
                "lab",
                "dns",
                "--netns",
                &self.names.pod_ns(k),
                "--kubeconfig",
            ])
            .arg(&self.kubeconfig);
            cmd
        } else {
            let mut cmd = self.echo_command(pod, k)?;
            super::cgroup::join(&mut cmd, &cgroup)?;
            cmd
        };
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("starting echo server")?;
        let stdout = child.stdout.take().context("echo stdout")?;
        // The echo server prints "ready" once every port is bound.
        let ready = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        match tokio::time::timeout(Duration::from_secs(10), ready).await {
            Ok(Ok(Ok(line))) if line.trim() == "ready" => Ok((child, init)),
            other => {
                let _ = child.kill();
                bail!("echo server did not become ready: {other:?}")
            }
        }
    }

    /// `lb echo` in the pod's namespace, answering on every containerPort.
    fn echo_command(&self, pod: &Value, k: u32) -> Result<std::process::Command> {
        let mut cmd = netns::command_in(&self.names.pod_ns(k), &self.lb_binary, true)?;
        cmd.arg("echo").arg("--name").arg(meta_str(pod, "name"));
        let mut listen = std::collections::BTreeSet::new();
        for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
            for p in c["ports"].as_array().into_iter().flatten() {
                let port = p["containerPort"]
                    .as_i64()
                    .context("containerPort missing")?;
                let proto = p["protocol"].as_str().unwrap_or("TCP").to_ascii_lowercase();
                listen.insert(format!("{proto}:{port}"));
            }
            if let Some(port) = c["image"].as_str().and_then(image_serves) {
                listen.insert(format!("tcp:{port}"));
            }
        }
        for l in listen {
            cmd.arg("--listen").arg(l);
        }
        Ok(cmd)
    }

    fn pod_log(&self, pod: &Value) -> PathBuf {
        self.log_dir.join(format!(
            "pod-{}-{}.log",
            meta_str(pod, "namespace"),
            meta_str(pod, "name")
        ))
    }

    fn set_status(&self, pod: &Value, (node, ip, k): (usize, Ipv4Addr, u32), init: &[InitOutcome]) {
        let Ok(mut cur) =
            self.store
                .get(Kind::Pod, meta_str(pod, "namespace"), meta_str(pod, "name"))
        else {
            return;
        };
        if meta_str(&cur, "uid") != meta_str(pod, "uid") {
            return;
        }
        let now = now_rfc3339();
        cur["metadata"]["annotations"][NETNS_ANNOTATION] = json!(self.names.pod_ns(k));
        cur["metadata"]["annotations"][LOG_ANNOTATION] =
            json!(self.pod_log(pod).display().to_string());
        // One status per container, as a kubelet reports them (`kubectl get
        // pods` counts READY from these).
        let containers: Vec<Value> = cur["spec"]["containers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|c| {
                json!({
                    "name": c["name"], "image": c["image"], "imageID": "", "containerID": "",
                    "ready": true, "started": true, "restartCount": 0,
                    "state": {"running": {"startedAt": now}},
                })
            })
            .collect();
        cur["status"] = json!({
            "phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
            "hostIP": net::node_ip(node).to_string(), "startTime": now,
            "containerStatuses": containers,
            "initContainerStatuses": init.iter().map(|i| i.status(&now)).collect::<Vec<_>>(),
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
            ],
        });
        cur["metadata"]["resourceVersion"] = json!("");
        let _ = self.store.replace(Kind::Pod, cur);
    }

    /// SIGTERM, wait for the grace period, SIGKILL; then remove the network
    /// namespace and, if the pod object is still there, the object.
    fn stop(&self, uid: String, pod: Option<Value>) {
        let child = {
            let mut st = self.lock();
            let Some(r) = st.pods.get_mut(&uid) else {
                return;
            };
            r.phase = Phase::Stopping;
            r.child.take()
        };
        let this = self.clone();
        tokio::spawn(async move {
            if let Some(mut child) = child {
                let pid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                let grace = pod
                    .as_ref()
                    .and_then(|p| p["spec"]["terminationGracePeriodSeconds"].as_u64())
                    .map_or(MAX_GRACE, |s| Duration::from_secs(s).min(MAX_GRACE));
                let deadline = Instant::now() + grace;
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            let runtime = this.lock().pods.remove(&uid);
            if let Some(r) = runtime {
                if let Err(e) = net::delete_pod(&this.names, r.k).await {
                    tracing::warn!("removing pod netns: {e:#}");
                }
                this.lock().used_ips.remove(&r.ip);
            }
            if let Some(pod) = pod {
                let (ns, name) = (meta_str(&pod, "namespace"), meta_str(&pod, "name"));
                if this
                    .store
                    .get(Kind::Pod, ns, name)
                    .is_ok_and(|p| meta_str(&p, "uid") == uid)
                {
                    let _ = this.store.delete(Kind::Pod, ns, name);
                }
            }
        });
    }

    /// Kills every pod process at once (lab teardown).
    pub fn kill_all(&self) {
        let mut st = self.lock();
        for r in st.pods.values_mut() {
            if let Some(mut c) = r.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// The port a well-known web server image listens on whether or not the
/// pod declares it (a containerPort is informational): the tutorials'
/// `kubectl run backend --image=nginx` and `kubectl create deployment nginx
/// --image=nginx` declare none, and in kind they answer on 80.
fn image_serves(image: &str) -> Option<u16> {
    let image = image.split('@').next().unwrap_or(image);
    let last = image.rsplit('/').next().unwrap_or(image);
    let name = last.split(':').next().unwrap_or(last);
    matches!(name, "nginx" | "httpd").then_some(80)
}

#[cfg(test)]
mod tests {
    use super::image_serves;

    #[test]
    fn web_server_images_serve_80_however_they_are_named() {
        for (image, port) in [
            ("nginx", Some(80)),
            ("nginx:1.27", Some(80)),
            ("docker.io/library/nginx:1.27-alpine", Some(80)),
            ("registry.local:5000/nginx", Some(80)),
            ("nginx@sha256:abcd", Some(80)),
            ("httpd:2.4", Some(80)),
            ("curlimages/curl:latest", None),
            ("registry.local:5000/curl", None),
            ("lb-echo:latest", None),
        ] {
            assert_eq!(image_serves(image), port, "{image}");
        }
    }
}
