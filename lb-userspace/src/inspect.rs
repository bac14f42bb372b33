//! `lb inspect services|backends|conntrack|policy|identities`: the live
//! maps of a node as tables (as `cilium-dbg bpf lb list` prints them) or as
//! JSON (`-o json`). The views are pure functions of map snapshots; only
//! `run` touches the pinned maps.

use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};
use lb_common::{
    backend::BACKEND_F_LOCAL,
    conntrack::{
        ConntrackEntry, ConntrackKey, CT_FORWARD, CT_F_CLOSING, CT_F_EXTERNAL, CT_POLICY_EGRESS,
        CT_POLICY_INGRESS, CT_REPLY,
    },
    policy::{
        DIR_INGRESS, ENDPOINT_F_EGRESS_ISOLATED, ENDPOINT_F_INGRESS_ISOLATED, IDENTITY_HOST,
        IDENTITY_WORLD,
    },
    service::{
        SERVICE_F_AFFINITY, SERVICE_F_CLUSTER_IP, SERVICE_F_EXTERNAL, SERVICE_F_LOCAL,
        SERVICE_F_NODE_PORT, SERVICE_F_SOURCE_RANGES,
    },
};
use serde::Serialize;

use crate::{
    plan::{backend_addr, MapState},
    policy::PolicyState,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    Services,
    Backends,
    Conntrack,
    Policy,
    Identities,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

fn ip(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(be))
}

