//! Rule sets shaped like kube-proxy's, for the end-to-end comparison: the
//! iptables mode (KUBE-SERVICES tests every ClusterIP in turn, then a
//! KUBE-SVC chain picks an endpoint with `statistic random`, then a KUBE-SEP
//! chain DNATs) and the nftables mode (one verdict-map lookup on
//! address . protocol . port, then `numgen random` into endpoint chains).
//! Pure text generation; the bench loads it with iptables-restore and
//! `nft -f` in the lab node's namespace. Only what a ClusterIP to pod
//! connection meets is generated, and for the churn bench the iptables
//! mode's NodePorts with externalTrafficPolicy Cluster (KUBE-NODEPORTS,
//! KUBE-EXT); no firewall chains, no Local policy.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
};

use serde_json::Value;

use crate::lab::store::meta_str;

/// One Service port as kube-proxy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// "namespace/name:port".
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<SocketAddrV4>,
}

/// Every TCP port of every Service with a ClusterIP, with the ready
/// endpoints its EndpointSlices give that port (matched by port name, as
/// kube-proxy does), sorted by name.
pub fn service_ports(services: &[Value], slices: &[Value]) -> Vec<ServicePort> {
    // Each Service's slices, by namespace and Service name: looking them up
    // per Service would be quadratic, and the bench has 30,000 of each.
    let mut by_service: std::collections::HashMap<(&str, &str), Vec<&Value>> = Default::default();
    for slice in slices {
        if let Some(svc) = slice["metadata"]["labels"]["kubernetes.io/service-name"].as_str() {
            by_service
                .entry((meta_str(slice, "namespace"), svc))
                .or_default()
                .push(slice);
        }
    }
    let mut out = Vec::new();
    for svc in services {
        let Some(cluster_ip) = svc["spec"]["clusterIP"]
            .as_str()
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        let (ns, name) = (meta_str(svc, "namespace"), meta_str(svc, "name"));
        for port in svc["spec"]["ports"].as_array().into_iter().flatten() {
            if port["protocol"].as_str().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let Some(number) = port["port"].as_u64().and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            let port_name = port["name"].as_str().unwrap_or("");
            let mut endpoints = Vec::new();
            let own = by_service.get(&(ns, name)).into_iter().flatten();
            for slice in own {
                let Some(target) = slice["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["name"].as_str().unwrap_or("") == port_name)
                    .and_then(|p| p["port"].as_u64())
                    .and_then(|p| u16::try_from(p).ok())
                else {
                    continue;
                };
                for ep in slice["endpoints"].as_array().into_iter().flatten() {
                    if ep["conditions"]["ready"] == false {
                        continue;
                    }
                    for a in ep["addresses"].as_array().into_iter().flatten() {
                        if let Some(ip) = a.as_str().and_then(|s| s.parse().ok()) {
                            endpoints.push(SocketAddrV4::new(ip, target));
                        }
                    }
                }
            }
            endpoints.sort();
            out.push(ServicePort {
                name: format!("{ns}/{name}:{port_name}"),
                cluster_ip,
                port: number,
                endpoints,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The pod network: traffic from outside it to a ClusterIP is masqueraded.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
const MASQ_MARK: &str = "0x4000";

/// kube-proxy names chains by a hash of what they stand for (base32 of
/// SHA-256, 16 characters); any stable 16-character name keeps the shape.
fn chain_hash(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    // FNV-1a, 64 bits, twice with different seeds: 80 bits for 16 chars.
    let fnv = |seed: u64| {
        s.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let (a, b) = (fnv(0xcbf2_9ce4_8422_2325), fnv(0x8422_2325_cbf2_9ce4));
    (0..16)
        .map(|i| {
            let v = if i < 12 {
                a >> (i * 5)
            } else {
                b >> ((i - 12) * 5)
            };
            ALPHABET[(v & 31) as usize] as char
        })
        .collect()
}

fn svc_chain(sp: &ServicePort) -> String {
    format!("KUBE-SVC-{}", chain_hash(&format!("{}tcp", sp.name)))
}

fn sep_chain(sp: &ServicePort, ep: &SocketAddrV4) -> String {
    format!("KUBE-SEP-{}", chain_hash(&format!("{}tcp{ep}", sp.name)))
}

fn ext_chain(sp: &ServicePort) -> String {
    // kube-proxy hashes the same name for KUBE-EXT as for KUBE-SVC.
    format!("KUBE-EXT-{}", chain_hash(&format!("{}tcp", sp.name)))
}

/// The whole nat table for iptables-restore (without --noflush: it
/// replaces the table). Only packets from `client` jump to KUBE-SERVICES:
/// kube-proxy jumps for every packet; the bench matches the source so that
/// the iptables and the nftables rules can sit in one node at once, each
/// serving its own client pod, with nothing to switch between measurements.
///
/// kube-proxy itself restores with --noflush, to share the table; the
/// iptables-nft 1.8 here is quadratic in that mode (6,000 Services: 8 s
/// against 1 s), so the bench, alone in the node's nat table, replaces it.
pub fn iptables_restore(services: &[ServicePort], client: Ipv4Addr) -> String {
    nat_table(services, Some(client), &[])
}

/// The whole nat table as [`iptables_restore`], with NodePorts too: each
/// `(Service port, node port)` of `node_ports` (the Service port also one
/// of `services`: a NodePort Service has a ClusterIP and its KUBE-SVC
/// chain) opens on every local address of the node, with
/// externalTrafficPolicy Cluster. Every packet jumps to KUBE-SERVICES, as
/// with kube-proxy: outside clients come from anywhere, so there is no
/// source to match (the nftables rules cannot sit beside these).
pub fn iptables_restore_with_node_ports(
    services: &[ServicePort],
    node_ports: &[(&ServicePort, u16)],
) -> String {
    nat_table(services, None, node_ports)
}

/// kube-proxy's NodePort part for Service port `sp` on `node_port`
/// (externalTrafficPolicy Cluster): the KUBE-EXT chain's declaration, then
/// the rules: KUBE-NODEPORTS matches the port and jumps to KUBE-EXT, which
/// marks the packet for masquerade (the endpoint may be on another node, and
/// its answer must come back through this one to be un-DNATed) and goes on
/// to the Service's KUBE-SVC chain, the ClusterIP's own endpoint choice.
pub fn iptables_node_port(sp: &ServicePort, node_port: u16) -> (String, String) {
    let (ext, svc, name) = (ext_chain(sp), svc_chain(sp), &sp.name);
    (
        format!(":{ext} - [0:0]\n"),
        format!(
            "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{name}\" -m tcp --dport {node_port} -j {ext}\n\
             -A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ\n\
             -A {ext} -j {svc}\n"
        ),
    )
}

/// The nat table: PREROUTING jumps to KUBE-SERVICES (for packets from
/// `client` only, when given), which tests every ClusterIP in turn and,
/// with `node_ports`, ends with the jump to KUBE-NODEPORTS for packets to
/// one of the node's own addresses.
fn nat_table(
    services: &[ServicePort],
    client: Option<Ipv4Addr>,
    node_ports: &[(&ServicePort, u16)],
) -> String {
    let node_port_parts: Vec<(String, String)> = node_ports
        .iter()
        .map(|(sp, port)| iptables_node_port(sp, *port))
        .collect();
    let mut o = String::from("*nat\n");
    for chain in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        let _ = writeln!(o, ":{chain} ACCEPT [0:0]");
    }
    for chain in ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] {
        let _ = writeln!(o, ":{chain} - [0:0]");
    }
    if !node_ports.is_empty() {
        o.push_str(":KUBE-NODEPORTS - [0:0]\n");
    }
    for sp in services {
        let _ = writeln!(o, ":{} - [0:0]", svc_chain(sp));
        for ep in &sp.endpoints {
            let _ = writeln!(o, ":{} - [0:0]", sep_chain(sp, ep));
        }
    }
    for (declaration, _) in &node_port_parts {
        o.push_str(declaration);
    }
    let from = client.map(|c| format!(" -s {c}/32")).unwrap_or_default();
    let _ = writeln!(
        o,
        "-A PREROUTING{from} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"
    );
    let _ = writeln!(
        o,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"
    );
    for sp in services {
        service_rules(&mut o, sp);
    }
    if !node_ports.is_empty() {
        o.push_str(
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
        );
    }
    for (_, rules) in &node_port_parts {
        o.push_str(rules);
    }
    o.push_str("COMMIT\n");
    o
}

/// One Service port's rules: its KUBE-SERVICES match, its KUBE-SVC chain
/// (masquerade from outside the pod network, then the endpoint choice) and
/// its endpoints' KUBE-SEP chains.
fn service_rules(o: &mut String, sp: &ServicePort) {
    let (svc, ip, port, name) = (svc_chain(sp), sp.cluster_ip, sp.port, &sp.name);
    let _ = writeln!(
        o,
        "-A KUBE-SERVICES -d {ip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {port} -j {svc}"
    );
    let _ = writeln!(
        o,
        "-A {svc} ! -s {CLUSTER_CIDR} -d {ip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {port} -j KUBE-MARK-MASQ"
    );
    let n = sp.endpoints.len();
    for (i, ep) in sp.endpoints.iter().enumerate() {
        let sep = sep_chain(sp, ep);
        // As kube-proxy: endpoint i of n is taken with probability
        // 1/(n-i) among those left; the last one unconditionally.
        let statistic = if i + 1 < n {
            format!(
                " -m statistic --mode random --probability {:.10}",
                1.0 / (n - i) as f64
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            o,
            "-A {svc} -m comment --comment \"{name} -> {ep}\"{statistic} -j {sep}"
        );
    }
    for ep in &sp.endpoints {
        let sep = sep_chain(sp, ep);
        let _ = writeln!(
            o,
            "-A {sep} -s {}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ\n\
             -A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {ep}",
            ep.ip()
        );
    }
}

/// The nftables table.
pub const NFT_TABLE: &str = "kube-proxy";

pub(super) fn nft_service_chain(sp: &ServicePort) -> String {
    let (ns, rest) = sp.name.split_once('/').unwrap_or(("", &sp.name));
    let (svc, port) = rest.split_once(':').unwrap_or((rest, ""));
    format!(
        "service-{}-{ns}/{svc}/tcp/{port}",
        &chain_hash(&format!("{}tcp", sp.name))[..8]
    )
}

pub(super) fn nft_endpoint_chain(sp: &ServicePort, ep: &SocketAddrV4) -> String {
    let (ns, rest) = sp.name.split_once('/').unwrap_or(("", &sp.name));
    let (svc, port) = rest.split_once(':').unwrap_or((rest, ""));
    format!(
        "endpoint-{}-{ns}/{svc}/tcp/{port}__{}/{}",
        &chain_hash(&format!("{}tcp{ep}", sp.name))[..8],
        ep.ip(),
        ep.port()
    )
}

/// The part of [`nft_script`] that makes the table without Services: deletes an
/// older table of that name (it is created first, so the delete never
/// fails), then writes the hooks, the helper chains and an empty
/// `service-ips` map. Only packets from `client` jump to `services` (see
/// [`iptables_restore`]).
fn nft_table(client: Ipv4Addr) -> String {
    let t = NFT_TABLE;
    let mut o = format!("table ip {t}\ndelete table ip {t}\ntable ip {t} {{\n");
    o.push_str(
        "  comment \"rules shaped like kube-proxy's nftables mode\"\n\
         \x20 chain mark-for-masquerade {\n    meta mark set meta mark | 0x4000\n  }\n\
         \x20 chain masquerading {\n    meta mark & 0x4000 == 0 return\n    meta mark set meta mark ^ 0x4000\n    masquerade fully-random\n  }\n\
         \x20 chain nat-postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n    jump masquerading\n  }\n\
         \x20 map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n  }\n\
         \x20 chain services {\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }\n",
    );
    let _ = writeln!(
        o,
        "  chain nat-prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    ip saddr {client} jump services\n  }}\n}}"
    );
    o
}

/// A Service's chain as it sits in a `table ip kube-proxy { }` block:
/// masquerade what comes from outside the pod network, then pick an
/// endpoint.
pub(super) fn nft_service_chain_block(sp: &ServicePort) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "  chain {} {{", nft_service_chain(sp));
    let _ = writeln!(
        o,
        "    ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        sp.cluster_ip, sp.port
    );
    // kube-proxy writes `numgen random mod 1 vmap { 0 : goto ... }` for
    // one endpoint too. Here such a Service jumps straight to its
    // endpoint: every `numgen ... vmap { }` is an anonymous set, and
    // this kernel names each new one by scanning every set of the table
    // (`nf_tables_set_alloc_name`), so 30,000 of them took 5 minutes to
    // load and 20,000 took 75 s. The Service is found by the same
    // verdict-map lookup either way.
    if let [ep] = sp.endpoints[..] {
        let _ = writeln!(o, "    goto {}", nft_endpoint_chain(sp, &ep));
    } else if !sp.endpoints.is_empty() {
        let arms: Vec<String> = sp
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, ep)| format!("{i} : goto {}", nft_endpoint_chain(sp, ep)))
            .collect();
        let _ = writeln!(
            o,
            "    numgen random mod {} vmap {{ {} }}",
            sp.endpoints.len(),
            arms.join(", ")
        );
    }
    o.push_str("  }\n");
    o
}

/// An endpoint's chain as it sits in a `table ip kube-proxy { }` block.
pub(super) fn nft_endpoint_chain_block(sp: &ServicePort, ep: &SocketAddrV4) -> String {
    format!(
        "  chain {} {{\n    ip saddr {} jump mark-for-masquerade\n    meta l4proto tcp dnat to {ep}\n  }}\n",
        nft_endpoint_chain(sp, ep),
        ep.ip()
    )
}

/// The part of [`nft_script`] that adds `services` to the table
/// [`nft_table`] made: each Service's chain and its endpoints' chains, then its element
/// in `service-ips`. Empty when there are no Services.
fn nft_services(services: &[ServicePort]) -> String {
    let t = NFT_TABLE;
    if services.is_empty() {
        return String::new();
    }
    let mut o = format!("table ip {t} {{\n");
    for sp in services {
        o.push_str(&nft_service_chain_block(sp));
        for ep in &sp.endpoints {
            o.push_str(&nft_endpoint_chain_block(sp, ep));
        }
    }
    let _ = writeln!(o, "}}\nadd element ip {t} service-ips {{");
    for sp in services {
        let _ = writeln!(
            o,
            "  {} . tcp . {} : goto {},",
            sp.cluster_ip,
            sp.port,
            nft_service_chain(sp)
        );
    }
    o.push_str("}\n");
    o
}

/// A script for `nft -f`: the whole rule set, one transaction (as
/// kube-proxy's full sync).
pub fn nft_script(services: &[ServicePort], client: Ipv4Addr) -> String {
    nft_table(client) + &nft_services(services)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> ServicePort {
        ServicePort {
            name: "default/web:http".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            endpoints: vec![
                SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), 8080),
                SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 3), 8080),
                SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 4), 8080),
            ],
        }
    }

    #[test]
    fn iptables_rules_have_kube_proxys_shape() {
        let text = iptables_restore(&[web()], Ipv4Addr::new(10, 244, 1, 9));
        let svc = svc_chain(&web());
        let lines: Vec<&str> = text.lines().collect();
        // One KUBE-SERVICES match per Service port, jumping to its chain.
        let services: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        assert_eq!(services.len(), 1);
        assert!(services[0].contains("-d 10.96.0.10/32 -p tcp"));
        assert!(services[0].ends_with(&format!("--dport 80 -j {svc}")));
        // Endpoint choice: 1/3, then 1/2, then the last unconditionally.
        let picks: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("-A {svc} -m comment")))
            .collect();
        assert_eq!(picks.len(), 3);
        assert!(picks[0].contains("--probability 0.3333333333"));
        assert!(picks[1].contains("--probability 0.5000000000"));
        assert!(!picks[2].contains("statistic"));
        // Each endpoint's chain DNATs to it.
        for ep in &web().endpoints {
            let sep = sep_chain(&web(), ep);
            assert!(text.contains(&format!(":{sep} - [0:0]")));
            assert!(text.contains(&format!("-A {sep} -p tcp -m comment --comment \"default/web:http\" -m tcp -j DNAT --to-destination {ep}")));
        }
        assert!(text.starts_with("*nat\n") && text.ends_with("COMMIT\n"));
        // Chain names fit iptables' 28 characters and are distinct.
        let mut chains: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert!(chains.iter().all(|c| c.len() <= 28));
        let n = chains.len();
        chains.sort();
        chains.dedup();
        assert_eq!(chains.len(), n, "chain names collide");
    }

    #[test]
    fn iptables_node_ports_have_kube_proxys_shape() {
        let text = iptables_restore_with_node_ports(&[web()], &[(&web(), 30080)]);
        let (svc, ext) = (svc_chain(&web()), ext_chain(&web()));
        let lines: Vec<&str> = text.lines().collect();
        let chain = |name: &str| -> Vec<&str> {
            let prefix = format!("-A {name} ");
            lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&prefix))
                .collect()
        };
        // Every packet takes the Service rules: outside clients have no
        // one source to match.
        assert_eq!(
            chain("PREROUTING"),
            ["-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"]
        );
        // The ClusterIP first, then, last, packets for the node's own
        // addresses go to KUBE-NODEPORTS.
        let services = chain("KUBE-SERVICES");
        assert_eq!(services.len(), 2);
        assert!(services[0].ends_with(&format!("--dport 80 -j {svc}")));
        assert!(services[1].ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"));
        // The node port goes to KUBE-EXT, which marks, then takes the
        // Service's own endpoint choice.
        assert_eq!(
            chain("KUBE-NODEPORTS"),
            [format!("-A KUBE-NODEPORTS -p tcp -m comment --comment \"default/web:http\" -m tcp --dport 30080 -j {ext}")]
        );
        let ext_rules = chain(&ext);
        assert_eq!(ext_rules.len(), 2);
        assert!(ext_rules[0].ends_with("-j KUBE-MARK-MASQ"));
        assert_eq!(ext_rules[1], format!("-A {ext} -j {svc}"));
        assert_eq!(ext[9..], svc[9..], "KUBE-EXT and KUBE-SVC share a hash");
        // Marked packets, and only they, are masqueraded (Linux conntrack
        // picks the port), the mark cleared first.
        assert_eq!(
            chain("KUBE-POSTROUTING"),
            [
                "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
                "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
                "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
            ]
        );
        assert_eq!(
            chain("KUBE-MARK-MASQ"),
            ["-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"]
        );
        assert_eq!(chain(&svc).len(), 4, "the masquerade match and 3 picks");
        // Every chain jumped to is declared (iptables-restore refuses the
        // table otherwise), and fits iptables' 28 characters.
        let declared: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert!(declared.iter().all(|c| c.len() <= 28));
        const TARGETS: [&str; 4] = ["DNAT", "MASQUERADE", "MARK", "RETURN"];
        for l in &lines {
            if let Some((_, target)) = l.split_once(" -j ") {
                let target = target.split_whitespace().next().unwrap_or("");
                assert!(
                    declared.contains(&target) || TARGETS.contains(&target),
                    "{l}: {target} is not declared"
                );
            }
        }
        // The ClusterIP-only table has no NodePort part.
        let plain = iptables_restore(&[web()], Ipv4Addr::new(10, 244, 1, 9));
        assert!(!plain.contains("KUBE-NODEPORTS") && !plain.contains("KUBE-EXT"));
    }

    #[test]
    fn nftables_rules_have_kube_proxys_shape() {
        let text = nft_script(&[web()], Ipv4Addr::new(10, 244, 1, 9));
        let chain = nft_service_chain(&web());
        assert!(chain.starts_with("service-") && chain.ends_with("-default/web/tcp/http"));
        assert!(text.contains(&format!("10.96.0.10 . tcp . 80 : goto {chain},")));
        assert!(text.contains("ip daddr . meta l4proto . th dport vmap @service-ips"));
        assert!(text.contains("numgen random mod 3 vmap { 0 : goto endpoint-"));
        for ep in &web().endpoints {
            assert!(text.contains(&format!("meta l4proto tcp dnat to {ep}")));
        }
        // Only the bench's own client takes the rules.
        assert!(text.contains(
            "type nat hook prerouting priority dstnat; policy accept;\n    ip saddr 10.244.1.9 jump services"
        ));
        assert!(iptables_restore(&[web()], Ipv4Addr::new(10, 244, 1, 9))
            .contains("-A PREROUTING -s 10.244.1.9/32 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"));
    }

    #[test]
    fn service_ports_from_services_and_slices() {
        let services = vec![
            serde_json::json!({"metadata": {"name": "web", "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.10", "ports": [
                    {"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}}),
            serde_json::json!({"metadata": {"name": "headless", "namespace": "default"},
                "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}}),
        ];
        let slices = vec![
            serde_json::json!({"metadata": {"name": "web-1", "namespace": "default",
                    "labels": {"kubernetes.io/service-name": "web"}},
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [
                    {"addresses": ["10.244.1.3"], "conditions": {"ready": true}},
                    {"addresses": ["10.244.1.2"]},
                    {"addresses": ["10.244.1.9"], "conditions": {"ready": false}}]}),
            // Another namespace's slice of the same name is not ours.
            serde_json::json!({"metadata": {"name": "web-1", "namespace": "other",
                    "labels": {"kubernetes.io/service-name": "web"}},
                "ports": [{"name": "http", "port": 9090}],
                "endpoints": [{"addresses": ["10.244.2.2"]}]}),
        ];
        let got = service_ports(&services, &slices);
        assert_eq!(
            got,
            vec![ServicePort {
                name: "default/web:http".into(),
                cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
                port: 80,
                endpoints: vec![
                    SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), 8080),
                    SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 3), 8080),
                ],
            }]
        );
    }

    #[test]
    fn a_one_endpoint_service_goes_straight_to_its_endpoint_in_nftables() {
        let mut sp = web();
        sp.endpoints.truncate(1);
        let nft = nft_script(&[sp.clone()], Ipv4Addr::new(10, 244, 1, 9));
        assert!(!nft.contains("numgen"));
        let ep = nft_endpoint_chain(&sp, &sp.endpoints[0]);
        assert!(nft.contains(&format!("    goto {ep}\n")));
        assert!(nft.contains(&format!("  chain {ep} {{\n")));
        assert!(nft.contains("meta l4proto tcp dnat to 10.244.1.2:8080"));
    }

    #[test]
    fn a_service_without_endpoints_has_no_endpoint_choice() {
        let mut sp = web();
        sp.endpoints.clear();
        let nft = nft_script(&[sp.clone()], Ipv4Addr::new(10, 244, 1, 9));
        assert!(!nft.contains("numgen"));
        let ipt = iptables_restore(&[sp], Ipv4Addr::new(10, 244, 1, 9));
        assert!(!ipt.contains("KUBE-SEP"));
        assert_eq!(
            nft_script(&[], Ipv4Addr::new(10, 244, 1, 9))
                .matches("add element")
                .count(),
            0
        );
    }
}
