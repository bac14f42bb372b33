//! What the agent wrote into the service maps, per Service, so that one
//! Service's change is planned against that Service's entries alone: its
//! frontends, their slots and tables, and the backends it uses (shared
//! with other Services, so removed only when no Service uses them). Pure:
//! `plan` decides, the caller applies the ops and then `commit`s them.

use std::collections::BTreeSet;

use hashbrown::HashMap;

use lb_common::service::ServiceKey;

use super::index::ServiceRef;
use crate::{
    plan::{
        backend_addr, desired_state_with, map_full_error, plan, service_key, Capacity, Ids, MapOp,
        MapState,
    },
    translate::{DesiredService, ObjectError},
};

/// The entries one Service has in the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Owned {
    /// Its frontends' slot-0 (master) keys.
    masters: Vec<ServiceKey>,
    /// The backend ids it uses (slots, and retained endpoints).
    backends: BTreeSet<u32>,
}

/// One Service's planned change: the ops to apply, then `commit`.
#[derive(Debug)]
pub struct Step {
    pub service: ServiceRef,
    pub ops: Vec<MapOp>,
    /// The map full for this Service, if it was: it is then removed whole.
    pub error: Option<ObjectError>,
    owned: Owned,
    /// Frontends this Service takes over from another (which lost them).
    taken: Vec<(ServiceRef, ServiceKey)>,
}

#[derive(Default)]
pub struct ServiceWriter {
    /// What the maps hold, as of the last committed step.
    written: MapState,
    ids: Ids,
    owned: HashMap<ServiceRef, Owned>,
    /// The Service each frontend (master key) is written for.
    master_owner: HashMap<ServiceKey, ServiceRef>,
    /// How many Services use each backend id (a u32: half the table of a
    /// usize, 1 MB at 100,000 backends).
    backend_refs: HashMap<u32, u32>,
    capacity: Capacity,
}

fn owned_by(state: &MapState, ids: &Ids, frontends: &[DesiredService]) -> Owned {
    let mut o = Owned::default();
    for f in frontends {
        let master = service_key(f.vip, f.port, f.proto, 0);
        if state.services.contains_key(&master) && !o.masters.contains(&master) {
            o.masters.push(master);
        }
        for b in f.backends.iter().chain(&f.retained) {
            if let Some(id) = ids.existing_backend(b) {
                if state.backends.contains_key(&id) {
                    o.backends.insert(id);
                }
            }
        }
    }
    o
}

impl ServiceWriter {
    /// After a full pass that writes `written`: the tables of what each
    /// Service owns (the entries of its programmed `frontends`), built while
    /// the maps are still being written (`written` borrowed, beside the map
    /// writer); `holding` completes the writer. `frontends` is taken by value and dropped one Service at a time,
    /// as the tables grow: held whole beside them, the cluster's frontends
    /// were the first pass's peak (about 4 MB at 10,000 Services).
    pub fn owners(
        written: &MapState,
        frontends: impl IntoIterator<Item = (ServiceRef, Vec<DesiredService>)>,
        capacity: Capacity,
    ) -> Self {
        let mut w = Self {
            ids: Ids::of(written),
            capacity,
            ..Default::default()
        };
        let frontends = frontends.into_iter();
        // Sized once: grown as filled, the tables were rehashed a dozen times.
        w.owned.reserve(frontends.size_hint().0);
        w.master_owner.reserve(frontends.size_hint().0);
        w.backend_refs.reserve(written.backends.len());
        for (svc, f) in frontends {
            let o = owned_by(written, &w.ids, &f);
            for id in &o.backends {
                *w.backend_refs.entry(*id).or_default() += 1;
            }
            for m in &o.masters {
                w.master_owner.insert(*m, svc.clone());
            }
            if o != Owned::default() {
                w.owned.insert(svc, o);
            }
        }
        w
    }

    /// The writer of maps that hold `written`, which its tables (`owners`)
    /// were built from.
    pub fn holding(mut self, written: MapState) -> Self {
        self.written = written;
        self
    }

