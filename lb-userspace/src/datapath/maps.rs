//! Typed handles on the data path's maps, and a snapshot of what they hold.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, HashOfMaps, LpmTrie, MapData, PerCpuArray},
    Ebpf,
};
use lb_common::{
    backend::Backend,
    conntrack::{ConntrackEntry, ConntrackKey},
    map_names,
    metrics::{reason, Counter},
    node::NodeConfig,
    policy::{EndpointInfo, IpcacheKey, PolicyEntry, PolicyKey},
    service::{RevNatId, ServiceKey, ServiceValue, SourceRange},
};

use crate::plan::{MapOp, MapState};

pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub conntrack: HashMap<MapData, ConntrackKey, ConntrackEntry>,
    pub metrics: PerCpuArray<MapData, Counter>,
    /// loadBalancerSourceRanges: (Service, client prefix).
    pub source_ranges: LpmTrie<MapData, SourceRange, u8>,
    /// NetworkPolicy: address/prefix -> identity.
    pub ipcache: LpmTrie<MapData, IpcacheKey, u32>,
    /// NetworkPolicy: pod address -> endpoint id and isolation.
    pub endpoints: HashMap<MapData, u32, EndpointInfo>,
    /// The other nodes' addresses (their SNATed flows were judged there).
    pub peer_nodes: HashMap<MapData, u32, u32>,
    /// NetworkPolicy: (endpoint, direction, proto, identity, port prefix) -> rule.
    pub policy: LpmTrie<MapData, PolicyKey, PolicyEntry>,
    /// This node's address and SNAT port range (one entry).
    pub node: Array<MapData, NodeConfig>,
    /// Tables this process wrote, so unchanged ones are not rewritten.
    maglev_written: BTreeMap<RevNatId, crate::plan::MaglevTable>,
    /// rev-NAT id -> the Service's Maglev table (an inner array map).
    pub maglev: HashOfMaps<MapData, u32, Array<MapData, u32>>,
    /// The kernel's id of the MAGLEV map, to open more handles on it.
    maglev_id: u32,
}

/// SNAT source ports (see `lb_common::node`).
pub use lb_common::node::{SNAT_PORT_COUNT, SNAT_PORT_MIN};

/// The MAGLEV map of the loaded object, without taking it.
fn take_maglev(ebpf: &Ebpf) -> Result<&aya::maps::Map> {
    ebpf.map(map_names::MAGLEV)
        .context("map MAGLEV missing from the object")
}

fn map_id(map: &aya::maps::Map) -> Result<u32> {
    let aya::maps::Map::HashOfMaps(data) = map else {
        anyhow::bail!("MAGLEV is not a hash of maps");
    };
    Ok(data.info()?.id())
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the object"))
}

