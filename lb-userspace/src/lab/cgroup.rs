//! The lab's cgroups (v2): one per node, `<cgroup2>/lb-lab-<prefix>/<node>`,
//! holding the processes of that node's pods (their servers, init
//! containers and exec'd commands), as a node's kubepods cgroup holds its
//! pods. Socket LB attaches there (`datapath::socket_lb`), so it sees the
//! lab's pods' sockets and nothing else of the machine's.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::datapath::socket_lb::cgroup2_mount;

fn lab_cgroup(prefix: &str) -> Result<PathBuf> {
    Ok(cgroup2_mount()?.join(format!("lb-lab-{prefix}")))
}

/// The cgroup of node `node`'s pods.
pub fn node_cgroup(prefix: &str, node: &str) -> Result<PathBuf> {
    Ok(lab_cgroup(prefix)?.join(node))
}

/// Makes the cgroup of each node.
pub fn create(prefix: &str, nodes: &[String]) -> Result<()> {
    for node in nodes {
        let dir = node_cgroup(prefix, node)?;
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating cgroup {}", dir.display()))?;
    }
    Ok(())
}

/// Removes the lab's cgroups once their processes are gone (killed by the
/// teardown just before: a cgroup with a live process cannot be removed).
pub fn remove(prefix: &str) {
    let Ok(root) = lab_cgroup(prefix) else {
        return;
    };
    for _ in 0..50 {
        let children = std::fs::read_dir(&root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()));
        for child in children {
            let _ = std::fs::remove_dir(child.path());
        }
        if std::fs::remove_dir(&root).is_ok() || !root.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!("cgroup {} is still in use: not removed", root.display());
}

/// Puts the process `cmd` starts into `cgroup` before it runs anything
/// (nothing if the lab made none, as for a lab of an older build).
pub fn join(cmd: &mut Command, cgroup: &Path) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    if !procs.exists() {
        return Ok(());
    }
    let file = File::options()
        .write(true)
        .open(&procs)
        .with_context(|| format!("opening {}", procs.display()))?;
    // SAFETY: only write(2), async-signal-safe, between fork and exec, on
    // a descriptor opened before the fork ("0": the writing process).
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(file.as_raw_fd(), c"0".as_ptr().cast(), 1) == 1 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    Ok(())
}

/// `join` the cgroup of the node `pod` runs on, in the lab whose pod
/// network namespace is `netns` (`<prefix>-pod<k>`).
pub fn join_pod(cmd: &mut Command, netns: &str, pod: &Value) -> Result<()> {
    let (Some((prefix, _)), Some(node)) =
        (netns.rsplit_once("-pod"), pod["spec"]["nodeName"].as_str())
    else {
        return Ok(());
    };
    join(cmd, &node_cgroup(prefix, node)?)
}