    pub fn written(&self) -> &MapState {
        &self.written
    }

    /// Frontends written.
    pub fn frontends(&self) -> usize {
        self.master_owner.len()
    }

    /// The writes that give `svc` the frontends `desired` (none: remove it),
    /// ordered as `plan::plan` orders them, with the backends other Services
    /// share left alone. A Service that does not fit the maps is removed
    /// whole, with an error naming the full map.
    pub fn plan(&mut self, svc: &ServiceRef, desired: &[DesiredService]) -> Step {
        let mut old = self.owned.get(svc).cloned().unwrap_or_default();
        // A frontend another Service had (it lost it to this older one) is
        // rewritten in place, as if it were this Service's already: planned
        // against the other's entries, it would be removed when that one is.
        let mut taken = Vec::new();
        for f in desired {
            let m = service_key(f.vip, f.port, f.proto, 0);
            match self.master_owner.get(&m) {
                Some(other) if other != svc => {
                    taken.push((other.clone(), m));
                    old.masters.push(m);
                }
                _ => {}
            }
        }
        let old_state = self.written.fragment(&old.masters, &old.backends);
        let mut new_state = desired_state_with(&self.written, &mut self.ids, desired);
        let mut error = None;
        if let Some((map, size)) = self.overflow(&old_state, &new_state) {
            error = Some(map_full_error(&svc.to_string(), map, size));
            new_state = MapState::default();
        }
        let owned = owned_by(
            &new_state,
            &self.ids,
            if error.is_some() { &[] } else { desired },
        );
        let ops = plan(&old_state, &new_state)
            .into_iter()
            .filter(|op| match op {
                // Already there for another Service.
                MapOp::PutBackend(id, b) => self.written.backends.get(id) != Some(b),
                // Still used by another Service.
                MapOp::DeleteBackend(id) => self.backend_refs.get(id).copied().unwrap_or(0) <= 1,
                _ => true,
            })
            .collect();
        Step {
            service: svc.clone(),
            ops,
            error,
            owned,
            taken,
        }
    }

    /// Which map `new` would overflow in place of `old`.
    fn overflow(&self, old: &MapState, new: &MapState) -> Option<(&'static str, usize)> {
        let w = &self.written;
        let after = |now: usize, gone: usize, more: usize| now - gone.min(now) + more;
        let fresh_backends = new
            .backends
            .keys()
            .filter(|id| !w.backends.contains_key(id))
            .count();
        let cap = &self.capacity;
        if after(w.services.len(), old.services.len(), new.services.len()) > cap.services {
            Some(("SERVICES", cap.services))
        } else if w.backends.len() + fresh_backends > cap.backends {
            Some(("BACKENDS", cap.backends))
        } else if after(w.maglev.len(), old.maglev.len(), new.maglev.len()) > cap.maglev_tables {
            Some(("MAGLEV", cap.maglev_tables))
        } else {
            None
        }
    }