fn proto_name(p: u8) -> String {
    match p {
        0 => "ANY".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ServiceView {
    pub frontend: String,
    pub protocol: String,
    /// ClusterIP, NodePort, External (LoadBalancer ingress / externalIPs).
    pub types: Vec<&'static str>,
    pub rev_nat_id: lb_common::service::RevNatId,
    pub affinity_timeout_seconds: Option<u32>,
    pub backends: Vec<SlotView>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct SlotView {
    pub slot: u16,
    pub backend_id: u32,
    /// None when the slot names a backend that is not in the map (which
    /// the agent never writes: it would show a bug or a hand edit).
    pub address: Option<String>,
    pub local: bool,
}

pub fn services_view(state: &MapState) -> Vec<ServiceView> {
    let mut out = Vec::new();
    // By address as people read it (the keys hold network byte order).
    let mut masters: Vec<_> = state.services.iter().filter(|(k, _)| k.slot == 0).collect();
    masters.sort_by_key(|(k, _)| (ip(k.addr), u16::from_be(k.port), k.proto));
    for (key, master) in masters {
        let flag = |f: u16| master.flags & f != 0;
        let mut types = Vec::new();
        for (f, name) in [
            (SERVICE_F_CLUSTER_IP, "ClusterIP"),
            (SERVICE_F_NODE_PORT, "NodePort"),
            (SERVICE_F_EXTERNAL, "External"),
            (SERVICE_F_LOCAL, "Local"),
            (SERVICE_F_SOURCE_RANGES, "SourceRanges"),
        ] {
            if flag(f) {
                types.push(name);
            }
        }
        let backends = (1..=master.count)
            .filter_map(|slot| {
                let v = state
                    .services
                    .get(&lb_common::service::ServiceKey { slot, ..*key })?;
                let b = state.backends.get(&v.backend_id);
                Some(SlotView {
                    slot,
                    backend_id: v.backend_id,
                    address: b.map(|b| {
                        let a = backend_addr(b);
                        format!("{}:{}", a.ip, a.port)
                    }),
                    local: b.is_some_and(|b| b.flags & BACKEND_F_LOCAL != 0),
                })
            })
            .collect();
        out.push(ServiceView {
            frontend: format!("{}:{}", ip(key.addr), u16::from_be(key.port)),
            protocol: proto_name(key.proto),
            types,
            rev_nat_id: master.rev_nat_id,
            affinity_timeout_seconds: flag(SERVICE_F_AFFINITY).then_some(master.affinity_timeout),
            backends,
        });
    }
    out
}

pub fn render_services(views: &[ServiceView]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<22} {:<5} {:<4} {:<22} {:>6}  FLAGS",
        "FRONTEND", "PROTO", "SLOT", "BACKEND", "REVNAT"
    );
    for v in views {
        let mut flags = v.types.join(", ");
        if let Some(t) = v.affinity_timeout_seconds {
            let _ = write!(flags, ", ClientIP affinity {t}s");
        }
        let _ = writeln!(
            o,
            "{:<22} {:<5} {:<4} {:<22} {:>6}  [{flags}]",
            v.frontend,
            v.protocol,
            0,
            format!("({} backends)", v.backends.len()),
            v.rev_nat_id
        );
        for b in &v.backends {
            let _ = writeln!(
                o,
                "{:<22} {:<5} {:<4} {:<22} {:>6}  {}",
                "",
                "",
                b.slot,
                b.address.as_deref().unwrap_or("(missing)"),
                v.rev_nat_id,
                if b.local { "[local]" } else { "" }
            );
        }
    }
    o
}

#[derive(Debug, Serialize, PartialEq)]
pub struct BackendView {
    pub id: u32,
    pub address: String,
    pub protocol: String,
    pub local: bool,
}

pub fn backends_view(state: &MapState) -> Vec<BackendView> {
    state
        .backends
        .iter()
        .map(|(id, b)| {
            let a = backend_addr(b);
            BackendView {
                id: *id,
                address: format!("{}:{}", a.ip, a.port),
                protocol: proto_name(b.proto),
                local: a.local,
            }
        })
        .collect()
}

pub fn render_backends(views: &[BackendView]) -> String {
    let mut o = format!("{:>6}  {:<22} {:<5} FLAGS\n", "ID", "ADDRESS", "PROTO");
    for b in views {
        let _ = writeln!(
            o,
            "{:>6}  {:<22} {:<5} {}",
            b.id,
            b.address,
            b.protocol,
            if b.local { "[local]" } else { "" }
        );
    }
    o
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ConntrackView {
    pub source: String,
    pub destination: String,
    pub protocol: String,
    /// forward (client to backend), reply, policy-egress, policy-ingress.
    pub kind: &'static str,
    /// The other side of the translation: the backend for a forward entry,
    /// the Service address for a reply entry.
    pub nat: Option<String>,
    pub backend_id: u32,
    pub rev_nat_id: lb_common::service::RevNatId,
    pub snat: Option<String>,
    pub idle_seconds: u64,
    pub flags: Vec<&'static str>,
}

/// `now_ns`: CLOCK_MONOTONIC, the clock the data path stamps entries with
/// (to the last tick: `lb-ebpf/src/clock.rs`).
pub fn conntrack_view(
    entries: &[(ConntrackKey, ConntrackEntry)],
    now_ns: u64,
) -> Vec<ConntrackView> {
    let mut out: Vec<ConntrackView> = entries
        .iter()
        .map(|(k, e)| {
            let mut flags = Vec::new();
            if e.flags & CT_F_EXTERNAL != 0 {
                flags.push("external");
            }
            if e.flags & CT_F_CLOSING != 0 {
                flags.push("closing");
            }
            if e.flags & lb_common::conntrack::CT_F_RESET != 0 {
                flags.push("reset");
            }
            ConntrackView {
                source: format!("{}:{}", ip(k.saddr), u16::from_be(k.sport)),
                destination: format!("{}:{}", ip(k.daddr), u16::from_be(k.dport)),
                protocol: proto_name(k.proto),
                kind: match k.direction {
                    CT_FORWARD => "forward",
                    CT_REPLY => "reply",
                    CT_POLICY_EGRESS => "policy-egress",
                    CT_POLICY_INGRESS => "policy-ingress",
                    _ => "unknown",
                },
                nat: (e.nat_addr != 0)
                    .then(|| format!("{}:{}", ip(e.nat_addr), u16::from_be(e.nat_port))),
                backend_id: e.backend_id,
                rev_nat_id: e.rev_nat_id,
                snat: (e.snat_addr != 0)
                    .then(|| format!("{}:{}", ip(e.snat_addr), u16::from_be(e.snat_port))),
                idle_seconds: now_ns.saturating_sub(e.last_seen_ns) / 1_000_000_000,
                flags,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (a.kind, &a.source, &a.destination).cmp(&(b.kind, &b.source, &b.destination))
    });
    out
}

pub fn render_conntrack(views: &[ConntrackView]) -> String {
    let mut o = format!(
        "{:<15} {:<22} {:<22} {:<5} {:<22} {:>7} {:>6}  FLAGS\n",
        "KIND", "SOURCE", "DESTINATION", "PROTO", "NAT", "BACKEND", "IDLE"
    );
    for c in views {
        let mut flags = c.flags.join(",");
        if let Some(s) = &c.snat {
            if !flags.is_empty() {
                flags.push(',');
            }
            let _ = write!(flags, "snat {s}");
        }
        let _ = writeln!(
            o,
            "{:<15} {:<22} {:<22} {:<5} {:<22} {:>7} {:>5}s  {flags}",
            c.kind,
            c.source,
            c.destination,
            c.protocol,
            c.nat.as_deref().unwrap_or("-"),
            c.backend_id,
            c.idle_seconds,
        );
    }
    o
}

fn identity_name(id: u32) -> String {
    match id {
        0 => "any".into(),
        IDENTITY_HOST => "host".into(),
        IDENTITY_WORLD => "world".into(),
        n => n.to_string(),
    }
}

#[derive(Debug, Serialize, PartialEq)]
pub struct EndpointView {
    pub address: String,
    pub endpoint_id: u16,
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct RuleView {
    pub endpoint_id: u16,
    pub direction: &'static str,
    pub protocol: String,
    /// A security identity, "any", "host" or "world".
    pub identity: String,
    /// A port or a range `first-last` (endPort), or "any".
    pub ports: String,
    pub rule_id: u32,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct PolicyView {
    pub endpoints: Vec<EndpointView>,
    pub rules: Vec<RuleView>,
}

pub fn policy_view(state: &PolicyState) -> PolicyView {
    let endpoints = state
        .endpoints
        .iter()
        .map(|(addr, e)| EndpointView {
            address: ip(*addr).to_string(),
            endpoint_id: e.endpoint_id,
            ingress_isolated: e.flags & ENDPOINT_F_INGRESS_ISOLATED != 0,
            egress_isolated: e.flags & ENDPOINT_F_EGRESS_ISOLATED != 0,
        })
        .collect();
    let rules = state
        .rules
        .iter()
        .map(|((k, bits), rule_id)| {
            let first = u16::from_be(k.port);
            let span = 1u32 << (16 - u32::from((*bits).min(16)));
            let last = (u32::from(first) + span - 1).min(65535);
            RuleView {
                endpoint_id: k.endpoint_id,
                direction: if k.direction == DIR_INGRESS {
                    "ingress"
                } else {
                    "egress"
                },
                protocol: proto_name(k.proto),
                identity: identity_name(k.identity),
                ports: match (*bits, first, last) {
                    (0, ..) => "any".into(),
                    (_, f, l) if u32::from(f) == l => f.to_string(),
                    (_, f, l) => format!("{f}-{l}"),
                },
                rule_id: *rule_id,
            }
        })
        .collect();
    PolicyView { endpoints, rules }
}

pub fn render_policy(v: &PolicyView) -> String {
    let mut o = format!("{:<16} {:>8}  ISOLATED\n", "ENDPOINT", "ID");
    for e in &v.endpoints {
        let iso: Vec<&str> = [
            (e.ingress_isolated, "ingress"),
            (e.egress_isolated, "egress"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        let iso = if iso.is_empty() {
            "-".to_string()
        } else {
            iso.join(",")
        };
        let _ = writeln!(o, "{:<16} {:>8}  {iso}", e.address, e.endpoint_id);
    }
    let _ = writeln!(
        o,
        "\n{:>8}  {:<9} {:<5} {:<10} {:<12} {:>6}",
        "ENDPOINT", "DIRECTION", "PROTO", "IDENTITY", "PORTS", "RULE"
    );
    for r in &v.rules {
        let _ = writeln!(
            o,
            "{:>8}  {:<9} {:<5} {:<10} {:<12} {:>6}",
            r.endpoint_id, r.direction, r.protocol, r.identity, r.ports, r.rule_id
        );
    }
    o
}

#[derive(Debug, Serialize, PartialEq)]
pub struct IdentityView {
    pub prefix: String,
    pub identity: u32,
    pub name: String,
}

pub fn identities_view(state: &PolicyState) -> Vec<IdentityView> {
    state
        .ipcache
        .iter()
        .map(|((addr, len), id)| IdentityView {
            prefix: format!("{}/{len}", ip(*addr)),
            identity: *id,
            name: identity_name(*id),
        })
        .collect()
}

pub fn render_identities(views: &[IdentityView]) -> String {
    let mut o = format!("{:<20} IDENTITY\n", "PREFIX");
    for v in views {
        let name = if v.name == v.identity.to_string() {
            String::new()
        } else {
            format!(" ({})", v.name)
        };
        let _ = writeln!(o, "{:<20} {}{name}", v.prefix, v.identity);
    }
    o
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn emit<T: Serialize>(
    output: Output,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> Result<String> {
    Ok(match output {
        Output::Table => table(value),
        Output::Json => serde_json::to_string_pretty(value)? + "\n",
    })
}

/// Which conntrack entries `lb inspect conntrack` shows.
#[derive(Clone, Copy, Debug, Default, clap::Args)]
pub struct ConntrackFilter {
    /// Only entries with this address on either side (or as NAT/SNAT address).
    #[arg(long)]
    pub addr: Option<Ipv4Addr>,
    /// Only entries with this port on either side (or as NAT/SNAT port).
    #[arg(long)]
    pub port: Option<u16>,
    /// Show at most this many entries.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Counts by state and the SNAT tuples held, instead of the entries.
    #[arg(long)]
    pub summary: bool,
}

impl ConntrackFilter {
    /// Whether the entry names the filter's address and port anywhere.
    pub fn matches(&self, k: &ConntrackKey, e: &ConntrackEntry) -> bool {
        let addrs = [k.saddr, k.daddr, e.nat_addr, e.snat_addr];
        let ports = [k.sport, k.dport, e.nat_port, e.snat_port];
        self.addr
            .is_none_or(|a| addrs.contains(&u32::from(a).to_be()))
            && self.port.is_none_or(|p| ports.contains(&p.to_be()))
    }
}

/// The conntrack table, filtered, or its summary.
fn conntrack(maps: &crate::datapath::Maps, output: Output, f: ConntrackFilter) -> Result<String> {
    let mut entries = Vec::new();
    crate::datapath::batch::for_each_entry(&maps.conntrack, |k, e| entries.push((*k, *e)))
        .context("reading the conntrack map")?;
    let now = monotonic_ns();
    if f.summary {
        return emit(output, &crate::conntrack::summarize(&entries, now), |s| {
            render_conntrack_summary(s)
        });
    }
    let chosen: Vec<_> = entries
        .into_iter()
        .filter(|(k, e)| f.matches(k, e))
        .collect();
    let mut views = conntrack_view(&chosen, now);
    views.truncate(f.limit.unwrap_or(usize::MAX));
    emit(output, &views, |v| render_conntrack(v))
}

pub fn render_conntrack_summary(s: &crate::conntrack::Summary) -> String {
    format!(
        "entries            {}\n  tcp established  {}\n  tcp closing      {}\n  tcp reset        {}\n  udp              {}\n  policy           {}\nsnat tuples held   {} (at most {} towards one backend, of {} ports)\n",
        s.total(),
        s.tcp_established,
        s.tcp_closing,
        s.tcp_reset,
        s.udp,
        s.policy,
        s.snat_tuples_held,
        s.snat_tuples_held_max_backend,
        lb_common::node::SNAT_PORT_COUNT,
    )
}

/// Reads the maps pinned in `pin_dir` and renders `what`.
pub fn run(pin_dir: &Path, what: What, output: Output, ct: ConntrackFilter) -> Result<String> {
    let maps = crate::datapath::Maps::open_pinned(pin_dir)
        .with_context(|| format!("is an agent running with --pin-dir {}?", pin_dir.display()))?;
    match what {
        What::Services => emit(output, &services_view(&maps.state()?), |v| {
            render_services(v)
        }),
        What::Backends => emit(output, &backends_view(&maps.state()?), |v| {
            render_backends(v)
        }),
        What::Conntrack => conntrack(&maps, output, ct),
        What::Policy => emit(
            output,
            &policy_view(&crate::datapath::policy_maps::current(&maps)?),
            render_policy,
        ),
        What::Identities => emit(
            output,
            &identities_view(&crate::datapath::policy_maps::current(&maps)?),
            |v| render_identities(v),
        ),
    }
}

#[cfg(test)]
#[path = "inspect_tests.rs"]
mod tests;
