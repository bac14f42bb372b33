//! The watchers at the agent's edge: a kube-rs reflector per kind keeps a
//! cache, and every change is sent on as the key of what changed, so the
//! agent reconciles only what a change touches.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        networking::v1::NetworkPolicy,
    },
    Resource as _,
};
use kube::{
    runtime::{reflector, watcher, WatchStreamExt},
    Api,
};
use tokio::sync::mpsc::UnboundedSender;

use super::{
    cache::{self, Cache, Kept},
    slim::Slim,
};
use crate::translate::EndpointSlice;

/// What changed, as the agent's loop needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A Service (namespace, name).
    Service(String, String),
    /// An EndpointSlice (namespace, name).
    Slice(String, String),
    /// A Node: its addresses are the NodePort frontends (all Services).
    Node,
    /// A Pod (namespace, name): its policy endpoint and identity.
    Pod(String, String),
    /// A Namespace: its pods' identities.
    Namespace(String),
    /// A NetworkPolicy (namespace, name).
    NetworkPolicy(String, String),
    /// A watch of this kind listed everything again (after a lost
    /// connection): deletions meanwhile were not seen one by one.
    Relisted(&'static str),
}

/// The API resources the agent watches, as (API group, plural). The
/// ClusterRole in `manifests/install/rbac.yaml` grants get, list and watch on
/// exactly these (a test checks it), and `reflect` refuses any other.
pub const WATCHED: [(&str, &str); 6] = [
    (Service::GROUP, Service::URL_PATH_SEGMENT),
    (EndpointSlice::GROUP, EndpointSlice::URL_PATH_SEGMENT),
    (Node::GROUP, Node::URL_PATH_SEGMENT),
    (Pod::GROUP, Pod::URL_PATH_SEGMENT),
    (Namespace::GROUP, Namespace::URL_PATH_SEGMENT),
    (NetworkPolicy::GROUP, NetworkPolicy::URL_PATH_SEGMENT),
];

/// Retries a failed watch after 0.2 s, doubling up to 5 s, with up to 25%
/// jitter: the agent catches up soon after the API server comes back
/// (kube's default waits up to 30 s), without every node retrying at once.
struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self {
            next: Duration::from_millis(200),
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (base * 2).min(Duration::from_secs(5));
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = base.mul_f64(f64::from(nanos % 1000) / 4000.0);
        Some(base + jitter)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        *self = Self::default();
    }
}

/// Starts a reflector for `K`; each change goes to `changes` as `key` of
/// the object. Objects are cut to what the agent reads (`Slim`) before
/// they are stored.
pub fn reflect<K>(
    api: Api<K>,
    changes: UnboundedSender<Change>,
    key: fn(&K) -> Change,
) -> reflector::Store<K>
where
    K: Watched + Slim,
{
    let (reader, mut writer) = reflector::store();
    spawn_watch(api, changes, key, move |event: watcher::Event<K>| {
        let event = event.modify(Slim::slim);
        writer.apply_watcher_event(&event);
        event
    });
    reader
}

/// Starts a watch of `K` into a cache of the agent's own, which keeps `T`
/// of each object (`cache::Kept`); each change goes to `changes` as `key`.
pub fn keep<K, T>(
    api: Api<K>,
    changes: UnboundedSender<Change>,
    key: fn(&K) -> Change,
) -> Cache<T::Key, T>
where
    K: Watched,
    T: Kept<K> + Send + Sync + 'static,
{
    let (reader, mut writer) = cache::cache::<K, T>();
    spawn_watch(api, changes, key, move |event: watcher::Event<K>| {
        writer.apply(&event);
        event
    });
    reader
}

/// What a watched kind must be.
pub trait Watched:
    kube::Resource<DynamicType = ()>
    + k8s_openapi::Resource
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
}

impl<K> Watched for K where
    K: kube::Resource<DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

