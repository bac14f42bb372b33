//! Closing the pods' UDP sockets that socket LB pinned to a backend that
//! is gone (the trap of socket LB: cilium#27300). A connected UDP socket's
//! packets carry the backend's address from `connect()` on, so no packet
//! hook can move them; an application blocked on it would wait forever.
//! The socket is destroyed (sock_diag SOCK_DESTROY, as `ss -K` does): its
//! next call fails with ECONNABORTED, and a resolver opens a new socket,
//! which socket LB sends to a live backend. Sockets live in the pods'
//! network namespaces, which are found from the processes of socket LB's
//! cgroup; sock_diag sees one namespace at a time, so each is entered on a
//! thread of its own.

use std::{
    collections::BTreeSet,
    fs::File,
    io,
    mem::size_of,
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use bytemuck::{Pod, Zeroable};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
/// A connected UDP socket is in state TCP_ESTABLISHED.
const TCP_ESTABLISHED: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct NlMsgHdr {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`: ports and addresses in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [[u8; 4]; 4],
    dst: [[u8; 4]; 4],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct DiagRequest {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_msg`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Request {
    hdr: NlMsgHdr,
    req: DiagRequest,
}

fn request(ty: u16, flags: u16, family: u8, id: SockId) -> Request {
    Request {
        hdr: NlMsgHdr {
            len: size_of::<Request>() as u32,
            ty,
            flags: NLM_F_REQUEST | flags,
            seq: 1,
            pid: 0,
        },
        req: DiagRequest {
            family,
            protocol: libc::IPPROTO_UDP as u8,
            ext: 0,
            pad: 0,
            states: u32::MAX,
            id,
        },
    }
}

fn diag_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by socket(2), owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(fd: &OwnedFd, req: &Request) -> io::Result<()> {
    let bytes = bytemuck::bytes_of(req);
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::send(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The netlink messages in `buf`: (type, payload).
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let hdr: NlMsgHdr =
            bytemuck::try_pod_read_unaligned(rest.get(..size_of::<NlMsgHdr>())?).ok()?;
        let len = hdr.len as usize;
        let payload = rest.get(size_of::<NlMsgHdr>()..len)?;
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((hdr.ty, payload))
    })
}

/// The netlink error code of an NLMSG_ERROR payload (0: an ACK).
fn error_code(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// The connected UDP sockets of `family` in this network namespace.
fn connected_udp(fd: &OwnedFd, family: u8) -> Result<Vec<SockId>> {
    send(
        fd,
        &request(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, family, SockId::zeroed()),
    )
    .context("sock_diag dump request")?;
    let mut found = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = recv(fd, &mut buf).context("sock_diag dump")?;
        for (ty, payload) in messages(&buf[..n]) {
            match ty {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => {
                    let code = error_code(payload);
                    anyhow::bail!("sock_diag dump: {}", io::Error::from_raw_os_error(-code));
                }
                SOCK_DIAG_BY_FAMILY => {
                    let Some(msg) = payload.get(..size_of::<DiagMsg>()) else {
                        continue;
                    };
                    let msg: DiagMsg = bytemuck::pod_read_unaligned(msg);
                    if msg.state == TCP_ESTABLISHED {
                        found.push(msg.id);
                    }
                }
                _ => {}
            }
        }
    }
}

fn destroy(fd: &OwnedFd, family: u8, id: SockId) -> io::Result<()> {
    send(fd, &request(SOCK_DESTROY, NLM_F_ACK, family, id))?;
    let mut buf = [0u8; 512];
    let n = recv(fd, &mut buf)?;
    for (ty, payload) in messages(&buf[..n]) {
        if ty == NLMSG_ERROR && error_code(payload) != 0 {
            return Err(io::Error::from_raw_os_error(-error_code(payload)));
        }
    }
    Ok(())
}

/// A socket's IPv4 destination, as the backends are named: its address,
/// or, for an IPv6 socket, its v4-mapped address (`::ffff:a.b.c.d`, as
/// socket LB translates them); none for any other IPv6 destination.
fn destination(family: u8, id: &SockId) -> Option<(Ipv4Addr, u16)> {
    let port = u16::from_be_bytes(id.dport);
    if family == libc::AF_INET as u8 {
        return Some((Ipv4Addr::from(id.dst[0]), port));
    }
    let mapped = id.dst[0] == [0; 4] && id.dst[1] == [0; 4] && id.dst[2] == [0, 0, 0xff, 0xff];
    mapped.then(|| (Ipv4Addr::from(id.dst[3]), port))
}

/// Destroys the connected UDP sockets of the current network namespace
/// whose destination is one of `gone`; how many it destroyed. A socket
/// that closed meanwhile (ENOENT) is not an error.
pub fn destroy_udp_connected_to(gone: &BTreeSet<(Ipv4Addr, u16)>) -> Result<usize> {
    let fd = diag_socket().context("sock_diag socket")?;
    let mut destroyed = 0;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for id in connected_udp(&fd, family)? {
            if !destination(family, &id).is_some_and(|d| gone.contains(&d)) {
                continue;
            }
            match destroy(&fd, family, id) {
                Ok(()) => destroyed += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e).context("SOCK_DESTROY"),
            }
        }
    }
    Ok(destroyed)
}

/// One path to each network namespace of the processes in `cgroup` and
/// its descendants (`/proc/PID/ns/net` of one process per namespace).
pub fn namespaces_of_cgroup(cgroup: &Path) -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
            if let Ok(meta) = std::fs::metadata(&ns) {
                if seen.insert((meta.dev(), meta.ino())) {
                    found.push(ns);
                }
            }
        }
        dirs.extend(child_cgroups(&dir));
    }
    found
}

