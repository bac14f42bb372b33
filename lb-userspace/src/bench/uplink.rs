//! Per-packet cost of the uplink programs (`lb_uplink` on XDP,
//! `lb_uplink_tc` on tc ingress): what a packet from outside the node to a
//! NodePort, LoadBalancer or external IP costs, measured as `lb_from_pod`
//! is (`datapath`: kernel-timed BPF_PROG_TEST_RUN, repeat 1, each run on
//! its own input, verdict and bytes checked), on the same maps.
//!
//! The measured Service is the same one (`VIP:80`, ten backends and a
//! Maglev table; not a ClusterIP, so reachable from outside as an external
//! IP is); this node has an address, so a new flow is DNATed to a backend
//! and SNATed to the node (`externalTrafficPolicy: Cluster`).

use std::net::Ipv4Addr;

use anyhow::{ensure, Result};

use super::datapath::{datapath_with, ip, run_once, Measured, TestRunDyn, VIP};
use super::Stats;
use crate::{
    datapath::{Datapath, PROG_UPLINK_TC},
    packet::Frame,
};

const TC_ACT_OK: u32 = 0;
const XDP_PASS: u32 = 2;
/// This node's address: the SNAT source of flows from outside.
const NODE: &str = "172.18.0.2";
/// Clients outside the cluster.
const OUTSIDE: &str = "172.18.0.101";
/// New flows per figure at most: each takes one of the node's 31,744 SNAT
/// ports towards its backend, and a flow's entries stay (the bench never
/// closes one), so more would measure a node out of SNAT ports.
pub const MAX_NEW_FLOWS: usize = 100_000;

/// The uplink's two hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    pub const ALL: [Hook; 2] = [Hook::Xdp, Hook::Tc];

    pub fn program(self) -> &'static str {
        match self {
            Hook::Xdp => "lb_uplink (XDP)",
            Hook::Tc => "lb_uplink_tc (tc)",
        }
    }

    fn pass(self) -> u32 {
        match self {
            Hook::Xdp => XDP_PASS,
            Hook::Tc => TC_ACT_OK,
        }
    }
}

/// What one packet from outside is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UplinkPath {
    NewFlow,
    Established,
    NoService,
}

impl UplinkPath {
    pub const ALL: [UplinkPath; 3] = [
        UplinkPath::NewFlow,
        UplinkPath::Established,
        UplinkPath::NoService,
    ];

    pub fn name(self) -> &'static str {
        match self {
            UplinkPath::NewFlow => "new flow from outside (DNAT and SNAT)",
            UplinkPath::Established => "established flow from outside",
            UplinkPath::NoService => "packet for no Service",
        }
    }
}

/// The label of a figure: the path, then the program.
pub fn label(path: UplinkPath, hook: Hook) -> String {
    format!("{}, {}", path.name(), hook.program())
}

/// A SYN from outside (a new client address every 60,000 flows) to `dst`.
fn syn_from_outside(flow: usize, dst: &str) -> Vec<u8> {
    from_outside(flow, dst).build(b"")
}

/// The packet after the handshake, as most of a connection's are: an ACK.
fn ack_from_outside(flow: usize, dst: &str) -> Vec<u8> {
    from_outside(flow, dst).build_ack(b"")
}

fn from_outside(flow: usize, dst: &str) -> Frame {
    let sport = 1024 + (flow % 60000) as u16;
    let src = Ipv4Addr::from(u32::from(ip(OUTSIDE)) + (flow / 60000) as u32);
    Frame::tcp(&src.to_string(), sport, dst, 80)
}

fn program(dp: &mut Datapath, hook: Hook) -> Result<&mut dyn TestRunDyn> {
    Ok(match hook {
        Hook::Xdp => dp.xdp()?,
        Hook::Tc => dp.program(PROG_UPLINK_TC)?,
    })
}

/// Measures `path` through `hook` with `services` Services: `batches` of
/// `per_batch` runs (new flows: at most `MAX_NEW_FLOWS` in all).
pub fn measure(
    path: UplinkPath,
    hook: Hook,
    services: usize,
    batches: usize,
    per_batch: usize,
) -> Result<Measured> {
    let per_batch = match path {
        UplinkPath::NewFlow => per_batch.min(MAX_NEW_FLOWS / batches.max(1)),
        _ => per_batch,
    };
    let mut dp = datapath_with(services)?;
    dp.maps.set_node(Some(ip(NODE)))?;
    let established = ack_from_outside(0, VIP);
    let no_service = ack_from_outside(0, "172.18.0.200");
    let prog = program(&mut dp, hook)?;
    let mut expected = Vec::new();
    if path == UplinkPath::Established {
        // The flow's SYN creates its entries; the runs are the ACKs after.
        run_once(prog, &syn_from_outside(0, VIP), &mut expected)?;
        check_new(hook, hook.pass(), &expected)?;
        run_once(prog, &established, &mut expected)?;
        check_new(hook, hook.pass(), &expected)?;
    }
    let mut out = Vec::new();
    let mut means = Vec::with_capacity(batches);
    let mut flow = 1;
    for _ in 0..batches {
        let mut total = 0;
        for _ in 0..per_batch {
            let fresh;
            let input: &[u8] = match path {
                UplinkPath::NewFlow => {
                    fresh = syn_from_outside(flow, VIP);
                    flow += 1;
                    &fresh
                }
                UplinkPath::Established => &established,
                UplinkPath::NoService => &no_service,
            };
            let (verdict, ns) = run_once(prog, input, &mut out)?;
            total += ns;
            match path {
                UplinkPath::NewFlow => check_new(hook, verdict, &out)?,
                UplinkPath::Established => ensure!(
                    verdict == hook.pass() && out == expected,
                    "established flow from outside: verdict {verdict}, or its output differs from its first packet's"
                ),
                UplinkPath::NoService => ensure!(
                    verdict == hook.pass() && out == input,
                    "a packet from outside for no Service: verdict {verdict}, or it was changed"
                ),
            }
        }
        means.push(total as f64 / per_batch as f64);
    }
    Ok(Measured {
        label: label(path, hook),
        services,
        runs: batches * per_batch,
        ns: Stats::of(&means),
    })
}

