//! Server-side printing: the `Table` (meta.k8s.io/v1) kube-apiserver
//! answers `kubectl get` with, so that `kubectl get svc` prints TYPE,
//! CLUSTER-IP, EXTERNAL-IP and PORT(S). kubectl has no client-side
//! fallback to these columns: without a Table it prints NAME and AGE only.
//!
//! Columns and cells follow kube-apiserver's printers
//! (`kubernetes/kubernetes pkg/printers/internalversion/printers.go`); the
//! server always fills the `-o wide` cells (priority 1) and kubectl hides
//! them unless asked. Each row carries the object's metadata, from which
//! kubectl adds NAMESPACE (`-A`) and label columns itself.

use serde_json::{json, Value};

use super::kinds::Kind;

/// Whether an Accept header asks for a Table (kubectl sends
/// `application/json;as=Table;v=v1;g=meta.k8s.io,...` for human output).
pub fn wants_table(accept: &str) -> bool {
    accept.split(',').any(|media| {
        let params: Vec<&str> = media.split(';').map(str::trim).collect();
        params.contains(&"as=Table") && params.contains(&"g=meta.k8s.io")
    })
}

/// A column: its name (kubectl upper-cases it for the header), its type,
/// and whether only `-o wide` shows it.
struct Column(&'static str, &'static str, bool);

const NAME: Column = Column("Name", "string", false);
const AGE: Column = Column("Age", "string", false);

fn columns(kind: Kind) -> Vec<Column> {
    let s = |n| Column(n, "string", false);
    let wide = |n| Column(n, "string", true);
    let number = |n| Column(n, "integer", false);
    match kind {
        Kind::Service => vec![
            NAME,
            s("Type"),
            s("Cluster-IP"),
            s("External-IP"),
            s("Port(s)"),
            AGE,
            wide("Selector"),
        ],
        Kind::Pod => vec![
            NAME,
            s("Ready"),
            s("Status"),
            s("Restarts"),
            AGE,
            wide("IP"),
            wide("Node"),
            wide("Nominated Node"),
            wide("Readiness Gates"),
        ],
        Kind::Endpoints => vec![NAME, s("Endpoints"), AGE],
        Kind::EndpointSlice => vec![NAME, s("AddressType"), s("Ports"), s("Endpoints"), AGE],
        Kind::NetworkPolicy => vec![NAME, s("Pod-Selector"), AGE],
        Kind::Deployment => vec![
            NAME,
            s("Ready"),
            number("Up-to-date"),
            number("Available"),
            AGE,
            wide("Containers"),
            wide("Images"),
            wide("Selector"),
        ],
        Kind::ReplicaSet => vec![
            NAME,
            number("Desired"),
            number("Current"),
            number("Ready"),
            AGE,
            wide("Containers"),
            wide("Images"),
            wide("Selector"),
        ],
        Kind::Namespace => vec![NAME, s("Status"), AGE],
        Kind::Node => vec![
            NAME,
            s("Status"),
            s("Roles"),
            AGE,
            s("Version"),
            wide("Internal-IP"),
        ],
        Kind::Event => vec![
            s("Last Seen"),
            s("Type"),
            s("Reason"),
            s("Object"),
            s("Message"),
        ],
    }
}

/// The Table of `objects` of `kind` at `now` (seconds since the epoch).
pub fn table(
    kind: Kind,
    objects: &[impl std::borrow::Borrow<Value>],
    resource_version: &str,
    now: i64,
) -> Value {
    let definitions: Vec<Value> = columns(kind)
        .iter()
        .map(|Column(name, ty, wide)| {
            json!({
                "name": name, "type": ty,
                "format": if *name == "Name" { "name" } else { "" },
                "description": "", "priority": u8::from(*wide),
            })
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let o = o.borrow();
            json!({
                "cells": cells(kind, o, now),
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": o["metadata"],
                },
            })
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": definitions,
        "rows": rows,
    })
}

