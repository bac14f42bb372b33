//! NetworkPolicy: from API objects to the data path's identities, ipcache,
//! endpoints and policy entries (see `lb_common::policy`). Each policy is
//! read once (`parse`); the engine (`engine`) keeps identities
//! (`identity`), a cache of what each rule's peers select, and each
//! endpoint's entries (`endpoint`, a pure function), and recomputes only
//! what a change touches.
//!
//! Identities are local to this agent (each node enforces with its own
//! ipcache): one per distinct (namespace, namespace labels, pod labels, policy
//! CIDRs containing the address) for pods, one per policy CIDR for the world
//! outside, so that `ipBlock` with `except` resolves through the ipcache's
//! longest prefix match, for pod addresses too.

pub mod endpoint;
pub mod engine;
pub mod identity;
pub mod parse;
pub mod selector;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use lb_common::policy::{
    EndpointInfo, PolicyKey, DIR_INGRESS, ENDPOINT_F_EGRESS_ISOLATED, ENDPOINT_F_INGRESS_ISOLATED,
    IDENTITY_HOST, IDENTITY_WORLD,
};

pub use engine::{PolicyDelta, PolicyEngine};
pub use identity::contains;
pub use parse::{parse_policy, PodFacts};

use crate::translate::{NodeContext, ObjectError};

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
    pub rule_names: BTreeMap<u32, RuleName>,
    pub errors: Vec<ObjectError>,
}

/// Object keys (namespace, name).
fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> engine::ObjectKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Translates NetworkPolicies into the maps of `node`, all at once: the
/// engine fed every object (what `lb trace` and the table tests use).
pub fn translate_policies(
    pods: &[Pod],
    namespaces: &[Namespace],
    policies: &[NetworkPolicy],
    node: &NodeContext,
) -> PolicyTranslation {
    let mut engine = PolicyEngine::new();
    engine.set_node(node);
    for n in namespaces {
        let name = n.metadata.name.clone().unwrap_or_default();
        engine.set_namespace(&name, Some(n.metadata.labels.clone().unwrap_or_default()));
    }
    for p in policies {
        engine.set_policy(&key_of(&p.metadata), Some(parse_policy(p)));
    }
    for p in pods {
        engine.set_pod(&key_of(&p.metadata), Some(PodFacts::of(p)));
    }
    engine.flush();
    PolicyTranslation {
        state: engine.state().clone(),
        rule_names: engine.rule_names(),
        errors: engine.errors().cloned().collect(),
    }
}

/// The ids and names of the rules of `policies`.
pub fn rule_names(policies: &[NetworkPolicy]) -> BTreeMap<u32, RuleName> {
    policies
        .iter()
        .flat_map(|p| parse_policy(p).rule_names().collect::<Vec<_>>())
        .collect()
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
mod tests;

#[cfg(test)]
mod engine_tests;

#[cfg(test)]
mod prefix_tests {
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
