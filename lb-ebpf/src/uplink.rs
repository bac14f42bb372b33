//! `lb_uplink` (XDP) and `lb_uplink_tc` (tc ingress): the node's uplink,
//! for traffic that arrives from outside the node: NodePort, LoadBalancer
//! and external-IP frontends, and the replies of flows this node SNATed.
//! ClusterIPs are not reachable from outside, as with kube-proxy.
//!
//! One program body for both hooks (`nat::Hook`). XDP is the cheaper hook where
//! the driver runs it on its own receive buffers (a NIC). On a veth (a kind
//! node's eth0, the lab's nodes) native XDP copies nearly every packet into
//! a page of its own first (`veth_convert_skb_to_xdp_buff`: a TCP packet is
//! a clone, and has less headroom than XDP wants), and generic XDP does the
//! same: there tc ingress, which reads the packet where it lies and copies
//! only the header of a packet it rewrites, costs less (the agent picks the
//! hook: `datapath::attach::UplinkHook`).

use lb_common::{
    conntrack::{ConntrackEntry, CT_F_EXTERNAL, CT_F_TUPLE_REUSED},
    metrics::reason,
    service::{SERVICE_F_CLUSTER_IP, SERVICE_F_LOCAL},
};

use crate::{
    conntrack::{self, NewFlow},
    lb::{
        count_midflow_miss, flow_hash, keeps_backend, lookup_reply, lookup_service, select_backend,
        source_allowed,
    },
    maps::{ENDPOINTS, NODE},
    metrics::count,
    nat::{self, Hook, Side},
    packet::{self, Flow},
    policy,
};

/// What the uplink program decides for a packet; each hook has its codes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
}

use Verdict::{Drop as DROP, Pass as PASS};

#[inline(always)]
pub fn uplink<H: Hook>(ctx: &H) -> Result<Verdict, Verdict> {
    let Some(flow) = packet::flow_or_count(ctx) else {
        return Ok(PASS);
    };

    if let Some(entry) = lookup_reply(ctx, &flow) {
        rewrite_both(ctx, &flow, Side::Source, &entry)?;
        count(ctx, reason::REVERSE_NAT);
        return Ok(PASS);
    }
    let tracked = conntrack::lookup_translated(ctx, &conntrack::forward_key(&flow), &flow);
    if let Some(entry) = &tracked {
        if keeps_backend(ctx, entry, &flow) {
            rewrite_both(ctx, &flow, Side::Destination, entry)?;
            count(ctx, reason::FORWARDED);
            return Ok(PASS);
        }
    }

    let Some(service) = lookup_service(&flow, 0) else {
        count_reply_miss(ctx, &flow);
        return Ok(PASS);
    };
    if service.flags & SERVICE_F_CLUSTER_IP != 0 {
        return Ok(PASS);
    }
    if tracked.is_none() {
        count_midflow_miss(ctx, &flow);
    }
    if !source_allowed(&flow, &service) {
        count(ctx, reason::DROP_SOURCE_RANGE);
        return Err(DROP);
    }
    let Some((backend_id, backend)) = select_backend(&flow, &service) else {
        // Left to the node's stack, which refuses it: a TCP RST or an ICMP
        // port unreachable, since nothing listens on the node port.
        count(ctx, reason::REJECT_NO_BACKEND);
        return Ok(PASS);
    };
    // externalTrafficPolicy: Cluster -> SNAT to the node, so the replies come
    // back here whichever node the backend is on; Local keeps the client.
    let local = service.flags & SERVICE_F_LOCAL != 0;
    let to_backend = Flow {
        daddr: backend.addr,
        dport: backend.port,
        ..flow
    };
    // Before the SNAT port is taken: a dropped flow must not hold one.
    if !local && !policy::admit_at_entry(&to_backend) {
        count(ctx, reason::DROP_POLICY);
        return Err(DROP);
    }
    let mut new = NewFlow {
        backend_id,
        backend: &backend,
        rev_nat_id: service.rev_nat_id,
        snat: (0, 0),
        flags: CT_F_EXTERNAL,
    };
    if !local {
        let (snat, reused) = snat_source(ctx, &flow, &new).ok_or_else(|| {
            count(ctx, reason::SNAT_ALLOC_FAILED);
            DROP
        })?;
        new.snat = snat;
        if reused {
            new.flags |= CT_F_TUPLE_REUSED;
        }
    }
    if conntrack::create(&flow, &new, !local).is_err() {
        count(ctx, reason::CT_INSERT_FAILED);
        return Err(DROP);
    }
    let entry = new.forward();
    rewrite_both(ctx, &flow, Side::Destination, &entry)?;
    count(ctx, reason::NEW_FLOW);
    Ok(PASS)
}

/// `nat::rewrite_both`, a failure counted and dropped.
#[inline(always)]
fn rewrite_both<H: Hook>(
    ctx: &H,
    flow: &Flow,
    first: Side,
    entry: &ConntrackEntry,
) -> Result<(), Verdict> {
    nat::rewrite_both(ctx, flow, first, entry).map_err(|()| {
        count(ctx, reason::DROP_REWRITE_FAILED);
        DROP
    })
}

/// The node's address and a free port for the new flow's source, whose
/// tuple at the backend it takes with its reply entry, and whether that
/// tuple was given up by a closed connection.
#[inline(always)]
fn snat_source<H: Hook>(ctx: &H, flow: &Flow, new: &NewFlow) -> Option<((u32, u16), bool)> {
    let node = NODE.get(0)?;
    if node.addr == 0 {
        return None;
    }
    let range = (node.snat_port_min, node.snat_port_count);
    let (port, reused) = conntrack::free_port(ctx, flow, new, node.addr, range, flow_hash(flow))?;
    Some(((node.addr, port), reused))
}

/// A pod's packet to this node's SNAT range that no entry restores: the
/// reply entry of an SNATed connection was evicted while it was live (the
/// node's stack answers it with a reset). Only from pods (every pod has an
/// endpoint entry), so that other nodes' traffic to the node's own servers
/// on those ports does not count; SYNs open connections of their own.
/// Replies of local backends are not seen here (they pass the pod's tc).
#[inline(always)]
fn count_reply_miss<H: Hook>(ctx: &H, flow: &Flow) {
    if conntrack::opens_connection(flow) {
        return;
    }
    let Some(node) = NODE.get(0) else {
        return;
    };
    let offset = u16::from_be(flow.dport).wrapping_sub(node.snat_port_min);
    if flow.daddr == node.addr
        && offset < node.snat_port_count
        && ENDPOINTS.get_ptr(flow.saddr).is_some()
    {
        count(ctx, reason::REPLY_MISS);
    }
}
