//! A NetworkPolicy read once, when it changes: its selectors checked, its
//! CIDRs and ports parsed, its rules named by stable ids. A policy with a
//! bad peer keeps isolating its pods and allows nothing (fails closed); a
//! rule with a bad port is left out alone.

use std::{collections::BTreeSet, net::Ipv4Addr};

use k8s_openapi::{
    api::{
        core::v1::Pod,
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use lb_common::policy::{DIR_EGRESS, DIR_INGRESS};

use super::{
    port_prefixes,
    selector::{selects, validate_selector},
    Labels, RuleName,
};
use crate::translate::{parse_cidr, protocol_number_any, ObjectError};

/// An address prefix (address, length).
pub type Prefix = (Ipv4Addr, u8);

/// A policy's `ipBlock`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub cidr: Prefix,
    pub except: Vec<Prefix>,
}

impl Block {
    /// Whether an address or prefix, given the set of policy CIDRs that
    /// contain it, falls in the block.
    pub fn matches(&self, cidrs: &BTreeSet<Prefix>) -> bool {
        cidrs.contains(&self.cidr) && !self.except.iter().any(|e| cidrs.contains(e))
    }
}

/// One peer of a rule.
#[derive(Clone, Debug, PartialEq)]
pub enum Peer {
    Block(Block),
    /// Pods by namespace selector (None: the policy's own namespace) and
    /// pod selector (None: every pod).
    Pods {
        namespaces: Option<LabelSelector>,
        pods: Option<LabelSelector>,
    },
}

impl Peer {
    /// Whether the peer selects the pods of namespace `ns` (labelled
    /// `ns_labels`) labelled `labels`, for a policy of `policy_ns`.
    pub fn selects_pods(
        &self,
        policy_ns: &str,
        ns: &str,
        ns_labels: &Labels,
        labels: &Labels,
    ) -> bool {
        let Peer::Pods { namespaces, pods } = self else {
            return false;
        };
        let ns_ok = match namespaces {
            Some(sel) => selects(sel, ns_labels),
            None => ns == policy_ns,
        };
        ns_ok && pods.as_ref().is_none_or(|sel| selects(sel, labels))
    }
}

/// One port clause: (protocol, or 0 for any; port prefixes, or any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    Any,
    Ports(u8, Vec<(u16, u8)>),
    /// A container port by name: the destination pod's.
    Named(u8, String),
    AnyOf(u8),
}

/// One rule of a policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub direction: u8,
    pub index: usize,
    /// What the policy entries it makes carry (`rule_id`).
    pub id: u32,
    /// None: any peer.
    pub peers: Option<Vec<Peer>>,
    pub ports: Vec<PortSpec>,
}

impl Rule {
    pub fn direction_name(&self) -> &'static str {
        if self.direction == DIR_INGRESS {
            "ingress"
        } else {
            "egress"
        }
    }
}

/// A NetworkPolicy as the engine uses it.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedPolicy {
    pub namespace: String,
    pub name: String,
    /// None when the podSelector is invalid: the policy selects no pod.
    pub pod_selector: Option<LabelSelector>,
    pub ingress: bool,
    pub egress: bool,
    /// Empty when a peer is bad: the policy isolates and allows nothing.
    pub rules: Vec<Rule>,
    /// The CIDRs of its ipBlocks (and their exceptions).
    pub cidrs: Vec<Prefix>,
    pub errors: Vec<ObjectError>,
}

impl ParsedPolicy {
    /// Whether the policy applies to a pod of `ns` labelled `labels`.
    pub fn selects_pod(&self, ns: &str, labels: &Labels) -> bool {
        ns == self.namespace
            && self
                .pod_selector
                .as_ref()
                .is_some_and(|sel| selects(sel, labels))
    }

    pub fn rule_names(&self) -> impl Iterator<Item = (u32, RuleName)> + '_ {
        self.rules.iter().map(|r| {
            (
                r.id,
                RuleName {
                    policy: format!("{}/{}", self.namespace, self.name),
                    direction: r.direction_name(),
                    index: r.index,
                },
            )
        })
    }
}

/// The id of rule `index` of `direction` in policy `ns/name`: drawn from
/// the names (FNV-1a), so that it is the same in every agent and in `lb
/// flows`, whatever order policies came in. Never 0 (no rule).
pub fn rule_id(ns: &str, name: &str, direction: u8, index: usize) -> u32 {
    let text = format!("{ns}/{name}/{direction}/{index}");
    let hash = text.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    hash.max(1)
}

