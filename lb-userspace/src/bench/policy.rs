//! The NetworkPolicy side of the control path: a cluster of many pods and
//! policies, the agent's first programming of it, and how long a pod
//! relabel takes from the API write to the node's maps (the pod's ipcache
//! entry, which the agent writes first of the pass that also rewrites the
//! rules it touches). The pods are API objects only, on a node that is not
//! in the lab, so no network namespace is made for them; every node's
//! agent programs every pod's endpoint.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::maps::lpm_trie::Key;
use lb_common::policy::IpcacheKey;
use serde_json::json;

use crate::{
    datapath::Maps,
    lab::{kinds::Kind, Lab},
};

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub pods: usize,
    pub policies: usize,
    pub namespaces: usize,
    /// Distinct `app` label values per namespace.
    pub apps: usize,
    pub relabels: usize,
}

#[derive(Debug, Default)]
pub struct Results {
    pub pods: usize,
    pub policies: usize,
    pub namespaces: usize,
    /// The objects' creation done to the last pod's ipcache entry.
    pub sync: Duration,
    /// Each relabel's API write to ipcache update.
    pub relabel: Vec<Duration>,
}

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 210, 0, 0)) + i as u32)
}

fn pod(s: &Settings, i: usize, app: usize) -> serde_json::Value {
    json!({"metadata": {"name": format!("p{i}"), "namespace": format!("ns{}", i % s.namespaces),
                        "labels": {"app": format!("a{app}")}},
           "spec": {"nodeName": "elsewhere", "containers": [{"name": "c", "image": "none"}]},
           "status": {"podIP": pod_ip(i).to_string()}})
}

/// Policy `j` of a namespace: pods `a{j % apps}` take port 80 from `a{j+1}`.
fn policy(s: &Settings, ns: usize, j: usize) -> serde_json::Value {
    json!({"metadata": {"name": format!("np{j}"), "namespace": format!("ns{ns}")},
           "spec": {"podSelector": {"matchLabels": {"app": format!("a{}", j % s.apps)}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("a{}", (j + 1) % s.apps)}}}],
                                 "ports": [{"port": 80}]}]}})
}

/// Creates the cluster in `lab` (agent not started).
pub fn create(lab: &Lab, s: &Settings) -> Result<()> {
    for n in 0..s.namespaces {
        lab.store
            .create(Kind::Namespace, json!({"metadata": {"name": format!("ns{n}"), "labels": {"team": format!("t{}", n % 4)}}}))
            .context("creating a Namespace")?;
        for j in 0..s.policies / s.namespaces {
            lab.store
                .create(Kind::NetworkPolicy, policy(s, n, j))
                .context("creating a NetworkPolicy")?;
        }
    }
    for i in 0..s.pods {
        lab.store
            .create(Kind::Pod, pod(s, i, (i / s.namespaces) % s.apps))
            .context("creating a Pod")?;
    }
    Ok(())
}

fn identity_of(maps: &Maps, ip: Ipv4Addr) -> Option<u32> {
    let key = Key::new(
        32,
        IpcacheKey {
            addr: u32::from(ip).to_be(),
        },
    );
    maps.ipcache.get(&key, 0).ok()
}

/// Waits for the agent of node 1 to program the last pod; then relabels
/// pods one at a time and times each to its new identity in the ipcache.
pub fn run(lab: &Lab, s: &Settings, started: Instant) -> Result<Results> {
    let maps = loop {
        match Maps::open_pinned(&lab.pin_dir(1)) {
            Ok(m) => break m,
            Err(e) if started.elapsed() > Duration::from_secs(60) => {
                return Err(e.context("the agent's maps, 60 s after its start"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let last = pod_ip(s.pods - 1);
    while identity_of(&maps, last).is_none() {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the last pod was not programmed in 600 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut out = Results {
        pods: s.pods,
        policies: s.policies,
        namespaces: s.namespaces,
        sync: started.elapsed(),
        relabel: Vec::with_capacity(s.relabels),
    };
    for k in 0..s.relabels {
        let i = (k * 7919) % s.pods;
        let ns = format!("ns{}", i % s.namespaces);
        let current = lab.store.get(Kind::Pod, &ns, &format!("p{i}"))?;
        let was = identity_of(&maps, pod_ip(i)).context("a programmed pod")?;
        let app = (i / s.namespaces + k + 1) % s.apps;
        let mut obj = current.clone();
        obj["metadata"]["labels"]["app"] = json!(format!("a{app}-{k}"));
        let t = Instant::now();
        lab.store.replace(Kind::Pod, obj)?;
        while identity_of(&maps, pod_ip(i)) == Some(was) {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("pod ns/p{i}: its identity did not change 30 s after its relabel");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        out.relabel.push(t.elapsed());
    }
    Ok(out)
}
