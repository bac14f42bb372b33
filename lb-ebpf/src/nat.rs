//! Address and port rewrites with incremental checksum updates.
//!
//! The L4 checksum covers the pseudo-header, so an address change is applied
//! to it with `BPF_F_PSEUDO_HDR`. `BPF_F_MARK_MANGLED_0` keeps a UDP checksum
//! of 0 ("no checksum") as it is.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::PROTO_UDP;

use crate::packet::{Flow, ETH_HLEN, IP_CSUM, IP_DADDR, IP_SADDR};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// Rewrites the source or destination address and port of `flow`'s packet.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, flow: &Flow, side: Side, addr: u32, port: u16) -> Result<(), i64> {
    let (old_addr, old_port, addr_off, port_off) = match side {
        Side::Source => (flow.saddr, flow.sport, ETH_HLEN + IP_SADDR, flow.l4_off),
        Side::Destination => (flow.daddr, flow.dport, ETH_HLEN + IP_DADDR, flow.l4_off + 2),
    };
    let mangled = if flow.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let csum_off = flow.l4_csum_off();
    if old_addr != addr {
        ctx.l4_csum_replace(
            csum_off,
            old_addr as u64,
            addr as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled | 4,
        )?;
        ctx.l3_csum_replace(ETH_HLEN + IP_CSUM, old_addr as u64, addr as u64, 4)?;
        ctx.store(addr_off, &addr, 0)?;
    }
    if old_port != port {
        ctx.l4_csum_replace(csum_off, old_port as u64, port as u64, mangled | 2)?;
        ctx.store(port_off, &port, 0)?;
    }
    Ok(())
}
