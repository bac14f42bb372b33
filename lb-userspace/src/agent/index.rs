//! Which Service owns each frontend, kept one Service at a time: two
//! Services claiming one frontend (the same nodePort, externalIP or
//! LoadBalancer address and port), the older keeps it and the other loses
//! that frontend only, with an error, as `translate::translate` decides for
//! a whole cluster. Pure: no I/O.

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc};

use crate::translate::{DesiredService, ObjectError, Translation};
use hashbrown::HashMap;

/// A Service, by namespace and name. The agent keeps a Service's key in
/// half a dozen indexes (translations, claims, slices, what was written);
/// shared strings make each copy a reference count, not two allocations.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceRef {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// (address, port, protocol) of a frontend.
type Frontend = (Ipv4Addr, u16, u8);

fn frontend(s: &DesiredService) -> Frontend {
    (s.vip, s.port, s.proto)
}

/// What the index keeps of a Service's translation: its age and the
/// frontends it claims, by name. The rest (backends, errors) is translated
/// again from the caches when the Service is planned: keeping every
/// Service's translation beside the caches and the writer's state held the
/// same entries a third time (13 MB at 10,000 Services).
struct Claimant {
    created: Created,
    frontends: Vec<(Frontend, Box<str>)>,
}

/// When a Service was created. With its reference (namespace, then name)
/// it orders claims as `translate::ServiceAge` does: the reference holds the names,
/// so a claim keeps the time alone, not the names a second time.
pub type Created = Option<k8s_openapi::jiff::Timestamp>;

/// Every Service's claims, and the claimants of each frontend.
#[derive(Default)]
pub struct ServiceIndex {
    services: HashMap<ServiceRef, Claimant>,
    /// Oldest first. Nearly every frontend has one claimant: a sorted Vec
    /// holds it in its own size, where a BTreeSet's node had room for 11
    /// (13 MB at 10,000 Services).
    claims: HashMap<Frontend, Vec<Claim>>,
}

type Claim = (Created, ServiceRef);

impl ServiceIndex {
    /// Replaces a Service's translation (`None`: the Service is gone).
    /// Returns the Services whose programmed frontends may have changed:
    /// this one, and any that won or lost a frontend it claims or claimed.
    pub fn set(
        &mut self,
        svc: &ServiceRef,
        new: Option<(Created, &Translation)>,
    ) -> BTreeSet<ServiceRef> {
        let mut touched = BTreeSet::from([svc.clone()]);
        let old = self.services.remove(svc);
        let new = new.map(|(created, t)| Claimant {
            created,
            frontends: t
                .services
                .iter()
                .map(|s| (frontend(s), s.name.as_str().into()))
                .collect(),
        });
        let mut contested: BTreeSet<Frontend> = BTreeSet::new();
        if let Some(old) = &old {
            contested.extend(old.frontends.iter().map(|(f, _)| *f));
        }
        if let Some(new) = &new {
            contested.extend(new.frontends.iter().map(|(f, _)| *f));
        }
        let winners_before: Vec<Option<ServiceRef>> =
            contested.iter().map(|f| self.winner(f).cloned()).collect();
        if let Some(old) = old {
            for (f, _) in &old.frontends {
                if let Some(c) = self.claims.get_mut(f) {
                    let gone = (old.created, svc.clone());
                    if let Ok(i) = c.binary_search(&gone) {
                        c.remove(i);
                    }
                    if c.is_empty() {
                        self.claims.remove(f);
                    }
                }
            }
        }
        if let Some(new) = new {
            for (f, _) in &new.frontends {
                let c = self.claims.entry(*f).or_default();
                let claim = (new.created, svc.clone());
                if let Err(i) = c.binary_search(&claim) {
                    c.insert(i, claim);
                }
            }
            self.services.insert(svc.clone(), new);
        }
        for (f, before) in contested.iter().zip(winners_before) {
            let after = self.winner(f).cloned();
            if before != after {
                touched.extend(before);
                touched.extend(after);
            }
        }
        touched
    }

    fn winner(&self, f: &Frontend) -> Option<&ServiceRef> {
        self.claims.get(f)?.first().map(|(_, s)| s)
    }

    /// What to program for a Service, given its translation (the one
    /// `set` was given, from the same objects): the frontends it owns, and
    /// its errors (its own, and one per frontend an older Service has).
    pub fn programmed(
        &self,
        svc: &ServiceRef,
        translation: Translation,
    ) -> (Vec<DesiredService>, Vec<ObjectError>) {
        if !self.services.contains_key(svc) {
            return (vec![], vec![]);
        }
        let mut errors = translation.errors;
        let mut kept = Vec::new();
        for s in translation.services {
            match self.winner(&frontend(&s)) {
                Some(w) if w != svc => {
                    let first = self.services.get(w).and_then(|o| {
                        o.frontends
                            .iter()
                            .find(|(f, _)| *f == frontend(&s))
                            .map(|(_, name)| name)
                    });
                    errors.push(ObjectError {
                        object: format!("Service {svc}"),
                        message: format!(
                            "frontend {}:{}/{} is already Service {}'s: not programmed",
                            s.vip,
                            s.port,
                            crate::translate::protocol_name(s.proto),
                            first.map_or_else(|| w.to_string(), |x| x.to_string())
                        ),
                    });
                }
                _ => kept.push(s),
            }
        }
        (kept, errors)
    }

