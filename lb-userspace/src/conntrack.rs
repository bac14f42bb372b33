//! Expiry of idle conntrack entries. The data path stamps each entry with
//! the time of its last packet (and marks TCP entries closing on FIN/RST);
//! the agent sweeps the table and removes what has been idle too long, so
//! the table holds live flows rather than whatever LRU eviction leaves.

use std::time::Duration;

use anyhow::{Context, Result};
use lb_common::{
    conntrack::{ConntrackEntry, ConntrackKey, CT_F_CLOSING},
    PROTO_TCP,
};

use crate::datapath::Maps;

/// How long an entry may be idle, by protocol and state: 6 hours for
/// established TCP and 60 seconds for UDP (Cilium's); 120 seconds once a
/// FIN or RST was seen, Linux conntrack's TIME_WAIT, which outlasts the
/// backend's own TIME_WAIT socket (60 s): while the entry exists, a new
/// connection through another Service that would reuse the closed one's
/// 5-tuple at the backend is given another source port (see the data
/// path's `free_source_port`), instead of meeting that socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_established: Duration,
    pub tcp_closing: Duration,
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(6 * 3600),
            tcp_closing: Duration::from_secs(120),
            udp: Duration::from_secs(60),
        }
    }
}

/// Whether an entry last seen at `entry.last_seen_ns` has expired at `now_ns`
/// (both CLOCK_MONOTONIC, as bpf_ktime_get_ns).
pub fn expired(key: &ConntrackKey, entry: &ConntrackEntry, now_ns: u64, t: &Timeouts) -> bool {
    let limit = match (key.proto, entry.flags & CT_F_CLOSING != 0) {
        (PROTO_TCP, true) => t.tcp_closing,
        (PROTO_TCP, false) => t.tcp_established,
        _ => t.udp,
    };
    now_ns.saturating_sub(entry.last_seen_ns) > limit.as_nanos() as u64
}

/// The clock bpf_ktime_get_ns reads.
pub fn monotonic_ns() -> Result<u64> {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).context("clock_gettime")?;
    Ok(ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
}

/// Removes expired entries; returns (entries left, entries removed).
pub fn sweep(maps: &mut Maps, t: &Timeouts) -> Result<(usize, usize)> {
    let now = monotonic_ns()?;
    let mut stale = Vec::new();
    let mut live = 0;
    for item in maps.conntrack.iter() {
        // An entry may vanish (LRU) between listing and reading: skip it.
        let Ok((k, v)) = item else { continue };
        if expired(&k, &v, now, t) {
            stale.push(k);
        } else {
            live += 1;
        }
    }
    for k in &stale {
        let _ = maps.conntrack.remove(k);
    }
    Ok((live, stale.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::PROTO_UDP;

    #[test]
    fn expiry_by_protocol_and_state() {
        let t = Timeouts {
            tcp_established: Duration::from_secs(100),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(30),
        };
        let s = 1_000_000_000u64;
        // (proto, flags, idle seconds, expired?)
        let cases = [
            (PROTO_TCP, 0, 99, false),
            (PROTO_TCP, 0, 101, true),
            (PROTO_TCP, CT_F_CLOSING, 9, false),
            (PROTO_TCP, CT_F_CLOSING, 11, true),
            (PROTO_UDP, 0, 29, false),
            (PROTO_UDP, 0, 31, true),
        ];
        for (proto, flags, idle, want) in cases {
            let key = ConntrackKey {
                proto,
                ..Default::default()
            };
            let entry = ConntrackEntry {
                last_seen_ns: 1000 * s,
                flags,
                ..Default::default()
            };
            assert_eq!(
                expired(&key, &entry, (1000 + idle) * s, &t),
                want,
                "proto {proto} flags {flags} idle {idle}s"
            );
        }
        // A clock behind the entry (entry written just now) is not expired.
        let entry = ConntrackEntry {
            last_seen_ns: 5 * s,
            ..Default::default()
        };
        assert!(!expired(&ConntrackKey::default(), &entry, 4 * s, &t));
    }
}
