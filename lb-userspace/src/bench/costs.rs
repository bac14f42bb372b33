//! Where a packet's time goes: the cost of each operation the data path is
//! made of, measured by the probe programs (`lb-ebpf/src/probes.rs`: one
//! operation each, after the parse every path does) the same way as the
//! paths (kernel-timed BPF_PROG_TEST_RUN, repeat 1, verdict checked), and
//! a model of each path as the operations it runs, from its code. The model
//! summed beside the path's measured cost shows what the operations explain
//! and what they do not.

use anyhow::{ensure, Result};
use aya::maps::lpm_trie::Key;
use lb_common::policy::IpcacheKey;

use super::{
    datapath::{self, Measured, Scenario},
    Stats,
};
use crate::datapath::PROG_FROM_POD;

/// A probe program, and what its one operation is. Most run on the same
/// packet every time, so what they touch stays in the CPU's caches, as an
/// established flow's entries do; `fresh` ones on a new flow's packet each
/// run, as a new flow's lookups meet keys never seen before.
pub struct Probe {
    /// The row's name (the model's), and the program run.
    pub id: &'static str,
    pub program: &'static str,
    pub operation: &'static str,
    pub fresh: bool,
}

impl Probe {
    const fn hot(program: &'static str, operation: &'static str) -> Self {
        Self {
            id: program,
            program,
            operation,
            fresh: false,
        }
    }
}

pub const PARSE: &str = "probe_parse";
/// The miss probe on a new flow's packet each run.
pub const CT_MISS_NEW: &str = "ct_miss_new";

pub const PROBES: [Probe; 15] = [
    Probe::hot(PARSE, "parse (Ethernet, IPv4, TCP/UDP ports)"),
    Probe::hot("probe_ct_miss", "conntrack lookup, miss (LRU hash)"),
    Probe {
        id: CT_MISS_NEW,
        program: "probe_ct_miss",
        operation: "conntrack lookup, miss, a new flow's key each run",
        fresh: true,
    },
    Probe::hot("probe_ct_hit", "conntrack lookup, hit (LRU hash)"),
    Probe::hot("probe_ct_update", "conntrack write (LRU hash update)"),
    Probe::hot(
        "probe_clock",
        "clock read, to the last tick (bpf_ktime_get_coarse_ns)",
    ),
    Probe::hot(
        "probe_clock_exact",
        "clock read, exact (bpf_ktime_get_ns; the paths' before)",
    ),
    Probe::hot("probe_service_hit", "Service lookup (hash)"),
    Probe::hot("probe_backend_hit", "backend lookup (hash)"),
    Probe::hot("probe_maglev", "Maglev lookup (map in map)"),
    Probe::hot("probe_lpm", "ipcache lookup (LPM trie)"),
    Probe::hot("probe_csum_helper", "checksum helper (bpf_l4_csum_replace)"),
    Probe::hot(
        "probe_rewrite",
        "DNAT of address and port and back, ports' checksums in place (2 helper calls)",
    ),
    Probe::hot(
        "probe_rewrite_helpers",
        "the same, a helper call for each port too (4 calls; the paths before session 21)",
    ),
    Probe::hot("probe_count", "counter add (per-CPU array)"),
];

/// The operations a path runs, and how many times (read from
/// `lb-ebpf/src/lb.rs`, `conntrack.rs` and `policy.rs` for the bench's
/// packets; a miss of a hash map is counted as a hit of one, which it
/// costs about). A new flow's SYN looks up keys never seen before (cold
/// misses); the other paths' packets are the same each run.
pub fn model(scenario: Scenario) -> &'static [(&'static str, u32)] {
    match scenario {
        // An ACK: reply-key miss, forward-key hit (stamped with the clock),
        // the backend still there, DNAT of address and port (one helper
        // call, the port's checksum in place), one count.
        Scenario::Established => &[
            (PARSE, 1),
            ("probe_ct_miss", 1),
            ("probe_ct_hit", 1),
            ("probe_clock", 1),
            ("probe_backend_hit", 1),
            ("probe_csum_helper", 1),
            ("probe_count", 1),
        ],
        // An ACK straight to a pod: reply and forward keys miss, the
        // Service lookup misses; egress policy: the client is no endpoint.
        Scenario::NoService => &[
            (PARSE, 1),
            ("probe_ct_miss", 2),
            ("probe_service_hit", 1),
            ("probe_backend_hit", 1),
        ],
        // A SYN (no reply lookups: it answers nothing): the forward key
        // misses; Service, Maglev and backend lookups; egress policy (the
        // endpoint lookup); the backend tuple's claim (a miss); the clock
        // and two conntrack writes; DNAT; one count. Into a full table the
        // same operations run: what the eviction of the writes adds is the
        // difference between the two rows.
        Scenario::NewFlow | Scenario::NewFlowFullTable => &[
            (PARSE, 1),
            (CT_MISS_NEW, 2),
            ("probe_service_hit", 1),
            ("probe_maglev", 1),
            ("probe_backend_hit", 2),
            ("probe_clock", 1),
            ("probe_ct_update", 2),
            ("probe_csum_helper", 1),
            ("probe_count", 1),
        ],
        // As a new flow up to the policy: the endpoint (isolated), the
        // ipcache and the policy trie (four lookups: the exact rule and
        // the wildcards), one count.
        Scenario::PolicyDrop => &[
            (PARSE, 1),
            (CT_MISS_NEW, 1),
            ("probe_service_hit", 1),
            ("probe_maglev", 1),
            ("probe_backend_hit", 2),
            ("probe_lpm", 5),
            ("probe_count", 1),
        ],
    }
}

