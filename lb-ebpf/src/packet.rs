//! Bounds-checked parsing of Ethernet / IPv4 / TCP-UDP headers.
//!
//! Every read goes through `ptr_at`, which the verifier can follow. A packet
//! too short for the headers the data path needs is reported as `Malformed`
//! and is never rewritten.

use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{PROTO_TCP, PROTO_UDP};

/// A packet in either hook: both give direct access to the frame.
pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
}

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Offsets inside the IPv4 header.
const IP_FRAG_OFF: usize = 6;
const IP_PROTO: usize = 9;
pub const IP_CSUM: usize = 10;
pub const IP_SADDR: usize = 12;
pub const IP_DADDR: usize = 16;
/// Offsets of the checksum inside the L4 header.
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

/// What the load balancer needs to know about a packet.
#[derive(Clone, Copy)]
pub struct Flow {
    /// Addresses and ports in network byte order, as in the packet.
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// TCP sequence number as in the packet (0 for UDP): tells a
    /// retransmitted SYN from a new connection on the same 5-tuple.
    pub tcp_seq: u32,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

impl Flow {
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off
            + if self.proto == PROTO_TCP {
                TCP_CSUM
            } else {
                UDP_CSUM
            }
    }
}

pub enum Parsed {
    /// IPv4 TCP or UDP, first (or only) fragment, with full L4 header.
    Flow(Flow),
    /// Not for the load balancer (not IPv4, other protocol, later fragment).
    Other,
    /// Too short for what its headers announce.
    Malformed,
}

#[inline(always)]
pub fn ptr_at<T, P: Packet>(ctx: &P, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn read<T: Copy, P: Packet>(ctx: &P, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked that the whole T lies inside the packet.
    ptr_at::<T, P>(ctx, offset).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
pub fn parse<P: Packet>(ctx: &P) -> Parsed {
    let Some(ether_type) = read::<u16, P>(ctx, 12) else {
        return Parsed::Malformed;
    };
    if u16::from_be(ether_type) != ETH_P_IP {
        return Parsed::Other;
    }
    let Some(version_ihl) = read::<u8, P>(ctx, ETH_HLEN) else {
        return Parsed::Malformed;
    };
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 {
        return Parsed::Malformed;
    }
    // The fixed 20 bytes must be there; options are skipped via ihl. Each
    // field is read with its own early return: a tuple of Options lets LLVM
    // keep undefined payloads in registers, which the verifier rejects.
    let Some(daddr) = read::<u32, P>(ctx, ETH_HLEN + IP_DADDR) else {
        return Parsed::Malformed;
    };
    let Some(saddr) = read::<u32, P>(ctx, ETH_HLEN + IP_SADDR) else {
        return Parsed::Malformed;
    };
    let Some(proto) = read::<u8, P>(ctx, ETH_HLEN + IP_PROTO) else {
        return Parsed::Malformed;
    };
    let Some(frag) = read::<u16, P>(ctx, ETH_HLEN + IP_FRAG_OFF) else {
        return Parsed::Malformed;
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Parsed::Other;
    }
    // Later fragments carry no ports; only the first one can be translated.
    if u16::from_be(frag) & 0x1fff != 0 {
        return Parsed::Other;
    }
    let l4_off = ETH_HLEN + ihl;
    let l4_len = if proto == PROTO_TCP {
        TCP_HLEN
    } else {
        UDP_HLEN
    };
    // The whole L4 header, checksum included, must be present to rewrite it.
    if ptr_at::<u8, P>(ctx, l4_off + l4_len - 1).is_none() {
        return Parsed::Malformed;
    }
    let Some(sport) = read::<u16, P>(ctx, l4_off) else {
        return Parsed::Malformed;
    };
    let Some(dport) = read::<u16, P>(ctx, l4_off + 2) else {
        return Parsed::Malformed;
    };
    let (tcp_flags, tcp_seq) = if proto == PROTO_TCP {
        let Some(f) = read::<u8, P>(ctx, l4_off + 13) else {
            return Parsed::Malformed;
        };
        let Some(seq) = read::<u32, P>(ctx, l4_off + 4) else {
            return Parsed::Malformed;
        };
        (f, seq)
    } else {
        (0, 0)
    };
    Parsed::Flow(Flow {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        tcp_flags,
        tcp_seq,
        l4_off,
    })
}

/// The flow of a packet the load balancer handles, or `None` to let it
/// pass; malformed packets are counted (and pass untouched).
#[inline(always)]
pub fn flow_or_count<P: Packet>(ctx: &P) -> Option<Flow> {
    match parse(ctx) {
        Parsed::Flow(flow) => Some(flow),
        Parsed::Other => None,
        Parsed::Malformed => {
            crate::metrics::count(ctx, lb_common::metrics::reason::MALFORMED);
            None
        }
    }
}
