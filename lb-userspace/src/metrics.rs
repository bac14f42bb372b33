//! What the agent tells Prometheus and the kubelet: `/metrics` (its own
//! state, and the data path's per-CPU packet counters read from the pinned
//! maps at each scrape), `/healthz` (the sync loop is alive) and `/readyz`
//! (caches synced and the maps programmed once).

use std::{
    collections::BTreeMap,
    fmt::Write,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use axum::{extract::State, http::StatusCode, routing::get, Router};

/// Upper bounds of the sync-duration histogram's buckets, in seconds.
const SYNC_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// The agent's own figures, updated by its sync loop.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Frontends (address, port, protocol) in the maps.
    pub services: usize,
    pub backends: usize,
    pub policies: usize,
    pub policy_entries: usize,
    pub endpoints: usize,
    /// Objects skipped, by kind ("Service", "NetworkPolicy"...), now.
    pub invalid_objects: BTreeMap<String, usize>,
    /// Services left out because a map is full, now.
    pub map_full: usize,
    /// Errors since start, by kind ("map_write", "policy_write").
    pub errors: BTreeMap<&'static str, u64>,
    /// Map entries written back because they differed from what the agent
    /// last programmed (removed or changed by hand, or lost).
    pub drift_repairs: u64,
    pub syncs: u64,
    /// Conntrack entries by state, as of the last sweep.
    pub conntrack: Option<crate::conntrack::Summary>,
    sync_buckets: [u64; SYNC_BUCKETS.len()],
    sync_sum: f64,
    /// The maps were programmed once (a service pass succeeded).
    pub programmed: bool,
    /// The programs are loaded and attached (after the first pass).
    pub attached: bool,
    last_loop: Option<Instant>,
}

impl AgentStats {
    pub fn observe_sync(&mut self, took: Duration) {
        let s = took.as_secs_f64();
        self.syncs += 1;
        self.sync_sum += s;
        for (i, le) in SYNC_BUCKETS.iter().enumerate() {
            if s <= *le {
                self.sync_buckets[i] += 1;
            }
        }
    }

    pub fn error(&mut self, kind: &'static str) {
        *self.errors.entry(kind).or_default() += 1;
    }

    /// Ready to serve: the caches synced, every Service programmed, and
    /// the programs attached to run on them.
    pub fn ready(&self) -> bool {
        self.programmed && self.attached
    }

    /// The sync loop went round (liveness).
    pub fn alive(&mut self) {
        self.last_loop = Some(Instant::now());
    }
}

#[derive(Clone)]
pub struct Shared {
    stats: Arc<Mutex<AgentStats>>,
    pin_dir: PathBuf,
}

impl Shared {
    pub fn new(pin_dir: PathBuf) -> Self {
        Self {
            stats: Arc::default(),
            pin_dir,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, AgentStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves the endpoints on `addr` until the process ends.
pub async fn serve(addr: std::net::SocketAddr, shared: Shared) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shared);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app).await?;
    Ok(())
}

async fn healthz(State(s): State<Shared>) -> (StatusCode, &'static str) {
    // The loop wakes at least every second (the link tick).
    match s.lock().last_loop {
        Some(t) if t.elapsed() < Duration::from_secs(30) => (StatusCode::OK, "ok\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "sync loop stalled\n"),
    }
}

async fn readyz(State(s): State<Shared>) -> (StatusCode, &'static str) {
    if s.lock().ready() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet\n")
    }
}

async fn metrics(State(s): State<Shared>) -> String {
    let dir = s.pin_dir.clone();
    // Counting a million conntrack entries takes seconds, longer than a
    // scrape may: above `COUNT_AT_SCRAPE` the last sweep's count serves.
    let swept = s
        .lock()
        .conntrack
        .as_ref()
        .map(crate::conntrack::Summary::total)
        .filter(|n| *n > COUNT_AT_SCRAPE);
    // Map reads are syscalls; keep them off the async workers.
    let datapath = tokio::task::spawn_blocking(move || datapath_figures(&dir, swept))
        .await
        .ok()
        .flatten();
    render(&s.lock(), datapath.as_ref())
}

/// Up to this many conntrack entries (at the last sweep) a scrape counts
/// them afresh.
const COUNT_AT_SCRAPE: usize = 100_000;

/// Packet counters by reason and the conntrack entry count (counted, or
/// the last sweep's when that was above `COUNT_AT_SCRAPE`).
pub struct DatapathFigures {
    pub counters: BTreeMap<&'static str, lb_common::metrics::Counter>,
    pub conntrack_entries: usize,
}

fn datapath_figures(dir: &std::path::Path, swept: Option<usize>) -> Option<DatapathFigures> {
    let maps = crate::datapath::Maps::open_pinned(dir).ok()?;
    Some(DatapathFigures {
        counters: maps.counters().ok()?,
        conntrack_entries: match swept {
            Some(n) => n,
            None => {
                let mut n = 0;
                crate::datapath::batch::for_each_entry(&maps.conntrack, |_, _| n += 1).ok()?;
                n
            }
        },
    })
}

