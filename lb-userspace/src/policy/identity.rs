//! Security identities: what a policy peer can tell apart. One per distinct
//! (namespace, namespace labels, pod labels, policy CIDRs containing the
//! address) for pods, one per policy CIDR for the world outside, so that
//! `ipBlock` with `except` resolves through the ipcache's longest prefix
//! match, for pod addresses too. Ids are kept for as long as something has
//! the identity, so a change elsewhere never renumbers it.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::policy::IDENTITY_FIRST_ALLOCATED;

use super::{parse::Prefix, Labels};

/// What an identity is made of.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum IdentityKey {
    Pod {
        namespace: String,
        ns_labels: Labels,
        labels: Labels,
        cidrs: BTreeSet<Prefix>,
    },
    World {
        prefix: Prefix,
        cidrs: BTreeSet<Prefix>,
    },
}

impl IdentityKey {
    /// The policy CIDRs that contain its addresses.
    pub fn cidrs(&self) -> &BTreeSet<Prefix> {
        match self {
            IdentityKey::Pod { cidrs, .. } | IdentityKey::World { cidrs, .. } => cidrs,
        }
    }
}

/// Whether `prefix` contains `inner` (an address is a /32).
pub fn contains(prefix: Prefix, inner: Prefix) -> bool {
    let mask = if prefix.1 == 0 {
        0
    } else {
        u32::MAX << (32 - prefix.1)
    };
    inner.1 >= prefix.1 && (u32::from(inner.0) & mask) == u32::from(prefix.0)
}

/// The CIDRs of `cidrs` that contain `addr`.
pub fn within(cidrs: &BTreeSet<Prefix>, addr: Prefix) -> BTreeSet<Prefix> {
    cidrs
        .iter()
        .copied()
        .filter(|c| contains(*c, addr))
        .collect()
}

/// Identities in use, each with its id and how many hold it.
#[derive(Debug, Default)]
pub struct Identities {
    by_key: BTreeMap<IdentityKey, (u32, usize)>,
    keys: BTreeMap<u32, IdentityKey>,
    free: Vec<u32>,
    next: u32,
}

impl Identities {
    /// The id of `key`, taken once more; and whether it is new.
    pub fn acquire(&mut self, key: IdentityKey) -> (u32, bool) {
        if let Some((id, users)) = self.by_key.get_mut(&key) {
            *users += 1;
            return (*id, false);
        }
        let id = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            IDENTITY_FIRST_ALLOCATED + self.next - 1
        });
        self.keys.insert(id, key.clone());
        self.by_key.insert(key, (id, 1));
        (id, true)
    }

    /// Gives `id` up once; its key if no one holds it any more.
    pub fn release(&mut self, id: u32) -> Option<IdentityKey> {
        let key = self.keys.get(&id)?;
        let entry = self.by_key.get_mut(key)?;
        entry.1 -= 1;
        if entry.1 > 0 {
            return None;
        }
        let key = self.keys.remove(&id)?;
        self.by_key.remove(&key);
        self.free.push(id);
        Some(key)
    }

    pub fn key(&self, id: u32) -> Option<&IdentityKey> {
        self.keys.get(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &IdentityKey)> {
        self.keys.iter().map(|(id, k)| (*id, k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_key(app: &str) -> IdentityKey {
        IdentityKey::Pod {
            namespace: "x".into(),
            ns_labels: Labels::new(),
            labels: [("app".to_string(), app.to_string())].into(),
            cidrs: BTreeSet::new(),
        }
    }

    #[test]
    fn an_identity_keeps_its_id_while_held_and_a_freed_id_is_reused() {
        let mut ids = Identities::default();
        let (a, new_a) = ids.acquire(pod_key("a"));
        let (b, _) = ids.acquire(pod_key("b"));
        assert!(new_a && a != b);
        assert_eq!(ids.acquire(pod_key("a")), (a, false));
        assert_eq!(ids.release(a), None, "still held once");
        assert_eq!(ids.release(a), Some(pod_key("a")));
        let (c, new_c) = ids.acquire(pod_key("c"));
        assert!(new_c);
        assert_eq!(c, a, "the freed id");
        assert_eq!(ids.key(b), Some(&pod_key("b")));
    }
}
