//! From Kubernetes objects to the services the data path must know: pure
//! functions, no I/O. Objects that cannot be translated are reported one by
//! one and left out; everything else is still translated.

use std::{borrow::Borrow, collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::core::v1::Service;
use lb_common::{
    service::{
        SERVICE_F_CLUSTER_IP, SERVICE_F_EXTERNAL, SERVICE_F_LOCAL, SERVICE_F_NODE_PORT,
        SERVICE_F_SOURCE_RANGES,
    },
    PROTO_TCP, PROTO_UDP,
};
pub use service::{Created, PortFacts, ServiceFacts};
pub use slice::{EndpointFacts, EndpointSlice, SliceFacts};

mod endpoints;
pub mod service;
pub mod slice;

pub use endpoints::slices_by_service;
use endpoints::{candidates_for, choose, Candidate};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A pod address and port that can serve a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    /// The pod runs on this node.
    pub local: bool,
}

/// The node the agent programs: its name (endpoints' `nodeName`) and
/// addresses (NodePort frontends).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub name: Option<String>,
    pub addrs: Vec<Ipv4Addr>,
    /// The other nodes' InternalIPs.
    pub peers: Vec<Ipv4Addr>,
}

impl NodeContext {
    /// Whether the endpoint's pod runs on this node: its `nodeName` is this
    /// node's name. An agent that does not know its node's name runs none,
    /// so an endpoint without a `nodeName` never counts as local.
    pub fn runs(&self, endpoint: &EndpointFacts) -> bool {
        self.name.is_some() && endpoint.node.as_deref().map(|n| &**n) == self.name.as_deref()
    }
}

/// One frontend (virtual address, port, protocol) and the backends behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    /// `namespace/name:port-name`, for logs and inspection.
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub flags: u16,
    /// Ready endpoints: new flows go to these. Sorted, without duplicates.
    pub backends: Vec<BackendAddr>,
    /// Endpoints still listed but not ready (terminating, or failing
    /// readiness). They get no new flows, but flows already on them keep
    /// them, as with kube-proxy's conntrack, until they leave the slice.
    pub retained: Vec<BackendAddr>,
    /// `sessionAffinity: ClientIP`: its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// `loadBalancerSourceRanges` (LoadBalancer frontends only): new flows
    /// only from these prefixes. Empty: from anywhere.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
}

/// Parses `a.b.c.d/n`, masking host bits.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || format!("{s:?} is not an IPv4 CIDR");
    let (ip, len) = s.trim().split_once('/').ok_or_else(bad)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(bad)?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Ok((Ipv4Addr::from(u32::from(ip) & mask), len))
}

/// An object, or part of one, that could not be translated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectError {
    /// `Kind namespace/name`.
    pub object: String,
    pub message: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub services: Vec<DesiredService>,
    pub errors: Vec<ObjectError>,
}

/// Protocols NetworkPolicy names (SCTP as well).
pub fn protocol_number_any(protocol: Option<&str>) -> Result<u8, String> {
    match protocol.unwrap_or("TCP") {
        "SCTP" => Ok(132),
        other => protocol_number(Some(other)),
    }
}

pub fn protocol_number(protocol: Option<&str>) -> Result<u8, String> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Ok(PROTO_TCP),
        "UDP" => Ok(PROTO_UDP),
        other => Err(format!(
            "protocol {other:?} is not supported (TCP and UDP are)"
        )),
    }
}

pub(crate) fn port_number(port: i32) -> Result<u16, String> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {port} is out of range 1-65535"))
}

/// The order in which Services claim frontends: oldest first, as a
/// conflict goes to the Service that was there first (then by namespace
/// and name, so the order is total).
pub type ServiceAge = (Created, String, String);

pub fn service_age(s: &ServiceFacts) -> ServiceAge {
    (s.created, s.namespace.to_string(), s.name.to_string())
}

/// Translates Services and EndpointSlices into the frontends to program on
/// `node`: ClusterIPs, NodePorts on the node's addresses, LoadBalancer
/// ingress addresses and external IPs: the whole cluster at once, from the
/// API's objects, as the agent's `ServiceIndex` decides one change at a
/// time from the facts it keeps.
pub fn translate<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
    services: &[S],
    slices: &[E],
    node: &NodeContext,
) -> Translation {
    let mut t = Translation::default();
    let slices: Vec<SliceFacts> = slices.iter().map(|s| SliceFacts::of(s.borrow())).collect();
    let slices_by_service = slices_by_service(&slices);
    let mut services: Vec<(ServiceAge, ServiceFacts)> = services
        .iter()
        .map(|s| ServiceFacts::of(s.borrow()))
        .map(|f| (service_age(&f), f))
        .collect();
    services.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, svc) in services {
        let own = slices_by_service
            .get(&(&*svc.namespace, &*svc.name))
            .map_or(&[][..], Vec::as_slice);
        let one = translate_service(&svc, own, node);
        t.services.extend(one.services);
        t.errors.extend(one.errors);
    }
    drop_conflicting_frontends(&mut t);
    t
}

