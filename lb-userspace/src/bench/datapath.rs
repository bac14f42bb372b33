//! Per-packet cost of `lb_from_pod`, measured by the kernel itself
//! (BPF_PROG_TEST_RUN's duration). With a repeat count the kernel would run
//! the program again on the packet it has already rewritten (after one DNAT
//! the rest would be packets for no Service), so every measured run is a
//! run of repeat 1 on its own input, and the verdict and output bytes of
//! every one are checked. The figure of a batch is the mean of its runs;
//! min, median and max are over the batches.

use std::net::Ipv4Addr;

use anyhow::{bail, ensure, Context, Result};
use aya::maps::lpm_trie::Key;
use aya::programs::{TestRun, TestRunOptions};
use lb_common::{
    conntrack::CONNTRACK_MAX_ENTRIES,
    policy::{
        EndpointInfo, IpcacheKey, PolicyEntry, PolicyKey, DIR_EGRESS, ENDPOINT_F_EGRESS_ISOLATED,
        POLICY_KEY_FIXED_BITS,
    },
    service::{ServiceValue, SERVICE_F_CLUSTER_IP},
    PROTO_TCP,
};

use super::Stats;
use crate::{
    datapath::{Datapath, PROG_FROM_POD},
    packet::Frame,
    plan::{desired_state, plan, service_key, MapState},
    translate::{BackendAddr, DesiredService},
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const XDP_PASS: u32 = 2;
pub const VIP: &str = "10.96.0.10";
const CLIENT: &str = "10.244.1.5";
/// The measured Service's backends.
const BACKENDS: usize = 10;
/// New flows per figure into a table with room: each writes up to two
/// entries, so the table (`CONNTRACK_MAX_ENTRIES`) stays under half full.
pub const NEW_FLOWS: usize = 250_000;

/// What one packet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// A SYN of a flow never seen: Service lookup, Maglev, conntrack
    /// create, DNAT; into a conntrack table with room (`NEW_FLOWS` flows at
    /// most per figure, against its 1,048,576 entries).
    NewFlow,
    /// The same into a full conntrack table (filled first): every insert
    /// evicts the least recently used entry.
    NewFlowFullTable,
    /// A packet of a tracked flow: conntrack hit, DNAT.
    Established,
    /// A packet to an address that is no Service: lookups that miss, passed
    /// unchanged.
    NoService,
    /// A new flow from a pod isolated for egress with no rule allowing it:
    /// translated, then dropped by policy.
    PolicyDrop,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::NewFlow,
        Scenario::NewFlowFullTable,
        Scenario::Established,
        Scenario::NoService,
        Scenario::PolicyDrop,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::NewFlow => "new flow to a Service",
            Scenario::NewFlowFullTable => "new flow, conntrack table full",
            Scenario::Established => "established flow",
            Scenario::NoService => "packet for no Service",
            Scenario::PolicyDrop => "policy drop",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Measured {
    pub label: String,
    pub services: usize,
    pub runs: usize,
    /// Nanoseconds per packet.
    pub ns: Stats,
}

pub(super) fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap_or(Ipv4Addr::UNSPECIFIED)
}

/// The measured Service: `VIP:80` with ten backends and a Maglev table,
/// written by the agent's own planner.
fn measured_service() -> DesiredService {
    DesiredService {
        name: "bench/web:http".into(),
        vip: ip(VIP),
        port: 80,
        proto: PROTO_TCP,
        flags: 0,
        backends: (0..BACKENDS)
            .map(|i| BackendAddr {
                ip: Ipv4Addr::new(10, 244, 2, 10 + i as u8),
                port: 8080,
                proto: PROTO_TCP,
                local: false,
            })
            .collect(),
        retained: vec![],
        affinity_timeout: None,
        source_ranges: vec![],
    }
}

