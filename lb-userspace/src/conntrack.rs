//! Expiry of idle conntrack entries. The data path stamps each entry with
//! the time of its last packet (and marks TCP entries closing on FIN/RST);
//! the agent sweeps the table and removes what has been idle too long, so
//! the table holds live flows rather than whatever LRU eviction leaves.

use std::time::Duration;

use anyhow::{Context, Result};
use lb_common::{
    conntrack::{
        tcp_tuple_hold_ns, ConntrackEntry, ConntrackKey, SweepItem, CLOSED_HOLD_NS, CT_FORWARD,
        CT_F_BACKEND_CLOSED_FIRST, CT_F_CLOSING, CT_F_EXTERNAL, CT_F_RESET, CT_REPLY,
        SWEEP_CHANGED, SWEEP_REMOVED,
    },
    PROTO_TCP,
};
use serde::Serialize;

use crate::datapath::{batch::for_each_entry, Datapath};

/// How long an entry may be idle, by protocol and state: 6 hours for
/// established TCP and 30 seconds for UDP (Linux conntrack's; a DNS-like
/// client's queries at 5,000 a second filled the LRU at 60 s); 66 seconds for the
/// reply entry of a connection its backend closed first, the data path's
/// hold of its tuple (`lb_common::conntrack::CLOSED_HOLD_NS`: the
/// backend's TIME_WAIT, its timer's slack and a second; the data path decides itself when a
/// tuple is free, so the sweep only has to outlast that); 10 seconds for
/// the other entries of closed connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_established: Duration,
    /// The reply entry of a connection the backend closed first: it guards
    /// the tuple while the backend's TIME_WAIT lasts.
    pub tcp_time_wait: Duration,
    /// Every other entry of a closed connection (forward entries, reply
    /// entries without TIME_WAIT at the backend: the client closed first,
    /// or the connection was reset before the backend's FIN): only
    /// late packets need them. Short, so that closed connections hold one
    /// entry, not two, and crowd live ones less in the LRU.
    pub tcp_closing: Duration,
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(6 * 3600),
            tcp_time_wait: Duration::from_nanos(CLOSED_HOLD_NS),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(30),
        }
    }
}

/// Whether an entry last seen at `entry.last_seen_ns` has expired at `now_ns`
/// (both CLOCK_MONOTONIC; the data path reads it to the last tick, so an
/// age is a saturating difference).
pub fn expired(key: &ConntrackKey, entry: &ConntrackEntry, now_ns: u64, t: &Timeouts) -> bool {
    let time_wait_guard = key.direction == CT_REPLY && entry.flags & CT_F_BACKEND_CLOSED_FIRST != 0;
    let limit = match (key.proto, State::of(entry)) {
        // Reset or not: see `lb_common::conntrack::CT_F_RESET`.
        (PROTO_TCP, State::Closing | State::Reset) if time_wait_guard => {
            t.tcp_time_wait.max(t.tcp_closing)
        }
        (PROTO_TCP, State::Closing | State::Reset) => t.tcp_closing,
        (PROTO_TCP, _) => t.tcp_established,
        _ => t.udp,
    };
    now_ns.saturating_sub(entry.last_seen_ns) > limit.as_nanos() as u64
}

/// Where a connection is, for the summary and the timeouts: from the
/// flags the data path sets, on translation and NetworkPolicy entries
/// alike (a policy entry is marked closing by the FIN or RST it sees too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Established,
    Closing,
    Reset,
}

/// A NetworkPolicy entry (an admitted flow), not a translation.
pub fn is_policy(key: &ConntrackKey) -> bool {
    key.direction != CT_FORWARD && key.direction != CT_REPLY
}

impl State {
    pub fn of(entry: &ConntrackEntry) -> Self {
        if entry.flags & CT_F_RESET != 0 {
            State::Reset
        } else if entry.flags & CT_F_CLOSING != 0 {
            State::Closing
        } else {
            State::Established
        }
    }
}

/// Conntrack entries by kind and state, and the SNAT tuples held: what
/// `/metrics` and `lb inspect conntrack --summary` show.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub tcp_established: usize,
    pub tcp_closing: usize,
    pub tcp_reset: usize,
    pub udp: usize,
    pub policy: usize,
    /// Connections from outside SNATed to this node whose tuple no new
    /// connection may take yet (live, or closed within `CLOSED_HOLD_NS`):
    /// at most the SNAT range's size per backend.
    pub snat_tuples_held: usize,
    /// The most tuples held towards one backend (address and port).
    pub snat_tuples_held_max_backend: usize,
}

impl Summary {
    pub fn total(&self) -> usize {
        self.tcp_established + self.tcp_closing + self.tcp_reset + self.udp + self.policy
    }
}

