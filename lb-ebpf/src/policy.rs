//! NetworkPolicy verdicts (see `lb_common::policy`). Checked after Service
//! translation for traffic a pod sends (egress: the backend is judged) and
//! before reverse NAT for traffic a pod receives (ingress: the sender is
//! judged). Fail closed: an isolated endpoint gets only what a rule allows.

use aya_ebpf::{bindings::BPF_RB_NO_WAKEUP, btf_maps::lpm_trie::Key};
use lb_common::{
    conntrack::{ConntrackEntry, ConntrackKey, CT_POLICY_EGRESS, CT_POLICY_INGRESS},
    policy::{
        EndpointInfo, FlowEvent, IpcacheKey, PolicyKey, DIR_EGRESS, DIR_INGRESS,
        ENDPOINT_F_EGRESS_ISOLATED, ENDPOINT_F_INGRESS_ISOLATED, IDENTITY_HOST, IDENTITY_WORLD,
        POLICY_KEY_FIXED_BITS, VERDICT_ALLOW, VERDICT_DROP,
    },
    PROTO_TCP,
};

use crate::{
    conntrack,
    maps::{CONNTRACK, ENDPOINTS, FLOWS, IPCACHE, NODE, PEER_NODES, POLICY},
    packet::Flow,
};

#[inline(always)]
fn key(flow: &Flow, direction: u8, swapped: bool) -> ConntrackKey {
    let (saddr, daddr, sport, dport) = if swapped {
        (flow.daddr, flow.saddr, flow.dport, flow.sport)
    } else {
        (flow.saddr, flow.daddr, flow.sport, flow.dport)
    };
    ConntrackKey {
        saddr,
        daddr,
        sport,
        dport,
        proto: flow.proto,
        direction,
        pad0: 0,
    }
}

/// The security identity of an address: the most specific ipcache prefix.
#[inline(always)]
pub fn identity_of(addr: u32) -> u32 {
    IPCACHE
        .get(&Key::new(32, IpcacheKey { addr }))
        .copied()
        .unwrap_or(IDENTITY_WORLD)
}

#[inline(always)]
fn endpoint(addr: u32) -> Option<EndpointInfo> {
    // SAFETY: copied out at once.
    ENDPOINTS.get_ptr(addr).map(|p| unsafe { *p })
}

#[inline(always)]
fn rule(ep: &EndpointInfo, direction: u8, proto: u8, identity: u32, port: u16) -> Option<u32> {
    let key = PolicyKey {
        endpoint_id: ep.endpoint_id,
        direction,
        proto,
        identity,
        port,
        pad0: 0,
    };
    POLICY
        .get(&Key::new(POLICY_KEY_FIXED_BITS + 16, key))
        .map(|e| e.rule_id)
}

/// The rule of `ep` that allows `identity` on `proto`/`port`, if any: exact
/// identity and protocol first, then the wildcards. The node's own traffic
/// to its pods (kubelet probes) is allowed as rule 0.
#[inline(always)]
pub fn allowed(
    ep: &EndpointInfo,
    direction: u8,
    proto: u8,
    identity: u32,
    port: u16,
) -> Option<u32> {
    if direction == DIR_INGRESS && identity == IDENTITY_HOST {
        return Some(0);
    }
    rule(ep, direction, proto, identity, port)
        .or_else(|| rule(ep, direction, 0, identity, port))
        .or_else(|| rule(ep, direction, proto, 0, port))
        .or_else(|| rule(ep, direction, 0, 0, port))
}

/// Reports the verdict on a new flow of an isolated endpoint (best effort:
/// a full ring buffer loses the event, never the packet).
#[inline(always)]
fn report(flow: &Flow, direction: u8, identity: u32, verdict: Option<u32>) {
    if let Some(mut entry) = FLOWS.reserve(0) {
        entry.write(FlowEvent {
            ts_ns: crate::clock::now(),
            saddr: flow.saddr,
            daddr: flow.daddr,
            sport: flow.sport,
            dport: flow.dport,
            proto: flow.proto,
            direction,
            verdict: if verdict.is_some() {
                VERDICT_ALLOW
            } else {
                VERDICT_DROP
            },
            pad0: 0,
            rule_id: verdict.unwrap_or(0),
            identity,
        });
        // No wakeup: `lb flows` polls the ring; a wakeup is an irq_work
        // (an interrupt) for every verdict the reader has caught up with.
        entry.submit(BPF_RB_NO_WAKEUP as u64);
    }
}

#[inline(always)]
fn known(key: &ConntrackKey, flow: &Flow) -> bool {
    conntrack::lookup(key, flow).is_some()
}

/// Whether the packet answers a flow admitted the other way (its entry
/// under `direction`, the tuple swapped). A TCP SYN answers nothing and
/// looks nothing up (`conntrack::may_answer`).
#[inline(always)]
fn answers(flow: &Flow, direction: u8) -> bool {
    conntrack::may_answer(flow) && known(&key(flow, direction, true), flow)
}

#[inline(always)]
fn track(key: &ConntrackKey) {
    let entry = ConntrackEntry {
        last_seen_ns: crate::clock::now(),
        ..Default::default()
    };
    let _ = CONNTRACK.insert(key, entry, 0);
}

