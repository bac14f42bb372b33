//! The lab's network, built with iproute2 in namespaces of its own, wired as
//! kind wires a cluster: nodes on one bridged network, pods behind veths
//! routed by their node. Nothing is added to the machine's root namespace.
//!
//! Names (P is the lab's prefix): netns `P-net` (the bridge), `P-nodeN`,
//! `P-ext` (outside client), `P-podK`; host-side pod veths `PhK`.

use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use tokio::process::Command;

/// MAC of every host-side pod veth; pods reach their gateway through it.
pub const HOST_VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The pods' default gateway (link-local, answered by the host veth).
pub const POD_GATEWAY: &str = "169.254.1.1";

/// Runs a command, failing with its stderr.
async fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {program} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub async fn ip(args: &[&str]) -> Result<()> {
    run("ip", args).await
}

async fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    // `ip netns exec` is fine here: sysctl touches only /proc/sys/net.
    ip(&[
        "netns",
        "exec",
        netns,
        "sysctl",
        "-qw",
        &format!("{key}={value}"),
    ])
    .await
}

pub fn node_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 18, 0, 10 + index as u8)
}

pub fn pod_cidr(index: usize) -> (Ipv4Addr, u8) {
    (Ipv4Addr::new(10, 244, index as u8, 0), 24)
}

pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);

#[derive(Clone, Debug)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    pub fn bridge_ns(&self) -> String {
        format!("{}-net", self.prefix)
    }
    pub fn node_ns(&self, index: usize) -> String {
        format!("{}-node{index}", self.prefix)
    }
    pub fn ext_ns(&self) -> String {
        format!("{}-ext", self.prefix)
    }
    pub fn pod_ns(&self, k: u32) -> String {
        format!("{}-pod{k}", self.prefix)
    }
    pub fn host_veth(&self, k: u32) -> String {
        format!("{}h{k}", self.prefix)
    }
    /// Prefix of all host-side pod veths: what the agent attaches to.
    pub fn host_veth_prefix(&self) -> String {
        format!("{}h", self.prefix)
    }
}

/// Creates the bridge namespace and the outside client.
pub async fn create_network(n: &Names) -> Result<()> {
    let br = n.bridge_ns();
    ip(&["netns", "add", &br]).await?;
    ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]).await?;
    ip(&["-n", &br, "link", "set", "br0", "up"]).await?;
    ip(&["-n", &br, "link", "set", "lo", "up"]).await?;
    attach_host(n, &n.ext_ns(), &format!("{}x", n.prefix), EXT_IP).await?;
    let (pool, len) = LB_POOL;
    ip(&[
        "-n",
        &n.ext_ns(),
        "route",
        "add",
        &format!("{pool}/{len}"),
        "via",
        &node_ip(1).to_string(),
    ])
    .await
}

/// A namespace with `eth0` on the bridge at `addr/24`.
async fn attach_host(n: &Names, netns: &str, bridge_port: &str, addr: Ipv4Addr) -> Result<()> {
    let br = n.bridge_ns();
    ip(&["netns", "add", netns]).await?;
    ip(&[
        "-n",
        &br,
        "link",
        "add",
        bridge_port,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        netns,
    ])
    .await?;
    ip(&["-n", &br, "link", "set", bridge_port, "master", "br0", "up"]).await?;
    ip(&["-n", netns, "link", "set", "lo", "up"]).await?;
    ip(&[
        "-n",
        netns,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ])
    .await?;
    ip(&["-n", netns, "link", "set", "eth0", "up"]).await?;
    // Packets on this network stand for packets on a wire, which carry
    // complete checksums (XDP on the uplinks updates them incrementally).
    run(
        "ip",
        &["netns", "exec", netns, "ethtool", "-K", "eth0", "tx", "off"],
    )
    .await
}

/// LoadBalancer addresses the lab hands out, routed from the outside client
/// through node 1 (as a BGP or L2 announcement would make them reachable).
pub const LB_POOL: (Ipv4Addr, u8) = (Ipv4Addr::new(172, 18, 255, 0), 24);