/// Counts `entries` by state (pure; `now_ns` on the data path's clock, CLOCK_MONOTONIC).
pub fn summarize(entries: &[(ConntrackKey, ConntrackEntry)], now_ns: u64) -> Summary {
    let mut tally = Tally::new(now_ns);
    for (k, e) in entries {
        tally.add(k, e);
    }
    tally.finish()
}

/// A `Summary` counted one entry at a time, so a sweep of a million
/// entries keeps no copy of them.
pub struct Tally {
    now_ns: u64,
    summary: Summary,
    held_per_backend: std::collections::HashMap<(u32, u16), usize>,
}

impl Tally {
    pub fn new(now_ns: u64) -> Self {
        Self {
            now_ns,
            summary: Summary::default(),
            held_per_backend: Default::default(),
        }
    }

    pub fn add(&mut self, k: &ConntrackKey, e: &ConntrackEntry) {
        let s = &mut self.summary;
        match (State::of(e), k.proto) {
            _ if is_policy(k) => s.policy += 1,
            (_, p) if p != PROTO_TCP => s.udp += 1,
            (State::Established, _) => s.tcp_established += 1,
            (State::Closing, _) => s.tcp_closing += 1,
            (State::Reset, _) => s.tcp_reset += 1,
        }
        let snat_reply =
            k.direction == CT_REPLY && e.flags & CT_F_EXTERNAL != 0 && e.snat_addr != 0;
        let idle = self.now_ns.saturating_sub(e.last_seen_ns);
        // As the data path's `claim` gives tuples up.
        let held = tcp_tuple_hold_ns(e.flags).is_none_or(|hold| idle < hold);
        if snat_reply && held {
            s.snat_tuples_held += 1;
            *self.held_per_backend.entry((k.saddr, k.sport)).or_default() += 1;
        }
    }

    pub fn finish(mut self) -> Summary {
        self.summary.snat_tuples_held_max_backend =
            self.held_per_backend.values().copied().max().unwrap_or(0);
        self.summary
    }
}

/// Whether a table holding `live` entries after a sweep is near full: new
/// entries come in between sweeps, and an LRU that fills evicts the oldest
/// closed connections' entries, the tuples' TIME_WAIT guards among them
/// (then `tuple_clash`), before live ones.
pub fn filling(live: usize, capacity: u32) -> bool {
    live as u64 * 10 > u64::from(capacity) * 7
}

/// Says so when the table (of `capacity` entries) is `filling`.
pub fn warn_if_filling(summary: &Summary, capacity: u32) {
    if filling(summary.total(), capacity) {
        tracing::warn!(
            live = summary.total(),
            capacity,
            ?summary,
            "the conntrack table is more than 70% full after a sweep: closed connections' \
             entries may be evicted early (watch lb_datapath_packets_total, reasons tuple_clash and ct_miss_midflow)"
        );
    }
}

/// The clock the data path stamps entries with (CLOCK_MONOTONIC; it reads
/// it to the last tick).
pub fn monotonic_ns() -> Result<u64> {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).context("clock_gettime")?;
    Ok(ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Expired entries removed.
    pub removed: usize,
    /// Listed as expired, then touched by a packet or taken by a new
    /// connection before the removal: kept.
    pub kept: usize,
}

