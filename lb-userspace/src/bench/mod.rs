//! `lb bench` (run by `cargo xtask bench`): speed and memory figures, never
//! asserted in tests. Each figure is min, median and max over repeated runs;
//! each comparison is a ratio taken within one run. Writes BENCHMARKS.md and
//! a plot.

pub mod datapath;
pub mod maglev;
pub mod report;

use std::path::Path;

use anyhow::Result;

/// Min, median and max of repeated measurements.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Stats {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Stats::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Stats {
            min: v[0],
            median,
            max: v[n - 1],
        }
    }
}

/// How much to measure: the full run, or a quick one to try the harness.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub service_counts: &'static [usize],
    pub batches: usize,
    /// Runs per batch for the data-path scenarios.
    pub per_batch: usize,
    pub policy_per_batch: usize,
    pub maglev_flows: usize,
    pub maglev_trials: usize,
}

impl Plan {
    /// 5 batches of 200,000 runs: a million per figure.
    pub const FULL: Plan = Plan {
        service_counts: &[10, 1_000, 10_000, 100_000],
        batches: 5,
        per_batch: 200_000,
        policy_per_batch: 10_000,
        maglev_flows: 1_000_000,
        maglev_trials: 5,
    };
    pub const QUICK: Plan = Plan {
        service_counts: &[10, 1_000],
        batches: 3,
        per_batch: 2_000,
        policy_per_batch: 1_000,
        maglev_flows: 20_000,
        maglev_trials: 3,
    };
}

pub struct Results {
    pub datapath: Vec<datapath::Measured>,
    pub floor: Vec<datapath::Measured>,
    pub policy: Vec<datapath::Measured>,
    pub movement: Vec<maglev::Movement>,
    pub build: Vec<maglev::BuildTime>,
    pub plan: Plan,
    pub took: std::time::Duration,
}

/// Runs every benchmark of `plan` and writes the report into `out_dir`.
pub fn run(plan: Plan, out_dir: &Path) -> Result<()> {
    let started = std::time::Instant::now();
    let mut results = Results {
        datapath: Vec::new(),
        floor: Vec::new(),
        policy: Vec::new(),
        movement: Vec::new(),
        build: Vec::new(),
        plan,
        took: Default::default(),
    };
    eprintln!("bench: the floor (empty tc and XDP programs)");
    results.floor = datapath::measure_floor(plan.batches, plan.per_batch)?;
    for &services in plan.service_counts {
        for scenario in datapath::Scenario::ALL {
            eprintln!("bench: {} with {services} Services", scenario.name());
            let m = datapath::measure(scenario, services, plan.batches, plan.per_batch)?;
            eprintln!("       {:.0} ns (median of batch means)", m.ns.median);
            results.datapath.push(m);
        }
    }
    for filler in [None, Some(99), Some(15_999)] {
        eprintln!("bench: policy verdict, {filler:?} filler entries");
        results.policy.push(datapath::measure_policy(
            filler,
            plan.batches,
            plan.policy_per_batch,
        )?);
    }
    for n in [10, 100] {
        eprintln!("bench: Maglev with {n} backends");
        results
            .movement
            .push(maglev::movement(n, plan.maglev_flows, plan.maglev_trials));
        results.build.push(maglev::build_time(n, 20));
    }
    results.took = started.elapsed();
    report::write(&results, out_dir)
}
