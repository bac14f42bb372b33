//! The service side of the agent: from the caches to the service maps,
//! one changed Service at a time (`reconcile`), or the whole cluster
//! (`full_pass`: at start, after a watch listed again, on a Node change);
//! `repair`, the periodic resync, reads the maps back and rewrites what
//! drifted from what was written.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use anyhow::Result;
use hashbrown::HashMap;

use super::{
    cache::Cache,
    index::{ServiceIndex, ServiceRef},
    slices::{SliceIndex, SliceRef},
    writer::ServiceWriter,
};
use crate::{
    datapath::Datapath,
    health::{health_checks, HealthCheck},
    plan::{desired_state, fit_to_capacity, plan, plan_each, Capacity, MapOp, MapState},
    translate::{
        translate_service, DesiredService, NodeContext, ObjectError, ServiceFacts, SliceFacts,
        Translation,
    },
};

/// What the agent keeps of each Service and EndpointSlice.
pub type ServiceCache = Cache<ServiceRef, ServiceFacts>;
pub type SliceCache = Cache<SliceRef, SliceFacts>;

/// Where a pass writes: the data path's service maps, or (to measure what
/// the agent keeps, and in tests) somewhere else. The passes decide; this
/// is their one side effect.
pub trait ServiceMaps {
    /// The maps were made empty by this agent: nothing to read back.
    fn fresh(&mut self) -> bool;
    /// What the maps hold.
    fn read(&self) -> Result<MapState>;
    fn apply(&mut self, ops: &[MapOp]) -> Result<()>;
}

impl ServiceMaps for Datapath {
    fn fresh(&mut self) -> bool {
        self.take_fresh_service_maps()
    }

    fn read(&self) -> Result<MapState> {
        self.maps.state()
    }

    fn apply(&mut self, ops: &[MapOp]) -> Result<()> {
        self.maps.apply(ops)
    }
}

/// How many ops a full pass plans before it writes them.
const OPS_PER_CHUNK: usize = 8192;

/// Writes what turns `current` into `desired`, a chunk at a time as it is
/// planned (the whole cluster's ops at once were 10 MB at 10,000 Services,
/// held only to be written). Returns the ops and the backends removed
/// (gone while no agent ran, or before a relist).
fn write_planned(
    dp: &mut impl ServiceMaps,
    current: &MapState,
    desired: &MapState,
) -> Result<Written> {
    let mut chunk = Vec::with_capacity(OPS_PER_CHUNK);
    let mut out = Written::default();
    plan_each(current, desired, &mut |op| {
        if let MapOp::DeleteBackend(id) = &op {
            out.gone_backends
                .extend(current.backends.get(id).map(crate::plan::backend_addr));
        }
        chunk.push(op);
        out.ops += 1;
        if chunk.len() == OPS_PER_CHUNK {
            dp.apply(&chunk)?;
            chunk.clear();
        }
        anyhow::Ok(())
    })?;
    dp.apply(&chunk)?;
    Ok(out)
}

/// The programmed frontends grouped by the Service they came from.
fn by_owner(
    fitting: Vec<DesiredService>,
    owner_of_name: &HashMap<String, ServiceRef>,
) -> HashMap<ServiceRef, Vec<DesiredService>> {
    let mut by_service: HashMap<ServiceRef, Vec<DesiredService>> = HashMap::new();
    for d in fitting {
        if let Some(svc) = owner_of_name.get(&d.name) {
            by_service.entry(svc.clone()).or_default().push(d);
        }
    }
    by_service
}

/// What a pass wrote.
#[derive(Clone, Debug, Default)]
pub struct Written {
    pub ops: usize,
    /// Writes that repaired maps changed behind the agent's back.
    pub drift: usize,
    pub frontends: usize,
    pub backends: usize,
    /// Backends this pass removed from the map (no Service has them any
    /// more): socket LB's sockets connected to them are closed.
    pub gone_backends: Vec<crate::translate::BackendAddr>,
}

#[derive(Default)]
pub struct ServiceSide {
    index: ServiceIndex,
    pub slices: SliceIndex,
    /// None until a full pass has written the maps.
    writer: Option<ServiceWriter>,
    health: HashMap<ServiceRef, BTreeMap<u16, HealthCheck>>,
    errors: HashMap<ServiceRef, Vec<ObjectError>>,
    capacity: Capacity,
}

impl ServiceSide {
    pub fn new(capacity: Capacity) -> Self {
        Self {
            capacity,
            ..Default::default()
        }
    }

