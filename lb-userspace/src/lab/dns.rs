//! Cluster DNS as kind's CoreDNS answers it (the `kubernetes` plugin's
//! records, RFC-style): `SVC.NS.svc.cluster.local` is the ClusterIP (the
//! ready endpoints' addresses for a headless Service, a CNAME for an
//! ExternalName one), `_PORT._PROTO.SVC.NS.svc.cluster.local` an SRV record
//! per named port, and `a-b-c-d.NS.pod.cluster.local` the address a.b.c.d.
//! Nothing outside cluster.local is answered (the lab has no upstream).
//! Messages are read and written with hickory-proto; this module only
//! decides the records, from a `Zone` built from the API's objects.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{
        rdata::{A, CNAME, SRV},
        Name, RData, Record, RecordType,
    },
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

pub const DOMAIN: &str = "cluster.local";
/// kind's kube-dns ClusterIP.
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// CoreDNS's `kubernetes` plugin default.
const TTL: u32 = 5;

/// What DNS knows of one Service.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ServiceEntry {
    pub cluster_ip: Option<Ipv4Addr>,
    pub external_name: Option<String>,
    /// Ready endpoint addresses (what a headless Service's name resolves to).
    pub endpoints: Vec<Ipv4Addr>,
    /// (port name, protocol in lower case, port).
    pub ports: Vec<(String, String, u16)>,
}

/// Every Service by (namespace, name), and the namespaces.
#[derive(Debug, Default, Clone)]
pub struct Zone {
    pub services: BTreeMap<(String, String), ServiceEntry>,
    pub namespaces: BTreeSet<String>,
}

impl Zone {
    pub fn from_objects<'a>(
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        namespaces: impl IntoIterator<Item = String>,
    ) -> Zone {
        let mut zone = Zone {
            namespaces: namespaces.into_iter().collect(),
            ..Zone::default()
        };
        for svc in services {
            let (Some(ns), Some(name)) = (&svc.metadata.namespace, &svc.metadata.name) else {
                continue;
            };
            let Some(spec) = svc.spec.as_ref() else {
                continue;
            };
            let entry = ServiceEntry {
                cluster_ip: spec.cluster_ip.as_deref().and_then(|ip| ip.parse().ok()),
                external_name: spec
                    .external_name
                    .clone()
                    .filter(|_| spec.type_.as_deref() == Some("ExternalName")),
                endpoints: vec![],
                ports: spec
                    .ports
                    .iter()
                    .flatten()
                    .filter_map(|p| {
                        let port = u16::try_from(p.port).ok()?;
                        let proto = p.protocol.as_deref().unwrap_or("TCP").to_lowercase();
                        Some((p.name.clone().unwrap_or_default(), proto, port))
                    })
                    .collect(),
            };
            zone.services.insert((ns.clone(), name.clone()), entry);
        }
        for slice in slices {
            let Some(ns) = &slice.metadata.namespace else {
                continue;
            };
            let Some(svc) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
            else {
                continue;
            };
            let Some(entry) = zone.services.get_mut(&(ns.clone(), svc.clone())) else {
                continue;
            };
            for e in slice.endpoints.iter().flatten() {
                let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if ready {
                    entry.endpoints.extend(
                        e.addresses
                            .iter()
                            .filter_map(|a| a.parse::<Ipv4Addr>().ok()),
                    );
                }
            }
            entry.endpoints.sort();
            entry.endpoints.dedup();
        }
        zone
    }
}

/// The records for a name, or why there are none.
#[derive(Debug, PartialEq)]
pub enum Answer {
    Records(Vec<Record>),
    /// The name exists, not with records of that type.
    NoData,
    NxDomain,
    /// Not in cluster.local: not ours to answer.
    Refused,
}

fn record(name: &Name, rdata: RData) -> Record {
    Record::from_rdata(name.clone(), TTL, rdata)
}

fn service_name(ns: &str, svc: &str) -> Option<Name> {
    Name::from_ascii(format!("{svc}.{ns}.svc.{DOMAIN}.")).ok()
}

/// `a-b-c-d` as an address.
fn dashed_ip(label: &str) -> Option<Ipv4Addr> {
    label.replace('-', ".").parse().ok()
}

