//! `lb`: the agent, the lab and the tools around them.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lb::{
    agent::{self, AgentConfig},
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
    Agent {
        /// Kubeconfig to use; without it, in-cluster config or ~/.kube/config.
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// This node's name (from the downward API in a DaemonSet).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Where maps and links are pinned (bpffs).
        #[arg(long, env = "LB_PIN_DIR", default_value = "/sys/fs/bpf/lb")]
        pin_dir: PathBuf,
        /// Pod veths: host-side interfaces whose names start with this.
        #[arg(long, env = "LB_INTERFACE_PREFIX", default_value = "veth")]
        interface_prefix: String,
        /// The node's uplink, for NodePort/LoadBalancer traffic from outside (XDP); "" for none.
        #[arg(long, env = "LB_UPLINK", default_value = "eth0")]
        uplink: String,
        /// Idle timeout of established TCP conntrack entries, seconds.
        #[arg(long, env = "LB_CT_TCP_TIMEOUT", default_value_t = 21600)]
        ct_tcp_timeout: u64,
        /// Idle timeout of TCP entries after a FIN or RST, seconds.
        #[arg(long, env = "LB_CT_TCP_CLOSING_TIMEOUT", default_value_t = 10)]
        ct_tcp_closing_timeout: u64,
        /// Idle timeout of UDP conntrack entries, seconds.
        #[arg(long, env = "LB_CT_UDP_TIMEOUT", default_value_t = 60)]
        ct_udp_timeout: u64,
        /// Seconds between sweeps of idle conntrack entries.
        #[arg(long, env = "LB_CT_SWEEP_SECONDS", default_value_t = 10)]
        ct_sweep_seconds: u64,
        /// Seconds between full comparisons of the maps with the desired state.
        #[arg(long, env = "LB_RESYNC_SECONDS", default_value_t = 30)]
        resync_seconds: u64,
        /// Address of /metrics, /healthz and /readyz; "" for none.
        #[arg(long, env = "LB_METRICS_ADDR", default_value = "0.0.0.0:9964")]
        metrics_addr: String,
    },
    /// Answer on TCP/UDP ports with a name (the lab's application pods).
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
        /// This node's name (to name the deciding policy rules).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Stop after this many verdicts.
        #[arg(long)]
        count: Option<usize>,
    },
    /// NetworkPolicy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// A cluster stand-in made of network namespaces, with an API server.
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Agent {
            kubeconfig,
            node_name,
            pin_dir,
            interface_prefix,
            uplink,
            resync_seconds,
            ct_tcp_timeout,
            ct_tcp_closing_timeout,
            ct_udp_timeout,
            ct_sweep_seconds,
            metrics_addr,
        } => rt.block_on(agent::run(AgentConfig {
            metrics_addr: if metrics_addr.is_empty() {
                None
            } else {
                Some(metrics_addr.parse().context("--metrics-addr")?)
            },
            ct_timeouts: lb::conntrack::Timeouts {
                tcp_established: Duration::from_secs(ct_tcp_timeout),
                tcp_closing: Duration::from_secs(ct_tcp_closing_timeout),
                udp: Duration::from_secs(ct_udp_timeout),
            },
            ct_sweep: Duration::from_secs(ct_sweep_seconds.max(1)),
            kubeconfig,
            node_name,
            pin_dir,
            interface_prefix,
            uplink: Some(uplink).filter(|u| !u.is_empty()),
            resync: Duration::from_secs(resync_seconds.max(1)),
        })),
        Command::Echo {
            name,
            listen,
            drain_seconds,
        } => rt.block_on(echo::run(name, listen, Duration::from_secs(drain_seconds))),
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
        Command::Flows {
            pin_dir,
            kubeconfig,
            node_name,
            count,
        } => rt.block_on(async {
            let client = match &kubeconfig {
                Some(k) => Some(agent::client(Some(k)).await?),
                None => None,
            };
            lb::flows::run(&pin_dir, client, node_name, count).await
        }),
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
        },
    }
}

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

fn lab_exec(pod: &str, prefix: &str, command: &[String]) -> Result<()> {
    let Some((ns, name)) = pod.split_once('/') else {
        bail!("name the pod as NAMESPACE/NAME");
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
        lab::pod_netns(&serde_json::to_value(&pod)?)
    })?;
    let (program, args) = command.split_first().context("no command given")?;
    let status = lb::netns::command_in(&netns, program, false)?
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    std::process::exit(status.code().unwrap_or(1));
}
