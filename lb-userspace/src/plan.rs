//! The differ: from what the maps hold and what they should hold, the map
//! writes to make, in an order that never shows a half-updated Service.
//!
//! Order (Cilium's): new backends, then backend slots, then Maglev tables,
//! then each slot-0 master entry with its count, then removals (masters of removed services, surplus
//! slots, unreferenced backends). A reader sees either the old or the new
//! service, never a count that points at slots not yet written.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use hashbrown::{HashMap, HashSet};
use lb_common::{
    backend::{Backend, BACKEND_F_LOCAL},
    service::{maglev_table_size, RevNatId, ServiceKey, ServiceValue, SERVICE_F_AFFINITY},
};

use crate::{
    maglev,
    translate::{BackendAddr, DesiredService},
};

/// One Maglev table: a backend slot per entry.
pub type MaglevTable = std::sync::Arc<Vec<u32>>;

/// What the service, backend and Maglev maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    /// Maglev tables by rev-NAT id: one backend slot (1..=count) per entry.
    /// For the maps, the contents are what this agent wrote (it does not
    /// read 16381-entry tables back); a table it did not write is empty here.
    /// Shared, not copied: with 10,000 Services a pass would otherwise copy
    /// and compare 40 MB of tables that did not change.
    pub maglev: BTreeMap<RevNatId, MaglevTable>,
    /// loadBalancerSourceRanges: (rev-NAT id, prefix (network byte order), length).
    pub source_ranges: BTreeSet<(RevNatId, u32, u8)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(u32, Backend),
    PutService(ServiceKey, ServiceValue),
    /// Replace a Service's whole Maglev table at once (create, fill, swap).
    PutMaglev(RevNatId, MaglevTable),
    DeleteMaglev(RevNatId),
    PutSourceRange(RevNatId, u32, u8),
    DeleteSourceRange(RevNatId, u32, u8),
    DeleteService(ServiceKey),
    DeleteBackend(u32),
}

pub fn backend_value(b: &BackendAddr) -> Backend {
    Backend {
        addr: u32::from(b.ip).to_be(),
        port: b.port.to_be(),
        proto: b.proto,
        flags: if b.local { BACKEND_F_LOCAL } else { 0 },
    }
}

pub fn backend_addr(b: &Backend) -> BackendAddr {
    BackendAddr {
        ip: Ipv4Addr::from(u32::from_be(b.addr)),
        port: u16::from_be(b.port),
        proto: b.proto,
        local: b.flags & BACKEND_F_LOCAL != 0,
    }
}

pub fn service_key(vip: Ipv4Addr, port: u16, proto: u8, slot: u16) -> ServiceKey {
    ServiceKey::new(u32::from(vip).to_be(), port.to_be(), proto, slot)
}

/// How many entries the Service maps take.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub services: usize,
    pub backends: usize,
    pub maglev_tables: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        use lb_common::service::{BACKENDS_MAX_ENTRIES, MAGLEV_MAX_TABLES, SERVICES_MAX_ENTRIES};
        Self {
            services: SERVICES_MAX_ENTRIES as usize,
            backends: BACKENDS_MAX_ENTRIES as usize,
            maglev_tables: MAGLEV_MAX_TABLES as usize,
        }
    }
}

/// The error of a Service (`namespace/name`) left out whole because `map`
/// (of `size` entries) would overflow; `is_map_full` recognises it.
pub fn map_full_error(service: &str, map: &str, size: usize) -> crate::translate::ObjectError {
    crate::translate::ObjectError {
        object: format!("Service {service}"),
        message: format!("map {map} is full ({size} entries): not programmed"),
    }
}

/// Whether an error is `map_full_error`'s.
pub fn is_map_full(e: &crate::translate::ObjectError) -> bool {
    e.message.starts_with("map ") && e.message.ends_with(" entries): not programmed")
}