/// A data path with `services` Services in its maps: the measured one and
/// `services - 1` others of one backend each. The others are written
/// straight into SERVICES (master entry and slot), as the agent writes a
/// ClusterIP (no Maglev table; one rev-NAT id for all of them here, as no
/// packet of theirs is sent); the per-packet work of the measured Service
/// is the same, against a map of the size under test.
pub fn datapath_with(services: usize) -> Result<Datapath> {
    let mut dp = Datapath::load(None).context("loading the programs (root?)")?;
    let want = desired_state(&MapState::default(), &[measured_service()]);
    dp.maps.apply(&plan(&MapState::default(), &want))?;
    let filler_backend = 1_000_000u32;
    dp.maps.backends.insert(
        filler_backend,
        lb_common::backend::Backend {
            addr: u32::from(Ipv4Addr::new(10, 245, 0, 1)).to_be(),
            port: 8080u16.to_be(),
            proto: PROTO_TCP,
            flags: 0,
        },
        0,
    )?;
    for i in 1..services as u32 {
        // 10.100.0.0/14: clear of the measured VIP and the pods.
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i);
        let master = ServiceValue {
            count: 1,
            flags: SERVICE_F_CLUSTER_IP,
            rev_nat_id: 60000,
            ..Default::default()
        };
        dp.maps.services.insert(
            service_key(vip, 80, PROTO_TCP, 1),
            ServiceValue {
                backend_id: filler_backend,
                rev_nat_id: 60000,
                ..Default::default()
            },
            0,
        )?;
        dp.maps
            .services
            .insert(service_key(vip, 80, PROTO_TCP, 0), master, 0)?;
    }
    Ok(dp)
}

/// Isolates CLIENT for egress; with `allow`, a rule lets it reach the
/// measured Service's backends on 8080. `filler` more rules (other
/// endpoints, identities and ports) make the policy map that big.
pub fn isolate_client(dp: &mut Datapath, allow: bool, filler: usize) -> Result<()> {
    let be = |a: Ipv4Addr| u32::from(a).to_be();
    dp.maps.endpoints.insert(
        be(ip(CLIENT)),
        EndpointInfo {
            endpoint_id: 1,
            flags: ENDPOINT_F_EGRESS_ISOLATED,
        },
        0,
    )?;
    // The backends' identity.
    dp.maps.ipcache.insert(
        &Key::new(
            24,
            IpcacheKey {
                addr: be(Ipv4Addr::new(10, 244, 2, 0)),
            },
        ),
        300,
        0,
    )?;
    let rule = |endpoint_id: u16, identity: u32, port: u16| {
        Key::new(
            POLICY_KEY_FIXED_BITS + 16,
            PolicyKey {
                endpoint_id,
                direction: DIR_EGRESS,
                proto: PROTO_TCP,
                identity,
                port: port.to_be(),
                pad0: 0,
            },
        )
    };
    if allow {
        dp.maps
            .policy
            .insert(&rule(1, 300, 8080), PolicyEntry { rule_id: 1 }, 0)?;
    }
    for i in 0..filler {
        let endpoint = 2 + (i / 100) as u16;
        let identity = 400 + (i % 100) as u32;
        dp.maps.policy.insert(
            &rule(endpoint, identity, 1000 + (i % 50) as u16),
            PolicyEntry { rule_id: 2 },
            0,
        )?;
    }
    Ok(())
}

/// One run of repeat 1: verdict, output, kernel nanoseconds.
pub(super) fn run_once(
    prog: &mut dyn TestRunDyn,
    input: &[u8],
    out: &mut Vec<u8>,
) -> Result<(u32, u64)> {
    out.resize(input.len() + 256, 0);
    let (ret, size, ns) = prog.run(input, out)?;
    out.truncate(size);
    Ok((ret, ns))
}

/// Object-safe view of aya's TestRun for the two program types.
pub trait TestRunDyn {
    fn run(&mut self, input: &[u8], out: &mut [u8]) -> Result<(u32, usize, u64)>;
}