/// Traffic a local pod sends (`flow` after DNAT): a reply of a flow it
/// admitted, a flow it already sends, or a new flow its egress policy allows.
/// A flow to a Service (`original` was translated to `flow`) is recorded by
/// its translation's conntrack entries, which the caller writes once it is
/// admitted: its packets and replies find those (`lb::from_pod`,
/// `lb::to_pod`), so no policy entry is kept for it. Two entries fewer per
/// connection: at thousands of new connections a second the closed ones'
/// entries are what fills the table.
///
/// The sender's endpoint is looked up first: most pods are not isolated
/// for egress, and their packets need no more (`admit_unisolated`).
#[inline(always)]
pub fn admit_egress(flow: &Flow, original: &Flow) -> bool {
    let Some(ep) = endpoint(flow.saddr) else {
        return true; // not a pod this node manages
    };
    let translated = original.daddr != flow.daddr || original.dport != flow.dport;
    let k = key(flow, CT_POLICY_EGRESS, false);
    if ep.flags & ENDPOINT_F_EGRESS_ISOLATED == 0 {
        admit_unisolated(&ep, &k, flow, translated);
        return true;
    }
    if answers(original, CT_POLICY_INGRESS) {
        return true; // a reply (matched before reverse NAT)
    }
    if !translated && known(&k, flow) {
        return true;
    }
    let identity = identity_of(flow.daddr);
    let verdict = allowed(&ep, DIR_EGRESS, flow.proto, identity, flow.dport);
    report(flow, DIR_EGRESS, identity, verdict);
    if verdict.is_none() {
        return false;
    }
    if !translated {
        track(&k);
    }
    true
}

/// A packet of a pod not isolated for egress (`k`: its flow's egress
/// entry). The flow is recorded all the same, for the pod's ingress side:
/// the replies of what a pod sent are admitted by that entry
/// (`admit_ingress`), should the pod be isolated for ingress now or later.
/// A pod isolated for ingress has each packet's entry looked up (and
/// written again if it was lost); any other records a TCP flow at its SYN
/// and a UDP flow at a packet that finds no entry, and its other TCP
/// packets need no lookup: the replies keep the entry fresh.
#[inline(always)]
fn admit_unisolated(ep: &EndpointInfo, k: &ConntrackKey, flow: &Flow, translated: bool) {
    if translated {
        return;
    }
    let per_packet = ep.flags & ENDPOINT_F_INGRESS_ISOLATED != 0 || flow.proto != PROTO_TCP;
    if conntrack::opens_connection(flow) || (per_packet && !known(k, flow)) {
        track(k);
    }
}

/// A NodePort or LoadBalancer flow from outside, about to be SNATed to this
/// node and sent to `flow.daddr` (`flow` is client -> backend): judged here
/// by the backend's ingress policy with the client's own identity, since
/// the backend's node will only see this node's address.
#[inline(always)]
pub fn admit_at_entry(flow: &Flow) -> bool {
    let Some(ep) = endpoint(flow.daddr) else {
        return true;
    };
    if ep.flags & ENDPOINT_F_INGRESS_ISOLATED == 0 {
        return true;
    }
    let identity = identity_of(flow.saddr);
    let verdict = allowed(&ep, DIR_INGRESS, flow.proto, identity, flow.dport);
    report(flow, DIR_INGRESS, identity, verdict);
    verdict.is_some()
}

/// A flow another node SNATed from its reserved port range: that node's
/// XDP already judged the client (`admit_at_entry`). Nodes trust each other
/// here as Cilium's trust the identity in a tunnel header; the range lies
/// below the NodePort range and the ephemeral ports, so the nodes' own
/// connections do not come from it (the agent warns if a node's ephemeral
/// range overlaps it).
#[inline(always)]
fn judged_at_entry_node(flow: &Flow) -> bool {
    let Some(node) = NODE.get(0) else {
        return false;
    };
    let offset = u16::from_be(flow.sport).wrapping_sub(node.snat_port_min);
    offset < node.snat_port_count && PEER_NODES.get_ptr(flow.saddr).is_some()
}

/// A pod that reached itself through its own Service (hairpin; `snatted` is
/// the flow as the pod receives it, from the Service address). A pod can
/// always reach itself, as over loopback, so no policy is consulted: the
/// flow is admitted both ways up front.
#[inline(always)]
pub fn admit_hairpin(translated: &Flow, original: &Flow, snatted: &Flow) {
    track(&key(translated, CT_POLICY_EGRESS, false));
    track(&key(original, CT_POLICY_EGRESS, false));
    track(&key(snatted, CT_POLICY_INGRESS, false));
}

/// A packet of a flow the pod already receives (admitted by its ingress
/// policy at its first packet): most packets a pod receives, so the
/// caller asks this first.
#[inline(always)]
pub fn already_received(flow: &Flow) -> bool {
    known(&key(flow, CT_POLICY_INGRESS, false), flow)
}

/// Traffic delivered to a local pod (before reverse NAT) that is not of a
/// flow it already receives (`already_received`): a reply of a flow it
/// sent, or a new flow its ingress policy allows.
#[inline(always)]
pub fn admit_ingress(flow: &Flow) -> bool {
    if answers(flow, CT_POLICY_EGRESS) {
        return true;
    }
    let Some(ep) = endpoint(flow.daddr) else {
        return true;
    };
    if ep.flags & ENDPOINT_F_INGRESS_ISOLATED != 0 && !judged_at_entry_node(flow) {
        let identity = identity_of(flow.saddr);
        let verdict = allowed(&ep, DIR_INGRESS, flow.proto, identity, flow.dport);
        report(flow, DIR_INGRESS, identity, verdict);
        if verdict.is_none() {
            return false;
        }
    }
    track(&key(flow, CT_POLICY_INGRESS, false));
    true
}