/// Keeps the Services that fit in the maps, in the order given, whole: a
/// Service whose frontends would overflow a map is left out with all of
/// them (never half-programmed), with an error naming the full map.
pub fn fit_to_capacity(
    services: Vec<DesiredService>,
    cap: &Capacity,
) -> (Vec<DesiredService>, Vec<crate::translate::ObjectError>) {
    if fits_whole(&services, cap) {
        return (services, Vec::new());
    }
    let object = |s: &DesiredService| s.name.split(':').next().unwrap_or_default().to_string();
    let mut groups: Vec<(String, Vec<DesiredService>)> = Vec::new();
    for s in services {
        let name = object(&s);
        match groups.last_mut() {
            Some((n, g)) if *n == name => g.push(s),
            _ => groups.push((name, vec![s])),
        }
    }
    let (mut entries, mut tables) = (0usize, 0usize);
    let mut backends: BTreeSet<BackendAddr> = BTreeSet::new();
    let (mut kept, mut errors) = (Vec::new(), Vec::new());
    for (name, group) in groups {
        let more_entries: usize = group
            .iter()
            .map(|s| 1 + s.backends.len() + s.retained.len())
            .sum();
        // ClusterIP frontends have no table (`wants_maglev`).
        let more_tables = group
            .iter()
            .filter(|s| !s.backends.is_empty() && wants_maglev(s.flags))
            .count();
        let new_backends: BTreeSet<BackendAddr> = group
            .iter()
            .flat_map(|s| s.backends.iter().chain(&s.retained))
            .filter(|b| !backends.contains(b))
            .copied()
            .collect();
        let full = if entries + more_entries > cap.services {
            Some(("SERVICES", cap.services))
        } else if backends.len() + new_backends.len() > cap.backends {
            Some(("BACKENDS", cap.backends))
        } else if tables + more_tables > cap.maglev_tables {
            Some(("MAGLEV", cap.maglev_tables))
        } else {
            None
        };
        if let Some((map, size)) = full {
            errors.push(map_full_error(&name, map, size));
            continue;
        }
        entries += more_entries;
        tables += more_tables;
        backends.extend(new_backends);
        kept.extend(group);
    }
    (kept, errors)
}

/// Whether every frontend fits even counting each backend once per
/// frontend that has it (more than the distinct backends the map holds):
/// the common case, decided without the per-Service accounting (50 ms of
/// a first pass at 10,000 Services).
fn fits_whole(services: &[DesiredService], cap: &Capacity) -> bool {
    let (mut entries, mut backends, mut tables) = (0usize, 0usize, 0usize);
    for s in services {
        let used = s.backends.len() + s.retained.len();
        entries += 1 + used;
        backends += used;
        tables += usize::from(!s.backends.is_empty() && wants_maglev(s.flags));
    }
    entries <= cap.services && backends <= cap.backends && tables <= cap.maglev_tables
}

/// Backend and reverse-NAT ids in use, by what they stand for. A backend
/// id is never reused for another address (ids only grow); a rev-NAT id
/// is taken again only once free (after 4 billion frontends).
#[derive(Clone, Debug, Default)]
pub struct Ids {
    backends: HashMap<BackendAddr, u32>,
    next_backend: u32,
    rev_nat: HashMap<(u32, u16, u8), RevNatId>,
    rev_nat_used: HashSet<RevNatId>,
    next_rev_nat: RevNatId,
}

impl Ids {
    /// The ids a map state uses.
    pub fn of(state: &MapState) -> Self {
        let mut ids = Self {
            backends: state
                .backends
                .iter()
                .map(|(id, b)| (backend_addr(b), *id))
                .collect(),
            next_backend: state.backends.keys().next_back().map_or(1, |m| m + 1),
            ..Default::default()
        };
        for (k, v) in state.services.iter().filter(|(k, _)| k.slot == 0) {
            ids.rev_nat.insert((k.addr, k.port, k.proto), v.rev_nat_id);
            ids.rev_nat_used.insert(v.rev_nat_id);
        }
        ids.next_rev_nat = ids
            .rev_nat_used
            .iter()
            .max()
            .map_or(1, |m| m.wrapping_add(1).max(1));
        ids
    }

    fn backend(&mut self, b: &BackendAddr) -> u32 {
        let next = &mut self.next_backend;
        *self.backends.entry(*b).or_insert_with(|| {
            let id = (*next).max(1);
            *next = id + 1;
            id
        })
    }

    /// A backend's id, if it has one.
    pub fn existing_backend(&self, b: &BackendAddr) -> Option<u32> {
        self.backends.get(b).copied()
    }