/// Creates node `index` of `count`: on the bridge, forwarding, with routes to
/// the other nodes' pod CIDRs.
pub async fn create_node(n: &Names, index: usize, count: usize) -> Result<()> {
    let ns = n.node_ns(index);
    attach_host(n, &ns, &format!("{}n{index}", n.prefix), node_ip(index)).await?;
    sysctl(&ns, "net.ipv4.ip_forward", "1").await?;
    sysctl(&ns, "net.ipv4.conf.all.rp_filter", "0").await?;
    sysctl(&ns, "net.ipv4.conf.default.rp_filter", "0").await?;
    // NodePort flows SNATed back out of eth0 must not trigger redirects.
    sysctl(&ns, "net.ipv4.conf.all.send_redirects", "0").await?;
    sysctl(&ns, "net.ipv4.conf.eth0.send_redirects", "0").await?;
    for other in (1..=count).filter(|o| *o != index) {
        let (net, len) = pod_cidr(other);
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            &format!("{net}/{len}"),
            "via",
            &node_ip(other).to_string(),
        ])
        .await?;
    }
    Ok(())
}

/// Creates pod namespace `k` with address `pod_ip`, wired to node `node`.
pub async fn create_pod(n: &Names, node: usize, k: u32, pod_ip: Ipv4Addr) -> Result<()> {
    let (node_ns, pod_ns, veth) = (n.node_ns(node), n.pod_ns(k), n.host_veth(k));
    ip(&["netns", "add", &pod_ns]).await?;
    ip(&[
        "-n",
        &node_ns,
        "link",
        "add",
        &veth,
        "address",
        HOST_VETH_MAC,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &pod_ns,
    ])
    .await?;
    ip(&["-n", &pod_ns, "link", "set", "lo", "up"]).await?;
    ip(&[
        "-n",
        &pod_ns,
        "addr",
        "add",
        &format!("{pod_ip}/32"),
        "dev",
        "eth0",
    ])
    .await?;
    ip(&["-n", &pod_ns, "link", "set", "eth0", "up"]).await?;
    ip(&[
        "-n",
        &pod_ns,
        "route",
        "add",
        POD_GATEWAY,
        "dev",
        "eth0",
        "scope",
        "link",
    ])
    .await?;
    ip(&[
        "-n",
        &pod_ns,
        "route",
        "add",
        "default",
        "via",
        POD_GATEWAY,
        "dev",
        "eth0",
    ])
    .await?;
    ip(&[
        "-n",
        &pod_ns,
        "neigh",
        "replace",
        POD_GATEWAY,
        "lladdr",
        HOST_VETH_MAC,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])
    .await?;
    ip(&["-n", &node_ns, "link", "set", &veth, "up"]).await?;
    ip(&[
        "-n",
        &node_ns,
        "route",
        "add",
        &format!("{pod_ip}/32"),
        "dev",
        &veth,
        "scope",
        "link",
    ])
    .await
}

/// Removes a pod's namespace (its veth goes with it).
pub async fn delete_pod(n: &Names, k: u32) -> Result<()> {
    let _ = std::fs::remove_dir_all(crate::netns::etc_dir(&n.pod_ns(k)));
    ip(&["netns", "del", &n.pod_ns(k)]).await
}

/// The pod's resolv.conf, where `ip netns exec` (and `lb lab exec`,
/// `kubectl exec`) bind it over /etc/resolv.conf: cluster DNS with the
/// search path of a pod in namespace `namespace`, as the kubelet writes it.
pub fn write_resolv_conf(netns: &str, namespace: &str) -> Result<()> {
    let dir = crate::netns::etc_dir(netns);
    std::fs::create_dir_all(&dir)?;
    let d = super::dns::DOMAIN;
    std::fs::write(
        dir.join("resolv.conf"),
        format!(
            "search {namespace}.svc.{d} svc.{d} {d}\nnameserver {}\noptions ndots:5\n",
            super::dns::DNS_IP
        ),
    )?;
    Ok(())
}

/// Every namespace of the lab with this prefix (also those of a lab that died).
pub fn lab_namespaces(prefix: &str) -> Vec<String> {
    let own = format!("{prefix}-");
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(&own))
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process left in the lab's namespaces and deletes them. Sync,
/// so it can run from Drop and from `lb lab down` after a crash.
pub fn destroy(prefix: &str) {
    for ns in lab_namespaces(prefix) {
        if let Ok(out) = std::process::Command::new("ip")
            .args(["netns", "pids", &ns])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &ns])
            .status();
        let _ = std::fs::remove_dir_all(crate::netns::etc_dir(&ns));
    }
}
