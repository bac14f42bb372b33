//! The agent's settings: flags, environment variables and a YAML file
//! (`--config`, the DaemonSet's ConfigMap), in that order of precedence.
//! The file is keyed by flag name (`pin-dir: /sys/fs/bpf/lb`); a key that is
//! no flag is an error, so a typo never passes silently.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use clap::{parser::ValueSource, ArgMatches, Args, Command};

use crate::{
    agent::AgentConfig,
    datapath::{attach::UplinkHook, MapSizes},
};

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// YAML file of settings keyed by flag name; flags and environment win over it.
    #[arg(long, env = "LB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Kubeconfig to use; without it, in-cluster config or ~/.kube/config.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (from the downward API in a DaemonSet).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Where maps and links are pinned (bpffs).
    #[arg(long, env = "LB_PIN_DIR", default_value = "/sys/fs/bpf/lb")]
    pub pin_dir: PathBuf,
    /// Pod veths: host-side interfaces whose names start with this.
    #[arg(long, env = "LB_INTERFACE_PREFIX", default_value = "veth")]
    pub interface_prefix: String,
    /// The node's uplink, for NodePort/LoadBalancer traffic from outside; "" for none.
    #[arg(long, env = "LB_UPLINK", default_value = "eth0")]
    pub uplink: String,
    /// The uplink program's hook: xdp, tc, or auto (XDP on a NIC, tc ingress
    /// on a virtual device such as a veth, where XDP copies every packet).
    #[arg(long, env = "LB_UPLINK_HOOK", value_enum, default_value_t = UplinkHook::Auto)]
    pub uplink_hook: UplinkHook,
    /// This network namespace's /proc/sys/net (a container mounts the host's elsewhere).
    #[arg(long, env = "LB_PROC_SYS_NET", default_value = "/proc/sys/net")]
    pub proc_sys_net: PathBuf,
    /// Idle timeout of established TCP conntrack entries, seconds.
    #[arg(long, env = "LB_CT_TCP_TIMEOUT", default_value_t = 21600)]
    pub ct_tcp_timeout: u64,
    /// Idle timeout of the entries of closed TCP connections, seconds; the
    /// reply entry of one its backend closed first stays 66 s (the tuple's
    /// guard while the backend's TIME_WAIT lasts) if this is shorter.
    #[arg(long, env = "LB_CT_TCP_CLOSING_TIMEOUT", default_value_t = 10)]
    pub ct_tcp_closing_timeout: u64,
    /// Idle timeout of UDP conntrack entries, seconds.
    #[arg(long, env = "LB_CT_UDP_TIMEOUT", default_value_t = 30)]
    pub ct_udp_timeout: u64,
    /// Seconds between sweeps of idle conntrack entries.
    #[arg(long, env = "LB_CT_SWEEP_SECONDS", default_value_t = 10)]
    pub ct_sweep_seconds: u64,
    /// Seconds between full comparisons of the maps with the desired state.
    #[arg(long, env = "LB_RESYNC_SECONDS", default_value_t = 30)]
    pub resync_seconds: u64,
    /// Address of /metrics, /healthz and /readyz; "" for none.
    #[arg(long, env = "LB_METRICS_ADDR", default_value = "0.0.0.0:9964")]
    pub metrics_addr: String,
    /// Log level or filter (`info`, `lb=debug,kube=warn`: RUST_LOG syntax).
    #[arg(long, env = "LB_LOG", default_value = "info")]
    pub log: String,
    /// Log lines from the eBPF programs (new flows, refusals) at target
    /// `lb::bpf`: costs per packet, so off by default.
    #[arg(long, env = "LB_BPF_LOG")]
    pub bpf_log: bool,
    /// Entries of the SERVICES map: one per frontend (address, port,
    /// protocol) and one per backend of each. A Service that does not fit
    /// is left out whole, with an Event and `lb_map_full_services`.
    #[arg(long, env = "LB_SERVICES_MAP_MAX", default_value_t = MapSizes::default().services)]
    pub services_map_max: u32,
    /// Entries of the BACKENDS map: one per distinct backend address, port and protocol.
    #[arg(long, env = "LB_BACKENDS_MAP_MAX", default_value_t = MapSizes::default().backends)]
    pub backends_map_max: u32,
    /// Maglev tables: one per frontend reached from outside the node (NodePort, LoadBalancer, external IP).
    #[arg(long, env = "LB_MAGLEV_TABLES_MAX", default_value_t = MapSizes::default().maglev_tables)]
    pub maglev_tables_max: u32,
    /// Socket LB: translate a pod's connect() and sendmsg() to a Service at
    /// the socket, by cgroup hooks attached to this cgroup (v2) directory,
    /// which must hold the pods' processes (the node's kubepods cgroup, or
    /// the cgroup2 root); without it, off (every packet translated on the veth).
    #[arg(long, env = "LB_SOCKET_LB_CGROUP")]
    pub socket_lb_cgroup: Option<PathBuf>,
    /// Entries of the CONNTRACK table (LRU, preallocated, about 100 bytes an entry).
    #[arg(long, env = "LB_CONNTRACK_MAX", default_value_t = MapSizes::default().conntrack)]
    pub conntrack_max: u32,
}

