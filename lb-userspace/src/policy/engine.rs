//! The NetworkPolicy side as an incremental engine: Pods, Namespaces,
//! NetworkPolicies and the node go in one change at a time; each marks
//! what it touches (the pod's own endpoint; the rules whose peers gain or
//! lose an identity, and so the endpoints of their policies; the pods of a
//! relabelled namespace), and `flush` recomputes only those endpoints
//! (`endpoint_entries`) and hands back the difference to write. Identities,
//! endpoint ids and rule ids are stable, so one change never renumbers the
//! cluster.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use lb_common::policy::{EndpointInfo, PolicyKey, IDENTITY_HOST};

use super::{
    endpoint::{endpoint_entries, Entries, NamedPorts, SelectorCache},
    identity::{within, Identities, IdentityKey},
    parse::{ParsedPolicy, Peer, PodFacts, PortSpec, Prefix},
    Labels, PolicyState, RuleName,
};
use crate::translate::{NodeContext, ObjectError};

/// A Pod or NetworkPolicy by (namespace, name).
pub type ObjectKey = (String, String);

/// What the maps must change: a value to write, or None to remove.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyDelta {
    pub ipcache: BTreeMap<(u32, u8), Option<u32>>,
    pub rules: BTreeMap<(PolicyKey, u8), Option<u32>>,
    pub endpoints: BTreeMap<u32, Option<EndpointInfo>>,
    pub peer_nodes: BTreeMap<u32, bool>,
}

impl PolicyDelta {
    pub fn len(&self) -> usize {
        self.ipcache.len() + self.rules.len() + self.endpoints.len() + self.peer_nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct PodEntry {
    facts: PodFacts,
    /// Held while the pod has an address.
    identity: Option<u32>,
}

/// The most endpoints (ids are 16-bit).
const MAX_ENDPOINTS: u32 = 65_535;

#[derive(Default)]
pub struct PolicyEngine {
    node: NodeContext,
    namespaces: BTreeMap<String, Labels>,
    pods: BTreeMap<ObjectKey, PodEntry>,
    policies: BTreeMap<ObjectKey, ParsedPolicy>,
    /// Every valid policy's CIDRs, with how many use each, and 0.0.0.0/0.
    cidr_users: BTreeMap<Prefix, usize>,
    identities: Identities,
    world: BTreeMap<Prefix, u32>,
    cache: SelectorCache,
    named: NamedPorts,
    /// (port name, protocol) -> the policies with an egress rule to it.
    named_rules: BTreeMap<(String, u8), BTreeSet<ObjectKey>>,
    by_ip: BTreeMap<Ipv4Addr, BTreeSet<ObjectKey>>,
    endpoint_ids: BTreeMap<ObjectKey, u16>,
    free_endpoint_ids: Vec<u16>,
    next_endpoint_id: u32,
    endpoints: BTreeMap<ObjectKey, (EndpointInfo, Entries)>,
    endpoint_errors: BTreeMap<ObjectKey, ObjectError>,
    state: PolicyState,
    delta: PolicyDelta,
    dirty_pods: BTreeSet<ObjectKey>,
    dirty_policies: BTreeSet<ObjectKey>,
    dirty_ips: BTreeSet<Ipv4Addr>,
}

impl PolicyEngine {
    pub fn new() -> Self {
        let mut engine = Self::default();
        engine.cidr_users.insert((Ipv4Addr::UNSPECIFIED, 0), 1);
        engine.refresh_world();
        engine
    }

    /// What the maps should hold.
    pub fn state(&self) -> &PolicyState {
        &self.state
    }

    pub fn has_pod(&self, key: &ObjectKey) -> bool {
        self.pods.contains_key(key)
    }

    pub fn pod_keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.pods.keys()
    }

    pub fn policy_keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.policies.keys()
    }

    pub fn namespace_names(&self) -> impl Iterator<Item = &String> {
        self.namespaces.keys()
    }

    pub fn policy_count(&self) -> usize {
        self.policies.len()
    }

    /// Rule ids and what they name.
    pub fn rule_names(&self) -> BTreeMap<u32, RuleName> {
        self.policies
            .values()
            .flat_map(|p| p.rule_names())
            .collect()
    }

