//! The connection-tracking map (LRU hash), keyed by the packet's 5-tuple.
//!
//! Each load-balanced flow gets two entries:
//! - `CT_FORWARD`, keyed by the client's packet as sent (client -> VIP): the
//!   entry holds the backend address to DNAT to, so a flow keeps its backend
//!   even when the service's endpoints change.
//! - `CT_REPLY`, keyed by the backend's reply as it leaves the backend
//!   (backend -> client): the entry holds the VIP to put back as the source.
//!
//! In both, `nat_addr:nat_port` is "the address to rewrite to": the backend for
//! forward packets, the frontend for replies.
//!
//! Flows that arrive from outside the node through a NodePort, LoadBalancer
//! or external IP with `externalTrafficPolicy: Cluster` are also SNATed to
//! the node's address, so that replies come back through this node:
//! `snat_addr:snat_port` is then the new source (forward entry) or the
//! client to restore as destination (reply entry, keyed by the backend's
//! reply to `node:snat_port`). Zero when there is no SNAT.

/// Entries of the CONNTRACK LRU: two per translated connection (its
/// NetworkPolicy verdict rides on them), and one NetworkPolicy entry per
/// connection a pod receives; once closed, entries go after the agent's
/// closing timeout (10 s), except the reply entry of a connection the
/// backend closed first, the tuple's guard, after `CLOSED_HOLD_NS`. At
/// 5,000 new connections a second through one node, and 2,000 UDP queries,
/// that is about 600,000 entries, which the churn test reaches on two
/// cores; an LRU that fills evicts guards (then `tuple_clash`) and live
/// entries (`ct_miss_midflow`, `reply_miss`), and the agent warns when a
/// sweep leaves it 70% full. About 100 MB per node, preallocated (LRU maps
/// are); Linux's nf_conntrack_max on a large node is 262,144 of larger
/// entries.
pub const CONNTRACK_MAX_ENTRIES: u32 = 1_048_576;

/// How long a closed TCP connection's tuple stays its own when the backend
/// closed first: the backend's socket sits in TIME_WAIT for 60 s
/// (TCP_TIMEWAIT_LEN), and takes a SYN on its tuple for a new connection
/// only with a sequence number or TCP timestamp beyond the old one's. Only
/// the same client 4-tuple guarantees that (Linux 6.18 draws both ISN and
/// timestamp offset per 4-tuple: measured in the churn test's capture, a
/// tuple given to another client port was answered with the old
/// connection's ACK, and the client reset and resent its SYN). The 60 s
/// run on the kernel's timer wheel, which fires a timer that far out up to
/// one granularity of its level late: 4.1 s at HZ=1000, 5.1 s at HZ=100
/// (at 61 s, tuples were still met in TIME_WAIT, `tuple_clash`). 66 s.
pub const CLOSED_HOLD_NS: u64 = 66_000_000_000;

/// A closed connection's tuple that the backend did not close first (it
/// was reset, or the client sent the first FIN) has no TIME_WAIT socket at
/// the backend: it may go to a new connection this long after its last
/// packet (time for a lost last ACK to be answered by a resent FIN).
pub const NO_TIME_WAIT_HOLD_NS: u64 = 2_000_000_000;

/// How long after its last packet a TCP connection with `CT_F_*` `flags`
/// holds its tuple at the backend: `None` while it is not closing (held
/// for as long as it lives); `CLOSED_HOLD_NS` once the backend closed first,
/// whatever RST followed (see `CT_F_RESET`); `NO_TIME_WAIT_HOLD_NS`
/// otherwise. The data path's `claim` and the agent's summary both ask.
pub const fn tcp_tuple_hold_ns(flags: u16) -> Option<u64> {
    if flags & CT_F_CLOSING == 0 {
        None
    } else if flags & CT_F_BACKEND_CLOSED_FIRST != 0 {
        Some(CLOSED_HOLD_NS)
    } else {
        Some(NO_TIME_WAIT_HOLD_NS)
    }
}

/// A UDP tuple may go to another flow after this long without a packet
/// (Linux conntrack's timeout of a UDP flow: 30 s).
pub const UDP_REUSE_NS: u64 = 30_000_000_000;