fn cells(kind: Kind, o: &Value, now: i64) -> Vec<Value> {
    let name = json!(o["metadata"]["name"].as_str().unwrap_or(""));
    let age = json!(age(o, now));
    match kind {
        Kind::Service => service_cells(o, name, age),
        Kind::Pod => pod_cells(o, name, age),
        Kind::Endpoints => vec![name, json!(endpoints_addresses(o)), age],
        Kind::EndpointSlice => vec![
            name,
            json!(text_or(&o["addressType"], "<unset>")),
            json!(slice_ports(o)),
            json!(slice_addresses(o)),
            age,
        ],
        Kind::NetworkPolicy => vec![name, json!(selector(&o["spec"]["podSelector"])), age],
        Kind::Deployment => {
            let st = &o["status"];
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    int(&st["readyReplicas"]),
                    int(&o["spec"]["replicas"])
                )),
                json!(int(&st["updatedReplicas"])),
                json!(int(&st["availableReplicas"])),
                age,
                json!(containers(o, "name")),
                json!(containers(o, "image")),
                json!(selector(&o["spec"]["selector"])),
            ]
        }
        Kind::ReplicaSet => vec![
            name,
            json!(int(&o["spec"]["replicas"])),
            json!(int(&o["status"]["replicas"])),
            json!(int(&o["status"]["readyReplicas"])),
            age,
            json!(containers(o, "name")),
            json!(containers(o, "image")),
            json!(selector(&o["spec"]["selector"])),
        ],
        Kind::Namespace => vec![name, json!(text_or(&o["status"]["phase"], "Active")), age],
        Kind::Node => node_cells(o, name, age),
        Kind::Event => vec![
            json!(event_last_seen(o, now)),
            json!(text_or(&o["type"], "")),
            json!(text_or(&o["reason"], "")),
            json!(format!(
                "{}/{}",
                text_or(&o["involvedObject"]["kind"], "").to_ascii_lowercase(),
                text_or(&o["involvedObject"]["name"], "")
            )),
            json!(text_or(&o["message"], "").trim()),
        ],
    }
}

