//! Where the data path's time goes in real lab traffic: the kernel's own
//! per-program statistics (`kernel.bpf_stats_enabled`: every run of every
//! program adds its duration to `run_time_ns` and one to `run_cnt`), read
//! with bpftool before and after a measurement. The kernel times each run
//! with two clock reads, which cost a few tens of nanoseconds each: the
//! figures are a little above the programs' own cost, the same for every
//! program.

use std::collections::BTreeMap;

use anyhow::{Context, Result};

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// The programs that run on the lab's packets (see `lb-ebpf/src/main.rs`).
pub const DATA_PATH: [&str; 4] = ["lb_from_pod", "lb_to_pod", "lb_uplink", "lb_uplink_tc"];

/// Statistics on while alive; the sysctl's value before is put back on drop.
pub struct Enabled {
    before: String,
}

pub fn enable() -> Result<Enabled> {
    let before = std::fs::read_to_string(SYSCTL)
        .with_context(|| format!("reading {SYSCTL}"))?
        .trim()
        .to_string();
    std::fs::write(SYSCTL, "1").with_context(|| format!("writing 1 to {SYSCTL}"))?;
    Ok(Enabled { before })
}

impl Drop for Enabled {
    fn drop(&mut self) {
        let _ = std::fs::write(SYSCTL, &self.before);
    }
}

/// Total run time and runs so far, per program name, of every loaded
/// program named in [`DATA_PATH`] (each agent loads its own copies: they
/// are added up).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot(pub BTreeMap<String, Totals>);

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    pub run_time_ns: u64,
    pub runs: u64,
}

pub fn snapshot() -> Result<Snapshot> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("running bpftool -j prog show")?;
    if !out.status.success() {
        anyhow::bail!(
            "bpftool prog show: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse(&out.stdout)
}

fn parse(json: &[u8]) -> Result<Snapshot> {
    let progs: Vec<serde_json::Value> =
        serde_json::from_slice(json).context("bpftool's JSON program list")?;
    let mut totals: BTreeMap<String, Totals> = BTreeMap::new();
    for p in &progs {
        let Some(name) = p.get("name").and_then(|n| n.as_str()) else {
            continue;
        };
        if !DATA_PATH.contains(&name) {
            continue;
        }
        let field = |f: &str| p.get(f).and_then(|v| v.as_u64()).unwrap_or(0);
        let t = totals.entry(name.to_string()).or_default();
        t.run_time_ns += field("run_time_ns");
        t.runs += field("run_cnt");
    }
    Ok(Snapshot(totals))
}

/// One program's share of a measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgramCost {
    pub name: String,
    pub runs: u64,
    pub run_time_ns: u64,
}

impl ProgramCost {
    pub fn ns_per_run(&self) -> f64 {
        self.run_time_ns as f64 / (self.runs.max(1)) as f64
    }
}

/// What ran between `before` and `after`, per program.
pub fn between(before: &Snapshot, after: &Snapshot) -> Vec<ProgramCost> {
    after
        .0
        .iter()
        .map(|(name, a)| {
            let b = before.0.get(name).copied().unwrap_or_default();
            ProgramCost {
                name: name.clone(),
                runs: a.runs.saturating_sub(b.runs),
                run_time_ns: a.run_time_ns.saturating_sub(b.run_time_ns),
            }
        })
        .filter(|c| c.runs > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_of_a_program_are_added_up_and_others_left_out() {
        let json = br#"[
            {"id":1,"name":"lb_from_pod","run_time_ns":1000,"run_cnt":10},
            {"id":2,"name":"lb_from_pod","run_time_ns":500,"run_cnt":5},
            {"id":3,"name":"lb_to_pod"},
            {"id":4,"name":"sd_fw_egress","run_time_ns":7,"run_cnt":7},
            {"id":5,"type":"xdp"}
        ]"#;
        let s = parse(json).expect("parses");
        assert_eq!(
            s.0.get("lb_from_pod"),
            Some(&Totals {
                run_time_ns: 1500,
                runs: 15
            })
        );
        assert_eq!(s.0.get("lb_to_pod"), Some(&Totals::default()));
        assert_eq!(s.0.len(), 2);
    }

    #[test]
    fn a_measurement_is_the_difference_and_idle_programs_are_dropped() {
        let mut before = Snapshot::default();
        before.0.insert(
            "lb_from_pod".into(),
            Totals {
                run_time_ns: 100,
                runs: 1,
            },
        );
        let mut after = before.clone();
        after.0.insert(
            "lb_from_pod".into(),
            Totals {
                run_time_ns: 1100,
                runs: 3,
            },
        );
        after.0.insert("lb_to_pod".into(), Totals::default());
        let d = between(&before, &after);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].runs, 2);
        assert_eq!(d[0].ns_per_run(), 500.0);
    }
}
