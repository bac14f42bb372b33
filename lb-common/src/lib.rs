//! Map keys and values shared by the kernel programs (`lb-ebpf`) and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding fields, so the layout is the
//! same on both sides and `bytemuck::Pod` (user side) can prove there are no
//! hidden padding bytes. Addresses and ports are stored in network byte order,
//! exactly as they appear in packets, so the data path never converts them.
#![no_std]

pub mod backend;
pub mod conntrack;
pub mod csum;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod service;
pub mod sock;

/// IANA protocol numbers as used in the IPv4 header.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Names of the maps; also the file names under the pin directory.
pub mod map_names {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const METRICS: &str = "METRICS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const NODE: &str = "NODE";
    pub const AFFINITY: &str = "AFFINITY";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    pub const IPCACHE: &str = "IPCACHE";
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const POLICY: &str = "POLICY";
    pub const FLOWS: &str = "FLOWS";
    pub const PEER_NODES: &str = "PEER_NODES";
    pub const SOCK_REVERSE: &str = "SOCK_REVERSE";
    pub const ALL: [&str; 14] = [
        SERVICES,
        BACKENDS,
        CONNTRACK,
        METRICS,
        MAGLEV,
        NODE,
        AFFINITY,
        SOURCE_RANGES,
        IPCACHE,
        ENDPOINTS,
        POLICY,
        FLOWS,
        PEER_NODES,
        SOCK_REVERSE,
    ];
}

/// Implements the user-side marker traits for a shared type.
#[macro_export]
#[doc(hidden)]
macro_rules! user_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: repr(C), only integer fields, explicit padding (checked by bytemuck::Pod).
            unsafe impl aya::Pod for $t {}
        )*
    };
}
