//! NetworkPolicy: from API objects to the data path's identities, ipcache,
//! endpoints and policy entries. Pure functions; see `lb_common::policy`.
//!
//! Identities are local to this agent (each node enforces with its own
//! ipcache): one per distinct (namespace, namespace labels, pod labels, policy
//! CIDRs containing the address) for pods, one per policy CIDR for the world
//! outside, so that `ipBlock` with `except` resolves through the ipcache's
//! longest prefix match, for pod addresses too.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod},
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use lb_common::policy::{
    EndpointInfo, PolicyKey, DIR_EGRESS, DIR_INGRESS, ENDPOINT_F_EGRESS_ISOLATED,
    ENDPOINT_F_INGRESS_ISOLATED, IDENTITY_FIRST_ALLOCATED, IDENTITY_HOST, IDENTITY_WORLD,
};

use crate::translate::{parse_cidr, protocol_number_any, NodeContext, ObjectError};

type Labels = BTreeMap<String, String>;

/// What the policy maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// (address, prefix length) -> identity; addresses in network byte order.
    pub ipcache: BTreeMap<(u32, u8), u32>,
    /// Pod address -> endpoint (every pod of the cluster).
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    /// The other nodes' addresses, network byte order.
    pub peer_nodes: BTreeSet<u32>,
    /// (key, port prefix bits) -> rule id.
    pub rules: BTreeMap<(PolicyKey, u8), u32>,
}

/// A rule id names the policy and rule that allowed (for traces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleName {
    pub policy: String,
    pub direction: &'static str,
    pub index: usize,
}

#[derive(Clone, Debug, Default)]
pub struct PolicyTranslation {
    pub state: PolicyState,
    pub rule_names: Vec<RuleName>,
    pub errors: Vec<ObjectError>,
}

/// Whether `selector` selects `labels` (matchLabels and matchExpressions;
/// an empty selector selects everything).
/// Selectors are matched against every pod at every sync: one with more
/// terms than this is refused rather than let slow the agent down.
pub const MAX_SELECTOR_TERMS: usize = 4096;

pub fn selects(selector: &LabelSelector, labels: &Labels) -> Result<bool, String> {
    validate_selector(selector)?;
    for (k, v) in selector.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            return Ok(false);
        }
    }
    for e in selector.match_expressions.iter().flatten() {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        let ok = match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            _ => value.is_none(), // DoesNotExist (validated above)
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A selector's operators are known and it is not too large.
pub fn validate_selector(selector: &LabelSelector) -> Result<(), String> {
    let terms = selector.match_labels.as_ref().map_or(0, |m| m.len())
        + selector
            .match_expressions
            .iter()
            .flatten()
            .map(|e| 1 + e.values.as_ref().map_or(0, |v| v.len()))
            .sum::<usize>();
    if terms > MAX_SELECTOR_TERMS {
        return Err(format!(
            "selector too large: {terms} labels and values (at most {MAX_SELECTOR_TERMS})"
        ));
    }
    for e in selector.match_expressions.iter().flatten() {
        if !matches!(
            e.operator.as_str(),
            "In" | "NotIn" | "Exists" | "DoesNotExist"
        ) {
            return Err(format!("unknown selector operator {:?}", e.operator));
        }
    }
    Ok(())
}

/// An address in a prefix.
fn contains(prefix: (Ipv4Addr, u8), inner: (Ipv4Addr, u8)) -> bool {
    let mask = if prefix.1 == 0 {
        0
    } else {
        u32::MAX << (32 - prefix.1)
    };
    inner.1 >= prefix.1 && (u32::from(inner.0) & mask) == u32::from(prefix.0)
}

/// What identities are made of.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum IdentityKey {
    Pod {
        namespace: String,
        ns_labels: Labels,
        labels: Labels,
        cidrs: BTreeSet<(Ipv4Addr, u8)>,
    },
    World {
        prefix: (Ipv4Addr, u8),
        cidrs: BTreeSet<(Ipv4Addr, u8)>,
    },
}

struct PodInfo<'a> {
    pod: &'a Pod,
    namespace: String,
    labels: Labels,
    ip: Ipv4Addr,
    identity: u32,
}

