//! Connection tracking for load-balanced flows (see `lb_common::conntrack`).

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_loop};
use lb_common::{
    backend::Backend,
    conntrack::{
        tcp_tuple_hold_ns, ConntrackEntry, ConntrackKey, CT_FORWARD, CT_F_ANSWERED,
        CT_F_BACKEND_CLOSED_FIRST, CT_F_CLOSING, CT_F_RESET, CT_F_TUPLE_REUSED, CT_REPLY,
        UDP_REUSE_NS,
    },
    metrics::reason,
    PROTO_TCP,
};

use crate::{
    clock,
    maps::CONNTRACK,
    metrics::{count, count_events},
    packet::{Flow, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
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

/// Key under which a packet would be found if it is a reply.
#[inline(always)]
pub fn reply_key(flow: &Flow) -> ConntrackKey {
    key(
        flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto, CT_REPLY,
    )
}

/// The client an entry's connection belongs to: its address and port as
/// the client sent them.
#[inline(always)]
fn client_of(key: &ConntrackKey, entry: &ConntrackEntry) -> (u32, u16) {
    match (key.direction == CT_FORWARD, entry.snat_addr != 0) {
        (true, _) => (key.saddr, key.sport),
        (false, true) => (entry.snat_addr, entry.snat_port),
        (false, false) => (key.daddr, key.dport),
    }
}

/// The other entry of the same connection: the reply entry of a forward
/// entry, and the forward entry of a reply entry.
#[inline(always)]
fn peer_key(k: &ConntrackKey, entry: &ConntrackEntry) -> ConntrackKey {
    if k.direction == CT_FORWARD {
        // Replies leave the backend towards the (SNAT) source.
        let (to, to_port) = if entry.snat_addr != 0 {
            (entry.snat_addr, entry.snat_port)
        } else {
            (k.saddr, k.sport)
        };
        key(
            entry.nat_addr,
            to,
            entry.nat_port,
            to_port,
            k.proto,
            CT_REPLY,
        )
    } else {
        let (client, client_port) = client_of(k, entry);
        key(
            client,
            entry.nat_addr,
            client_port,
            entry.nat_port,
            k.proto,
            CT_FORWARD,
        )
    }
}

/// Looks up the entry of `flow`'s packet under `key` and marks it as seen
/// now, and as closing when the packet carries a TCP FIN or RST.
#[inline(always)]
pub fn lookup(key: &ConntrackKey, flow: &Flow) -> Option<ConntrackEntry> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup; the copy is taken at
    // once, and a concurrent writer can at worst make last_seen slightly stale.
    unsafe {
        (*entry).last_seen_ns = clock::now();
        (*entry).flags |= close_flags(flow, (*entry).flags, false);
        Some(*entry)
    }
}

/// `lookup` for the entries of a translated connection; the copy returned
/// has the time of the packet before this one. Once the connection closes,
/// both its entries are marked and stamped by the packets of either
/// direction: the reply entry is what holds the tuple at the backend
/// (`claim`), and must know when the connection's last packet passed.
/// Costs a second lookup only on the few packets from the first FIN on.
/// The backend's first answer is checked for a clash (`TUPLE_CLASH`).
#[inline(always)]
pub fn lookup_translated<P: Packet>(
    ctx: &P,
    k: &ConntrackKey,
    flow: &Flow,
) -> Option<ConntrackEntry> {
    let entry = CONNTRACK.get_ptr_mut(k)?;
    // SAFETY: as in `lookup`.
    unsafe {
        let now = clock::now();
        let from_backend = k.direction == CT_REPLY;
        let mut flags = close_flags(flow, (*entry).flags, from_backend);
        if from_backend && (*entry).flags & CT_F_ANSWERED == 0 {
            flags |= CT_F_ANSWERED;
            if answers_syn_with_ack(&*entry, flow) {
                count_clash(ctx, &*entry);
            }
        }
        // The copy keeps the previous packet's time (`reopens` reads it).
        let mut copy = *entry;
        (*entry).last_seen_ns = now;
        (*entry).flags |= flags;
        copy.flags |= flags;
        if copy.flags & CT_F_CLOSING != 0 {
            if let Some(peer) = CONNTRACK.get_ptr_mut(peer_key(k, &copy)) {
                (*peer).last_seen_ns = now;
                (*peer).flags |= flags & !CT_F_ANSWERED;
            }
        }
        Some(copy)
    }
}

/// Counts a clash, and what the connection's tuple was: one given up by a
/// closed connection, or the client's own source.
#[inline(always)]
fn count_clash<P: Packet>(ctx: &P, entry: &ConntrackEntry) {
    count(ctx, reason::TUPLE_CLASH);
    if entry.flags & CT_F_TUPLE_REUSED != 0 {
        count(ctx, reason::TUPLE_CLASH_REUSED);
    }
    if entry.snat_addr == 0 {
        count(ctx, reason::TUPLE_CLASH_OWN_SOURCE);
    }
}

/// The backend's first packet of a connection opened by a SYN is a bare
/// ACK: the SYN met an older connection's socket on the tuple.
#[inline(always)]
fn answers_syn_with_ack(entry: &ConntrackEntry, flow: &Flow) -> bool {
    flow.proto == PROTO_TCP
        && entry.syn_seq != 0
        && flow.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_ACK
}

/// The `CT_F_*` flags a packet sets on an entry with flags `had`: closing
/// on FIN or RST, reset on RST, and, when the connection's first FIN comes
/// from the backend (`from_backend`), that the backend will hold TIME_WAIT.
#[inline(always)]
fn close_flags(flow: &Flow, had: u16, from_backend: bool) -> u16 {
    let mut flags = 0;
    if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        flags |= CT_F_CLOSING;
    }
    if flow.tcp_flags & TCP_RST != 0 {
        flags |= CT_F_RESET;
    }
    if flow.tcp_flags & TCP_FIN != 0 && had & CT_F_CLOSING == 0 && from_backend {
        flags |= CT_F_BACKEND_CLOSED_FIRST;
    }
    flags
}