/// Watches `K`, hands each event to `apply` (which stores it) and then
/// sends the change on. The first listing is not sent (the agent's first
/// pass reads the caches whole); later listings are sent as
/// `Change::Relisted`.
///
/// The state comes as a streaming list (`sendInitialEvents`, client-go's
/// way since Kubernetes 1.32): one watch whose first events are the
/// objects, decoded as the API server writes them. A paged list is a round
/// trip per 500 objects, the server and the agent each idle while the
/// other works: at 10,000 EndpointSlices, half of a new agent's start. An
/// API server that refuses it (1.33 with its WatchList gate off by default,
/// 1.27-1.31 unless turned on) gets paged lists instead, of 500 (kube's
/// default), so that a large cluster's list is never held whole.
fn spawn_watch<K: Watched>(
    api: Api<K>,
    changes: UnboundedSender<Change>,
    key: fn(&K) -> Change,
    mut apply: impl FnMut(watcher::Event<K>) -> watcher::Event<K> + Send + 'static,
) {
    debug_assert!(
        WATCHED.contains(&(K::GROUP, K::URL_PATH_SEGMENT)),
        "{} is watched but not in WATCHED (nor in the ClusterRole)",
        K::URL_PATH_SEGMENT
    );
    tokio::spawn(async move {
        let mut listed = false;
        let mut config = watcher::Config::default().streaming_lists();
        loop {
            let stream = watcher(api.clone(), config.clone())
                .map_ok(&mut apply)
                .backoff(WatchBackoff::default());
            futures::pin_mut!(stream);
            let mut refused = None;
            while let Some(item) = stream.next().await {
                let change = match item {
                    Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => key(&o),
                    Ok(watcher::Event::InitDone) if listed => Change::Relisted(K::URL_PATH_SEGMENT),
                    Ok(watcher::Event::InitDone) => {
                        listed = true;
                        continue;
                    }
                    Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                    Err(e) if streaming_refused(&config, &e) => {
                        refused = Some(e);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!("watch {}: {e}", K::URL_PATH_SEGMENT);
                        continue;
                    }
                };
                if changes.send(change).is_err() {
                    return;
                }
            }
            let Some(why) = refused else {
                return;
            };
            tracing::info!(
                "watch {}: the API server does not stream lists (WatchList off?): paged lists \
                 instead ({why})",
                K::URL_PATH_SEGMENT
            );
            config = watcher::Config::default();
        }
    });
}

/// Whether `e` is the API server refusing a streaming list (422 Invalid,
/// or 400 from a server that cannot read the request), when the watch is
/// asked for or as its first event.
fn streaming_refused(config: &watcher::Config, e: &watcher::Error) -> bool {
    let refusal = |code: u16| code == 422 || code == 400;
    config.initial_list_strategy == watcher::InitialListStrategy::StreamingList
        && match e {
            watcher::Error::WatchStartFailed(kube::Error::Api(s)) => refusal(s.code),
            watcher::Error::WatchError(s) => refusal(s.code),
            _ => false,
        }
}

fn namespaced_name(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

pub fn service_change(s: &Service) -> Change {
    let (ns, name) = namespaced_name(&s.metadata);
    Change::Service(ns, name)
}

pub fn slice_change(s: &EndpointSlice) -> Change {
    let (ns, name) = namespaced_name(&s.metadata);
    Change::Slice(ns, name)
}

pub fn node_change(_: &Node) -> Change {
    Change::Node
}

pub fn pod_change(p: &Pod) -> Change {
    let (ns, name) = namespaced_name(&p.metadata);
    Change::Pod(ns, name)
}

pub fn namespace_change(n: &Namespace) -> Change {
    Change::Namespace(n.metadata.name.clone().unwrap_or_default())
}

pub fn network_policy_change(p: &NetworkPolicy) -> Change {
    let (ns, name) = namespaced_name(&p.metadata);
    Change::NetworkPolicy(ns, name)
}
