//! Service translation: the decisions of the two tc programs.

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use aya_ebpf::{btf_maps::lpm_trie::Key, programs::TcContext};
use aya_log_ebpf::info;
use lb_common::{
    backend::Backend,
    conntrack::{ConntrackEntry, CT_F_TUPLE_REUSED},
    metrics::reason,
    service::{
        AffinityKey, AffinityValue, ServiceKey, ServiceValue, SourceRange, SERVICE_F_AFFINITY,
        SERVICE_F_SOURCE_RANGES,
    },
};

use crate::{
    conntrack::{self, Claim, NewFlow},
    logging,
    maps::{AFFINITY, BACKENDS, MAGLEV, SERVICES, SOURCE_RANGES},
    metrics::count,
    nat::{self, Side},
    packet::{self, Flow, Packet, Parsed},
    policy, reject,
};

const PASS: i32 = TC_ACT_OK;
const DROP: i32 = TC_ACT_SHOT;

/// Packets a pod sends: replies of flows it serves get their frontend back;
/// new and tracked flows to a Service are DNATed to a backend.
#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> Result<i32, i32> {
    let Some(flow) = packet::flow_or_count(ctx) else {
        return Ok(PASS);
    };

    // A backend answering a flow that this node translated: restore the
    // frontend as source (and the client as destination if it was SNATed).
    if let Some(entry) = lookup_reply(ctx, &flow) {
        reverse_nat(ctx, &flow, &entry)?;
        count(ctx, reason::REVERSE_NAT);
        return Ok(PASS);
    }

    let tracked = conntrack::lookup_translated(ctx, &conntrack::forward_key(&flow), &flow);
    if let Some(entry) = &tracked {
        // The entry was written once the pod's egress policy admitted the
        // flow: it stands for that verdict for the flow's life.
        if keeps_backend(ctx, entry, &flow) {
            dnat_snat(ctx, &flow, entry)?;
            count(ctx, reason::FORWARDED);
            return Ok(PASS);
        }
        // The backend is gone for good, or this SYN opens a new connection on
        // a closed one's 5-tuple: pick a live backend below, as for a new flow.
    }

    let Some(service) = lookup_service(&flow, 0) else {
        egress_policy(ctx, &flow, flow.daddr, flow.dport)?;
        conntrack::forget_translated_reply(&flow);
        return Ok(PASS);
    };
    if tracked.is_none() {
        count_midflow_miss(ctx, &flow);
    }
    if !source_allowed(&flow, &service) {
        if logging::enabled() {
            info!(
                ctx,
                "drop {:i}:{} -> {:i}:{}: not in loadBalancerSourceRanges",
                u32::from_be(flow.saddr),
                u16::from_be(flow.sport),
                u32::from_be(flow.daddr),
                u16::from_be(flow.dport)
            );
        }
        count(ctx, reason::DROP_SOURCE_RANGE);
        return Err(DROP);
    }
    let Some((backend_id, backend)) = select_backend(&flow, &service) else {
        if logging::enabled() {
            info!(
                ctx,
                "refuse {:i}:{} -> {:i}:{}: no backend",
                u32::from_be(flow.saddr),
                u16::from_be(flow.sport),
                u32::from_be(flow.daddr),
                u16::from_be(flow.dport)
            );
        }
        count(ctx, reason::REJECT_NO_BACKEND);
        return reject::port_unreachable(ctx, &flow).map_err(|()| {
            count(ctx, reason::DROP_REWRITE_FAILED);
            DROP
        });
    };
    // Hairpin: a pod sent to its own Service and landed on itself. Seen
    // from the pod, a packet from its own address would be a martian, so its
    // source becomes the Service address (replies come back through here).
    let hairpin = backend.addr == flow.saddr;
    let mut new = NewFlow {
        backend_id,
        backend: &backend,
        rev_nat_id: service.rev_nat_id,
        snat: (0, 0),
        flags: 0,
    };
    let mut reply_written = false;
    if hairpin {
        let translated = Flow {
            daddr: backend.addr,
            dport: backend.port,
            ..flow
        };
        let snatted = Flow {
            saddr: flow.daddr,
            ..translated
        };
        policy::admit_hairpin(&translated, &flow, &snatted);
        new.snat = (flow.daddr, flow.sport);
    } else {
        egress_policy(ctx, &flow, backend.addr, backend.port)?;
        let (port, reused) = free_source_port(ctx, &flow, &new);
        if let Some(port) = port {
            new.snat = (flow.saddr, port);
            reply_written = true;
        }
        if reused {
            new.flags |= CT_F_TUPLE_REUSED;
        }
    }
    if conntrack::create(&flow, &new, reply_written).is_err() {
        // Still forward: the flow works while it keeps this backend by hash.
        count(ctx, reason::CT_INSERT_FAILED);
    }
    let entry = new.forward();
    dnat_snat(ctx, &flow, &entry)?;
    count(ctx, reason::NEW_FLOW);
    if logging::enabled() {
        info!(
            ctx,
            "new flow {:i}:{} -> {:i}:{} to backend {:i}:{} (id {})",
            u32::from_be(flow.saddr),
            u16::from_be(flow.sport),
            u32::from_be(flow.daddr),
            u16::from_be(flow.dport),
            u32::from_be(backend.addr),
            u16::from_be(backend.port),
            backend_id
        );
    }
    Ok(PASS)
}

