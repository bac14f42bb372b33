//! Per-CPU packet counters, indexed by the reason a packet was handled so.

/// Index into the metrics array.
pub mod reason {
    /// A new flow to a Service was translated to a backend.
    pub const NEW_FLOW: u32 = 0;
    /// A packet of a tracked flow was translated (forward direction).
    pub const FORWARDED: u32 = 1;
    /// A reply was translated back to the Service address.
    pub const REVERSE_NAT: u32 = 2;
    /// A packet to a Service with no backend was refused (ICMP port
    /// unreachable back to the client, or dropped if that failed).
    pub const REJECT_NO_BACKEND: u32 = 3;
    /// A packet too short for the headers it announces (passed untouched).
    pub const MALFORMED: u32 = 4;
    /// A checksum or store helper failed; the packet was dropped.
    pub const DROP_REWRITE_FAILED: u32 = 5;
    /// Conntrack table insert failed (the flow is still forwarded).
    pub const CT_INSERT_FAILED: u32 = 6;
    /// A new flow to a LoadBalancer address from outside its source ranges.
    pub const DROP_SOURCE_RANGE: u32 = 7;
    /// A new flow that NetworkPolicy does not allow.
    pub const DROP_POLICY: u32 = 8;
    /// A new flow found no free SNAT tuple in `SNAT_TRIES` tries (dropped;
    /// the client retransmits its SYN).
    pub const SNAT_ALLOC_FAILED: u32 = 9;
    /// Tuples tried beyond the first when allocating a source port (SNAT,
    /// or a new client port on a clash): how crowded the ranges are.
    pub const SNAT_RETRIES: u32 = 10;
    /// A closed connection's tuple was given to a new one (a clash resolved
    /// safely: see `lb_common::conntrack::CLOSED_HOLD_NS`).
    pub const TUPLE_REUSED: u32 = 11;
    /// A SYN met a closed (or another connection's) entry on its 5-tuple and
    /// replaced it, as Linux conntrack does.
    pub const CT_REOPENED: u32 = 12;
    /// A TCP packet other than a SYN to a frontend found no entry: its
    /// connection's entry was evicted while live (or predates the agent).
    pub const CT_MISS_MIDFLOW: u32 = 13;
    /// A packet to this node's SNAT port range found no entry: an SNATed
    /// connection's reply entry was evicted while live.
    pub const REPLY_MISS: u32 = 14;
    /// A backend answered a new connection's SYN with an ACK, not a SYN-ACK:
    /// it holds an older connection on the tuple (TIME_WAIT). The client
    /// resets it and resends its SYN. What tuple reuse must never cause.
    pub const TUPLE_CLASH: u32 = 15;
    /// Of `TUPLE_CLASH`: the connection's tuple had been given up by a
    /// closed connection (`TUPLE_REUSED`): the hold was too short for it.
    pub const TUPLE_CLASH_REUSED: u32 = 16;
    /// Of `TUPLE_CLASH`: the connection kept its client's own source
    /// (no SNAT, no moved port).
    pub const TUPLE_CLASH_OWN_SOURCE: u32 = 17;
    /// A new flow's tuple at the backend, found free, was taken by another
    /// new flow (on another CPU) before this one could write it: the next
    /// port was tried, where the two would otherwise have clashed.
    pub const TUPLE_RACED: u32 = 18;
    /// A pod's `connect()` or `sendmsg()` to a Service was sent to a
    /// backend at the socket (socket LB): its packets need no translation.
    pub const SOCK_TRANSLATED: u32 = 19;
    /// A socket asked for its peer or a datagram's source and was given
    /// the Service address back.
    pub const SOCK_REVERSED: u32 = 20;
    /// The checksum helper's update of an address matched neither a
    /// partial nor a complete checksum's (`csum::State::Unexplained`):
    /// the port's change took the helper too. Never expected; any mean
    /// the shortcut of `nat::rewrite` misreads this kernel.
    pub const CSUM_STATE_UNEXPLAINED: u32 = 21;
    pub const COUNT: u32 = 22;

    pub const NAMES: [&str; COUNT as usize] = [
        "new_flow",
        "forwarded",
        "reverse_nat",
        "reject_no_backend",
        "malformed",
        "drop_rewrite_failed",
        "ct_insert_failed",
        "drop_source_range",
        "drop_policy",
        "snat_alloc_failed",
        "snat_retries",
        "tuple_reused",
        "ct_reopened",
        "ct_miss_midflow",
        "reply_miss",
        "tuple_clash",
        "tuple_clash_reused",
        "tuple_clash_own_source",
        "tuple_raced",
        "sock_translated",
        "sock_reversed",
        "csum_state_unexplained",
    ];
}

/// Packet and byte counts for one reason, on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

crate::user_pod!(Counter);
