//! The maps, declared with BTF so that `bpftool map dump` prints named fields.
//! The agent pins them under `/sys/fs/bpf/<prefix>/<NAME>`.

use aya_ebpf::{
    bindings::BPF_F_INNER_MAP,
    btf_maps::{Array, HashMap, HashOfMaps, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use lb_common::{
    backend::Backend,
    conntrack::{ConntrackEntry, ConntrackKey, CONNTRACK_MAX_ENTRIES},
    metrics::{reason, Counter},
    node::NodeConfig,
    policy::{EndpointInfo, FlowEvent, IpcacheKey, PolicyEntry, PolicyKey},
    service::{
        AffinityKey, AffinityValue, ServiceKey, ServiceValue, SourceRange, BACKENDS_MAX_ENTRIES,
        MAGLEV_MAX_TABLES, MAGLEV_TABLE_SIZE_LARGE, SERVICES_MAX_ENTRIES,
    },
    sock::{SockRevKey, SockRevValue, SOCK_REVERSE_MAX_ENTRIES},
};

/// BPF_F_NO_PREALLOC: big maps that cost memory only for what they hold.
const NO_PREALLOC: usize = 1;

/// (vip, port, proto, slot) -> master entry (slot 0) or backend id (slot >= 1).
#[btf_map]
pub static SERVICES: HashMap<
    ServiceKey,
    ServiceValue,
    { SERVICES_MAX_ENTRIES as usize },
    NO_PREALLOC,
> = HashMap::new();

/// backend id -> pod address and port.
#[btf_map]
pub static BACKENDS: HashMap<u32, Backend, { BACKENDS_MAX_ENTRIES as usize }, NO_PREALLOC> =
    HashMap::new();

/// 5-tuple -> NAT state of a load-balanced flow. LRU so that a full table
/// evicts the oldest flows instead of refusing new ones (size: see
/// `CONNTRACK_MAX_ENTRIES`).
#[btf_map]
pub static CONNTRACK: LruHashMap<ConntrackKey, ConntrackEntry, { CONNTRACK_MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// Per-CPU counters by reason (see `lb_common::metrics::reason`).
#[btf_map]
pub static METRICS: PerCpuArray<Counter, { reason::COUNT as usize }> = PerCpuArray::new();

/// rev-NAT id -> the Service's Maglev table: entry -> backend slot (1..=count). Written
/// whole by the agent (a new inner map swapped in), never entry by entry.
/// BPF_F_INNER_MAP lets each inner table have its own size (the Service
/// entry's `maglev_size`); the template declares the largest.
#[btf_map]
pub static MAGLEV: HashOfMaps<
    u32,
    Array<u32, { MAGLEV_TABLE_SIZE_LARGE as usize }, { BPF_F_INNER_MAP as usize }>,
    { MAGLEV_MAX_TABLES as usize },
> = HashOfMaps::new();

/// `sessionAffinity: ClientIP`: (client, Service) -> backend. LRU, so old
/// clients are forgotten when it fills; entries also expire by timeout.
#[btf_map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, 65536> = LruHashMap::new();

/// `loadBalancerSourceRanges`: (Service, client prefix) -> 1.
#[btf_map]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u8, 65536> = LpmTrie::new();

/// NetworkPolicy: address/prefix -> security identity.
#[btf_map]
pub static IPCACHE: LpmTrie<IpcacheKey, u32, 65536> = LpmTrie::new();

/// NetworkPolicy: pod address -> endpoint id and isolation. Every pod of the
/// cluster: XDP judges remote backends too (`policy::admit_at_entry`).
#[btf_map]
pub static ENDPOINTS: HashMap<u32, EndpointInfo, 65536> = HashMap::new();

/// NetworkPolicy: (endpoint, direction, protocol, identity, port prefix) -> rule.
#[btf_map]
pub static POLICY: LpmTrie<PolicyKey, PolicyEntry, 262144> = LpmTrie::new();

/// NetworkPolicy verdicts of new flows, for `lb flows`.
#[btf_map]
pub static FLOWS: RingBuf<FlowEvent, { 256 * 1024 }> = RingBuf::new();

/// The other nodes' addresses -> 1. Their XDP judges the NodePort and
/// LoadBalancer flows it SNATs (see `policy::judged_at_entry_node`).
#[btf_map]
pub static PEER_NODES: HashMap<u32, u32, 4096> = HashMap::new();

/// This node's address and SNAT port range, written by the agent.
#[btf_map]
pub static NODE: Array<NodeConfig, 1> = Array::new();

/// Socket LB: (socket, backend) -> the Service it asked for
/// (`lb_common::sock`).
#[btf_map]
pub static SOCK_REVERSE: LruHashMap<
    SockRevKey,
    SockRevValue,
    { SOCK_REVERSE_MAX_ENTRIES as usize },
> = LruHashMap::new();
