//! Socket load balancing (`lb_common::sock`): a pod's `connect()` to a
//! Service, or its `sendmsg()` of a datagram to one, is given a backend's
//! address at the socket, so its packets leave the pod already addressed
//! to the backend and the tc programs see a flow straight to a pod: no
//! conntrack entries, no rewrite. The NetworkPolicy verdict is the same
//! either way: the tc programs judge the pod's flows on the backend's
//! address, as they judge a translated one.
//!
//! What the socket hooks leave to the per-packet path: every frontend but
//! a ClusterIP (a NodePort on a node's address, a LoadBalancer or external
//! IP: `sendmsg()` cannot tell a request from a UDP server's answer, and a
//! pod answers SNATed NodePort clients at a node's address, on a port that
//! may be a NodePort's; the lab's churn test met it), Services with
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
    service::{ServiceValue, SERVICE_F_AFFINITY, SERVICE_F_CLUSTER_IP},
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

/// Whether the socket hook translates this frontend (see the module's
/// documentation for what it leaves to the per-packet path).
#[inline(always)]
fn translated_at_socket(service: &ServiceValue) -> bool {
    service.flags & SERVICE_F_CLUSTER_IP != 0
        && service.flags & SERVICE_F_AFFINITY == 0
        && service.count > 0
}

/// The backend for a socket's `connect()` or `sendmsg()` to `vip:vport`
/// (network byte order), remembered for the reverse lookups; none when
/// the destination is no Service the socket hook translates.
#[inline(always)]
fn backend_for(cookie: u64, vip: u32, vport: u16, proto: u8) -> Option<(u32, u16)> {
    let flow = socket_flow(cookie, vip, vport, proto);
    let service = lookup_service(&flow, 0)?;
    if !translated_at_socket(&service) {
        return None;
    }
    let (_, backend, _) = select_by_hash(&flow, &service)?;
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
    count_events(reason::SOCK_TRANSLATED, 1);
    Some((backend.addr, backend.port))
}

/// The Service a socket was sent to when it sent to backend `addr:port`.
#[inline(always)]
fn frontend_for(cookie: u64, addr: u32, port: u16) -> Option<(u32, u16)> {
    let key = SockRevKey {
        cookie,
        addr,
        port,
        pad0: 0,
    };
    // SAFETY: copied out at once.
    let frontend = SOCK_REVERSE.get_ptr(key).map(|v| unsafe { *v })?;
    count_events(reason::SOCK_REVERSED, 1);
    Some((frontend.addr, frontend.port))
}

/// `connect()` (TCP, connected UDP) and `sendmsg()` (unconnected UDP) of
/// an IPv4 socket to a Service: the destination becomes one of its
/// backends.
#[inline(always)]
pub fn to_backend(ctx: &SockAddrContext) {
    // SAFETY: the kernel passes a valid context; its fields are read and
    // written as the verifier allows (4-byte accesses, IPv4 fields only).
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = protocol(sa) else {
        return;
    };
    if let Some((addr, port)) = backend_for(cookie(ctx), sa.user_ip4, sa.user_port as u16, proto) {
        sa.user_ip4 = addr;
        sa.user_port = u32::from(port);
    }
}

/// `getpeername()` and `recvmsg()` of an IPv4 socket: a backend this
/// socket was sent to by `to_backend` is shown as the Service it asked for.
#[inline(always)]
pub fn to_frontend(ctx: &SockAddrContext) {
    // SAFETY: as in `to_backend`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if protocol(sa).is_none() {
        return;
    }
    if let Some((addr, port)) = frontend_for(cookie(ctx), sa.user_ip4, sa.user_port as u16) {
        sa.user_ip4 = addr;
        sa.user_port = u32::from(port);
    }
}

/// `::ffff:0:0/96` in network byte order: an IPv4 address carried by an
/// IPv6 socket (the third word).
const V4_MAPPED: u32 = 0x0000_ffff_u32.to_be();

/// The IPv4 address of a v4-mapped IPv6 address (`::ffff:a.b.c.d`).
#[inline(always)]
fn mapped_v4(ip6: &[u32; 4]) -> Option<u32> {
    (ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED).then_some(ip6[3])
}

/// `to_backend` for an IPv6 socket sending to a v4-mapped address (a Java
/// or dual-stack client reaching an IPv4 Service): the mapped address
/// becomes the backend's.
#[inline(always)]
pub fn to_backend6(ctx: &SockAddrContext) {
    // SAFETY: as in `to_backend` (IPv6 fields only).
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = protocol(sa) else {
        return;
    };
    let Some(vip) = mapped_v4(&sa.user_ip6) else {
        return;
    };
    if let Some((addr, port)) = backend_for(cookie(ctx), vip, sa.user_port as u16, proto) {
        sa.user_ip6[3] = addr;
        sa.user_port = u32::from(port);
    }
}

/// `to_frontend` for an IPv6 socket whose peer is a v4-mapped backend.
#[inline(always)]
pub fn to_frontend6(ctx: &SockAddrContext) {
    // SAFETY: as in `to_backend6`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if protocol(sa).is_none() {
        return;
    }
    let Some(addr) = mapped_v4(&sa.user_ip6) else {
        return;
    };
    if let Some((addr, port)) = frontend_for(cookie(ctx), addr, sa.user_port as u16) {
        sa.user_ip6[3] = addr;
        sa.user_port = u32::from(port);
    }
}
