//! Refusing a connection to a Service that has no endpoint, at once, as
//! kube-proxy's REJECT rule does: an ICMP port unreachable from the Service
//! address back to the client. TCP's connect() fails with ECONNREFUSED and a
//! UDP socket sees the error, instead of waiting for a timeout.
//!
//! The packet is turned into the ICMP error in place and redirected back out
//! of the interface it came from:
//! `[eth][ip][l4...]` -> `[eth][new ip][icmp hdr][orig ip][start of l4]`.
//!
//! The quote holds the whole 20-byte TCP header but only the 8-byte UDP
//! header (RFC 1812 allows more than 8 bytes). The reason: a packet sent by a
//! local socket carries CHECKSUM_PARTIAL, and the kernel will not cut it
//! shorter than its pending L4 checksum field, which sits 16 bytes into the
//! TCP header and 6 bytes into the UDP header.

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_NET, TC_ACT_REDIRECT},
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};

use crate::packet::{Flow, ETH_HLEN};

use lb_common::PROTO_TCP;

const IP_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const IPPROTO_ICMP: u8 = 1;

#[inline(always)]
fn fold(csum: i64) -> u16 {
    let mut c = csum as u64;
    c = (c & 0xffff) + (c >> 16);
    c = (c & 0xffff) + (c >> 16);
    c = (c & 0xffff) + (c >> 16);
    !(c as u16)
}

/// Internet checksum of a buffer whose length is a multiple of 4. The helper
/// sums memory as it lies, so the result is stored with native byte order.
#[inline(always)]
fn checksum<const N: usize>(buf: &mut [u32; N]) -> u16 {
    // SAFETY: the helper reads N*4 bytes from a stack buffer of that size.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            buf.as_mut_ptr(),
            (N * 4) as u32,
            0,
        )
    };
    fold(sum)
}

/// Rewrites the packet into an ICMP port unreachable and redirects it back
/// to the sender. Returns the tc verdict, or `Err` if the packet could not
/// be rewritten (the caller drops it).
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, flow: &Flow) -> Result<i32, ()> {
    if flow.proto == PROTO_TCP {
        rewrite::<{ IP_HLEN + TCP_HLEN }, { (8 + IP_HLEN + TCP_HLEN) / 4 }>(ctx, flow)
    } else {
        rewrite::<{ IP_HLEN + UDP_HLEN }, { (8 + IP_HLEN + UDP_HLEN) / 4 }>(ctx, flow)
    }
}

/// `Q` bytes are quoted (IP header + start of L4); the ICMP message is
/// `W` 32-bit words: 8 bytes of header and the quote.
#[inline(always)]
fn rewrite<const Q: usize, const W: usize>(ctx: &TcContext, flow: &Flow) -> Result<i32, ()> {
    let icmp_len = 8 + Q;
    let out_len = ETH_HLEN + IP_HLEN + icmp_len;
    // Only plain 20-byte IP headers are quoted; packets with options are
    // dropped instead (they do not occur in practice for pod traffic).
    if flow.l4_off != ETH_HLEN + IP_HLEN {
        return Err(());
    }
    // What the ICMP message quotes, read before the packet changes.
    // Fixed-size loads: the verifier must see constant lengths.
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    let quote: [u8; Q] = ctx.load(ETH_HLEN).map_err(|_| ())?;
    let mut icmp = [0u32; W];
    // SAFETY: icmp is 8 + Q bytes; bytes 8.. get the quote.
    unsafe { core::slice::from_raw_parts_mut((icmp.as_mut_ptr() as *mut u8).add(8), Q) }
        .copy_from_slice(&quote);

    // Make room for the new IP header + ICMP header in front of the quote,
    // then cut everything after the quoted 8 bytes.
    ctx.adjust_room((IP_HLEN + 8) as i32, BPF_ADJ_ROOM_NET, 0)
        .map_err(|_| ())?;
    // SAFETY: the skb pointer comes from the context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, out_len as u32, 0) } != 0 {
        return Err(());
    }

    // ICMP header: type, code, checksum, unused.
    // SAFETY: writing the first 8 bytes of the buffer.
    let hdr = unsafe { core::slice::from_raw_parts_mut(icmp.as_mut_ptr() as *mut u8, 8) };
    hdr.copy_from_slice(&[ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0]);
    let csum = checksum(&mut icmp);
    hdr[2..4].copy_from_slice(&csum.to_ne_bytes());

    // New IP header, from the Service address back to the client.
    let mut ip = [0u32; IP_HLEN / 4];
    {
        // SAFETY: 20 bytes of a 20-byte buffer.
        let b = unsafe { core::slice::from_raw_parts_mut(ip.as_mut_ptr() as *mut u8, IP_HLEN) };
        b[0] = 0x45;
        b[2..4].copy_from_slice(&((IP_HLEN + icmp_len) as u16).to_be_bytes());
        b[6] = 0x40; // DF
        b[8] = 64; // TTL
        b[9] = IPPROTO_ICMP;
        b[12..16].copy_from_slice(&flow.daddr.to_ne_bytes());
        b[16..20].copy_from_slice(&flow.saddr.to_ne_bytes());
    }
    let csum = checksum(&mut ip);
    // SAFETY: as above.
    unsafe {
        core::slice::from_raw_parts_mut(ip.as_mut_ptr() as *mut u8, IP_HLEN)[10..12]
            .copy_from_slice(&csum.to_ne_bytes())
    };

    let mut eth = [0u8; 12];
    eth[..6].copy_from_slice(&macs[6..12]);
    eth[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &eth, 0).map_err(|_| ())?;
    ctx.store(ETH_HLEN, &ip, 0).map_err(|_| ())?;
    ctx.store(ETH_HLEN + IP_HLEN, &icmp, 0).map_err(|_| ())?;

    // SAFETY: reading the ingress interface from the context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(ifindex, 0) };
    Ok(TC_ACT_REDIRECT)
}
