//! Churn in the lab: clients that open a new TCP connection per request,
//! without pause, through a NodePort from outside the cluster and through a
//! ClusterIP from a pod, translated by lb's data path, by rules shaped like
//! kube-proxy's iptables mode (Linux conntrack does the NAT), and not at
//! all (straight to the pods: the floor). Two labs of two nodes run side by
//! side: one with the agents, one without them where each node's nat table
//! holds the kube-proxy-shaped rules. The modes run one after another in
//! one run, so ratios are taken within it.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path as FsPath,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    client::{self, quantile, Churn, Rate},
    e2e,
    kube_proxy::{self, ServicePort},
    prog_stats::{self, ProgramCost},
};
use crate::lab::{manifests, net, Lab, LabConfig};

const WORKLOAD: &str = include_str!("churn.yaml");
const NODES: usize = 2;
/// The Deployment's replicas in [`WORKLOAD`].
const ECHO_PODS: usize = 8;
const CLUSTER_IP_PORT: &str = "default/web:http";
const NODE_PORT_PORT: &str = "default/web-np:http";
/// The NodePort path's client addresses: 172.18.0.101 and on, on the
/// outside namespace's eth0 (beside its own .100, above the nodes' .11-.18).
const FIRST_SOURCE: u8 = 101;
const MAX_SOURCES: usize = 100;

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// How long each mode runs on each path.
    pub duration: Duration,
    /// NodePort path: clients outside, each from an address of its own.
    pub sources: usize,
    /// ClusterIP path: clients in the client pod (its one address).
    pub workers: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// From the outside namespace to node 1 and node 2 in turn,
    /// externalTrafficPolicy Cluster.
    NodePort,
    /// From a client pod on node 1.
    ClusterIp,
}

impl Path {
    pub const ALL: [Path; 2] = [Path::NodePort, Path::ClusterIp];

    pub fn name(self) -> &'static str {
        match self {
            Path::NodePort => {
                "NodePort from outside (node 1 and node 2 in turn, externalTrafficPolicy Cluster)"
            }
            Path::ClusterIp => "ClusterIP from a client pod",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Lb,
    Iptables,
    /// Straight to the pods' addresses, nothing translated.
    Floor,
}

impl Mode {
    /// In the report's order.
    pub const ALL: [Mode; 3] = [Mode::Lb, Mode::Iptables, Mode::Floor];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Lb => "lb",
            Mode::Iptables => "iptables (kube-proxy's shape)",
            Mode::Floor => "pod to pod (floor)",
        }
    }
}

/// One mode on one path.
#[derive(Clone, Debug)]
pub struct Row {
    pub path: Path,
    pub mode: Mode,
    /// Answered and failed.
    pub requests: usize,
    pub failures: usize,
    /// The first few failures, as the client saw them.
    pub first_failures: Vec<String>,
    /// TcpExtTCPSynRetrans of the client's namespace over the run.
    pub syn_retransmissions: u64,
    /// Answered requests per second.
    pub rps: f64,
    /// Connect to the answer's end, p50 and p99, of answered requests.
    pub request_ms: [f64; 2],
    /// lb's programs over a second, shorter run, as the kernel timed them
    /// (lb only), and the requests sent meanwhile.
    pub programs: Vec<ProgramCost>,
    pub timed_requests: usize,
}

#[derive(Debug, Default)]
pub struct Results {
    pub rows: Vec<Row>,
    /// The cores the labs, the clients and the servers shared.
    pub cores: usize,
    /// Linux conntrack's capacity (nf_conntrack_max), for the iptables shape.
    pub conntrack_max: Option<u64>,
}

/// What one measurement runs: churn clients in `netns`, one per source,
/// going round `targets`; before it, each target must answer from
/// `spread` different pods.
struct Run {
    path: Path,
    mode: Mode,
    netns: String,
    sources: Vec<Option<Ipv4Addr>>,
    targets: Vec<SocketAddr>,
    spread: usize,
}