impl AgentArgs {
    /// The sizes of the cluster-sized maps; none may be 0.
    fn map_sizes(&self) -> Result<MapSizes> {
        let sizes = MapSizes {
            services: self.services_map_max,
            backends: self.backends_map_max,
            maglev_tables: self.maglev_tables_max,
            conntrack: self.conntrack_max,
        };
        if let Some((name, _)) = sizes.by_map().iter().find(|(_, n)| *n == 0) {
            bail!("the size of the {name} map must be at least 1");
        }
        Ok(sizes)
    }

    pub fn into_config(self) -> Result<AgentConfig> {
        let map_sizes = self.map_sizes()?;
        Ok(AgentConfig {
            metrics_addr: if self.metrics_addr.is_empty() {
                None
            } else {
                Some(
                    self.metrics_addr
                        .parse()
                        .with_context(|| format!("metrics-addr {:?}", self.metrics_addr))?,
                )
            },
            ct_timeouts: crate::conntrack::Timeouts {
                tcp_established: Duration::from_secs(self.ct_tcp_timeout),
                tcp_time_wait: crate::conntrack::Timeouts::default().tcp_time_wait,
                tcp_closing: Duration::from_secs(self.ct_tcp_closing_timeout),
                udp: Duration::from_secs(self.ct_udp_timeout),
            },
            ct_sweep: Duration::from_secs(self.ct_sweep_seconds.max(1)),
            kubeconfig: self.kubeconfig,
            node_name: self.node_name,
            pin_dir: self.pin_dir,
            interface_prefix: self.interface_prefix,
            uplink: Some(self.uplink).filter(|u| !u.is_empty()),
            uplink_hook: self.uplink_hook,
            socket_lb_cgroup: self.socket_lb_cgroup,
            proc_sys_net: self.proc_sys_net,
            resync: Duration::from_secs(self.resync_seconds.max(1)),
            bpf_log: self.bpf_log,
            map_sizes,
        })
    }
}

/// Parses `argv` with `command`; when the subcommand path `path` (e.g.
/// `["agent"]`) was given a `--config` file, its settings are added for
/// every flag that neither the command line nor the environment set.
pub fn parse_with_file(command: Command, argv: Vec<OsString>, path: &[&str]) -> Result<ArgMatches> {
    let matches = command.clone().try_get_matches_from(&argv)?;
    let Some(sub) = subcommand_matches(&matches, path) else {
        return Ok(matches);
    };
    let Some(file) = sub.get_one::<PathBuf>("config") else {
        return Ok(matches);
    };
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let sub_command = subcommand(&command, path).context("no such subcommand")?;
    let extra = file_args(sub_command, sub, &text)
        .with_context(|| format!("settings file {}", file.display()))?;
    if extra.is_empty() {
        return Ok(matches);
    }
    let mut argv = argv;
    argv.extend(extra);
    Ok(command.try_get_matches_from(argv)?)
}

fn subcommand_matches<'a>(m: &'a ArgMatches, path: &[&str]) -> Option<&'a ArgMatches> {
    path.iter()
        .try_fold(m, |m, name| m.subcommand_matches(name))
}

fn subcommand<'a>(c: &'a Command, path: &[&str]) -> Option<&'a Command> {
    path.iter().try_fold(c, |c, name| c.find_subcommand(name))
}

