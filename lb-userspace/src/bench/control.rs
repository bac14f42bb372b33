//! The control path: how long a new agent takes to program a cluster of
//! many Services (its initial sync), how long one endpoint change takes
//! from the API write to the map, and the agent's peak memory.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::e2e::wait_programmed;
use crate::{
    datapath::Maps,
    lab::{kinds::Kind, Lab, LabConfig},
    plan::service_key,
};

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub services: usize,
    pub endpoints: usize,
    /// Initial syncs, each by a new agent in a new lab.
    pub syncs: usize,
    /// Endpoint changes timed after the last sync.
    pub changes: usize,
    /// Then this many changes written at once, timed together.
    pub burst: usize,
    /// The NetworkPolicy side, in a lab of its own.
    pub policy: super::policy::Settings,
    /// Then lb alone (one sync, the changes and the burst) at this many
    /// Services: the nftables shape's load grows with the square of the
    /// Services on this kernel (see `run`), hours at 100,000.
    pub large: Option<usize>,
    /// lb's side alone, at `services` (no nftables peer, no policy part,
    /// no large run): to profile the agent.
    pub lb_only: bool,
}

#[derive(Debug, Default)]
pub struct Results {
    pub services: usize,
    pub endpoints: usize,
    pub sync: Vec<Duration>,
    /// The agent's peak resident memory (VmHWM) after each sync, MiB.
    pub peak_mib: Vec<f64>,
    /// Every change's API write to map update.
    pub propagation: Vec<Duration>,
    /// From the first write of the burst until its last change is in the
    /// map.
    pub burst: Option<Duration>,
    /// Changes in the burst (at most one per Service).
    pub burst_len: usize,
    /// Peak memory at the very end (after the changes), MiB.
    pub final_peak_mib: f64,
    /// The same cluster and changes as kube-proxy's nftables rules.
    pub nft: super::nft_control::Results,
    pub policy: super::policy::Results,
    /// lb alone at `Settings::large` Services.
    pub large: Option<Box<Results>>,
    /// What the agent's service side keeps, counted in this process
    /// (`agent::retained`), at `services` and at `large` Services.
    pub retained: Vec<crate::agent::retained::Retained>,
}

/// Endpoint `e` of Service `i`: unrouted addresses, no pod behind them
/// (only the maps are looked at).
pub(crate) fn endpoint_ip(i: usize, e: usize, per: usize) -> Ipv4Addr {
    let n = (i * per + e) as u32;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + n)
}