/// Linux's `CAP_SYS_ADMIN` bit in a capability set.
const CAP_SYS_ADMIN: u32 = 21;

/// Why this process cannot close the sockets of `cgroup`'s pods, if it
/// cannot: entering another network namespace (`setns`) takes
/// CAP_SYS_ADMIN, and the pods' processes are seen only from the host's
/// PID namespace (a DaemonSet's `hostPID: true`): from any other, the
/// kernel lists them in `cgroup.procs` as PID 0.
pub fn why_sockets_cannot_be_closed(cgroup: &Path) -> Option<&'static str> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    closing_blocked(effective_caps(&status), &first_procs(cgroup))
}

/// The first non-empty `cgroup.procs` in `cgroup` or below it, nearest
/// first: cgroup v2 keeps processes in the leaves of a tree (the root
/// excepted).
fn first_procs(cgroup: &Path) -> String {
    let mut dirs = std::collections::VecDeque::from([cgroup.to_path_buf()]);
    while let Some(dir) = dirs.pop_front() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if !procs.trim().is_empty() {
            return procs;
        }
        dirs.extend(child_cgroups(&dir));
    }
    String::new()
}

/// The cgroups directly below `dir`.
fn child_cgroups(dir: &Path) -> impl Iterator<Item = PathBuf> {
    let children = std::fs::read_dir(dir).into_iter().flatten().flatten();
    children
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
}

/// The effective capability set of a `/proc/PID/status` (`CapEff:`, hex).
fn effective_caps(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0)
}

/// `why_sockets_cannot_be_closed`, from the effective capabilities and a
/// `cgroup.procs` as read.
fn closing_blocked(caps: u64, procs: &str) -> Option<&'static str> {
    if caps & (1 << CAP_SYS_ADMIN) == 0 {
        return Some("no CAP_SYS_ADMIN to enter the pods' network namespaces");
    }
    if procs.lines().any(|pid| pid.trim() == "0") {
        return Some("the pods' processes are in another PID namespace (hostPID: true needed)");
    }
    None
}

/// `destroy_udp_connected_to` in every network namespace of `cgroup`'s
/// processes, each on a thread of its own; the total destroyed.
pub fn destroy_in_cgroup(cgroup: &Path, gone: &BTreeSet<(Ipv4Addr, u16)>) -> Result<usize> {
    let mut total = 0;
    for ns in namespaces_of_cgroup(cgroup) {
        // A process that exited since the walk took its namespace along.
        let Ok(file) = File::open(&ns) else {
            continue;
        };
        let gone = gone.clone();
        let destroyed = std::thread::spawn(move || -> Result<usize> {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .context("setns")?;
            destroy_udp_connected_to(&gone)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("socket destroyer panicked"))?
        .with_context(|| format!("in {}", ns.display()))?;
        total += destroyed;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_sockets_needs_sys_admin_and_the_hosts_pids() {
        let admin = 1u64 << CAP_SYS_ADMIN;
        let status = "Name:\tlb\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(status), 0x1ff_ffff_ffff);
        assert_eq!(effective_caps("Name:\tlb\n"), 0);
        assert_eq!(closing_blocked(admin, "1\n412\n"), None);
        assert_eq!(closing_blocked(admin, ""), None);
        assert!(closing_blocked(admin, "0\n0\n").is_some_and(|why| why.contains("hostPID")));
        // BPF, PERFMON, NET_ADMIN and SYS_RESOURCE: the DaemonSet's own set.
        let daemonset = (1 << 39) | (1 << 38) | (1 << 12) | (1 << 24);
        assert!(closing_blocked(daemonset, "1\n").is_some_and(|why| why.contains("CAP_SYS_ADMIN")));
    }

    #[test]
    fn the_kernel_structs_have_their_c_sizes() {
        assert_eq!(size_of::<NlMsgHdr>(), 16);
        assert_eq!(size_of::<SockId>(), 48);
        assert_eq!(size_of::<DiagRequest>(), 56);
        assert_eq!(size_of::<DiagMsg>(), 72);
    }

    /// On this machine's loopback (no namespace needed; root, as the suite
    /// runs): a connected UDP socket to a "gone" destination is destroyed,
    /// its next receive fails with ECONNABORTED, an IPv6 one's by its
    /// v4-mapped address too; one to another destination is left alone.
    #[test]
    fn a_socket_connected_to_a_gone_destination_is_aborted_and_no_other() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let doomed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        doomed.connect(server.local_addr().unwrap()).unwrap();
        let kept = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        kept.connect(other.local_addr().unwrap()).unwrap();
        let port = server.local_addr().unwrap().port();
        // An IPv6 socket to the same destination by its v4-mapped address.
        let doomed6 = std::net::UdpSocket::bind("[::]:0").unwrap();
        doomed6
            .connect(format!("[::ffff:127.0.0.1]:{port}"))
            .unwrap();
        let gone = BTreeSet::from([(Ipv4Addr::LOCALHOST, port)]);
        assert_eq!(destroy_udp_connected_to(&gone).unwrap(), 2);
        for s in [&doomed, &doomed6] {
            s.set_nonblocking(true).unwrap();
            let err = s.recv(&mut [0u8; 8]).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
        }
        kept.set_nonblocking(true).unwrap();
        let err = kept.recv(&mut [0u8; 8]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
    }
}
