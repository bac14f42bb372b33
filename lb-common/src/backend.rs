//! The backend map: backend id -> where to send the packet.

/// One endpoint of a Service: a pod address and target port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Backend {
    /// Pod IPv4 address, network byte order.
    pub addr: u32,
    /// Target port, network byte order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `BACKEND_F_*` flags.
    pub flags: u8,
}

/// The backend runs on this node.
pub const BACKEND_F_LOCAL: u8 = 1 << 0;

crate::user_pod!(Backend);
