//! Kernel-side programs of the load balancer.
//!
//! - `lb_from_pod` (tc ingress on a pod's host-side veth: packets the pod sends):
//!   conntrack lookup, Service lookup, backend selection and DNAT.
//! - `lb_to_pod` (tc egress on a pod's host-side veth: packets the pod receives):
//!   reverse NAT of replies, so the pod sees answers from the Service address.
//!
//! Modules follow the packet: `packet` parses, `conntrack` remembers, `lb`
//! decides, `nat` rewrites, `metrics` counts.
#![no_std]
#![no_main]

mod conntrack;
mod lb;
mod maps;
mod metrics;
mod nat;
mod packet;
mod reject;

use aya_ebpf::{macros::classifier, programs::TcContext};

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