/// One Service's frontends, from the Service and its own EndpointSlices,
/// before conflicts with other Services are settled (`translate` does that
/// for a whole cluster, the agent's `ServiceIndex` one change at a time).
pub fn translate_service(
    svc: &ServiceFacts,
    own_slices: &[&SliceFacts],
    node: &NodeContext,
) -> Translation {
    let mut t = Translation::default();
    let object = svc.object();
    match &svc.cluster_ips {
        Ok(ips) if ips.is_empty() => return t,
        Ok(_) => {}
        Err(message) => {
            t.errors.push(ObjectError {
                object,
                message: message.to_string(),
            });
            return t;
        }
    }
    t.errors
        .extend(svc.address_errors.iter().map(|message| ObjectError {
            object: object.clone(),
            message: message.to_string(),
        }));
    for sp in svc.ports.iter() {
        match (&sp.proto, port_number(sp.port)) {
            (Ok(proto), Ok(port)) => {
                let candidates = candidates_for(own_slices, &sp.name, *proto, node, &mut t.errors);
                let port = ServicePort {
                    name: &sp.name,
                    port,
                    proto: *proto,
                    node_port: sp.node_port,
                };
                frontends_of_port(svc, &port, &candidates, node, &mut t);
            }
            (Err(e), _) => t.errors.push(ObjectError {
                object: object.clone(),
                message: format!("port {:?}: {e}", sp.name),
            }),
            (_, Err(e)) => t.errors.push(ObjectError {
                object: object.clone(),
                message: format!("port {:?}: {e}", sp.name),
            }),
        }
    }
    t
}

/// One port of a Service's spec, parsed.
struct ServicePort<'a> {
    name: &'a str,
    port: u16,
    proto: u8,
    node_port: Option<i32>,
}

/// The frontends of one Service port: on each ClusterIP, on the node's
/// addresses (NodePort), on external IPs and on LoadBalancer addresses.
fn frontends_of_port(
    svc: &ServiceFacts,
    sp: &ServicePort,
    candidates: &[Candidate],
    node: &NodeContext,
    t: &mut Translation,
) {
    let (ns, name) = (&svc.namespace, &svc.name);
    let external_local = svc.external_local;
    let affinity_timeout = svc.affinity_timeout;
    let local_flag = if external_local { SERVICE_F_LOCAL } else { 0 };
    let mut push = |vip: Ipv4Addr,
                    port: u16,
                    flags: u16,
                    local_only: bool,
                    kind: &str,
                    ranges: &[(Ipv4Addr, u8)]| {
        let (backends, retained) = choose(candidates, local_only);
        t.services.push(DesiredService {
            name: format!("{ns}/{name}:{} ({kind})", sp.name),
            vip,
            port,
            proto: sp.proto,
            flags,
            backends,
            retained,
            affinity_timeout,
            source_ranges: ranges.to_vec(),
        });
    };
    let cluster_ips = svc.cluster_ips.as_deref().unwrap_or(&[]);
    for vip in cluster_ips {
        push(
            *vip,
            sp.port,
            SERVICE_F_CLUSTER_IP,
            svc.internal_local,
            "ClusterIP",
            &[],
        );
    }
    let mut node_port_error = None;
    if svc.node_ports {
        match sp.node_port.map(port_number) {
            Some(Ok(node_port)) => {
                for addr in &node.addrs {
                    let flags = SERVICE_F_NODE_PORT | local_flag;
                    push(*addr, node_port, flags, external_local, "NodePort", &[]);
                }
            }
            Some(Err(e)) => node_port_error = Some(e),
            None => {}
        }
    }
    for ip in svc.external_ips.iter() {
        push(
            *ip,
            sp.port,
            SERVICE_F_EXTERNAL | local_flag,
            external_local,
            "external",
            &[],
        );
    }
    let ranges_flag = if svc.source_ranges.is_empty() {
        0
    } else {
        SERVICE_F_SOURCE_RANGES
    };
    for ip in svc.lb_ips.iter() {
        let flags = SERVICE_F_EXTERNAL | local_flag | ranges_flag;
        push(
            *ip,
            sp.port,
            flags,
            external_local,
            "LoadBalancer",
            &svc.source_ranges,
        );
    }
    if let Some(e) = node_port_error {
        t.errors.push(ObjectError {
            object: svc.object(),
            message: format!("port {:?}: nodePort: {e}", sp.name),
        });
    }
}

/// Two Services claiming one frontend (the same nodePort, externalIP or
/// LoadBalancer address and port): the older keeps it, the other loses that
/// frontend only, with an error.
fn drop_conflicting_frontends(t: &mut Translation) {
    let mut owner: BTreeMap<(Ipv4Addr, u16, u8), String> = BTreeMap::new();
    let mut errors = Vec::new();
    t.services.retain(|s| {
        let object = s.name.split(':').next().unwrap_or_default();
        match owner.get(&(s.vip, s.port, s.proto)) {
            Some(first) if first.split(':').next() != Some(object) => {
                errors.push(ObjectError {
                    object: format!("Service {object}"),
                    message: format!(
                        "frontend {}:{}/{} is already Service {first}'s: not programmed",
                        s.vip,
                        s.port,
                        protocol_name(s.proto)
                    ),
                });
                false
            }
            Some(_) => true,
            None => {
                owner.insert((s.vip, s.port, s.proto), s.name.clone());
                true
            }
        }
    });
    t.errors.extend(errors);
}

pub fn protocol_name(p: u8) -> &'static str {
    match p {
        lb_common::PROTO_TCP => "TCP",
        lb_common::PROTO_UDP => "UDP",
        _ => "?",
    }
}

#[cfg(test)]
mod tests;
