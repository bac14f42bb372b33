//! `lb-cni`: a chained CNI plugin that closes the window between a pod's
//! network coming up and lb's programs being on its veth.
//!
//! The container runtime runs the main plugin (kindnet's ptp, bridge...),
//! which makes the veth, then this one with the main plugin's result
//! (`prevResult`). The agent attaches its programs to the new host veth as
//! soon as netlink tells it of the link; this plugin returns only once they
//! are on it, so the pod's first packet (an init container resolving a
//! name through kube-dns, say) is already load-balanced and policed. Cilium's
//! generic-veth chaining does the same by waiting for the agent to finish the
//! endpoint. Without it a pod could talk for a few milliseconds with no
//! Service translation and no NetworkPolicy.
//!
//! The runtime executes `/opt/cni/bin/lb-cni` (a copy of `lb`, which runs
//! this when its name is `lb-cni`); the protocol is the CNI specification's:
//! the command in `CNI_COMMAND`, the network configuration on stdin, the
//! result or an error object on stdout. `lb cni install` (the DaemonSet's
//! init container) puts the binary and the chain entry in place.

pub mod install;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::programs::tc::SchedClassifier;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::datapath::Datapath;

/// The name the runtime knows the plugin by (the `type` in a conflist and
/// the file in the CNI bin directory).
pub const PLUGIN_TYPE: &str = "lb-cni";

/// The CNI versions whose configuration and result this plugin reads.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// How long ADD waits for the agent by default. Longer than an agent's
/// restart takes to re-attach; the runtime retries the sandbox after it.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often ADD looks at the veth while it waits.
const POLL: Duration = Duration::from_millis(5);

/// CNI's well-known error codes (the specification's "Error" section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    InvalidConfig = 4,
    InvalidEnv = 7,
    TryAgainLater = 11,
}

/// An error the runtime shows in the pod's events.
#[derive(Debug, PartialEq)]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error object the specification asks for on stdout.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code as u32,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// This plugin's part of the network configuration.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    /// Where the agent pins its maps and links. No such directory means no
    /// agent was ever installed on this node (or it was removed): then the
    /// plugin passes the result through instead of holding every pod back.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Only host interfaces with this prefix are waited for: the agent's
    /// `interface-prefix` (others get no programs, so waiting would fail).
    #[serde(default)]
    pub interface_prefix: String,
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
    /// The main plugin's result: absent when this plugin is not chained.
    #[serde(default)]
    pub prev_result: Option<Value>,
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/lb")
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                Code::InvalidConfig,
                "invalid network configuration",
                e.to_string(),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!("CNI version {} is not supported", conf.cni_version),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        Ok(conf)
    }

    fn timeout(&self) -> Duration {
        self.timeout_seconds
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map_or(DEFAULT_TIMEOUT, Duration::from_secs_f64)
    }

    /// The main plugin's result, which a chained plugin must have.
    fn prev_result(&self) -> Result<&Value, CniError> {
        self.prev_result.as_ref().ok_or_else(|| {
            CniError::new(
                Code::InvalidConfig,
                "lb-cni is a chained plugin: no prevResult",
                "list it after the plugin that makes the pod's veth (ptp, bridge, kindnet)",
            )
        })
    }
}

