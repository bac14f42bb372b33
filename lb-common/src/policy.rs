//! NetworkPolicy enforcement state, as in Cilium: security identities, an
//! ipcache that maps addresses to identities, per-endpoint policy entries.
//!
//! - ipcache (LPM trie): address or prefix -> identity. A miss is `WORLD`.
//! - endpoints (hash): local pod address -> `EndpointInfo` (its id and
//!   whether it is isolated for ingress and/or egress).
//! - policy (LPM trie): `PolicyKey` -> `PolicyEntry`. The key's prefix covers
//!   endpoint, direction, protocol and identity (64 bits) and then the port,
//!   so an `endPort` range is a few port-prefix entries. Identity 0 and
//!   protocol 0 are wildcards, looked up after the exact ones.
//!
//! Stateful: an allowed new flow gets a conntrack entry (`CT_POLICY_EGRESS` or
//! `CT_POLICY_INGRESS`) keyed by its 5-tuple as the pod sees it; replies are
//! recognised by the swapped tuple and pass without a rule of their own.

/// The node itself (kubelet probes): always allowed to reach local pods.
pub const IDENTITY_HOST: u32 = 1;
/// Anything the ipcache does not know.
pub const IDENTITY_WORLD: u32 = 2;
/// Identities from here on are allocated by the agent.
pub const IDENTITY_FIRST_ALLOCATED: u32 = 256;

pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// `EndpointInfo::flags`: the pod is selected by a policy of that type.
pub const ENDPOINT_F_INGRESS_ISOLATED: u16 = 1 << 0;
pub const ENDPOINT_F_EGRESS_ISOLATED: u16 = 1 << 1;

/// Data of an ipcache LPM key (prefix length = the CIDR's length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct IpcacheKey {
    /// Address, network byte order.
    pub addr: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct EndpointInfo {
    pub endpoint_id: u16,
    pub flags: u16,
}

/// Data of a policy LPM key; prefix length = 64 + port prefix bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PolicyKey {
    pub endpoint_id: u16,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub direction: u8,
    /// IP protocol, 0 for any.
    pub proto: u8,
    /// Remote identity, 0 for any.
    pub identity: u32,
    /// Port (network byte order), matched up to the key's prefix length.
    pub port: u16,
    pub pad0: u16,
}

/// Which policy allowed: for flow logs and `lb policy trace`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PolicyEntry {
    pub rule_id: u32,
}

/// Prefix bits of a policy key before the port.
pub const POLICY_KEY_FIXED_BITS: u32 = 64;

crate::user_pod!(IpcacheKey, EndpointInfo, PolicyKey, PolicyEntry);

/// A policy verdict for a new flow, sent through the FLOWS ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowEvent {
    /// CLOCK_MONOTONIC, to the last tick (`lb-ebpf/src/clock.rs`).
    pub ts_ns: u64,
    /// Addresses and ports as the pod sees them, network byte order.
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `DIR_INGRESS` or `DIR_EGRESS` (of the local pod).
    pub direction: u8,
    /// `VERDICT_ALLOW` or `VERDICT_DROP`.
    pub verdict: u8,
    pub pad0: u8,
    /// The rule that allowed (0 for drops).
    pub rule_id: u32,
    /// The remote identity.
    pub identity: u32,
}

pub const VERDICT_ALLOW: u8 = 0;
pub const VERDICT_DROP: u8 = 1;

crate::user_pod!(FlowEvent);