/// Removes expired entries; returns the summary of those left and what was
/// removed. The removal itself is the kernel's (`Datapath::remove_unchanged`):
/// an entry a new connection wrote since the listing is kept.
pub fn sweep(dp: &mut Datapath, t: &Timeouts) -> Result<(Summary, Swept)> {
    let now = monotonic_ns()?;
    let mut stale = Vec::new();
    let mut live = Tally::new(now);
    for_each_entry(&dp.maps.conntrack, |k, v| {
        if expired(k, v, now, t) {
            stale.push(SweepItem {
                key: *k,
                seen_ns: v.last_seen_ns,
                ..Default::default()
            });
        } else {
            live.add(k, v);
        }
    })
    .context("listing the conntrack map")?;
    dp.remove_unchanged(&mut stale)?;
    let swept = Swept {
        removed: stale.iter().filter(|i| i.outcome == SWEEP_REMOVED).count(),
        kept: stale.iter().filter(|i| i.outcome == SWEEP_CHANGED).count(),
    };
    Ok((live.finish(), swept))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{
        conntrack::{CT_POLICY_EGRESS, CT_POLICY_INGRESS},
        PROTO_UDP,
    };

    #[test]
    fn expiry_by_protocol_and_state() {
        let t = Timeouts {
            tcp_established: Duration::from_secs(100),
            tcp_time_wait: Duration::from_secs(10),
            tcp_closing: Duration::from_secs(2),
            udp: Duration::from_secs(30),
        };
        let s = 1_000_000_000u64;
        let tw = CT_F_CLOSING | CT_F_BACKEND_CLOSED_FIRST;
        // (proto, direction, flags, idle seconds, expired?)
        let cases = [
            (PROTO_TCP, CT_FORWARD, 0, 99, false),
            (PROTO_TCP, CT_REPLY, 0, 101, true),
            // The TIME_WAIT guard: the reply entry when the backend closed first.
            (PROTO_TCP, CT_REPLY, tw, 9, false),
            (PROTO_TCP, CT_REPLY, tw, 11, true),
            (PROTO_TCP, CT_FORWARD, tw, 1, false),
            (PROTO_TCP, CT_FORWARD, tw, 3, true),
            (PROTO_TCP, CT_REPLY, CT_F_CLOSING, 3, true),
            // An RST after the backend's FIN leaves the guard as it was
            // (the backend's TIME_WAIT may have ignored it).
            (PROTO_TCP, CT_REPLY, tw | CT_F_RESET, 9, false),
            (PROTO_TCP, CT_REPLY, tw | CT_F_RESET, 11, true),
            (PROTO_TCP, CT_REPLY, CT_F_CLOSING | CT_F_RESET, 3, true),
            // NetworkPolicy entries close as translations do (they once
            // stayed for the established timeout and filled the LRU).
            (PROTO_TCP, CT_POLICY_EGRESS, 0, 99, false),
            (PROTO_TCP, CT_POLICY_EGRESS, CT_F_CLOSING, 1, false),
            (PROTO_TCP, CT_POLICY_EGRESS, CT_F_CLOSING, 3, true),
            (
                PROTO_TCP,
                CT_POLICY_INGRESS,
                CT_F_CLOSING | CT_F_RESET,
                3,
                true,
            ),
            (PROTO_UDP, CT_POLICY_INGRESS, 0, 31, true),
            (PROTO_UDP, CT_FORWARD, 0, 29, false),
            (PROTO_UDP, CT_REPLY, 0, 31, true),
        ];
        for (proto, direction, flags, idle, want) in cases {
            let key = ConntrackKey {
                proto,
                direction,
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
                "proto {proto} direction {direction} flags {flags} idle {idle}s"
            );
        }
        // A clock behind the entry (entry written just now) is not expired.
        let entry = ConntrackEntry {
            last_seen_ns: 5 * s,
            ..Default::default()
        };
        assert!(!expired(&ConntrackKey::default(), &entry, 4 * s, &t));
    }

    #[test]
    fn summary_counts_states_and_the_snat_tuples_held() {
        let s = 1_000_000_000u64;
        let now = 1000 * s;
        let node = 0x0a00_0001;
        let entry = |dir, proto, flags, snat_addr, backend: u32, idle: u64| {
            (
                ConntrackKey {
                    saddr: backend,
                    sport: 80,
                    daddr: node,
                    proto,
                    direction: dir,
                    ..Default::default()
                },
                ConntrackEntry {
                    last_seen_ns: now - idle * s,
                    flags,
                    snat_addr,
                    ..Default::default()
                },
            )
        };
        let (ext, tw) = (CT_F_EXTERNAL, CT_F_BACKEND_CLOSED_FIRST);
        let (closing, reset, policy) = (
            CT_F_CLOSING,
            CT_F_CLOSING | CT_F_RESET,
            lb_common::conntrack::CT_POLICY_EGRESS,
        );
        // (direction, protocol, flags, snat, backend, idle s)
        let entries = [
            entry(CT_FORWARD, PROTO_TCP, 0, 0, 1, 0),
            entry(CT_REPLY, PROTO_TCP, ext, 7, 1, 0), // live: held
            entry(CT_REPLY, PROTO_TCP, ext | closing | tw, 7, 1, 30), // TIME_WAIT: held
            entry(CT_REPLY, PROTO_TCP, ext | closing | tw, 7, 2, 67), // over: free
            entry(CT_REPLY, PROTO_TCP, ext | closing, 7, 2, 3), // no TIME_WAIT: free
            entry(CT_REPLY, PROTO_TCP, ext | reset, 7, 2, 3), // reset: free
            entry(CT_REPLY, PROTO_TCP, 0, 0, 2, 0),   // from a pod: no SNAT
            entry(CT_FORWARD, lb_common::PROTO_UDP, 0, 0, 3, 0),
            entry(policy, PROTO_TCP, 0, 0, 3, 0),
        ];
        let got = summarize(&entries, now);
        assert_eq!(
            got,
            Summary {
                tcp_established: 3,
                tcp_closing: 3,
                tcp_reset: 1,
                udp: 1,
                policy: 1,
                snat_tuples_held: 2,
                snat_tuples_held_max_backend: 2,
            }
        );
        assert_eq!(got.total(), entries.len());
    }
}
