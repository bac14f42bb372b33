//! `lb agent`: keeps the data path's maps equal to what the Kubernetes API
//! says. Watchers (kube-rs reflectors) feed caches at the edge; on any change
//! a pure translation and a pure differ decide the map writes.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

mod cache;
mod index;
mod links;
pub mod memory;
mod policies;
#[cfg(feature = "lab")]
pub mod retained;
mod services;
mod slices;
mod slim;
mod socket_lb;
mod watch;
mod writer;

use anyhow::{Context, Result};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use k8s_openapi::Resource as _;
use kube::{runtime::reflector, Api, Client};
use tokio::sync::mpsc::UnboundedSender;

use crate::{
    datapath::{attach::Attacher, Datapath},
    translate::{NodeContext, ObjectError},
};
use index::ServiceRef;
use memory::resident_mib;
use policies::{PolicyObject, PolicySide, PolicyWork};
use services::{ServiceCache, ServiceSide, SliceCache};
use watch::Change;

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
    /// Which hook runs the uplink program (`datapath::attach::UplinkHook`).
    pub uplink_hook: crate::datapath::attach::UplinkHook,
    /// Socket LB's cgroup (`datapath::socket_lb`); none for off.
    pub socket_lb_cgroup: Option<PathBuf>,
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
    /// Entries of the maps that grow with the cluster.
    pub map_sizes: crate::datapath::MapSizes,
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
    client_for(config)
}

/// A client of the API server `config` names. An `http://` server (the
/// lab's) gets a plain HTTP stack: kube's own builds the TLS one whatever
/// the scheme, and with no cluster CA that reads and parses the machine's
/// root certificates first, 40 ms of every new agent's start for nothing.
fn client_for(config: kube::Config) -> Result<Client> {
    use kube::client::ConfigExt as _;
    if config.cluster_url.scheme_str() != Some("http") {
        return Ok(Client::try_from(config)?);
    }
    // What kube's stack keeps of a plain HTTP one: its timeouts, the
    // retries of 429, 503 and 504 (`default_retry`), the base URI (with
    // any path prefix), credentials and extra headers, in its order.
    let mut connector = hyper_timeout::TimeoutConnector::new(
        hyper_util::client::legacy::connect::HttpConnector::new(),
    );
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let http: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.default_retry.then(|| {
            tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry())
        }))
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })
        .service(http);
    Ok(Client::new(service, config.default_namespace))
}

pub use watch::WATCHED;

/// Where the agent reports objects it cannot program (kube-runtime's event
/// recorder: create, then merge-patch a repeated one).
pub const EVENTS: (&str, &str) = (
    k8s_openapi::api::events::v1::Event::GROUP,
    k8s_openapi::api::events::v1::Event::URL_PATH_SEGMENT,
);

/// The caches the watchers keep.
struct Caches {
    services: ServiceCache,
    slices: SliceCache,
    nodes: reflector::Store<Node>,
    pods: reflector::Store<Pod>,
    namespaces: reflector::Store<Namespace>,
    policies: reflector::Store<NetworkPolicy>,
}

impl Caches {
    fn watch(client: &Client, changes: &UnboundedSender<Change>) -> Self {
        let c = changes.clone();
        Self {
            services: watch::keep(Api::all(client.clone()), c.clone(), watch::service_change),
            slices: watch::keep(Api::all(client.clone()), c.clone(), watch::slice_change),
            nodes: watch::reflect(Api::all(client.clone()), c.clone(), watch::node_change),
            pods: watch::reflect(Api::all(client.clone()), c.clone(), watch::pod_change),
            namespaces: watch::reflect(
                Api::all(client.clone()),
                c.clone(),
                watch::namespace_change,
            ),
            policies: watch::reflect(Api::all(client.clone()), c, watch::network_policy_change),
        }
    }

    /// Program nothing until every cache is complete: a restart must never
    /// write a half-known cluster into the maps.
    async fn wait_until_ready(&self) -> Result<()> {
        let w = "watch ended";
        self.services.wait_until_ready().await.context(w)?;
        self.slices.wait_until_ready().await.context(w)?;
        self.nodes.wait_until_ready().await.context(w)?;
        self.pods.wait_until_ready().await.context(w)?;
        self.namespaces.wait_until_ready().await.context(w)?;
        self.policies.wait_until_ready().await.context(w)?;
        Ok(())
    }
}