/// The host-side interfaces of a result that the agent attaches to: those
/// without a `sandbox` (the container's carry the netns path) and, when
/// `prefix` is set, named with it.
pub fn host_interfaces(prev_result: &Value, prefix: &str) -> Vec<String> {
    prev_result["interfaces"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|i| i["sandbox"].as_str().is_none_or(str::is_empty))
        .filter_map(|i| i["name"].as_str())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// What the runtime gave in the environment.
pub struct Env {
    pub command: String,
    pub container_id: String,
}

impl Env {
    pub fn from_vars(vars: &BTreeMap<String, String>) -> Result<Self, CniError> {
        let get = |name: &str| vars.get(name).cloned().unwrap_or_default();
        let command = get("CNI_COMMAND");
        if command.is_empty() {
            return Err(CniError::new(
                Code::InvalidEnv,
                "CNI_COMMAND is not set",
                "lb-cni is run by a container runtime, as a CNI plugin",
            ));
        }
        Ok(Self {
            command,
            container_id: get("CNI_CONTAINERID"),
        })
    }
}

/// Has the agent put both its programs on `ifname`?
pub type Probe<'a> = dyn Fn(&str) -> bool + 'a;

/// The real probe: lb's two programs, by name, in the interface's tcx
/// chains (the agent attaches with TCX links).
pub fn programs_attached(ifname: &str) -> bool {
    Datapath::attachments().into_iter().all(|(prog, ty)| {
        SchedClassifier::query_tcx(ifname, ty).is_ok_and(|(_, progs)| {
            progs.iter().any(|p| {
                // The kernel keeps 15 bytes of a program's name.
                p.name_as_str()
                    .is_some_and(|n| !n.is_empty() && prog.starts_with(n))
            })
        })
    })
}

/// Runs one CNI command; `Ok` is what goes to stdout (nothing for DEL).
pub fn handle(
    env: &Env,
    stdin: &[u8],
    probe: &Probe<'_>,
    pin_dir_exists: &dyn Fn(&Path) -> bool,
) -> Result<Option<Value>, CniError> {
    match env.command.as_str() {
        "VERSION" => Ok(Some(json!({
            "cniVersion": SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1],
            "supportedVersions": SUPPORTED_VERSIONS,
        }))),
        // Nothing of the pod's is ours to remove: the agent detaches from a
        // veth when it goes. DEL must succeed whatever is left.
        "DEL" | "GC" | "STATUS" => Ok(None),
        "ADD" | "CHECK" => {
            let conf = NetConf::parse(stdin)?;
            let prev = conf.prev_result()?;
            // ADD passes the main plugin's result on; CHECK answers by its
            // exit code alone.
            let result = (env.command == "ADD").then(|| passed_through(prev, &conf.cni_version));
            if !pin_dir_exists(&conf.pin_dir) {
                // No agent on this node: pass through rather than hold
                // every pod back (lb uninstalled, chain entry left behind).
                eprintln!(
                    "lb-cni: {} does not exist (no lb agent on this node); passing the result through",
                    conf.pin_dir.display()
                );
                return Ok(result);
            }
            let ifaces = host_interfaces(prev, &conf.interface_prefix);
            if ifaces.is_empty() {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    "the previous plugin's result names no host interface to wait for",
                    format!(
                        "interfaces: {}; prefix {:?} (lb-cni follows a plugin that reports the host veth: ptp, bridge, kindnet)",
                        prev["interfaces"], conf.interface_prefix
                    ),
                ));
            }
            let wait = if env.command == "ADD" {
                conf.timeout()
            } else {
                Duration::ZERO
            };
            wait_for_programs(&ifaces, wait, probe).map_err(|missing| {
                CniError::new(
                    Code::TryAgainLater,
                    format!("lb's programs are not on {missing} yet: is the lb agent running on this node?"),
                    format!("container {}, waited {wait:?}", env.container_id),
                )
            })?;
            Ok(result)
        }
        other => Err(CniError::new(
            Code::InvalidEnv,
            format!("unknown CNI_COMMAND {other}"),
            "",
        )),
    }
}

/// The main plugin's result as this plugin's: unchanged, in the
/// configuration's version (what the specification asks of a chained
/// plugin that adds nothing).
fn passed_through(prev: &Value, cni_version: &str) -> Value {
    let mut out = prev.clone();
    out["cniVersion"] = json!(cni_version);
    out
}

/// Waits until `probe` holds for every interface, up to `within`; the
/// first interface still missing its programs, if any.
fn wait_for_programs(ifaces: &[String], within: Duration, probe: &Probe<'_>) -> Result<(), String> {
    let deadline = Instant::now() + within;
    for ifname in ifaces {
        while !probe(ifname) {
            if Instant::now() >= deadline {
                return Err(ifname.clone());
            }
            std::thread::sleep(POLL);
        }
    }
    Ok(())
}

/// The plugin's entry point (`lb` run as `lb-cni`): the process's exit code.
pub fn main() -> i32 {
    use std::io::{Read, Write};
    let vars: BTreeMap<String, String> = std::env::vars().collect();
    let mut stdin = Vec::new();
    let outcome = Env::from_vars(&vars).and_then(|env| {
        if env.command != "VERSION" {
            std::io::stdin()
                .read_to_end(&mut stdin)
                .map_err(|e| CniError::new(Code::InvalidConfig, "reading stdin", e.to_string()))?;
        }
        handle(&env, &stdin, &programs_attached, &|p: &Path| p.is_dir())
    });
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|c| c["cniVersion"].as_str().map(str::to_string))
        .unwrap_or_else(|| "1.0.0".to_string());
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(result)) => {
            let _ = writeln!(out, "{result}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(&version));
            1
        }
    }
}

#[cfg(test)]
mod tests;
