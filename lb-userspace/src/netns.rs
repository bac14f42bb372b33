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

/// `/etc/netns/NAME`: files `ip netns exec` binds over `/etc` (resolv.conf).
pub fn etc_dir(name: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(name)
}

/// `command_in` for a pod's command (`lb lab exec`, `kubectl exec`): also in
/// a mount namespace of its own where the pod's resolv.conf, if it has one,
/// is bound over /etc/resolv.conf, as `ip netns exec` does, so names resolve
/// through cluster DNS. Nothing else is remounted (/sys/fs/bpf stays).
pub fn command_in_pod(name: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
    let mut cmd = command_in(name, program, false)?;
    let resolv = etc_dir(name).join("resolv.conf");
    if resolv.exists() {
        let source = std::ffi::CString::new(resolv.as_os_str().as_encoded_bytes())
            .context("resolv.conf path")?;
        // SAFETY: only async-signal-safe calls (unshare, mount) between fork
        // and exec, on strings made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let ok = |r: libc::c_int| {
                    if r == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                };
                ok(libc::unshare(libc::CLONE_NEWNS))?;
                // Our mounts must not propagate back to the machine's.
                ok(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                ))?;
                ok(libc::mount(
                    source.as_ptr(),
                    c"/etc/resolv.conf".as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))
            });
        }
    }
    Ok(cmd)
}

/// A command on the host that gets SIGKILL when this process dies.
pub fn host_command_dying_with_parent(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
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