    fn rev_nat(&mut self, master: &ServiceKey) -> RevNatId {
        let frontend = (master.addr, master.port, master.proto);
        if let Some(id) = self.rev_nat.get(&frontend) {
            return *id;
        }
        // The next id not in use (far fewer frontends than ids).
        let mut id = self.next_rev_nat.max(1);
        for _ in 0..u32::MAX {
            if !self.rev_nat_used.contains(&id) {
                break;
            }
            id = id.wrapping_add(1).max(1);
        }
        self.next_rev_nat = id.wrapping_add(1).max(1);
        self.rev_nat.insert(frontend, id);
        self.rev_nat_used.insert(id);
        id
    }

    /// A backend no Service uses any more.
    pub fn forget_backend(&mut self, b: &BackendAddr) {
        self.backends.remove(b);
    }

    /// A frontend that is gone.
    pub fn forget_frontend(&mut self, master: &ServiceKey) {
        if let Some(id) = self
            .rev_nat
            .remove(&(master.addr, master.port, master.proto))
        {
            self.rev_nat_used.remove(&id);
        }
    }
}

impl MapState {
    /// The entries of some frontends (master keys): their slots, Maglev
    /// tables and source ranges, and the given backends.
    pub fn fragment(&self, masters: &[ServiceKey], backends: &BTreeSet<u32>) -> MapState {
        let mut out = MapState::default();
        for master in masters {
            let Some(v) = self.services.get(master) else {
                continue;
            };
            out.services.insert(*master, *v);
            for slot in 1..=v.count {
                let k = ServiceKey { slot, ..*master };
                if let Some(sv) = self.services.get(&k) {
                    out.services.insert(k, *sv);
                }
            }
            if let Some(t) = self.maglev.get(&v.rev_nat_id) {
                out.maglev.insert(v.rev_nat_id, t.clone());
            }
            let id = v.rev_nat_id;
            out.source_ranges.extend(
                self.source_ranges
                    .range((id, 0, 0)..=(id, u32::MAX, u8::MAX))
                    .copied(),
            );
        }
        for id in backends {
            if let Some(b) = self.backends.get(id) {
                out.backends.insert(*id, *b);
            }
        }
        out
    }

    /// The state after `ops`, as the maps are once they are applied.
    pub fn apply(&mut self, ops: &[MapOp]) {
        for op in ops {
            match op {
                MapOp::PutBackend(id, b) => {
                    self.backends.insert(*id, *b);
                }
                MapOp::PutService(k, v) => {
                    self.services.insert(*k, *v);
                }
                MapOp::DeleteService(k) => {
                    self.services.remove(k);
                }
                MapOp::DeleteBackend(id) => {
                    self.backends.remove(id);
                }
                MapOp::PutMaglev(id, table) => {
                    self.maglev.insert(*id, table.clone());
                }
                MapOp::DeleteMaglev(id) => {
                    self.maglev.remove(id);
                }
                MapOp::PutSourceRange(id, addr, len) => {
                    self.source_ranges.insert((*id, *addr, *len));
                }
                MapOp::DeleteSourceRange(id, addr, len) => {
                    self.source_ranges.remove(&(*id, *addr, *len));
                }
            }
        }
    }
}

/// Computes the full desired contents of the maps. Backend ids and
/// reverse-NAT ids already in `current` are kept; new ones take the next free
/// number, so an id is never reused for another address while in use.
pub fn desired_state(current: &MapState, desired: &[DesiredService]) -> MapState {
    desired_state_with(current, &mut Ids::of(current), desired)
}