/// Reads a NetworkPolicy.
pub fn parse_policy(p: &NetworkPolicy) -> ParsedPolicy {
    let namespace = p.metadata.namespace.clone().unwrap_or_default();
    let name = p.metadata.name.clone().unwrap_or_default();
    let object = format!("NetworkPolicy {namespace}/{name}");
    let (ingress, egress) = policy_types(p);
    let mut out = ParsedPolicy {
        namespace,
        name,
        pod_selector: None,
        ingress,
        egress,
        rules: Vec::new(),
        cidrs: Vec::new(),
        errors: Vec::new(),
    };
    let Some(spec) = p.spec.as_ref() else {
        return out;
    };
    // An absent podSelector, like an empty one, selects every pod.
    let pod_selector = spec.pod_selector.clone().unwrap_or_default();
    match validate_selector(&pod_selector) {
        Ok(()) => out.pod_selector = Some(pod_selector),
        Err(e) => out.errors.push(ObjectError {
            object: object.clone(),
            message: e,
        }),
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
    let all = ingress_rules
        .enumerate()
        .map(|(i, r)| (DIR_INGRESS, i, r))
        .chain(egress_rules.enumerate().map(|(i, r)| (DIR_EGRESS, i, r)));
    // Every peer is checked, of directions the policy does not enforce too,
    // so that a bad one is reported however the policy is used.
    let mut parsed = Vec::new();
    for (direction, index, (peers, ports)) in all {
        match parse_peers(peers) {
            Ok(peers) => parsed.push((direction, index, peers, ports)),
            Err(e) => {
                // A bad peer: allow nothing at all (never more than meant).
                out.errors.push(ObjectError {
                    object,
                    message: format!("{e}; the policy allows nothing"),
                });
                return out;
            }
        }
    }
    for (direction, index, peers, ports) in parsed {
        for peer in peers.iter().flatten() {
            if let Peer::Block(b) = peer {
                out.cidrs.push(b.cidr);
                out.cidrs.extend(&b.except);
            }
        }
        let enforced = if direction == DIR_INGRESS {
            ingress
        } else {
            egress
        };
        if !enforced {
            continue;
        }
        let rule = Rule {
            direction,
            index,
            id: rule_id(&out.namespace, &out.name, direction, index),
            peers,
            ports: Vec::new(),
        };
        match port_specs(ports) {
            Ok(ports) => out.rules.push(Rule { ports, ..rule }),
            Err(e) => out.errors.push(ObjectError {
                object: object.clone(),
                message: format!("{} rule {index}: {e}", rule.direction_name()),
            }),
        }
    }
    out
}

fn parse_peers(peers: Option<&Vec<NetworkPolicyPeer>>) -> Result<Option<Vec<Peer>>, String> {
    let Some(peers) = peers.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for peer in peers {
        for sel in [&peer.pod_selector, &peer.namespace_selector]
            .into_iter()
            .flatten()
        {
            validate_selector(sel)?;
        }
        match parse_block(peer)? {
            Some(b) => out.push(Peer::Block(b)),
            None => out.push(Peer::Pods {
                namespaces: peer.namespace_selector.clone(),
                pods: peer.pod_selector.clone(),
            }),
        }
    }
    Ok(Some(out))
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

fn port_specs(ports: Option<&Vec<NetworkPolicyPort>>) -> Result<Vec<PortSpec>, String> {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return Ok(vec![PortSpec::Any]);
    };
    ports.iter().map(port_spec).collect()
}

fn port_spec(p: &NetworkPolicyPort) -> Result<PortSpec, String> {
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
}

/// What the engine needs of a Pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace: String,
    pub labels: Labels,
    pub ip: Option<Ipv4Addr>,
    /// Has a node: an endpoint (every node judges flows to every pod).
    pub scheduled: bool,
    /// Container ports by name: (name, protocol, port), first of a name first.
    pub named_ports: Vec<(String, u8, u16)>,
}

impl PodFacts {
    pub fn of(pod: &Pod) -> Self {
        let named_ports = pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                let name = p.name.clone()?;
                let proto = protocol_number_any(p.protocol.as_deref()).ok()?;
                Some((name, proto, u16::try_from(p.container_port).ok()?))
            })
            .collect();
        Self {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ip: pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok()),
            scheduled: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_some(),
            named_ports,
        }
    }

    /// The container port named `name` for `proto`.
    pub fn named_port(&self, name: &str, proto: u8) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|(n, p, _)| n == name && *p == proto)
            .map(|(_, _, port)| *port)
    }
}
