//! The agent's own caches for the kinds it keeps most of: Services and
//! EndpointSlices, one of each per Service. A kube-rs reflector's store
//! keeps the API object whole (an `ObjectMeta` of 15 mostly empty fields
//! inline, a Service's spec of 30, every address as a string) and its key
//! beside it: 2,750 bytes a Service with its slice, half of what the agent
//! held at 10,000 Services. These keep what translation reads, parsed once
//! as each object arrives (`ServiceFacts`, `SliceFacts`), with the same
//! semantics as the reflector's store: a relist is buffered and swapped
//! in whole when it is done, and the cache is ready after the first.

use std::{
    hash::Hash,
    sync::{Arc, RwLock},
};

use hashbrown::{HashMap, HashSet};
use k8s_openapi::api::core::v1::Service;
use kube::runtime::watcher;

use super::{index::ServiceRef, slices::SliceRef};
use crate::translate::{slice::NodeName, EndpointSlice, ServiceFacts, SliceFacts};

/// What the agent keeps of an API object `K`, under a key of its own.
pub trait Kept<K>: Sized {
    type Key: Clone + Eq + Hash + Send + Sync;
    fn key(object: &K, names: &mut Names) -> Self::Key;
    fn keep(object: &K, key: &Self::Key, names: &mut Names) -> Self;
}

/// Names that many objects repeat (namespaces, nodes), one copy of each:
/// a slice's ten endpoints on three nodes hold three names, not ten.
/// Kept for the cache's life; a cluster has few of them.
#[derive(Default)]
pub struct Names {
    names: HashSet<Arc<str>>,
    nodes: HashMap<Box<str>, NodeName>,
}

impl Names {
    pub fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = name.into();
        self.names.insert(n.clone());
        n
    }

    pub fn node(&mut self, name: &str) -> NodeName {
        if let Some(n) = self.nodes.get(name) {
            return n.clone();
        }
        let n = NodeName::new(name.into());
        self.nodes.insert(name.into(), n.clone());
        n
    }
}

/// A Service is kept under its namespace and name, shared with the facts.
impl Kept<Service> for ServiceFacts {
    type Key = ServiceRef;

    fn key(svc: &Service, names: &mut Names) -> ServiceRef {
        let meta = &svc.metadata;
        ServiceRef {
            namespace: names.get(meta.namespace.as_deref().unwrap_or("")),
            name: meta.name.as_deref().unwrap_or("").into(),
        }
    }

    fn keep(svc: &Service, key: &ServiceRef, _: &mut Names) -> Self {
        ServiceFacts::named(svc, key.namespace.clone(), key.name.clone())
    }
}

impl Kept<EndpointSlice> for SliceFacts {
    type Key = SliceRef;

    fn key(slice: &EndpointSlice, _: &mut Names) -> SliceRef {
        let meta = &slice.metadata;
        (
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        )
    }

    fn keep(slice: &EndpointSlice, key: &SliceRef, names: &mut Names) -> Self {
        let namespace = names.get(&key.0);
        SliceFacts::named(slice, namespace, &mut |n| names.node(n))
    }
}

type Objects<Key, T> = HashMap<Key, Arc<T>>;

/// A cache the agent reads: cheap to clone, shared with its writer.
pub struct Cache<Key, T> {
    objects: Arc<RwLock<Objects<Key, T>>>,
    ready: tokio::sync::watch::Receiver<bool>,
}

impl<Key, T> Clone for Cache<Key, T> {
    fn clone(&self) -> Self {
        Self {
            objects: self.objects.clone(),
            ready: self.ready.clone(),
        }
    }
}

impl<Key: Eq + Hash, T> Cache<Key, T> {
    pub fn get(&self, key: &Key) -> Option<Arc<T>> {
        self.read().get(key).cloned()
    }

    /// Every object, in no order.
    pub fn state(&self) -> Vec<Arc<T>> {
        self.read().values().cloned().collect()
    }

