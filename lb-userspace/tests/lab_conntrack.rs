//! Conntrack entries expire when idle (TCP by state, UDP by time), while an
//! open, idle TCP connection keeps its entries and keeps working.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, TcpStream},
    time::Duration,
};

use lb::{
    datapath::Maps,
    lab::{Lab, LabConfig},
};
use lb_common::{conntrack::CT_F_CLOSING, PROTO_TCP, PROTO_UDP};

const CLIENT: (&str, &str) = ("default", "client");

/// Conntrack entries (proto, flags) whose forward key comes from `client`.
fn entries_from(lab: &Lab, node: usize, client: Ipv4Addr) -> Vec<(u8, u16, u16)> {
    let maps = Maps::open_pinned(&lab.pin_dir(node)).unwrap();
    maps.conntrack
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| k.saddr == u32::from(client).to_be() && k.direction == 0)
        .map(|(k, v)| (k.proto, u16::from_be(k.sport), v.flags))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_entries_expire_by_state_and_open_connections_keep_theirs() {
    let mut cfg = LabConfig::new(&common::prefix('k'), env!("CARGO_BIN_EXE_lb"));
    cfg.manifests = Some(common::test_manifests("services"));
    cfg.agent_args = [
        "--ct-udp-timeout",
        "1",
        "--ct-tcp-closing-timeout",
        "1",
        "--ct-sweep-seconds",
        "1",
    ]
    .map(String::from)
    .to_vec();
    let lab = Lab::up(cfg).await.unwrap();
    lab.wait_pods_ready(Duration::from_secs(60)).await.unwrap();
    let http = common::vip(&lab, "web", 80);
    common::wait_reachable(&lab, CLIENT, http, Duration::from_secs(30)).await;
    let client_ip: Ipv4Addr = lab
        .store
        .get(lb::lab::kinds::Kind::Pod, "default", "client")
        .unwrap()["status"]["podIP"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // An open connection, idle for longer than every short timeout.
    let netns = lab.pod_netns("default", "client").unwrap();
    let mut open = lb::netns::run_in(&netns, move || {
        TcpStream::connect_timeout(&http, Duration::from_secs(3))
    })
    .unwrap()
    .unwrap();
    open.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let open_port = open.local_addr().unwrap().port();
    let mut reader = BufReader::new(open.try_clone().unwrap());
    let mut ask = |open: &mut TcpStream| {
        open.write_all(b"hello\n").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    let pod = ask(&mut open);

    // A finished TCP connection and a UDP exchange.
    common::request(&lab, CLIENT, http).await.unwrap();
    common::udp_request(&lab, CLIENT, common::vip(&lab, "web", 53))
        .await
        .unwrap();
    let node: usize = common::node_of(&lab, "client")
        .trim_start_matches("node-")
        .parse()
        .unwrap();
    let before = entries_from(&lab, node, client_ip);
    assert!(
        before.iter().any(|(p, _, _)| *p == PROTO_UDP),
        "UDP entry: {before:?}"
    );
    assert!(
        before
            .iter()
            .any(|(p, port, f)| *p == PROTO_TCP && *port != open_port && f & CT_F_CLOSING != 0),
        "the finished connection's entry is marked closing: {before:?}"
    );

    tokio::time::sleep(Duration::from_millis(3500)).await;
    let after = entries_from(&lab, node, client_ip);
    assert_eq!(
        after,
        vec![(PROTO_TCP, open_port, 0)],
        "only the open connection's entry is left"
    );
    assert_eq!(
        ask(&mut open),
        pod,
        "the idle connection still works, on the same pod"
    );
}
