//! End to end in the lab: new TCP connections from a client pod through a
//! ClusterIP, translated by lb's data path, by rules shaped like
//! kube-proxy's iptables and nftables modes, and not at all (straight to a
//! pod: the floor), and by lb's socket LB (a client process in the pod's
//! cgroup, its connect() translated). Two labs run side by side: one with
//! the agent (socket LB on, for that client's cgroup only), one
//! without it where both rule sets are loaded, each taken only by its own
//! client pod (matched by source address). Every
//! repetition measures every mode back to back, so ratios are taken within
//! one repetition.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::{
    client::{self, quantile, Outcome},
    kube_proxy::{self, ServicePort},
};
use crate::{
    lab::{self, kinds::Kind, manifests, Lab, LabConfig},
    netns,
};

const WORKLOAD: &str = include_str!("workload.yaml");

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub service_counts: &'static [usize],
    pub repeats: usize,
    /// Requests one after another, per mode and repetition: the latencies.
    pub sequential: usize,
    /// Concurrent clients and how long they run: requests per second.
    pub workers: usize,
    pub duration: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Straight to a pod's address, no rules and no programs: the floor.
    Floor,
    Iptables,
    Nftables,
    /// Straight to a pod's address in the lab with lb's programs attached.
    LbPodToPod,
    Lb,
    /// lb translating at connect() (socket LB), from a client process in
    /// the pod's cgroup.
    LbSocket,
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Mode::Floor,
        Mode::Iptables,
        Mode::Nftables,
        Mode::LbPodToPod,
        Mode::Lb,
        Mode::LbSocket,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Floor => "pod to pod (floor)",
            Mode::Iptables => "ClusterIP, iptables (kube-proxy's shape)",
            Mode::Nftables => "ClusterIP, nftables (kube-proxy's shape)",
            Mode::LbPodToPod => "pod to pod, lb's programs attached",
            Mode::Lb => "ClusterIP, lb",
            Mode::LbSocket => "ClusterIP, lb with socket LB",
        }
    }
}

/// One mode's figures in one repetition (microseconds, requests/s).
#[derive(Clone, Copy, Debug, Default)]
pub struct Figures {
    /// Connect (first packet) p1, p50, p90, p99.
    pub first_packet: [f64; 4],
    /// Connect, request and answer p50, p99.
    pub request: [f64; 2],
    pub rps: f64,
}

/// A mode at a Service count: its figures per repetition.
#[derive(Clone, Debug)]
pub struct Row {
    pub mode: Mode,
    pub services: usize,
    pub reps: Vec<Figures>,
    pub requests: usize,
    pub failures: usize,
}

/// How long bringing each translation up to a Service count took.
#[derive(Clone, Copy, Debug)]
pub struct Programming {
    pub services: usize,
    /// From the last API write to the agent reporting all programmed.
    pub lb: Duration,
    /// iptables-restore of the whole nat table, `nft -f` of the table.
    pub iptables: Duration,
    pub nftables: Duration,
}

#[derive(Debug, Default)]
pub struct Results {
    pub rows: Vec<Row>,
    pub programming: Vec<Programming>,
}