/// DNAT to the entry's backend, and SNAT when the entry says so (hairpin,
/// or a moved source port).
#[inline(always)]
fn dnat_snat(ctx: &TcContext, flow: &Flow, entry: &ConntrackEntry) -> Result<(), i32> {
    nat::rewrite_both(ctx, flow, Side::Destination, entry).map_err(|()| rewrite_failed(ctx))
}

/// The frontend back as the source of a reply, and the client as its
/// destination if it was SNATed.
#[inline(always)]
fn reverse_nat(ctx: &TcContext, flow: &Flow, entry: &ConntrackEntry) -> Result<(), i32> {
    nat::rewrite_both(ctx, flow, Side::Source, entry).map_err(|()| rewrite_failed(ctx))
}

#[inline(always)]
fn rewrite_failed(ctx: &TcContext) -> i32 {
    count(ctx, reason::DROP_REWRITE_FAILED);
    DROP
}

/// Egress policy of the sending pod, judged on where the packet really goes
/// (after Service translation).
#[inline(always)]
fn egress_policy(ctx: &TcContext, flow: &Flow, daddr: u32, dport: u16) -> Result<(), i32> {
    let translated = Flow {
        daddr,
        dport,
        ..*flow
    };
    if policy::admit_egress(&translated, flow) {
        Ok(())
    } else {
        count(ctx, reason::DROP_POLICY);
        Err(DROP)
    }
}

/// Packets a pod receives: ingress policy, then replies from a backend get
/// the Service address back.
#[inline(always)]
pub fn to_pod(ctx: &TcContext) -> Result<i32, i32> {
    let Parsed::Flow(flow) = packet::parse(ctx) else {
        return Ok(PASS);
    };
    // Replies of flows the pod sent to a Service are admitted by the flow's
    // translation (`policy::admit_egress`): still to be reverse-translated
    // (a backend elsewhere), or already (a backend on this node). The
    // checks go from the most common packet to the least, each a lookup.
    let reply = lookup_reply(ctx, &flow);
    let admitted = reply.is_some()
        || policy::already_received(&flow)
        || conntrack::answers_translated(&flow)
        || policy::admit_ingress(&flow);
    if !admitted {
        count(ctx, reason::DROP_POLICY);
        return Err(DROP);
    }
    let Some(entry) = reply else {
        return Ok(PASS);
    };
    reverse_nat(ctx, &flow, &entry)?;
    count(ctx, reason::REVERSE_NAT);
    Ok(PASS)
}

/// The reply entry of a translated flow that the packet answers, if it may
/// answer one (`conntrack::may_answer`).
#[inline(always)]
pub fn lookup_reply<P: Packet>(ctx: &P, flow: &Flow) -> Option<ConntrackEntry> {
    if !conntrack::may_answer(flow) {
        return None;
    }
    conntrack::lookup_translated(ctx, &conntrack::reply_key(flow), flow)
}