fn labels_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Labels {
    meta.labels.clone().unwrap_or_default()
}

/// A policy's `ipBlock`, parsed.
struct Block {
    cidr: (Ipv4Addr, u8),
    except: Vec<(Ipv4Addr, u8)>,
}

impl Block {
    /// Whether an address or prefix (with its set of containing policy
    /// CIDRs) falls in the block.
    fn matches(&self, cidrs: &BTreeSet<(Ipv4Addr, u8)>) -> bool {
        cidrs.contains(&self.cidr) && !self.except.iter().any(|e| cidrs.contains(e))
    }
}

fn parse_block(peer: &NetworkPolicyPeer) -> Result<Option<Block>, String> {
    let Some(b) = &peer.ip_block else {
        return Ok(None);
    };
    let cidr = parse_cidr(&b.cidr)?;
    let except = b
        .except
        .iter()
        .flatten()
        .map(|e| parse_cidr(e))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Block { cidr, except }))
}
fn policy_types(p: &NetworkPolicy) -> (bool, bool) {
    let spec = p.spec.as_ref();
    match spec.and_then(|s| s.policy_types.as_ref()) {
        Some(types) => (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        ),
        // The API's defaulting: Ingress always, Egress when there are egress rules.
        None => (
            true,
            spec.and_then(|s| s.egress.as_ref())
                .is_some_and(|e| !e.is_empty()),
        ),
    }
}

/// One port clause: (protocol, or 0 for any; port prefixes, or None for any).
enum PortSpec {
    Any,
    Ports(u8, Vec<(u16, u8)>),
    Named(u8, String),
    AnyOf(u8),
}

fn port_specs(ports: Option<&Vec<NetworkPolicyPort>>) -> Result<Vec<PortSpec>, String> {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return Ok(vec![PortSpec::Any]);
    };
    ports
        .iter()
        .map(|p| {
            let proto = protocol_number_any(p.protocol.as_deref())?;
            Ok(match &p.port {
                None => PortSpec::AnyOf(proto),
                Some(IntOrString::Int(n)) => {
                    let start = u16::try_from(*n)
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("port {n} out of range"))?;
                    let end = match p.end_port {
                        Some(e) => u16::try_from(e)
                            .ok()
                            .filter(|e| *e >= start)
                            .ok_or_else(|| format!("endPort {e} out of range"))?,
                        None => start,
                    };
                    PortSpec::Ports(proto, port_prefixes(start, end))
                }
                Some(IntOrString::String(name)) => match name.parse::<u16>() {
                    Ok(n) => PortSpec::Ports(proto, vec![(n, 16)]),
                    Err(_) => PortSpec::Named(proto, name.clone()),
                },
            })
        })
        .collect()
}

/// The container port named `name` for `proto` in `pod`.
fn named_port(pod: &Pod, name: &str, proto: u8) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find_map(|p| {
            let same_proto = protocol_number_any(p.protocol.as_deref()).ok() == Some(proto);
            (p.name.as_deref() == Some(name) && same_proto)
                .then_some(p.container_port)
                .and_then(|n| u16::try_from(n).ok())
        })
}

