//! What an operator sees after real traffic in the demo lab: `lb inspect`
//! tables and JSON, bpftool dumps with named fields (BTF), and a scrape of
//! the agent's /metrics.

mod common;

use std::{collections::BTreeSet, process::Command};

use lb::lab::{kinds::Kind, Lab};
use serde_json::Value;

fn lb_inspect(lab: &Lab, what: &str, json: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lb"));
    // `what` may carry flags: "conntrack --summary".
    cmd.arg("inspect")
        .args(what.split_whitespace())
        .arg("--pin-dir")
        .arg(lab.pin_dir(1));
    if json {
        cmd.args(["-o", "json"]);
    }
    let out = cmd.output().expect("lb inspect");
    assert!(
        out.status.success(),
        "lb inspect {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn pod_ip(lab: &Lab, name: &str) -> String {
    let p = lab.store.get(Kind::Pod, "default", name).expect("pod");
    p["status"]["podIP"].as_str().expect("podIP").to_string()
}

/// The field names bpftool prints for each entry of a pinned map (BTF).
fn bpftool_fields(lab: &Lab, map: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(lab.pin_dir(1).join(map))
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool map dump {map}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let first = &dump[0]["formatted"];
    assert!(
        first.is_object(),
        "{map}: no formatted (BTF) entries in {dump}"
    );
    let names = |v: &Value| -> BTreeSet<String> {
        match v {
            Value::Object(o) => o.keys().cloned().collect(),
            _ => BTreeSet::new(),
        }
    };
    (names(&first["key"]), names(&first["value"]))
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_bpftool_and_metrics_show_the_live_state() {
    let lab = common::demo_lab('i').await;
    let vip = common::vip(&lab, "api-service", 80);
    common::wait_backends(&lab, vip, lb_common::PROTO_TCP, 3).await;
    common::wait_reachable(
        &lab,
        ("default", "client"),
        vip,
        std::time::Duration::from_secs(30),
    )
    .await;
    // An open connection, so conntrack holds it while we look.
    let open = common::OpenConnection::open(&lab.pod_netns("default", "client").unwrap(), vip)
        .expect("connect through the ClusterIP");
    open.ask().await.expect("request on the open connection");
    let (pods, failures) = common::burst(&lab, ("default", "client"), vip, 10).await;
    assert!(failures.is_empty(), "{failures:?}");

    let api_ips: BTreeSet<String> = lab
        .store
        .list(Kind::Pod, Some("default"))
        .0
        .iter()
        .filter(|p| p["metadata"]["labels"]["app"] == "api")
        .filter_map(|p| p["status"]["podIP"].as_str().map(|ip| format!("{ip}:5000")))
        .collect();
    assert_eq!(api_ips.len(), 3);

    // Services: the ClusterIP with the three api pods in its slots.
    let services: Value = serde_json::from_str(&lb_inspect(&lab, "services", true)).unwrap();
    let svc = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["frontend"] == vip.to_string() && s["protocol"] == "TCP")
        .unwrap_or_else(|| panic!("{vip} not in {services}"));
    assert_eq!(svc["types"], serde_json::json!(["ClusterIP"]));
    let backends: BTreeSet<String> = svc["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["address"].as_str().map(str::to_string))
        .collect();
    assert_eq!(backends, api_ips);
    let table = lb_inspect(&lab, "services", false);
    eprintln!("$ lb inspect services\n{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&vip.to_string()) && l.contains("(3 backends)")),
        "{table}"
    );
    let backends_table = lb_inspect(&lab, "backends", false);
    for ip in &api_ips {
        assert!(backends_table.contains(ip.as_str()), "{backends_table}");
    }

    // Conntrack: the client's flow to the ClusterIP, translated to an api pod.
    let client = pod_ip(&lab, "client");
    let ct: Value = serde_json::from_str(&lb_inspect(&lab, "conntrack", true)).unwrap();
    let flow = ct
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["kind"] == "forward"
                && c["destination"] == vip.to_string()
                && c["source"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(&format!("{client}:")))
        })
        .unwrap_or_else(|| panic!("no forward entry {client} -> {vip} in {ct}"));
    assert!(api_ips.contains(flow["nat"].as_str().unwrap()), "{flow}");
    assert!(lb_inspect(&lab, "conntrack", false).contains(&vip.to_string()));
    // Filtered by the client's address and limited; and summed up by state.
    let only: Value = serde_json::from_str(&lb_inspect(
        &lab,
        &format!("conntrack --addr {client} --limit 1"),
        true,
    ))
    .unwrap();
    let only = only.as_array().unwrap();
    assert_eq!(only.len(), 1, "{only:?}");
    assert!(only[0].to_string().contains(&client), "{only:?}");
    let summary: Value =
        serde_json::from_str(&lb_inspect(&lab, "conntrack --summary", true)).unwrap();
    assert!(summary["tcp_established"].as_u64() >= Some(2), "{summary}");
    assert!(lb_inspect(&lab, "conntrack --summary", false).contains("snat tuples held"));

    // Policy: the demo's allow-api-traffic isolates the api pods for ingress.
    let policy: Value = serde_json::from_str(&lb_inspect(&lab, "policy", true)).unwrap();
    let isolated: BTreeSet<String> = policy["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ingress_isolated"] == true)
        .map(|e| format!("{}:5000", e["address"].as_str().unwrap()))
        .collect();
    assert_eq!(isolated, api_ips);
    assert!(
        policy["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["direction"] == "ingress" && r["protocol"] == "TCP" && r["ports"] == "5000"),
        "{policy}"
    );
    let ids: Value = serde_json::from_str(&lb_inspect(&lab, "identities", true)).unwrap();
    assert!(
        ids.as_array()
            .unwrap()
            .iter()
            .any(|i| i["prefix"] == format!("{client}/32") && i["identity"].as_u64() >= Some(256)),
        "{ids}"
    );
    assert!(lb_inspect(&lab, "identities", false).contains(&format!("{client}/32")));

    // bpftool prints every BTF map's keys and values by field name.
    let expect: [(&str, &[&str], &[&str]); 5] = [
        (
            "SERVICES",
            &["addr", "port", "proto", "pad0", "slot", "pad1"],
            &[
                "backend_id",
                "count",
                "flags",
                "rev_nat_id",
                "maglev_size",
                "pad0",
                "affinity_timeout",
            ],
        ),
        ("BACKENDS", &[], &["addr", "port", "proto", "flags"]),
        (
            "CONNTRACK",
            &[
                "saddr",
                "daddr",
                "sport",
                "dport",
                "proto",
                "direction",
                "pad0",
            ],
            &[
                "last_seen_ns",
                "nat_addr",
                "nat_port",
                "rev_nat_id",
                "backend_id",
                "flags",
                "snat_port",
                "snat_addr",
                "pad0",
                "syn_seq",
                "pad1",
            ],
        ),
        ("ENDPOINTS", &[], &["endpoint_id", "flags"]),
        ("NODE", &[], &["addr", "snat_port_min", "snat_port_count"]),
    ];
    for (map, key, value) in expect {
        let (k, v) = bpftool_fields(&lab, map);
        if !key.is_empty() {
            assert_eq!(k, set(key), "{map} key fields");
        }
        assert_eq!(v, set(value), "{map} value fields");
    }

    // /metrics after that traffic.
    let (code, scrape) = common::agent_http(&lab, 1, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    let m = |name: &str| {
        common::metric(&scrape, name).unwrap_or_else(|| panic!("{name} missing:\n{scrape}"))
    };
    let requests: usize = pods.values().sum();
    assert!(m("lb_datapath_packets_total{reason=\"new_flow\"}") >= requests as f64);
    assert!(m("lb_datapath_packets_total{reason=\"forwarded\"}") > 0.0);
    assert!(m("lb_datapath_packets_total{reason=\"reverse_nat\"}") > 0.0);
    assert!(m("lb_services") >= 1.0);
    assert!(m("lb_backends") >= 3.0);
    assert!(m("lb_network_policies") >= 1.0);
    assert!(m("lb_conntrack_entries") >= 1.0);
    assert!(m("lb_sync_duration_seconds_count") >= 1.0);
    assert_eq!(m("lb_ready"), 1.0);
    for family in [
        "lb_errors_total",
        "lb_datapath_bytes_total",
        "lb_drift_repairs_total",
    ] {
        assert!(
            scrape.contains(&format!("# TYPE {family} counter")),
            "{family}:\n{scrape}"
        );
    }
    drop(open);
}
