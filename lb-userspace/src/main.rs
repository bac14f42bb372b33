//! `lb`: the agent, the lab and the tools around them.

use std::path::PathBuf;
#[cfg(feature = "lab")]
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use lb::{
    agent,
    settings::{self, AgentArgs},
};
#[cfg(feature = "lab")]
use lb::{
    echo::{self, Listen},
    lab::{self, Lab, LabConfig},
};

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "eBPF Service load balancer and NetworkPolicy enforcer for Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: load the data path and keep its maps in sync with the API.
    Agent(AgentArgs),
    /// Answer on TCP/UDP ports with a name (the lab's application pods).
    #[cfg(feature = "lab")]
    Echo {
        #[arg(long)]
        name: String,
        /// tcp:PORT or udp:PORT, repeated.
        #[arg(long)]
        listen: Vec<Listen>,
        /// Seconds to keep serving after SIGTERM.
        #[arg(long, default_value_t = 2)]
        drain_seconds: u64,
    },
    /// Stream NetworkPolicy verdicts (time, source, destination, port,
    /// protocol, direction, verdict, deciding policy) from this node.
    Flows {
        /// Where the agent pinned its maps.
        #[arg(long, env = "LB_PIN_DIR", default_value = "/sys/fs/bpf/lb")]
        pin_dir: PathBuf,
        /// To name pods and policies.
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Stop after this many verdicts.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Print this node's live maps as tables or JSON: services, backends,
    /// conntrack, policy, identities.
    Inspect {
        what: lb::inspect::What,
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: lb::inspect::Output,
        /// Where the agent pinned its maps.
        #[arg(long, env = "LB_PIN_DIR", default_value = "/sys/fs/bpf/lb")]
        pin_dir: PathBuf,
        #[command(flatten)]
        conntrack: lb::inspect::ConntrackFilter,
    },
    /// The end-to-end bench's client as a process of its own (run by the
    /// bench inside a pod's namespace and cgroup): requests to the
    /// addresses read from stdin (one a line), their timings printed as JSON.
    #[cfg(feature = "lab")]
    #[command(hide = true)]
    BenchClient {
        /// This many requests one after another...
        #[arg(long)]
        sequential: Option<usize>,
        /// ...or this many clients side by side for --duration-ms.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        #[arg(long, default_value_t = 1000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Measure the data path and write BENCHMARKS.md and a plot (`cargo
    /// xtask bench` runs it from a release build).
    #[cfg(feature = "lab")]
    Bench {
        /// Directory for BENCHMARKS.md and benchmarks.svg.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// A short run, to try the harness (figures not meaningful).
        #[arg(long)]
        quick: bool,
        /// Run only these parts (the report leaves the others out).
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<lb::bench::Part>,
        /// Service counts for the end-to-end part, instead of the plan's.
        #[arg(long, value_delimiter = ',')]
        e2e_services: Vec<usize>,
        /// The control part's large run (lb alone), instead of the plan's
        /// Service count; 0 leaves it out.
        #[arg(long)]
        control_large: Option<usize>,
        /// The control part's lb side alone (its sync, changes and burst):
        /// no nftables peer, no policy part, no large run. To profile the
        /// agent (see docs/benchmarks.md); its report is not for committing.
        #[arg(long)]
        control_lb_only: bool,
    },
    /// The chained CNI plugin (`lb-cni`): put it on this node, or take it
    /// off. The runtime runs the plugin itself as `/opt/cni/bin/lb-cni`.
    Cni {
        #[command(subcommand)]
        command: CniCommand,
    },
    /// NetworkPolicy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// A cluster stand-in made of network namespaces, with an API server.
    #[cfg(feature = "lab")]
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Would a new connection be allowed, and which policy decides?
    /// Exits 0 when allowed, 1 when denied.
    Trace {
        /// NAMESPACE/POD sending.
        #[arg(long)]
        from: String,
        /// NAMESPACE/POD receiving.
        #[arg(long)]
        to: String,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "TCP")]
        protocol: String,
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CniCommand {
    /// Copy this binary to BIN_DIR/lb-cni and chain lb-cni last into the
    /// node's active CNI configuration (idempotent).
    Install {
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The agent's interface-prefix: only such host veths are waited for.
        #[arg(long, default_value = "veth")]
        interface_prefix: String,
        /// The agent's pin-dir.
        #[arg(long, default_value = "/sys/fs/bpf/lb")]
        pin_dir: PathBuf,
        /// How long a pod's network setup waits for the agent.
        #[arg(long, default_value_t = 10.0)]
        timeout_seconds: f64,
    },
    /// Take lb-cni out of the node's CNI configuration.
    Uninstall {
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
    },
}

#[cfg(feature = "lab")]
#[derive(Subcommand)]
enum LabCommand {
    /// Bring the lab up and keep it running until Ctrl-C, then remove it all.
    Up {
        /// A file or directory of YAML/JSON manifests to apply.
        #[arg(long)]
        manifests: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        #[arg(long, default_value = "lb")]
        prefix: String,
        /// Do not start the agents.
        #[arg(long)]
        no_agents: bool,
        /// Show the load balancer at work once the lab is up.
        #[arg(long)]
        demo: bool,
    },
    /// Remove a lab (also one whose `lab up` was killed).
    Down {
        #[arg(long, default_value = "lb")]
        prefix: String,
    },
    /// The lab's cluster DNS server, as the kube-dns pod runs it.
    #[command(hide = true)]
    Dns {
        /// The pod's network namespace, where it answers on port 53.
        #[arg(long)]
        netns: String,
        #[arg(long)]
        kubeconfig: PathBuf,
    },
    /// One request to ADDR as an application makes it, printing the answer,
    /// the peer the socket reports and the client the server saw (run it in
    /// a pod with `lb lab exec`: with socket LB, the peer is the Service's).
    Probe {
        #[arg(value_enum)]
        mode: lb::lab::probe::ProbeMode,
        addr: std::net::SocketAddr,
        #[arg(long, default_value_t = 3)]
        timeout_seconds: u64,
    },
    /// Run a command inside a pod's network namespace: `lb lab exec NS/POD -- CMD...`.
    Exec {
        pod: String,
        #[arg(long, default_value = "lb")]
        prefix: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> Result<()> {
    // Run by a container runtime as a CNI plugin: the protocol, not the CLI.
    let arg0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&arg0).file_name() == Some(lb::cni::PLUGIN_TYPE.as_ref()) {
        std::process::exit(lb::cni::main());
    }
    let matches = match settings::parse_with_file(
        Cli::command(),
        std::env::args_os().collect(),
        &["agent"],
    ) {
        Ok(m) => m,
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(clap_error) => clap_error.exit(),
            Err(e) => return Err(e),
        },
    };
    let cli = Cli::from_arg_matches(&matches)?;
    // The agent's level is a setting (flag, LB_LOG, file); the tools take RUST_LOG.
    let filter = match &cli.command {
        Command::Agent(args) => tracing_subscriber::EnvFilter::try_new(&args.log)
            .with_context(|| format!("log filter {:?}", args.log))?,
        _ => {
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into())
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Agent(args) => rt.block_on(agent::run(args.into_config()?)),
        #[cfg(feature = "lab")]
        Command::Echo {
            name,
            listen,
            drain_seconds,
        } => rt.block_on(echo::run(name, listen, Duration::from_secs(drain_seconds))),
        Command::Cni {
            command:
                CniCommand::Install {
                    bin_dir,
                    conf_dir,
                    interface_prefix,
                    pin_dir,
                    timeout_seconds,
                },
        } => lb::cni::install::install(
            &bin_dir,
            &conf_dir,
            &lb::cni::install::Entry {
                interface_prefix,
                pin_dir,
                timeout_seconds,
            },
        ),
        Command::Cni {
            command: CniCommand::Uninstall { conf_dir },
        } => lb::cni::install::uninstall(&conf_dir),
        Command::Policy {
            command:
                PolicyCommand::Trace {
                    from,
                    to,
                    port,
                    protocol,
                    kubeconfig,
                },
        } => rt.block_on(async {
            let client = agent::client(kubeconfig.as_ref()).await?;
            let allowed = lb::trace::run(client, &from, &to, port, &protocol).await?;
            std::process::exit(if allowed { 0 } else { 1 });
        }),
        Command::Inspect {
            what,
            output,
            pin_dir,
            conntrack,
        } => {
            print!("{}", lb::inspect::run(&pin_dir, what, output, conntrack)?);
            Ok(())
        }
        #[cfg(feature = "lab")]
        Command::BenchClient {
            sequential,
            workers,
            duration_ms,
            seed,
        } => {
            use lb::bench::client::Job;
            let targets = std::io::stdin()
                .lines()
                .map(|l| Ok(l?.trim().parse()?))
                .collect::<Result<Vec<std::net::SocketAddr>>>()
                .context("reading the targets from stdin")?;
            if targets.is_empty() {
                anyhow::bail!("no targets on stdin");
            }
            let job = match sequential {
                Some(n) => Job::Sequential { n, seed },
                None => Job::Concurrent {
                    workers,
                    duration: Duration::from_millis(duration_ms),
                    seed,
                },
            };
            println!("{}", job.run_here(targets)?.to_json());
            Ok(())
        }
        #[cfg(feature = "lab")]
        Command::Bench {
            out,
            quick,
            only,
            e2e_services,
            control_large,
            control_lb_only,
        } => {
            let mut plan = if quick {
                lb::bench::Plan::QUICK
            } else {
                lb::bench::Plan::FULL
            };
            if !e2e_services.is_empty() {
                // The plan holds static slices; this one lives as long as
                // the program anyway.
                plan.e2e.service_counts = e2e_services.leak();
            }
            if let Some(n) = control_large {
                plan.control.large = Some(n).filter(|n| *n > 0);
            }
            plan.control.lb_only = control_lb_only;
            let exe = std::env::current_exe()?;
            rt.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                // The bench blocks its thread while it measures, so it runs
                // on a thread of its own, not on a runtime worker: a task it
                // wakes (the lab's API server, by a write to the store) would
                // otherwise wait in that worker's queue behind the block.
                // Interrupted, its labs are taken down here (their processes
                // die with this one).
                let handle = tokio::runtime::Handle::current();
                let bench = tokio::task::spawn_blocking(move || {
                    handle.block_on(lb::bench::run(plan, &only, &out, &exe))
                });
                let why = tokio::select! {
                    r = bench => return r?,
                    _ = tokio::signal::ctrl_c() => "interrupted",
                    _ = term.recv() => "terminated",
                };
                for prefix in lb::bench::LAB_PREFIXES {
                    lb::lab::teardown(prefix);
                }
                // The bench's task may be blocked in a measurement: do not
                // wait for it (its lab processes die with this one).
                eprintln!("Error: {why}; the bench labs were taken down");
                std::process::exit(1)
            })
        }
        Command::Flows {
            pin_dir,
            kubeconfig,
            count,
        } => rt.block_on(async {
            let client = match &kubeconfig {
                Some(k) => Some(agent::client(Some(k)).await?),
                None => None,
            };
            lb::flows::run(&pin_dir, client, count).await
        }),
        #[cfg(feature = "lab")]
        Command::Lab { command } => match command {
            LabCommand::Up {
                manifests,
                nodes,
                prefix,
                no_agents,
                demo,
            } => rt.block_on(lab_up(manifests, nodes, prefix, !no_agents, demo)),
            LabCommand::Down { prefix } => {
                if let Some(pid) = lab::running_pid(&prefix) {
                    // Let the running lab remove what it made, then sweep.
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                    for _ in 0..100 {
                        if lab::running_pid(&prefix).is_none() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                lab::teardown(&prefix);
                println!("lab {prefix:?} removed");
                Ok(())
            }
            LabCommand::Exec {
                pod,
                prefix,
                command,
            } => lab_exec(&pod, &prefix, &command),
            LabCommand::Probe {
                mode,
                addr,
                timeout_seconds,
            } => {
                let seen = lab::probe::run(mode, addr, Duration::from_secs(timeout_seconds))?;
                // A session printed each of its results as it went.
                if !matches!(mode, lab::probe::ProbeMode::UdpSession) {
                    println!("{seen}");
                }
                Ok(())
            }
            LabCommand::Dns { netns, kubeconfig } => tokio::runtime::Runtime::new()?
                .block_on(lb::lab::dns_server::run(netns, kubeconfig)),
        },
    }
}

#[cfg(feature = "lab")]
async fn lab_up(
    manifests: Option<PathBuf>,
    nodes: usize,
    prefix: String,
    agents: bool,
    demo: bool,
) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut cfg = LabConfig::new(&prefix, exe);
    cfg.nodes = nodes;
    cfg.manifests = manifests;
    cfg.agents = agents;
    let lab = Lab::up(cfg).await?;
    println!(
        "lab {prefix:?} is up: API server http://127.0.0.1:{}, kubeconfig {}",
        lab.port,
        lab.kubeconfig_path().display()
    );
    lab.wait_pods_ready(Duration::from_secs(60)).await?;
    println!(
        "all pods are ready; logs in {}",
        lab.log_path("")
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    if demo {
        if let Err(e) = lb::lab::demo::show(&lab).await {
            eprintln!("demo: {e:#}");
        }
    }
    println!("\nPress Ctrl-C to tear the lab down.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    println!("tearing down lab {prefix:?}");
    drop(lab);
    Ok(())
}

#[cfg(feature = "lab")]
fn lab_exec(pod: &str, prefix: &str, command: &[String]) -> Result<()> {
    let Some((ns, name)) = pod.split_once('/') else {
        anyhow::bail!("name the pod as NAMESPACE/NAME");
    };
    let rt = tokio::runtime::Runtime::new()?;
    let netns = rt.block_on(async {
        let kubeconfig = lab::state_dir(prefix).join("kubeconfig");
        let client = agent::client(Some(&kubeconfig))
            .await
            .with_context(|| format!("is lab {prefix:?} up?"))?;
        let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, ns);
        let pod = api
            .get(name)
            .await
            .with_context(|| format!("pod {ns}/{name}"))?;
        let pod = serde_json::to_value(&pod)?;
        anyhow::Ok((lab::pod_netns(&pod)?, pod))
    })?;
    let (netns, pod) = netns;
    let (program, args) = command.split_first().context("no command given")?;
    let mut cmd = lb::netns::command_in_pod(&netns, program)?;
    lab::cgroup::join_pod(&mut cmd, &netns, &pod)?;
    let status = cmd
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    std::process::exit(status.code().unwrap_or(1));
}