    fn own_slices(&self, slices: &SliceCache, svc: &ServiceRef) -> Vec<Arc<SliceFacts>> {
        self.slices
            .of(svc)
            .filter_map(|name| slices.get(&(svc.namespace.to_string(), name.clone())))
            .collect()
    }

    /// A Service from the caches, its own slices and its translation;
    /// `None` when the Service is gone.
    fn translate(
        &self,
        services: &ServiceCache,
        slices: &SliceCache,
        node: &NodeContext,
        svc: &ServiceRef,
    ) -> Option<(Arc<ServiceFacts>, Vec<Arc<SliceFacts>>, Translation)> {
        let object = services.get(svc)?;
        let own = self.own_slices(slices, svc);
        let refs: Vec<&SliceFacts> = own.iter().map(|s| s.as_ref()).collect();
        let t = translate_service(&object, &refs, node);
        Some((object, own, t))
    }

    /// Translates one Service again, from the caches, into the index and
    /// its health checks. Returns the translation, and the Services whose
    /// programmed frontends may have changed.
    fn retranslate(
        &mut self,
        services: &ServiceCache,
        slices: &SliceCache,
        node: &NodeContext,
        svc: &ServiceRef,
    ) -> (Translation, BTreeSet<ServiceRef>) {
        let Some((object, own, t)) = self.translate(services, slices, node, svc) else {
            self.health.remove(svc);
            return (Translation::default(), self.index.set(svc, None));
        };
        let own: Vec<&SliceFacts> = own.iter().map(|s| s.as_ref()).collect();
        let checks = health_checks(&[object.as_ref()], &own, node);
        if checks.is_empty() {
            self.health.remove(svc);
        } else {
            self.health.insert(svc.clone(), checks);
        }
        let touched = self.index.set(svc, Some((object.created, &t)));
        (t, touched)
    }

    /// The whole cluster: every Service translated again, the maps planned
    /// against what they hold (`read_maps`, or before the first pass) or
    /// against what this agent wrote.
    pub fn full_pass(
        &mut self,
        dp: &mut (impl ServiceMaps + Send),
        services: &ServiceCache,
        slices: &SliceCache,
        node: &NodeContext,
        read_maps: bool,
    ) -> Result<Written> {
        let (fitting, owner_of_name) = self.translate_all(services, slices, node);
        let current = match (&self.writer, read_maps) {
            (Some(w), false) => w.written().clone(),
            _ if dp.fresh() => MapState::default(),
            _ => dp.read()?,
        };
        let desired = desired_state(&current, &fitting);
        // The maps are written on a thread of their own while this one
        // builds the writer's tables from the same desired state: the
        // kernel's inserts were half of a first pass at 10,000 Services,
        // with the second core idle.
        let (planned, owners) = std::thread::scope(|scope| {
            let writes = std::thread::Builder::new()
                .name("lb-map-write".into())
                .spawn_scoped(scope, || write_planned(dp, &current, &desired))?;
            let owners =
                ServiceWriter::owners(&desired, by_owner(fitting, &owner_of_name), self.capacity);
            let planned = writes
                .join()
                .map_err(|_| anyhow::anyhow!("the map writer panicked"))??;
            anyhow::Ok((planned, owners))
        })?;
        drop(current);
        let drift = match &self.writer {
            Some(w) if read_maps && plan(w.written(), &desired).is_empty() => planned.ops,
            _ => 0,
        };
        let out = Written {
            drift,
            frontends: desired.services.keys().filter(|k| k.slot == 0).count(),
            backends: desired.backends.len(),
            ..planned
        };
        self.writer = Some(owners.holding(desired));
        Ok(out)
    }

    /// Every Service translated again into the index: the frontends that
    /// fit the maps, and the Service each came from. The errors (conflicts,
    /// full maps) are recorded.
    fn translate_all(
        &mut self,
        services: &ServiceCache,
        slices: &SliceCache,
        node: &NodeContext,
    ) -> (Vec<DesiredService>, HashMap<String, ServiceRef>) {
        self.slices.clear();
        for s in slices.state() {
            let key = (s.namespace.to_string(), s.name.to_string());
            self.slices.update(&key, Some(&s));
        }
        self.index.clear();
        self.health.clear();
        let mut translations: HashMap<ServiceRef, Translation> = HashMap::new();
        for s in services.state() {
            let svc = ServiceRef {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
            };
            let (t, _) = self.retranslate(services, slices, node, &svc);
            translations.insert(svc, t);
        }
        self.errors.clear();
        let mut all: Vec<DesiredService> = Vec::new();
        let mut owner_of_name: HashMap<String, ServiceRef> = HashMap::new();
        for svc in self.index.by_age() {
            let t = translations.remove(svc).unwrap_or_default();
            let (kept, errors) = self.index.programmed(svc, t);
            owner_of_name.extend(kept.iter().map(|d| (d.name.clone(), svc.clone())));
            all.extend(kept);
            if !errors.is_empty() {
                self.errors.insert(svc.clone(), errors);
            }
        }
        drop(translations);
        let (fitting, full) = fit_to_capacity(all, &self.capacity);
        for e in full {
            let name = e.object.trim_start_matches("Service ");
            let (ns, n) = name.split_once('/').unwrap_or(("", name));
            self.errors
                .entry(ServiceRef::new(ns, n))
                .or_default()
                .push(e);
        }
        (fitting, owner_of_name)
    }

