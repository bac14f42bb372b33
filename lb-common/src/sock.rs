//! Socket load balancing: translation at `connect()` and `sendmsg()`, in the
//! cgroup hooks of the pods' sockets, before any packet exists (Cilium's
//! socket LB). The reverse map lets the socket see the Service address
//! again where it asks for its peer (`getpeername`) or for a datagram's
//! source (`recvmsg`).

/// Key of the socket reverse map: a socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SockRevKey {
    /// The socket's cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// Backend address and port, network byte order.
    pub addr: u32,
    pub port: u16,
    pub pad0: u16,
}

/// Value of the socket reverse map: the frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SockRevValue {
    /// Frontend address and port, network byte order.
    pub addr: u32,
    pub port: u16,
    pub pad0: u16,
    pub rev_nat_id: crate::service::RevNatId,
}

/// Entries of the socket reverse map: one per socket and backend it
/// connected or sent to, forgotten oldest first (an LRU). A socket whose
/// entry is gone still works: it only sees the backend's address as its
/// peer.
pub const SOCK_REVERSE_MAX_ENTRIES: u32 = 131_072;

crate::user_pod!(SockRevKey, SockRevValue);
