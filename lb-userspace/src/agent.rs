//! `lb agent`: keeps the data path's maps equal to what the Kubernetes API
//! says. Watchers (kube-rs reflectors) feed caches at the edge; on any change
//! a pure translation and a pure differ decide the map writes.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use k8s_openapi::Resource as _;
use kube::{
    runtime::{reflector, watcher, WatchStreamExt},
    Api, Client,
};
use tokio::sync::Notify;

use crate::{
    datapath::{attach::interfaces_with_prefix, attach::Attacher, Datapath},
    plan::{desired_state, plan},
    translate::{translate, NodeContext},
};

/// A Node's addresses of the given types.
fn node_addresses(node: &Node, types: &[&str]) -> Vec<std::net::Ipv4Addr> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| types.contains(&a.type_.as_str()))
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

/// This node's name and addresses, and the other nodes' InternalIPs.
fn node_context(name: Option<&String>, nodes: &reflector::Store<Node>) -> NodeContext {
    let Some(name) = name else {
        return NodeContext::default();
    };
    let mut ctx = NodeContext {
        name: Some(name.clone()),
        ..Default::default()
    };
    for node in nodes.state() {
        if node.metadata.name.as_ref() == Some(name) {
            ctx.addrs = node_addresses(&node, &["InternalIP", "ExternalIP"]);
        } else {
            ctx.peers.extend(node_addresses(&node, &["InternalIP"]));
        }
    }
    ctx
}

pub struct AgentConfig {
    pub kubeconfig: Option<PathBuf>,
    pub node_name: Option<String>,
    pub pin_dir: PathBuf,
    /// Pod veths are the interfaces whose names start with this.
    pub interface_prefix: String,
    /// The node's uplink, where XDP serves traffic from outside the node
    /// (NodePorts, LoadBalancer IPs); none to leave it alone.
    pub uplink: Option<String>,
    /// This network namespace's /proc/sys/net (a container mounts the
    /// host's at another path, as its own is read-only).
    pub proc_sys_net: PathBuf,
    /// How often the maps are compared with the desired state even when
    /// nothing changed (repairs drift).
    pub resync: Duration,
    /// Idle timeouts of conntrack entries, and how often they are swept.
    pub ct_timeouts: crate::conntrack::Timeouts,
    pub ct_sweep: Duration,
    /// Where /metrics, /healthz and /readyz are served; none for nowhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The eBPF programs' own log lines, into this log (costs per packet).
    pub bpf_log: bool,
}

/// Forwards the eBPF programs' log records (aya-log, through the `log`
/// crate's interface) into this process's tracing log.
struct BpfLogToTracing;

impl log::Log for BpfLogToTracing {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        tracing::info!(target: "lb::bpf", "{}", record.args());
    }

    fn flush(&self) {}
}

/// Reads the programs' log buffer whenever it has records.
fn spawn_bpf_log(dp: &mut Datapath) -> Result<()> {
    let logger = dp.logger(BpfLogToTracing)?;
    // SAFETY: the logger owns its ring buffer's fd, which stays open as long
    // as the AsyncFd (its owner) lives.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("watching the eBPF log buffer: {e}"))?;
    tokio::spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

pub async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer()
            .await
            .context("no --kubeconfig given and no cluster config found")?,
    };
    Ok(Client::try_from(config)?)
}

/// Retries a failed watch after 0.2 s, doubling up to 5 s, with up to 25%
/// jitter: the agent catches up soon after the API server comes back
/// (kube's default waits up to 30 s), without every node retrying at once.
struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self {
            next: Duration::from_millis(200),
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (base * 2).min(Duration::from_secs(5));
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = base.mul_f64(f64::from(nanos % 1000) / 4000.0);
        Some(base + jitter)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        *self = Self::default();
    }
}

/// The API resources the agent watches, as (API group, plural). The
/// ClusterRole in `manifests/install/rbac.yaml` grants get, list and watch on
/// exactly these (a test checks it), and `reflect` refuses any other.
pub const WATCHED: [(&str, &str); 6] = [
    (Service::GROUP, Service::URL_PATH_SEGMENT),
    (EndpointSlice::GROUP, EndpointSlice::URL_PATH_SEGMENT),
    (Node::GROUP, Node::URL_PATH_SEGMENT),
    (Pod::GROUP, Pod::URL_PATH_SEGMENT),
    (Namespace::GROUP, Namespace::URL_PATH_SEGMENT),
    (NetworkPolicy::GROUP, NetworkPolicy::URL_PATH_SEGMENT),
];

/// Where the agent reports objects it cannot program (kube-runtime's event
/// recorder: create, then merge-patch a repeated one).
pub const EVENTS: (&str, &str) = (
    k8s_openapi::api::events::v1::Event::GROUP,
    k8s_openapi::api::events::v1::Event::URL_PATH_SEGMENT,
);