    /// Only the Services in `dirty` (and those a change of theirs hands a
    /// frontend to or takes one from). An error leaves the maps as far as
    /// they got: the caller runs a full pass that reads them back.
    pub fn reconcile(
        &mut self,
        dp: &mut impl ServiceMaps,
        services: &ServiceCache,
        slices: &SliceCache,
        node: &NodeContext,
        dirty: &BTreeSet<ServiceRef>,
    ) -> Result<Written> {
        let mut replan = BTreeSet::new();
        let mut fresh: HashMap<&ServiceRef, Translation> = HashMap::new();
        for svc in dirty {
            let (t, touched) = self.retranslate(services, slices, node, svc);
            fresh.insert(svc, t);
            replan.extend(touched);
        }
        let mut out = Written::default();
        // Taken while the steps run: a failed write leaves it out (the
        // maps hold what it does not know).
        let Some(mut writer) = self.writer.take() else {
            anyhow::bail!("no full pass yet");
        };
        for svc in &replan {
            // A Service that won or lost a frontend through another's change
            // is translated again from the caches, which did not change.
            let t = match fresh.remove(svc) {
                Some(t) => t,
                None => self
                    .translate(services, slices, node, svc)
                    .map(|(_, _, t)| t)
                    .unwrap_or_default(),
            };
            let (kept, mut errors) = self.index.programmed(svc, t);
            let step = writer.plan(svc, &kept);
            dp.apply(&step.ops)?;
            out.ops += step.ops.len();
            errors.extend(step.error.clone());
            if errors.is_empty() {
                self.errors.remove(svc);
            } else {
                self.errors.insert(svc.clone(), errors);
            }
            out.gone_backends.extend(step.ops.iter().filter_map(|op| {
                match op {
                    MapOp::DeleteBackend(id) => writer
                        .written()
                        .backends
                        .get(id)
                        .map(crate::plan::backend_addr),
                    _ => None,
                }
            }));
            writer.commit(step);
        }
        out.frontends = writer.frontends();
        out.backends = writer.written().backends.len();
        self.writer = Some(writer);
        Ok(out)
    }

    /// Reads the maps back and rewrites what differs from what this agent
    /// wrote (an entry removed or changed by hand): the periodic resync. The
    /// caches need no second look: every change reached them as an event,
    /// and a watch that had to list again triggers a full pass.
    pub fn repair(&mut self, dp: &mut impl ServiceMaps) -> Result<Written> {
        let Some(w) = &self.writer else {
            anyhow::bail!("no full pass yet");
        };
        let current = dp.read()?;
        let ops = plan(&current, w.written());
        dp.apply(&ops)?;
        Ok(Written {
            ops: ops.len(),
            drift: ops.len(),
            frontends: w.frontends(),
            backends: w.written().backends.len(),
            ..Default::default()
        })
    }

    /// The health check ports to serve, for every Service.
    pub fn health_checks(&self) -> BTreeMap<u16, HealthCheck> {
        self.health.values().flat_map(|h| h.clone()).collect()
    }

    /// Every Service's errors (translation, conflicts, full maps).
    pub fn errors(&self) -> impl Iterator<Item = &ObjectError> {
        self.errors.values().flatten()
    }

    /// Services left out because a map is full.
    pub fn map_full(&self) -> usize {
        self.errors()
            .filter(|e| crate::plan::is_map_full(e))
            .count()
    }

    /// Whether the agent knows what the service maps hold (a full pass
    /// succeeded and no write failed since).
    pub fn written_known(&self) -> bool {
        self.writer.is_some()
    }

    /// Forget what was written: the next pass reads the maps back.
    pub fn distrust_written(&mut self) {
        self.writer = None;
    }
}
