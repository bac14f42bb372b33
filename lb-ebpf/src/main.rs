//! Kernel-side programs of the load balancer.
//!
//! - `lb_from_pod` (tc ingress on a pod's host-side veth: packets the pod sends):
//!   conntrack lookup, Service lookup, backend selection and DNAT.
//! - `lb_to_pod` (tc egress on a pod's host-side veth: packets the pod receives):
//!   reverse NAT of replies, so the pod sees answers from the Service address.
//! - `lb_uplink` (XDP on the node's uplink) or `lb_uplink_tc` (tc ingress
//!   there, where XDP would copy every packet: a veth): NodePort,
//!   LoadBalancer and external-IP frontends for traffic from outside the
//!   node, with SNAT.
//! - `lb_sock_connect4`, `lb_sock_sendmsg4`, `lb_sock_recvmsg4` and
//!   `lb_sock_getpeername4` (cgroup hooks of the pods' sockets, with
//!   socket LB on), and their `6` twins for IPv6 sockets reaching IPv4
//!   Services by v4-mapped addresses: a Service's backend chosen at
//!   `connect()` and `sendmsg()`, the Service shown again to the socket
//!   (`sock`).
//! - `lb_ct_sweep` (never attached): the agent's removal of expired
//!   conntrack entries, run through BPF_PROG_TEST_RUN.
//!
//! Modules follow the packet: `packet` parses, `conntrack` remembers, `lb`
//! decides, `nat` rewrites, `metrics` counts, `logging` (off by default)
//! explains single flows.
#![no_std]
#![no_main]

mod clock;
mod conntrack;
mod lb;
mod logging;
mod maps;
mod metrics;
mod nat;
mod packet;
mod policy;
mod probes;
mod reject;
mod sock;
mod sweep;
mod uplink;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

#[classifier]
pub fn lb_from_pod(ctx: TcContext) -> i32 {
    match lb::from_pod(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[classifier]
pub fn lb_to_pod(ctx: TcContext) -> i32 {
    match lb::to_pod(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[xdp]
pub fn lb_uplink(ctx: XdpContext) -> u32 {
    use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
    match uplink::uplink(&ctx) {
        Ok(v) | Err(v) if v == uplink::Verdict::Pass => XDP_PASS,
        _ => XDP_DROP,
    }
}

#[classifier]
pub fn lb_uplink_tc(ctx: TcContext) -> i32 {
    use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
    match uplink::uplink(&ctx) {
        Ok(v) | Err(v) if v == uplink::Verdict::Pass => TC_ACT_OK,
        _ => TC_ACT_SHOT,
    }
}

/// A socket hook's verdict: carry on (the hooks never refuse a call).
const SOCK_PROCEED: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx);
    SOCK_PROCEED
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx);
    SOCK_PROCEED
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::to_frontend(&ctx);
    SOCK_PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::to_frontend(&ctx);
    SOCK_PROCEED
}

// The same for IPv6 sockets reaching IPv4 Services by v4-mapped addresses.

#[cgroup_sock_addr(connect6)]
pub fn lb_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::to_backend6(&ctx);
    SOCK_PROCEED
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::to_backend6(&ctx);
    SOCK_PROCEED
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::to_frontend6(&ctx);
    SOCK_PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::to_frontend6(&ctx);
    SOCK_PROCEED
}

/// The agent's conntrack sweep (`sweep`): run on a batch of expired
/// entries, never attached.
#[xdp]
pub fn lb_ct_sweep(ctx: XdpContext) -> u32 {
    sweep::run(&ctx);
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// The floor for `cargo xtask bench`: what running any tc program costs.
#[classifier]
pub fn bench_empty_tc(_ctx: TcContext) -> i32 {
    aya_ebpf::bindings::TC_ACT_OK
}

/// The floor for `cargo xtask bench`: what running any XDP program costs.
#[xdp]
pub fn bench_empty_xdp(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