    /// Records that a step's ops are in the maps.
    pub fn commit(&mut self, step: Step) {
        for op in &step.ops {
            if let MapOp::DeleteBackend(id) = op {
                if let Some(b) = self.written.backends.get(id) {
                    self.ids.forget_backend(&backend_addr(b));
                }
            }
        }
        self.written.apply(&step.ops);
        for (other, m) in &step.taken {
            if let Some(o) = self.owned.get_mut(other) {
                o.masters.retain(|x| x != m);
            }
        }
        let old = self.owned.remove(&step.service).unwrap_or_default();
        for id in &step.owned.backends {
            *self.backend_refs.entry(*id).or_default() += 1;
        }
        for id in &old.backends {
            if let Some(n) = self.backend_refs.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    self.backend_refs.remove(id);
                }
            }
        }
        for m in old
            .masters
            .iter()
            .filter(|m| !step.owned.masters.contains(m))
        {
            if self.master_owner.get(m) == Some(&step.service) {
                self.master_owner.remove(m);
                self.ids.forget_frontend(m);
            }
        }
        for m in &step.owned.masters {
            self.master_owner.insert(*m, step.service.clone());
        }
        if step.owned != Owned::default() {
            self.owned.insert(step.service, step.owned);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::plan::tests::svc as frontend;

    /// What a packet would see: each frontend's backends in slot order,
    /// by address (ids differ between a full and an incremental plan).
    fn view(s: &MapState) -> Vec<(ServiceKey, Vec<std::net::Ipv4Addr>, bool)> {
        s.services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(k, v)| {
                let backends = (1..=v.count)
                    .map(|slot| {
                        let e = s.services[&ServiceKey { slot, ..*k }];
                        backend_addr(&s.backends[&e.backend_id]).ip
                    })
                    .collect();
                (*k, backends, s.maglev.contains_key(&v.rev_nat_id))
            })
            .collect()
    }

    /// One Service's change at a time gives the maps a full plan of the
    /// whole cluster would give them, and backends shared by two Services
    /// stay until neither uses them.
    #[test]
    fn service_by_service_changes_end_where_a_full_plan_does() {
        let (a, b) = (ServiceRef::new("ns", "a"), ServiceRef::new("ns", "b"));
        let mut w = ServiceWriter::owners(&MapState::default(), [], Capacity::default());
        let mut maps = MapState::default();
        let steps: Vec<(&ServiceRef, Vec<DesiredService>)> = vec![
            (
                &a,
                vec![frontend("10.96.0.1", 80, &["10.244.1.2", "10.244.1.3"])],
            ),
            (
                &b,
                vec![frontend("10.96.0.2", 80, &["10.244.1.3", "10.244.1.4"])],
            ),
            // a drops the backend it shares with b: b keeps it.
            (&a, vec![frontend("10.96.0.1", 80, &["10.244.1.2"])]),
            // b gets a second frontend, and a goes.
            (
                &b,
                vec![
                    frontend("10.96.0.2", 80, &["10.244.1.3", "10.244.1.4"]),
                    frontend("10.96.0.2", 443, &["10.244.1.4"]),
                ],
            ),
            (&a, vec![]),
        ];
        let mut now: BTreeMap<&ServiceRef, Vec<DesiredService>> = BTreeMap::new();
        for (svc, desired) in steps {
            let step = w.plan(svc, &desired);
            assert!(step.error.is_none());
            maps.apply(&step.ops);
            w.commit(step);
            now.insert(svc, desired);
            assert_eq!(&maps, w.written(), "the writer knows what the maps hold");
            let all: Vec<DesiredService> = now.values().flatten().cloned().collect();
            let full = crate::plan::desired_state(&MapState::default(), &all);
            assert_eq!(view(&maps), view(&full));
            assert_eq!(
                maps.backends.len(),
                full.backends.len(),
                "no backend left behind"
            );
        }
        assert_eq!(w.frontends(), 2);
        assert_eq!(maps.backends.len(), 2);
    }

    /// A Service that would overflow a map is left out whole, with an
    /// error, and the others stay.
    #[test]
    fn a_service_that_does_not_fit_is_left_out_whole() {
        let cap = Capacity {
            services: 4,
            backends: 100,
            maglev_tables: 100,
        };
        let (a, b) = (ServiceRef::new("ns", "a"), ServiceRef::new("ns", "b"));
        let mut w = ServiceWriter::owners(&MapState::default(), [], cap);
        let step = w.plan(
            &a,
            &[frontend("10.96.0.1", 80, &["10.244.1.2", "10.244.1.3"])],
        );
        assert!(step.error.is_none());
        w.commit(step);
        let step = w.plan(
            &b,
            &[frontend("10.96.0.2", 80, &["10.244.1.4", "10.244.1.5"])],
        );
        let e = step.error.clone().expect("SERVICES is full");
        assert!(e.message.contains("SERVICES is full"), "{e:?}");
        assert!(
            crate::plan::is_map_full(&e),
            "counted in lb_map_full_services"
        );
        assert!(step.ops.is_empty(), "{:?}", step.ops);
        w.commit(step);
        assert_eq!(w.frontends(), 1);
    }
}