impl<T> TestRunDyn for T
where
    T: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::TestRunResult>,
{
    fn run(&mut self, input: &[u8], out: &mut [u8]) -> Result<(u32, usize, u64)> {
        let res = self.test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(out),
            repeat: 1,
            ..Default::default()
        })?;
        Ok((
            res.return_value,
            res.data_size_out as usize,
            res.duration.as_nanos() as u64,
        ))
    }
}

/// A SYN from CLIENT (or another client address for `flow` > 60000) to `dst`.
pub(super) fn syn(flow: usize, dst: &str, dport: u16) -> Vec<u8> {
    from_client(flow, dst, dport).build(b"")
}

/// The same flow's packets after the handshake, as most of a connection's
/// are: an ACK.
pub(super) fn ack(flow: usize, dst: &str, dport: u16) -> Vec<u8> {
    from_client(flow, dst, dport).build_ack(b"")
}

fn from_client(flow: usize, dst: &str, dport: u16) -> Frame {
    let sport = 1024 + (flow % 60000) as u16;
    let src = Ipv4Addr::from(u32::from(ip(CLIENT)) + (flow / 60000) as u32 * 256);
    Frame::tcp(&src.to_string(), sport, dst, dport)
}

/// Measures `scenario` on a data path with `services` Services: `batches`
/// batches of `per_batch` runs.
pub fn measure(
    scenario: Scenario,
    services: usize,
    batches: usize,
    per_batch: usize,
) -> Result<Measured> {
    let per_batch = match scenario {
        Scenario::NewFlow => per_batch.min(NEW_FLOWS / batches.max(1)),
        _ => per_batch,
    };
    let mut dp = datapath_with(services)?;
    if scenario == Scenario::PolicyDrop {
        isolate_client(&mut dp, false, 0)?;
    }
    let backends: Vec<Ipv4Addr> = measured_service().backends.iter().map(|b| b.ip).collect();
    let established = ack(0, VIP, 80);
    let mut expected_established = Vec::new();
    if scenario == Scenario::Established {
        // The flow's SYN creates its entries; the runs are the ACKs after.
        let prog = dp.program(PROG_FROM_POD)?;
        run_once(prog, &syn(0, VIP, 80), &mut expected_established)?;
        run_once(prog, &established, &mut expected_established)?;
        ensure!(
            expected_established.len() == established.len(),
            "established flow: its first ACK was not passed"
        );
    }
    let no_service = ack(0, "10.97.0.1", 80);
    let prog = dp.program(PROG_FROM_POD)?;
    let mut out = Vec::new();
    let mut means = Vec::with_capacity(batches);
    let mut flow = 1usize;
    if scenario == Scenario::NewFlowFullTable {
        // As many new flows as the table has entries, each writing at
        // least one: full, before the first measured run.
        for _ in 0..CONNTRACK_MAX_ENTRIES as usize {
            run_once(prog, &syn(flow, VIP, 80), &mut out)?;
            flow += 1;
        }
    }
    for _ in 0..batches {
        let mut total = 0u64;
        for _ in 0..per_batch {
            let input_new;
            let input: &[u8] = match scenario {
                Scenario::NewFlow | Scenario::NewFlowFullTable => {
                    input_new = syn(flow, VIP, 80);
                    flow += 1;
                    &input_new
                }
                // Dropped before conntrack: the same client (the isolated
                // one) may send the same SYN again and it is still new.
                Scenario::PolicyDrop => {
                    input_new = syn(flow % 60000, VIP, 80);
                    flow += 1;
                    &input_new
                }
                Scenario::Established => &established,
                Scenario::NoService => &no_service,
            };
            let (verdict, ns) = run_once(prog, input, &mut out)?;
            total += ns;
            check(
                scenario,
                verdict,
                input,
                &out,
                &backends,
                &expected_established,
            )?;
        }
        means.push(total as f64 / per_batch as f64);
    }
    Ok(Measured {
        label: scenario.name().into(),
        services,
        runs: batches * per_batch,
        ns: Stats::of(&means),
    })
}

