//! `lb flows`: streams the NetworkPolicy verdicts the data path reports
//! through the FLOWS ring buffer, with pod names and the deciding policy.

use std::{
    collections::BTreeMap,
    io::Write,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, RingBuf};
use kube::Client;
use lb_common::{
    map_names,
    policy::{FlowEvent, DIR_INGRESS, VERDICT_ALLOW},
};

use crate::policy::{rule_names, RuleName};

/// What names addresses and rules: refreshed from the API.
#[derive(Default)]
struct Names {
    pods: BTreeMap<Ipv4Addr, String>,
    rules: BTreeMap<u32, RuleName>,
}

async fn names(client: &Client) -> Result<Names> {
    let (pods, _, policies) = crate::trace::policy_objects(client).await?;
    let rules = rule_names(&policies);
    let pods = pods
        .iter()
        .filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
            Some((
                ip,
                format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref()?,
                    p.metadata.name.as_deref()?
                ),
            ))
        })
        .collect();
    Ok(Names { pods, rules })
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}

/// `HH:MM:SS.mmm` (UTC) of a wall-clock time in nanoseconds.
fn clock_time(unix_ns: u128) -> String {
    let ms = unix_ns / 1_000_000;
    let (s, ms) = (ms / 1000, ms % 1000);
    let day = s % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{ms:03}",
        day / 3600,
        day / 60 % 60,
        day % 60
    )
}

/// One line per verdict: time, source, destination, protocol/port,
/// direction, verdict, deciding policy.
fn line(e: &FlowEvent, names: &Names, wall_offset_ns: i128) -> String {
    let addr = |a: u32| {
        let ip = Ipv4Addr::from(u32::from_be(a));
        names
            .pods
            .get(&ip)
            .cloned()
            .unwrap_or_else(|| ip.to_string())
    };
    let time = clock_time((i128::from(e.ts_ns) + wall_offset_ns).max(0) as u128);
    let verdict = if e.verdict == VERDICT_ALLOW {
        "ALLOW"
    } else {
        "DROP"
    };
    let why = match (e.verdict == VERDICT_ALLOW, e.rule_id) {
        (false, _) => "no rule allows it".to_string(),
        (true, 0) => "the node's own traffic".to_string(),
        (true, id) => match names.rules.get(&id) {
            Some(r) => format!("{} {} rule {}", r.policy, r.direction, r.index),
            None => format!("rule {id}"),
        },
    };
    format!(
        "{time} {}:{} -> {}:{} {}/{} {} {verdict} {why}",
        addr(e.saddr),
        u16::from_be(e.sport),
        addr(e.daddr),
        u16::from_be(e.dport),
        proto_name(e.proto),
        u16::from_be(e.dport),
        if e.direction == DIR_INGRESS {
            "ingress"
        } else {
            "egress"
        },
    )
}

/// Streams verdicts from the maps pinned in `pin_dir`, `count` of them or
/// until interrupted.
pub async fn run(pin_dir: &Path, client: Option<Client>, count: Option<usize>) -> Result<()> {
    let path = pin_dir.join(map_names::FLOWS);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening {} (is the agent running?)", path.display()))?;
    let mut ring = RingBuf::try_from(Map::RingBuf(data))?;
    let now_mono = crate::conntrack::monotonic_ns()?;
    let now_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let wall_offset = now_wall as i128 - i128::from(now_mono);
    let mut known = Names::default();
    let mut refreshed: Option<Instant> = None;
    let mut seen = 0;
    let stdout = std::io::stdout();
    loop {
        if let Some(client) = &client {
            if refreshed.is_none_or(|t| t.elapsed() > Duration::from_secs(2)) {
                if let Ok(n) = names(client).await {
                    known = n;
                }
                refreshed = Some(Instant::now());
            }
        }
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<FlowEvent>() {
                continue;
            }
            let e: FlowEvent =
                bytemuck::pod_read_unaligned(&item[..std::mem::size_of::<FlowEvent>()]);
            let mut out = stdout.lock();
            writeln!(out, "{}", line(&e, &known, wall_offset))?;
            out.flush()?;
            seen += 1;
            if count.is_some_and(|c| seen >= c) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn clock_time_is_utc_time_of_day_with_milliseconds() {
        // 2026-11-23T02:24:23.456Z
        assert_eq!(super::clock_time(1_795_400_663_456_789_000), "02:24:23.456");
        assert_eq!(super::clock_time(0), "00:00:00.000");
    }
}