/// What the next pass must do.
#[derive(Default)]
struct Work {
    /// Every Service (and read the maps back, with `read_maps`).
    full: bool,
    read_maps: bool,
    /// Read the service maps back and repair drift (the periodic resync).
    repair: bool,
    /// A Node changed: everything again if what this node programs from
    /// the Nodes (`NodeContext`) did.
    node: bool,
    services: BTreeSet<ServiceRef>,
    policy: PolicyWork,
}

impl Work {
    fn everything() -> Self {
        Self {
            full: true,
            read_maps: true,
            policy: PolicyWork {
                full: true,
                repair: true,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn any(&self) -> bool {
        self.full || self.repair || self.node || self.policy.any() || !self.services.is_empty()
    }

    fn add(&mut self, change: Change, side: &mut ServiceSide, caches: &Caches) {
        match change {
            Change::Service(ns, name) => {
                self.services.insert(ServiceRef::new(&ns, &name));
            }
            Change::Slice(ns, name) => {
                let key = (ns, name);
                let now = caches.slices.get(&key);
                self.services
                    .extend(side.slices.update(&key, now.as_deref()));
            }
            // A kubelet writes its Node's status every few seconds to
            // minutes (heartbeats, images, conditions): few of those
            // writes change an address.
            Change::Node => self.node = true,
            Change::Relisted(_) => {
                self.full = true;
                self.policy.full = true;
            }
            Change::Pod(ns, name) => {
                self.policy.objects.insert(PolicyObject::Pod(ns, name));
            }
            Change::Namespace(name) => {
                self.policy.objects.insert(PolicyObject::Namespace(name));
            }
            Change::NetworkPolicy(ns, name) => {
                self.policy
                    .objects
                    .insert(PolicyObject::NetworkPolicy(ns, name));
            }
        }
    }
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    let start = Instant::now();
    let stats = crate::metrics::Shared::new(cfg.pin_dir.clone());
    if let Some(addr) = cfg.metrics_addr {
        let stats = stats.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, stats).await {
                tracing::error!(%addr, "metrics server: {e:#}");
            }
        });
    }
    // The watchers list the cluster and the first pass fills the maps while
    // the programs load (most of a second, all in the kernel's verifier):
    // neither waits for the other. The programs are attached after that
    // pass, so that they start on complete maps.
    let client = client(cfg.kubeconfig.as_ref()).await?;
    let (changes, mut changed) = tokio::sync::mpsc::unbounded_channel();
    let caches = Caches::watch(&client, &changes);
    let mut dp = Datapath::start_load(Some(&cfg.pin_dir), cfg.bpf_log, &cfg.map_sizes)?;
    if cfg.bpf_log {
        spawn_bpf_log(&mut dp)?;
        tracing::info!("eBPF log lines on (--bpf-log): they cost per packet");
    }
    let mut attacher = Attacher::new(&cfg.pin_dir)?;
    tracing::info!(
        pin_dir = %cfg.pin_dir.display(),
        node = ?cfg.node_name,
        at_ms = start.elapsed().as_millis() as u64,
        rss_mib = resident_mib(),
        rss_peak_mib = memory::resident_peak_mib(),
        heap_mib = memory::heap_mib(),
        "maps created"
    );

    let mut events = crate::events::EventPublisher::new(client, cfg.node_name.as_deref());
    caches.wait_until_ready().await?;
    // Where the time and memory of a start go (the control bench reads it).
    tracing::info!(
        at_ms = start.elapsed().as_millis() as u64,
        rss_mib = resident_mib(),
        rss_peak_mib = memory::resident_peak_mib(),
        heap_mib = memory::heap_mib(),
        "caches synced"
    );
    if cfg.node_name.is_none() {
        tracing::warn!(
            "no --node-name (NODE_NAME): NodePorts and node-local endpoints are not programmed"
        );
    }

