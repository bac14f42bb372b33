//! Maglev: the share of flows that move when one of N backends goes,
//! against the ideal 1/N (modulo hashing would move (N-1)/N), and the time
//! to build a table. Flows are hashed as the data path hashes them.

use std::time::Instant;

use super::Stats;
use crate::maglev;

#[derive(Clone, Debug)]
pub struct Movement {
    pub backends: usize,
    pub table_size: u32,
    /// Share of flows whose backend changed, over `trials` removals (each a
    /// different backend).
    pub moved: Stats,
    pub ideal: f64,
    pub flows: usize,
}

#[derive(Clone, Debug)]
pub struct BuildTime {
    pub backends: usize,
    pub table_size: u32,
    /// Microseconds per table.
    pub micros: Stats,
}

fn names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.244.{}.{}:8080", i / 250, 1 + i % 250))
        .collect()
}

/// The data path's hash of flow `i`: a client among 10.244.0.0/16 with
/// some source port, to 10.96.0.10:80/TCP (network byte order, as the
/// program reads them).
fn flow_hash(i: u32) -> u32 {
    lb_common::service::flow_hash(
        (0x0af4_0000u32 + (i >> 8)).to_be(),
        0x0a60_000au32.to_be(),
        (32768 + (i & 0xff) as u16 * 97).to_be(),
        80u16.to_be(),
        lb_common::PROTO_TCP,
    )
}

pub fn movement(backends: usize, flows: usize, trials: usize) -> Movement {
    let all = names(backends);
    let size = lb_common::service::maglev_table_size(backends);
    let before = maglev::table(&all, size);
    let mut shares = Vec::new();
    for t in 0..trials {
        let gone = (t * 7919) % backends;
        let rest: Vec<String> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != gone)
            .map(|(_, n)| n.clone())
            .collect();
        let after_size = lb_common::service::maglev_table_size(rest.len());
        let after = maglev::table(&rest, after_size);
        let mut moved = 0;
        for f in 0..flows as u32 {
            let h = flow_hash(f);
            let b = &all[before[(h % size) as usize] as usize];
            let a = &rest[after[(h % after_size) as usize] as usize];
            if a != b {
                moved += 1;
            }
        }
        shares.push(moved as f64 / flows as f64);
    }
    Movement {
        backends,
        table_size: size,
        moved: Stats::of(&shares),
        ideal: 1.0 / backends as f64,
        flows,
    }
}

pub fn build_time(backends: usize, runs: usize) -> BuildTime {
    let all = names(backends);
    let size = lb_common::service::maglev_table_size(backends);
    let micros: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            let t = maglev::table(&all, size);
            std::hint::black_box(t);
            started.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    BuildTime {
        backends,
        table_size: size,
        micros: Stats::of(&micros),
    }
}