fn service_cells(o: &Value, name: Value, age: Value) -> Vec<Value> {
    let spec = &o["spec"];
    let ty = text_or(&spec["type"], "ClusterIP");
    let cluster_ip = spec["clusterIPs"][0]
        .as_str()
        .or(spec["clusterIP"].as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("<none>");
    let ports: Vec<String> = list(&spec["ports"])
        .iter()
        .map(|p| {
            let proto = text_or(&p["protocol"], "TCP");
            match p["nodePort"].as_u64() {
                Some(np) => format!("{}:{np}/{proto}", int(&p["port"])),
                None => format!("{}/{proto}", int(&p["port"])),
            }
        })
        .collect();
    vec![
        name,
        json!(ty),
        json!(cluster_ip),
        json!(external_ip(o, ty)),
        json!(joined_or(&ports, "<none>")),
        age,
        json!(map_selector(&spec["selector"])),
    ]
}

/// EXTERNAL-IP: a LoadBalancer's ingress addresses (and external IPs), or
/// `<pending>`; otherwise the external IPs, or the ExternalName.
fn external_ip(o: &Value, ty: &str) -> String {
    let mut ips: Vec<String> = Vec::new();
    if ty == "LoadBalancer" {
        for i in list(&o["status"]["loadBalancer"]["ingress"]) {
            if let Some(a) = i["ip"].as_str().or(i["hostname"].as_str()) {
                ips.push(a.to_string());
            }
        }
    }
    if ty == "ExternalName" {
        return text_or(&o["spec"]["externalName"], "<none>").to_string();
    }
    ips.extend(strings(&o["spec"]["externalIPs"]));
    match (ips.is_empty(), ty) {
        (true, "LoadBalancer") => "<pending>".into(),
        (true, _) => "<none>".into(),
        (false, _) => ips.join(","),
    }
}

fn pod_cells(o: &Value, name: Value, age: Value) -> Vec<Value> {
    let statuses = list(&o["status"]["containerStatuses"]);
    let total = list(&o["spec"]["containers"]).len();
    let ready = statuses
        .iter()
        .filter(|c| c["ready"] == true && c["state"]["running"].is_object())
        .count();
    let restarts: u64 = statuses
        .iter()
        .map(|c| c["restartCount"].as_u64().unwrap_or(0))
        .sum();
    let mut reason = o["status"]["reason"]
        .as_str()
        .or(o["status"]["phase"].as_str())
        .unwrap_or("Unknown")
        .to_string();
    for c in statuses {
        if let Some(r) = c["state"]["waiting"]["reason"]
            .as_str()
            .or(c["state"]["terminated"]["reason"].as_str())
        {
            reason = r.to_string();
        }
    }
    let phase = o["status"]["phase"].as_str().unwrap_or("");
    if !o["metadata"]["deletionTimestamp"].is_null() && !matches!(phase, "Succeeded" | "Failed") {
        reason = "Terminating".into();
    }
    let ip = o["status"]["podIPs"][0]["ip"]
        .as_str()
        .or(o["status"]["podIP"].as_str())
        .unwrap_or("<none>");
    vec![
        name,
        json!(format!("{ready}/{total}")),
        json!(reason),
        json!(restarts.to_string()),
        age,
        json!(ip),
        json!(text_or(&o["spec"]["nodeName"], "<none>")),
        json!("<none>"),
        json!("<none>"),
    ]
}

fn node_cells(o: &Value, name: Value, age: Value) -> Vec<Value> {
    let ready = list(&o["status"]["conditions"])
        .iter()
        .find(|c| c["type"] == "Ready")
        .map(|c| {
            if c["status"] == "True" {
                "Ready"
            } else {
                "NotReady"
            }
        })
        .unwrap_or("Unknown");
    let mut status = ready.to_string();
    if o["spec"]["unschedulable"] == true {
        status.push_str(",SchedulingDisabled");
    }
    let mut roles: Vec<String> = o["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/"))
        .map(str::to_string)
        .collect();
    roles.sort();
    let internal_ip = list(&o["status"]["addresses"])
        .iter()
        .find(|a| a["type"] == "InternalIP")
        .and_then(|a| a["address"].as_str())
        .unwrap_or("<none>");
    vec![
        name,
        json!(status),
        json!(joined_or(&roles, "<none>")),
        age,
        json!(text_or(&o["status"]["nodeInfo"]["kubeletVersion"], "")),
        json!(internal_ip),
    ]
}

fn slice_ports(o: &Value) -> String {
    let ports: Vec<String> = list(&o["ports"])
        .iter()
        .map(|p| match (p["port"].as_u64(), p["name"].as_str()) {
            (Some(n), _) => n.to_string(),
            (None, Some(name)) if !name.is_empty() => name.to_string(),
            _ => "*".into(),
        })
        .collect();
    joined_or(&ports, "<unset>")
}

fn slice_addresses(o: &Value) -> String {
    let addrs: Vec<String> = list(&o["endpoints"])
        .iter()
        .flat_map(|e| strings(&e["addresses"]))
        .collect();
    at_most_three(&addrs, "<unset>")
}

/// `ip:port` for every port of every subset (`ip` alone in a subset
/// without ports), as `formatEndpoints` prints them.
fn endpoints_addresses(o: &Value) -> String {
    let mut shown = Vec::new();
    for subset in list(&o["subsets"]) {
        let ips: Vec<String> = list(&subset["addresses"])
            .iter()
            .map(|a| text_or(&a["ip"], "").to_string())
            .collect();
        let ports = list(&subset["ports"]);
        if ports.is_empty() {
            shown.extend(ips);
            continue;
        }
        for port in ports {
            shown.extend(ips.iter().map(|ip| format!("{ip}:{}", int(&port["port"]))));
        }
    }
    at_most_three(&shown, "<none>")
}

