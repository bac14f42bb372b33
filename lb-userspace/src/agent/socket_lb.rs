//! Socket LB at the agent: its programs on the configured cgroup (or an
//! earlier agent's taken off), and the sockets pinned to a backend that
//! is gone closed (`datapath::sock_destroy`).

use std::{collections::BTreeSet, time::Instant};

use anyhow::{Context, Result};
use lb_common::PROTO_UDP;

use super::AgentConfig;
use crate::{
    datapath::{sock_destroy, socket_lb, Datapath},
    translate::BackendAddr,
};

/// Socket LB on (its programs attached to the configured cgroup) or off
/// (an earlier agent's links removed). Asked for and not possible is an
/// error: the operator chose it, and pods would silently go without it.
pub fn attach_or_detach(dp: &mut Datapath, cfg: &AgentConfig) -> Result<()> {
    let links = cfg.pin_dir.join("socket");
    let Some(cgroup) = &cfg.socket_lb_cgroup else {
        socket_lb::detach(&links);
        return Ok(());
    };
    socket_lb::attach(dp, &links, cgroup)
        .with_context(|| format!("socket LB on cgroup {}", cgroup.display()))?;
    tracing::info!(
        cgroup = %cgroup.display(),
        "socket LB on: Services translated at connect() and sendmsg()"
    );
    if let Some(why) = sock_destroy::why_sockets_cannot_be_closed(cgroup) {
        tracing::warn!(
            "socket LB: a connected UDP socket whose backend is removed cannot be closed ({why}): \
             it keeps sending to that backend until the application opens a new one"
        );
    }
    Ok(())
}

/// The UDP backends among `gone`, as sockets name their destination.
fn udp_destinations(gone: &[BackendAddr]) -> BTreeSet<(std::net::Ipv4Addr, u16)> {
    gone.iter()
        .filter(|b| b.proto == PROTO_UDP)
        .map(|b| (b.ip, b.port))
        .collect()
}

/// Closes the pods' connected UDP sockets whose backend is in `gone`,
/// off the agent's loop (one thread per pod network namespace). TCP
/// connections need nothing: the backend's end is gone with its pod, so
/// they fail and the application connects again.
pub fn close_sockets_to(cfg: &AgentConfig, gone: Vec<BackendAddr>) {
    let Some(cgroup) = cfg.socket_lb_cgroup.clone() else {
        return;
    };
    let destinations = udp_destinations(&gone);
    if destinations.is_empty() {
        return;
    }
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        match sock_destroy::destroy_in_cgroup(&cgroup, &destinations) {
            Ok(n) => tracing::info!(
                sockets = n,
                backends = destinations.len(),
                took_ms = started.elapsed().as_millis() as u64,
                "closed the UDP sockets connected to removed backends"
            ),
            Err(e) => tracing::warn!("closing UDP sockets of removed backends: {e:#}"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_udp_backends_have_sockets_to_close() {
        let b = |port, proto| BackendAddr {
            ip: std::net::Ipv4Addr::new(10, 244, 1, 5),
            port,
            proto,
            local: true,
        };
        let gone = [b(5353, PROTO_UDP), b(8080, lb_common::PROTO_TCP)];
        assert_eq!(
            udp_destinations(&gone),
            BTreeSet::from([(std::net::Ipv4Addr::new(10, 244, 1, 5), 5353)])
        );
    }
}