    /// Objects that cannot be enforced as written.
    pub fn errors(&self) -> impl Iterator<Item = &ObjectError> {
        let policies = self.policies.values().flat_map(|p| &p.errors);
        policies.chain(self.endpoint_errors.values())
    }

    /// The node's addresses (the host identity) and its peers.
    pub fn set_node(&mut self, node: &NodeContext) {
        let old: BTreeSet<Ipv4Addr> = self.node.addrs.iter().copied().collect();
        self.dirty_ips
            .extend(old.iter().copied().chain(node.addrs.iter().copied()));
        let peers: BTreeSet<u32> = node.peers.iter().map(|a| u32::from(*a).to_be()).collect();
        for gone in self.state.peer_nodes.clone().difference(&peers) {
            self.state.peer_nodes.remove(gone);
            self.delta.peer_nodes.insert(*gone, false);
        }
        for new in peers.difference(&self.state.peer_nodes.clone()) {
            self.state.peer_nodes.insert(*new);
            self.delta.peer_nodes.insert(*new, true);
        }
        self.node = node.clone();
    }

    /// A Namespace's labels changed (None: it is gone): its pods'
    /// identities change with them.
    pub fn set_namespace(&mut self, name: &str, labels: Option<Labels>) {
        let old = self.namespaces.get(name).cloned();
        if old == labels {
            return;
        }
        match labels {
            Some(l) => self.namespaces.insert(name.to_string(), l),
            None => self.namespaces.remove(name),
        };
        let pods: Vec<ObjectKey> = self.pods_in(name).cloned().collect();
        for key in pods {
            let facts = self.pods.get(&key).map(|p| p.facts.clone());
            self.change_pod(&key, facts);
        }
    }

    /// A Pod changed (None: it is gone).
    pub fn set_pod(&mut self, key: &ObjectKey, facts: Option<PodFacts>) {
        if self.pods.get(key).map(|p| &p.facts) == facts.as_ref() {
            return;
        }
        self.change_pod(key, facts);
    }

    /// A NetworkPolicy changed (None: it is gone).
    pub fn set_policy(&mut self, key: &ObjectKey, policy: Option<ParsedPolicy>) {
        if self.policies.get(key) == policy.as_ref() {
            return;
        }
        let old_cidrs: BTreeSet<Prefix> = self.cidr_users.keys().copied().collect();
        if let Some(old) = self.policies.remove(key) {
            self.mark_selected_pods(&old);
            for (_, users) in self.named_rules.iter_mut() {
                users.remove(key);
            }
            self.cache.retain(|(p, _, _), _| p != key);
            for c in &old.cidrs {
                if let Some(n) = self.cidr_users.get_mut(c) {
                    *n -= 1;
                    if *n == 0 {
                        self.cidr_users.remove(c);
                    }
                }
            }
        }
        if let Some(new) = policy {
            for c in &new.cidrs {
                *self.cidr_users.entry(*c).or_default() += 1;
            }
            self.mark_selected_pods(&new);
            for name in named_egress_ports(&new) {
                self.named_rules
                    .entry(name)
                    .or_default()
                    .insert(key.clone());
            }
            self.policies.insert(key.clone(), new);
            self.fill_cache(key);
        }
        let cidrs: BTreeSet<Prefix> = self.cidr_users.keys().copied().collect();
        if cidrs != old_cidrs {
            // Identities are made of the CIDRs that contain them: every
            // pod's may change, and the world's prefixes do.
            let keys: Vec<ObjectKey> = self.pods.keys().cloned().collect();
            for k in keys {
                let facts = self.pods.get(&k).map(|p| p.facts.clone());
                self.change_pod(&k, facts);
            }
            self.refresh_world();
        }
    }

    /// Recomputes what the changes since the last call touched; the
    /// difference to write into the maps (the state is updated).
    pub fn flush(&mut self) -> PolicyDelta {
        for key in std::mem::take(&mut self.dirty_policies) {
            if let Some(policy) = self.policies.get(&key) {
                let selected = self.pods_selected_by(policy);
                self.dirty_pods.extend(selected);
            }
        }
        for key in std::mem::take(&mut self.dirty_pods) {
            self.refresh_endpoint(&key);
        }
        for ip in std::mem::take(&mut self.dirty_ips) {
            self.refresh_ip(ip);
        }
        std::mem::take(&mut self.delta)
    }

