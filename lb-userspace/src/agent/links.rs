//! Pod links: the programs go on every interface named with the pod
//! prefix as soon as it appears. The kernel says when links come and go
//! (netlink, RTMGRP_LINK), so a new pod's veth is attached within
//! milliseconds instead of at the next poll; a slow poll stays as a net
//! under it (a notification lost when the socket's buffer overran).

use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{Context, Result};
use nix::sys::socket::{
    bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use tokio::io::unix::AsyncFd;

use crate::datapath::{
    attach::{interfaces_with_prefix, Attacher},
    Datapath,
};

/// `RTMGRP_LINK` (linux/rtnetlink.h): link created, changed or deleted.
const RTMGRP_LINK: u32 = 1;

/// Notifications of link changes in this network namespace.
pub struct LinkEvents {
    fd: AsyncFd<OwnedFd>,
}

impl LinkEvents {
    pub fn subscribe() -> Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .context("netlink socket")?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, RTMGRP_LINK)).context("netlink bind")?;
        // SAFETY: the AsyncFd owns the socket (an OwnedFd), which stays open
        // with the same descriptor for as long as the AsyncFd lives.
        let fd = unsafe { AsyncFd::register(fd) }
            .map_err(|e| anyhow::anyhow!("watching the netlink socket: {e}"))?;
        Ok(Self { fd })
    }

    /// Waits for the next notification, then reads all that are queued
    /// (one pass of `sync_links` covers them all).
    pub async fn changed(&mut self) {
        let mut buf = vec![0u8; 64 * 1024];
        let Ok(mut guard) = self.fd.readable_mut().await else {
            return std::future::pending().await;
        };
        loop {
            match recv(
                guard.get_inner().as_raw_fd(),
                &mut buf,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => break,
                Ok(_) => continue,
                // Drained; or overran (ENOBUFS): a sync reads the links anyway.
                Err(_) => break,
            }
        }
        guard.clear_ready();
    }
}

/// Attaches the programs to new pod links and forgets the removed ones.
pub fn sync_links(dp: &mut Datapath, attacher: &mut Attacher, prefix: &str) {
    let present = match interfaces_with_prefix(prefix) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("{e:#}");
            return;
        }
    };
    for ifname in &present {
        if !attacher.attached().contains(ifname) {
            match attacher.attach(dp, ifname) {
                Ok(()) => tracing::info!(interface = %ifname, "programs attached"),
                Err(e) => tracing::warn!(interface = %ifname, "attach failed: {e:#}"),
            }
        }
    }
    attacher.prune(&present);
}
