//! `lb policy trace`: would NetworkPolicy allow a new connection from one
//! pod to another, and which policy and rule decide? Computed from the API's
//! objects with the same translation and lookups as the data path.

use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{api::ListParams, Api, Client};
use lb_common::policy::{DIR_EGRESS, DIR_INGRESS};

use crate::{
    policy::{evaluate, translate_policies, PolicyTranslation},
    translate::{protocol_number_any, NodeContext},
};

/// The answer for one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub direction: &'static str,
    pub pod: String,
    pub allowed: bool,
    pub reason: String,
}

fn explain(t: &PolicyTranslation, verdict: Option<u32>) -> (bool, String) {
    match verdict {
        None => (
            false,
            "no rule of the policies selecting it allows this".into(),
        ),
        Some(0) => (
            true,
            "not isolated in this direction (no policy selects it)".into(),
        ),
        Some(id) => match t.rule_names.get(&id) {
            Some(r) => (
                true,
                format!("allowed by {} {} rule {}", r.policy, r.direction, r.index),
            ),
            None => (true, format!("allowed by rule {id}")),
        },
    }
}

/// Egress of `from` and ingress of `to`, each on its own node.
pub fn trace(
    pods: &[Pod],
    namespaces: &[Namespace],
    policies: &[NetworkPolicy],
    from: &Pod,
    to: &Pod,
    proto: u8,
    port: u16,
) -> Result<Vec<Step>> {
    let ip = |p: &Pod| -> Result<Ipv4Addr> {
        p.status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .context("pod has no IP yet")?
            .parse()
            .context("pod IP")
    };
    let name = |p: &Pod| {
        format!(
            "{}/{}",
            p.metadata.namespace.as_deref().unwrap_or(""),
            p.metadata.name.as_deref().unwrap_or("")
        )
    };
    let node_of = |p: &Pod| NodeContext {
        name: p.spec.as_ref().and_then(|s| s.node_name.clone()),
        addrs: vec![],
        ..Default::default()
    };
    let (src, dst) = (ip(from)?, ip(to)?);
    let egress = translate_policies(pods, namespaces, policies, &node_of(from));
    let ingress = translate_policies(pods, namespaces, policies, &node_of(to));
    let (e_ok, e_why) = explain(
        &egress,
        evaluate(&egress.state, DIR_EGRESS, src, dst, proto, port),
    );
    let (i_ok, i_why) = explain(
        &ingress,
        evaluate(&ingress.state, DIR_INGRESS, dst, src, proto, port),
    );
    Ok(vec![
        Step {
            direction: "egress",
            pod: name(from),
            allowed: e_ok,
            reason: e_why,
        },
        Step {
            direction: "ingress",
            pod: name(to),
            allowed: i_ok,
            reason: i_why,
        },
    ])
}

/// The objects NetworkPolicy translation needs, from the API.
pub async fn policy_objects(
    client: &Client,
) -> Result<(Vec<Pod>, Vec<Namespace>, Vec<NetworkPolicy>)> {
    let lp = ListParams::default();
    Ok((
        Api::<Pod>::all(client.clone()).list(&lp).await?.items,
        Api::<Namespace>::all(client.clone()).list(&lp).await?.items,
        Api::<NetworkPolicy>::all(client.clone())
            .list(&lp)
            .await?
            .items,
    ))
}

/// The CLI: fetches the objects and prints the verdict.
pub async fn run(client: Client, from: &str, to: &str, port: u16, protocol: &str) -> Result<bool> {
    let proto = protocol_number_any(Some(protocol)).map_err(anyhow::Error::msg)?;
    let (pods, namespaces, policies) = policy_objects(&client).await?;
    let find = |id: &str| -> Result<&Pod> {
        let Some((ns, name)) = id.split_once('/') else {
            bail!("name pods as NAMESPACE/NAME, not {id:?}")
        };
        pods.iter()
            .find(|p| {
                p.metadata.namespace.as_deref() == Some(ns)
                    && p.metadata.name.as_deref() == Some(name)
            })
            .with_context(|| format!("pod {id} not found"))
    };
    let steps = trace(
        &pods,
        &namespaces,
        &policies,
        find(from)?,
        find(to)?,
        proto,
        port,
    )?;
    let allowed = steps.iter().all(|s| s.allowed);
    println!(
        "{from} -> {to} {protocol}/{port}: {}",
        if allowed { "ALLOW" } else { "DENY" }
    );
    for s in &steps {
        println!(
            "  {:<7} of {:<16} {:<5} {}",
            s.direction,
            s.pod,
            if s.allowed { "allow" } else { "deny" },
            s.reason
        );
    }
    Ok(allowed)
}
