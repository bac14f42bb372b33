//! Which EndpointSlices belong to which Service (the
//! `kubernetes.io/service-name` label), kept as slices change, so a
//! Service's translation finds its own slices without a scan of all of them,
//! and a slice that moves to another Service touches both.

use hashbrown::HashMap;

use super::index::ServiceRef;
use crate::translate::SliceFacts;

/// A slice, by namespace and name.
pub type SliceRef = (String, String);

#[derive(Default)]
pub struct SliceIndex {
    owner: HashMap<SliceRef, ServiceRef>,
    /// Sorted; most Services have one slice (a Vec holds it in its own
    /// size, a BTreeSet's node has room for 11).
    slices: HashMap<ServiceRef, Vec<String>>,
}

fn owner_of(slice: &SliceFacts) -> Option<ServiceRef> {
    Some(ServiceRef {
        namespace: slice.namespace.clone(),
        name: slice.service.as_deref()?.into(),
    })
}

impl SliceIndex {
    /// A slice as it is now (`None`: deleted). Returns the Services whose
    /// slices changed: the one it belongs to, and the one it left.
    pub fn update(&mut self, slice: &SliceRef, now: Option<&SliceFacts>) -> Vec<ServiceRef> {
        let mut touched = Vec::new();
        if let Some(old) = self.owner.remove(slice) {
            if let Some(names) = self.slices.get_mut(&old) {
                if let Ok(i) = names.binary_search(&slice.1) {
                    names.remove(i);
                }
                if names.is_empty() {
                    self.slices.remove(&old);
                }
            }
            touched.push(old);
        }
        if let Some(owner) = now.and_then(owner_of) {
            let names = self.slices.entry(owner.clone()).or_default();
            if let Err(i) = names.binary_search(&slice.1) {
                names.insert(i, slice.1.clone());
            }
            self.owner.insert(slice.clone(), owner.clone());
            if !touched.contains(&owner) {
                touched.push(owner);
            }
        }
        touched
    }

    /// The names of a Service's slices (in its namespace).
    pub fn of(&self, svc: &ServiceRef) -> impl Iterator<Item = &String> {
        self.slices.get(svc).into_iter().flatten()
    }

    pub fn clear(&mut self) {
        self.owner.clear();
        self.slices.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, service: &str) -> SliceFacts {
        SliceFacts {
            namespace: "ns".into(),
            name: name.into(),
            service: Some(service.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_slice_that_moves_touches_both_services() {
        let mut ix = SliceIndex::default();
        let (a, b) = (ServiceRef::new("ns", "a"), ServiceRef::new("ns", "b"));
        let key = ("ns".to_string(), "s1".to_string());
        assert_eq!(ix.update(&key, Some(&slice("s1", "a"))), vec![a.clone()]);
        assert_eq!(ix.of(&a).collect::<Vec<_>>(), vec!["s1"]);
        assert_eq!(
            ix.update(&key, Some(&slice("s1", "b"))),
            vec![a.clone(), b.clone()]
        );
        assert_eq!(ix.of(&a).count(), 0);
        assert_eq!(ix.of(&b).collect::<Vec<_>>(), vec!["s1"]);
        assert_eq!(ix.update(&key, None), vec![b.clone()]);
        assert_eq!(ix.of(&b).count(), 0);
        // A slice without the label belongs to no Service.
        let mut bare = slice("s2", "a");
        bare.service = None;
        assert!(ix
            .update(&("ns".into(), "s2".into()), Some(&bare))
            .is_empty());
    }
}