/// A SYN without ACK that is not a retransmission of the one that opened
/// the entry's connection starts a new connection on its 5-tuple, as Linux
/// conntrack replaces a closed entry: its backend is chosen again rather
/// than taken from the entry. A client that reuses a closed connection's
/// source port (or one whose close was never seen) must not follow the old
/// connection to its backend, which may be terminating. A retransmitted
/// SYN (same sequence number) keeps the translation of the first, or the
/// client's ACK would reach a backend (or SNAT port) that never saw it.
/// A UDP flow silent for `UDP_REUSE_NS` is a new one too: its tuple at the
/// backend may have gone to another flow since (`claim`).
#[inline(always)]
pub fn reopens(entry: &ConntrackEntry, flow: &Flow) -> bool {
    if flow.proto != PROTO_TCP {
        let idle = clock::now().saturating_sub(entry.last_seen_ns);
        return idle >= UDP_REUSE_NS;
    }
    opens_connection(flow) && (entry.flags & CT_F_CLOSING != 0 || entry.syn_seq != flow.tcp_seq)
}

/// A TCP SYN without ACK: the first packet of a connection.
#[inline(always)]
pub fn opens_connection(flow: &Flow) -> bool {
    flow.proto == PROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Whether the packet may answer a flow seen before: anything but a TCP
/// SYN without ACK, which opens a connection and answers none. A new
/// connection's first packet skips the lookups of reply entries: in a
/// table of a million entries each lookup of a key not seen before is a
/// cache miss or two (the bucket, its first element), most of what a new
/// flow costs (`docs/benchmarks.md`, the perf profile).
#[inline(always)]
pub fn may_answer(flow: &Flow) -> bool {
    !opens_connection(flow)
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

/// A packet that answers a translated flow after its reverse NAT (from
/// the frontend to the client): the flow's forward entry exists.
#[inline(always)]
pub fn answers_translated(flow: &Flow) -> bool {
    if !may_answer(flow) {
        return false;
    }
    let sent = key(
        flow.daddr, flow.saddr, flow.dport, flow.sport, flow.proto, CT_FORWARD,
    );
    CONNTRACK.get_ptr(sent).is_some()
}

/// The reply entry's key of a tuple at the backend: `backend` answering
/// to `src:port`.
#[inline(always)]
pub fn tuple_at_backend(backend: &Backend, src: u32, port: u16, proto: u8) -> ConntrackKey {
    key(backend.addr, src, backend.port, port, proto, CT_REPLY)
}

/// Whether a new connection may have a tuple at the backend.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// No entry holds it.
    Vacant,
    /// The flow's own earlier connection holds it.
    Own,
    /// A closed connection held it and may safely give it up.
    Reused,
    /// A live connection holds it, or a closed one the backend may still
    /// remember (TIME_WAIT).
    Taken,
}

/// Whether `flow` may have the tuple whose reply entry is `k` (the backend
/// answering to `k.daddr:k.dport`). The flow's own earlier connection (the
/// same client address and port, the same frontend) may always: the
/// client's sequence numbers and timestamps on one 4-tuple only grow, so
/// the backend takes the new SYN even in TIME_WAIT. Another connection's
/// tuple is given up `CLOSED_HOLD_NS` after its last packet when the
/// backend closed it first (its TIME_WAIT is over), even if an RST came
/// later; `NO_TIME_WAIT_HOLD_NS` after it when it was reset before any FIN
/// of the backend, or the client closed first; a UDP flow's after
/// `UDP_REUSE_NS` without a packet.
#[inline(always)]
pub fn claim(k: &ConntrackKey, flow: &Flow) -> Claim {
    let Some(held) = CONNTRACK.get_ptr(k) else {
        return Claim::Vacant;
    };
    // SAFETY: copied out at once.
    let held = unsafe { *held };
    let (client, client_port) = client_of(k, &held);
    if held.nat_addr == flow.daddr
        && held.nat_port == flow.dport
        && client == flow.saddr
        && client_port == flow.sport
    {
        return Claim::Own;
    }
    let idle = clock::now().saturating_sub(held.last_seen_ns);
    let hold = if flow.proto != PROTO_TCP {
        UDP_REUSE_NS
    } else {
        match tcp_tuple_hold_ns(held.flags) {
            Some(hold) => hold,
            None => return Claim::Taken,
        }
    };
    if idle >= hold {
        Claim::Reused
    } else {
        Claim::Taken
    }
}

/// Takes the tuple `k` for a new flow by writing its reply entry `reply`,
/// after `claim` said it may (`how`). Deciding and writing are two steps,
/// and another CPU may decide the same for another new flow between them
/// (two SYNs whose port orders meet); both would then send their SYNs on
/// one tuple, and the backend answer one with the other's ACK (a clash). A
/// vacant tuple is taken only if still vacant (`BPF_NOEXIST`, as Linux
/// conntrack's confirm step finds a clash on insert); a closed one's by
/// removing it first, which only one of two contenders can do. False when
/// another flow took it first.
#[inline(always)]
fn take_tuple(k: &ConntrackKey, how: Claim, reply: &ConntrackEntry) -> bool {
    let noexist = u64::from(BPF_NOEXIST);
    match how {
        Claim::Vacant => CONNTRACK.insert(k, reply, noexist).is_ok(),
        Claim::Reused => {
            let reused = ConntrackEntry {
                flags: reply.flags | CT_F_TUPLE_REUSED,
                ..*reply
            };
            CONNTRACK.remove(k).is_ok() && CONNTRACK.insert(k, reused, noexist).is_ok()
        }
        Claim::Own => CONNTRACK.insert(k, reply, 0).is_ok(),
        Claim::Taken => false,
    }
}

/// Ports tried for a new flow's source before giving up (Cilium's
/// `SNAT_COLLISION_RETRIES`).
pub const PORT_TRIES: u32 = 128;

/// The state of a port search (`free_port`), shared with `try_port`
/// through `bpf_loop`.
#[repr(C)]
struct PortSearch {
    flow: Flow,
    backend: Backend,
    reply: ConntrackEntry,
    src: u32,
    hash: u32,
    stride: u32,
    span: u32,
    min: u16,
    /// Out: the port found (0: none), whether its tuple was reused, how
    /// many tries it took, and whether another flow took one first.
    port: u16,
    reused: u8,
    raced: u8,
    tries: u32,
}

/// Try `i` of a port search: stops it (1) once a port's tuple is taken.
/// A `bpf_loop` callback, so that the verifier checks this body once,
/// not once per try as in an unrolled loop.
#[inline(never)]
extern "C" fn try_port(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `free_port` passes its own `PortSearch`.
    let s = unsafe { &mut *(ctx as *mut PortSearch) };
    let i = i as u32;
    let Some(offset) = s
        .hash
        .wrapping_add(i.wrapping_mul(s.stride))
        .checked_rem(s.span)
    else {
        return 1;
    };
    let port = s.min.wrapping_add(offset as u16).to_be();
    let k = tuple_at_backend(&s.backend, s.src, port, s.flow.proto);
    let how = claim(&k, &s.flow);
    if how == Claim::Taken {
        return 0;
    }
    if !take_tuple(&k, how, &s.reply) {
        s.raced = 1;
        return 0;
    }
    s.port = port;
    s.reused = u8::from(how == Claim::Reused);
    s.tries = i;
    1
}

/// A source port in `min..min + count` for `new` flow `flow` SNATed to
/// address `src`, whose tuple at the backend (`claim`) is free, taken by
/// writing the flow's reply entry there (`take_tuple`; the entry does not
/// depend on the port, which is in its key). The ports are tried in
/// an order drawn from the flow's hash (a start and a stride, as Linux NAT
/// starts from a hash), so a client port reused for a new connection, or a
/// retransmitted SYN, finds its own tuple again before any other; the
/// strides of different flows spread them over the range. A tuple another
/// CPU's new flow took first is passed over (`TUPLE_RACED`). Counts extra
/// tries and tuples reused; says whether the port's tuple was reused
/// (`CT_F_TUPLE_REUSED`).
#[inline(always)]
pub fn free_port<P: Packet>(
    ctx: &P,
    flow: &Flow,
    new: &NewFlow,
    src: u32,
    (min, count_ports): (u16, u16),
    hash: u32,
) -> Option<(u16, bool)> {
    if count_ports == 0 {
        return None;
    }
    let snatted = NewFlow {
        snat: (src, 0),
        ..*new
    };
    let now = clock::now();
    let mut search = PortSearch {
        flow: *flow,
        backend: *new.backend,
        reply: reply_entry(flow, &snatted, now),
        src,
        hash,
        stride: (hash >> 16) | 1,
        span: u32::from(count_ports),
        min,
        port: 0,
        reused: 0,
        raced: 0,
        tries: PORT_TRIES - 1,
    };
    // SAFETY: the callback is a static function of this program, its
    // context this stack frame's search.
    unsafe {
        bpf_loop(
            PORT_TRIES,
            try_port as *mut core::ffi::c_void,
            &mut search as *mut PortSearch as *mut core::ffi::c_void,
            0,
        )
    };
    if search.raced != 0 {
        count(ctx, reason::TUPLE_RACED);
    }
    count_events(reason::SNAT_RETRIES, search.tries);
    if search.port == 0 {
        return None;
    }
    if search.reused != 0 {
        count(ctx, reason::TUPLE_REUSED);
    }
    Some((search.port, search.reused != 0))
}

/// Where a new flow goes: its backend, and the source to give it (SNAT).
#[derive(Clone, Copy)]
pub struct NewFlow<'a> {
    pub backend_id: u32,
    pub backend: &'a Backend,
    pub rev_nat_id: lb_common::service::RevNatId,
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
            syn_seq: 0,
            ..Default::default()
        }
    }
}

