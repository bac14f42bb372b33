//! Helpers of the data-path tests: programs loaded with seeded maps, run
//! once on a crafted frame (BPF_PROG_TEST_RUN).
#![allow(dead_code)]

use std::net::Ipv4Addr;

use aya::programs::{TestRun, TestRunOptions};
use lb::{
    datapath::Datapath,
    plan::{desired_state, plan, MapState},
    translate::{BackendAddr, DesiredService},
};
use lb_common::{conntrack::ConntrackKey, PROTO_TCP};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const VIP: &str = "10.96.0.10";
pub const CLIENT: &str = "10.244.1.5";

pub fn datapath_with(services: &[DesiredService]) -> Datapath {
    let mut dp = Datapath::load(None).expect("load programs (are you root?)");
    let want = desired_state(&MapState::default(), services);
    dp.maps
        .apply(&plan(&MapState::default(), &want))
        .expect("seed maps");
    dp
}

pub fn service(port: u16, proto: u8, backends: &[(&str, u16)]) -> DesiredService {
    DesiredService {
        name: "test/web:http".into(),
        vip: VIP.parse().unwrap(),
        port,
        proto,
        flags: 0,
        backends: backends
            .iter()
            .map(|(ip, port)| BackendAddr {
                ip: ip.parse().unwrap(),
                port: *port,
                proto,
                local: false,
            })
            .collect(),
        retained: vec![],
        affinity_timeout: None,
        source_ranges: vec![],
    }
}

/// Runs `prog` once on `input`; returns the verdict and the output frame.
pub fn run(dp: &mut Datapath, prog: &str, input: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        repeat: 1,
        ..Default::default()
    };
    let res = dp
        .program(prog)
        .unwrap()
        .test_run(opts)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {} bytes: {e}", input.len()));
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

pub fn counter(dp: &Datapath, name: &str) -> u64 {
    dp.maps.counters().unwrap()[name].packets
}

pub fn ct_key(
    src: &str,
    sport: u16,
    dst: &str,
    dport: u16,
    proto: u8,
    direction: u8,
) -> ConntrackKey {
    ConntrackKey {
        saddr: u32::from(src.parse::<Ipv4Addr>().unwrap()).to_be(),
        daddr: u32::from(dst.parse::<Ipv4Addr>().unwrap()).to_be(),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        direction,
        pad0: 0,
    }
}

pub const XDP_PASS: u32 = 2;
pub const NODE_IP: &str = "172.18.0.11";
pub const OUTSIDE: &str = "172.18.0.100";

pub fn frontend(vip: &str, port: u16, flags: u16, backends: &[(&str, u16)]) -> DesiredService {
    DesiredService {
        vip: vip.parse().unwrap(),
        flags,
        ..service(port, PROTO_TCP, backends)
    }
}

pub fn run_xdp(dp: &mut Datapath, input: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        repeat: 1,
        ..Default::default()
    };
    let res = dp
        .xdp()
        .unwrap()
        .test_run(opts)
        .expect("BPF_PROG_TEST_RUN (xdp)");
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}
