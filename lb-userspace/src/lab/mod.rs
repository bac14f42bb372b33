//! The lab: a stand-in for a Kubernetes cluster on one Linux box, with real
//! network namespaces, veths and TCP. See `lb lab --help`.

pub mod admission;
pub mod apiserver;
pub mod cgroup;
pub mod cloud;
pub mod cluster_dns;
pub mod controllers;
pub mod demo;
pub mod discovery;
pub mod dns;
pub mod dns_server;
pub mod endpoints;
pub mod endpoints_v1;
pub mod exec;
pub mod gc;
pub mod kinds;
pub mod kubelet;
pub mod logs;
pub mod manifests;
pub mod net;
pub mod objects;
pub mod openapi;
pub mod patch;
pub mod printing;
pub mod probe;
pub mod rollout;
pub mod sandbox;
pub mod selectors;
pub mod store;
pub mod validation;
mod watches;
pub mod workloads;
pub mod writes;

use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::netns;
use kinds::Kind;
use kubelet::Kubelet;
use net::Names;
use objects::{is_terminating, pod_ready};
use store::{meta_str, Store};

pub struct LabConfig {
    /// Short name put in front of every namespace, link and pin: [a-z0-9]{1,6}.
    pub prefix: String,
    pub nodes: usize,
    pub manifests: Option<PathBuf>,
    /// The `lb` binary: runs echo servers and agents.
    pub lb_binary: PathBuf,
    /// Start an agent on every node.
    pub agents: bool,
    /// Extra arguments for every agent.
    pub agent_args: Vec<String>,
    /// Socket LB on every agent (`--socket-lb-cgroup`, the node's cgroup
    /// of pods): also on when LB_LAB_SOCKET_LB=1, so that any lab test can
    /// run with it.
    pub socket_lb: bool,
}

impl LabConfig {
    pub fn new(prefix: &str, lb_binary: impl Into<PathBuf>) -> Self {
        Self {
            prefix: prefix.into(),
            nodes: 1,
            manifests: None,
            lb_binary: lb_binary.into(),
            agents: true,
            agent_args: vec![],
            socket_lb: socket_lb_from_env(),
        }
    }
}

/// LB_LAB_SOCKET_LB=1: labs run with socket LB unless told otherwise.
pub fn socket_lb_from_env() -> bool {
    std::env::var("LB_LAB_SOCKET_LB").is_ok_and(|v| v == "1")
}

pub fn state_dir(prefix: &str) -> PathBuf {
    PathBuf::from("/run/lb-lab").join(prefix)
}

pub fn pin_root(prefix: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf").join(prefix)
}

/// Where node `index`'s agent pins its maps and links.
pub fn node_pin_dir(prefix: &str, index: usize) -> PathBuf {
    pin_root(prefix).join(node_name(index))
}

pub fn node_name(index: usize) -> String {
    format!("node-{index}")
}

pub struct Lab {
    pub prefix: String,
    pub names: Names,
    pub store: Store,
    pub port: u16,
    pub nodes: usize,
    lb_binary: PathBuf,
    agent_args: Vec<String>,
    socket_lb: bool,
    kubelet: Kubelet,
    agents: Vec<(usize, Child)>,
    tasks: Vec<JoinHandle<()>>,
    /// The API server's listeners (root namespace, then each node's).
    servers: Vec<JoinHandle<()>>,
}