/// Runs the churn bench with labs `agent_lab` and `rules_lab`, both removed
/// afterwards.
pub async fn run(
    s: &Settings,
    agent_lab: &str,
    rules_lab: &str,
    lb_binary: &FsPath,
) -> Result<Results> {
    if !(1..=MAX_SOURCES).contains(&s.sources) || s.workers == 0 {
        bail!(
            "churn wants 1 to {MAX_SOURCES} client addresses and at least one worker, not {} and {}",
            s.sources,
            s.workers
        );
    }
    let with_agent = churn_lab(agent_lab, lb_binary, true).await?;
    let with_rules = churn_lab(rules_lab, lb_binary, false).await?;
    load_kube_proxy_rules(&with_rules)?;
    let sources = source_addresses(s.sources);
    for lab in [&with_agent, &with_rules] {
        add_addresses(&lab.ext_netns(), &sources)?;
    }
    // Only where the NodePort floor runs: the lb lab's outside namespace
    // stays as a cluster's outside clients have it, knowing no pod.
    route_pods_from(&with_rules.ext_netns())?;
    let runs = plan_runs(s, &with_agent, &with_rules, &sources)?;
    for r in &runs {
        wait_answering(r, Duration::from_secs(60))
            .with_context(|| format!("{}, {}", r.path.name(), r.mode.name()))?;
    }
    let mut out = Results {
        rows: Vec::new(),
        cores: std::thread::available_parallelism().map_or(0, usize::from),
        conntrack_max: conntrack_max(&with_rules.node_netns(1)),
    };
    for r in &runs {
        // The floor runs through the rules lab's nodes, whose conntrack
        // tracks it too (nat rules are loaded there): without a flush the
        // iptables shape would start on a table the floor filled.
        flush_conntrack(&with_rules)?;
        eprintln!(
            "bench: churn, {}, {}, {:?}",
            r.path.name(),
            r.mode.name(),
            s.duration
        );
        let row = measure_timed(r, s.duration)
            .with_context(|| format!("{}, {}", r.path.name(), r.mode.name()))?;
        eprintln!(
            "       {:.0} req/s, {} of {} failed, {} SYN retransmissions, p50 {:.2} ms, p99 {:.2} ms",
            row.rps,
            row.failures,
            row.requests,
            row.syn_retransmissions,
            row.request_ms[0],
            row.request_ms[1]
        );
        out.rows.push(row);
    }
    Ok(out)
}

/// A lab of two nodes with the churn workload, its pods ready.
async fn churn_lab(prefix: &str, lb_binary: &FsPath, agents: bool) -> Result<Lab> {
    let mut cfg = LabConfig::new(prefix, lb_binary);
    cfg.nodes = NODES;
    cfg.agents = agents;
    let lab = Lab::up(cfg).await?;
    manifests::apply(
        &lab.store,
        manifests::parse(WORKLOAD, "churn bench workload", false)?,
    )?;
    lab.wait_pods_ready(Duration::from_secs(120)).await?;
    Ok(lab)
}

/// Service port `name` of the lab, with all the echo pods as endpoints.
fn service_port(lab: &Lab, name: &str) -> Result<ServicePort> {
    let sp = e2e::service_ports(lab)
        .into_iter()
        .find(|p| p.name == name)
        .with_context(|| format!("no Service port {name}"))?;
    if sp.endpoints.len() != ECHO_PODS {
        bail!(
            "{name} has {} ready endpoints, want {ECHO_PODS}",
            sp.endpoints.len()
        );
    }
    Ok(sp)
}