/// Translates NetworkPolicies into the maps of `node`.
pub fn translate_policies(
    pods: &[Pod],
    namespaces: &[Namespace],
    policies: &[NetworkPolicy],
    node: &NodeContext,
) -> PolicyTranslation {
    let mut t = PolicyTranslation::default();
    let policy_name = |p: &NetworkPolicy| {
        format!(
            "{}/{}",
            p.metadata.namespace.as_deref().unwrap_or(""),
            p.metadata.name.as_deref().unwrap_or("")
        )
    };
    // CIDRs of every valid policy; a policy with a bad one is reported and
    // keeps isolating its pods with no rule at all (never allows more).
    let mut cidrs: BTreeSet<(Ipv4Addr, u8)> = [(Ipv4Addr::UNSPECIFIED, 0)].into();
    let mut broken = BTreeSet::new();
    for (i, p) in policies.iter().enumerate() {
        let spec = p.spec.as_ref();
        let peers = spec
            .into_iter()
            .flat_map(|s| {
                s.ingress
                    .iter()
                    .flatten()
                    .flat_map(|r| r.from.iter().flatten())
            })
            .chain(spec.into_iter().flat_map(|s| {
                s.egress
                    .iter()
                    .flatten()
                    .flat_map(|r| r.to.iter().flatten())
            }));
        let mut found = Vec::new();
        for peer in peers {
            // Selectors are checked here too, so a bad one is reported even
            // while the policy selects no pod.
            let checked = [&peer.pod_selector, &peer.namespace_selector]
                .into_iter()
                .flatten()
                .try_for_each(validate_selector)
                .and_then(|()| parse_block(peer));
            match checked {
                Ok(Some(b)) => {
                    found.push(b.cidr);
                    found.extend(b.except);
                }
                Ok(None) => {}
                Err(e) => {
                    t.errors.push(ObjectError {
                        object: format!("NetworkPolicy {}", policy_name(p)),
                        message: format!("{e}; the policy allows nothing"),
                    });
                    broken.insert(i);
                    found.clear();
                    break;
                }
            }
        }
        cidrs.extend(found);
    }
    let within = |addr: (Ipv4Addr, u8)| -> BTreeSet<(Ipv4Addr, u8)> {
        cidrs
            .iter()
            .copied()
            .filter(|c| contains(*c, addr))
            .collect()
    };

    let ns_labels: BTreeMap<String, Labels> = namespaces
        .iter()
        .map(|n| {
            (
                n.metadata.name.clone().unwrap_or_default(),
                labels_of(&n.metadata),
            )
        })
        .collect();
    let empty = Labels::new();
    let mut keys: BTreeMap<IdentityKey, u32> = BTreeMap::new();
    let mut pod_keys = Vec::new();
    for pod in pods {
        let Some(ip) = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let key = IdentityKey::Pod {
            ns_labels: ns_labels.get(&namespace).cloned().unwrap_or_default(),
            namespace: namespace.clone(),
            labels: labels_of(&pod.metadata),
            cidrs: within((ip, 32)),
        };
        keys.insert(key.clone(), 0);
        pod_keys.push((pod, namespace, ip, key));
    }
    for c in &cidrs {
        keys.insert(
            IdentityKey::World {
                prefix: *c,
                cidrs: within(*c),
            },
            0,
        );
    }
    for (i, id) in keys.values_mut().enumerate() {
        *id = IDENTITY_FIRST_ALLOCATED + i as u32;
    }
    let pods_info: Vec<PodInfo> = pod_keys
        .into_iter()
        .map(|(pod, namespace, ip, key)| PodInfo {
            pod,
            labels: labels_of(&pod.metadata),
            namespace,
            ip,
            identity: keys[&key],
        })
        .collect();
    for p in &pods_info {
        t.state
            .ipcache
            .insert((u32::from(p.ip).to_be(), 32), p.identity);
    }
    for (key, id) in &keys {
        if let IdentityKey::World { prefix, .. } = key {
            t.state
                .ipcache
                .insert((u32::from(prefix.0).to_be(), prefix.1), *id);
        }
    }
    for addr in &node.addrs {
        t.state
            .ipcache
            .insert((u32::from(*addr).to_be(), 32), IDENTITY_HOST);
    }

    // Peers of a rule, as identities (None: any identity).
    let peer_identities = |policy_ns: &str,
                           peers: Option<&Vec<NetworkPolicyPeer>>|
     -> Result<Option<BTreeSet<u32>>, String> {
        let Some(peers) = peers.filter(|p| !p.is_empty()) else {
            return Ok(None);
        };
        let mut ids = BTreeSet::new();
        for peer in peers {
            if let Some(block) = parse_block(peer)? {
                for (key, id) in &keys {
                    let in_block = match key {
                        IdentityKey::Pod { cidrs, .. } | IdentityKey::World { cidrs, .. } => {
                            block.matches(cidrs)
                        }
                    };
                    if in_block {
                        ids.insert(*id);
                    }
                }
                continue;
            }
            for p in &pods_info {
                let ns_ok = match &peer.namespace_selector {
                    Some(sel) => selects(sel, ns_labels.get(&p.namespace).unwrap_or(&empty))?,
                    None => p.namespace == policy_ns,
                };
                let pod_ok = match &peer.pod_selector {
                    Some(sel) => selects(sel, &p.labels)?,
                    None => true,
                };
                if ns_ok && pod_ok {
                    ids.insert(p.identity);
                }
            }
        }
        Ok(Some(ids))
    };

    t.state.peer_nodes = node.peers.iter().map(|a| u32::from(*a).to_be()).collect();
    // Endpoints: every scheduled pod, not only this node's, since XDP judges
    // NodePort flows to remote backends here (with the client's identity,
    // before SNAT hides it). Numbered in a stable order.
    let mut all: Vec<&PodInfo> = pods_info
        .iter()
        .filter(|p| {
            p.pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_some()
        })
        .collect();
    all.sort_by_key(|p| (p.namespace.clone(), p.pod.metadata.name.clone()));
    for (idx, ep) in all.iter().enumerate() {
        let Ok(endpoint_id) = u16::try_from(idx + 1) else {
            t.errors.push(ObjectError {
                object: format!(
                    "Pod {}/{}",
                    ep.namespace,
                    ep.pod.metadata.name.as_deref().unwrap_or("")
                ),
                message: "more than 65535 pods: no endpoint left for this one".into(),
            });
            break;
        };
        let mut flags = 0;
        for (pi, policy) in policies.iter().enumerate() {
            let pname = policy_name(policy);
            let pns = policy.metadata.namespace.as_deref().unwrap_or("");
            let Some(spec) = policy.spec.as_ref() else {
                continue;
            };
            if pns != ep.namespace {
                continue;
            }
            // An absent podSelector, like an empty one, selects every pod.
            match selects(&spec.pod_selector.clone().unwrap_or_default(), &ep.labels) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    t.errors.push(ObjectError {
                        object: format!("NetworkPolicy {pname}"),
                        message: e,
                    });
                    continue;
                }
            }
            let (ingress, egress) = policy_types(policy);
            if ingress {
                flags |= ENDPOINT_F_INGRESS_ISOLATED;
            }
            if egress {
                flags |= ENDPOINT_F_EGRESS_ISOLATED;
            }
            if broken.contains(&pi) {
                continue;
            }
            let ingress_rules = spec
                .ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()));
            let egress_rules = spec
                .egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()));
            let directed = ingress_rules
                .enumerate()
                .filter(|_| ingress)
                .map(|(i, r)| (DIR_INGRESS, "ingress", i, r))
                .chain(
                    egress_rules
                        .enumerate()
                        .filter(|_| egress)
                        .map(|(i, r)| (DIR_EGRESS, "egress", i, r)),
                );
            for (dir, dir_name, index, (peers, ports)) in directed {
                let result = (|| -> Result<(), String> {
                    let ids = peer_identities(pns, peers)?;
                    let specs = port_specs(ports)?;
                    let rule_id = t.rule_names.len() as u32 + 1;
                    t.rule_names.push(RuleName {
                        policy: pname.clone(),
                        direction: dir_name,
                        index,
                    });
                    let idents: Vec<u32> = match &ids {
                        None => vec![0],
                        Some(set) => set.iter().copied().collect(),
                    };
                    let mut put = |proto: u8, identity: u32, port: u16, bits: u8| {
                        let key = PolicyKey {
                            endpoint_id,
                            direction: dir,
                            proto,
                            identity,
                            port: port.to_be(),
                            pad0: 0,
                        };
                        t.state.rules.insert((key, bits), rule_id);
                    };
                    for spec in &specs {
                        match spec {
                            PortSpec::Any => idents.iter().for_each(|id| put(0, *id, 0, 0)),
                            PortSpec::AnyOf(proto) => {
                                idents.iter().for_each(|id| put(*proto, *id, 0, 0))
                            }
                            PortSpec::Ports(proto, prefixes) => {
                                for id in &idents {
                                    for (port, bits) in prefixes {
                                        put(*proto, *id, *port, *bits);
                                    }
                                }
                            }
                            // A named port is the destination pod's: the local
                            // pod's for ingress, each peer pod's for egress.
                            PortSpec::Named(proto, name) if dir == DIR_INGRESS => {
                                if let Some(port) = named_port(ep.pod, name, *proto) {
                                    idents.iter().for_each(|id| put(*proto, *id, port, 16));
                                }
                            }
                            PortSpec::Named(proto, name) => {
                                for p in pods_info.iter().filter(|p| {
                                    ids.as_ref().is_none_or(|s| s.contains(&p.identity))
                                }) {
                                    if let Some(port) = named_port(p.pod, name, *proto) {
                                        put(*proto, p.identity, port, 16);
                                    }
                                }
                            }
                        }
                    }
                    Ok(())
                })();
                if let Err(e) = result {
                    t.errors.push(ObjectError {
                        object: format!("NetworkPolicy {pname}"),
                        message: format!("{dir_name} rule {index}: {e}"),
                    });
                }
            }
        }
        t.state.endpoints.insert(
            u32::from(ep.ip).to_be(),
            EndpointInfo { endpoint_id, flags },
        );
    }
    let _ = IDENTITY_WORLD;
    t
}

