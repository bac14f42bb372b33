//! Attaching the tc programs to pod veths with TCX links, pinned so they
//! outlive the agent process: a restarted agent swaps its freshly loaded
//! programs into the same links (atomically) instead of detaching anything.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    LinkOrder, TcAttachType,
};

use super::Datapath;

fn direction(ty: TcAttachType) -> &'static str {
    match ty {
        TcAttachType::Ingress => "ingress",
        _ => "egress",
    }
}

/// Keeps the set of interfaces the programs are attached to.
pub struct Attacher {
    links_dir: PathBuf,
    attached: BTreeSet<String>,
}

impl Attacher {
    pub fn new(pin_dir: &Path) -> Result<Self> {
        let links_dir = pin_dir.join("links");
        std::fs::create_dir_all(&links_dir)?;
        Ok(Self {
            links_dir,
            attached: BTreeSet::new(),
        })
    }

    fn pin_path(&self, ifname: &str, ty: TcAttachType) -> PathBuf {
        // bpffs refuses names with a dot.
        self.links_dir.join(format!("{ifname}_{}", direction(ty)))
    }

    /// Attaches both programs to `ifname` unless done already.
    pub fn attach(&mut self, dp: &mut Datapath, ifname: &str) -> Result<()> {
        if self.attached.contains(ifname) {
            return Ok(());
        }
        for (prog_name, ty) in Datapath::attachments() {
            let pin = self.pin_path(ifname, ty);
            let prog = dp.program(prog_name)?;
            if !pin.exists() {
                attach_new(prog, ifname, ty, &pin)?;
                continue;
            }
            // A link from an earlier agent: put our program into it.
            let old =
                PinnedLink::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
            let link = SchedClassifierLink::try_from(FdLink::from(old))?;
            if prog.attach_to_link(link).is_err() {
                // The link is defunct (its interface was re-created).
                std::fs::remove_file(&pin).ok();
                attach_new(prog, ifname, ty, &pin)?;
            }
        }
        self.attached.insert(ifname.to_string());
        Ok(())
    }

    /// Forgets interfaces that are gone and removes their link pins.
    pub fn prune(&mut self, present: &BTreeSet<String>) {
        self.attached.retain(|i| present.contains(i));
        if let Ok(dir) = std::fs::read_dir(&self.links_dir) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let ifname = name.rsplit_once('_').map_or(name.as_str(), |(i, _)| i);
                if !present.contains(ifname) {
                    std::fs::remove_file(entry.path()).ok();
                }
            }
        }
    }

    pub fn attached(&self) -> &BTreeSet<String> {
        &self.attached
    }
}

fn attach_new(
    prog: &mut aya::programs::SchedClassifier,
    ifname: &str,
    ty: TcAttachType,
    pin: &Path,
) -> Result<()> {
    let id = prog
        .attach_with_options(ifname, ty, TcAttachOptions::TcxOrder(LinkOrder::default()))
        .with_context(|| format!("attaching to {ifname} {}", direction(ty)))?;
    let link: FdLink = prog.take_link(id)?.try_into()?;
    link.pin(pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}

/// Names of the interfaces in this network namespace that start with `prefix`.
pub fn interfaces_with_prefix(prefix: &str) -> Result<BTreeSet<String>> {
    Ok(nix::net::if_::if_nameindex()
        .context("listing interfaces")?
        .iter()
        .filter_map(|i| i.name().to_str().ok().map(str::to_string))
        .filter(|n| n.starts_with(prefix))
        .collect())
}

/// Which hook runs the uplink program (`--uplink-hook`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UplinkHook {
    /// XDP on a device with a bus (a NIC), tc ingress on a virtual one.
    Auto,
    /// `lb_uplink`: native XDP where the driver has it, generic otherwise.
    Xdp,
    /// `lb_uplink_tc`: tc ingress (TCX).
    Tc,
}

impl UplinkHook {
    pub fn name(self) -> &'static str {
        match self {
            UplinkHook::Auto => "auto",
            UplinkHook::Xdp => "xdp",
            UplinkHook::Tc => "tc",
        }
    }

    /// The hook for `ifname`. A virtual device (veth, bridge, bond,
    /// tunnel: no bus) gets tc: on a veth, native XDP copies nearly every
    /// packet into a page of its own before the program runs (a TCP
    /// packet is a clone, with less headroom than XDP wants), and generic
    /// XDP does the same, where tc reads the packet in place. In the lab
    /// that copy cost 7% of the machine's connection rate.
    pub fn resolve(self, ifname: &str) -> UplinkHook {
        match self {
            UplinkHook::Auto if has_bus(ifname) => UplinkHook::Xdp,
            UplinkHook::Auto => UplinkHook::Tc,
            hook => hook,
        }
    }
}

/// Whether the device sits on a bus (PCI, USB...), as a NIC does: its
/// driver's `bus_info` (ETHTOOL_GDRVINFO, asked in this network namespace).
fn has_bus(ifname: &str) -> bool {
    driver_info(ifname).is_some_and(|(_, bus)| !bus.is_empty())
}

