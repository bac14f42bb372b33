//! From Kubernetes objects to the services the data path must know: pure
//! functions, no I/O. Objects that cannot be translated are reported one by
//! one and left out; everything else is still translated.

use std::{collections::BTreeSet, net::Ipv4Addr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::{PROTO_TCP, PROTO_UDP};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A pod address and port that can serve a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
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

pub fn protocol_number(protocol: Option<&str>) -> Result<u8, String> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Ok(PROTO_TCP),
        "UDP" => Ok(PROTO_UDP),
        other => Err(format!(
            "protocol {other:?} is not supported (TCP and UDP are)"
        )),
    }
}

fn port_number(port: i32) -> Result<u16, String> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {port} is out of range 1-65535"))
}

fn name_of(
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

/// Backends for one Service port, from the Service's EndpointSlices, on the
/// slice port whose name equals the Service port's name.
///
/// New flows go to ready endpoints; when there is none, to endpoints that are
/// terminating but still serving (as kube-proxy does), so a Service whose
/// last pod is shutting down keeps answering until the pod is gone. All other
/// listed endpoints are retained for the flows already on them.
fn backends_for(
    slices: &[&EndpointSlice],
    port_name: &str,
    proto: u8,
    errors: &mut Vec<ObjectError>,
) -> (Vec<BackendAddr>, Vec<BackendAddr>) {
    let mut ready = BTreeSet::new();
    let mut serving_terminating = BTreeSet::new();
    let mut listed = BTreeSet::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && protocol_number(p.protocol.as_deref()).ok() == Some(proto)
        }) else {
            continue;
        };
        let port = match port.port.map(port_number) {
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                errors.push(ObjectError {
                    object: name_of("EndpointSlice", &slice.metadata),
                    message: e,
                });
                continue;
            }
            None => continue,
        };
        for ep in slice.endpoints.iter().flatten() {
            let c = ep.conditions.as_ref();
            // A nil condition means "unknown": ready and serving count as
            // true, terminating as false, as the API documents.
            let is_ready = c.and_then(|c| c.ready).unwrap_or(true);
            let is_serving = c.and_then(|c| c.serving).unwrap_or(is_ready);
            let is_terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            for addr in &ep.addresses {
                let Ok(ip) = addr.parse::<Ipv4Addr>() else {
                    errors.push(ObjectError {
                        object: name_of("EndpointSlice", &slice.metadata),
                        message: format!("endpoint address {addr:?} is not an IPv4 address"),
                    });
                    continue;
                };
                let b = BackendAddr { ip, port, proto };
                listed.insert(b);
                if is_ready {
                    ready.insert(b);
                } else if is_serving && is_terminating {
                    serving_terminating.insert(b);
                }
            }
        }
    }
    let active = if ready.is_empty() {
        serving_terminating
    } else {
        ready
    };
    let retained = listed.difference(&active).copied().collect();
    (active.into_iter().collect(), retained)
}

/// Translates Services and EndpointSlices into the frontends to program.
pub fn translate(services: &[Service], slices: &[EndpointSlice]) -> Translation {
    let mut t = Translation::default();
    for svc in services {
        let object = name_of("Service", &svc.metadata);
        let ips = match cluster_ips(svc) {
            Ok(ips) if ips.is_empty() => continue,
            Ok(ips) => ips,
            Err(message) => {
                t.errors.push(ObjectError { object, message });
                continue;
            }
        };
        let ns = svc.metadata.namespace.as_deref().unwrap_or("");
        let name = svc.metadata.name.as_deref().unwrap_or("");
        let own_slices: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_deref().unwrap_or("") == ns
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SERVICE_NAME_LABEL))
                        .map(String::as_str)
                        == Some(name)
            })
            .collect();
        let ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
        for sp in ports.into_iter().flatten() {
            let port_name = sp.name.clone().unwrap_or_default();
            let (proto, port) = match (
                protocol_number(sp.protocol.as_deref()),
                port_number(sp.port),
            ) {
                (Ok(proto), Ok(port)) => (proto, port),
                (Err(e), _) | (_, Err(e)) => {
                    t.errors.push(ObjectError {
                        object: object.clone(),
                        message: format!("port {port_name:?}: {e}"),
                    });
                    continue;
                }
            };
            let (backends, retained) = backends_for(&own_slices, &port_name, proto, &mut t.errors);
            for vip in &ips {
                t.services.push(DesiredService {
                    name: format!("{ns}/{name}:{port_name}"),
                    vip: *vip,
                    port,
                    proto,
                    flags: lb_common::service::SERVICE_F_CLUSTER_IP,
                    backends: backends.clone(),
                    retained: retained.clone(),
                });
            }
        }
    }
    t
}

#[cfg(test)]
#[path = "translate_tests.rs"]
mod tests;