/// Runs the end-to-end bench with labs `agent_lab` and `rules_lab`, both
/// removed afterwards.
pub async fn run(
    s: &Settings,
    agent_lab: &str,
    rules_lab: &str,
    lb_binary: &std::path::Path,
) -> Result<Results> {
    let with_agent = workload_lab(agent_lab, lb_binary, true, true).await?;
    let with_rules = workload_lab(rules_lab, lb_binary, false, false).await?;
    let rules_node = with_rules.node_netns(1);
    let echo_lb = echo_pods(&with_agent)?;
    let echo_rules = echo_pods(&with_rules)?;
    let mut out = Results::default();
    let mut have = 1; // Service `web`
    for &n in s.service_counts {
        eprintln!("bench: end to end with {n} Services");
        let (base_s, _) = programmed(&with_agent)?;
        add_fillers(&with_agent, have, n, &echo_lb)?;
        add_fillers(&with_rules, have, n, &echo_rules)?;
        let added = n.saturating_sub(have) as f64;
        let started = Instant::now();
        wait_programmed_in_all(&with_agent, base_s + added, None, Duration::from_secs(600))?;
        let lb_took = started.elapsed();
        have = have.max(n);
        let (iptables, nftables) = load_rules(
            &rules_node,
            &service_ports(&with_rules),
            pod_ip(&with_rules, "client")?,
            pod_ip(&with_rules, "client-2")?,
        )?;
        eprintln!(
            "       programmed: lb {lb_took:.1?} after the last write, iptables-restore {iptables:.1?}, nft -f {nftables:.1?}"
        );
        out.programming.push(Programming {
            services: n,
            lb: lb_took,
            iptables,
            nftables,
        });

        let vips = |lab: &Lab| -> Vec<SocketAddr> {
            service_ports(lab)
                .iter()
                .map(|p| SocketAddr::V4(SocketAddrV4::new(p.cluster_ip, p.port)))
                .collect()
        };
        let pods = |ips: &[Ipv4Addr]| -> Vec<SocketAddr> {
            ips.iter()
                .map(|ip| SocketAddr::V4(SocketAddrV4::new(*ip, 8080)))
                .collect()
        };
        let thread = |lab: &Lab, pod: &str| -> Result<Client> {
            Ok(Client::Thread(lab.pod_netns("default", pod)?))
        };
        let targets = [
            (
                Mode::Floor,
                thread(&with_rules, "direct")?,
                pods(&echo_rules),
            ),
            (
                Mode::Iptables,
                thread(&with_rules, "client")?,
                vips(&with_rules),
            ),
            (
                Mode::Nftables,
                thread(&with_rules, "client-2")?,
                vips(&with_rules),
            ),
            (
                Mode::LbPodToPod,
                thread(&with_agent, "direct")?,
                pods(&echo_lb),
            ),
            (Mode::Lb, thread(&with_agent, "client")?, vips(&with_agent)),
            // Its own client pod, as the floor has: its connections to a
            // backend are not tracked, and must not share a 5-tuple with
            // the translated ones of `client`.
            (
                Mode::LbSocket,
                Client::process_in(&with_agent, "client-2", lb_binary)?,
                vips(&with_agent),
            ),
        ];
        let mut rows: Vec<Row> = Mode::ALL
            .iter()
            .map(|&mode| Row {
                mode,
                services: n,
                reps: vec![],
                requests: 0,
                failures: 0,
            })
            .collect();
        for rep in 0..s.repeats {
            for (k, (mode, from, to)) in targets.iter().enumerate() {
                let seed = 1 + rep as u64;
                let translated = sock_translated(&with_agent)?;
                let (figures, requests, failures) = measure(s, from, to, seed)
                    .with_context(|| format!("{} with {n} Services", mode.name()))?;
                if *mode == Mode::LbSocket {
                    check_socket_lb(sock_translated(&with_agent)? - translated, requests)?;
                }
                let row = &mut rows[k];
                row.reps.push(figures);
                row.requests += requests;
                row.failures += failures;
            }
        }
        for r in &rows {
            let med = |f: fn(&Figures) -> f64| {
                super::Stats::of(&r.reps.iter().map(f).collect::<Vec<_>>()).median
            };
            eprintln!(
                "       {:<42} first packet p50 {:.0} µs p99 {:.0} µs, request p50 {:.0} µs, {:.0} req/s",
                r.mode.name(),
                med(|f| f.first_packet[1]),
                med(|f| f.first_packet[3]),
                med(|f| f.request[0]),
                med(|f| f.rps)
            );
        }
        out.rows.extend(rows);
    }
    Ok(out)
}

/// A lab with the bench workload, its pods ready (and, with the agent,
/// Service `web` programmed).
pub async fn workload_lab(
    prefix: &str,
    lb_binary: &std::path::Path,
    agents: bool,
    socket_lb: bool,
) -> Result<Lab> {
    let mut cfg = LabConfig::new(prefix, lb_binary);
    cfg.agents = agents;
    cfg.socket_lb = socket_lb;
    let lab = Lab::up(cfg).await?;
    manifests::apply(
        &lab.store,
        manifests::parse(WORKLOAD, "bench workload", false)?,
    )?;
    lab.wait_pods_ready(Duration::from_secs(120)).await?;
    if agents {
        wait_programmed(&lab, 1.0, Some(3.0), Duration::from_secs(60))?;
    }
    Ok(lab)
}

pub fn echo_pods(lab: &Lab) -> Result<Vec<Ipv4Addr>> {
    let ips: Vec<Ipv4Addr> = lab
        .pods_named("default", "echo-")
        .iter()
        .filter_map(|p| p["status"]["podIP"].as_str()?.parse().ok())
        .collect();
    if ips.len() != 3 {
        bail!("want 3 echo pods, found {}", ips.len());
    }
    Ok(ips)
}

