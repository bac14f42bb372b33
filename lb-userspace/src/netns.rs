//! Entering network namespaces: for a child process (before exec) and for a
//! thread of this process. Only the network namespace is switched, never the
//! mount namespace, so /sys/fs/bpf stays the machine's (unlike `ip netns exec`,
//! which remounts /sys and would hide pinned maps).

use std::{
    fs::File,
    os::{fd::AsFd, unix::process::CommandExt},
    path::PathBuf,
    process::Command,
};

use anyhow::{Context, Result};
use nix::sched::{setns, CloneFlags};

pub fn path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

fn open(name: &str) -> Result<File> {
    File::open(path(name)).with_context(|| format!("network namespace {name} not found"))
}

/// A command that runs `program` inside network namespace `name`.
/// With `die_with_parent`, the child gets SIGKILL when this process dies.
pub fn command_in(
    name: &str,
    program: impl AsRef<std::ffi::OsStr>,
    die_with_parent: bool,
) -> Result<Command> {
    let ns = open(name)?;
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe calls (setns, prctl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            if die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Runs `f` on a new thread that has entered network namespace `name`;
/// sockets created there stay in that namespace.
pub fn run_in<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    spawn_in(name, f)?
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
}

/// Starts `f` on a new thread that has entered network namespace `name`.
pub fn spawn_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<T>>> {
    let ns = open(name)?;
    Ok(std::thread::spawn(move || -> Result<T> {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(f())
    }))
}