    fn pods_in<'a>(&'a self, ns: &str) -> impl Iterator<Item = &'a ObjectKey> + 'a {
        let start = (ns.to_string(), String::new());
        let ns = ns.to_string();
        self.pods
            .range(start..)
            .map(|(k, _)| k)
            .take_while(move |k| k.0 == ns)
    }

    fn mark_selected_pods(&mut self, policy: &ParsedPolicy) {
        let selected = self.pods_selected_by(policy);
        self.dirty_pods.extend(selected);
    }

    fn pods_selected_by(&self, policy: &ParsedPolicy) -> Vec<ObjectKey> {
        self.pods_in(&policy.namespace)
            .filter(|k| {
                self.pods
                    .get(*k)
                    .is_some_and(|p| policy.selects_pod(&p.facts.namespace, &p.facts.labels))
            })
            .cloned()
            .collect()
    }

    /// Replaces a pod's facts and identity, whatever they were.
    fn change_pod(&mut self, key: &ObjectKey, facts: Option<PodFacts>) {
        // The new identity is taken before the old is given up, so that an
        // unchanged one keeps its id and its rules.
        let new_identity = facts.as_ref().and_then(|f| {
            let ip = f.ip?;
            Some(self.acquire(self.pod_identity_key(f, ip)))
        });
        if let Some(old) = self.pods.remove(key) {
            if let Some(ip) = old.facts.ip {
                if let Some(owners) = self.by_ip.get_mut(&ip) {
                    owners.remove(key);
                    if owners.is_empty() {
                        self.by_ip.remove(&ip);
                    }
                }
                self.dirty_ips.insert(ip);
            }
            if let Some(id) = old.identity {
                self.name_ports(&old.facts, id, false);
                self.release(id);
            }
        }
        if let Some(facts) = facts {
            if let Some(ip) = facts.ip {
                self.by_ip.entry(ip).or_default().insert(key.clone());
                self.dirty_ips.insert(ip);
            }
            if let Some(id) = new_identity {
                self.name_ports(&facts, id, true);
            }
            self.pods.insert(
                key.clone(),
                PodEntry {
                    facts,
                    identity: new_identity,
                },
            );
        }
        self.dirty_pods.insert(key.clone());
    }

    fn pod_identity_key(&self, f: &PodFacts, ip: Ipv4Addr) -> IdentityKey {
        let cidrs: BTreeSet<Prefix> = self.cidr_users.keys().copied().collect();
        IdentityKey::Pod {
            namespace: f.namespace.clone(),
            ns_labels: self
                .namespaces
                .get(&f.namespace)
                .cloned()
                .unwrap_or_default(),
            labels: f.labels.clone(),
            cidrs: within(&cidrs, (ip, 32)),
        }
    }

    /// Takes an identity; a new one joins the selector cache.
    fn acquire(&mut self, key: IdentityKey) -> u32 {
        let (id, new) = self.identities.acquire(key);
        if new {
            let keys: Vec<ObjectKey> = self.policies.keys().cloned().collect();
            for policy in keys {
                self.cache_identity(&policy, id);
            }
        }
        id
    }

    /// Gives an identity up; one no one holds leaves the selector cache.
    fn release(&mut self, id: u32) {
        if self.identities.release(id).is_none() {
            return;
        }
        for ((policy, _, _), ids) in self.cache.iter_mut() {
            if ids.remove(&id) {
                self.dirty_policies.insert(policy.clone());
            }
        }
    }

    /// Adds identity `id` to the cached sets of `policy`'s rules whose
    /// peers select it; their endpoints are then recomputed.
    fn cache_identity(&mut self, policy: &ObjectKey, id: u32) {
        let (Some(p), Some(key)) = (self.policies.get(policy), self.identities.key(id)) else {
            return;
        };
        let mut hit = false;
        for rule in &p.rules {
            let Some(peers) = &rule.peers else { continue };
            if peers
                .iter()
                .any(|peer| peer_selects(peer, &p.namespace, key))
            {
                self.cache
                    .entry((policy.clone(), rule.direction, rule.index))
                    .or_default()
                    .insert(id);
                hit = true;
            }
        }
        if hit {
            self.dirty_policies.insert(policy.clone());
        }
    }

    /// Caches what a new or changed policy's rules select, over every
    /// identity.
    fn fill_cache(&mut self, policy: &ObjectKey) {
        if let Some(p) = self.policies.get(policy) {
            for rule in p.rules.iter().filter(|r| r.peers.is_some()) {
                self.cache.insert(
                    (policy.clone(), rule.direction, rule.index),
                    BTreeSet::new(),
                );
            }
        }
        let ids: Vec<u32> = self.identities.iter().map(|(id, _)| id).collect();
        for id in ids {
            self.cache_identity(policy, id);
        }
    }

    /// Counts a pod's named ports in (or out of) the index egress rules
    /// read; the policies with such a rule for one of them are recomputed.
    fn name_ports(&mut self, facts: &PodFacts, identity: u32, add: bool) {
        for (name, proto, port) in &facts.named_ports {
            let by_identity = self.named.entry((name.clone(), *proto)).or_default();
            let ports = by_identity.entry(identity).or_default();
            let n = ports.entry(*port).or_default();
            if add {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    ports.remove(port);
                    if ports.is_empty() {
                        by_identity.remove(&identity);
                    }
                }
            }
            if let Some(policies) = self.named_rules.get(&(name.clone(), *proto)) {
                self.dirty_policies.extend(policies.iter().cloned());
            }
        }
    }

    /// The world's identities, one per policy CIDR, and their ipcache entries.
    fn refresh_world(&mut self) {
        let cidrs: BTreeSet<Prefix> = self.cidr_users.keys().copied().collect();
        let old = std::mem::take(&mut self.world);
        for c in &cidrs {
            let id = self.acquire(IdentityKey::World {
                prefix: *c,
                cidrs: within(&cidrs, *c),
            });
            self.world.insert(*c, id);
        }
        for (prefix, id) in old {
            self.release(id);
            if prefix.1 == 32 {
                self.dirty_ips.insert(prefix.0);
            } else if !self.world.contains_key(&prefix) {
                self.put_ipcache((u32::from(prefix.0).to_be(), prefix.1), None);
            }
        }
        for (prefix, id) in self.world.clone() {
            if prefix.1 == 32 {
                // A /32 policy CIDR can be a pod's or the node's address.
                self.dirty_ips.insert(prefix.0);
            } else {
                self.put_ipcache((u32::from(prefix.0).to_be(), prefix.1), Some(id));
            }
        }
    }

    /// A pod's endpoint: its id, isolation and entries, from scratch.
    fn refresh_endpoint(&mut self, key: &ObjectKey) {
        let want = self
            .pods
            .get(key)
            .filter(|p| p.facts.scheduled && p.facts.ip.is_some())
            .map(|p| p.facts.clone());
        let old = self
            .endpoints
            .remove(key)
            .map(|(_, e)| e)
            .unwrap_or_default();
        let mut new = None;
        match want {
            Some(facts) => match self.endpoint_id(key) {
                Some(id) => {
                    let ns_policies = self
                        .policies
                        .range((key.0.clone(), String::new())..)
                        .take_while(|(k, _)| k.0 == key.0)
                        .map(|(_, p)| p);
                    let (flags, entries) =
                        endpoint_entries(id, &facts, ns_policies, &self.cache, &self.named);
                    new = Some((
                        EndpointInfo {
                            endpoint_id: id,
                            flags,
                        },
                        entries,
                    ));
                    self.endpoint_errors.remove(key);
                }
                None => {
                    let message = "more than 65535 pods: no endpoint left for this one".into();
                    let object = format!("Pod {}/{}", key.0, key.1);
                    self.endpoint_errors
                        .insert(key.clone(), ObjectError { object, message });
                }
            },
            None => {
                self.endpoint_errors.remove(key);
                if let Some(id) = self.endpoint_ids.remove(key) {
                    self.free_endpoint_ids.push(id);
                }
            }
        }
        if let Some(ip) = self.pods.get(key).and_then(|p| p.facts.ip) {
            self.dirty_ips.insert(ip);
        }
        let empty = Entries::new();
        let entries = new.as_ref().map_or(&empty, |(_, e)| e);
        let changed: Vec<((PolicyKey, u8), Option<u32>)> = entries
            .iter()
            .filter(|(k, rule)| old.get(k) != Some(rule))
            .map(|(k, rule)| (*k, Some(*rule)))
            .chain(
                old.keys()
                    .filter(|k| !entries.contains_key(k))
                    .map(|k| (*k, None)),
            )
            .collect();
        for (k, v) in changed {
            self.put_rule(k, v);
        }
        if let Some(endpoint) = new {
            self.endpoints.insert(key.clone(), endpoint);
        }
    }

    /// The pod's endpoint id, allocated on first use; None when all are taken.
    fn endpoint_id(&mut self, key: &ObjectKey) -> Option<u16> {
        if let Some(id) = self.endpoint_ids.get(key) {
            return Some(*id);
        }
        let id = match self.free_endpoint_ids.pop() {
            Some(id) => id,
            None if self.next_endpoint_id < MAX_ENDPOINTS => {
                self.next_endpoint_id += 1;
                self.next_endpoint_id as u16
            }
            None => return None,
        };
        self.endpoint_ids.insert(key.clone(), id);
        Some(id)
    }

    /// The ipcache and endpoint entries of one address: the node's (host
    /// identity) before a /32 policy CIDR's, before a pod's; the endpoint
    /// of the first pod (by namespace and name) that has one there.
    fn refresh_ip(&mut self, ip: Ipv4Addr) {
        let owners: Vec<&ObjectKey> = self.by_ip.get(&ip).into_iter().flatten().collect();
        let identity = if self.node.addrs.contains(&ip) {
            Some(IDENTITY_HOST)
        } else if let Some(id) = self.world.get(&(ip, 32)) {
            Some(*id)
        } else {
            owners.iter().find_map(|k| self.pods.get(*k)?.identity)
        };
        let endpoint = owners
            .iter()
            .find_map(|k| self.endpoints.get(*k).map(|(info, _)| *info));
        let addr = u32::from(ip).to_be();
        self.put_ipcache((addr, 32), identity);
        self.put_endpoint(addr, endpoint);
    }

    fn put_ipcache(&mut self, k: (u32, u8), v: Option<u32>) {
        put(&mut self.state.ipcache, &mut self.delta.ipcache, k, v);
    }

    fn put_endpoint(&mut self, addr: u32, v: Option<EndpointInfo>) {
        put(
            &mut self.state.endpoints,
            &mut self.delta.endpoints,
            addr,
            v,
        );
    }

    fn put_rule(&mut self, k: (PolicyKey, u8), v: Option<u32>) {
        put(&mut self.state.rules, &mut self.delta.rules, k, v);
    }
}