/// The verdict the data path reaches for a new flow, computed from the
/// maps' contents: `Some(rule id)` (0 when the endpoint is not isolated or
/// the peer is the node) or `None` for a drop.
pub fn evaluate(
    state: &PolicyState,
    direction: u8,
    local: Ipv4Addr,
    remote: Ipv4Addr,
    proto: u8,
    port: u16,
) -> Option<u32> {
    let Some(ep) = state.endpoints.get(&u32::from(local).to_be()) else {
        return Some(0);
    };
    let isolated = if direction == DIR_INGRESS {
        ENDPOINT_F_INGRESS_ISOLATED
    } else {
        ENDPOINT_F_EGRESS_ISOLATED
    };
    if ep.flags & isolated == 0 {
        return Some(0);
    }
    let identity = state
        .ipcache
        .iter()
        .filter(|((addr, len), _)| {
            contains((Ipv4Addr::from(u32::from_be(*addr)), *len), (remote, 32))
        })
        .max_by_key(|((_, len), _)| *len)
        .map_or(IDENTITY_WORLD, |(_, id)| *id);
    if direction == DIR_INGRESS && identity == IDENTITY_HOST {
        return Some(0);
    }
    for (p, id) in [(proto, identity), (0, identity), (proto, 0), (0, 0)] {
        let hit = state.rules.iter().find(|((k, bits), _)| {
            let mask = if *bits == 0 {
                0
            } else {
                u16::MAX << (16 - bits)
            };
            k.endpoint_id == ep.endpoint_id
                && k.direction == direction
                && k.proto == p
                && k.identity == id
                && (u16::from_be(k.port) & mask) == (port & mask)
        });
        if let Some((_, rule)) = hit {
            return Some(*rule);
        }
    }
    None
}