/// Starts a reflector for `K`; `changed` is notified on every change.
fn reflect<K>(api: Api<K>, changed: Arc<Notify>) -> reflector::Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    debug_assert!(
        WATCHED.contains(&(K::GROUP, K::URL_PATH_SEGMENT)),
        "{} is watched but not in WATCHED (nor in the ClusterRole)",
        K::URL_PATH_SEGMENT
    );
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, watcher::Config::default()))
        .backoff(WatchBackoff::default())
        .touched_objects();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(_) => changed.notify_one(),
                Err(e) => tracing::warn!("watch {}: {e}", std::any::type_name::<K>()),
            }
        }
    });
    reader
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    let stats = crate::metrics::Shared::new(cfg.pin_dir.clone());
    if let Some(addr) = cfg.metrics_addr {
        let stats = stats.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, stats).await {
                tracing::error!(%addr, "metrics server: {e:#}");
            }
        });
    }
    let mut dp = Datapath::load_with(Some(&cfg.pin_dir), cfg.bpf_log)?;
    if cfg.bpf_log {
        spawn_bpf_log(&mut dp)?;
        tracing::info!("eBPF log lines on (--bpf-log): they cost per packet");
    }
    let mut attacher = Attacher::new(&cfg.pin_dir)?;
    tracing::info!(pin_dir = %cfg.pin_dir.display(), node = ?cfg.node_name, "data path loaded");

    let client = client(cfg.kubeconfig.as_ref()).await?;
    let changed = Arc::new(Notify::new());
    let services = reflect(Api::<Service>::all(client.clone()), changed.clone());
    let slices = reflect(Api::<EndpointSlice>::all(client.clone()), changed.clone());
    let nodes = reflect(Api::<Node>::all(client.clone()), changed.clone());
    let pods = reflect(Api::<Pod>::all(client.clone()), changed.clone());
    let namespaces = reflect(Api::<Namespace>::all(client.clone()), changed.clone());
    let policies = reflect(Api::<NetworkPolicy>::all(client.clone()), changed.clone());
    let mut events = crate::events::EventPublisher::new(client, cfg.node_name.as_deref());
    // Program nothing until every cache is complete: a restart must never
    // write a half-known cluster into the maps.
    services
        .wait_until_ready()
        .await
        .context("service watch ended")?;
    slices
        .wait_until_ready()
        .await
        .context("endpointslice watch ended")?;
    nodes.wait_until_ready().await.context("node watch ended")?;
    pods.wait_until_ready().await.context("pod watch ended")?;
    namespaces
        .wait_until_ready()
        .await
        .context("namespace watch ended")?;
    policies
        .wait_until_ready()
        .await
        .context("networkpolicy watch ended")?;
    tracing::info!("caches synced");
    if cfg.node_name.is_none() {
        tracing::warn!(
            "no --node-name (NODE_NAME): NodePorts and node-local endpoints are not programmed"
        );
    }
    if let Some(uplink) = &cfg.uplink {
        match crate::datapath::attach::attach_uplink(
            &mut dp,
            &cfg.pin_dir.join("uplink"),
            uplink,
            &cfg.proc_sys_net,
        ) {
            Ok(()) => tracing::info!(interface = %uplink, "XDP attached to the uplink"),
            Err(e) => {
                tracing::error!(interface = %uplink, "XDP attach failed, no NodePort from outside: {e:#}")
            }
        }
    }

    let mut logged_errors = BTreeSet::new();
    // What was last programmed: the same state again with writes needed
    // means the maps drifted (an entry removed by hand, say).
    let mut last_services: Option<Vec<crate::translate::DesiredService>> = None;
    let mut last_policy: Option<crate::policy::PolicyState> = None;
    // What the service maps hold as of this agent's last complete write. A
    // change is planned against it rather than against the maps read back:
    // at 10,000 Services with 10 endpoints that read is 210,000 entries,
    // two syscalls each, and was most of a pass. The periodic resync reads
    // the maps, which is how an entry changed by hand is found and repaired.
    let mut written: Option<crate::plan::MapState> = None;
    let mut resync = tokio::time::interval(cfg.resync);
    let mut links = tokio::time::interval(Duration::from_secs(1));
    let mut ct_sweep = tokio::time::interval(cfg.ct_sweep);
    let mut health = crate::health::HealthServers::default();
    loop {
        tokio::select! {
            _ = changed.notified() => {
                // Let a burst of events settle into one pass.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ = resync.tick() => {
                written = None;
            }
            _ = links.tick() => {
                stats.lock().alive();
                sync_links(&mut dp, &mut attacher, &cfg.interface_prefix);
                continue;
            }
            _ = ct_sweep.tick() => {
                match crate::conntrack::sweep(&mut dp, &cfg.ct_timeouts) {
                    Ok((summary, swept)) => {
                        tracing::debug!(
                            live = summary.total(),
                            removed = swept.removed,
                            kept = swept.kept,
                            "conntrack sweep"
                        );
                        crate::conntrack::warn_if_filling(&summary);
                        stats.lock().conntrack = Some(summary);
                    }
                    Err(e) => tracing::warn!("conntrack sweep: {e:#}"),
                }
                continue;
            }
        }
        let started = Instant::now();
        let svcs = services.state();
        let eps = slices.state();
        let node = node_context(cfg.node_name.as_ref(), &nodes);
        if let Err(e) = dp.maps.set_node(node.addrs.first().copied()) {
            tracing::error!("writing the node map: {e:#}");
        }
        let mut t = translate(&svcs, &eps, &node);
        let (fitting, full) = crate::plan::fit_to_capacity(
            std::mem::take(&mut t.services),
            &crate::plan::Capacity::default(),
        );
        t.services = fitting;
        let map_full = full.len();
        t.errors.extend(full);
        let all_pods: Vec<Pod> = pods.state().iter().map(|p| (**p).clone()).collect();
        let all_ns: Vec<Namespace> = namespaces.state().iter().map(|n| (**n).clone()).collect();
        let all_np: Vec<NetworkPolicy> = policies.state().iter().map(|p| (**p).clone()).collect();
        let pt = crate::policy::translate_policies(&all_pods, &all_ns, &all_np, &node);
        stats.lock().alive();
        let policy_result = crate::datapath::policy_maps::apply(&mut dp.maps, &pt.state);
        if let Ok(n @ 1..) = policy_result {
            if last_policy.as_ref() == Some(&pt.state) {
                tracing::warn!(writes = n, "policy maps had drifted; repaired");
                stats.lock().drift_repairs += n as u64;
            }
        }
        match policy_result {
            Ok(0) => last_policy = Some(pt.state.clone()),
            Ok(n) => {
                tracing::info!(
                    writes = n,
                    endpoints = pt.state.endpoints.len(),
                    rules = pt.state.rules.len(),
                    "policy maps updated"
                );
                last_policy = Some(pt.state.clone());
            }
            Err(e) => {
                stats.lock().error("policy_write");
                tracing::error!("updating policy maps: {e:#}")
            }
        }
        health
            .sync(&crate::health::health_checks(&svcs, &eps, &node))
            .await;
        let errors: BTreeSet<String> = t
            .errors
            .iter()
            .chain(&pt.errors)
            .map(|e| format!("{}: {}", e.object, e.message))
            .collect();
        for e in errors.difference(&logged_errors) {
            tracing::warn!("skipped: {e}");
        }
        logged_errors = errors;
        events.sync(&t.errors.iter().chain(&pt.errors).collect::<Vec<_>>());
        let current = match written.take() {
            Some(state) => Ok(state),
            None => dp.maps.state(),
        };
        let result = current.and_then(|current| {
            let desired = desired_state(&current, &t.services);
            let ops = plan(&current, &desired);
            dp.maps.apply(&ops).map(|()| (ops.len(), desired))
        });
        let mut st = stats.lock();
        match result {
            Ok((n, desired)) => {
                if n > 0 && last_services.as_ref() == Some(&t.services) {
                    tracing::warn!(writes = n, "service maps had drifted; repaired");
                    st.drift_repairs += n as u64;
                } else if n > 0 {
                    tracing::info!(
                        ops = n,
                        frontends = t.services.len(),
                        backends = desired.backends.len(),
                        took_ms = started.elapsed().as_millis() as u64,
                        "maps updated"
                    );
                }
                st.services = t.services.len();
                st.backends = desired.backends.len();
                st.ready = true;
                last_services = Some(t.services);
                written = Some(desired);
            }
            Err(e) => {
                st.error("map_write");
                tracing::error!("updating maps: {e:#}");
            }
        }
        st.map_full = map_full;
        st.policies = all_np.len();
        st.policy_entries = pt.state.rules.len();
        st.endpoints = pt.state.endpoints.len();
        st.invalid_objects.clear();
        for e in t.errors.iter().chain(&pt.errors) {
            let kind = e.object.split(' ').next().unwrap_or_default().to_string();
            *st.invalid_objects.entry(kind).or_default() += 1;
        }
        st.observe_sync(started.elapsed());
    }
}

fn sync_links(dp: &mut Datapath, attacher: &mut Attacher, prefix: &str) {
    let present = match interfaces_with_prefix(prefix) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("{e:#}");
            return;
        }
    };
    for ifname in &present {
        if !attacher.attached().contains(ifname) {
            match attacher.attach(dp, ifname) {
                Ok(()) => tracing::info!(interface = %ifname, "programs attached"),
                Err(e) => tracing::warn!(interface = %ifname, "attach failed: {e:#}"),
            }
        }
    }
    attacher.prune(&present);
}
