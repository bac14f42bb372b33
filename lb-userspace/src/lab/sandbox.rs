//! What a node's container runtime does for a pod between its network and
//! its main process: the chained CNI plugin, then the init containers.
//!
//! The lab's kubelet makes the veth itself (the main plugin's part), then
//! runs `lb-cni` with the CNI protocol, as containerd runs the chain on a
//! kind node, and only then the pod's commands; so a lab pod meets the data
//! path exactly as a kind pod with lb-cni chained does.

use std::{os::unix::process::CommandExt, path::Path, process::Stdio, time::Duration};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use super::net::Names;
use crate::{cni, netns};

/// Times the runtime runs ADD again after "try again later" (the agent is
/// not there): a minute at the plugin's 10 s wait, then the pod fails.
const CNI_ATTEMPTS: u32 = 6;

/// Runs the chain's `lb-cni` for pod `k` on node `node`: returns once lb's
/// programs are on the pod's veth.
pub async fn cni_add(
    lb_binary: &Path,
    names: &Names,
    (node, k): (usize, u32),
    pin_dir: &Path,
) -> Result<()> {
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "lab",
        "type": cni::PLUGIN_TYPE,
        "interfacePrefix": names.host_veth_prefix(),
        "pinDir": pin_dir,
        "timeoutSeconds": 10,
        // What the main plugin (ptp) would have returned.
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": names.host_veth(k)},
                {"name": "eth0", "sandbox": netns::path(&names.pod_ns(k))},
            ],
        },
    });
    let stdin = serde_json::to_vec(&conf)?;
    for attempt in 1..=CNI_ATTEMPTS {
        let mut cmd = netns::command_in(&names.node_ns(node), lb_binary, true)?;
        cmd.arg0(cni::PLUGIN_TYPE)
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", names.pod_ns(k))
            .env("CNI_NETNS", netns::path(&names.pod_ns(k)))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", lb_binary.parent().unwrap_or(Path::new("/")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .context("running lb-cni")?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(&stdin).await?;
        }
        let out = child.wait_with_output().await?;
        if out.status.success() {
            return Ok(());
        }
        let err: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let said = format!(
            "lb-cni: {} ({}) {}",
            err["msg"].as_str().unwrap_or("no error object"),
            err["details"].as_str().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        if err["code"] != cni::Code::TryAgainLater as u32 || attempt == CNI_ATTEMPTS {
            bail!("{said}");
        }
        tracing::warn!("{} (attempt {attempt}): {said}", names.pod_ns(k));
    }
    unreachable!("the last attempt returns")
}

/// How an init container ended, for the pod's `initContainerStatuses`.
pub struct InitOutcome {
    pub name: String,
    pub image: String,
    pub restarts: u32,
}

impl InitOutcome {
    pub fn status(&self, finished: &str) -> Value {
        json!({
            "name": self.name, "image": self.image, "imageID": "", "containerID": "",
            "ready": true, "started": false, "restartCount": self.restarts,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed", "finishedAt": finished}},
        })
    }
}

/// Longest an init container may run (the lab has no long-running ones).
const INIT_DEADLINE: Duration = Duration::from_secs(60);
/// Back-off cap between tries of a failing init container, as kubelet's.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Runs `pod`'s init containers in order, each to success, in pod netns
/// `pod_ns`; what each printed goes to `log`. A container is its `command`
/// and `args` run as a host command in the pod's namespaces (as `lb lab
/// exec` runs them); one without a command does what its image would not
/// need the network for, and is taken as done. A failure is tried again
/// after a back-off, or fails the pod under `restartPolicy: Never`.
pub async fn run_init_containers(
    pod: &Value,
    pod_ns: &str,
    cgroup: &std::path::Path,
    log: &std::fs::File,
) -> Result<Vec<InitOutcome>> {
    let never = pod["spec"]["restartPolicy"] == "Never";
    let mut done = Vec::new();
    for c in pod["spec"]["initContainers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let name = c["name"].as_str().unwrap_or_default().to_string();
        let argv: Vec<String> = ["command", "args"]
            .iter()
            .flat_map(|f| c[*f].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        let mut restarts = 0;
        let mut backoff = Duration::from_secs(1);
        while let Some((program, args)) = argv.split_first() {
            let mut cmd = netns::command_in_pod(pod_ns, program)?;
            super::cgroup::join(&mut cmd, cgroup)?;
            cmd.args(args)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log.try_clone()?);
            let mut child = tokio::process::Command::from(cmd)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("init container {name}: starting {program}"))?;
            let status = tokio::time::timeout(INIT_DEADLINE, child.wait()).await;
            match status {
                Ok(Ok(s)) if s.success() => break,
                other => {
                    let why = match other {
                        Ok(Ok(s)) => format!("{s}"),
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => format!("still running after {INIT_DEADLINE:?}"),
                    };
                    if never {
                        bail!("init container {name} failed: {why}");
                    }
                    tracing::warn!(
                        "{pod_ns}: init container {name} failed ({why}); again in {backoff:?}"
                    );
                    restarts += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        done.push(InitOutcome {
            name,
            image: c["image"].as_str().unwrap_or_default().to_string(),
            restarts,
        });
    }
    Ok(done)
}
