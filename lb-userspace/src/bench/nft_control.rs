//! The control path's peer: the same cluster as kube-proxy's nftables mode
//! would write it, in a network namespace of its own. Its initial sync is
//! one `nft -f` of the whole table (kube-proxy's full sync); an endpoint
//! change is one `nft -f` of a partial sync as kube-proxy writes it (the
//! new endpoint's chain, the Service's chain flushed and written again, the
//! gone endpoint's chain deleted); a burst of changes is one `nft -f` of
//! all their partial syncs (kube-proxy batches what arrives within its
//! sync period). Each is timed from the spawn of `nft` to its exit, as
//! knftables runs it; kube-proxy's own watch and its minimum sync period
//! (1 s by default) come on top, so these are its floor.

use std::{
    fmt::Write,
    net::{Ipv4Addr, SocketAddrV4},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use super::kube_proxy::{
    nft_endpoint_chain, nft_endpoint_chain_block, nft_script, nft_service_chain,
    nft_service_chain_block, ServicePort, NFT_TABLE,
};

/// The nftables side's figures.
#[derive(Debug, Default)]
pub struct Results {
    pub sync: Vec<Duration>,
    pub change: Vec<Duration>,
    pub burst: Option<Duration>,
}

/// Service `i` of the bench's cluster with `n` of its endpoints (the same
/// addresses as the lab's EndpointSlices give lb).
pub fn service_port(i: usize, n: usize, per: usize) -> ServicePort {
    let base = u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 16 + i as u32;
    ServicePort {
        name: format!("default/svc-{i}:http"),
        cluster_ip: Ipv4Addr::from(base),
        port: 80,
        endpoints: (0..n)
            .map(|e| SocketAddrV4::new(super::control::endpoint_ip(i, e, per), 8080))
            .collect(),
    }
}

/// kube-proxy's partial sync of one Service whose endpoints went from
/// `old` to `new`: chains of new endpoints first (the Service's chain will
/// jump to them), the Service's chain rewritten, then the chains no longer
/// jumped to deleted.
pub fn partial_sync(old: &ServicePort, new: &ServicePort) -> String {
    let t = NFT_TABLE;
    let mut o = String::new();
    let added: Vec<_> = new
        .endpoints
        .iter()
        .filter(|e| !old.endpoints.contains(e))
        .collect();
    let _ = writeln!(o, "table ip {t} {{");
    for ep in added {
        o.push_str(&nft_endpoint_chain_block(new, ep));
    }
    o.push_str("}\n");
    let _ = writeln!(o, "flush chain ip {t} {}", nft_service_chain(new));
    let _ = write!(o, "table ip {t} {{\n{}}}\n", nft_service_chain_block(new));
    for ep in old.endpoints.iter().filter(|e| !new.endpoints.contains(e)) {
        let _ = writeln!(o, "delete chain ip {t} {}", nft_endpoint_chain(old, ep));
    }
    o
}

/// Runs `nft -f -` with `script` in network namespace `netns`; how long it
/// took from spawn to exit.
fn nft(netns: &str, script: &str) -> Result<Duration> {
    let started = Instant::now();
    super::e2e::load(netns, "nft", &["-f", "-"], script)?;
    Ok(started.elapsed())
}

/// The peer's initial syncs, `changes` single changes and one burst of
/// `burst` changes, for `services` Services of `endpoints` each, in a
/// namespace named `netns` made for it and removed after.
pub fn run(
    netns: &str,
    (services, endpoints): (usize, usize),
    (syncs, changes, burst): (usize, usize, usize),
) -> Result<Results> {
    let _ns = Namespace::add(netns)?;
    let mut cluster: Vec<ServicePort> = (0..services)
        .map(|i| service_port(i, endpoints, endpoints))
        .collect();
    // The rules only take packets from this source: none in this namespace.
    let client = Ipv4Addr::new(10, 244, 255, 254);
    let mut out = Results::default();
    for _ in 0..syncs {
        out.sync.push(nft(netns, &nft_script(&cluster, client))?);
    }
    // The same Services as lb's change, in the same order.
    let mut flip = |i: usize| {
        let old = cluster[i].clone();
        let n = super::control::flipped_count(old.endpoints.len(), endpoints);
        cluster[i] = service_port(i, n, endpoints);
        partial_sync(&old, &cluster[i])
    };
    for k in 0..changes {
        let script = flip(super::control::changed_service(k, services));
        out.change.push(nft(netns, &script)?);
    }
    if burst > 0 {
        let script: String = (0..burst)
            .map(|k| flip(super::control::burst_service(k, services)))
            .collect();
        out.burst = Some(nft(netns, &script)?);
    }
    Ok(out)
}

/// A network namespace removed on drop (also when the bench fails).
struct Namespace(String);

impl Namespace {
    fn add(name: &str) -> Result<Self> {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", name])
            .status()?
            .success();
        if !ok {
            bail!("ip netns add {name}");
        }
        Ok(Self(name.to_string()))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_sync_adds_new_chains_first_rewrites_the_service_and_deletes_gone_ones() {
        let full = service_port(3, 3, 3);
        let less = service_port(3, 2, 3);
        let gone = full.endpoints[2];
        let script = partial_sync(&full, &less);
        let svc = nft_service_chain(&full);
        let flush = script
            .find(&format!("flush chain ip kube-proxy {svc}"))
            .unwrap();
        let rewrite = script.find("numgen random mod 2 vmap").unwrap();
        let delete = script
            .find(&format!(
                "delete chain ip kube-proxy {}",
                nft_endpoint_chain(&full, &gone)
            ))
            .unwrap();
        assert!(flush < rewrite && rewrite < delete, "{script}");
        // Giving it back: the chain comes before the jump to it.
        let back = partial_sync(&less, &full);
        let chain = back
            .find(&format!("chain {} {{", nft_endpoint_chain(&full, &gone)))
            .unwrap();
        assert!(chain < back.find("numgen random mod 3").unwrap(), "{back}");
        assert!(!back.contains("delete chain"));
    }
}