/// The node port the lab gave Service `web-np`.
fn node_port(lab: &Lab) -> Result<u16> {
    let svc = lab
        .store
        .get(crate::lab::kinds::Kind::Service, "default", "web-np")?;
    svc["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .context("Service web-np has no nodePort")
}

/// The whole kube-proxy-shaped nat table, the same on every node (as
/// kube-proxy writes it on each): the ClusterIP Services and the NodePort.
fn load_kube_proxy_rules(lab: &Lab) -> Result<()> {
    let ports = e2e::service_ports(lab);
    let np = service_port(lab, NODE_PORT_PORT)?;
    let text = kube_proxy::iptables_restore_with_node_ports(&ports, &[(&np, node_port(lab)?)]);
    for i in 1..=NODES {
        e2e::load(&lab.node_netns(i), "iptables-restore", &[], &text)
            .with_context(|| format!("loading the rules into node {i}"))?;
    }
    Ok(())
}

fn source_addresses(n: usize) -> Vec<Ipv4Addr> {
    (0..n)
        .map(|i| Ipv4Addr::new(172, 18, 0, FIRST_SOURCE + i as u8))
        .collect()
}

/// Puts `addrs` on namespace `netns`'s eth0, beside its own address.
fn add_addresses(netns: &str, addrs: &[Ipv4Addr]) -> Result<()> {
    for a in addrs {
        let addr = format!("{a}/24");
        ip(&["-n", netns, "addr", "add", &addr, "dev", "eth0"])?;
    }
    Ok(())
}

/// Routes namespace `netns` to each node's pods through that node, for the
/// NodePort floor: outside straight to a pod, through the pod's node as a
/// translated flow goes (or through the other node first).
fn route_pods_from(netns: &str) -> Result<()> {
    for i in 1..=NODES {
        let (cidr, len) = net::pod_cidr(i);
        let (to, via) = (format!("{cidr}/{len}"), net::node_ip(i).to_string());
        ip(&["-n", netns, "route", "add", &to, "via", &via])?;
    }
    Ok(())
}

/// Empties Linux conntrack in each node of `lab` (`conntrack -F`, from
/// the package conntrack, which `cargo xtask setup` installs).
fn flush_conntrack(lab: &Lab) -> Result<()> {
    for i in 1..=NODES {
        ip(&["netns", "exec", &lab.node_netns(i), "conntrack", "-F"])?;
    }
    Ok(())
}

/// Runs `ip args`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// What a run's clients go round.
#[derive(Clone, Copy)]
enum Targets {
    /// The echo pods' own addresses.
    Pods,
    /// Node 1's and node 2's address on the node port.
    NodePorts,
    ClusterIp,
}

fn targets(lab: &Lab, t: Targets) -> Result<Vec<SocketAddr>> {
    Ok(match t {
        Targets::Pods => service_port(lab, CLUSTER_IP_PORT)?
            .endpoints
            .into_iter()
            .map(SocketAddr::V4)
            .collect(),
        Targets::NodePorts => {
            let port = node_port(lab)?;
            (1..=NODES)
                .map(|i| SocketAddr::V4(SocketAddrV4::new(net::node_ip(i), port)))
                .collect()
        }
        Targets::ClusterIp => {
            let sp = service_port(lab, CLUSTER_IP_PORT)?;
            vec![SocketAddr::V4(SocketAddrV4::new(sp.cluster_ip, sp.port))]
        }
    })
}

/// Every measurement, in the order run: per path the floor, the rules,
/// lb. Clients outside (no pod in the plan) run one per address of
/// `sources`; clients in a pod, `s.workers` of them.
fn plan_runs(
    s: &Settings,
    with_agent: &Lab,
    with_rules: &Lab,
    sources: &[Ipv4Addr],
) -> Result<Vec<Run>> {
    use Targets::*;
    let outside: Vec<Option<Ipv4Addr>> = sources.iter().copied().map(Some).collect();
    let in_pod = vec![None; s.workers];
    let plan: [(Path, Mode, &Lab, Option<&str>, Targets); 6] = [
        (Path::NodePort, Mode::Floor, with_rules, None, Pods),
        (Path::NodePort, Mode::Iptables, with_rules, None, NodePorts),
        (Path::NodePort, Mode::Lb, with_agent, None, NodePorts),
        (
            Path::ClusterIp,
            Mode::Floor,
            with_rules,
            Some("direct"),
            Pods,
        ),
        (
            Path::ClusterIp,
            Mode::Iptables,
            with_rules,
            Some("client"),
            ClusterIp,
        ),
        (
            Path::ClusterIp,
            Mode::Lb,
            with_agent,
            Some("client"),
            ClusterIp,
        ),
    ];
    plan.into_iter()
        .map(|(path, mode, lab, pod, to)| {
            let (netns, sources) = match pod {
                None => (lab.ext_netns(), outside.clone()),
                Some(pod) => (lab.pod_netns("default", pod)?, in_pod.clone()),
            };
            Ok(Run {
                path,
                mode,
                netns,
                sources,
                targets: targets(lab, to)?,
                spread: if mode == Mode::Floor { 1 } else { ECHO_PODS },
            })
        })
        .collect()
}

/// Waits until every target of `r` has answered from `r.spread` different
/// pods: the rules loaded, or the agents' programs holding every backend.
fn wait_answering(r: &Run, within: Duration) -> Result<()> {
    let started = Instant::now();
    for &addr in &r.targets {
        let mut answered: BTreeSet<String> = BTreeSet::new();
        let mut last_error = None;
        while answered.len() < r.spread {
            if started.elapsed() > within {
                bail!(
                    "after {within:?}, {addr} answered from {answered:?} (want {} pods), last error: {last_error:?}",
                    r.spread
                );
            }
            match crate::echo::http_get_in(&r.netns, addr, Duration::from_secs(2)) {
                Ok(pod) => {
                    answered.insert(pod);
                }
                Err(e) => {
                    last_error = Some(format!("{e:#}"));
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
    Ok(())
}

/// `measure`, and for lb then a shorter run with the kernel timing its
/// programs: the timing costs two clock reads per run of a program, which
/// would lower lb's rate beside the others'.
fn measure_timed(r: &Run, duration: Duration) -> Result<Row> {
    let mut row = measure(r, duration)?;
    if r.mode != Mode::Lb {
        return Ok(row);
    }
    let timed = duration / 4;
    let on = prog_stats::enable()?;
    let before = prog_stats::snapshot()?;
    let o = client::churn(
        &r.netns,
        Churn::Tcp,
        &r.sources,
        r.targets.clone(),
        (timed, Rate::Unpaced),
    )?;
    let after = prog_stats::snapshot()?;
    drop(on);
    row.programs = prog_stats::between(&before, &after);
    row.timed_requests = o.samples.len() + o.failures.len();
    // Failures of the timed run count as any other (the rate does not).
    row.requests += row.timed_requests;
    row.failures += o.failures.len();
    row.first_failures
        .extend(o.failures.iter().take(3).cloned());
    for p in &row.programs {
        eprintln!(
            "       {}: {:.1} runs per request, {:.0} ns per run",
            p.name,
            p.runs as f64 / row.timed_requests.max(1) as f64,
            p.ns_per_run()
        );
    }
    Ok(row)
}

/// Runs `r`'s clients for `duration`, counting the SYNs their namespace
/// sent again meanwhile.
fn measure(r: &Run, duration: Duration) -> Result<Row> {
    let before = syn_retransmissions(&r.netns)?;
    let o = client::churn(
        &r.netns,
        Churn::Tcp,
        &r.sources,
        r.targets.clone(),
        (duration, Rate::Unpaced),
    )?;
    let after = syn_retransmissions(&r.netns)?;
    let mut ms: Vec<f64> = o
        .samples
        .iter()
        .map(|x| x.total.as_secs_f64() * 1e3)
        .collect();
    Ok(Row {
        path: r.path,
        mode: r.mode,
        requests: o.samples.len() + o.failures.len(),
        failures: o.failures.len(),
        first_failures: o.failures.iter().take(3).cloned().collect(),
        syn_retransmissions: after.saturating_sub(before),
        rps: o.samples.len() as f64 / o.elapsed.as_secs_f64().max(1e-9),
        request_ms: [0.5, 0.99].map(|q| quantile(&mut ms, q)),
        programs: Vec::new(),
        timed_requests: 0,
    })
}

/// The SYNs sockets of namespace `netns` have sent again, so far
/// (TcpExtTCPSynRetrans, what `nstat` shows).
fn syn_retransmissions(netns: &str) -> Result<u64> {
    // A thread that entered the namespace reads it through thread-self:
    // /proc/self/net would be the process's, whose main thread stays home.
    let text = crate::netns::run_in(netns, || {
        std::fs::read_to_string("/proc/thread-self/net/netstat")
    })?
    .context("reading /proc/thread-self/net/netstat")?;
    netstat_value(&text, "TcpExt", "TCPSynRetrans")
        .with_context(|| format!("no TcpExt TCPSynRetrans in {netns}'s netstat"))
}

/// Counter `name` of group `group` in /proc/net/netstat's text: each group
/// is a line of names and a line of values, both led by "Group:".
fn netstat_value(text: &str, group: &str, name: &str) -> Option<u64> {
    let lead = format!("{group}:");
    let mut lines = text.lines().filter_map(|l| l.strip_prefix(lead.as_str()));
    let (names, values) = (lines.next()?, lines.next()?);
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
}

/// Linux conntrack's capacity, as namespace `netns` sees it (the
/// module is loaded once a nat table is).
fn conntrack_max(netns: &str) -> Option<u64> {
    crate::netns::run_in(netns, || {
        std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max").ok()
    })
    .ok()
    .flatten()?
    .trim()
    .parse()
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_netstat_counter_is_found_by_group_and_name() {
        let text = "TcpExt: SyncookiesSent TCPSynRetrans TCPTimeouts\n\
                    TcpExt: 0 17 3\n\
                    IpExt: InNoRoutes TCPSynRetrans\n\
                    IpExt: 5 99\n";
        assert_eq!(netstat_value(text, "TcpExt", "TCPSynRetrans"), Some(17));
        assert_eq!(netstat_value(text, "TcpExt", "TCPTimeouts"), Some(3));
        assert_eq!(netstat_value(text, "IpExt", "TCPSynRetrans"), Some(99));
        assert_eq!(netstat_value(text, "TcpExt", "Missing"), None);
        assert_eq!(netstat_value(text, "MPTcpExt", "TCPSynRetrans"), None);
        assert_eq!(
            netstat_value("TcpExt: TCPSynRetrans\n", "TcpExt", "TCPSynRetrans"),
            None
        );
    }

    #[test]
    fn client_addresses_sit_beside_the_outside_namespaces_own() {
        let a = source_addresses(16);
        assert_eq!(a.first(), Some(&Ipv4Addr::new(172, 18, 0, 101)));
        assert_eq!(a.last(), Some(&Ipv4Addr::new(172, 18, 0, 116)));
        let most = source_addresses(MAX_SOURCES);
        assert_eq!(most.last(), Some(&Ipv4Addr::new(172, 18, 0, 200)));
        assert!(!most.contains(&net::EXT_IP) && !most.contains(&net::node_ip(1)));
    }
}