pub const CT_FORWARD: u8 = 0;
pub const CT_REPLY: u8 = 1;
/// Flows admitted by NetworkPolicy, keyed by the 5-tuple as the local pod
/// sees it: sent by it (egress) or delivered to it (ingress). Replies match
/// the swapped tuple of the other kind.
pub const CT_POLICY_EGRESS: u8 = 2;
pub const CT_POLICY_INGRESS: u8 = 3;

/// 5-tuple of a packet plus the direction of the entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ConntrackKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `CT_FORWARD` or `CT_REPLY`.
    pub direction: u8,
    pub pad0: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ConntrackEntry {
    /// When the last packet was seen: CLOCK_MONOTONIC to the last tick
    /// (`lb-ebpf/src/clock.rs`).
    pub last_seen_ns: u64,
    /// Address to rewrite to (network byte order): backend or VIP.
    pub nat_addr: u32,
    /// Port to rewrite to (network byte order).
    pub nat_port: u16,
    /// `CT_F_*` flags.
    pub flags: u16,
    /// The frontend's reverse-NAT id.
    pub rev_nat_id: crate::service::RevNatId,
    /// Backend chosen for the flow.
    pub backend_id: u32,
    /// SNAT address (network byte order), see the module documentation.
    pub snat_addr: u32,
    /// SNAT port (network byte order), see the module documentation.
    pub snat_port: u16,
    pub pad0: u16,
    /// Sequence number of the SYN that opened the connection (as in the
    /// packet): a SYN with the same number is a retransmission and keeps
    /// the translation; another one opens a new connection on the tuple.
    pub syn_seq: u32,
    pub pad1: u32,
}

/// The flow came through a frontend from outside the node (XDP).
pub const CT_F_EXTERNAL: u16 = 1 << 0;
/// A TCP FIN or RST was seen in either direction (both entries of the
/// connection are marked): the connection is closing and its entries
/// expire after the closing timeout.
pub const CT_F_CLOSING: u16 = 1 << 1;
/// A TCP RST was seen. Before the backend's FIN, the connection was
/// aborted and the backend keeps no socket: the tuple is free soon. After
/// it (`CT_F_BACKEND_CLOSED_FIRST`), it changes nothing: the backend's
/// TIME_WAIT ignores an RST that is not exactly at the sequence number it
/// expects, and clients send such RSTs (in `lab_churn`, one below the end
/// of the client's FIN, after 0.05% of connections; the next connection on
/// the tuple then met the TIME_WAIT socket, a clash).
pub const CT_F_RESET: u16 = 1 << 2;
/// The backend sent the connection's first FIN: its socket sits in
/// TIME_WAIT for 60 s once the connection is closed.
pub const CT_F_BACKEND_CLOSED_FIRST: u16 = 1 << 3;
/// The backend has answered (set on the reply entry by its first packet).
pub const CT_F_ANSWERED: u16 = 1 << 4;
/// The connection's tuple at the backend was given up by a closed
/// connection (`claim` said it was reused), for `TUPLE_CLASH_REUSED`.
pub const CT_F_TUPLE_REUSED: u16 = 1 << 5;

/// An entry the agent's sweep found expired, handed to `lb_ct_sweep` in a
/// batch (the data of one BPF_PROG_TEST_RUN): the program removes it only
/// if no packet has touched it since it was listed, and writes what it did
/// into `outcome` (`SWEEP_*`). Deciding in the kernel keeps the check and
/// the removal a few instructions apart: from user space, a new connection
/// could take the 5-tuple between the two system calls and lose its fresh
/// entry (cilium#46298).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SweepItem {
    pub key: ConntrackKey,
    /// The entry's `last_seen_ns` when it was listed.
    pub seen_ns: u64,
    pub outcome: u32,
    pub pad0: u32,
}

/// Items per run of `lb_ct_sweep`: what fits in the linear data of an XDP
/// test run (a page less headroom and shared info, 3,520 bytes on x86_64).
pub const SWEEP_BATCH: usize = 96;
/// `SweepItem::outcome`: removed.
pub const SWEEP_REMOVED: u32 = 1;
/// Kept: a packet touched the entry, or a new connection replaced it,
/// since it was listed.
pub const SWEEP_CHANGED: u32 = 2;
/// Already gone (LRU eviction, or the data path removed it).
pub const SWEEP_GONE: u32 = 3;

crate::user_pod!(ConntrackKey, ConntrackEntry);