/// Each probe's cost on a data path with `services` Services, the
/// measured flow's conntrack entries in place and an ipcache entry for
/// the Service's address. Labels are the probes' program names.
pub fn measure_probes(services: usize, batches: usize, per_batch: usize) -> Result<Vec<Measured>> {
    let mut dp = datapath::datapath_with(services)?;
    // The VIP's /16 (10.96.0.10 -> 10.96.0.0/16).
    let net = u32::from(datapath::ip(datapath::VIP)) & 0xffff_0000;
    dp.maps
        .ipcache
        .insert(&Key::new(16, IpcacheKey { addr: net.to_be() }), 300, 0)?;
    let packet = datapath::syn(0, datapath::VIP, 80);
    let mut out = Vec::new();
    // The flow's first packet writes its conntrack entries.
    let prog = dp.program(PROG_FROM_POD)?;
    datapath::run_once(prog, &packet, &mut out)?;
    let mut rows = Vec::new();
    // Fresh probes' flows: new ones each run, as many as a new-flow figure.
    let mut flow = 1;
    let per_batch_fresh = per_batch.min(datapath::NEW_FLOWS / batches.max(1));
    for probe in &PROBES {
        let prog = dp.bench_tc(probe.program)?;
        let per_batch = if probe.fresh {
            per_batch_fresh
        } else {
            per_batch
        };
        let mut means = Vec::with_capacity(batches);
        for _ in 0..batches {
            let mut total = 0;
            for _ in 0..per_batch {
                let fresh;
                let input = if probe.fresh {
                    fresh = datapath::syn(flow, datapath::VIP, 80);
                    flow += 1;
                    &fresh
                } else {
                    &packet
                };
                let (verdict, ns) = datapath::run_once(prog, input, &mut out)?;
                ensure!(
                    verdict == 0 && out == *input,
                    "{}: verdict {verdict}, or the packet changed: the probe did not do its operation",
                    probe.id
                );
                total += ns;
            }
            means.push(total as f64 / per_batch as f64);
        }
        rows.push(Measured {
            label: probe.id.into(),
            services,
            runs: batches * per_batch,
            ns: Stats::of(&means),
        });
    }
    Ok(rows)
}

/// Nanoseconds an operation adds: its probe above the parse probe (the
/// parse's own cost is its probe above the empty program's).
pub fn added(rows: &[Measured], program: &str, floor: f64) -> f64 {
    let median = |p: &str| {
        rows.iter()
            .find(|m| m.label == p)
            .map_or(0.0, |m| m.ns.median)
    };
    let base = if program == PARSE {
        floor
    } else {
        median(PARSE)
    };
    median(program) - base
}

/// What the model of a path predicts above the floor.
pub fn predicted(rows: &[Measured], scenario: Scenario, floor: f64) -> f64 {
    model(scenario)
        .iter()
        .map(|(p, n)| f64::from(*n) * added(rows, p, floor))
        .sum()
}

/// The report's section: each operation's cost at the Service counts
/// measured, and each path's measured cost beside its model's.
pub fn write_section(o: &mut String, r: &super::Results) {
    use std::fmt::Write as _;
    let Some(floor) = r.floor.iter().find(|m| m.label.contains("tc")) else {
        return;
    };
    let floor = floor.ns.median;
    let mut counts: Vec<usize> = r.costs.iter().map(|m| m.services).collect();
    counts.dedup();
    if counts.is_empty() {
        return;
    }
    let _ = writeln!(o, "### Where a packet's time goes\n");
    let _ = writeln!(
        o,
        "Each operation the paths are made of, run alone by a probe program \
         (`lb-ebpf/src/probes.rs`) on the same packet and maps, measured as above: \
         what it adds to the parse probe (the parse, to the empty program). Then \
         each path's measured cost above the floor beside the sum of its \
         operations (its model, in `bench/costs.rs`, read from the code).\n"
    );
    let _ = write!(o, "| operation |");
    for n in &counts {
        let _ = write!(o, " ns added, {n} Services |");
    }
    let _ = writeln!(o, "\n|---|{}", "---|".repeat(counts.len()));
    // The probes' rows at each count, in the order of `counts`.
    let rows_at: Vec<Vec<Measured>> = counts
        .iter()
        .map(|n| {
            r.costs
                .iter()
                .filter(|m| m.services == *n)
                .cloned()
                .collect()
        })
        .collect();
    for p in &PROBES {
        let _ = write!(o, "| {} |", p.operation);
        for rows in &rows_at {
            let _ = write!(o, " {:.0} |", added(rows, p.id, floor));
        }
        let _ = writeln!(o);
    }
    let _ = writeln!(
        o,
        "\n| path, {} Services | measured above the floor (ns) | its operations, summed (ns) | operations |",
        counts[0]
    );
    let _ = writeln!(o, "|---|---|---|---|");
    let rows = &rows_at[0];
    for scenario in Scenario::ALL {
        let Some(m) = r
            .datapath
            .iter()
            .find(|m| m.label == scenario.name() && m.services == counts[0])
        else {
            continue;
        };
        let ops: Vec<String> = model(scenario)
            .iter()
            .map(|(p, n)| format!("{n}× {}", p.trim_start_matches("probe_")))
            .collect();
        let _ = writeln!(
            o,
            "| {} | {:.0} | {:.0} | {} |",
            scenario.name(),
            m.ns.median - floor,
            predicted(rows, scenario, floor),
            ops.join(", ")
        );
    }
    let _ = writeln!(o);
}