    let mut side = ServiceSide::new(cfg.map_sizes.capacity());
    let mut policy = PolicySide::default();
    let mut logged_errors = BTreeSet::new();
    // The first pass below reads the maps and programs everything: the
    // periodic work starts one period after it, not at once beside it.
    let after =
        |period: Duration| tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut resync = after(cfg.resync);
    let mut link_events = links::LinkEvents::subscribe()?;
    let mut attached = false;
    let mut link_poll = tokio::time::interval(Duration::from_secs(1));
    let mut ct_sweep = after(cfg.ct_sweep);
    let mut health = crate::health::HealthServers::default();
    let mut work = Work::everything();
    let mut node = node_context(cfg.node_name.as_ref(), &caches.nodes);
    loop {
        if work.any() {
            let started = Instant::now();
            // Only a Node event (or a relist) can change what the Nodes
            // say: the walk over them is not every pass's.
            if work.node || work.full {
                let now = node_context(cfg.node_name.as_ref(), &caches.nodes);
                if now != node {
                    work.full = true;
                    work.policy.full = true;
                    node = now;
                }
            }
            if work.policy.any() {
                policy.pass(&mut dp, &caches, &node, &work.policy, &stats);
            }
            let services_changed = work.full || work.repair || !work.services.is_empty();
            if services_changed {
                let gone = service_pass(&mut dp, &mut side, &caches, &node, &work, &stats);
                socket_lb::close_sockets_to(&cfg, gone);
                health.sync(&side.health_checks()).await;
            }
            let errors: Vec<&ObjectError> = side.errors().chain(&policy.errors).collect();
            report_errors(&errors, &mut logged_errors, &mut events, &stats);
            let mut st = stats.lock();
            st.map_full = side.map_full();
            st.observe_sync(started.elapsed());
            work = Work::default();
        }
        if !attached {
            // After the first pass, whose maps the programs start on.
            attach_programs(&mut dp, &mut attacher, &cfg)?;
            stats.lock().attached = true;
            tracing::info!(
                at_ms = start.elapsed().as_millis() as u64,
                "programs loaded and attached"
            );
            attached = true;
        }
        tokio::select! {
            Some(change) = changed.recv() => {
                work.add(change, &mut side, &caches);
                // Whatever else is queued goes into the same pass.
                while let Ok(change) = changed.try_recv() {
                    work.add(change, &mut side, &caches);
                }
            }
            _ = resync.tick() => {
                // The policy pass compares the policy maps with what it wants.
                work.repair = true;
                work.policy.repair = true;
                if !side.written_known() {
                    // A pass failed: program everything again.
                    work = Work::everything();
                }
            }
            _ = link_events.changed() => {
                links::sync_links(&mut dp, &mut attacher, &cfg.interface_prefix);
            }
            _ = link_poll.tick() => {
                stats.lock().alive();
                links::sync_links(&mut dp, &mut attacher, &cfg.interface_prefix);
            }
            _ = ct_sweep.tick() => sweep_conntrack(&mut dp, &cfg, &stats),
        }
    }
}

/// Waits for the programs (`Datapath::start_load`) and attaches them: the
/// uplink's, the socket LB's (or takes it off), and every pod veth's; then
/// loads the rest.
fn attach_programs(dp: &mut Datapath, attacher: &mut Attacher, cfg: &AgentConfig) -> Result<()> {
    dp.wait_programs()?;
    if let Some(uplink) = &cfg.uplink {
        attach_uplink(dp, cfg, uplink);
    }
    socket_lb::attach_or_detach(dp, cfg)?;
    links::sync_links(dp, attacher, &cfg.interface_prefix);
    dp.load_rest_in_background()
}

/// Removes idle conntrack entries; their summary goes to `/metrics`.
fn sweep_conntrack(dp: &mut Datapath, cfg: &AgentConfig, stats: &crate::metrics::Shared) {
    match crate::conntrack::sweep(dp, &cfg.ct_timeouts) {
        Ok((summary, swept)) => {
            tracing::debug!(
                live = summary.total(),
                removed = swept.removed,
                kept = swept.kept,
                "conntrack sweep"
            );
            crate::conntrack::warn_if_filling(&summary, cfg.map_sizes.conntrack);
            stats.lock().conntrack = Some(summary);
        }
        Err(e) => tracing::warn!("conntrack sweep: {e:#}"),
    }
}

