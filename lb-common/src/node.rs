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

crate::user_pod!(NodeConfig);