    /// Every Service, oldest first (the order a full pass programs them in).
    pub fn by_age(&self) -> Vec<&ServiceRef> {
        let mut all: Vec<(Created, &ServiceRef)> =
            self.services.iter().map(|(r, t)| (t.created, r)).collect();
        all.sort();
        all.into_iter().map(|(_, r)| r).collect()
    }

    pub fn clear(&mut self) {
        self.services.clear();
        self.claims.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::PROTO_TCP;

    fn translation(frontends: &[(&str, u16)]) -> Translation {
        Translation {
            services: frontends
                .iter()
                .map(|(vip, port)| DesiredService {
                    name: format!("x/{vip}:{port}"),
                    vip: vip.parse().unwrap(),
                    port: *port,
                    proto: PROTO_TCP,
                    flags: 0,
                    backends: vec![],
                    retained: vec![],
                    affinity_timeout: None,
                    source_ranges: vec![],
                })
                .collect(),
            errors: vec![],
        }
    }

    fn age(n: i64) -> Created {
        Some(k8s_openapi::jiff::Timestamp::from_second(n).unwrap())
    }

    /// The index with each Service's last translation beside it, as the
    /// agent has it from its caches.
    #[derive(Default)]
    struct Indexed {
        ix: ServiceIndex,
        translations: HashMap<ServiceRef, Translation>,
    }

    impl Indexed {
        fn set(
            &mut self,
            s: &ServiceRef,
            new: Option<(Created, Translation)>,
        ) -> BTreeSet<ServiceRef> {
            let touched = self.ix.set(s, new.as_ref().map(|(a, t)| (*a, t)));
            match new {
                Some((_, t)) => self.translations.insert(s.clone(), t),
                None => self.translations.remove(s),
            };
            touched
        }

        fn programmed(&self, s: &ServiceRef) -> (Vec<DesiredService>, Vec<ObjectError>) {
            let t = self.translations.get(s).cloned().unwrap_or_default();
            self.ix.programmed(s, t)
        }
    }

    fn owned(ix: &Indexed, s: &ServiceRef) -> Vec<u16> {
        ix.programmed(s).0.iter().map(|d| d.port).collect()
    }

    /// The older claimant keeps a contested frontend; when it lets go, the
    /// next one gets it, and each change names the Services it touched.
    #[test]
    fn the_oldest_claimant_owns_a_frontend_and_hands_it_on() {
        let mut ix = Indexed::default();
        let (a, b) = (ServiceRef::new("ns", "a"), ServiceRef::new("ns", "b"));
        let shared = ("172.18.0.10", 30080);
        // (what changes, who is touched, ports a owns, ports b owns, b's errors)
        let t = ix.set(
            &a,
            Some((age(1), translation(&[("10.96.0.1", 80), shared]))),
        );
        assert_eq!(t, BTreeSet::from([a.clone()]));
        let t = ix.set(
            &b,
            Some((age(2), translation(&[("10.96.0.2", 80), shared]))),
        );
        assert_eq!(
            t,
            BTreeSet::from([b.clone()]),
            "a keeps it: only b is touched"
        );
        assert_eq!(owned(&ix, &a), vec![80, 30080]);
        assert_eq!(owned(&ix, &b), vec![80]);
        let errors = ix.programmed(&b).1;
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .message
                .contains("already Service x/172.18.0.10:30080's"),
            "{errors:?}"
        );

        // a drops the node port: b gets it.
        let t = ix.set(&a, Some((age(1), translation(&[("10.96.0.1", 80)]))));
        assert_eq!(t, BTreeSet::from([a.clone(), b.clone()]));
        assert_eq!(owned(&ix, &b), vec![80, 30080]);
        assert!(ix.programmed(&b).1.is_empty());

        // An older Service claiming it takes it back from b.
        let c = ServiceRef::new("ns", "c");
        let t = ix.set(&c, Some((age(0), translation(&[shared]))));
        assert_eq!(t, BTreeSet::from([b.clone(), c.clone()]));
        assert_eq!(owned(&ix, &b), vec![80]);

        // c deleted: back to b.
        let t = ix.set(&c, None);
        assert_eq!(t, BTreeSet::from([b.clone(), c.clone()]));
        assert_eq!(owned(&ix, &b), vec![80, 30080]);
        assert_eq!(ix.programmed(&c), (vec![], vec![]));
        assert_eq!(ix.ix.by_age(), vec![&a, &b]);
    }
}
