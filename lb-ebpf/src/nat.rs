//! Address and port rewrites with incremental checksum updates.
//!
//! The L4 checksum covers the pseudo-header, so an address change is applied
//! to it with `BPF_F_PSEUDO_HDR`. `BPF_F_MARK_MANGLED_0` keeps a UDP checksum
//! of 0 ("no checksum") as it is.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    conntrack::ConntrackEntry,
    csum::{self, State},
    metrics::reason,
    PROTO_UDP,
};

use crate::{
    metrics::count,
    packet::{Flow, Packet, ETH_HLEN, IP_CSUM, IP_DADDR, IP_SADDR},
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// The one thing the hooks (tc, XDP) do differently: rewriting a packet.
/// (`state`: what the packet's first rewrite learnt of its checksum, for
/// its second, `nat::rewrite`.)
pub trait Hook: Packet {
    fn rewrite(&self, flow: &Flow, side: Side, to: (u32, u16), state: State) -> Result<State, ()>;
}

impl Hook for XdpContext {
    /// Direct writes: no checksum helpers in XDP, and packets from the wire
    /// carry complete checksums.
    #[inline(always)]
    fn rewrite(&self, flow: &Flow, side: Side, to: (u32, u16), _: State) -> Result<State, ()> {
        rewrite_direct(self, flow, side, to.0, to.1).map(|()| State::Complete)
    }
}

impl Hook for TcContext {
    /// With the L4 checksum helper, as on the pods' veths: a packet that
    /// crossed a veth from a local socket may carry a partial checksum.
    #[inline(always)]
    fn rewrite(&self, flow: &Flow, side: Side, to: (u32, u16), state: State) -> Result<State, ()> {
        rewrite(self, flow, side, to, state).map_err(|_| ())
    }
}

/// Rewrites `first` to the entry's NAT address, then, with SNAT, the other
/// side to the entry's SNAT address: DNAT and SNAT of a flow's packet
/// (`first`: the destination), or the reverse of both on a reply (the
/// source). The second rewrite, often of a port alone, takes the checksum
/// state the first learnt.
#[inline(always)]
pub fn rewrite_both<H: Hook>(
    ctx: &H,
    flow: &Flow,
    first: Side,
    entry: &ConntrackEntry,
) -> Result<(), ()> {
    let to = (entry.nat_addr, entry.nat_port);
    let state = ctx.rewrite(flow, first, to, State::Unknown)?;
    if entry.snat_addr == 0 {
        return Ok(());
    }
    // The checksums now account for the first rewrite: describe the
    // packet as it is before the second.
    let (second, after) = match first {
        Side::Destination => (
            Side::Source,
            Flow {
                daddr: entry.nat_addr,
                dport: entry.nat_port,
                ..*flow
            },
        ),
        Side::Source => (
            Side::Destination,
            Flow {
                saddr: entry.nat_addr,
                sport: entry.nat_port,
                ..*flow
            },
        ),
    };
    let snat = (entry.snat_addr, entry.snat_port);
    ctx.rewrite(&after, second, snat, state).map(|_| ())
}

/// Rewrites the source or destination address and port of `flow`'s packet.
///
/// The L4 checksum needs the helper for the address: how it is kept
/// depends on the packet's checksum state, which the program cannot read
/// (a pod's own packets carry a partial checksum, only the pseudo-header's
/// part, which a port change does not touch; a received one a full
/// checksum, which it does). But the two states take an address change
/// differently, so the helper's result tells which one the packet is in
/// (`csum::state_after_address`), and the port's change is then written
/// without a second call: none at all to a partial checksum, an
/// incremental update to a complete one. Only when that cannot be told
/// (the addresses sum alike, or a port changes alone and no earlier
/// rewrite learnt the state) does the port take the helper too. The IP
/// header's checksum is always complete, so it and the fields are written
/// in place. The direct writes make the verifier unclone a shared packet
/// first, as `bpf_skb_store_bytes` would.
///
/// `state` is what an earlier rewrite of the same packet learnt (a port
/// changed alone has no address change to learn from); the state known
/// after this one is returned.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    flow: &Flow,
    side: Side,
    (addr, port): (u32, u16),
    mut state: State,
) -> Result<State, i64> {
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
        let before = read_u16(ctx, csum_off)?;
        ctx.l4_csum_replace(
            csum_off,
            old_addr as u64,
            addr as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled | 4,
        )?;
        // After the helper: it may have moved the packet's data. The
        // headers' fixed offsets first: a check of the L4 checksum's
        // (further on) would let the compiler drop theirs, which the
        // verifier cannot follow.
        let ip_csum = at::<u16, TcContext>(ctx, ETH_HLEN + IP_CSUM).map_err(|()| -1i64)?;
        let field = at::<u32, TcContext>(ctx, addr_off).map_err(|()| -1i64)?;
        // SAFETY: the pointers were bounds-checked by `at` just now.
        unsafe {
            ip_csum.write_unaligned(csum::replace4(ip_csum.read_unaligned(), old_addr, addr));
            field.write_unaligned(addr);
        }
        let after = read_u16(ctx, csum_off)?;
        state = csum::state_after_address(before, after, (old_addr, addr), flow.proto);
    }
    if old_port != port {
        match state {
            State::Partial | State::Absent => {}
            State::Complete => {
                let l4_csum = at::<u16, TcContext>(ctx, csum_off).map_err(|()| -1i64)?;
                // SAFETY: bounds-checked by `at` just now.
                unsafe {
                    let c = csum::replace2(l4_csum.read_unaligned(), old_port, port);
                    l4_csum.write_unaligned(csum::udp_nonzero(c, flow.proto));
                }
            }
            State::Unknown | State::Unexplained => {
                if state == State::Unexplained {
                    count(ctx, reason::CSUM_STATE_UNEXPLAINED);
                }
                ctx.l4_csum_replace(csum_off, old_port as u64, port as u64, mangled | 2)?;
            }
        }
        let field = at::<u16, TcContext>(ctx, port_off).map_err(|()| -1i64)?;
        // SAFETY: bounds-checked by `at` just now; unaligned after IP options.
        unsafe { field.write_unaligned(port) };
    }
    Ok(state)
}