/// Services `filler-<from>`..`filler-<to - 1>` (ClusterIPs given by the
/// lab), each with one endpoint: one of the echo pods in turn, so that
/// every Service answers.
pub fn add_fillers(lab: &Lab, from: usize, to: usize, echo: &[Ipv4Addr]) -> Result<()> {
    for i in from..to {
        let name = format!("filler-{i}");
        lab.store
            .create(
                Kind::Service,
                json!({"metadata": {"name": name, "namespace": "default"},
                       "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
            )
            .with_context(|| format!("creating Service {name}"))?;
        lab.store
            .create(
                Kind::EndpointSlice,
                json!({"metadata": {"name": format!("{name}-1"), "namespace": "default",
                                    "labels": {"kubernetes.io/service-name": name}},
                       "addressType": "IPv4",
                       "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                       "endpoints": [{"addresses": [echo[i % echo.len()].to_string()],
                                      "conditions": {"ready": true}}]}),
            )
            .with_context(|| format!("creating the EndpointSlice of {name}"))?;
    }
    Ok(())
}

/// (Service frontends, backends) the node-1 agent reports programmed.
pub fn programmed(lab: &Lab) -> Result<(f64, f64)> {
    // Maps programmed before the programs are attached serve nothing yet
    // (a new agent attaches after its first pass): not counted. `/readyz`
    // first, which reads a flag: a scrape of `/metrics` reads the maps
    // (all of conntrack's buckets until the first sweep, 20% of a core at
    // a scrape every 10 ms, taken from the start it would time).
    if lab.agent_get(1, "/readyz")?.0 != 200 {
        return Ok((-1.0, -1.0));
    }
    let (code, scrape) = lab.agent_get(1, "/metrics")?;
    if code != 200 {
        bail!("agent /metrics answered {code}");
    }
    if lab::metric(&scrape, "lb_ready") != Some(1.0) {
        return Ok((-1.0, -1.0));
    }
    Ok((
        lab::metric(&scrape, "lb_services").unwrap_or(-1.0),
        lab::metric(&scrape, "lb_backends").unwrap_or(-1.0),
    ))
}

/// Waits until node 1's agent reports exactly that many frontends (and,
/// if given, backends: distinct addresses) programmed besides the lab's
/// own cluster DNS, whose pod must be ready (`Lab::wait_pods_ready`).
pub fn wait_programmed(
    lab: &Lab,
    services: f64,
    backends: Option<f64>,
    within: Duration,
) -> Result<()> {
    let (dns_frontends, dns_backends) = lab::cluster_dns::PROGRAMMED;
    let backends = backends.map(|b| b + dns_backends);
    wait_programmed_in_all(lab, services + dns_frontends, backends, within)
}

