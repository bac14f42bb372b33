//! BENCHMARKS.md and its plot (SVG, drawn by hand: a few lines and labels).

use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};

use super::{
    datapath::Scenario,
    lab_report,
    plot::{line_chart, Series},
    Results, Stats,
};

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_string(), |(_, m)| m.trim().to_string());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_default();
    format!("{model}, {cores} cores, {mem_gib:.0} GiB memory, Linux {kernel}")
}

fn ns(s: &Stats) -> String {
    format!("{:.0} ({:.0}–{:.0})", s.median, s.min, s.max)
}

pub fn write(r: &Results, out_dir: &Path) -> Result<()> {
    let mut o = String::new();
    let _ = writeln!(o, "# Benchmarks\n");
    let _ = writeln!(
        o,
        "Written by `cargo xtask bench` (took {:.0} s{}). Machine: {}.\n",
        r.took.as_secs_f64(),
        r.parts
            .iter()
            .map(|(part, took)| format!(", {} {:.0} s", part.title(), took.as_secs_f64()))
            .collect::<String>(),
        machine()
    );
    let _ = writeln!(
        o,
        "Every figure is the median over repeated runs, with the minimum and \
         maximum in parentheses; every ratio is taken within this one run.\n"
    );

    // 1. The data path.
    let floor_tc = r.floor.iter().find(|m| m.label.contains("tc"));
    let _ = writeln!(o, "## Per-packet cost of the data path\n");
    let _ = writeln!(
        o,
        "`lb_from_pod` (tc, the program on each pod's veth) run by the kernel on \
         crafted packets through BPF_PROG_TEST_RUN, timed by the kernel itself. A \
         repeat count would make the kernel run the program again on the packet it \
         had already rewritten (after one DNAT, the rest would be packets for no \
         Service), so each figure is {runs} runs of repeat 1, each on its own \
         input, in {b} batches; a batch's figure is the mean of its runs, and \
         min/median/max are over the batches. The verdict and output bytes of \
         every run are checked: a new flow must leave DNATed to one of the \
         Service's backends with valid checksums, an established one exactly as \
         its first packet did, a packet for no Service unchanged, a policy drop \
         with TC_ACT_SHOT.\n",
        runs = r.plan.batches * r.plan.per_batch,
        b = r.plan.batches
    );
    let _ = writeln!(
        o,
        "The measured Service has 10 backends and a Maglev table (written by the \
         agent's own planner); the other Services of each column have one backend \
         each and are written straight into the SERVICES map (ClusterIPs, which \
         get no Maglev table). New flows come from ever new client ports, into a \
         conntrack table (an LRU of {} entries) with room: at most {} new flows per \
         figure, each writing up to two entries. The full table is its own row: the \
         same new flows after as many as the table has entries, so that every \
         insert evicts.\n",
        lb_common::conntrack::CONNTRACK_MAX_ENTRIES,
        super::datapath::NEW_FLOWS
    );
    let _ = write!(o, "| nanoseconds per packet |");
    for n in r.plan.service_counts {
        let _ = write!(o, " {n} Services |");
    }
    let _ = writeln!(o, " ×floor (tc) at {} |", r.plan.service_counts[0]);
    let _ = writeln!(o, "|{}", "---|".repeat(r.plan.service_counts.len() + 2));
    for scenario in Scenario::ALL {
        let _ = write!(o, "| {} |", scenario.name());
        let mut first = None;
        for n in r.plan.service_counts {
            let m = r
                .datapath
                .iter()
                .find(|m| m.label == scenario.name() && m.services == *n);
            match m {
                Some(m) => {
                    first.get_or_insert(m.ns.median);
                    let _ = write!(o, " {} |", ns(&m.ns));
                }
                None => {
                    let _ = write!(o, " – |");
                }
            }
        }
        let ratio = match (first, floor_tc) {
            (Some(v), Some(f)) if f.ns.median > 0.0 => format!("{:.1}", v / f.ns.median),
            _ => "–".into(),
        };
        let _ = writeln!(o, " {ratio} |");
    }
    for f in &r.floor {
        let _ = writeln!(
            o,
            "| floor: {} | {} |{} |",
            f.label,
            ns(&f.ns),
            " |".repeat(r.plan.service_counts.len())
        );
    }
    let _ = writeln!(o, "\n![per-packet cost](benchmarks.svg)\n");
    super::costs::write_section(&mut o, r);
    super::uplink::write_section(&mut o, r);

    let _ = writeln!(o, "### The policy verdict\n");
    let _ = writeln!(
        o,
        "New flows from one pod to the Service above (10 Services programmed), \
         {} runs each: the pod not isolated, then isolated for egress with a rule \
         that allows the flow and the policy LPM trie holding that many entries in \
         all (the others for other endpoints, identities and ports).\n",
        r.plan.batches * r.plan.policy_per_batch
    );
    let _ = writeln!(o, "| case | ns per packet | ×not isolated |");
    let _ = writeln!(o, "|---|---|---|");
    let base = r.policy.first().map(|m| m.ns.median).unwrap_or(0.0);
    for m in &r.policy {
        let ratio = if base > 0.0 { m.ns.median / base } else { 0.0 };
        let _ = writeln!(o, "| {} | {} | {ratio:.2} |", m.label, ns(&m.ns));
    }

    // 2 to 4: the lab.
    lab_report::end_to_end(&mut o, r);
    lab_report::churn(&mut o, r);
    lab_report::control(&mut o, r);

    // 5. Maglev.
    let _ = writeln!(o, "\n## Maglev\n");
    let _ = writeln!(
        o,
        "Share of flows whose backend changes when one of N backends is removed \
         (each trial removes a different one; {} flows hashed as the data path \
         hashes them), against the ideal 1/N; modulo hashing would move (N−1)/N. \
         Build time of one table in the agent (20 builds).\n",
        r.plan.maglev_flows
    );
    let _ = writeln!(
        o,
        "| backends | table size | flows moved | ideal 1/N | moved ÷ ideal | build time (µs) |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    for (m, b) in r.movement.iter().zip(&r.build) {
        let _ = writeln!(
            o,
            "| {} | {} | {:.2}% ({:.2}–{:.2}%) | {:.2}% | {:.2} | {:.0} ({:.0}–{:.0}) |",
            m.backends,
            m.table_size,
            m.moved.median * 100.0,
            m.moved.min * 100.0,
            m.moved.max * 100.0,
            m.ideal * 100.0,
            m.moved.median / m.ideal,
            b.micros.median,
            b.micros.min,
            b.micros.max
        );
    }

    std::fs::create_dir_all(out_dir)?;
    let md = out_dir.join("BENCHMARKS.md");
    std::fs::write(&md, o).with_context(|| format!("writing {}", md.display()))?;
    let svg = out_dir.join("benchmarks.svg");
    std::fs::write(&svg, plot(r)).with_context(|| format!("writing {}", svg.display()))?;
    let svg_lab = out_dir.join("benchmarks-e2e.svg");
    std::fs::write(&svg_lab, lab_report::plot(r))
        .with_context(|| format!("writing {}", svg_lab.display()))?;
    eprintln!(
        "wrote {}, {} and {}",
        md.display(),
        svg.display(),
        svg_lab.display()
    );
    Ok(())
}

/// Nanoseconds per packet against the number of Services, a line per
/// scenario, the floors dashed.
pub fn plot(r: &Results) -> String {
    let counts = r.plan.service_counts;
    let mut series: Vec<Series> = Scenario::ALL
        .iter()
        .enumerate()
        .map(|(color, sc)| Series {
            color,
            label: sc.name().into(),
            points: counts
                .iter()
                .map(|n| {
                    r.datapath
                        .iter()
                        .find(|m| m.label == sc.name() && m.services == *n)
                        .map(|m| m.ns)
                })
                .collect(),
            dashed: false,
        })
        .collect();
    for (k, f) in r.floor.iter().enumerate() {
        series.push(Series {
            color: 6 + k,
            label: format!("floor: {}", f.label),
            points: counts.iter().map(|_| Some(f.ns)).collect(),
            dashed: true,
        });
    }
    line_chart(
        "lb_from_pod: ns per packet (median, min–max)",
        "Services programmed",
        &counts.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        &series,
    )
}