/// The first three, then `" + N more..."`, as kube-apiserver shortens
/// endpoint lists.
fn at_most_three(items: &[String], empty: &str) -> String {
    if items.is_empty() {
        return empty.into();
    }
    let shown = items[..items.len().min(3)].join(",");
    match items.len() {
        n if n > 3 => format!("{shown} + {} more...", n - 3),
        _ => shown,
    }
}

/// A label selector as `metav1.FormatLabelSelector` writes it: `<none>`
/// for the empty one; `k=v` pairs and `key in (a,b)` expressions, sorted
/// by key as the selector's requirements are.
pub fn selector(sel: &Value) -> String {
    let mut parts: Vec<(String, String)> = Vec::new();
    if let Some(labels) = sel["matchLabels"].as_object() {
        for (k, v) in labels {
            parts.push((k.clone(), format!("{k}={}", v.as_str().unwrap_or(""))));
        }
    }
    for e in list(&sel["matchExpressions"]) {
        let key = text_or(&e["key"], "");
        let mut values = strings(&e["values"]);
        values.sort();
        let values = values.join(",");
        let text = match text_or(&e["operator"], "") {
            "In" => format!("{key} in ({values})"),
            "NotIn" => format!("{key} notin ({values})"),
            "Exists" => key.to_string(),
            "DoesNotExist" => format!("!{key}"),
            op => format!("{key} {op} ({values})"),
        };
        parts.push((key.to_string(), text));
    }
    parts.sort_by(|a, b| a.0.cmp(&b.0));
    let texts: Vec<String> = parts.into_iter().map(|(_, t)| t).collect();
    joined_or(&texts, "<none>")
}

/// A Service's selector (a plain map), sorted by key.
fn map_selector(sel: &Value) -> String {
    let mut parts: Vec<String> = sel
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    parts.sort();
    joined_or(&parts, "<none>")
}

fn containers(o: &Value, field: &str) -> String {
    let values: Vec<String> = list(&o["spec"]["template"]["spec"]["containers"])
        .iter()
        .filter_map(|c| c[field].as_str().map(str::to_string))
        .collect();
    values.join(",")
}

fn event_last_seen(o: &Value, now: i64) -> String {
    let at = ["lastTimestamp", "firstTimestamp", "eventTime"]
        .iter()
        .find_map(|f| o[*f].as_str().and_then(seconds));
    at.map_or("<unknown>".into(), |t| human_duration(now - t))
}

fn age(o: &Value, now: i64) -> String {
    o["metadata"]["creationTimestamp"]
        .as_str()
        .and_then(seconds)
        .map_or("<unknown>".into(), |t| human_duration(now - t))
}

/// An RFC 3339 time in seconds since the epoch.
fn seconds(text: &str) -> Option<i64> {
    text.parse::<jiff::Timestamp>().ok().map(|t| t.as_second())
}

/// apimachinery's `duration.HumanDuration`: two units at most, coarser
/// as the age grows.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let s = secs.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86_400);
    let y = d / 365;
    match s {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 && s % 60 == 0 => format!("{m}m"),
        _ if m < 10 => format!("{m}m{}s", s % 60),
        _ if h < 3 => format!("{m}m"),
        _ if h < 8 && m % 60 == 0 => format!("{h}h"),
        _ if h < 8 => format!("{h}h{}m", m % 60),
        _ if h < 48 => format!("{h}h"),
        _ if h < 192 && h % 24 == 0 => format!("{d}d"),
        _ if h < 192 => format!("{d}d{}h", h % 24),
        _ if y < 2 => format!("{d}d"),
        _ if y < 8 && d % 365 == 0 => format!("{y}y"),
        _ if y < 8 => format!("{y}y{}d", d % 365),
        _ => format!("{y}y"),
    }
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    list(v)
        .iter()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

fn text_or<'a>(v: &'a Value, default: &'a str) -> &'a str {
    v.as_str().filter(|s| !s.is_empty()).unwrap_or(default)
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn joined_or(items: &[String], empty: &str) -> String {
    if items.is_empty() {
        empty.into()
    } else {
        items.join(",")
    }
}

#[cfg(test)]
#[path = "printing_tests.rs"]
mod tests;