impl Maps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            services: take(ebpf, map_names::SERVICES)?.try_into()?,
            backends: take(ebpf, map_names::BACKENDS)?.try_into()?,
            conntrack: take(ebpf, map_names::CONNTRACK)?.try_into()?,
            metrics: take(ebpf, map_names::METRICS)?.try_into()?,
            maglev_id: map_id(take_maglev(ebpf)?)?,
            maglev: take(ebpf, map_names::MAGLEV)?.try_into()?,
            maglev_written: BTreeMap::new(),
            node: take(ebpf, map_names::NODE)?.try_into()?,
            source_ranges: take(ebpf, map_names::SOURCE_RANGES)?.try_into()?,
            ipcache: take(ebpf, map_names::IPCACHE)?.try_into()?,
            endpoints: take(ebpf, map_names::ENDPOINTS)?.try_into()?,
            policy: take(ebpf, map_names::POLICY)?.try_into()?,
            peer_nodes: take(ebpf, map_names::PEER_NODES)?.try_into()?,
        })
    }

    /// Opens the maps an agent pinned in `dir` (for inspection and tests).
    pub fn open_pinned(dir: &std::path::Path) -> Result<Self> {
        use aya::maps::Map;
        let open = |name: &str| {
            let path = dir.join(name);
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
        };
        Ok(Self {
            services: Map::HashMap(open(map_names::SERVICES)?).try_into()?,
            backends: Map::HashMap(open(map_names::BACKENDS)?).try_into()?,
            conntrack: Map::LruHashMap(open(map_names::CONNTRACK)?).try_into()?,
            metrics: Map::PerCpuArray(open(map_names::METRICS)?).try_into()?,
            maglev_id: map_id(&Map::HashOfMaps(open(map_names::MAGLEV)?))?,
            maglev: Map::HashOfMaps(open(map_names::MAGLEV)?).try_into()?,
            maglev_written: BTreeMap::new(),
            node: Map::Array(open(map_names::NODE)?).try_into()?,
            source_ranges: Map::LpmTrie(open(map_names::SOURCE_RANGES)?).try_into()?,
            ipcache: Map::LpmTrie(open(map_names::IPCACHE)?).try_into()?,
            endpoints: Map::HashMap(open(map_names::ENDPOINTS)?).try_into()?,
            policy: Map::LpmTrie(open(map_names::POLICY)?).try_into()?,
            peer_nodes: Map::HashMap(open(map_names::PEER_NODES)?).try_into()?,
        })
    }

    /// What the service and backend maps hold now.
    pub fn state(&self) -> Result<MapState> {
        let mut state = MapState::default();
        // In batches: at 100,000 Services the maps hold over a million
        // entries, two system calls each through aya's iterator.
        super::batch::for_each_entry(&self.services, |k, v| {
            state.services.insert(*k, *v);
        })
        .context("reading the services map")?;
        super::batch::for_each_entry(&self.backends, |k, v| {
            state.backends.insert(*k, *v);
        })
        .context("reading the backends map")?;
        for key in self.maglev.keys() {
            let key = key.context("reading the maglev map")?;
            let id = key;
            state.maglev.insert(
                id,
                self.maglev_written.get(&id).cloned().unwrap_or_default(),
            );
        }
        for key in self.source_ranges.keys() {
            let key = key.context("reading the source ranges map")?;
            let d = key.data();
            state.source_ranges.insert((
                d.rev_nat_id,
                d.addr,
                key.prefix_len().saturating_sub(32) as u8,
            ));
        }
        Ok(state)
    }

    /// Applies operations in the order given (the planner orders them).
    pub fn apply(&mut self, ops: &[MapOp]) -> Result<()> {
        let mut rest = ops;
        while let Some(op) = rest.first() {
            // The planner writes each kind of entry together; a run of one
            // kind goes in as few system calls as the kernel allows.
            let kind = std::mem::discriminant(op);
            let run = rest
                .iter()
                .take_while(|o| std::mem::discriminant(*o) == kind)
                .count();
            let (now, later) = rest.split_at(run);
            rest = later;
            match op {
                MapOp::PutBackend(..) => put_run(&self.backends, now, "backends", |o| match o {
                    MapOp::PutBackend(id, b) => Some((*id, *b)),
                    _ => None,
                })?,
                MapOp::PutService(..) => {
                    put_run(&self.services, now, "service entries", |o| match o {
                        MapOp::PutService(k, v) => Some((*k, *v)),
                        _ => None,
                    })?
                }
                MapOp::DeleteService(..) => {
                    delete_run(&self.services, now, "service entries", |o| match o {
                        MapOp::DeleteService(k) => Some(*k),
                        _ => None,
                    })?
                }
                MapOp::DeleteBackend(..) => {
                    delete_run(&self.backends, now, "backends", |o| match o {
                        MapOp::DeleteBackend(id) => Some(*id),
                        _ => None,
                    })?
                }
                MapOp::PutMaglev(..) if run > 1 => self.put_maglev_run(now)?,
                _ => {
                    for op in now {
                        self.apply_one(op)
                            .with_context(|| format!("applying {op:?}"))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A run of table swaps at once: see `put_maglev_tables`.
    fn put_maglev_run(&mut self, run: &[MapOp]) -> Result<()> {
        let tables: Vec<(RevNatId, &crate::plan::MaglevTable)> = run
            .iter()
            .filter_map(|o| match o {
                MapOp::PutMaglev(id, t) => Some((*id, t)),
                _ => None,
            })
            .collect();
        for (id, _) in &tables {
            self.maglev_written.remove(id);
        }
        let done = put_maglev_tables(self.maglev_id, &tables);
        for ((id, table), ok) in tables.iter().zip(&done) {
            if ok.is_ok() {
                self.maglev_written.insert(*id, (*table).clone());
            }
        }
        if let Some((i, Err(e))) = done.into_iter().enumerate().find(|(_, r)| r.is_err()) {
            return Err(e).with_context(|| format!("writing the Maglev table of {}", tables[i].0));
        }
        Ok(())
    }

    /// One operation, one system call (or one table swap).
    fn apply_one(&mut self, op: &MapOp) -> Result<(), aya::maps::MapError> {
        match op {
            MapOp::PutBackend(id, b) => self.backends.insert(id, b, 0),
            MapOp::PutService(k, v) => self.services.insert(k, v, 0),
            MapOp::DeleteService(k) => ignore_missing(self.services.remove(k)),
            MapOp::DeleteBackend(id) => ignore_missing(self.backends.remove(id)),
            MapOp::PutMaglev(id, table) => {
                self.maglev_written.remove(id);
                put_maglev(&mut self.maglev, *id, table).inspect(|()| {
                    self.maglev_written.insert(*id, table.clone());
                })
            }
            MapOp::DeleteMaglev(id) => {
                self.maglev_written.remove(id);
                ignore_missing(self.maglev.remove(id))
            }
            MapOp::PutSourceRange(id, addr, len) => {
                self.source_ranges
                    .insert(&source_range_key(*id, *addr, *len), 1, 0)
            }
            MapOp::DeleteSourceRange(id, addr, len) => ignore_missing(
                self.source_ranges
                    .remove(&source_range_key(*id, *addr, *len)),
            ),
        }
    }

    /// Tells the data path this node's address (the SNAT source).
    pub fn set_node(&mut self, addr: Option<std::net::Ipv4Addr>) -> Result<()> {
        let cfg = NodeConfig {
            addr: addr.map_or(0, |a| u32::from(a).to_be()),
            snat_port_min: SNAT_PORT_MIN,
            snat_port_count: SNAT_PORT_COUNT,
        };
        if self.node.get(&0, 0).ok() != Some(cfg) {
            self.node.set(0, cfg, 0)?;
        }
        Ok(())
    }

    /// Packet counters summed over CPUs, by reason name.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, Counter>> {
        let mut out = BTreeMap::new();
        for (i, name) in reason::NAMES.iter().enumerate() {
            let per_cpu = self.metrics.get(&(i as u32), 0)?;
            let mut sum = Counter::default();
            for c in per_cpu.iter() {
                sum.packets += c.packets;
                sum.bytes += c.bytes;
            }
            out.insert(*name, sum);
        }
        Ok(out)
    }
}

/// Writes many tables at once. Swapping an inner map in makes the kernel
/// wait for an RCU grace period (milliseconds) before the update returns,
/// so one after another 10,000 Services would take minutes; from several
/// threads, each with its own handle on the map, the waits overlap.
fn put_maglev_tables(
    outer_id: u32,
    tables: &[(RevNatId, &crate::plan::MaglevTable)],
) -> Vec<Result<(), aya::maps::MapError>> {
    const THREADS: usize = 16;
    let chunk = tables.len().div_ceil(THREADS).max(1);
    std::thread::scope(|s| {
        let workers: Vec<_> = tables
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    let outer = MapData::from_id(outer_id).and_then(|d| {
                        HashOfMaps::<MapData, u32, Array<MapData, u32>>::try_from(
                            aya::maps::Map::HashOfMaps(d),
                        )
                    });
                    match outer {
                        Ok(mut outer) => part
                            .iter()
                            .map(|(id, table)| put_maglev(&mut outer, *id, table))
                            .collect::<Vec<_>>(),
                        Err(e) => {
                            let msg = e.to_string();
                            part.iter()
                                .map(|_| {
                                    Err(aya::maps::MapError::InvalidName {
                                        name: format!("MAGLEV (id {outer_id}): {msg}"),
                                    })
                                })
                                .collect()
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| {
                w.join().unwrap_or_else(|_| {
                    vec![Err(aya::maps::MapError::InvalidName {
                        name: "MAGLEV writer thread panicked".into(),
                    })]
                })
            })
            .collect()
    })
}

/// Cilium's create-fill-swap: a new inner table, filled completely, then
/// swapped in with one update, so a packet sees the old or the new table.
fn put_maglev(
    outer: &mut HashOfMaps<MapData, u32, Array<MapData, u32>>,
    id: RevNatId,
    table: &[u32],
) -> Result<(), aya::maps::MapError> {
    // BPF_F_INNER_MAP: inner tables may differ in size from the template.
    const BPF_F_INNER_MAP: u32 = 1 << 12;
    let size = u32::try_from(table.len()).map_err(|_| aya::maps::MapError::InvalidValueSize {
        size: table.len(),
        expected: 0,
    })?;
    let inner = Array::<MapData, u32>::create(size, BPF_F_INNER_MAP)?;
    super::batch::fill_array(&inner, table).map_err(|e| aya::maps::MapError::InvalidName {
        name: format!("filling Maglev table {id}: {e:#}"),
    })?;
    outer.insert(id, &inner, 0)
}

fn source_range_key(rev_nat_id: RevNatId, addr: u32, len: u8) -> Key<SourceRange> {
    Key::new(32 + u32::from(len), SourceRange { rev_nat_id, addr })
}

/// Writes a run of puts to one map in batches; `each` picks an op's entry.
fn put_run<K: bytemuck::Pod + aya::Pod, V: bytemuck::Pod + aya::Pod>(
    map: &HashMap<MapData, K, V>,
    run: &[MapOp],
    what: &str,
    each: impl Fn(&MapOp) -> Option<(K, V)>,
) -> Result<()> {
    let (keys, values): (Vec<K>, Vec<V>) = run.iter().filter_map(each).unzip();
    super::batch::update_entries(map, &keys, &values)
        .with_context(|| format!("writing {} {what}", keys.len()))
}

/// Deletes a run of keys from one map in batches; `each` picks an op's key.
fn delete_run<K: bytemuck::Pod + aya::Pod, V: bytemuck::Pod + aya::Pod>(
    map: &HashMap<MapData, K, V>,
    run: &[MapOp],
    what: &str,
    each: impl Fn(&MapOp) -> Option<K>,
) -> Result<()> {
    let keys: Vec<K> = run.iter().filter_map(each).collect();
    super::batch::delete_entries(map, &keys)
        .with_context(|| format!("deleting {} {what}", keys.len()))
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}
