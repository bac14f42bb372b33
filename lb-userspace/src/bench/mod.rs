//! `lb bench` (run by `cargo xtask bench`): speed and memory figures, never
//! asserted in tests. Each figure is min, median and max over repeated runs;
//! each comparison is a ratio taken within one run. Writes BENCHMARKS.md and
//! a plot.

pub mod churn;
pub mod client;
pub mod control;
pub mod costs;
pub mod datapath;
pub mod e2e;
pub mod kube_proxy;
pub mod lab_report;
pub mod maglev;
pub mod nft_control;
pub mod plot;
pub mod policy;
pub mod prog_stats;
pub mod report;
pub mod uplink;

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
    pub e2e: e2e::Settings,
    pub churn: churn::Settings,
    pub control: control::Settings,
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
        e2e: e2e::Settings {
            service_counts: &[10, 1_000, 10_000, 30_000],
            repeats: 3,
            sequential: 1_000,
            workers: 4,
            duration: std::time::Duration::from_secs(2),
        },
        churn: churn::Settings {
            duration: std::time::Duration::from_secs(60),
            sources: 16,
            workers: 8,
        },
        control: control::Settings {
            services: 10_000,
            endpoints: 10,
            syncs: 3,
            changes: 100,
            burst: 1_000,
            policy: policy::Settings {
                pods: 10_000,
                policies: 1_000,
                namespaces: 20,
                apps: 50,
                relabels: 200,
            },
            large: Some(100_000),
            lb_only: false,
        },
    };
    pub const QUICK: Plan = Plan {
        service_counts: &[10, 1_000],
        batches: 3,
        per_batch: 2_000,
        policy_per_batch: 1_000,
        maglev_flows: 20_000,
        maglev_trials: 3,
        e2e: e2e::Settings {
            service_counts: &[10, 100],
            repeats: 2,
            sequential: 200,
            workers: 2,
            duration: std::time::Duration::from_millis(500),
        },
        churn: churn::Settings {
            duration: std::time::Duration::from_secs(5),
            sources: 16,
            workers: 8,
        },
        control: control::Settings {
            services: 500,
            endpoints: 10,
            syncs: 1,
            changes: 10,
            burst: 50,
            policy: policy::Settings {
                pods: 500,
                policies: 50,
                namespaces: 5,
                apps: 10,
                relabels: 20,
            },
            large: None,
            lb_only: false,
        },
    };
}

pub struct Results {
    pub datapath: Vec<datapath::Measured>,
    pub floor: Vec<datapath::Measured>,
    /// The probes' costs (`costs`), at the first and the last Service count.
    pub costs: Vec<datapath::Measured>,
    pub policy: Vec<datapath::Measured>,
    /// The uplink programs' paths (`uplink`), at the first and last counts.
    pub uplink: Vec<datapath::Measured>,
    pub movement: Vec<maglev::Movement>,
    pub build: Vec<maglev::BuildTime>,
    pub e2e: e2e::Results,
    pub churn: churn::Results,
    pub control: control::Results,
    pub plan: Plan,
    pub took: std::time::Duration,
    /// How long each part took, in the order run.
    pub parts: Vec<(Part, std::time::Duration)>,
}

/// The bench's labs: end to end with the agent, with kube-proxy-shaped
/// rules, the control path, and churn (new connections) with the agents
/// and with the rules.
pub const LAB_PREFIXES: [&str; 5] = ["bnchl", "bnchr", "bnchc", "bnchnl", "bnchnr"];

/// The parts of the bench, to run some of them only (`lb bench --only`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Datapath,
    EndToEnd,
    Churn,
    Control,
    Maglev,
}

impl Part {
    pub fn title(self) -> &'static str {
        match self {
            Part::Datapath => "data path",
            Part::EndToEnd => "end to end",
            Part::Churn => "churn",
            Part::Control => "control path",
            Part::Maglev => "Maglev",
        }
    }
}

/// Runs the `parts` of `plan` (every part when empty) and writes the report
/// into `out_dir`. The labs run `lb_binary` (this program) as their echo
/// pods and agents.
pub async fn run(plan: Plan, parts: &[Part], out_dir: &Path, lb_binary: &Path) -> Result<()> {
    let started = std::time::Instant::now();
    let wanted = |p: Part| parts.is_empty() || parts.contains(&p);
    let mut results = Results {
        datapath: Vec::new(),
        floor: Vec::new(),
        costs: Vec::new(),
        policy: Vec::new(),
        uplink: Vec::new(),
        movement: Vec::new(),
        build: Vec::new(),
        e2e: Default::default(),
        churn: Default::default(),
        control: Default::default(),
        plan,
        took: Default::default(),
        parts: Vec::new(),
    };
    let mut part_started = std::time::Instant::now();
    let mut done = |part: Part, results: &mut Results| {
        let took = part_started.elapsed();
        eprintln!(
            "bench: {part:?} took {took:.1?} ({:.0?} since the start)",
            started.elapsed()
        );
        results.parts.push((part, took));
        part_started = std::time::Instant::now();
    };
    if wanted(Part::Datapath) {
        datapath_part(&plan, &mut results)?;
        done(Part::Datapath, &mut results);
    }
    if wanted(Part::EndToEnd) {
        results.e2e = e2e::run(&plan.e2e, LAB_PREFIXES[0], LAB_PREFIXES[1], lb_binary).await?;
        done(Part::EndToEnd, &mut results);
    }
    if wanted(Part::Churn) {
        results.churn =
            churn::run(&plan.churn, LAB_PREFIXES[3], LAB_PREFIXES[4], lb_binary).await?;
        done(Part::Churn, &mut results);
    }
    if wanted(Part::Control) {
        results.control = control::run(&plan.control, LAB_PREFIXES[2], lb_binary).await?;
        done(Part::Control, &mut results);
    }
    if wanted(Part::Maglev) {
        for n in [10, 100] {
            eprintln!("bench: Maglev with {n} backends");
            results
                .movement
                .push(maglev::movement(n, plan.maglev_flows, plan.maglev_trials));
            results.build.push(maglev::build_time(n, 20));
        }
        done(Part::Maglev, &mut results);
    }
    results.took = started.elapsed();
    report::write(&results, out_dir)
}

fn datapath_part(plan: &Plan, results: &mut Results) -> Result<()> {
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
    let (first, last) = (plan.service_counts.first(), plan.service_counts.last());
    for &services in first.into_iter().chain(last.filter(|l| Some(*l) != first)) {
        eprintln!("bench: the cost of each operation, with {services} Services");
        let rows = costs::measure_probes(services, plan.batches, plan.per_batch)?;
        results.costs.extend(rows);
        for hook in uplink::Hook::ALL {
            for path in uplink::UplinkPath::ALL {
                eprintln!(
                    "bench: {}, with {services} Services",
                    uplink::label(path, hook)
                );
                let m = uplink::measure(path, hook, services, plan.batches, plan.per_batch)?;
                eprintln!("       {:.0} ns (median of batch means)", m.ns.median);
                results.uplink.push(m);
            }
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
    Ok(())
}