fn valid_prefix(p: &str) -> bool {
    (1..=6).contains(&p.len())
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

impl Lab {
    /// Brings up the API server, the network, the nodes (and their agents),
    /// and applies the manifests. Anything half-built is removed on error.
    pub async fn up(cfg: LabConfig) -> Result<Lab> {
        if !valid_prefix(&cfg.prefix) {
            bail!(
                "lab prefix {:?} must be 1-6 lowercase letters or digits",
                cfg.prefix
            );
        }
        if cfg.nodes == 0 || cfg.nodes > 8 {
            bail!("a lab has 1 to 8 nodes");
        }
        if let Some(pid) = running_pid(&cfg.prefix) {
            bail!("lab {:?} is already running (pid {pid}); use another --prefix or `lb lab down --prefix {}`", cfg.prefix, cfg.prefix);
        }
        // Leftovers of a lab with the same prefix that was killed.
        teardown(&cfg.prefix);
        let dir = state_dir(&cfg.prefix);
        std::fs::create_dir_all(dir.join("logs"))?;
        crate::datapath::ensure_bpffs()?;

        let store = Store::new();
        for ns in ["default", "kube-system"] {
            store.create(Kind::Namespace, json!({"metadata": {"name": ns}}))?;
        }
        let names = Names {
            prefix: cfg.prefix.clone(),
        };
        let node_names: Vec<String> = (1..=cfg.nodes).map(node_name).collect();
        cgroup::create(&cfg.prefix, &node_names)?;
        let mut kubelet = Kubelet::new(
            store.clone(),
            names.clone(),
            node_names,
            cfg.lb_binary.clone(),
            dir.join("logs"),
            dir.join("kubeconfig"),
        );
        kubelet.wait_for_datapath = cfg.agents;
        let mut lab = Lab {
            prefix: cfg.prefix.clone(),
            names: names.clone(),
            store: store.clone(),
            port: 0,
            nodes: cfg.nodes,
            lb_binary: cfg.lb_binary.clone(),
            agent_args: cfg.agent_args.clone(),
            socket_lb: cfg.socket_lb,
            kubelet: kubelet.clone(),
            agents: vec![],
            tasks: vec![],
            servers: vec![],
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        lab.port = listener.local_addr()?.port();
        lab.serve(listener);

        net::create_network(&names).await?;
        for i in 1..=cfg.nodes {
            net::create_node(&names, i, cfg.nodes).await?;
            lab.serve_in_node(i)?;
            let (cidr, len) = net::pod_cidr(i);
            store.create(
                Kind::Node,
                json!({"metadata": {"name": node_name(i), "labels": {"kubernetes.io/hostname": node_name(i)}},
                       "spec": {"podCIDR": format!("{cidr}/{len}"), "podCIDRs": [format!("{cidr}/{len}")]},
                       "status": {"addresses": [{"type": "InternalIP", "address": net::node_ip(i).to_string()},
                                                {"type": "Hostname", "address": node_name(i)}],
                                  "conditions": [{"type": "Ready", "status": "True"}]}}),
            )?;
        }
        std::fs::write(lab.kubeconfig_path(), kubeconfig(lab.port))?;
        std::fs::write(
            dir.join("lab.json"),
            json!({"pid": std::process::id(), "port": lab.port, "prefix": lab.prefix, "nodes": cfg.nodes}).to_string(),
        )?;
        lab.tasks
            .push(tokio::spawn(controllers::run(store.clone(), kubelet)));
        cluster_dns::install(&store)?;
        if let Some(m) = &cfg.manifests {
            manifests::apply(&store, manifests::load(m)?)?;
        }
        if cfg.agents {
            for i in 1..=cfg.nodes {
                lab.start_agent(i)?;
            }
        }
        Ok(lab)
    }

    /// The API server also listens on the node's own loopback, where the
    /// agent (a hostNetwork pod) finds it, as 127.0.0.1:port.
    fn serve_in_node(&mut self, i: usize) -> Result<()> {
        let port = self.port;
        let std_listener = netns::run_in(&self.names.node_ns(i), move || {
            std::net::TcpListener::bind(("127.0.0.1", port))
        })??;
        std_listener.set_nonblocking(true)?;
        self.serve(tokio::net::TcpListener::from_std(std_listener)?);
        Ok(())
    }

    /// Takes the API server away: listeners closed (new connections are
    /// refused), open watches ended, requests on kept-alive connections
    /// answered 503. The controllers and kubelet go on with the store.
    pub fn stop_api_server(&mut self) {
        self.store.set_down(true);
        for t in self.servers.drain(..) {
            t.abort();
        }
    }

    /// Brings the API server back on the same port.
    pub async fn start_api_server(&mut self) -> Result<()> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await?;
        self.serve(listener);
        for i in 1..=self.nodes {
            self.serve_in_node(i)?;
        }
        self.store.set_down(false);
        Ok(())
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        use axum::serve::ListenerExt;
        let app = apiserver::router(self.store.clone());
        // As kube-apiserver (Go sets TCP_NODELAY on every connection): a
        // watch event is a small write, and behind an unacknowledged one
        // Nagle held it until the client's delayed ACK, 40 ms later.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!("lab API server: TCP_NODELAY: {e}");
            }
        });
        self.servers.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("lab API server: {e}");
            }
        }));
    }

    pub fn kubeconfig_path(&self) -> PathBuf {
        state_dir(&self.prefix).join("kubeconfig")
    }

    pub fn log_path(&self, what: &str) -> PathBuf {
        state_dir(&self.prefix)
            .join("logs")
            .join(format!("{what}.log"))
    }

    pub fn pin_dir(&self, node: usize) -> PathBuf {
        node_pin_dir(&self.prefix, node)
    }

    /// Starts the agent of node `i` inside the node's network namespace.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(&format!("agent-{}", node_name(i))))?;
        // A profiler to run the agent under (`heaptrack -o FILE`, `perf
        // record -g -o FILE --`), for `docs/benchmarks.md`'s profiles.
        let wrapper = std::env::var("LB_LAB_AGENT_WRAPPER").unwrap_or_default();
        let agent = agent_binary().unwrap_or_else(|| self.lb_binary.clone());
        let mut words = wrapper.split_whitespace();
        let mut cmd = match words.next() {
            Some(program) => {
                let mut cmd = netns::command_in(&self.names.node_ns(i), program, true)?;
                cmd.args(words).arg(&agent);
                cmd
            }
            None => netns::command_in(&self.names.node_ns(i), &agent, true)?,
        };
        cmd.arg("agent")
            .arg("--kubeconfig")
            .arg(self.kubeconfig_path())
            .arg("--node-name")
            .arg(node_name(i))
            .arg("--pin-dir")
            .arg(self.pin_dir(i))
            .arg("--interface-prefix")
            .arg(self.names.host_veth_prefix())
            .args(&self.agent_args);
        if self.socket_lb {
            cmd.arg("--socket-lb-cgroup")
                .arg(cgroup::node_cgroup(&self.prefix, &node_name(i))?);
        }
        cmd.env(
            "LB_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        self.agents
            .push((i, cmd.spawn().context("starting the agent")?));
        Ok(())
    }

    /// The process id of node `i`'s agent, if this lab started one.
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.agents
            .iter()
            .find(|(n, _)| *n == i)
            .map(|(_, c)| c.id())
    }

    /// Stops node `i`'s agent with SIGKILL (pinned maps and links stay).
    pub fn kill_agent(&mut self, i: usize) {
        self.agents.retain_mut(|(n, c)| {
            if *n == i {
                let _ = c.kill();
                let _ = c.wait();
            }
            *n != i
        });
    }

    /// GETs `path` from node `i`'s agent (its metrics and health server on
    /// the node's loopback): the status code and the body. Blocking.
    pub fn agent_get(&self, i: usize, path: &str) -> Result<(u16, String)> {
        agent_get_in(&self.names.node_ns(i), path)
    }

    /// Waits until every pod is running and ready, and no pod is terminating.
    pub async fn wait_pods_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let (pods, _) = self.store.list(Kind::Pod, None);
            let (deps, _) = self.store.list(Kind::Deployment, None);
            let want: i64 = deps
                .iter()
                .map(|d| d["spec"]["replicas"].as_i64().unwrap_or(1))
                .sum();
            let owned = pods
                .iter()
                .filter(|p| objects::owner(p, "ReplicaSet").is_some() && !is_terminating(p))
                .count() as i64;
            let pending: Vec<&str> = pods
                .iter()
                .filter(|p| !pod_ready(p) || is_terminating(p))
                .map(|p| meta_str(p, "name"))
                .collect();
            if pending.is_empty() && owned >= want && self.endpoints_in_sync() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("pods not ready after {timeout:?}: {pending:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether every Service's EndpointSlices already list what its pods say
    /// (the controller runs after pods change, so it can lag behind them).
    fn endpoints_in_sync(&self) -> bool {
        let (services, _) = self.store.list(Kind::Service, None);
        let (pods, _) = self.store.list(Kind::Pod, None);
        let (slices, _) = self.store.list(Kind::EndpointSlice, None);
        services.iter().all(|svc| {
            let ns = meta_str(svc, "namespace");
            let name = meta_str(svc, "name");
            let want = endpoints::desired_slices(svc, &pods);
            if svc["spec"]["selector"]
                .as_object()
                .is_none_or(|s| s.is_empty())
                || svc["spec"]["type"] == "ExternalName"
            {
                return true;
            }
            want.iter().all(|(slice_name, w)| {
                slices.iter().any(|s| {
                    meta_str(s, "namespace") == ns
                        && meta_str(s, "name") == slice_name
                        && s["endpoints"] == w["endpoints"]
                        && s["metadata"]["labels"]["kubernetes.io/service-name"] == name
                })
            })
        })
    }

    /// The network namespace of pod `ns/name`.
    pub fn pod_netns(&self, ns: &str, name: &str) -> Result<String> {
        pod_netns(&self.store.get(Kind::Pod, ns, name)?)
    }

    pub fn node_netns(&self, i: usize) -> String {
        self.names.node_ns(i)
    }

    /// The outside client's network namespace (on the nodes' network).
    pub fn ext_netns(&self) -> String {
        self.names.ext_ns()
    }

    /// Ready pods whose name starts with `prefix`, in namespace `ns`.
    pub fn pods_named(&self, ns: &str, prefix: &str) -> Vec<Value> {
        self.store
            .list(Kind::Pod, Some(ns))
            .0
            .into_iter()
            .filter(|p| meta_str(p, "name").starts_with(prefix))
            .collect()
    }

    pub fn lb_binary(&self) -> &Path {
        &self.lb_binary
    }

    fn shutdown(&mut self) {
        for t in self.tasks.iter().chain(&self.servers) {
            t.abort();
        }
        for (_, c) in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.agents.clear();
        self.kubelet.kill_all();
        teardown(&self.prefix);
    }
}