/// A new flow from outside leaves to one of the backends, from the node.
fn check_new(hook: Hook, verdict: u32, out: &[u8]) -> Result<()> {
    ensure!(
        verdict == hook.pass(),
        "new flow from outside: verdict {verdict}"
    );
    let f = Frame::parse(out).map_err(anyhow::Error::msg)?;
    let backend = u32::from(f.dst).wrapping_sub(u32::from(Ipv4Addr::new(10, 244, 2, 10)));
    ensure!(
        backend < 10 && f.dport == 8080 && f.src == ip(NODE),
        "new flow from outside not DNATed to a backend and SNATed to the node: {}:{} -> {}:{}",
        f.src,
        f.sport,
        f.dst,
        f.dport
    );
    Ok(())
}

/// The uplink's table for BENCHMARKS.md: each path through each hook at
/// each Service count measured, with its ratio to the floor of its own
/// hook, beside `lb_from_pod`'s figure for the same kind of packet.
pub fn write_section(o: &mut String, r: &super::Results) {
    use std::fmt::Write as _;
    let mut counts: Vec<usize> = r.uplink.iter().map(|m| m.services).collect();
    counts.sort_unstable();
    counts.dedup();
    let Some(&first) = counts.first() else {
        return;
    };
    let floor = |hook: Hook| {
        let kind = match hook {
            Hook::Xdp => "XDP",
            Hook::Tc => "tc",
        };
        r.floor
            .iter()
            .find(|m| m.label.contains(kind))
            .map(|m| m.ns.median)
    };
    let _ = writeln!(o, "### The uplink programs\n");
    let _ = writeln!(
        o,
        "Packets from outside the node (NodePort, LoadBalancer, external IPs) through \
         `lb_uplink` (XDP, for NICs) and `lb_uplink_tc` (tc ingress, for veth uplinks), \
         measured as above on the same maps; the node has an address, so a new flow \
         is DNATed to a backend and SNATed to the node (`externalTrafficPolicy: \
         Cluster`), each from a new client port ({} new flows at most per figure, so \
         that the node's SNAT ports stay under a third used). `lb_from_pod`'s figure \
         for the same kind of packet (from a pod, no SNAT) is beside them.\n",
        MAX_NEW_FLOWS
    );
    let _ = write!(o, "| path |");
    for hook in Hook::ALL {
        for n in &counts {
            let _ = write!(o, " {}, {n} Services |", hook.program());
        }
        let kind = match hook {
            Hook::Xdp => "XDP",
            Hook::Tc => "tc",
        };
        let _ = write!(o, " ×floor ({kind}) at {first} |");
    }
    let _ = writeln!(o, " lb_from_pod at {first} |");
    let _ = writeln!(
        o,
        "|---|{}",
        "---|".repeat(Hook::ALL.len() * (counts.len() + 1) + 1)
    );
    for path in UplinkPath::ALL {
        let _ = write!(o, "| {} |", path.name());
        for hook in Hook::ALL {
            let at = |n: usize| {
                r.uplink
                    .iter()
                    .find(|m| m.label == label(path, hook) && m.services == n)
            };
            for n in &counts {
                let _ = match at(*n) {
                    Some(m) => write!(o, " {:.0} ({:.0}–{:.0}) |", m.ns.median, m.ns.min, m.ns.max),
                    None => write!(o, " – |"),
                };
            }
            let _ = match (at(first), floor(hook)) {
                (Some(m), Some(f)) if f > 0.0 => write!(o, " {:.1} |", m.ns.median / f),
                _ => write!(o, " – |"),
            };
        }
        let from_pod = match path {
            UplinkPath::NewFlow => "new flow to a Service",
            UplinkPath::Established => "established flow",
            UplinkPath::NoService => "packet for no Service",
        };
        let _ = match r
            .datapath
            .iter()
            .find(|m| m.label == from_pod && m.services == first)
        {
            Some(m) => writeln!(o, " {:.0} |", m.ns.median),
            None => writeln!(o, " – |"),
        };
    }
    let _ = writeln!(o);
}