    /// Waits for the first listing to be in the cache; an error if the
    /// writer went first.
    pub async fn wait_until_ready(&self) -> anyhow::Result<()> {
        let mut ready = self.ready.clone();
        ready.wait_for(|r| *r).await?;
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Objects<Key, T>> {
        // A writer that panicked left a whole map: every write is one
        // insert, remove or swap.
        self.objects.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Applies a watch's events to its cache.
pub struct CacheWriter<K, T: Kept<K>> {
    objects: Arc<RwLock<Objects<T::Key, T>>>,
    ready: tokio::sync::watch::Sender<bool>,
    /// A listing in progress, swapped in whole at its end.
    buffer: Objects<T::Key, T>,
    names: Names,
}

/// A new, empty cache and its writer.
pub fn cache<K, T: Kept<K>>() -> (Cache<T::Key, T>, CacheWriter<K, T>) {
    let objects = Arc::new(RwLock::new(HashMap::new()));
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let reader = Cache {
        objects: objects.clone(),
        ready: ready_rx,
    };
    let writer = CacheWriter {
        objects,
        ready: ready_tx,
        buffer: HashMap::new(),
        names: Names::default(),
    };
    (reader, writer)
}

impl<K, T: Kept<K>> CacheWriter<K, T> {
    pub fn apply(&mut self, event: &watcher::Event<K>) {
        match event {
            watcher::Event::Apply(o) => {
                let (key, kept) = self.kept(o);
                self.write().insert(key, kept);
            }
            watcher::Event::Delete(o) => {
                let key = T::key(o, &mut self.names);
                self.write().remove(&key);
            }
            watcher::Event::Init => self.buffer = HashMap::new(),
            watcher::Event::InitApply(o) => {
                let (key, kept) = self.kept(o);
                self.buffer.insert(key, kept);
            }
            watcher::Event::InitDone => {
                let listed = std::mem::take(&mut self.buffer);
                // The old map is dropped outside the lock.
                let old = std::mem::replace(&mut *self.write(), listed);
                drop(old);
                self.ready.send_replace(true);
            }
        }
    }

    fn kept(&mut self, o: &K) -> (T::Key, Arc<T>) {
        let key = T::key(o, &mut self.names);
        let kept = Arc::new(T::keep(o, &key, &mut self.names));
        (key, kept)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Objects<T::Key, T>> {
        self.objects.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An object and what is kept of it: its name, and its value doubled.
    #[derive(Clone, Debug, PartialEq)]
    struct Object(&'static str, u32);

    #[derive(Debug, PartialEq)]
    struct Doubled(u32);

    impl Kept<Object> for Doubled {
        type Key = Arc<str>;
        fn key(o: &Object, names: &mut Names) -> Arc<str> {
            names.get(o.0)
        }
        fn keep(o: &Object, _: &Arc<str>, _: &mut Names) -> Self {
            Doubled(o.1 * 2)
        }
    }

    #[tokio::test]
    async fn a_relist_replaces_the_cache_whole_when_it_is_done() {
        let (cache, mut writer) = cache::<Object, Doubled>();
        let key = |s: &str| -> Arc<str> { s.into() };
        writer.apply(&watcher::Event::Init);
        writer.apply(&watcher::Event::InitApply(Object("a", 1)));
        assert!(
            cache.state().is_empty(),
            "a listing shows only when it is done"
        );
        assert!(!*cache.ready.borrow());
        writer.apply(&watcher::Event::InitDone);
        cache.wait_until_ready().await.expect("ready");
        assert_eq!(cache.get(&key("a")).as_deref(), Some(&Doubled(2)));
        writer.apply(&watcher::Event::Apply(Object("b", 2)));
        writer.apply(&watcher::Event::Apply(Object("a", 3)));
        assert_eq!(cache.get(&key("a")).as_deref(), Some(&Doubled(6)));
        writer.apply(&watcher::Event::Delete(Object("b", 2)));
        assert_eq!(cache.state().len(), 1);
        // A relist: "a" went while the watch was down, "c" came.
        writer.apply(&watcher::Event::Init);
        writer.apply(&watcher::Event::InitApply(Object("c", 4)));
        assert_eq!(cache.get(&key("a")).as_deref(), Some(&Doubled(6)));
        writer.apply(&watcher::Event::InitDone);
        assert_eq!(cache.get(&key("a")), None);
        assert_eq!(cache.state().len(), 1);
        assert_eq!(cache.get(&key("c")).as_deref(), Some(&Doubled(8)));
    }

    #[tokio::test]
    async fn a_cache_whose_watch_ended_before_listing_is_never_ready() {
        let (cache, writer) = cache::<Object, Doubled>();
        drop(writer);
        assert!(cache.wait_until_ready().await.is_err());
    }

    #[test]
    fn names_are_shared() {
        let mut names = Names::default();
        let (a, b) = (names.get("default"), names.get("default"));
        assert!(Arc::ptr_eq(&a, &b));
        let (a, b) = (names.node("node-1"), names.node("node-1"));
        assert!(Arc::ptr_eq(&a, &b));
    }
}
