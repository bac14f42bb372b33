//! One's-complement checksum arithmetic for incremental updates (RFC 1624),
//! and what a rewrite can learn of how a packet's L4 checksum is kept.
//!
//! Values are taken as they lie in memory: the one's-complement sum does
//! not depend on byte order. The functions follow the kernel's
//! (`include/net/checksum.h`) step for step, so that their results can be
//! compared with what the kernel's checksum helper wrote.

/// `csum_add`: 32-bit one's-complement addition (end-around carry).
#[inline(always)]
fn add(sum: u32, addend: u32) -> u32 {
    let r = sum.wrapping_add(addend);
    r.wrapping_add(u32::from(r < addend))
}

/// `csum_fold`: a 32-bit sum folded to 16 bits, complemented.
#[inline(always)]
fn fold(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// A complete checksum `csum` after a 32-bit field of the data it covers
/// goes from `old` to `new` (the kernel's `csum_replace4`).
#[inline(always)]
pub fn replace4(csum: u16, old: u32, new: u32) -> u16 {
    fold(add(add(!u32::from(csum), !old), new))
}

/// The same for a 16-bit field (`csum_replace2`, which widens both values).
#[inline(always)]
pub fn replace2(csum: u16, old: u16, new: u16) -> u16 {
    replace4(csum, u32::from(old), u32::from(new))
}

/// A UDP checksum that comes out 0 is sent as its other form, 0xffff: 0
/// says the datagram has none.
#[inline(always)]
pub fn udp_nonzero(csum: u16, proto: u8) -> u16 {
    if csum == 0 && proto == crate::PROTO_UDP {
        0xffff
    } else {
        csum
    }
}

/// A partial checksum (only the pseudo-header's sum, uncomplemented, which
/// the device or the stack completes later) after an address of the
/// pseudo-header goes from `old` to `new` (`inet_proto_csum_replace4` on a
/// `CHECKSUM_PARTIAL` packet).
#[inline(always)]
fn partial_replace4(csum: u16, old: u32, new: u32) -> u16 {
    !fold(add(add(u32::from(csum), !old), new))
}

/// How a packet's L4 checksum is kept, which a tc program cannot read
/// (`skb->ip_summed` is not in `__sk_buff`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Only the pseudo-header's part (a local socket's packet with
    /// checksum offload): a port change does not touch it.
    Partial,
    /// Complete over the whole segment: a port change updates it.
    Complete,
    /// None at all (a UDP checksum of 0): nothing to update.
    Absent,
    /// Not known: no address changed yet, or the address change left the
    /// sum alike (the update then changes nothing in either state).
    Unknown,
    /// The helper's result is neither update's: never seen; counted.
    Unexplained,
}

