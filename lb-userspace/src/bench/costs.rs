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

/// A probe program, and what its one operation is.
pub struct Probe {
    pub program: &'static str,
    pub operation: &'static str,
}

pub const PARSE: &str = "probe_parse";

pub const PROBES: [Probe; 12] = [
    Probe {
        program: PARSE,
        operation: "parse (Ethernet, IPv4, TCP/UDP ports)",
    },
    Probe {
        program: "probe_ct_miss",
        operation: "conntrack lookup, miss (LRU hash)",
    },
    Probe {
        program: "probe_ct_hit",
        operation: "conntrack lookup, hit (LRU hash)",
    },
    Probe {
        program: "probe_ct_update",
        operation: "conntrack write (LRU hash update)",
    },
    Probe {
        program: "probe_clock",
        operation: "clock read, to the last tick (bpf_ktime_get_coarse_ns)",
    },
    Probe {
        program: "probe_clock_exact",
        operation: "clock read, exact (bpf_ktime_get_ns; the paths' before)",
    },
    Probe {
        program: "probe_service_hit",
        operation: "Service lookup (hash)",
    },
    Probe {
        program: "probe_backend_hit",
        operation: "backend lookup (hash)",
    },
    Probe {
        program: "probe_maglev",
        operation: "Maglev lookup (map in map)",
    },
    Probe {
        program: "probe_lpm",
        operation: "ipcache lookup (LPM trie)",
    },
    Probe {
        program: "probe_csum_helper",
        operation: "checksum helper (bpf_l4_csum_replace)",
    },
    Probe {
        program: "probe_count",
        operation: "counter add (per-CPU array)",
    },
];

/// The operations a path runs, and how many times (read from
/// `lb-ebpf/src/lb.rs`, `conntrack.rs` and `policy.rs` for the bench's
/// packets; a miss of a hash map is counted as a hit of one, which it
/// costs about).
pub fn model(scenario: Scenario) -> &'static [(&'static str, u32)] {
    match scenario {
        // Reply-key miss, forward-key hit (stamped with the clock), the
        // backend still there, DNAT of address and port, one count.
        Scenario::Established => &[
            (PARSE, 1),
            ("probe_ct_miss", 1),
            ("probe_ct_hit", 1),
            ("probe_clock", 1),
            ("probe_backend_hit", 1),
            ("probe_csum_helper", 2),
            ("probe_count", 1),
        ],
        // Reply and forward keys miss, the Service lookup misses; egress
        // policy: the policy-conntrack lookups miss twice, the client is
        // no endpoint; the SYN's stale reply entry is deleted (a miss).
        Scenario::NoService => &[
            (PARSE, 1),
            ("probe_ct_miss", 5),
            ("probe_service_hit", 1),
            ("probe_backend_hit", 1),
        ],
        // Both keys miss; Service, Maglev and backend lookups; egress policy
        // (a policy-conntrack miss, the endpoint lookup); the backend tuple's
        // claim (a miss); the clock and two conntrack writes; DNAT; one count.
        // Into a full table the same operations run: what the eviction of
        // the writes adds is the difference between the two rows.
        Scenario::NewFlow | Scenario::NewFlowFullTable => &[
            (PARSE, 1),
            ("probe_ct_miss", 4),
            ("probe_service_hit", 1),
            ("probe_maglev", 1),
            ("probe_backend_hit", 2),
            ("probe_clock", 1),
            ("probe_ct_update", 2),
            ("probe_csum_helper", 2),
            ("probe_count", 1),
        ],
        // As a new flow up to the policy: the endpoint (isolated), the
        // ipcache and the policy trie (three LPM lookups of the wildcards
        // and the exact rule), one count.
        Scenario::PolicyDrop => &[
            (PARSE, 1),
            ("probe_ct_miss", 3),
            ("probe_service_hit", 1),
            ("probe_maglev", 1),
            ("probe_backend_hit", 2),
            ("probe_lpm", 4),
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
    for probe in &PROBES {
        let prog = dp.bench_tc(probe.program)?;
        let mut means = Vec::with_capacity(batches);
        for _ in 0..batches {
            let mut total = 0;
            for _ in 0..per_batch {
                let (verdict, ns) = datapath::run_once(prog, &packet, &mut out)?;
                ensure!(
                    verdict == 0 && out == packet,
                    "{}: verdict {verdict}, or the packet changed: the probe did not do its operation",
                    probe.program
                );
                total += ns;
            }
            means.push(total as f64 / per_batch as f64);
        }
        rows.push(Measured {
            label: probe.program.into(),
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
            let _ = write!(o, " {:.0} |", added(rows, p.program, floor));
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