/// The driver's name and bus of `ifname` (`ethtool -i`).
pub fn driver_info(ifname: &str) -> Option<(String, String)> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        counts: [u32; 5],
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        counts: [0; 5],
    };
    let name = ifname.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).ok()?;
    // SAFETY: SIOCETHTOOL with a valid ifreq whose data points at `info`,
    // which outlives the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
    if rc != 0 {
        return None;
    }
    let text = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    Some((text(&info.driver), text(&info.bus_info)))
}

/// Attaches the uplink program to the node's uplink with `hook` (resolved
/// for the device) and a pinned link (`uplink/<uplink>_xdp` or
/// `uplink/<uplink>_ingress`, apart from the pod links that `prune`
/// manages), replacing the program in an existing link; a link of the
/// other hook is removed. Returns the hook used.
pub fn attach_uplink(
    dp: &mut Datapath,
    links_dir: &Path,
    ifname: &str,
    hook: UplinkHook,
    proc_sys_net: &Path,
) -> Result<UplinkHook> {
    std::fs::create_dir_all(links_dir)?;
    // Translated packets reach the stack with the node's own address as
    // source: SNATed flows on the uplink (the program runs before routing),
    // and replies leaving a local backend after reverse NAT on its veth.
    // Accept them on every interface instead of dropping them as martians
    // (accept_local is or-ed with conf/all). /proc/sys/net shows the
    // network namespace of whoever opens it: this one.
    let sysctl = proc_sys_net.join("ipv4/conf/all/accept_local");
    std::fs::write(&sysctl, "1").with_context(|| format!("setting {}", sysctl.display()))?;
    warn_if_ephemeral_ports_overlap_snat(proc_sys_net);
    let xdp_pin = links_dir.join(format!("{ifname}_xdp"));
    let tc_pin = links_dir.join(format!("{ifname}_{}", direction(TcAttachType::Ingress)));
    let hook = hook.resolve(ifname);
    // Removing a link's last pin detaches it (the agent holds no other
    // reference to an earlier agent's link).
    if hook == UplinkHook::Tc {
        attach_uplink_tc(dp, ifname, &tc_pin)?;
        std::fs::remove_file(&xdp_pin).ok();
    } else {
        attach_uplink_xdp(dp, ifname, &xdp_pin)?;
        std::fs::remove_file(&tc_pin).ok();
    }
    Ok(hook)
}

fn attach_uplink_tc(dp: &mut Datapath, ifname: &str, pin: &Path) -> Result<()> {
    let prog = dp.program(super::PROG_UPLINK_TC)?;
    if pin.exists() {
        let old =
            PinnedLink::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
        let link = SchedClassifierLink::try_from(FdLink::from(old))?;
        if prog.attach_to_link(link).is_ok() {
            return Ok(());
        }
        std::fs::remove_file(pin).ok();
    }
    attach_new(prog, ifname, TcAttachType::Ingress, pin)
}

fn attach_uplink_xdp(dp: &mut Datapath, ifname: &str, pin: &Path) -> Result<()> {
    use aya::programs::xdp::{XdpLink, XdpMode};
    let prog = dp.xdp()?;
    if pin.exists() {
        let old =
            PinnedLink::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
        let link = XdpLink::try_from(FdLink::from(old))?;
        if prog.attach_to_link(link).is_ok() {
            return Ok(());
        }
        std::fs::remove_file(pin).ok();
    }
    // Native XDP where the driver has it (veth does), generic otherwise.
    let id = match prog.attach(ifname, XdpMode::Default) {
        Ok(id) => id,
        Err(_) => prog
            .attach(ifname, XdpMode::Skb)
            .with_context(|| format!("attaching XDP to {ifname}"))?,
    };
    let link: FdLink = prog.take_link(id)?.try_into()?;
    link.pin(pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}

/// The node's own connections take their source ports from
/// `ip_local_port_range`; one of them in the SNAT range could meet an SNATed
/// flow's tuple at a backend (and a peer would trust it as judged).
fn warn_if_ephemeral_ports_overlap_snat(proc_sys_net: &Path) {
    use lb_common::node::{SNAT_PORT_COUNT, SNAT_PORT_MIN};
    let path = proc_sys_net.join("ipv4/ip_local_port_range");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let mut it = text
        .split_whitespace()
        .filter_map(|w| w.parse::<u32>().ok());
    let (Some(lo), Some(hi)) = (it.next(), it.next()) else {
        return;
    };
    let (snat_lo, snat_hi) = (
        u32::from(SNAT_PORT_MIN),
        u32::from(SNAT_PORT_MIN) + u32::from(SNAT_PORT_COUNT) - 1,
    );
    if lo <= snat_hi && snat_lo <= hi {
        tracing::warn!(
            "the node's ephemeral ports ({lo}-{hi}, {}) overlap the SNAT range ({snat_lo}-{snat_hi}): \
             its own connections may clash with SNATed NodePort flows",
            path.display()
        );
    }
}