/// `wait_programmed`, counting every frontend and backend the agent
/// reports (cluster DNS's among them): for a caller that read the count
/// before (`programmed`) and adds to it.
pub fn wait_programmed_in_all(
    lab: &Lab,
    services: f64,
    backends: Option<f64>,
    within: Duration,
) -> Result<()> {
    let started = Instant::now();
    loop {
        let got = programmed(lab).unwrap_or((-1.0, -1.0));
        if got.0 == services && backends.is_none_or(|b| b == got.1) {
            return Ok(());
        }
        if started.elapsed() > within {
            bail!("after {within:?} the agent has {got:?} (frontends, backends) programmed, want {services} frontends and {backends:?} backends");
        }
        // 10 ms between polls is the precision of every time waited for.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every Service port of the lab's `default` namespace with its ready
/// endpoints, as kube-proxy would see them.
pub fn service_ports(lab: &Lab) -> Vec<ServicePort> {
    let (services, _) = lab.store.list(Kind::Service, Some("default"));
    let (slices, _) = lab.store.list(Kind::EndpointSlice, Some("default"));
    kube_proxy::service_ports(&services, &slices)
}

/// Loads (or reloads) both kube-proxy-shaped rule sets for `ports` into
/// network namespace `netns`: the iptables rules for packets from
/// `iptables_client`, the nftables rules for packets from `nft_client`.
/// How long each load took: one iptables-restore of the whole nat table
/// and one `nft -f` of the whole table (kube-proxy's full sync).
pub fn load_rules(
    netns: &str,
    ports: &[ServicePort],
    iptables_client: Ipv4Addr,
    nft_client: Ipv4Addr,
) -> Result<(Duration, Duration)> {
    // The nftables table goes first, so that iptables-restore (iptables-nft)
    // never works next to a large foreign table of the same family:
    // kube-proxy runs one mode or the other, never both.
    let t = kube_proxy::NFT_TABLE;
    load(
        netns,
        "nft",
        &["-f", "-"],
        &format!("table ip {t}\ndelete table ip {t}\n"),
    )?;
    let started = Instant::now();
    load(
        netns,
        "iptables-restore",
        &[],
        &kube_proxy::iptables_restore(ports, iptables_client),
    )?;
    let iptables = started.elapsed();
    let started = Instant::now();
    load(
        netns,
        "nft",
        &["-f", "-"],
        &kube_proxy::nft_script(ports, nft_client),
    )?;
    Ok((iptables, started.elapsed()))
}

/// A pod's address.
pub fn pod_ip(lab: &Lab, name: &str) -> Result<Ipv4Addr> {
    lab.store.get(Kind::Pod, "default", name)?["status"]["podIP"]
        .as_str()
        .and_then(|ip| ip.parse().ok())
        .with_context(|| format!("pod {name} has no address"))
}

/// Runs `program args` in network namespace `netns` with `input` on stdin.
pub(super) fn load(netns: &str, program: &str, args: &[&str], input: &str) -> Result<()> {
    use std::io::Write;
    let mut child = netns::command_in(netns, program, true)?
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Connections and datagrams translated at the socket on the agent lab's
/// node (`sock_translated`).
fn sock_translated(lab: &Lab) -> Result<f64> {
    let (_, scrape) = lab.agent_get(1, "/metrics")?;
    Ok(lab::metric(
        &scrape,
        "lb_datapath_packets_total{reason=\"sock_translated\"}",
    )
    .unwrap_or(0.0))
}

/// The socket LB mode measured socket LB: every request's connect() was
/// translated at the socket, not one left to the per-packet path.
fn check_socket_lb(translated: f64, requests: usize) -> Result<()> {
    if translated < requests as f64 {
        bail!(
            "socket LB translated {translated} of {requests} connections: the mode would measure the per-packet path"
        );
    }
    Ok(())
}

/// Where a mode's requests come from.
enum Client {
    /// The bench's own threads in a pod's network namespace (in no pod's
    /// cgroup: socket LB does not see them).
    Thread(String),
    /// A process of its own in a pod's namespace and cgroup (`lb
    /// bench-client`), as an application in the pod.
    Process {
        netns: String,
        cgroup: std::path::PathBuf,
        lb_binary: std::path::PathBuf,
    },
}

impl Client {
    fn process_in(lab: &Lab, pod: &str, lb_binary: &std::path::Path) -> Result<Client> {
        let p = lab.store.get(Kind::Pod, "default", pod)?;
        let node = p["spec"]["nodeName"]
            .as_str()
            .context("pod not scheduled")?;
        Ok(Client::Process {
            netns: lab.pod_netns("default", pod)?,
            cgroup: lab::cgroup::node_cgroup(&lab.prefix, node)?,
            lb_binary: lb_binary.to_path_buf(),
        })
    }

    fn run(&self, targets: &[SocketAddr], job: client::Job) -> Result<Outcome> {
        match (self, job) {
            (Client::Thread(netns), client::Job::Sequential { n, seed }) => {
                client::sequential(netns, targets.to_vec(), n, seed)
            }
            (
                Client::Thread(netns),
                client::Job::Concurrent {
                    workers,
                    duration,
                    seed,
                },
            ) => client::concurrent(netns, targets.to_vec(), workers, duration, seed),
            (
                Client::Process {
                    netns,
                    cgroup,
                    lb_binary,
                },
                job,
            ) => client::in_pod_process(lb_binary, netns, cgroup, targets, job),
        }
    }
}

/// One mode in one repetition: sequential requests for the latencies, then
/// concurrent clients for the rate.
fn measure(
    s: &Settings,
    from: &Client,
    targets: &[SocketAddr],
    seed: u64,
) -> Result<(Figures, usize, usize)> {
    let seq = from.run(
        targets,
        client::Job::Sequential {
            n: s.sequential,
            seed,
        },
    )?;
    seq.check("sequential requests")?;
    let conc = from.run(
        targets,
        client::Job::Concurrent {
            workers: s.workers,
            duration: s.duration,
            seed,
        },
    )?;
    conc.check("concurrent requests")?;
    let micros = |o: &Outcome, f: fn(&client::Sample) -> Duration| -> Vec<f64> {
        o.samples.iter().map(|x| f(x).as_secs_f64() * 1e6).collect()
    };
    let mut connect = micros(&seq, |x| x.connect);
    let mut total = micros(&seq, |x| x.total);
    let figures = Figures {
        first_packet: [0.01, 0.5, 0.9, 0.99].map(|q| quantile(&mut connect, q)),
        request: [0.5, 0.99].map(|q| quantile(&mut total, q)),
        rps: conc.samples.len() as f64 / conc.elapsed.as_secs_f64(),
    };
    let requests =
        seq.samples.len() + conc.samples.len() + seq.failures.len() + conc.failures.len();
    Ok((figures, requests, seq.failures.len() + conc.failures.len()))
}