/// The verdict and bytes each scenario must produce.
fn check(
    scenario: Scenario,
    verdict: u32,
    input: &[u8],
    out: &[u8],
    backends: &[Ipv4Addr],
    expected_established: &[u8],
) -> Result<()> {
    match scenario {
        Scenario::NewFlow | Scenario::NewFlowFullTable => {
            ensure!(verdict == TC_ACT_OK, "new flow: verdict {verdict}");
            let f = Frame::parse(out).map_err(anyhow::Error::msg)?;
            ensure!(
                backends.contains(&f.dst) && f.dport == 8080,
                "new flow not DNATed to a backend: {}:{}",
                f.dst,
                f.dport
            );
        }
        Scenario::Established => {
            ensure!(verdict == TC_ACT_OK, "established: verdict {verdict}");
            ensure!(
                out == expected_established,
                "established flow: output differs from its first packet's"
            );
        }
        Scenario::NoService => {
            ensure!(verdict == TC_ACT_OK, "no service: verdict {verdict}");
            ensure!(out == input, "a packet for no Service was changed");
        }
        Scenario::PolicyDrop => {
            ensure!(verdict == TC_ACT_SHOT, "policy drop: verdict {verdict}");
        }
    }
    Ok(())
}

/// New flows of an egress-isolated client that a rule allows, with `filler`
/// other rules in the policy map (0: the client is not isolated at all).
pub fn measure_policy(filler: Option<usize>, batches: usize, per_batch: usize) -> Result<Measured> {
    // Every flow from the one isolated client, each a new one: at most
    // 60,000 source ports.
    ensure!(
        batches * per_batch < 60000,
        "at most 60,000 new flows from one client"
    );
    let mut dp = datapath_with(10)?;
    if let Some(n) = filler {
        isolate_client(&mut dp, true, n)?;
    }
    let backends: Vec<Ipv4Addr> = measured_service().backends.iter().map(|b| b.ip).collect();
    let prog = dp.program(PROG_FROM_POD)?;
    let mut out = Vec::new();
    let mut means = Vec::new();
    let mut flow = 1;
    for _ in 0..batches {
        let mut total = 0;
        for _ in 0..per_batch {
            let input = syn(flow, VIP, 80);
            flow += 1;
            let (verdict, ns) = run_once(prog, &input, &mut out)?;
            total += ns;
            check(Scenario::NewFlow, verdict, &input, &out, &backends, &[])?;
        }
        means.push(total as f64 / per_batch as f64);
    }
    Ok(Measured {
        label: match filler {
            None => "new flow, no policy (client not isolated)".into(),
            Some(n) => format!("new flow allowed by policy, {} policy entries", n + 1),
        },
        services: 10,
        runs: batches * per_batch,
        ns: Stats::of(&means),
    })
}

/// The floor: programs that return at once, measured the same way.
pub fn measure_floor(batches: usize, per_batch: usize) -> Result<Vec<Measured>> {
    let mut dp = Datapath::load(None)?;
    let input = syn(0, VIP, 80);
    let mut out = Vec::new();
    let mut rows = Vec::new();
    for (label, xdp) in [("empty tc program", false), ("empty XDP program", true)] {
        let prog: &mut dyn TestRunDyn = if xdp { dp.floor_xdp()? } else { dp.floor_tc()? };
        let mut means = Vec::new();
        for _ in 0..batches {
            let mut total = 0;
            for _ in 0..per_batch {
                let (verdict, ns) = run_once(prog, &input, &mut out)?;
                let want = if xdp { XDP_PASS } else { TC_ACT_OK };
                if verdict != want || out != input {
                    bail!("{label}: verdict {verdict} or output changed");
                }
                total += ns;
            }
            means.push(total as f64 / per_batch as f64);
        }
        rows.push(Measured {
            label: label.into(),
            services: 0,
            runs: batches * per_batch,
            ns: Stats::of(&means),
        });
    }
    Ok(rows)
}
