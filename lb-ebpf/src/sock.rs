//! Socket load balancing (`lb_common::sock`): a pod's `connect()` to a
//! Service, or its `sendmsg()` of a datagram to one, is given a backend's
//! address at the socket, so its packets leave the pod already addressed
//! to the backend and the tc programs see a flow straight to a pod: no
//! conntrack entries, no rewrite. The NetworkPolicy verdict is the same
//! either way: the tc programs judge the pod's flows on the backend's
//! address, as they judge a translated one.
//!
//! What the socket hooks leave to the per-packet path: Services with
//! `sessionAffinity: ClientIP` (the per-packet path keys the affinity by
//! the client's address, which a socket may not have chosen yet at
//! `connect()`), and a Service without backends (the tc program answers
//! with ICMP port unreachable, as for any other socket).

use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::bpf_get_socket_cookie, programs::SockAddrContext,
    EbpfContext as _,
};
use lb_common::{
    metrics::reason,
    service::{ServiceValue, SERVICE_F_AFFINITY},
    sock::{SockRevKey, SockRevValue},
    PROTO_TCP, PROTO_UDP,
};

use crate::{
    lb::{lookup_service, select_by_hash},
    maps::SOCK_REVERSE,
    metrics::count_events,
    packet::Flow,
};

/// The socket's cookie: what identifies it to the reverse map.
#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper reads the context's socket, which the hook has.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

#[inline(always)]
fn protocol(sa: &bpf_sock_addr) -> Option<u8> {
    match sa.protocol {
        p if p == u32::from(PROTO_TCP) => Some(PROTO_TCP),
        p if p == u32::from(PROTO_UDP) => Some(PROTO_UDP),
        _ => None,
    }
}

/// The flow a socket's destination stands for, for the Service lookup and
/// the backend choice: the socket's cookie in place of the client's address
/// and port, which it may not have yet. One socket keeps one backend for a
/// Service (its datagrams too) while the Service's backends are the same.
#[inline(always)]
fn socket_flow(cookie: u64, daddr: u32, dport: u16, proto: u8) -> Flow {
    Flow {
        saddr: cookie as u32,
        daddr,
        sport: (cookie >> 32) as u16,
        dport,
        proto,
        tcp_flags: 0,
        tcp_seq: 0,
        l4_off: 0,
    }
}

/// Whether the socket hook translates this Service (see the module's
/// documentation for what it leaves to the per-packet path).
#[inline(always)]
fn translated_at_socket(service: &ServiceValue) -> bool {
    service.flags & SERVICE_F_AFFINITY == 0 && service.count > 0
}

/// `connect()` (TCP, connected UDP) and `sendmsg()` (unconnected UDP) to
/// a Service: the destination becomes one of its backends, remembered for
/// the reverse lookups.
#[inline(always)]
pub fn to_backend(ctx: &SockAddrContext) {
    // SAFETY: the kernel passes a valid context; its fields are read and
    // written as the verifier allows (4-byte accesses).
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = protocol(sa) else {
        return;
    };
    let cookie = cookie(ctx);
    let vip = sa.user_ip4;
    let vport = sa.user_port as u16;
    let flow = socket_flow(cookie, vip, vport, proto);
    let Some(service) = lookup_service(&flow, 0) else {
        return;
    };
    if !translated_at_socket(&service) {
        return;
    }
    let Some((_, backend, _)) = select_by_hash(&flow, &service) else {
        return;
    };
    let key = SockRevKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        pad0: 0,
    };
    let frontend = SockRevValue {
        addr: vip,
        port: vport,
        pad0: 0,
        rev_nat_id: service.rev_nat_id,
    };
    // Without its entry the socket would see the backend as its peer:
    // better than no connection, so a failed insert does not stop it.
    let _ = SOCK_REVERSE.insert(key, frontend, 0);
    sa.user_ip4 = backend.addr;
    sa.user_port = u32::from(backend.port);
    count_events(reason::SOCK_TRANSLATED, 1);
}

/// `getpeername()` and `recvmsg()`: a backend this socket was sent to by
/// `to_backend` is shown as the Service it asked for.
#[inline(always)]
pub fn to_frontend(ctx: &SockAddrContext) {
    // SAFETY: as in `to_backend`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if protocol(sa).is_none() {
        return;
    }
    let key = SockRevKey {
        cookie: cookie(ctx),
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        pad0: 0,
    };
    // SAFETY: copied out at once.
    let Some(frontend) = SOCK_REVERSE.get_ptr(key).map(|v| unsafe { *v }) else {
        return;
    };
    sa.user_ip4 = frontend.addr;
    sa.user_port = u32::from(frontend.port);
    count_events(reason::SOCK_REVERSED, 1);
}