/// The Prometheus text exposition format.
pub fn render(st: &AgentStats, dp: Option<&DatapathFigures>) -> String {
    let mut o = String::new();
    let mut gauge = |name: &str, help: &str, v: f64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    };
    gauge(
        "lb_services",
        "Service frontends programmed (address, port, protocol).",
        st.services as f64,
    );
    gauge("lb_backends", "Backends programmed.", st.backends as f64);
    gauge(
        "lb_network_policies",
        "NetworkPolicy objects translated.",
        st.policies as f64,
    );
    gauge(
        "lb_policy_entries",
        "Entries in the policy map.",
        st.policy_entries as f64,
    );
    gauge(
        "lb_policy_endpoints",
        "Pods with an endpoint entry.",
        st.endpoints as f64,
    );
    gauge(
        "lb_map_full_services",
        "Services not programmed because a map is full.",
        st.map_full as f64,
    );
    gauge(
        "lb_ready",
        "1 once the caches synced, the maps were programmed and the programs attached.",
        f64::from(u8::from(st.ready())),
    );
    let _ = writeln!(
        o,
        "# HELP lb_invalid_objects API objects skipped as invalid, by kind.\n# TYPE lb_invalid_objects gauge"
    );
    for kind in ["Service", "EndpointSlice", "NetworkPolicy", "Pod"] {
        let n = st.invalid_objects.get(kind).copied().unwrap_or(0);
        let _ = writeln!(o, "lb_invalid_objects{{kind=\"{kind}\"}} {n}");
    }
    let _ = writeln!(
        o,
        "# HELP lb_errors_total Errors by kind.\n# TYPE lb_errors_total counter"
    );
    for kind in ["map_write", "policy_write"] {
        let n = st.errors.get(kind).copied().unwrap_or(0);
        let _ = writeln!(o, "lb_errors_total{{kind=\"{kind}\"}} {n}");
    }
    let _ = writeln!(
        o,
        "# HELP lb_drift_repairs_total Map entries rewritten because they had drifted from the programmed state.\n# TYPE lb_drift_repairs_total counter\nlb_drift_repairs_total {}",
        st.drift_repairs
    );
    let _ = writeln!(
        o,
        "# HELP lb_sync_duration_seconds Time to translate the API state and update the maps.\n# TYPE lb_sync_duration_seconds histogram"
    );
    for (le, n) in SYNC_BUCKETS.iter().zip(st.sync_buckets) {
        let _ = writeln!(o, "lb_sync_duration_seconds_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(
        o,
        "lb_sync_duration_seconds_bucket{{le=\"+Inf\"}} {}\nlb_sync_duration_seconds_sum {}\nlb_sync_duration_seconds_count {}",
        st.syncs, st.sync_sum, st.syncs
    );
    if let Some(ct) = &st.conntrack {
        render_conntrack(&mut o, ct);
    }
    if let Some(dp) = dp {
        let _ = writeln!(
            o,
            "# HELP lb_datapath_packets_total Packets seen by the data path, by reason.\n# TYPE lb_datapath_packets_total counter"
        );
        for (reason, c) in &dp.counters {
            let _ = writeln!(
                o,
                "lb_datapath_packets_total{{reason=\"{reason}\"}} {}",
                c.packets
            );
        }
        let _ = writeln!(
            o,
            "# HELP lb_datapath_bytes_total Bytes seen by the data path, by reason.\n# TYPE lb_datapath_bytes_total counter"
        );
        for (reason, c) in &dp.counters {
            let _ = writeln!(
                o,
                "lb_datapath_bytes_total{{reason=\"{reason}\"}} {}",
                c.bytes
            );
        }
        let _ = writeln!(
            o,
            "# HELP lb_conntrack_entries Entries in the conntrack map.\n# TYPE lb_conntrack_entries gauge\nlb_conntrack_entries {}",
            dp.conntrack_entries
        );
    }
    o
}

/// Conntrack entries by state and the SNAT tuples held (from the sweep).
fn render_conntrack(o: &mut String, ct: &crate::conntrack::Summary) {
    let _ = writeln!(
        o,
        "# HELP lb_conntrack_entries_by_state Conntrack entries at the last sweep, by protocol and state.\n# TYPE lb_conntrack_entries_by_state gauge"
    );
    for (state, n) in [
        ("tcp_established", ct.tcp_established),
        ("tcp_closing", ct.tcp_closing),
        ("tcp_reset", ct.tcp_reset),
        ("udp", ct.udp),
        ("policy", ct.policy),
    ] {
        let _ = writeln!(o, "lb_conntrack_entries_by_state{{state=\"{state}\"}} {n}");
    }
    let _ = writeln!(
        o,
        "# HELP lb_snat_tuples_held SNAT tuples no new connection may take yet (live, or closed within the backend's TIME_WAIT).\n# TYPE lb_snat_tuples_held gauge\nlb_snat_tuples_held {}",
        ct.snat_tuples_held
    );
    let _ = writeln!(
        o,
        "# HELP lb_snat_tuples_held_max_backend The most SNAT tuples held towards one backend (the range holds {} per backend).\n# TYPE lb_snat_tuples_held_max_backend gauge\nlb_snat_tuples_held_max_backend {}",
        lb_common::node::SNAT_PORT_COUNT,
        ct.snat_tuples_held_max_backend
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_is_cumulative_and_every_family_has_help_and_type() {
        let mut st = AgentStats::default();
        st.observe_sync(Duration::from_millis(3));
        st.observe_sync(Duration::from_millis(30));
        st.error("map_write");
        st.conntrack = Some(crate::conntrack::Summary {
            tcp_closing: 4,
            ..Default::default()
        });
        let text = render(&st, None);
        assert!(text.contains("lb_conntrack_entries_by_state{state=\"tcp_closing\"} 4"));
        assert!(text.contains("lb_sync_duration_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("lb_sync_duration_seconds_bucket{le=\"0.05\"} 2"));
        assert!(text.contains("lb_sync_duration_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("lb_errors_total{kind=\"map_write\"} 1"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let family = line.split(['{', ' ']).next().unwrap_or_default();
            let base = family
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {base} ")),
                "no TYPE for {family}"
            );
        }
    }
}
