//! The policy entries of one endpoint, from the policies that select it:
//! a pure function of the pod, those policies, which identities each rule's
//! peers select (the selector cache) and which pods have which named port.
//! The engine calls it for the endpoints a change touches, and only those.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::policy::{
    PolicyKey, DIR_INGRESS, ENDPOINT_F_EGRESS_ISOLATED, ENDPOINT_F_INGRESS_ISOLATED,
};

use super::parse::{ParsedPolicy, PodFacts, PortSpec, Rule};

/// (key, port prefix bits) -> rule id: what the POLICY trie holds.
pub type Entries = BTreeMap<(PolicyKey, u8), u32>;

/// A rule, by its policy (namespace, name), direction and index.
pub type RuleRef = ((String, String), u8, usize);

/// The identities each rule's peers select; a rule with no peers (any
/// peer) has no set.
pub type SelectorCache = BTreeMap<RuleRef, BTreeSet<u32>>;

/// (port name, protocol) -> identity -> port -> pods with it: where an
/// egress rule's named port leads.
pub type NamedPorts = BTreeMap<(String, u8), BTreeMap<u32, BTreeMap<u16, usize>>>;

/// The endpoint's flags (`ENDPOINT_F_*`: isolation) and entries.
pub fn endpoint_entries<'a>(
    endpoint_id: u16,
    pod: &PodFacts,
    policies: impl Iterator<Item = &'a ParsedPolicy>,
    cache: &SelectorCache,
    named: &NamedPorts,
) -> (u16, Entries) {
    let mut flags = 0;
    let mut entries = Entries::new();
    for policy in policies.filter(|p| p.selects_pod(&pod.namespace, &pod.labels)) {
        if policy.ingress {
            flags |= ENDPOINT_F_INGRESS_ISOLATED;
        }
        if policy.egress {
            flags |= ENDPOINT_F_EGRESS_ISOLATED;
        }
        let policy_ref = (policy.namespace.clone(), policy.name.clone());
        for rule in &policy.rules {
            let selected = rule.peers.as_ref().map(|_| {
                cache
                    .get(&(policy_ref.clone(), rule.direction, rule.index))
                    .cloned()
                    .unwrap_or_default()
            });
            let mut put = |proto: u8, identity: u32, port: u16, bits: u8| {
                let key = PolicyKey {
                    endpoint_id,
                    direction: rule.direction,
                    proto,
                    identity,
                    port: port.to_be(),
                    pad0: 0,
                };
                entries.insert((key, bits), rule.id);
            };
            rule_entries(rule, pod, selected.as_ref(), named, &mut put);
        }
    }
    (flags, entries)
}

/// Calls `put(proto, identity, port, bits)` for each entry of `rule` at
/// `pod`, whose peers select `selected` (None: any identity, entry 0).
fn rule_entries(
    rule: &Rule,
    pod: &PodFacts,
    selected: Option<&BTreeSet<u32>>,
    named: &NamedPorts,
    put: &mut impl FnMut(u8, u32, u16, u8),
) {
    let idents: Vec<u32> = match selected {
        None => vec![0],
        Some(set) => set.iter().copied().collect(),
    };
    for spec in &rule.ports {
        match spec {
            PortSpec::Any => idents.iter().for_each(|id| put(0, *id, 0, 0)),
            PortSpec::AnyOf(proto) => idents.iter().for_each(|id| put(*proto, *id, 0, 0)),
            PortSpec::Ports(proto, prefixes) => {
                for id in &idents {
                    for (port, bits) in prefixes {
                        put(*proto, *id, *port, *bits);
                    }
                }
            }
            // A named port is the destination pod's: the local pod's for
            // ingress, each peer pod's for egress.
            PortSpec::Named(proto, name) if rule.direction == DIR_INGRESS => {
                if let Some(port) = pod.named_port(name, *proto) {
                    idents.iter().for_each(|id| put(*proto, *id, port, 16));
                }
            }
            PortSpec::Named(proto, name) => {
                let Some(by_identity) = named.get(&(name.clone(), *proto)) else {
                    continue;
                };
                for (identity, ports) in by_identity {
                    if selected.is_none_or(|s| s.contains(identity)) {
                        ports
                            .keys()
                            .for_each(|port| put(*proto, *identity, *port, 16));
                    }
                }
            }
        }
    }
}