/// Sets `k` to `v` (None: removes it) in a map of the state, and records
/// it in the delta when that changed the map.
fn put<K: Ord + Copy, V: PartialEq + Copy>(
    state: &mut BTreeMap<K, V>,
    delta: &mut BTreeMap<K, Option<V>>,
    k: K,
    v: Option<V>,
) {
    if state.get(&k) == v.as_ref() {
        return;
    }
    match v {
        Some(v) => state.insert(k, v),
        None => state.remove(&k),
    };
    delta.insert(k, v);
}

/// Whether a rule's peer of a policy in `policy_ns` selects an identity.
fn peer_selects(peer: &Peer, policy_ns: &str, key: &IdentityKey) -> bool {
    match (peer, key) {
        (Peer::Block(b), _) => b.matches(key.cidrs()),
        (
            Peer::Pods { .. },
            IdentityKey::Pod {
                namespace,
                ns_labels,
                labels,
                ..
            },
        ) => peer.selects_pods(policy_ns, namespace, ns_labels, labels),
        (Peer::Pods { .. }, IdentityKey::World { .. }) => false,
    }
}

/// The (port name, protocol) pairs a policy's egress rules name.
fn named_egress_ports(p: &ParsedPolicy) -> BTreeSet<(String, u8)> {
    p.rules
        .iter()
        .filter(|r| r.direction != lb_common::policy::DIR_INGRESS)
        .flat_map(|r| &r.ports)
        .filter_map(|s| match s {
            PortSpec::Named(proto, name) => Some((name.clone(), *proto)),
            _ => None,
        })
        .collect()
}