#[inline(always)]
fn read_u16(ctx: &TcContext, offset: usize) -> Result<u16, i64> {
    let p = at::<u16, TcContext>(ctx, offset).map_err(|()| -1i64)?;
    // SAFETY: bounds-checked by `at`.
    Ok(unsafe { p.read_unaligned() })
}

#[inline(always)]
fn at<T, P: Packet>(ctx: &P, offset: usize) -> Result<*mut T, ()> {
    crate::packet::ptr_at::<T, P>(ctx, offset)
        .map(|p| p as *mut T)
        .ok_or(())
}

/// The same rewrite with direct packet writes, for XDP (no checksum helpers
/// there). Packets from the wire carry complete checksums, which this
/// updates incrementally.
#[inline(always)]
pub fn rewrite_direct<P: Packet>(
    ctx: &P,
    flow: &Flow,
    side: Side,
    addr: u32,
    port: u16,
) -> Result<(), ()> {
    let (addr_off, port_off) = match side {
        Side::Source => (ETH_HLEN + IP_SADDR, flow.l4_off),
        Side::Destination => (ETH_HLEN + IP_DADDR, flow.l4_off + 2),
    };
    let ip_csum = at::<u16, P>(ctx, ETH_HLEN + IP_CSUM)?;
    let addr_ptr = at::<u32, P>(ctx, addr_off)?;
    let port_ptr = at::<u16, P>(ctx, port_off)?;
    let l4_csum = at::<u16, P>(ctx, flow.l4_csum_off())?;
    // SAFETY: every pointer was bounds-checked against the packet by `at`;
    // unaligned accesses because IP options can shift the L4 header.
    unsafe {
        let old_addr = addr_ptr.read_unaligned();
        let old_port = port_ptr.read_unaligned();
        ip_csum.write_unaligned(csum::replace4(ip_csum.read_unaligned(), old_addr, addr));
        let c = l4_csum.read_unaligned();
        // A UDP checksum of 0 means "none" and stays so.
        if !(flow.proto == PROTO_UDP && c == 0) {
            let c = csum::replace2(csum::replace4(c, old_addr, addr), old_port, port);
            l4_csum.write_unaligned(csum::udp_nonzero(c, flow.proto));
        }
        addr_ptr.write_unaligned(addr);
        port_ptr.write_unaligned(port);
    }
    Ok(())
}