/// What the checksum helper's update of an address (`old` to `new`, the
/// checksum `before` and `after` it) says of the checksum's state: the two
/// states update it differently, unless the two addresses sum alike. For
/// UDP (`proto`), a checksum of 0 is none (left alone by the helper), and a
/// result of 0 is written as 0xffff (`BPF_F_MARK_MANGLED_0`, `udp_nonzero`).
#[inline(always)]
pub fn state_after_address(before: u16, after: u16, (old, new): (u32, u32), proto: u8) -> State {
    if proto == crate::PROTO_UDP && before == 0 {
        return State::Absent;
    }
    let complete = udp_nonzero(replace4(before, old, new), proto);
    let partial = udp_nonzero(partial_replace4(before, old, new), proto);
    if complete == partial {
        State::Unknown
    } else if after == partial {
        State::Partial
    } else if after == complete {
        State::Complete
    } else {
        State::Unexplained
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one's-complement sum of 16-bit words as they lie in memory
    /// (native loads of byte pairs), folded, uncomplemented.
    fn sum(bytes: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for pair in bytes.chunks(2) {
            let word = [pair[0], *pair.get(1).unwrap_or(&0)];
            s += u32::from(u16::from_ne_bytes(word));
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    fn addr(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    /// A TCP segment (ports, a sequence number, a payload; checksum 0) and
    /// its pseudo-header's sum, for `src` and `dst`.
    fn segment(dport: u16, payload: &[u8]) -> [u8; 24] {
        let mut seg = [0u8; 24];
        seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
        seg[2..4].copy_from_slice(&dport.to_be_bytes());
        seg[4..8].copy_from_slice(&7u32.to_be_bytes());
        seg[12] = 0x50;
        seg[13] = 0x10;
        seg[20..24].copy_from_slice(&payload[..4]);
        seg
    }

    fn pseudo(src: [u8; 4], dst: [u8; 4], len: u16) -> u16 {
        let mut p = [0u8; 12];
        p[0..4].copy_from_slice(&src);
        p[4..8].copy_from_slice(&dst);
        p[9] = crate::PROTO_TCP;
        p[10..12].copy_from_slice(&len.to_be_bytes());
        sum(&p)
    }

    /// The complete checksum of `seg` between `src` and `dst`, as stored.
    fn complete(src: [u8; 4], dst: [u8; 4], seg: &[u8]) -> u16 {
        let s = u32::from(pseudo(src, dst, seg.len() as u16)) + u32::from(sum(seg));
        !(((s & 0xffff) + (s >> 16)) as u16)
    }

    const CASES: [([u8; 4], [u8; 4], [u8; 4]); 4] = [
        // client, frontend, backend
        ([10, 244, 1, 5], [10, 96, 0, 10], [10, 244, 2, 7]),
        ([10, 244, 1, 5], [172, 18, 0, 11], [10, 244, 1, 6]),
        ([192, 168, 255, 254], [10, 96, 200, 1], [10, 244, 0, 255]),
        ([1, 2, 3, 4], [255, 255, 255, 255], [0, 0, 0, 1]),
    ];

    /// DNAT of a segment with a complete checksum: address and port
    /// updates give the checksum computed afresh, and the address's update
    /// says `Complete`.
    #[test]
    fn complete_checksums_update_to_the_fresh_ones() {
        for (client, frontend, backend) in CASES {
            let mut seg = segment(80, b"GET ");
            let before = complete(client, frontend, &seg);
            let after_addr = replace4(before, addr(frontend), addr(backend));
            assert_eq!(
                state_after_address(
                    before,
                    after_addr,
                    (addr(frontend), addr(backend)),
                    crate::PROTO_TCP
                ),
                State::Complete
            );
            let after = replace2(after_addr, 80u16.to_be(), 8080u16.to_be());
            seg[2..4].copy_from_slice(&8080u16.to_be_bytes());
            assert!(sum_ok(after, complete(client, backend, &seg)));
        }
    }

    /// The same segment with a partial checksum (the pseudo-header's sum,
    /// as a socket with checksum offload leaves it): the kernel's update
    /// gives the new pseudo-header's sum, and says `Partial`.
    #[test]
    fn partial_checksums_are_told_from_complete_ones() {
        for (client, frontend, backend) in CASES {
            let len = 24;
            let before = pseudo(client, frontend, len);
            let after = partial_replace4(before, addr(frontend), addr(backend));
            assert!(sum_ok(after, pseudo(client, backend, len)));
            assert_eq!(
                state_after_address(
                    before,
                    after,
                    (addr(frontend), addr(backend)),
                    crate::PROTO_TCP
                ),
                State::Partial
            );
        }
    }

    /// Addresses whose words sum alike change neither form: unknown (the
    /// lab's 10.96.1.153 and 10.244.1.5 do). A result neither form gives
    /// is unexplained.
    #[test]
    fn an_address_change_that_keeps_the_sum_tells_nothing() {
        let (a, b) = (addr([10, 1, 2, 3]), addr([2, 3, 10, 1]));
        assert_eq!(
            state_after_address(0x1234, 0x1234, (a, b), crate::PROTO_TCP),
            State::Unknown
        );
        // A result neither update gives (the helper did something else).
        let (a, b) = (addr([10, 96, 0, 10]), addr([10, 244, 2, 7]));
        let c = replace4(0x1234, a, b);
        let p = partial_replace4(0x1234, a, b);
        let other = (0..=u16::MAX).find(|v| *v != c && *v != p).unwrap_or(0);
        assert_eq!(
            state_after_address(0x1234, other, (a, b), crate::PROTO_TCP),
            State::Unexplained
        );
        // A UDP datagram without checksum has none to update.
        assert_eq!(
            state_after_address(0, 0, (a, b), crate::PROTO_UDP),
            State::Absent
        );
    }

    /// A UDP checksum whose update comes out 0 is written 0xffff by the
    /// helper: still told apart.
    #[test]
    fn a_udp_checksum_written_as_0xffff_is_still_told_apart() {
        let (a, b) = (addr([10, 96, 0, 10]), addr([10, 244, 2, 7]));
        // The complete checksum whose update is 0.
        let before = (0..=u16::MAX)
            .find(|c| replace4(*c, a, b) == 0)
            .unwrap_or(0);
        assert_eq!(
            state_after_address(before, 0xffff, (a, b), crate::PROTO_UDP),
            State::Complete
        );
    }

    #[test]
    fn udp_checksums_never_come_out_zero() {
        assert_eq!(udp_nonzero(0, crate::PROTO_UDP), 0xffff);
        assert_eq!(udp_nonzero(0, crate::PROTO_TCP), 0);
        assert_eq!(udp_nonzero(0x1234, crate::PROTO_UDP), 0x1234);
    }

    /// Two 16-bit one's-complement values are the same number (0 has two
    /// forms).
    fn sum_ok(a: u16, b: u16) -> bool {
        a == b || (a == 0 && b == 0xffff) || (a == 0xffff && b == 0)
    }
}
