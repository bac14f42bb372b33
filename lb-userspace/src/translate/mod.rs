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
pub use slice::EndpointSlice;

mod endpoints;
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

pub(crate) fn name_of(
    kind: &str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> String {
    format!(
        "{kind} {}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

/// The Service's virtual IPv4 addresses, or none for headless and
/// ExternalName Services, which get no load balancing.
fn cluster_ips(svc: &Service) -> Result<Vec<Ipv4Addr>, String> {
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(vec![]);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(vec![]);
    }
    let mut ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.as_deref());
    }
    let mut out = Vec::new();
    for ip in ips {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => out.push(v4),
            Ok(std::net::IpAddr::V6(_)) => {} // IPv6 is not handled by this data path yet.
            Err(_) => return Err(format!("clusterIP {ip:?} is not an IP address")),
        }
    }
    Ok(out)
}

fn parse_ipv4_list<'a>(
    ips: impl Iterator<Item = &'a str>,
    what: &str,
    errors: &mut Vec<String>,
) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for ip in ips {
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => out.push(v4),
            Ok(std::net::IpAddr::V6(_)) => {}
            Err(_) => errors.push(format!("{what} {ip:?} is not an IP address")),
        }
    }
    out
}

/// The order in which Services claim frontends: oldest first, as a
/// conflict goes to the Service that was there first (then by namespace
/// and name, so the order is total).
pub type ServiceAge = (Option<k8s_openapi::jiff::Timestamp>, String, String);

/// When a Service was created (the first part of its `ServiceAge`).
pub fn created_at(s: &Service) -> Option<k8s_openapi::jiff::Timestamp> {
    s.metadata.creation_timestamp.as_ref().map(|t| t.0)
}

pub fn service_age(s: &Service) -> ServiceAge {
    (
        created_at(s),
        s.metadata.namespace.clone().unwrap_or_default(),
        s.metadata.name.clone().unwrap_or_default(),
    )
}

/// Translates Services and EndpointSlices into the frontends to program on
/// `node`: ClusterIPs, NodePorts on the node's addresses, LoadBalancer
/// ingress addresses and external IPs. Takes the objects or shared
/// references to them (the agent's caches hold `Arc`s; copying 10,000
/// Services and their slices on every change costs more than translating).
pub fn translate<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
    services: &[S],
    slices: &[E],
    node: &NodeContext,
) -> Translation {
    let mut t = Translation::default();
    let slices_by_service = slices_by_service(slices);
    let mut services: Vec<(ServiceAge, &Service)> = services
        .iter()
        .map(|s| (service_age(s.borrow()), s.borrow()))
        .collect();
    services.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, svc) in services {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("");
        let name = svc.metadata.name.as_deref().unwrap_or("");
        let own = slices_by_service
            .get(&(ns, name))
            .map_or(&[][..], Vec::as_slice);
        let one = translate_service(svc, own, node);
        t.services.extend(one.services);
        t.errors.extend(one.errors);
    }
    drop_conflicting_frontends(&mut t);
    t
}

/// The addresses a Service is reached at, besides the node's own.
struct ServiceAddresses {
    cluster_ips: Vec<Ipv4Addr>,
    external_ips: Vec<Ipv4Addr>,
    /// LoadBalancer ingress addresses (none when a source range is bad).
    lb_ips: Vec<Ipv4Addr>,
    source_ranges: Vec<(Ipv4Addr, u8)>,
}

/// Reads a Service's addresses; what cannot be parsed goes to `errors`.
fn service_addresses(
    svc: &Service,
    cluster_ips: Vec<Ipv4Addr>,
    errors: &mut Vec<String>,
) -> ServiceAddresses {
    // Borrowed, not cloned: this runs per Service port on every pass.
    let no_spec = k8s_openapi::api::core::v1::ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&no_spec);
    // A bad source range must not open the Service to everyone: its
    // LoadBalancer addresses are left out (fail closed).
    let mut ranges_ok = true;
    let mut source_ranges = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        match parse_cidr(r) {
            Ok(c) => source_ranges.push(c),
            Err(e) => {
                ranges_ok = false;
                errors.push(format!(
                    "loadBalancerSourceRanges: {e}; its LoadBalancer addresses are not programmed"
                ));
            }
        }
    }
    let external_ips = parse_ipv4_list(
        spec.external_ips.iter().flatten().map(String::as_str),
        "externalIP",
        errors,
    );
    let mut lb_ips = Vec::new();
    if spec.type_.as_deref() == Some("LoadBalancer") {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        lb_ips = parse_ipv4_list(
            ingress
                .into_iter()
                .flatten()
                .filter_map(|i| i.ip.as_deref()),
            "load balancer ingress IP",
            errors,
        );
    }
    if !ranges_ok {
        lb_ips.clear();
    }
    ServiceAddresses {
        cluster_ips,
        external_ips,
        lb_ips,
        source_ranges,
    }
}