/// The answer for `name` (absolute or not) and `qtype`.
pub fn resolve(zone: &Zone, name: &Name, qtype: RecordType) -> Answer {
    let text = name.to_ascii().to_ascii_lowercase();
    let text = text.trim_end_matches('.');
    let Some(local) = text.strip_suffix(DOMAIN).map(|l| l.trim_end_matches('.')) else {
        return Answer::Refused;
    };
    let labels: Vec<&str> = if local.is_empty() {
        vec![]
    } else {
        local.split('.').collect()
    };
    let wants = |t: RecordType| qtype == t || qtype == RecordType::ANY;
    match labels.as_slice() {
        [ip, ns, "pod"] => match dashed_ip(ip) {
            Some(addr) if zone.namespaces.contains(*ns) => {
                if wants(RecordType::A) {
                    Answer::Records(vec![record(name, RData::A(A(addr)))])
                } else {
                    Answer::NoData
                }
            }
            _ => Answer::NxDomain,
        },
        [svc, ns, "svc"] => match zone.services.get(&(ns.to_string(), svc.to_string())) {
            None => Answer::NxDomain,
            Some(entry) => service_records(name, entry, &wants),
        },
        [port, proto, svc, ns, "svc"] if port.starts_with('_') && proto.starts_with('_') => {
            let Some(entry) = zone.services.get(&(ns.to_string(), svc.to_string())) else {
                return Answer::NxDomain;
            };
            let (port, proto) = (&port[1..], &proto[1..]);
            let Some((_, _, number)) = entry.ports.iter().find(|(n, p, _)| n == port && p == proto)
            else {
                return Answer::NxDomain;
            };
            if !wants(RecordType::SRV) {
                return Answer::NoData;
            }
            let Some(target) = service_name(ns, svc) else {
                return Answer::NxDomain;
            };
            Answer::Records(vec![record(
                name,
                RData::SRV(SRV::new(0, 100, *number, target)),
            )])
        }
        // Names that exist as parents of records (svc.cluster.local, a
        // namespace's zone): no records of their own.
        [] | ["svc"] | ["pod"] => Answer::NoData,
        [ns, "svc" | "pod"] if zone.namespaces.contains(*ns) => Answer::NoData,
        _ => Answer::NxDomain,
    }
}

fn service_records(
    name: &Name,
    entry: &ServiceEntry,
    wants: &dyn Fn(RecordType) -> bool,
) -> Answer {
    if let Some(external) = &entry.external_name {
        let Ok(target) = Name::from_ascii(format!("{}.", external.trim_end_matches('.'))) else {
            return Answer::NoData;
        };
        return Answer::Records(vec![record(name, RData::CNAME(CNAME(target)))]);
    }
    if !wants(RecordType::A) {
        return Answer::NoData;
    }
    let addrs: Vec<Ipv4Addr> = match entry.cluster_ip {
        Some(ip) => vec![ip],
        // Headless: the ready endpoints.
        None => entry.endpoints.clone(),
    };
    if addrs.is_empty() {
        return Answer::NoData;
    }
    Answer::Records(
        addrs
            .into_iter()
            .map(|ip| record(name, RData::A(A(ip))))
            .collect(),
    )
}

/// The response to a DNS request, or None for bytes that are not one.
pub fn respond(zone: &Zone, request: &[u8]) -> Option<Vec<u8>> {
    let req = Message::from_vec(request).ok()?;
    if req.message_type() != MessageType::Query {
        return None;
    }
    let mut resp = Message::new();
    resp.set_id(req.id())
        .set_message_type(MessageType::Response)
        .set_op_code(req.op_code())
        .set_recursion_desired(req.recursion_desired())
        .set_recursion_available(false)
        .set_authoritative(true)
        .add_queries(req.queries().iter().cloned());
    let code = match req.queries() {
        [q] => match resolve(zone, q.name(), q.query_type()) {
            Answer::Records(records) => {
                resp.add_answers(records);
                ResponseCode::NoError
            }
            Answer::NoData => ResponseCode::NoError,
            Answer::NxDomain => ResponseCode::NXDomain,
            Answer::Refused => ResponseCode::Refused,
        },
        _ => ResponseCode::FormErr,
    };
    resp.set_response_code(code);
    resp.to_vec().ok()
}

#[cfg(test)]
#[path = "dns_tests.rs"]
mod tests;