impl Drop for Lab {
    /// Removes everything the lab made, also when a test fails.
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub fn pod_netns(pod: &Value) -> Result<String> {
    pod["metadata"]["annotations"][kubelet::NETNS_ANNOTATION]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("pod {} has no network yet", meta_str(pod, "name")))
}

/// The pid of the live process running lab `prefix`, if any.
pub fn running_pid(prefix: &str) -> Option<i32> {
    let text = std::fs::read_to_string(state_dir(prefix).join("lab.json")).ok()?;
    let pid = serde_json::from_str::<Value>(&text).ok()?["pid"].as_i64()? as i32;
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    (alive && pid != std::process::id() as i32).then_some(pid)
}

/// Removes the namespaces, pins and state of lab `prefix`, and kills its processes.
pub fn teardown(prefix: &str) {
    net::destroy(prefix);
    cgroup::remove(prefix);
    let _ = std::fs::remove_dir_all(pin_root(prefix));
    let _ = std::fs::remove_dir_all(state_dir(prefix));
}

/// GETs `path` from the agent of the node whose namespace is `netns`.
pub fn agent_get_in(netns: &str, path: &str) -> Result<(u16, String)> {
    let path = path.to_string();
    netns::run_in(netns, move || -> Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], 9964)),
            Duration::from_secs(2),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").as_bytes(),
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let code = resp
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    })?
}

/// The value of metric line `name` (with its labels) in a Prometheus scrape.
pub fn metric(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub fn kubeconfig(port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: http://127.0.0.1:{port}\n\
         users:\n- name: lab\n  user: {{}}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: lab\n\
         current-context: lab\n"
    )
}

/// The binary the lab's agents run when it is not the lab's own:
/// `LB_LAB_AGENT_BINARY`, which `cargo xtask bench` sets to the build the
/// image ships (`--no-default-features`: no lab, no benchmarks), so the
/// agent measured is the agent users run (its text is 8 MB smaller).
pub fn agent_binary() -> Option<PathBuf> {
    std::env::var_os("LB_LAB_AGENT_BINARY")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}
