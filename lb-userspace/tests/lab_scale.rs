//! Scale: 10,000 Services with 10 endpoints each, through the lab API,
//! converge on the node's maps, the agent's memory stays bounded, and the
//! data path still serves. (How fast is for `cargo xtask bench`; here only
//! that it converges, within a generous deadline.)

mod common;

use std::time::{Duration, Instant};

use lb::lab::{kinds::Kind, Lab};
use serde_json::json;

const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 10;

/// The agent of node 1: its pid, found among the node namespace's processes.
fn agent_pid(lab: &Lab) -> Option<u32> {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", &lab.node_netns(1)])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"agent"))
        })
}

/// (resident, peak resident) memory of a process, in MiB.
fn memory_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn wait_programmed(lab: &Lab, services: f64, backends: f64, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let scrape = common::agent_http(lab, 1, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        let s = common::metric(&scrape, "lb_services").unwrap_or(-1.0);
        let b = common::metric(&scrape, "lb_backends").unwrap_or(-1.0);
        if s == services && b == backends {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "after {within:?}: {s} services and {b} backends programmed, want {services} and {backends}\n{}",
            common::agent_log_tail(lab, 1, 20)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_services_with_ten_endpoints_each_converge_in_bounded_memory() {
    let lab = common::lab_with('s', common::test_manifests("scale"), 1).await;
    let probe = common::vip(&lab, "good", 80);
    common::wait_backends(&lab, probe, lb_common::PROTO_TCP, 2).await;
    let scrape = common::agent_http(&lab, 1, "/metrics").await.unwrap().1;
    let base_services = common::metric(&scrape, "lb_services").unwrap();
    let base_backends = common::metric(&scrape, "lb_backends").unwrap();
    let pid = agent_pid(&lab).expect("agent pid");
    let (rss_before, _) = memory_mib(pid);
    let maps = lb::datapath::Maps::open_pinned(&lab.pin_dir(1)).unwrap();
    let entries_before = map_entries(&maps);

    let started = Instant::now();
    for i in 0..SERVICES {
        let name = format!("scale-{i}");
        lab.store
            .create(
                Kind::Service,
                json!({"metadata": {"name": name, "namespace": "default"},
                       "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
            )
            .expect("service");
        let endpoints: Vec<_> = (0..ENDPOINTS)
            .map(|e| {
                let n = i * ENDPOINTS + e;
                json!({"addresses": [format!("10.{}.{}.{}", 200 + n / 65536, n / 256 % 256, n % 256)],
                       "conditions": {"ready": true}})
            })
            .collect();
        lab.store
            .create(
                Kind::EndpointSlice,
                json!({"metadata": {"name": format!("{name}-1"), "namespace": "default",
                                    "labels": {"kubernetes.io/service-name": name}},
                       "addressType": "IPv4",
                       "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                       "endpoints": endpoints}),
            )
            .expect("slice");
    }
    let created = started.elapsed();
    let took = wait_programmed(
        &lab,
        base_services + SERVICES as f64,
        base_backends + (SERVICES * ENDPOINTS) as f64,
        Duration::from_secs(600),
    )
    .await;
    let (rss, peak) = memory_mib(pid);
    eprintln!(
        "{SERVICES} Services x {ENDPOINTS} endpoints: created in the API in {created:?}, programmed {took:?} later; agent RSS {rss_before} MiB before, {rss} MiB after, peak {peak} MiB"
    );
    // Spot checks in the map itself.
    for i in [0, SERVICES / 2, SERVICES - 1] {
        let vip = common::vip(&lab, &format!("scale-{i}"), 80);
        let std::net::SocketAddr::V4(v4) = vip else {
            unreachable!()
        };
        let key = lb::plan::service_key(*v4.ip(), 80, lb_common::PROTO_TCP, 0);
        assert_eq!(maps.services.get(&key, 0).unwrap().count, ENDPOINTS as u16);
    }
    // The data path still serves.
    common::request(&lab, ("default", "client"), probe)
        .await
        .expect("probe Service");
    // Bounded: ~100,000 backends cost the agent some tens of MiB, not
    // hundreds. (A leak per object or per pass would show here.)
    assert!(peak < 768, "agent peak RSS {peak} MiB");

    let (services, backends, tables) = map_entries(&maps);
    assert_eq!(
        services - entries_before.0,
        SERVICES * (ENDPOINTS + 1),
        "a master entry and {ENDPOINTS} slots per Service"
    );
    assert_eq!(backends - entries_before.1, SERVICES * ENDPOINTS);
    assert_eq!(
        tables - entries_before.2,
        0,
        "no Maglev table for a ClusterIP (conntrack pins its flows)"
    );

    // And everything goes away again: no entry of theirs is left behind.
    for i in 0..SERVICES {
        let name = format!("scale-{i}");
        lab.store.delete(Kind::Service, "default", &name).unwrap();
        lab.store
            .delete(Kind::EndpointSlice, "default", &format!("{name}-1"))
            .unwrap();
    }
    let took = wait_programmed(&lab, base_services, base_backends, Duration::from_secs(600)).await;
    let (rss_after, peak) = memory_mib(pid);
    eprintln!("removed in {took:?}; agent RSS {rss_after} MiB, peak {peak} MiB");
    assert_eq!(map_entries(&maps), entries_before);
    common::request(&lab, ("default", "client"), probe)
        .await
        .expect("probe Service after the removal");
}

/// Entries in the SERVICES, BACKENDS and MAGLEV maps.
fn map_entries(maps: &lb::datapath::Maps) -> (usize, usize, usize) {
    (
        maps.services.keys().count(),
        maps.backends.keys().count(),
        maps.maglev.keys().count(),
    )
}