/// The `--flag=value` arguments a settings file adds: one per key whose
/// flag was left at its default.
pub fn file_args(command: &Command, given: &ArgMatches, yaml: &str) -> Result<Vec<OsString>> {
    let settings: std::collections::BTreeMap<String, serde_json::Value> =
        match crate::yaml::from_str::<Option<_>>(yaml).context("not a YAML mapping")? {
            Some(s) => s,
            None => return Ok(Vec::new()),
        };
    let mut out = Vec::new();
    for (key, value) in settings {
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
        else {
            bail!("unknown setting {key:?} (settings are the flags of `lb agent --help`)");
        };
        if key == "config" {
            bail!("a settings file cannot name another one");
        }
        let from_default = matches!(
            given.value_source(arg.get_id().as_str()),
            None | Some(ValueSource::DefaultValue)
        );
        if !from_default {
            continue;
        }
        // A switch (`--bpf-log`) takes no value: present when true.
        if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
            match value {
                serde_json::Value::Bool(true) => out.push(OsString::from(format!("--{key}"))),
                serde_json::Value::Bool(false) | serde_json::Value::Null => {}
                other => bail!("setting {key:?}: expected true or false, got {other:?}"),
            }
            continue;
        }
        let value = match value {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            serde_json::Value::Null => continue,
            other => bail!("setting {key:?}: expected a string, number or boolean, got {other:?}"),
        };
        out.push(OsString::from(format!("--{key}={value}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(Subcommand)]
    enum Sub {
        Agent(AgentArgs),
    }

    fn parse(args: &[&str], yaml: &str) -> Result<AgentArgs> {
        let dir = std::env::temp_dir().join(format!(
            "lb-settings-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("config.yaml");
        std::fs::write(&file, yaml)?;
        let mut argv: Vec<OsString> = vec!["lb".into(), "agent".into()];
        argv.extend(args.iter().map(OsString::from));
        argv.push("--config".into());
        argv.push(file.clone().into());
        let result = parse_with_file(Cli::command(), argv, &["agent"]);
        std::fs::remove_dir_all(&dir).ok();
        let Sub::Agent(a) = Cli::from_arg_matches(&result?)?.command;
        Ok(a)
    }

    #[test]
    fn the_file_fills_what_flags_leave_at_their_default() {
        let a = parse(
            &["--pin-dir", "/sys/fs/bpf/from-flag"],
            "pin-dir: /sys/fs/bpf/from-file\nuplink: ens3\nct-udp-timeout: 45\nmetrics-addr: ''\nbpf-log: true\n",
        )
        .unwrap();
        assert_eq!(
            a.pin_dir,
            PathBuf::from("/sys/fs/bpf/from-flag"),
            "the flag wins"
        );
        assert_eq!(a.uplink, "ens3");
        assert_eq!(a.ct_udp_timeout, 45);
        assert_eq!(a.metrics_addr, "");
        assert_eq!(a.interface_prefix, "veth", "default kept");
        assert!(a.bpf_log);
        let cfg = a.into_config().unwrap();
        assert_eq!(cfg.metrics_addr, None);
        assert_eq!(cfg.ct_timeouts.udp, Duration::from_secs(45));
    }

    #[test]
    fn bad_files_are_errors_that_name_the_setting() {
        let err = |yaml| format!("{:#}", parse(&[], yaml).unwrap_err());
        assert!(err("pin_dir: /x\n").contains("unknown setting \"pin_dir\""));
        assert!(err("ct-udp-timeout: soon\n").contains("ct-udp-timeout"));
        assert!(err("- a list\n").contains("not a YAML mapping"));
        assert!(err("uplink: [a, b]\n").contains("setting \"uplink\""));
        assert!(err("bpf-log: sometimes\n").contains("expected true or false"));
        assert!(!parse(&[], "bpf-log: false\n").unwrap().bpf_log);
        // An empty file is no settings at all.
        assert_eq!(parse(&[], "").unwrap().uplink, "eth0");
    }

    #[test]
    fn the_shipped_config_map_parses() {
        let cm: serde_json::Value = crate::yaml::from_str(
            &std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../manifests/install/configmap.yaml"),
            )
            .unwrap(),
        )
        .unwrap();
        let yaml = cm["data"]["config.yaml"].as_str().unwrap();
        let a = parse(&[], yaml).unwrap();
        assert_eq!(a.proc_sys_net, PathBuf::from("/host/proc/sys/net"));
        assert_eq!(a.metrics_addr, "0.0.0.0:9964");
    }
}