fn slice(i: usize, endpoints: usize, per: usize) -> serde_json::Value {
    let name = format!("svc-{i}");
    let eps: Vec<_> = (0..endpoints)
        .map(|e| json!({"addresses": [endpoint_ip(i, e, per).to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({"metadata": {"name": format!("{name}-1"), "namespace": "default",
                        "labels": {"kubernetes.io/service-name": name}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": eps})
}

/// Runs the control-path bench in labs named `prefix`, one after another.
pub async fn run(s: &Settings, prefix: &str, lb_binary: &std::path::Path) -> Result<Results> {
    // First, while no lab runs: the allocator's counters are the process's.
    let mut retained = Vec::new();
    for services in std::iter::once(s.services).chain(s.large) {
        eprintln!("bench: the agent's memory, counted, at {services} Services");
        retained.push(crate::agent::retained::measure(
            services,
            s.endpoints,
            s.changes,
        )?);
    }
    let mut out = lb_side(s, prefix, lb_binary).await?;
    out.retained = retained;
    if s.lb_only {
        return Ok(out);
    }
    out.nft = super::nft_control::run(
        &format!("{prefix}-nft"),
        (s.services, s.endpoints),
        // One full load: on this kernel each of its anonymous sets (one per
        // Service's numgen vmap) is named by a scan of every set in the
        // table, and 10,000 Services took 160 to 365 s per load.
        (1, s.changes, out.burst_len),
    )?;
    out.policy = policy_part(s, prefix, lb_binary).await?;
    if let Some(services) = s.large {
        let large = Settings {
            services,
            syncs: 1,
            ..*s
        };
        out.large = Some(Box::new(lb_side(&large, prefix, lb_binary).await?));
    }
    Ok(out)
}

/// Agent arguments that size the service maps for `services` Services of
/// `endpoints` endpoints (the defaults hold 262,144 entries each: about
/// 23,000 such Services), with room for the lab's own.
fn map_size_args(services: usize, endpoints: usize) -> Vec<String> {
    let entries = |n: usize| ((n + 1_000) as u32).next_power_of_two().max(262_144);
    vec![
        "--services-map-max".into(),
        entries(services * (endpoints + 1)).to_string(),
        "--backends-map-max".into(),
        entries(services * endpoints).to_string(),
    ]
}

/// lb's side: `s.syncs` initial syncs, each by a new agent in a new lab,
/// then the changes and the burst on the last.
async fn lb_side(s: &Settings, prefix: &str, lb_binary: &std::path::Path) -> Result<Results> {
    let mut out = Results {
        services: s.services,
        endpoints: s.endpoints,
        ..Default::default()
    };
    for rep in 0..s.syncs {
        let mut cfg = LabConfig::new(prefix, lb_binary);
        cfg.agents = false;
        cfg.agent_args = map_size_args(s.services, s.endpoints);
        let mut lab = Lab::up(cfg).await?;
        // The cluster DNS pod ready first, so that its Service's counts
        // are settled when the agent's are read.
        lab.wait_pods_ready(Duration::from_secs(120)).await?;
        for i in 0..s.services {
            let name = format!("svc-{i}");
            lab.store
                .create(
                    Kind::Service,
                    json!({"metadata": {"name": name, "namespace": "default"},
                           "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
                )
                .context("creating a Service")?;
            lab.store
                .create(Kind::EndpointSlice, slice(i, s.endpoints, s.endpoints))
                .context("creating an EndpointSlice")?;
        }
        wait_dns_settled(&lab, s.services)?;
        let started = Instant::now();
        lab.start_agent(1)?;
        wait_programmed(
            &lab,
            s.services as f64,
            Some((s.services * s.endpoints) as f64),
            Duration::from_secs(900),
        )?;
        let took = started.elapsed();
        print_start_log(&lab);
        let pid = lab.agent_pid(1).context("the agent's pid")?;
        let peak = peak_mib(pid);
        eprintln!(
            "bench: {} Services, initial sync {} of {}: {took:.1?}, agent peak {peak:.0} MiB",
            s.services,
            rep + 1,
            s.syncs
        );
        out.sync.push(took);
        out.peak_mib.push(peak);
        if rep + 1 == s.syncs {
            out.propagation = propagation(&lab, s)?;
            out.burst_len = s.burst.min(s.services);
            out.burst = Some(burst(&lab, s, out.burst_len)?);
            out.final_peak_mib = peak_mib(pid);
        }
    }
    Ok(out)
}

/// Waits until the lab's cluster DNS answers for the last Service created:
/// it has taken in every object written, and goes quiet. The agent's start
/// is timed on a node where nothing else is catching up (the DNS pod, which
/// watches every Service and EndpointSlice, took a tenth of a core through
/// the agent's first half second otherwise).
fn wait_dns_settled(lab: &Lab, services: usize) -> Result<()> {
    let (pods, _) = lab.store.list(Kind::Pod, Some("kube-system"));
    let pod = pods
        .into_iter()
        .find(crate::lab::cluster_dns::is_dns_pod)
        .context("the lab has no cluster DNS pod")?;
    let netns = crate::lab::pod_netns(&pod)?;
    let name = format!(
        "svc-{}.default.svc.cluster.local.",
        services.saturating_sub(1)
    );
    let started = Instant::now();
    while !crate::lab::cluster_dns::answers(&netns, &name, Duration::from_millis(200))? {
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the lab's cluster DNS does not answer {name} after 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Many pods and policies, a new agent's first programming of them, and
/// pod relabels (`super::policy`).
async fn policy_part(
    s: &Settings,
    prefix: &str,
    lb_binary: &std::path::Path,
) -> Result<super::policy::Results> {
    let mut cfg = LabConfig::new(prefix, lb_binary);
    cfg.agents = false;
    let mut lab = Lab::up(cfg).await?;
    super::policy::create(&lab, &s.policy)?;
    let started = Instant::now();
    lab.start_agent(1)?;
    let r = super::policy::run(&lab, &s.policy, started)?;
    print_start_log(&lab);
    eprintln!(
        "bench: {} pods and {} policies programmed in {:.1?}; {} relabels",
        r.pods,
        r.policies,
        r.sync,
        r.relabel.len()
    );
    Ok(r)
}

/// Where the agent's start went: its log lines that say (data path
/// loaded, caches synced, the first passes).
fn print_start_log(lab: &Lab) {
    let log = std::fs::read_to_string(lab.log_path("agent-node-1")).unwrap_or_default();
    let said = log
        .lines()
        .filter(|l| l.contains("at_ms") || l.contains("rss_mib"))
        .take(8);
    for line in said {
        eprintln!("  agent: {line}");
    }
}

/// The Service the `k`th single change flips (spread over the cluster).
pub(crate) fn changed_service(k: usize, services: usize) -> usize {
    (k * 7919) % services
}

/// The Service the `k`th change of the burst flips: distinct for `k` below
/// `services` (7919 is prime).
pub(super) fn burst_service(k: usize, services: usize) -> usize {
    (k * 7919 + 5003) % services
}

/// What a change makes of a Service's `now` endpoints, of `endpoints` in
/// all: one fewer when it has them all, all of them back otherwise.
pub(crate) fn flipped_count(now: usize, endpoints: usize) -> usize {
    if now == endpoints {
        endpoints - 1
    } else {
        endpoints
    }
}

/// A change written: the Service's map key and the backend count it will
/// have.
struct Written {
    i: usize,
    key: lb_common::service::ServiceKey,
    want: usize,
    was: usize,
}

/// Takes an endpoint away from Service `i` (or gives it back) through the
/// API.
fn flip(lab: &Lab, maps: &Maps, i: usize, s: &Settings) -> Result<Written> {
    let svc = lab
        .store
        .get(Kind::Service, "default", &format!("svc-{i}"))?;
    let vip: Ipv4Addr = svc["spec"]["clusterIP"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .context("clusterIP")?;
    let key = service_key(vip, 80, lb_common::PROTO_TCP, 0);
    let was = maps.services.get(&key, 0)?.count as usize;
    let want = flipped_count(was, s.endpoints);
    let mut obj = slice(i, want, s.endpoints);
    let current = lab
        .store
        .get(Kind::EndpointSlice, "default", &format!("svc-{i}-1"))?;
    obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
    lab.store.replace(Kind::EndpointSlice, obj)?;
    Ok(Written { i, key, want, was })
}

/// Waits until the map has what `w` wrote, polling every 0.2 ms; at most
/// 30 s after `started`.
fn wait_in_map(lab: &Lab, maps: &Maps, w: &Written, started: Instant) -> Result<()> {
    loop {
        if maps.services.get(&w.key, 0).ok().map(|v| v.count as usize) == Some(w.want) {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            let log = std::fs::read_to_string(lab.log_path("agent-node-1")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            bail!(
                "svc-{}: still {} backends 30 s after the change; the agent's log ends:\n{}",
                w.i,
                w.was,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// `s.changes` changes, one at a time on different Services, each timed
/// from the write until that Service's entry in the node's map has the new
/// count.
fn propagation(lab: &Lab, s: &Settings) -> Result<Vec<Duration>> {
    let maps = Maps::open_pinned(&lab.pin_dir(1))?;
    let mut took = Vec::with_capacity(s.changes);
    for k in 0..s.changes {
        let started = Instant::now();
        let w = flip(lab, &maps, changed_service(k, s.services), s)?;
        wait_in_map(lab, &maps, &w, started)?;
        took.push(started.elapsed());
    }
    Ok(took)
}

/// `n` changes on as many Services written at once, timed from the first
/// write until the last of them is in the map.
fn burst(lab: &Lab, s: &Settings, n: usize) -> Result<Duration> {
    let maps = Maps::open_pinned(&lab.pin_dir(1))?;
    let started = Instant::now();
    let written = (0..n)
        .map(|k| flip(lab, &maps, burst_service(k, s.services), s))
        .collect::<Result<Vec<_>>>()?;
    for w in &written {
        wait_in_map(lab, &maps, w, started)?;
    }
    Ok(started.elapsed())
}

/// Peak resident memory of process `pid`, MiB.
pub fn peak_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}
