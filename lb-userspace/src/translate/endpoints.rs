//! Which endpoints serve a Service port: from the Service's own
//! EndpointSlices, the ready ones for new flows (local ones only under a
//! Local traffic policy), the others kept for the flows already on them.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::{port_number, BackendAddr, NodeContext, ObjectError, SliceFacts};

/// An endpoint of one Service port, with what the choice of backends needs.
#[derive(Clone, Copy, Debug)]
pub(super) struct Candidate {
    pub(super) addr: BackendAddr,
    pub(super) ready: bool,
    pub(super) serving_terminating: bool,
}

/// The endpoints of one Service port, from the Service's EndpointSlices, on
/// the slice port whose name equals the Service port's name.
pub(super) fn candidates_for(
    slices: &[&SliceFacts],
    port_name: &str,
    proto: u8,
    node: &NodeContext,
    errors: &mut Vec<ObjectError>,
) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    for slice in slices {
        if !slice.ipv4 {
            continue;
        }
        for p in slice.ports.iter().filter(|p| &*p.name == port_name) {
            if let Err(e) = &p.proto {
                errors.push(ObjectError {
                    object: slice.object(),
                    message: format!("port {port_name:?}: {e}"),
                });
            }
        }
        let Some(port) = slice
            .ports
            .iter()
            .find(|p| &*p.name == port_name && p.proto.as_ref().ok() == Some(&proto))
        else {
            continue;
        };
        let port = match port.port.map(port_number) {
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                errors.push(ObjectError {
                    object: slice.object(),
                    message: e,
                });
                continue;
            }
            None => continue,
        };
        errors.extend(slice.bad_addresses.iter().map(|a| ObjectError {
            object: slice.object(),
            message: format!("endpoint address {a:?} is not an IPv4 address"),
        }));
        for ep in slice.endpoints.iter() {
            let IpAddr::V4(ip) = ep.address else {
                continue;
            };
            let addr = BackendAddr {
                ip,
                port,
                proto,
                local: node.runs(ep),
            };
            if out.iter().any(|c| c.addr == addr) {
                continue; // the same endpoint in two slices
            }
            out.push(Candidate {
                addr,
                ready: ep.ready,
                serving_terminating: ep.serving && ep.terminating,
            });
        }
    }
    out
}

/// Backends for one frontend: (active, retained).
///
/// New flows go to ready endpoints (local ones only under a Local traffic
/// policy); when there is none, to endpoints that are terminating but still
/// serving, as kube-proxy does, so a Service whose last pod is shutting down
/// keeps answering until the pod is gone. Every other listed endpoint is
/// retained for the flows already on it.
pub(super) fn choose(
    candidates: &[Candidate],
    local_only: bool,
) -> (Vec<BackendAddr>, Vec<BackendAddr>) {
    let eligible = |c: &&Candidate| !local_only || c.addr.local;
    let mut active: BTreeSet<BackendAddr> = candidates
        .iter()
        .filter(eligible)
        .filter(|c| c.ready)
        .map(|c| c.addr)
        .collect();
    if active.is_empty() {
        active = candidates
            .iter()
            .filter(eligible)
            .filter(|c| c.serving_terminating)
            .map(|c| c.addr)
            .collect();
    }
    let retained = candidates
        .iter()
        .map(|c| c.addr)
        .filter(|a| !active.contains(a))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    (active.into_iter().collect(), retained)
}

/// EndpointSlices by (namespace, Service name), so each Service finds its
/// own without a scan of all of them (10,000 Services would make that
/// quadratic).
pub fn slices_by_service<E: Borrow<SliceFacts>>(
    slices: &[E],
) -> BTreeMap<(&str, &str), Vec<&SliceFacts>> {
    let mut out: BTreeMap<(&str, &str), Vec<&SliceFacts>> = BTreeMap::new();
    for s in slices {
        let s: &SliceFacts = s.borrow();
        let Some(service) = s.service.as_deref() else {
            continue;
        };
        out.entry((&*s.namespace, service)).or_default().push(s);
    }
    out
}
