//! Connection tracking for load-balanced flows (see `lb_common::conntrack`).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    backend::Backend,
    conntrack::{ConntrackEntry, ConntrackKey, CT_FORWARD, CT_REPLY},
};

use crate::{maps::CONNTRACK, packet::Flow};

#[inline(always)]
fn key(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8, direction: u8) -> ConntrackKey {
    ConntrackKey {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        direction,
        pad0: 0,
    }
}

/// Key of the entry for the client's packets, as the client sent them.
#[inline(always)]
pub fn forward_key(flow: &Flow) -> ConntrackKey {
    key(
        flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto, CT_FORWARD,
    )
}

/// Key of the entry for replies of `flow`, as they leave `backend`.
#[inline(always)]
fn reply_key_for(flow: &Flow, backend: &Backend) -> ConntrackKey {
    key(
        backend.addr,
        flow.saddr,
        backend.port,
        flow.sport,
        flow.proto,
        CT_REPLY,
    )
}

/// Key under which a packet would be found if it is a reply.
#[inline(always)]
pub fn reply_key(flow: &Flow) -> ConntrackKey {
    key(
        flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto, CT_REPLY,
    )
}

/// Looks an entry up and marks it as seen now.
#[inline(always)]
pub fn lookup(key: &ConntrackKey) -> Option<ConntrackEntry> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup; the copy is taken at
    // once, and a concurrent writer can at worst make last_seen slightly stale.
    unsafe {
        (*entry).last_seen_ns = bpf_ktime_get_ns();
        Some(*entry)
    }
}

/// Records a new flow to `backend`: the forward entry (where to DNAT) and the
/// reply entry (which VIP to restore as the source of replies).
#[inline(always)]
pub fn create(flow: &Flow, backend_id: u32, backend: &Backend, rev_nat_id: u16) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    let forward = ConntrackEntry {
        last_seen_ns: now,
        nat_addr: backend.addr,
        nat_port: backend.port,
        rev_nat_id,
        backend_id,
        pad0: 0,
    };
    let reply = ConntrackEntry {
        nat_addr: flow.daddr,
        nat_port: flow.dport,
        ..forward
    };
    // Reply entry first: once the forward entry exists, packets may reach the
    // backend and its answers must already find their way back.
    CONNTRACK.insert(reply_key_for(flow, backend), reply, 0)?;
    CONNTRACK.insert(forward_key(flow), forward, 0)
}