/// `desired_state` for some frontends, with ids from `ids` (which keeps
/// those it hands out): slots stay where `current` has them.
pub fn desired_state_with(
    current: &MapState,
    ids: &mut Ids,
    desired: &[DesiredService],
) -> MapState {
    let mut out = MapState::default();
    // Entries gathered, then each tree built at once from them: inserted
    // one by one in key order, a B-tree splits every full node into two
    // half-empty ones (647 bytes per Service of 11 entries, where a tree
    // built whole takes about 330). Later entries of a key win, as inserts.
    // Sized at once: grown by doubling, each step held the old block and
    // the new one together (the first pass's peak at 10,000 Services).
    let slots: usize = desired.iter().map(|d| d.backends.len() + 1).sum();
    let addrs: usize = desired
        .iter()
        .map(|d| d.backends.len() + d.retained.len())
        .sum();
    let mut services: Vec<(ServiceKey, ServiceValue)> = Vec::with_capacity(slots);
    let mut backend_entries: Vec<(u32, Backend)> = Vec::with_capacity(addrs);
    for svc in desired {
        let master = service_key(svc.vip, svc.port, svc.proto, 0);
        let rev_nat_id = ids.rev_nat(&master);
        let count = u16::try_from(svc.backends.len()).unwrap_or(u16::MAX);
        let backends = &svc.backends[..usize::from(count)];
        let slots = stable_slots(current, &master, backends);
        for (i, b) in slots.iter().enumerate() {
            let id = ids.backend(b);
            backend_entries.push((id, backend_value(b)));
            let slot = service_key(svc.vip, svc.port, svc.proto, i as u16 + 1);
            services.push((
                slot,
                ServiceValue {
                    backend_id: id,
                    rev_nat_id,
                    ..Default::default()
                },
            ));
        }
        if count > 0 && wants_maglev(svc.flags) {
            // The same backends in the same slots: the table written before
            // is still right (building one costs far more than copying it).
            let size = maglev_table_size(backends.len()) as usize;
            let written = current
                .maglev
                .get(&rev_nat_id)
                .filter(|t| t.len() == size && current_slots(current, &master) == slots);
            let table = match written {
                Some(t) => t.clone(),
                None => MaglevTable::new(maglev_slots(backends, &slots)),
            };
            out.maglev.insert(rev_nat_id, table);
        }
        for (addr, len) in &svc.source_ranges {
            out.source_ranges
                .insert((rev_nat_id, u32::from(*addr).to_be(), *len));
        }
        // Not-ready endpoints keep the id they have (flows may point at it)
        // but get none if they never had one: no flow can be on them.
        for b in &svc.retained {
            if let Some(id) = ids.existing_backend(b) {
                backend_entries.push((id, backend_value(b)));
            }
        }
        services.push((
            master,
            ServiceValue {
                backend_id: 0,
                count,
                flags: svc.flags
                    | if svc.affinity_timeout.is_some() {
                        SERVICE_F_AFFINITY
                    } else {
                        0
                    },
                rev_nat_id,
                maglev_size: out.maglev.get(&rev_nat_id).map_or(0, |t| t.len() as u16),
                affinity_timeout: svc.affinity_timeout.unwrap_or(0),
                ..Default::default()
            },
        ));
    }
    out.services = services.into_iter().collect();
    out.backends = backend_entries.into_iter().collect();
    out
}

/// Whether a frontend gets a Maglev table. A ClusterIP is reached only by
/// pods on this node, whose flows conntrack pins to their backend: the hash
/// over the slots does (as Cilium keeps Maglev for north-south traffic).
/// Every other frontend may be reached through any node, and after a
/// backend change (or a node's conntrack lost) the nodes must still agree,
/// moving few flows: Maglev does that. A table costs 4 KiB of kernel memory
/// and a map-in-map update (an RCU wait) per change; at 100,000 ClusterIPs
/// that was 400 MiB and most of the initial sync.
pub fn wants_maglev(flags: u16) -> bool {
    flags & lb_common::service::SERVICE_F_CLUSTER_IP == 0
}

/// A Service's Maglev table, as the slot (1..=count) of each entry's backend.
fn maglev_slots(backends: &[BackendAddr], slots: &[BackendAddr]) -> Vec<u32> {
    // Names in address order, so every node builds the same table.
    let names: Vec<String> = backends
        .iter()
        .map(|b| format!("{}:{}", b.ip, b.port))
        .collect();
    let table = maglev::table(&names, maglev_table_size(names.len()));
    let slot_of = |b: &BackendAddr| {
        slots
            .iter()
            .position(|s| s == b)
            .map_or(0, |p| p as u32 + 1)
    };
    table
        .iter()
        .map(|i| slot_of(&backends[*i as usize]))
        .collect()
}

/// The backends in a Service's slots (1..=count) now.
fn current_slots(current: &MapState, master: &ServiceKey) -> Vec<BackendAddr> {
    let count = current.services.get(master).map_or(0, |v| v.count);
    (1..=count)
        .filter_map(|slot| {
            let key = ServiceKey { slot, ..*master };
            current
                .services
                .get(&key)
                .and_then(|v| current.backends.get(&v.backend_id))
                .map(backend_addr)
        })
        .collect()
}