/// The reply entry of a new flow (which frontend to restore as the source
/// of replies, and, with SNAT, which client to restore as their
/// destination), stamped `now`. The SNAT port is not in it but in its key.
#[inline(always)]
pub fn reply_entry(flow: &Flow, new: &NewFlow, now: u64) -> ConntrackEntry {
    let snat = new.snat.0 != 0;
    ConntrackEntry {
        last_seen_ns: now,
        nat_addr: flow.daddr,
        nat_port: flow.dport,
        snat_addr: if snat { flow.saddr } else { 0 },
        snat_port: if snat { flow.sport } else { 0 },
        syn_seq: first_seq(flow),
        ..new.forward()
    }
}

/// The sequence number of the SYN that opens the flow's connection, or 0.
#[inline(always)]
fn first_seq(flow: &Flow) -> u32 {
    if opens_connection(flow) {
        flow.tcp_seq
    } else {
        0
    }
}

/// Records a new flow: the forward entry (where to DNAT, what to SNAT to)
/// and the reply entry (`reply_entry`), unless `free_port` already took
/// the flow's tuple with it (`reply_written`). The entry written first is
/// removed again if the second cannot be.
#[inline(always)]
pub fn create(flow: &Flow, new: &NewFlow, reply_written: bool) -> Result<(), i32> {
    let now = clock::now();
    let forward = ConntrackEntry {
        last_seen_ns: now,
        syn_seq: first_seq(flow),
        ..new.forward()
    };
    let forward_k = forward_key(flow);
    let reply_k = peer_key(&forward_k, &forward);
    // Reply entry first: once the forward entry exists, packets may reach the
    // backend and its answers must already find their way back.
    if !reply_written {
        CONNTRACK.insert(reply_k, reply_entry(flow, new, now), 0)?;
    }
    CONNTRACK.insert(forward_k, forward, 0).inspect_err(|_| {
        let _ = CONNTRACK.remove(reply_k);
    })
}
