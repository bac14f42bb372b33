//! Socket LB: the programs that translate a Service at `connect()` and
//! `sendmsg()` (`lb-ebpf/src/sock.rs`) attached to a cgroup (v2) whose
//! processes are the pods': the node's cgroup of pods in a cluster, the
//! lab's own cgroup in the lab, never the machine's root there. Links are
//! pinned like the tc links, so they outlive the agent.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::programs::{links::FdLink, CgroupAttachMode};

use super::{Datapath, PROGS_SOCK};

fn pin_path(links_dir: &Path, prog: &str) -> PathBuf {
    links_dir.join(prog)
}

/// Attaches the socket programs to `cgroup`. An earlier agent's links
/// stay until this agent's are in place: the cgroup runs both meanwhile
/// (a cgroup runs every BPF link attached to it, in order), and the second of them finds a backend's
/// address, not a Service's, so nothing is translated twice and no
/// `connect()` in between goes untranslated.
pub fn attach(dp: &mut Datapath, links_dir: &Path, cgroup: &Path) -> Result<()> {
    std::fs::create_dir_all(links_dir)?;
    let cg = File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    for name in PROGS_SOCK {
        let prog = dp.sock_program(name)?;
        let id = prog
            // A BPF link takes no attach flags (EINVAL): links are always
            // one of many.
            .attach(&cg, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        let link: FdLink = prog.take_link(id)?.try_into()?;
        let pin = pin_path(links_dir, name);
        // Removing the last pin of the earlier agent's link detaches it.
        if pin.exists() {
            std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        }
        link.pin(&pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
    }
    Ok(())
}

/// Detaches the socket programs an earlier agent left attached (socket LB
/// now off): Services are then translated per packet only.
pub fn detach(links_dir: &Path) {
    for name in PROGS_SOCK {
        std::fs::remove_file(pin_path(links_dir, name)).ok();
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on a
/// unified system, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .context("no cgroup2 file system is mounted")
}
