//! What the agent's service side keeps in memory, per Service, measured in
//! this process without a kernel or an API server: the same caches, index
//! and writer the agent builds, from objects as the API sends them, with
//! the map writes discarded. Counted by the allocator (`memory::live_bytes`,
//! `memory::peak_bytes`): bytes asked for, repeatable from run to run,
//! where the resident set also holds the binary, the programs' load and
//! the allocator's free pages. For the control bench, which runs it before
//! any lab: the counters are the whole process's, so nothing else may
//! allocate or free much meanwhile.

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Service;
use kube::runtime::watcher;

use super::{
    cache::{cache, CacheWriter, Kept},
    memory::{live_bytes, peak_bytes, reset_peak},
    services::{ServiceCache, ServiceMaps, ServiceSide, SliceCache},
};
use crate::{
    plan::{Capacity, MapOp, MapState},
    translate::{EndpointSlice, NodeContext, ServiceFacts, SliceFacts},
};

/// Bytes, each for the whole cluster measured.
#[derive(Clone, Debug, Default)]
pub struct Retained {
    pub services: usize,
    pub endpoints: usize,
    /// The Service and EndpointSlice caches (`cache::Cache`).
    pub caches: usize,
    /// What the service side keeps after the first pass: its index of
    /// frontends, slice index, writer (what the maps hold, ids, owners).
    pub after_pass: usize,
    /// The most the first pass held at once above what was there before it.
    pub pass_peak: usize,
    /// What the service side keeps after `changes` endpoint changes.
    pub after_changes: usize,
    pub changes: usize,
}

/// Map writes go nowhere: only the agent's own memory is measured.
struct Discard;

impl ServiceMaps for Discard {
    fn fresh(&mut self) -> bool {
        true
    }

    fn read(&self) -> Result<MapState> {
        Ok(MapState::default())
    }

    fn apply(&mut self, _: &[MapOp]) -> Result<()> {
        Ok(())
    }
}

/// Service `i` as the API sends it: a ClusterIP with one port, and the
/// fields the API server fills in.
fn service_json(i: usize) -> serde_json::Value {
    let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 96, 0, 0)) + i as u32);
    serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "default",
                     "uid": format!("0b6c3c1e-6d1f-4a59-9d7e-{i:012}"),
                     "resourceVersion": format!("{}", 1000 + i),
                     "creationTimestamp": "2026-12-07T12:00:00Z"},
        "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
                 "clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()],
                 "type": "ClusterIP", "sessionAffinity": "None",
                 "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                 "internalTrafficPolicy": "Cluster"},
        "status": {"loadBalancer": {}}
    })
}

/// Service `i`'s one slice, `ready` of its `endpoints` ready.
fn slice_json(i: usize, endpoints: usize, ready: usize) -> serde_json::Value {
    let eps: Vec<_> = (0..endpoints)
        .map(|e| {
            let ip = crate::bench::control::endpoint_ip(i, e, endpoints);
            serde_json::json!({"addresses": [ip.to_string()],
                "conditions": {"ready": e < ready, "serving": e < ready, "terminating": false},
                "nodeName": "node-2",
                "targetRef": {"kind": "Pod", "namespace": "default", "name": format!("svc-{i}-{e}")}})
        })
        .collect();
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-1"), "namespace": "default",
                     "uid": format!("5d2f1a0c-2b7e-4c11-8f3a-{i:012}"),
                     "resourceVersion": format!("{}", 1000 + i),
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}"),
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps
    })
}

/// Decodes an object from its JSON bytes, as the watcher does.
fn decoded<K: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<K> {
    let bytes = serde_json::to_vec(v)?;
    serde_json::from_slice(&bytes).context("decoding")
}

fn applied<K, T: Kept<K>>(writer: &mut CacheWriter<K, T>, k: K) {
    writer.apply(&watcher::Event::Apply(k));
}

/// Builds the caches of `services` Services of `endpoints` endpoints, runs
/// the agent's first pass over them, then `changes` endpoint changes (each
/// takes one endpoint of a Service out of ready, or puts it back), and
/// counts the bytes at each step.
pub fn measure(services: usize, endpoints: usize, changes: usize) -> Result<Retained> {
    let mut out = Retained {
        services,
        endpoints,
        changes,
        ..Default::default()
    };
    let before = live_bytes();
    let (svc_store, mut svc_writer): (ServiceCache, _) = cache::<Service, ServiceFacts>();
    let (slice_store, mut slice_writer): (SliceCache, _) = cache::<EndpointSlice, SliceFacts>();
    for i in 0..services {
        applied(&mut svc_writer, decoded::<Service>(&service_json(i))?);
        applied(
            &mut slice_writer,
            decoded::<EndpointSlice>(&slice_json(i, endpoints, endpoints))?,
        );
    }
    out.caches = live_bytes().saturating_sub(before);

    let node = NodeContext {
        name: Some("node-1".into()),
        ..Default::default()
    };
    // Room for every entry, as `--services-map-max` gives the agent.
    let capacity = Capacity {
        services: services * (endpoints + 1) * 2,
        backends: services * endpoints * 2,
        maglev_tables: services * 2,
    };
    let mut side = ServiceSide::new(capacity);
    let start = live_bytes();
    reset_peak();
    side.full_pass(&mut Discard, &svc_store, &slice_store, &node, true)?;
    out.pass_peak = peak_bytes().saturating_sub(start);
    out.after_pass = live_bytes().saturating_sub(start);

    let mut ready = vec![endpoints; services];
    for k in 0..changes {
        let i = crate::bench::control::changed_service(k, services);
        ready[i] = crate::bench::control::flipped_count(ready[i], endpoints);
        let slice: EndpointSlice = decoded(&slice_json(i, endpoints, ready[i]))?;
        let key = ("default".to_string(), format!("svc-{i}-1"));
        applied(&mut slice_writer, slice);
        let now = slice_store.get(&key);
        let dirty = side
            .slices
            .update(&key, now.as_deref())
            .into_iter()
            .collect();
        side.reconcile(&mut Discard, &svc_store, &slice_store, &node, &dirty)?;
    }
    out.after_changes = live_bytes().saturating_sub(start);
    drop(side);
    drop((svc_store, svc_writer, slice_store, slice_writer));
    Ok(out)
}