/// `loadBalancerSourceRanges`: whether the client may open a new flow.
#[inline(always)]
pub fn source_allowed(flow: &Flow, service: &ServiceValue) -> bool {
    if service.flags & SERVICE_F_SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        64,
        SourceRange {
            rev_nat_id: service.rev_nat_id,
            addr: flow.saddr,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

#[inline(always)]
pub fn lookup_service(flow: &Flow, slot: u16) -> Option<ServiceValue> {
    let key = ServiceKey::new(flow.daddr, flow.dport, flow.proto, slot);
    // SAFETY: copied out at once.
    SERVICES.get_ptr(key).map(|v| unsafe { *v })
}

#[inline(always)]
fn lookup_backend(id: u32) -> Option<Backend> {
    // SAFETY: copied out at once.
    BACKENDS.get_ptr(id).map(|v| unsafe { *v })
}

/// A packet of a tracked flow goes to the flow's backend while that backend
/// exists, unless it opens a new connection on the 5-tuple (counted).
#[inline(always)]
pub fn keeps_backend<P: Packet>(ctx: &P, entry: &ConntrackEntry, flow: &Flow) -> bool {
    if conntrack::reopens(entry, flow) {
        count(ctx, reason::CT_REOPENED);
        return false;
    }
    backend_still_there(entry)
}

/// A TCP packet other than a SYN to a frontend, with no entry: the entry
/// of its connection was evicted while it was live (or the connection
/// predates the agent). It is translated by hash as a new flow would be,
/// which keeps it on its backend while the backends are the same.
#[inline(always)]
pub fn count_midflow_miss<P: Packet>(ctx: &P, flow: &Flow) {
    if flow.proto == lb_common::PROTO_TCP && !conntrack::opens_connection(flow) {
        count(ctx, reason::CT_MISS_MIDFLOW);
    }
}

/// A tracked flow keeps its backend while that backend exists with the same
/// address; ids are never reused for another address, the check guards anyway.
#[inline(always)]
pub fn backend_still_there(entry: &ConntrackEntry) -> bool {
    match lookup_backend(entry.backend_id) {
        Some(b) => b.addr == entry.nat_addr && b.port == entry.nat_port,
        None => false,
    }
}

/// Picks one of the service's backends by a hash of the flow, through the
/// Service's Maglev table, so that a backend change moves few flows; until the
/// table exists, by the hash modulo the backend slots.
#[inline(always)]
pub fn select_backend(flow: &Flow, service: &ServiceValue) -> Option<(u32, Backend)> {
    if service.count == 0 {
        return None;
    }
    if service.flags & SERVICE_F_AFFINITY == 0 {
        return select_by_hash(flow, service).map(|(id, b, _)| (id, b));
    }
    // sessionAffinity: ClientIP. The remembered backend is used while it
    // still holds its slot in the Service and the client came back within
    // the timeout; otherwise the hash picks one, which is remembered.
    let key = AffinityKey {
        client: flow.saddr,
        rev_nat_id: service.rev_nat_id,
    };
    let now = crate::clock::now();
    let timeout_ns = u64::from(service.affinity_timeout) * 1_000_000_000;
    if let Some(prev) = AFFINITY.get_ptr(key).map(|p| unsafe { *p }) {
        let fresh = now.saturating_sub(prev.last_used_ns) < timeout_ns;
        let in_service = prev.slot >= 1
            && prev.slot <= service.count
            && lookup_service(flow, prev.slot).is_some_and(|s| s.backend_id == prev.backend_id);
        if fresh && in_service {
            if let Some(backend) = lookup_backend(prev.backend_id) {
                let _ = AFFINITY.insert(
                    key,
                    AffinityValue {
                        last_used_ns: now,
                        ..prev
                    },
                    0,
                );
                return Some((prev.backend_id, backend));
            }
        }
    }
    let (id, backend, slot) = select_by_hash(flow, service)?;
    let _ = AFFINITY.insert(
        key,
        AffinityValue {
            last_used_ns: now,
            backend_id: id,
            slot,
            pad0: 0,
        },
        0,
    );
    Some((id, backend))
}

/// Where a pod's source port is moved to when its translated tuple is
/// taken: the unprivileged ports below Linux's ephemeral range, which the
/// pod's own connections never take (so a moved flow cannot meet one of
/// them at the backend), and which double the tuples a pod has towards
/// each backend beside the ports its kernel picks.
const REMAP_PORTS: (u16, u16) = (1024, 31744);

/// When the translated 5-tuple (client, port -> backend) is held by
/// another translated connection that the backend may still remember (the
/// client reused its source port for another Service with the same
/// backend, within the backend's TIME_WAIT), a free source port for this
/// one, as Linux NAT picks one on a tuple clash: otherwise the backend's
/// TIME_WAIT socket of the old connection answers the new SYN with a stale
/// ACK, and the client waits a second to retry. The port's tuple is taken
/// with the flow's reply entry (`free_port`). None: the tuple is free
/// (or no free port was found; the entry is then taken over, counted).
/// Also whether the tuple taken was given up by a closed connection.
#[inline(always)]
fn free_source_port(ctx: &TcContext, flow: &Flow, new: &NewFlow) -> (Option<u16>, bool) {
    let backend = new.backend;
    let k = conntrack::tuple_at_backend(backend, flow.saddr, flow.sport, flow.proto);
    match conntrack::claim(&k, flow) {
        Claim::Vacant | Claim::Own => return (None, false),
        Claim::Reused => {
            count(ctx, reason::TUPLE_REUSED);
            return (None, true);
        }
        Claim::Taken => {}
    }
    let tried = conntrack::free_port(ctx, flow, new, flow.saddr, REMAP_PORTS, flow_hash(flow));
    match tried {
        Some((port, reused)) => (Some(port), reused),
        None => {
            count(ctx, reason::SNAT_ALLOC_FAILED);
            (None, false)
        }
    }
}

/// Backend id, backend and slot chosen by the flow's hash.
#[inline(always)]
pub fn select_by_hash(flow: &Flow, service: &ServiceValue) -> Option<(u32, Backend, u16)> {
    let hash = flow_hash(flow);
    // `checked_rem`, not `%`: a remainder the compiler cannot prove safe
    // becomes a call to a panic function, which the verifier rejects.
    let from_table = match hash.checked_rem(u32::from(service.maglev_size)) {
        None => None,
        // SAFETY: the value is copied out at once; tables are swapped whole.
        Some(entry) => unsafe { MAGLEV.get_value(&service.rev_nat_id, &entry) }.copied(),
    };
    // The table names a slot (1..=count); without a table, the hash does.
    let slot = match from_table {
        Some(slot) => slot as u16,
        None => hash.checked_rem(u32::from(service.count))? as u16 + 1,
    };
    let backend_id = lookup_service(flow, slot)?.backend_id;
    Some((backend_id, lookup_backend(backend_id)?, slot))
}

/// The flow's Maglev hash (`lb_common::service::flow_hash`).
#[inline(always)]
pub fn flow_hash(flow: &Flow) -> u32 {
    lb_common::service::flow_hash(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto)
}
