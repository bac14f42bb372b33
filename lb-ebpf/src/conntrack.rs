//! Connection tracking for load-balanced flows (see `lb_common::conntrack`).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    backend::Backend,
    conntrack::{ConntrackEntry, ConntrackKey, CT_FORWARD, CT_F_CLOSING, CT_REPLY},
};

use crate::{
    maps::CONNTRACK,
    packet::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

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

/// Looks up the entry of `flow`'s packet under `key`, marks it as seen now,
/// and as closing when the packet carries a TCP FIN or RST.
#[inline(always)]
pub fn lookup(key: &ConntrackKey, flow: &Flow) -> Option<ConntrackEntry> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup; the copy is taken at
    // once, and a concurrent writer can at worst make last_seen slightly stale.
    unsafe {
        (*entry).last_seen_ns = bpf_ktime_get_ns();
        if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            (*entry).flags |= CT_F_CLOSING;
        }
        Some(*entry)
    }
}

/// A SYN without ACK starts a connection, so its backend is chosen again
/// rather than taken from the entry. A client that reuses a closed
/// connection's source port (within the closing timeout, or before its
/// close was seen) must not follow the old connection to its backend, which
/// may be terminating and refuse or vanish once its process exits. Selection
/// is a hash of the flow (Maglev), so a retransmitted SYN lands where the
/// first one did while the Service's backends stay the same. Packets of
/// established connections keep their backend through the entry.
#[inline(always)]
pub fn reopens(_entry: &ConntrackEntry, flow: &Flow) -> bool {
    opens_connection(flow)
}

/// A TCP SYN without ACK: the first packet of a connection.
#[inline(always)]
pub fn opens_connection(flow: &Flow) -> bool {
    flow.proto == lb_common::PROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// A connection straight to a pod (no Service) whose 5-tuple is that of an
/// earlier connection translated to this pod: the earlier one's reply entry
/// would give this connection's replies the Service's address, and the
/// client would never see its SYN-ACK. The new connection proves the old
/// one is over, so its reply entry goes.
#[inline(always)]
pub fn forget_translated_reply(flow: &Flow) {
    if opens_connection(flow) {
        let stale = key(
            flow.daddr, flow.saddr, flow.dport, flow.sport, flow.proto, CT_REPLY,
        );
        let _ = CONNTRACK.remove(stale);
    }
}

/// Whether `flow`, translated to `backend` with source port `port`, would
/// take a 5-tuple that another translated flow holds (its reply entry
/// restores another frontend or another client port). None of `flow`'s
/// own entries count.
#[inline(always)]
pub fn translated_tuple_taken(flow: &Flow, backend: &Backend, port: u16) -> bool {
    let k = key(
        backend.addr,
        flow.saddr,
        backend.port,
        port,
        flow.proto,
        CT_REPLY,
    );
    let Some(entry) = CONNTRACK.get_ptr(k) else {
        return false;
    };
    // SAFETY: fields copied out at once.
    let e = unsafe { *entry };
    let client_port = if e.snat_addr == 0 { port } else { e.snat_port };
    !(e.nat_addr == flow.daddr && e.nat_port == flow.dport && client_port == flow.sport)
}

/// Where a new flow goes: its backend, and the source to give it (SNAT).
pub struct NewFlow<'a> {
    pub backend_id: u32,
    pub backend: &'a Backend,
    pub rev_nat_id: u16,
    /// `(node address, port)` to SNAT to, or `(0, 0)`.
    pub snat: (u32, u16),
    pub flags: u16,
}

impl NewFlow<'_> {
    /// The translation of the flow's packets: DNAT to the backend, SNAT
    /// when set (the forward conntrack entry, without its timestamp).
    #[inline(always)]
    pub fn forward(&self) -> ConntrackEntry {
        ConntrackEntry {
            last_seen_ns: 0,
            nat_addr: self.backend.addr,
            nat_port: self.backend.port,
            rev_nat_id: self.rev_nat_id,
            backend_id: self.backend_id,
            flags: self.flags,
            snat_addr: self.snat.0,
            snat_port: self.snat.1,
            pad0: 0,
        }
    }
}

/// Records a new flow: the forward entry (where to DNAT, what to SNAT to)
/// and the reply entry (which frontend to restore as the source of replies,
/// and, with SNAT, which client to restore as their destination).
#[inline(always)]
pub fn create(flow: &Flow, new: &NewFlow) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    let forward = ConntrackEntry {
        last_seen_ns: now,
        ..new.forward()
    };
    let snat = new.snat.0 != 0;
    let reply = ConntrackEntry {
        nat_addr: flow.daddr,
        nat_port: flow.dport,
        snat_addr: if snat { flow.saddr } else { 0 },
        snat_port: if snat { flow.sport } else { 0 },
        ..forward
    };
    let reply_key = if snat {
        key(
            new.backend.addr,
            new.snat.0,
            new.backend.port,
            new.snat.1,
            flow.proto,
            CT_REPLY,
        )
    } else {
        reply_key_for(flow, new.backend)
    };
    // Reply entry first: once the forward entry exists, packets may reach the
    // backend and its answers must already find their way back.
    CONNTRACK.insert(reply_key, reply, 0)?;
    CONNTRACK.insert(forward_key(flow), forward, 0)
}

/// Whether a reply entry for `backend` answering to `node:port` exists
/// (an SNAT port in use).
#[inline(always)]
pub fn snat_port_taken(backend: &Backend, node: u32, port: u16, proto: u8) -> bool {
    CONNTRACK
        .get_ptr(key(backend.addr, node, backend.port, port, proto, CT_REPLY))
        .is_some()
}
