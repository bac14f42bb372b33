//! The service map: `(vip, port, proto, slot)` -> service entry or backend slot.
//!
//! As in Cilium's `lb4_services_v2`, slot 0 is the master entry that carries the
//! number of backends; slots `1..=count` each name one backend id. The agent
//! writes backend slots before the slot-0 count (and removes surplus slots after
//! shrinking it), so the data path never reads a half-written service.

/// Key of the service map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceKey {
    /// Virtual IPv4 address, network byte order.
    pub addr: u32,
    /// Service port, network byte order.
    pub port: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    pub pad0: u8,
    /// 0 for the master entry, `1..=count` for backend slots.
    pub slot: u16,
    pub pad1: u16,
}

impl ServiceKey {
    pub const fn new(addr_be: u32, port_be: u16, proto: u8, slot: u16) -> Self {
        Self {
            addr: addr_be,
            port: port_be,
            proto,
            pad0: 0,
            slot,
            pad1: 0,
        }
    }
}

/// Value of the service map. In slot 0 `count` is meaningful; in other slots
/// `backend_id` is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceValue {
    /// Backend id (slots >= 1).
    pub backend_id: u32,
    /// Number of backend slots (slot 0).
    pub count: u16,
    /// `SERVICE_F_*` flags (slot 0).
    pub flags: u16,
    /// Identifies the frontend for reverse NAT, its Maglev table and its
    /// source ranges: 32 bits, as a node may program more than 65,535
    /// frontends (100,000 Services, with NodePorts).
    pub rev_nat_id: RevNatId,
    /// Entries of the Service's Maglev table (slot 0); 0 while it has none.
    pub maglev_size: u16,
    pub pad0: u16,
    /// `sessionAffinity: ClientIP` timeout in seconds (slot 0, with
    /// `SERVICE_F_AFFINITY`).
    pub affinity_timeout: u32,
}

/// A frontend's reverse-NAT id (`ServiceValue::rev_nat_id`); 0 is none.
pub type RevNatId = u32;

/// What a frontend is, in `ServiceValue::flags`.
/// A ClusterIP: only translated for traffic from pods on this node.
pub const SERVICE_F_CLUSTER_IP: u16 = 1 << 0;
/// A NodePort on one of this node's addresses.
pub const SERVICE_F_NODE_PORT: u16 = 1 << 1;
/// A LoadBalancer ingress address or an external IP.
pub const SERVICE_F_EXTERNAL: u16 = 1 << 2;
/// `externalTrafficPolicy: Local`: local backends only, client address kept
/// (no SNAT).
pub const SERVICE_F_LOCAL: u16 = 1 << 3;
/// `sessionAffinity: ClientIP`.
pub const SERVICE_F_AFFINITY: u16 = 1 << 4;
/// `loadBalancerSourceRanges`: new flows only from the listed prefixes.
pub const SERVICE_F_SOURCE_RANGES: u16 = 1 << 5;

/// Data of the source-ranges LPM trie key: the Service, then the client
/// prefix. A key's prefix length is 32 (the Service) + the CIDR's length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SourceRange {
    pub rev_nat_id: RevNatId,
    /// Client address or prefix, network byte order.
    pub addr: u32,
}

/// Key of the affinity map: a client of a Service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AffinityKey {
    /// Client address, network byte order.
    pub client: u32,
    pub rev_nat_id: RevNatId,
}

/// The backend a client was last sent to, and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    /// The backend's slot, to check cheaply that it still serves the Service.
    pub slot: u16,
    pub pad0: u16,
}

crate::user_pod!(
    ServiceKey,
    ServiceValue,
    AffinityKey,
    AffinityValue,
    SourceRange
);

/// Maglev table sizes: primes, far larger than the number of backends so
/// that shares are near-equal and a backend change moves few entries. Small
/// Services get the small table to keep kernel memory down (4 KiB vs 64 KiB).
/// Capacities of the Service maps; the agent leaves out whole Services that
/// would not fit rather than programming half of one.
pub const SERVICES_MAX_ENTRIES: u32 = 262_144;
pub const BACKENDS_MAX_ENTRIES: u32 = 262_144;
pub const MAGLEV_MAX_TABLES: u32 = 65_536;

pub const MAGLEV_TABLE_SIZE_SMALL: u32 = 1021;
pub const MAGLEV_TABLE_SIZE_LARGE: u32 = 16381;
/// Up to this many backends the small table is used.
pub const MAGLEV_SMALL_MAX_BACKENDS: usize = 10;

/// The Maglev table size for a Service with `backends` backends.
pub const fn maglev_table_size(backends: usize) -> u32 {
    if backends <= MAGLEV_SMALL_MAX_BACKENDS {
        MAGLEV_TABLE_SIZE_SMALL
    } else {
        MAGLEV_TABLE_SIZE_LARGE
    }
}

/// The hash that picks a flow's Maglev entry: Murmur3's finaliser applied
/// field by field over the 5-tuple (fields in network byte order, as in the
/// packet), so that correlated fields (address and port growing together)
/// do not cancel out. Shared so that userspace (the Maglev benchmark) hashes
/// flows exactly as the data path does.
#[inline(always)]
pub fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = fmix(saddr ^ 0x9e37_79b9);
    h = fmix(h ^ daddr);
    h = fmix(h ^ ((u32::from(sport) << 16) | u32::from(dport)));
    fmix(h ^ u32::from(proto))
}

#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}
