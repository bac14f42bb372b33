//! Building and checking IPv4 TCP/UDP frames, for data-path tests and
//! benchmarks that run the programs on crafted packets.

use std::net::Ipv4Addr;

use lb_common::{PROTO_TCP, PROTO_UDP};

/// The header fields of a crafted frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

pub const ETH_HLEN: usize = 14;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum16(data))
}

fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    fold(sum16(&pseudo) + sum16(l4))
}

impl Frame {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self::new(src, sport, dst, dport, PROTO_TCP)
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self::new(src, sport, dst, dport, PROTO_UDP)
    }

    fn new(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> Self {
        Self {
            src: src.parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
            dst: dst.parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
            sport,
            dport,
            proto,
        }
    }

    /// Ethernet + IPv4 + TCP (a SYN) or UDP header + `payload`, all checksums valid.
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        self.build_with_flags(payload, TCP_SYN)
    }

    /// `build` of a TCP packet after the SYN, as every answer is: an ACK.
    pub fn build_ack(&self, payload: &[u8]) -> Vec<u8> {
        self.build_with_flags(payload, TCP_ACK)
    }

    /// `build`, with these TCP flags.
    pub fn build_with_flags(&self, payload: &[u8], tcp_flags: u8) -> Vec<u8> {
        self.build_tcp(payload, tcp_flags, 1000)
    }

    /// `build`, with these TCP flags and sequence number (a SYN with
    /// another number than an earlier one opens another connection).
    pub fn build_tcp(&self, payload: &[u8], tcp_flags: u8, seq: u32) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == PROTO_TCP {
            l4.extend_from_slice(&seq.to_be_bytes());
            l4.extend_from_slice(&0u32.to_be_bytes()); // ack
            l4.extend_from_slice(&[0x50, tcp_flags]); // data offset 5, flags
            l4.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, csum, urg
        } else {
            l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(payload);
        let csum = l4_checksum(self.src, self.dst, self.proto, &l4);
        let off = if self.proto == PROTO_TCP { 16 } else { 6 };
        l4[off..off + 2].copy_from_slice(&csum.to_be_bytes());

        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, self.proto, 0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        let csum = checksum(&ip);
        ip[10..12].copy_from_slice(&csum.to_be_bytes());

        let mut frame = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&l4);
        frame
    }

    /// Parses the headers of a frame built by `build` (or rewritten from one),
    /// checking the IPv4 and L4 checksums.
    pub fn parse(frame: &[u8]) -> Result<Self, String> {
        if frame.len() < ETH_HLEN + 20 {
            return Err(format!("frame of {} bytes is too short", frame.len()));
        }
        let ip = &frame[ETH_HLEN..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if checksum(&ip[..ihl]) != 0 {
            return Err("bad IPv4 header checksum".into());
        }
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let proto = ip[9];
        let l4 = &ip[ihl..total.min(ip.len())];
        if l4_checksum(src, dst, proto, l4) != 0 {
            return Err(format!("bad L4 checksum (proto {proto})"));
        }
        Ok(Self {
            src,
            dst,
            sport: u16::from_be_bytes([l4[0], l4[1]]),
            dport: u16::from_be_bytes([l4[2], l4[3]]),
            proto,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_parse_back_with_valid_checksums() {
        for f in [
            Frame::tcp("10.0.0.1", 1234, "10.96.0.10", 80),
            Frame::udp("10.0.0.1", 53, "10.96.0.10", 5353),
        ] {
            let bytes = f.build(b"hello");
            assert_eq!(Frame::parse(&bytes), Ok(f));
            let mut corrupt = bytes.clone();
            let last = corrupt.len() - 1;
            corrupt[last] ^= 0xff;
            assert!(Frame::parse(&corrupt).is_err());
        }
    }
}