/// `sessionAffinity: ClientIP`: its timeout (the API's default: 3 hours).
fn affinity_timeout(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Option<u32> {
    (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        let t = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        t.and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(10_800)
    })
}

/// One Service's frontends, from the Service and its own EndpointSlices,
/// before conflicts with other Services are settled (`translate` does that
/// for a whole cluster, the agent's `ServiceIndex` one change at a time).
pub fn translate_service(
    svc: &Service,
    own_slices: &[&EndpointSlice],
    node: &NodeContext,
) -> Translation {
    let mut t = Translation::default();
    let object = name_of("Service", &svc.metadata);
    let Some(spec) = svc.spec.as_ref() else {
        return t;
    };
    let ips = match cluster_ips(svc) {
        Ok(ips) if ips.is_empty() => return t,
        Ok(ips) => ips,
        Err(message) => {
            t.errors.push(ObjectError { object, message });
            return t;
        }
    };
    let mut errors = Vec::new();
    let addrs = service_addresses(svc, ips, &mut errors);
    t.errors
        .extend(errors.into_iter().map(|message| ObjectError {
            object: object.clone(),
            message,
        }));
    for sp in spec.ports.iter().flatten() {
        let port_name = sp.name.clone().unwrap_or_default();
        match (
            protocol_number(sp.protocol.as_deref()),
            port_number(sp.port),
        ) {
            (Ok(proto), Ok(port)) => {
                let candidates = candidates_for(own_slices, &port_name, proto, node, &mut t.errors);
                let port = ServicePort {
                    name: &port_name,
                    port,
                    proto,
                    node_port: sp.node_port,
                };
                frontends_of_port(svc, &addrs, &port, &candidates, node, &mut t);
            }
            (Err(e), _) | (_, Err(e)) => t.errors.push(ObjectError {
                object: object.clone(),
                message: format!("port {port_name:?}: {e}"),
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
    svc: &Service,
    addrs: &ServiceAddresses,
    sp: &ServicePort,
    candidates: &[Candidate],
    node: &NodeContext,
    t: &mut Translation,
) {
    // Borrowed, not cloned: this runs per Service port on every pass.
    let no_spec = k8s_openapi::api::core::v1::ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&no_spec);
    let ns = svc.metadata.namespace.as_deref().unwrap_or("");
    let name = svc.metadata.name.as_deref().unwrap_or("");
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let affinity_timeout = affinity_timeout(spec);
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
    for vip in &addrs.cluster_ips {
        push(
            *vip,
            sp.port,
            SERVICE_F_CLUSTER_IP,
            internal_local,
            "ClusterIP",
            &[],
        );
    }
    let mut node_port_error = None;
    if matches!(svc_type, "NodePort" | "LoadBalancer") {
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
    for ip in &addrs.external_ips {
        push(
            *ip,
            sp.port,
            SERVICE_F_EXTERNAL | local_flag,
            external_local,
            "external",
            &[],
        );
    }
    let ranges_flag = if addrs.source_ranges.is_empty() {
        0
    } else {
        SERVICE_F_SOURCE_RANGES
    };
    for ip in &addrs.lb_ips {
        let flags = SERVICE_F_EXTERNAL | local_flag | ranges_flag;
        push(
            *ip,
            sp.port,
            flags,
            external_local,
            "LoadBalancer",
            &addrs.source_ranges,
        );
    }
    if let Some(e) = node_port_error {
        t.errors.push(ObjectError {
            object: name_of("Service", &svc.metadata),
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
