//! What the data path needs to know about the node it runs on.

/// The single entry of the NODE array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct NodeConfig {
    /// The node's address (network byte order): the source of SNATed flows.
    pub addr: u32,
    /// First port of the SNAT range (host byte order).
    pub snat_port_min: u16,
    /// Number of ports in the SNAT range.
    pub snat_port_count: u16,
}

/// The SNAT port range (NodePort and LoadBalancer flows with
/// `externalTrafficPolicy: Cluster`): every unprivileged port below Linux's
/// ephemeral ports (32768-60999), so the node's own connections never take
/// one. Servers listening on the node in this range (NodePorts included)
/// do not clash with it: a backend's answer to an SNAT port is translated
/// before the node's stack sees it. A tuple is unique per backend, so each
/// backend has the whole range: with backends that close first (TIME_WAIT,
/// `CLOSED_HOLD_NS`), 31,744 ports / 66 s = 480 new connections a second
/// per backend and node. Cluster-wide: a node admits peers' flows from
/// this range as judged by NetworkPolicy at the entry node.
pub const SNAT_PORT_MIN: u16 = 1024;
pub const SNAT_PORT_COUNT: u16 = 32768 - 1024;

crate::user_pod!(NodeConfig);