/// Splits the port range `start..=end` into (port, prefix bits) pairs that
/// cover it exactly, for the policy LPM trie (`endPort` ranges).
pub fn port_prefixes(start: u16, end: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, end) = (u32::from(start), u32::from(end));
    while lo <= end {
        // The largest aligned block starting at lo that stays within end.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros().min(16)
        };
        while lo + size - 1 > end {
            size >>= 1;
        }
        out.push((lo as u16, (16 - size.trailing_zeros()) as u8));
        lo += size;
    }
    out
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod table_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(prefixes: &[(u16, u8)]) -> Vec<u16> {
        let mut ports: Vec<u16> = prefixes
            .iter()
            .flat_map(|(p, bits)| {
                let size = 1u32 << (16 - u32::from(*bits));
                (u32::from(*p)..u32::from(*p) + size).map(|x| x as u16)
            })
            .collect();
        ports.sort();
        ports
    }

    #[test]
    fn port_ranges_become_exact_prefix_covers() {
        // (start, end, number of prefixes)
        for (start, end, n) in [
            (80, 80, 1),
            (32000, 32767, 2),
            (1, 65535, 16),
            (0, 65535, 1),
            (8080, 8081, 1),
            (8081, 8082, 2),
        ] {
            let p = port_prefixes(start, end);
            assert_eq!(
                covered(&p),
                (start..=end).collect::<Vec<_>>(),
                "{start}-{end}"
            );
            assert_eq!(p.len(), n, "{start}-{end}: {p:?}");
        }
    }
}