/// The order of a Service's backends in its slots: a backend keeps the slot
/// it has while it stays (so session affinity and established slot
/// references survive other backends coming and going); new ones fill the
/// free slots.
fn stable_slots(
    current: &MapState,
    master: &ServiceKey,
    backends: &[BackendAddr],
) -> Vec<BackendAddr> {
    let n = backends.len();
    let mut slots: Vec<Option<BackendAddr>> = vec![None; n];
    let old_count = current.services.get(master).map_or(0, |v| v.count);
    for slot in 1..=old_count {
        let key = ServiceKey { slot, ..*master };
        let Some(b) = current
            .services
            .get(&key)
            .and_then(|v| current.backends.get(&v.backend_id))
            .map(backend_addr)
        else {
            continue;
        };
        if usize::from(slot) <= n && backends.contains(&b) && !slots.contains(&Some(b)) {
            slots[usize::from(slot) - 1] = Some(b);
        }
    }
    let placed: Vec<BackendAddr> = slots.iter().flatten().copied().collect();
    let mut rest = backends.iter().filter(|b| !placed.contains(b));
    slots
        .into_iter()
        .map(|s| s.or_else(|| rest.next().copied()))
        .collect::<Option<Vec<_>>>()
        .unwrap_or_else(|| backends.to_vec())
}

/// The ordered writes that turn `current` into `desired`.
pub fn plan(current: &MapState, desired: &MapState) -> Vec<MapOp> {
    let mut ops = Vec::new();
    let Ok(()) = plan_each(current, desired, &mut |op| {
        ops.push(op);
        Ok::<(), std::convert::Infallible>(())
    });
    ops
}

/// `plan`, handing each op to `emit` as it is decided (which may write
/// them a chunk at a time); stops at `emit`'s first error.
pub fn plan_each<E>(
    current: &MapState,
    desired: &MapState,
    emit: &mut impl FnMut(MapOp) -> Result<(), E>,
) -> Result<(), E> {
    for (id, b) in &desired.backends {
        if current.backends.get(id) != Some(b) {
            emit(MapOp::PutBackend(*id, *b))?;
        }
    }
    // Source ranges before the master entry that enables them.
    for r in desired.source_ranges.difference(&current.source_ranges) {
        emit(MapOp::PutSourceRange(r.0, r.1, r.2))?;
    }
    let changed = |k: &ServiceKey, v: &ServiceValue| current.services.get(k) != Some(v);
    for (k, v) in desired.services.iter().filter(|(k, _)| k.slot != 0) {
        if changed(k, v) {
            emit(MapOp::PutService(*k, *v))?;
        }
    }
    // Maglev tables after the slots they name and before the master entries:
    // a packet that sees a new count already finds the table for it.
    // A table is rewritten when its content differs from what is known to
    // be in the map (after an agent restart nothing is known: each table is
    // rewritten once, atomically).
    for (id, table) in &desired.maglev {
        if current.maglev.get(id) != Some(table) {
            emit(MapOp::PutMaglev(*id, table.clone()))?;
        }
    }
    for (k, v) in desired.services.iter().filter(|(k, _)| k.slot == 0) {
        if changed(k, v) {
            emit(MapOp::PutService(*k, *v))?;
        }
    }
    let gone: BTreeSet<&ServiceKey> = current
        .services
        .keys()
        .filter(|k| !desired.services.contains_key(*k))
        .collect();
    for k in gone.iter().filter(|k| k.slot == 0) {
        emit(MapOp::DeleteService(**k))?;
    }
    for id in current.maglev.keys() {
        if !desired.maglev.contains_key(id) {
            emit(MapOp::DeleteMaglev(*id))?;
        }
    }
    for k in gone.iter().filter(|k| k.slot != 0) {
        emit(MapOp::DeleteService(**k))?;
    }
    for id in current.backends.keys() {
        if !desired.backends.contains_key(id) {
            emit(MapOp::DeleteBackend(*id))?;
        }
    }
    for r in current.source_ranges.difference(&desired.source_ranges) {
        emit(MapOp::DeleteSourceRange(r.0, r.1, r.2))?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "plan_tests.rs"]
pub(crate) mod tests;
