//! What translation reads of a Service, parsed once, when the agent
//! stores it (`ServiceFacts::of`): its addresses as addresses, its ports
//! and policies as numbers and flags, and what could not be read as the
//! errors to report. Pure; the agent's cache keeps these instead of the
//! API object (a k8s-openapi `Service` is 840 bytes before any of its
//! strings), and every translation after reads them without parsing.

use std::{net::Ipv4Addr, sync::Arc};

use k8s_openapi::api::core::v1::{Service, ServiceSpec};

use super::{parse_cidr, protocol_number};

/// When a Service was created: the older of two claiming one frontend keeps it.
pub type Created = Option<k8s_openapi::jiff::Timestamp>;

/// A Service as translation reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceFacts {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub created: Created,
    /// Its virtual addresses: none for headless and ExternalName Services
    /// (no load balancing); an error when one cannot be read (the
    /// Service is left out whole).
    pub cluster_ips: Result<Box<[Ipv4Addr]>, Box<str>>,
    pub external_ips: Box<[Ipv4Addr]>,
    /// LoadBalancer ingress addresses (none when a source range is bad).
    pub lb_ips: Box<[Ipv4Addr]>,
    pub source_ranges: Box<[(Ipv4Addr, u8)]>,
    /// What could not be read of the addresses above (reported; the rest
    /// is still programmed).
    pub address_errors: Box<[Box<str>]>,
    pub ports: Box<[PortFacts]>,
    /// Type NodePort or LoadBalancer: each port has a nodePort.
    pub node_ports: bool,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `sessionAffinity: ClientIP`: its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// The port this node answers health checks on (a LoadBalancer with
    /// `externalTrafficPolicy: Local`).
    pub health_check_node_port: Option<u16>,
}

/// One port of a Service's spec.
#[derive(Clone, Debug, PartialEq)]
pub struct PortFacts {
    pub name: Box<str>,
    pub proto: Result<u8, Box<str>>,
    /// As written: checked where it is used, so the error names its port.
    pub port: i32,
    pub node_port: Option<i32>,
}

impl ServiceFacts {
    pub fn of(svc: &Service) -> Self {
        let meta = &svc.metadata;
        let ns = meta.namespace.as_deref().unwrap_or("");
        Self::named(svc, ns.into(), meta.name.as_deref().unwrap_or("").into())
    }

    /// `of`, with its namespace and name given (shared with the cache's key).
    pub fn named(svc: &Service, namespace: Arc<str>, name: Arc<str>) -> Self {
        let mut facts = Self {
            namespace,
            name,
            created: svc.metadata.creation_timestamp.as_ref().map(|t| t.0),
            cluster_ips: Ok(Box::default()),
            external_ips: Box::default(),
            lb_ips: Box::default(),
            source_ranges: Box::default(),
            address_errors: Box::default(),
            ports: Box::default(),
            node_ports: false,
            external_local: false,
            internal_local: false,
            affinity_timeout: None,
            health_check_node_port: None,
        };
        let Some(spec) = svc.spec.as_ref() else {
            return facts;
        };
        let load_balancer = spec.type_.as_deref() == Some("LoadBalancer");
        facts.node_ports = load_balancer || spec.type_.as_deref() == Some("NodePort");
        facts.external_local = spec.external_traffic_policy.as_deref() == Some("Local");
        facts.internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        facts.affinity_timeout = affinity_timeout(spec);
        facts.health_check_node_port = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0 && load_balancer && facts.external_local);
        facts.cluster_ips = cluster_ips(spec);
        if !matches!(&facts.cluster_ips, Ok(ips) if !ips.is_empty()) {
            return facts; // no frontends: its addresses and ports are not read
        }
        let mut errors = Vec::new();
        let (source_ranges, ranges_ok) = source_ranges(spec, &mut errors);
        facts.external_ips = parse_ipv4_list(
            spec.external_ips.iter().flatten().map(String::as_str),
            "externalIP",
            &mut errors,
        );
        if load_balancer {
            facts.lb_ips = lb_ips(svc, &mut errors);
        }
        // A bad source range must not open the Service to everyone: its
        // LoadBalancer addresses are left out (fail closed).
        if !ranges_ok {
            facts.lb_ips = Box::default();
        }
        facts.source_ranges = source_ranges;
        facts.address_errors = errors.into_iter().map(String::into_boxed_str).collect();
        facts.ports = spec
            .ports
            .iter()
            .flatten()
            .map(|p| PortFacts {
                name: p.name.as_deref().unwrap_or("").into(),
                proto: protocol_number(p.protocol.as_deref()).map_err(String::into_boxed_str),
                port: p.port,
                node_port: p.node_port,
            })
            .collect();
        facts
    }

    /// `Service namespace/name`, as errors name it.
    pub fn object(&self) -> String {
        format!("Service {}/{}", self.namespace, self.name)
    }
}

/// The Service's virtual IPv4 addresses, or none for headless and
/// ExternalName Services, which get no load balancing.
fn cluster_ips(spec: &ServiceSpec) -> Result<Box<[Ipv4Addr]>, Box<str>> {
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Box::default());
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
            Err(_) => return Err(format!("clusterIP {ip:?} is not an IP address").into()),
        }
    }
    Ok(out.into())
}

/// `loadBalancerSourceRanges`, and whether every one of them could be read.
fn source_ranges(spec: &ServiceSpec, errors: &mut Vec<String>) -> (Box<[(Ipv4Addr, u8)]>, bool) {
    let mut ok = true;
    let mut out = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        match parse_cidr(r) {
            Ok(c) => out.push(c),
            Err(e) => {
                ok = false;
                errors.push(format!(
                    "loadBalancerSourceRanges: {e}; its LoadBalancer addresses are not programmed"
                ));
            }
        }
    }
    (out.into(), ok)
}

fn lb_ips(svc: &Service, errors: &mut Vec<String>) -> Box<[Ipv4Addr]> {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    parse_ipv4_list(
        ingress
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref()),
        "load balancer ingress IP",
        errors,
    )
}

fn parse_ipv4_list<'a>(
    ips: impl Iterator<Item = &'a str>,
    what: &str,
    errors: &mut Vec<String>,
) -> Box<[Ipv4Addr]> {
    let mut out = Vec::new();
    for ip in ips {
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => out.push(v4),
            Ok(std::net::IpAddr::V6(_)) => {}
            Err(_) => errors.push(format!("{what} {ip:?} is not an IP address")),
        }
    }
    out.into()
}

/// `sessionAffinity: ClientIP`: its timeout (the API's default: 3 hours).
fn affinity_timeout(spec: &ServiceSpec) -> Option<u32> {
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