/// The uplink program on the node's uplink (NodePorts and LoadBalancer
/// addresses from outside); without it the rest still works.
fn attach_uplink(dp: &mut Datapath, cfg: &AgentConfig, uplink: &str) {
    let links = cfg.pin_dir.join("uplink");
    let attached = crate::datapath::attach::attach_uplink(
        dp,
        &links,
        uplink,
        cfg.uplink_hook,
        &cfg.proc_sys_net,
    );
    match attached {
        Ok(hook) => {
            tracing::info!(interface = %uplink, hook = hook.name(), "uplink program attached")
        }
        Err(e) => tracing::error!(
            interface = %uplink,
            "uplink program not attached, no NodePort from outside: {e:#}"
        ),
    }
}

/// Objects that could not be programmed: a log line for each new one, a
/// Warning Event on each, and counts by kind.
fn report_errors(
    errors: &[&ObjectError],
    logged: &mut BTreeSet<String>,
    events: &mut crate::events::EventPublisher,
    stats: &crate::metrics::Shared,
) {
    let shown: BTreeSet<String> = errors
        .iter()
        .map(|e| format!("{}: {}", e.object, e.message))
        .collect();
    for e in shown.difference(logged) {
        tracing::warn!("skipped: {e}");
    }
    *logged = shown;
    events.sync(errors);
    let mut st = stats.lock();
    st.invalid_objects.clear();
    for e in errors {
        let kind = e.object.split(' ').next().unwrap_or_default().to_string();
        *st.invalid_objects.entry(kind).or_default() += 1;
    }
}

/// Writes the service maps: the changed Services, or all of them.
/// Returns the backends it removed.
fn service_pass(
    dp: &mut Datapath,
    side: &mut ServiceSide,
    caches: &Caches,
    node: &NodeContext,
    work: &Work,
    stats: &crate::metrics::Shared,
) -> Vec<crate::translate::BackendAddr> {
    let started = Instant::now();
    if work.full {
        if let Err(e) = dp.maps.set_node(node.addrs.first().copied()) {
            tracing::error!("writing the node map: {e:#}");
        }
    }
    let (svcs, slices) = (&caches.services, &caches.slices);
    let result = if work.full {
        side.full_pass(dp, svcs, slices, node, work.read_maps)
    } else {
        let mut r = Ok(Default::default());
        if !work.services.is_empty() {
            r = side
                .reconcile(dp, svcs, slices, node, &work.services)
                .or_else(|e| {
                    tracing::warn!("updating maps: {e:#}; reading them back");
                    side.distrust_written();
                    side.full_pass(dp, svcs, slices, node, true)
                });
        }
        if work.repair {
            r = r.and_then(|_| side.repair(dp));
        }
        r
    };
    let mut st = stats.lock();
    match result {
        Ok(w) => {
            if w.drift > 0 {
                tracing::warn!(writes = w.drift, "service maps had drifted; repaired");
                st.drift_repairs += w.drift as u64;
            } else if w.ops > 0 {
                tracing::info!(
                    ops = w.ops,
                    frontends = w.frontends,
                    backends = w.backends,
                    services = if work.full { 0 } else { work.services.len() },
                    took_ms = started.elapsed().as_millis() as u64,
                    rss_mib = resident_mib(),
                    "maps updated"
                );
            }
            if work.full {
                // A full pass builds the whole desired state beside the
                // written one, and frees it.
                memory::hand_back();
                tracing::info!(
                    rss_mib = resident_mib(),
                    heap_mib = memory::heap_mib(),
                    "freed memory handed back"
                );
            }
            st.services = w.frontends;
            st.backends = w.backends;
            st.programmed = true;
            w.gone_backends
        }
        Err(e) => {
            st.error("map_write");
            side.distrust_written();
            tracing::error!("updating maps: {e:#}");
            Vec::new()
        }
    }
}
