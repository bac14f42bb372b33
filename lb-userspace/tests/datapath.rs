//! Runs the loaded tc programs on crafted packets (BPF_PROG_TEST_RUN) and
//! checks verdicts, output bytes, checksums and conntrack entries. Needs root.

mod dp;

use std::net::Ipv4Addr;

use dp::*;
use lb::{
    datapath::{Datapath, PROG_FROM_POD, PROG_TO_POD},
    packet::Frame,
    plan::{desired_state, plan, MapState},
    translate::DesiredService,
};
use lb_common::{
    conntrack::{ConntrackKey, CT_FORWARD, CT_REPLY},
    metrics::reason,
    PROTO_TCP, PROTO_UDP,
};

#[test]
fn syn_to_vip_is_dnated_to_a_backend_and_reply_is_reverse_translated() {
    let mut dp = datapath_with(&[service(
        80,
        PROTO_TCP,
        &[("10.244.1.2", 8080), ("10.244.1.3", 8080)],
    )]);
    let syn = Frame::tcp(CLIENT, 40000, VIP, 80);
    let (verdict, out) = run(&mut dp, PROG_FROM_POD, &syn.build(b""));
    assert_eq!(verdict, TC_ACT_OK);
    let got = Frame::parse(&out).expect("valid checksums after DNAT");
    assert_eq!(
        (got.src, got.sport),
        (syn.src, syn.sport),
        "source untouched"
    );
    assert!(
        ["10.244.1.2", "10.244.1.3"].contains(&got.dst.to_string().as_str()),
        "dst {}",
        got.dst
    );
    assert_eq!(got.dport, 8080);
    assert_eq!(counter(&dp, "new_flow"), 1);

    // Both conntrack entries exist and say where to rewrite to.
    let fwd = dp
        .maps
        .conntrack
        .get(&ct_key(CLIENT, 40000, VIP, 80, PROTO_TCP, CT_FORWARD), 0)
        .unwrap();
    assert_eq!(Ipv4Addr::from(u32::from_be(fwd.nat_addr)), got.dst);
    let backend = got.dst.to_string();
    let rev = dp
        .maps
        .conntrack
        .get(
            &ct_key(&backend, 8080, CLIENT, 40000, PROTO_TCP, CT_REPLY),
            0,
        )
        .unwrap();
    assert_eq!(Ipv4Addr::from(u32::from_be(rev.nat_addr)).to_string(), VIP);
    assert_eq!(u16::from_be(rev.nat_port), 80);

    // The connection's next packet keeps its backend (conntrack hit).
    let (_, again) = run(&mut dp, PROG_FROM_POD, &syn.build_ack(b"data"));
    assert_eq!(Frame::parse(&again).unwrap().dst, got.dst);
    assert_eq!(counter(&dp, "forwarded"), 1);

    // The backend's reply leaves towards the client with the VIP as source.
    let reply = Frame::tcp(&backend, 8080, CLIENT, 40000);
    let (verdict, out) = run(&mut dp, PROG_TO_POD, &reply.build_ack(b"pong"));
    assert_eq!(verdict, TC_ACT_OK);
    let got = Frame::parse(&out).expect("valid checksums after reverse NAT");
    assert_eq!(got, Frame::tcp(VIP, 80, CLIENT, 40000));
    assert_eq!(counter(&dp, "reverse_nat"), 1);
    // Every port's checksum change was written without a second helper
    // call: the address's told the checksum's state.
    assert_eq!(counter(&dp, "csum_state_unexplained"), 0);

    // A SYN without ACK answers nothing, so it is never taken for a reply
    // (the reply lookups are skipped): the backend opening a connection of
    // its own on the reply's tuple leaves as it was sent.
    let (verdict, out) = run(&mut dp, PROG_TO_POD, &reply.build(b""));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(Frame::parse(&out).unwrap(), reply);
    assert_eq!(counter(&dp, "reverse_nat"), 1);
}

#[test]
fn udp_to_vip_is_dnated_with_valid_checksum() {
    let mut dp = datapath_with(&[service(53, PROTO_UDP, &[("10.244.1.7", 1053)])]);
    let (verdict, out) = run(
        &mut dp,
        PROG_FROM_POD,
        &Frame::udp(CLIENT, 5000, VIP, 53).build(b"query"),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        Frame::parse(&out).unwrap(),
        Frame::udp(CLIENT, 5000, "10.244.1.7", 1053)
    );
    assert_eq!(counter(&dp, "csum_state_unexplained"), 0);
}

#[test]
fn flows_spread_over_backends() {
    let backends = [("10.244.1.2", 80), ("10.244.1.3", 80), ("10.244.1.4", 80)];
    let mut dp = datapath_with(&[service(80, PROTO_TCP, &backends)]);
    let mut seen = std::collections::BTreeSet::new();
    for sport in 30000..30060 {
        let (_, out) = run(
            &mut dp,
            PROG_FROM_POD,
            &Frame::tcp(CLIENT, sport, VIP, 80).build(b""),
        );
        seen.insert(Frame::parse(&out).unwrap().dst);
    }
    assert_eq!(
        seen.len(),
        3,
        "60 flows should reach all 3 backends, saw {seen:?}"
    );
}

#[test]
fn packet_to_another_address_passes_untouched() {
    let mut dp = datapath_with(&[service(80, PROTO_TCP, &[("10.244.1.2", 8080)])]);
    for frame in [
        Frame::tcp(CLIENT, 40000, "10.244.1.2", 8080), // pod to pod
        Frame::tcp(CLIENT, 40000, VIP, 81),            // VIP, other port
        Frame::udp(CLIENT, 40000, VIP, 80),            // VIP, other protocol
    ] {
        let input = frame.build(b"x");
        let (verdict, out) = run(&mut dp, PROG_FROM_POD, &input);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, input, "{frame:?} must pass byte for byte");
        let (verdict, out) = run(&mut dp, PROG_TO_POD, &input);
        assert_eq!((verdict, &out), (TC_ACT_OK, &input));
    }
    assert_eq!(counter(&dp, "new_flow"), 0);
}

#[test]
fn truncated_packets_are_never_rewritten() {
    let mut dp = datapath_with(&[service(80, PROTO_TCP, &[("10.244.1.2", 8080)])]);
    let full = Frame::tcp(CLIENT, 40000, VIP, 80).build(b"");
    // BPF_PROG_TEST_RUN itself refuses an IPv4 frame shorter than an IPv4
    // header, so cuts start there: no L4 header, ports only, TCP header
    // without its checksum.
    let mut inputs: Vec<Vec<u8>> = [14 + 20, 14 + 20 + 4, 14 + 20 + 17]
        .iter()
        .map(|l| full[..*l].to_vec())
        .collect();
    // A header whose IHL announces 40 bytes of options that are not there.
    let mut lying = full.clone();
    lying[14] = 0x4f;
    inputs.push(lying);
    for input in &inputs {
        let (verdict, out) = run(&mut dp, PROG_FROM_POD, input);
        assert_eq!(verdict, TC_ACT_OK, "len {}", input.len());
        assert_eq!(
            &out,
            input,
            "len {}: a truncated packet must not be rewritten",
            input.len()
        );
    }
    assert_eq!(counter(&dp, "malformed"), 4);
    assert_eq!(counter(&dp, "new_flow"), 0);
    assert!(
        dp.maps.conntrack.keys().next().is_none(),
        "no conntrack entry for a truncated packet"
    );
}

const TC_ACT_REDIRECT: u32 = 7;

/// Checks that `out` is an ICMP port unreachable answering `input`, from the
/// Service address back to the client, quoting the original header.
fn assert_port_unreachable(input: &[u8], out: &[u8]) {
    // The quote is the IP header and the L4 header (20 bytes TCP, 8 UDP).
    let l4_quote = if input[23] == PROTO_TCP { 20 } else { 8 };
    assert_eq!(
        out.len(),
        14 + 20 + 8 + 20 + l4_quote,
        "eth + ip + icmp + quoted ip + l4 header"
    );
    assert_eq!(&out[0..6], &input[6..12], "back to the sender's MAC");
    assert_eq!(&out[6..12], &input[0..6]);
    let ip = &out[14..34];
    assert_eq!(lb::packet::checksum(ip), 0, "IP header checksum");
    assert_eq!(ip[9], 1, "protocol ICMP");
    assert_eq!(&ip[12..16], &input[30..34], "from the Service address");
    assert_eq!(&ip[16..20], &input[26..30], "to the client");
    let icmp = &out[34..];
    assert_eq!(
        (icmp[0], icmp[1]),
        (3, 3),
        "destination unreachable, port unreachable"
    );
    assert_eq!(lb::packet::checksum(icmp), 0, "ICMP checksum");
    assert_eq!(
        &icmp[8..],
        &input[14..34 + l4_quote],
        "quotes the original IP and L4 headers"
    );
}

#[test]
fn service_without_backends_refuses_with_icmp_port_unreachable() {
    let mut dp = datapath_with(&[service(80, PROTO_TCP, &[]), service(53, PROTO_UDP, &[])]);
    for input in [
        Frame::tcp(CLIENT, 40000, VIP, 80).build(b""),
        Frame::udp(CLIENT, 40000, VIP, 53).build(b"query"),
    ] {
        let (verdict, out) = run(&mut dp, PROG_FROM_POD, &input);
        assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out of the interface");
        assert_port_unreachable(&input, &out);
    }
    assert_eq!(counter(&dp, "reject_no_backend"), 2);
    assert!(
        dp.maps.conntrack.keys().next().is_none(),
        "no conntrack entry for a refused flow"
    );
}

#[test]
fn tracked_flow_keeps_a_backend_that_is_no_longer_ready() {
    let mut dp = datapath_with(&[service(80, PROTO_TCP, &[("10.244.1.2", 8080)])]);
    let frame = Frame::tcp(CLIENT, 40000, VIP, 80).build(b"");
    run(&mut dp, PROG_FROM_POD, &frame);
    // 10.244.1.2 terminates: no longer in a slot, still in the backend map.
    let mut svc = service(80, PROTO_TCP, &[("10.244.1.9", 8080)]);
    svc.retained = service(80, PROTO_TCP, &[("10.244.1.2", 8080)]).backends;
    let current = dp.maps.state().unwrap();
    dp.maps
        .apply(&plan(&current, &desired_state(&current, &[svc])))
        .unwrap();
    let ack = Frame::tcp(CLIENT, 40000, VIP, 80).build_ack(b"x");
    let (_, out) = run(&mut dp, PROG_FROM_POD, &ack);
    assert_eq!(
        Frame::parse(&out).unwrap().dst.to_string(),
        "10.244.1.2",
        "established flow stays"
    );
    let (_, out) = run(
        &mut dp,
        PROG_FROM_POD,
        &Frame::tcp(CLIENT, 40001, VIP, 80).build(b""),
    );
    assert_eq!(
        Frame::parse(&out).unwrap().dst.to_string(),
        "10.244.1.9",
        "new flows avoid it"
    );
}

/// A SYN that opens a new connection (another sequence number than the
/// one that opened the entry) has its backend chosen again: a client that
/// reuses an old connection's source port is not sent to that connection's
/// backend, which may be terminating (and refuses or vanishes once its
/// process exits). A retransmitted SYN keeps the translation of the first,
/// and packets of an established connection keep their backend.
#[test]
fn a_syn_is_balanced_again_and_established_packets_keep_their_backend() {
    let mut dp = datapath_with(&[service(
        80,
        PROTO_TCP,
        &[
            ("10.244.1.2", 8080),
            ("10.244.1.3", 8080),
            ("10.244.1.4", 8080),
        ],
    )]);
    let dst = |dp: &mut Datapath, frame: &[u8]| {
        let (verdict, out) = run(dp, PROG_FROM_POD, frame);
        assert_eq!(verdict, TC_ACT_OK);
        Frame::parse(&out).unwrap().dst.to_string()
    };
    let flow = Frame::tcp(CLIENT, 40000, VIP, 80);
    let first = dst(&mut dp, &flow.build(b""));
    assert_eq!(
        dst(&mut dp, &flow.build(b"")),
        first,
        "a retransmitted SYN lands where the first one did"
    );
    // That backend terminates: out of the slots, still in the backend map.
    let ready: Vec<(&str, u16)> = ["10.244.1.2", "10.244.1.3", "10.244.1.4"]
        .into_iter()
        .filter(|ip| *ip != first)
        .map(|ip| (ip, 8080))
        .collect();
    let mut svc = service(80, PROTO_TCP, &ready);
    svc.retained = service(80, PROTO_TCP, &[(first.as_str(), 8080)]).backends;
    let current = dp.maps.state().unwrap();
    dp.maps
        .apply(&plan(&current, &desired_state(&current, &[svc])))
        .unwrap();
    assert_eq!(
        dst(&mut dp, &flow.build_ack(b"GET")),
        first,
        "the established connection keeps its terminating backend"
    );
    let again = dst(&mut dp, &flow.build_tcp(b"", lb::packet::TCP_SYN, 5000));
    assert_ne!(
        again, first,
        "a SYN on the same ports (a new connection) goes to a ready backend"
    );
    assert_eq!(
        dst(&mut dp, &flow.build_ack(b"GET")),
        again,
        "and the rest of that connection follows it"
    );
}

/// The SYN-ACK a backend sends to CLIENT's port `port`.
fn syn_ack(backend: &str, port: u16) -> Vec<u8> {
    Frame::tcp(backend, 8080, CLIENT, port)
        .build_with_flags(b"", lb::packet::TCP_SYN | lb::packet::TCP_ACK)
}

#[test]
fn a_connection_straight_to_a_pod_is_not_taken_for_an_earlier_translated_one() {
    let pod = "10.244.1.2";
    let mut dp = datapath_with(&[service(80, PROTO_TCP, &[(pod, 8080)])]);
    run(
        &mut dp,
        PROG_FROM_POD,
        &Frame::tcp(CLIENT, 40000, VIP, 80).build(b""),
    );
    // While that connection is the tuple's, the pod's answers are the
    // Service's.
    let (_, out) = run(&mut dp, PROG_TO_POD, &syn_ack(pod, 40000));
    assert_eq!(
        Frame::parse(&out).unwrap(),
        Frame::tcp(VIP, 80, CLIENT, 40000)
    );

    // The client then connects straight to the pod from the same port.
    let direct = Frame::tcp(CLIENT, 40000, pod, 8080).build(b"");
    let (verdict, out) = run(&mut dp, PROG_FROM_POD, &direct);
    assert_eq!((verdict, &out), (TC_ACT_OK, &direct), "passed as it is");
    // The pod's SYN-ACK reaches the client as the pod's own.
    let answer = syn_ack(pod, 40000);
    let (verdict, out) = run(&mut dp, PROG_TO_POD, &answer);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, answer, "not given the Service's address");
}

#[test]
fn a_client_port_reused_for_another_service_with_the_same_backend_gets_a_new_source_port() {
    let pod = "10.244.1.2";
    let (a, b) = ("10.96.0.10", "10.96.0.11");
    let mut dp = datapath_with(&[
        DesiredService {
            name: "test/a:http".into(),
            ..frontend(a, 80, 0, &[(pod, 8080)])
        },
        DesiredService {
            name: "test/b:http".into(),
            ..frontend(b, 80, 0, &[(pod, 8080)])
        },
    ]);
    let (_, out) = run(
        &mut dp,
        PROG_FROM_POD,
        &Frame::tcp(CLIENT, 40000, a, 80).build(b""),
    );
    assert_eq!(
        Frame::parse(&out).unwrap(),
        Frame::tcp(CLIENT, 40000, pod, 8080)
    );

    // Port 40000 to Service b: translated, it would be the same 5-tuple as
    // the connection to a, so it leaves from another port.
    let to_b = Frame::tcp(CLIENT, 40000, b, 80).build(b"");
    let (verdict, out) = run(&mut dp, PROG_FROM_POD, &to_b);
    assert_eq!(verdict, TC_ACT_OK);
    let sent = Frame::parse(&out).expect("valid checksums after the port change");
    assert_eq!(
        (sent.src, sent.dst, sent.dport),
        (CLIENT.parse().unwrap(), pod.parse().unwrap(), 8080)
    );
    assert_ne!(sent.sport, 40000, "a new source port");
    // A retransmitted SYN takes the same port; the next packets too.
    let (_, again) = run(&mut dp, PROG_FROM_POD, &to_b);
    assert_eq!(Frame::parse(&again).unwrap(), sent);
    let (_, data) = run(
        &mut dp,
        PROG_FROM_POD,
        &Frame::tcp(CLIENT, 40000, b, 80).build_ack(b"GET"),
    );
    assert_eq!(Frame::parse(&data).unwrap().sport, sent.sport);

    // Each connection's answers come back as its own Service's, to port 40000.
    let (_, out) = run(&mut dp, PROG_TO_POD, &syn_ack(pod, sent.sport));
    assert_eq!(
        Frame::parse(&out).unwrap(),
        Frame::tcp(b, 80, CLIENT, 40000)
    );
    let (_, out) = run(&mut dp, PROG_TO_POD, &syn_ack(pod, 40000));
    assert_eq!(
        Frame::parse(&out).unwrap(),
        Frame::tcp(a, 80, CLIENT, 40000)
    );

    // Port 40000 to a again (the tuple is a's own) keeps its port.
    let (_, out) = run(
        &mut dp,
        PROG_FROM_POD,
        &Frame::tcp(CLIENT, 40000, a, 80).build(b""),
    );
    assert_eq!(
        Frame::parse(&out).unwrap(),
        Frame::tcp(CLIENT, 40000, pod, 8080)
    );
}

#[test]
fn tracked_flow_moves_when_its_backend_is_removed() {
    let mut dp = datapath_with(&[service(80, PROTO_TCP, &[("10.244.1.2", 8080)])]);
    let frame = Frame::tcp(CLIENT, 40000, VIP, 80).build(b"");
    let (_, out) = run(&mut dp, PROG_FROM_POD, &frame);
    assert_eq!(Frame::parse(&out).unwrap().dst.to_string(), "10.244.1.2");

    // The endpoint is replaced by another pod.
    let current = dp.maps.state().unwrap();
    let want = desired_state(&current, &[service(80, PROTO_TCP, &[("10.244.1.9", 8080)])]);
    dp.maps.apply(&plan(&current, &want)).unwrap();
    let (_, out) = run(&mut dp, PROG_FROM_POD, &frame);
    assert_eq!(Frame::parse(&out).unwrap().dst.to_string(), "10.244.1.9");
    let _ = reason::COUNT;
}

/// The data path selects through the Maglev table: after one of 10 backends
/// is removed, the same 1000 flows (conntrack cleared) mostly keep their
/// backend; a modulo over the slots would move about 90% of them.
#[test]
fn maglev_selection_moves_about_one_tenth_of_flows_when_one_of_ten_backends_goes() {
    let ips: Vec<String> = (2..12).map(|i| format!("10.244.1.{i}")).collect();
    let all: Vec<(&str, u16)> = ips.iter().map(|ip| (ip.as_str(), 8080)).collect();
    let mut dp = datapath_with(&[service(80, PROTO_TCP, &all)]);
    let pick = |dp: &mut Datapath| -> Vec<Ipv4Addr> {
        let keys: Vec<ConntrackKey> = dp.maps.conntrack.keys().map(|k| k.unwrap()).collect();
        for k in keys {
            dp.maps.conntrack.remove(&k).unwrap();
        }
        (0..1000u16)
            .map(|i| {
                let client = format!("10.244.{}.{}", 2 + i / 250, 2 + i % 250);
                let (_, out) = run(
                    dp,
                    PROG_FROM_POD,
                    &Frame::tcp(&client, 40000 + i, VIP, 80).build(b""),
                );
                Frame::parse(&out).unwrap().dst
            })
            .collect()
    };
    let before = pick(&mut dp);
    let used: std::collections::BTreeSet<_> = before.iter().collect();
    assert_eq!(used.len(), 10, "all backends get flows");
    let current = dp.maps.state().unwrap();
    let without_one = service(80, PROTO_TCP, &all[1..]);
    dp.maps
        .apply(&plan(&current, &desired_state(&current, &[without_one])))
        .unwrap();
    let after = pick(&mut dp);
    let removed: Ipv4Addr = ips[0].parse().unwrap();
    assert!(after.iter().all(|b| *b != removed));
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let on_removed = before.iter().filter(|b| **b == removed).count();
    eprintln!("maglev: {moved} of 1000 flows moved, {on_removed} of them from the removed backend");
    assert!(
        moved >= on_removed,
        "flows of the removed backend must move"
    );
    assert!(
        moved <= 150,
        "{moved} of 1000 flows moved; Maglev should move about 100 (1/N)"
    );
}

#[test]
fn nodeport_from_outside_is_dnated_and_snated_and_its_reply_restored() {
    use lb_common::service::SERVICE_F_NODE_PORT;
    let mut dp = datapath_with(&[frontend(
        NODE_IP,
        30080,
        SERVICE_F_NODE_PORT,
        &[("10.244.2.5", 8080)],
    )]);
    dp.maps.set_node(Some(NODE_IP.parse().unwrap())).unwrap();
    let (verdict, out) = run_xdp(
        &mut dp,
        &Frame::tcp(OUTSIDE, 50000, NODE_IP, 30080).build(b""),
    );
    assert_eq!(verdict, XDP_PASS);
    let fwd = Frame::parse(&out).expect("valid checksums after DNAT+SNAT");
    assert_eq!(
        (fwd.dst.to_string().as_str(), fwd.dport),
        ("10.244.2.5", 8080)
    );
    assert_eq!(
        fwd.src.to_string(),
        NODE_IP,
        "SNAT to the node (externalTrafficPolicy: Cluster)"
    );
    let snat_range = lb::datapath::maps::SNAT_PORT_MIN
        ..lb::datapath::maps::SNAT_PORT_MIN + lb::datapath::maps::SNAT_PORT_COUNT;
    assert!(
        snat_range.contains(&fwd.sport),
        "SNAT port {} in range",
        fwd.sport
    );

    // The backend's reply to node:snat_port gets frontend and client back.
    let (verdict, out) = run_xdp(
        &mut dp,
        &Frame::tcp("10.244.2.5", 8080, NODE_IP, fwd.sport).build_ack(b"pong"),
    );
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        Frame::parse(&out).unwrap(),
        Frame::tcp(NODE_IP, 30080, OUTSIDE, 50000)
    );
    // A second client gets another SNAT port.
    let (_, out) = run_xdp(
        &mut dp,
        &Frame::tcp("172.18.0.101", 50000, NODE_IP, 30080).build(b""),
    );
    assert_ne!(Frame::parse(&out).unwrap().sport, fwd.sport);
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address() {
    use lb_common::service::{SERVICE_F_LOCAL, SERVICE_F_NODE_PORT};
    let mut dp = datapath_with(&[frontend(
        NODE_IP,
        30081,
        SERVICE_F_NODE_PORT | SERVICE_F_LOCAL,
        &[("10.244.1.5", 8080)],
    )]);
    dp.maps.set_node(Some(NODE_IP.parse().unwrap())).unwrap();
    let (_, out) = run_xdp(
        &mut dp,
        &Frame::tcp(OUTSIDE, 50000, NODE_IP, 30081).build(b""),
    );
    assert_eq!(
        Frame::parse(&out).unwrap(),
        Frame::tcp(OUTSIDE, 50000, "10.244.1.5", 8080),
        "no SNAT"
    );
    // The local backend's reply leaves through its veth: lb_from_pod restores the frontend.
    let (_, out) = run(
        &mut dp,
        PROG_FROM_POD,
        &Frame::tcp("10.244.1.5", 8080, OUTSIDE, 50000).build_ack(b"pong"),
    );
    assert_eq!(
        Frame::parse(&out).unwrap(),
        Frame::tcp(NODE_IP, 30081, OUTSIDE, 50000)
    );
}

#[test]
fn cluster_ips_are_not_translated_for_traffic_from_outside() {
    use lb_common::service::SERVICE_F_CLUSTER_IP;
    let mut dp = datapath_with(&[frontend(
        VIP,
        80,
        SERVICE_F_CLUSTER_IP,
        &[("10.244.1.5", 8080)],
    )]);
    let input = Frame::tcp(OUTSIDE, 50000, VIP, 80).build(b"");
    let (verdict, out) = run_xdp(&mut dp, &input);
    assert_eq!((verdict, out), (XDP_PASS, input));
}

#[test]
fn session_affinity_sends_a_client_to_one_backend_while_it_serves() {
    let backends = [
        ("10.244.1.2", 80),
        ("10.244.1.3", 80),
        ("10.244.1.4", 80),
        ("10.244.1.5", 80),
    ];
    let mut sticky = service(80, PROTO_TCP, &backends);
    sticky.affinity_timeout = Some(60);
    let mut dp = datapath_with(&[sticky.clone()]);
    let dst_of = |dp: &mut Datapath, client: &str, sport: u16| {
        let (_, out) = run(
            dp,
            PROG_FROM_POD,
            &Frame::tcp(client, sport, VIP, 80).build(b""),
        );
        Frame::parse(&out).unwrap().dst
    };
    let first = dst_of(&mut dp, CLIENT, 30000);
    for sport in 30001..30030 {
        assert_eq!(
            dst_of(&mut dp, CLIENT, sport),
            first,
            "every new flow of the client goes to {first}"
        );
    }
    let others: std::collections::BTreeSet<_> = (0..30)
        .map(|i| dst_of(&mut dp, &format!("10.244.3.{}", i + 2), 30000))
        .collect();
    assert!(others.len() >= 2, "other clients spread: {others:?}");

    // The remembered backend leaves the Service: the client moves on.
    let remaining: Vec<(&str, u16)> = backends
        .iter()
        .copied()
        .filter(|(ip, _)| *ip != first.to_string())
        .collect();
    let mut shrunk = service(80, PROTO_TCP, &remaining);
    shrunk.affinity_timeout = Some(60);
    let current = dp.maps.state().unwrap();
    dp.maps
        .apply(&plan(&current, &desired_state(&current, &[shrunk])))
        .unwrap();
    let next = dst_of(&mut dp, CLIENT, 31000);
    assert_ne!(next, first);
    assert_eq!(
        dst_of(&mut dp, CLIENT, 31001),
        next,
        "and sticks to its new backend"
    );
}

#[test]
fn hairpin_a_pod_reaching_itself_through_its_service() {
    let mut dp = datapath_with(&[service(80, PROTO_TCP, &[(CLIENT, 8080)])]);
    let (_, out) = run(
        &mut dp,
        PROG_FROM_POD,
        &Frame::tcp(CLIENT, 40000, VIP, 80).build(b""),
    );
    let fwd = Frame::parse(&out).unwrap();
    assert_eq!(
        fwd,
        Frame::tcp(VIP, 40000, CLIENT, 8080),
        "to itself, from the Service address"
    );
    // Its answer (to the Service address) leaves through the same veth.
    let (_, out) = run(
        &mut dp,
        PROG_FROM_POD,
        &Frame::tcp(CLIENT, 8080, VIP, 40000).build_ack(b"pong"),
    );
    assert_eq!(
        Frame::parse(&out).unwrap(),
        Frame::tcp(VIP, 80, CLIENT, 40000),
        "back as the Service's answer"
    );
    // The next packet of the flow is translated the same way.
    let (_, out) = run(
        &mut dp,
        PROG_FROM_POD,
        &Frame::tcp(CLIENT, 40000, VIP, 80).build(b"more"),
    );
    assert_eq!(Frame::parse(&out).unwrap(), fwd);
}

#[test]
fn load_balancer_source_ranges_admit_listed_clients_only() {
    use lb_common::service::{SERVICE_F_EXTERNAL, SERVICE_F_SOURCE_RANGES};
    let mut svc = frontend(
        "172.18.255.10",
        80,
        SERVICE_F_EXTERNAL | SERVICE_F_SOURCE_RANGES,
        &[("10.244.1.5", 8080)],
    );
    svc.source_ranges = vec![("172.18.0.96".parse().unwrap(), 28)];
    let mut dp = datapath_with(&[svc]);
    dp.maps.set_node(Some(NODE_IP.parse().unwrap())).unwrap();
    let (verdict, out) = run_xdp(
        &mut dp,
        &Frame::tcp(OUTSIDE, 50000, "172.18.255.10", 80).build(b""),
    );
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        Frame::parse(&out).unwrap().dst.to_string(),
        "10.244.1.5",
        "172.18.0.100 is in 172.18.0.96/28"
    );
    let (verdict, _) = run_xdp(
        &mut dp,
        &Frame::tcp("172.18.0.200", 50000, "172.18.255.10", 80).build(b""),
    );
    assert_eq!(verdict, 1, "XDP_DROP for a client outside the ranges");
    assert_eq!(counter(&dp, "drop_source_range"), 1);
}

mod network_policy {
    use super::*;
    use aya::maps::lpm_trie::Key;
    use lb_common::{
        conntrack::{CT_POLICY_EGRESS, CT_POLICY_INGRESS},
        policy::*,
    };

    const POD_A: &str = "10.244.1.10";
    const POD_B: &str = "10.244.1.20";
    const OTHER: &str = "10.244.2.30";
    const ID_A: u32 = 300;
    const ID_B: u32 = 301;

    fn be(ip: &str) -> u32 {
        u32::from(ip.parse::<Ipv4Addr>().unwrap()).to_be()
    }

    /// Two local pods A (endpoint 1) and B (endpoint 2) with identities, and
    /// a Service whose backend is B.
    fn setup(a_flags: u16, b_flags: u16) -> Datapath {
        setup_with(a_flags, b_flags, &[])
    }

    /// `setup`, with more Services.
    fn setup_with(a_flags: u16, b_flags: u16, more: &[DesiredService]) -> Datapath {
        let mut services = vec![service(80, PROTO_TCP, &[(POD_B, 8080)])];
        services.extend_from_slice(more);
        let mut dp = datapath_with(&services);
        for (ip, id, ep, flags) in [(POD_A, ID_A, 1, a_flags), (POD_B, ID_B, 2, b_flags)] {
            dp.maps
                .ipcache
                .insert(&Key::new(32, IpcacheKey { addr: be(ip) }), id, 0)
                .unwrap();
            dp.maps
                .endpoints
                .insert(
                    be(ip),
                    EndpointInfo {
                        endpoint_id: ep,
                        flags,
                    },
                    0,
                )
                .unwrap();
        }
        dp.maps
            .ipcache
            .insert(
                &Key::new(32, IpcacheKey { addr: be(NODE_IP) }),
                IDENTITY_HOST,
                0,
            )
            .unwrap();
        dp
    }

    fn allow(
        dp: &mut Datapath,
        ep: u16,
        direction: u8,
        proto: u8,
        identity: u32,
        port: u16,
        bits: u32,
    ) {
        let key = PolicyKey {
            endpoint_id: ep,
            direction,
            proto,
            identity,
            port: port.to_be(),
            pad0: 0,
        };
        dp.maps
            .policy
            .insert(
                &Key::new(POLICY_KEY_FIXED_BITS + bits, key),
                PolicyEntry { rule_id: 7 },
                0,
            )
            .unwrap();
    }

    fn verdict(dp: &mut Datapath, prog: &str, f: Frame) -> u32 {
        run(dp, prog, &f.build(b"")).0
    }

    /// The verdict on an answer (an ACK: a SYN answers nothing).
    fn answer_verdict(dp: &mut Datapath, prog: &str, f: Frame) -> u32 {
        run(dp, prog, &f.build_ack(b"")).0
    }

    #[test]
    fn ingress_isolation_admits_only_what_a_rule_allows_and_replies() {
        let mut dp = setup(0, ENDPOINT_F_INGRESS_ISOLATED | ENDPOINT_F_EGRESS_ISOLATED);
        // Nothing allowed yet: A -> B:8080 is dropped where B receives it.
        assert_eq!(
            verdict(&mut dp, PROG_TO_POD, Frame::tcp(POD_A, 40000, POD_B, 8080)),
            TC_ACT_SHOT
        );
        assert_eq!(counter(&dp, "drop_policy"), 1);
        // The node itself may always reach B (kubelet probes).
        assert_eq!(
            verdict(
                &mut dp,
                PROG_TO_POD,
                Frame::tcp(NODE_IP, 40000, POD_B, 8080)
            ),
            TC_ACT_OK
        );
        allow(&mut dp, 2, DIR_INGRESS, PROTO_TCP, ID_A, 8080, 16);
        assert_eq!(
            verdict(&mut dp, PROG_TO_POD, Frame::tcp(POD_A, 40001, POD_B, 8080)),
            TC_ACT_OK
        );
        assert_eq!(
            verdict(&mut dp, PROG_TO_POD, Frame::tcp(POD_A, 40002, POD_B, 8081)),
            TC_ACT_SHOT,
            "other port"
        );
        assert_eq!(
            verdict(&mut dp, PROG_TO_POD, Frame::tcp(OTHER, 40003, POD_B, 8080)),
            TC_ACT_SHOT,
            "other identity (world)"
        );
        assert_eq!(
            verdict(&mut dp, PROG_TO_POD, Frame::udp(POD_A, 40004, POD_B, 8080)),
            TC_ACT_SHOT,
            "other protocol"
        );
        // Stateful: B is egress-isolated with no rule, yet its reply passes.
        assert_eq!(
            answer_verdict(
                &mut dp,
                PROG_FROM_POD,
                Frame::tcp(POD_B, 8080, POD_A, 40001)
            ),
            TC_ACT_OK
        );
        // But B cannot open a flow of its own.
        assert_eq!(
            verdict(&mut dp, PROG_FROM_POD, Frame::tcp(POD_B, 9999, POD_A, 80)),
            TC_ACT_SHOT
        );
    }

    #[test]
    fn egress_is_judged_after_service_translation() {
        let mut dp = setup(ENDPOINT_F_EGRESS_ISOLATED, 0);
        assert_eq!(
            verdict(&mut dp, PROG_FROM_POD, Frame::tcp(POD_A, 40000, VIP, 80)),
            TC_ACT_SHOT,
            "to the VIP, backend B not allowed"
        );
        allow(&mut dp, 1, DIR_EGRESS, PROTO_TCP, ID_B, 8080, 16);
        let (v, out) = run(
            &mut dp,
            PROG_FROM_POD,
            &Frame::tcp(POD_A, 40001, VIP, 80).build(b""),
        );
        assert_eq!(v, TC_ACT_OK);
        assert_eq!(
            Frame::parse(&out).unwrap().dst.to_string(),
            POD_B,
            "allowed because the backend B is"
        );
        // The reply, reverse-translated to the VIP, reaches A.
        let (v, _) = run(
            &mut dp,
            PROG_TO_POD,
            &Frame::tcp(VIP, 80, POD_A, 40001).build_ack(b""),
        );
        assert_eq!(v, TC_ACT_OK);
    }

    #[test]
    fn a_flow_to_a_service_is_admitted_both_ways_by_its_translation_alone() {
        // A is isolated both ways and may send to B:8080 only.
        let mut dp = setup(ENDPOINT_F_INGRESS_ISOLATED | ENDPOINT_F_EGRESS_ISOLATED, 0);
        allow(&mut dp, 1, DIR_EGRESS, PROTO_TCP, ID_B, 8080, 16);
        let (v, out) = run(
            &mut dp,
            PROG_FROM_POD,
            &Frame::tcp(POD_A, 40001, VIP, 80).build(b""),
        );
        assert_eq!(v, TC_ACT_OK);
        assert_eq!(Frame::parse(&out).unwrap().dst.to_string(), POD_B);
        // The translation's entries are the flow's record: no policy entry.
        let kinds: Vec<u8> = dp
            .maps
            .conntrack
            .keys()
            .map(|k| k.unwrap().direction)
            .collect();
        assert!(
            !kinds.contains(&CT_POLICY_EGRESS) && !kinds.contains(&CT_POLICY_INGRESS),
            "{kinds:?}"
        );
        // Later packets pass on the entry.
        assert_eq!(
            verdict(&mut dp, PROG_FROM_POD, Frame::tcp(POD_A, 40001, VIP, 80)),
            TC_ACT_OK
        );
        // B's reply as a backend elsewhere sends it, before reverse NAT, is
        // admitted by A's ingress and gets the VIP back.
        let (v, reply) = run(
            &mut dp,
            PROG_TO_POD,
            &Frame::tcp(POD_B, 8080, POD_A, 40001).build_ack(b""),
        );
        assert_eq!(v, TC_ACT_OK);
        assert_eq!(Frame::parse(&reply).unwrap().src.to_string(), VIP);
        // As a backend on this node sends it: already from the VIP.
        assert_eq!(
            answer_verdict(&mut dp, PROG_TO_POD, Frame::tcp(VIP, 80, POD_A, 40001)),
            TC_ACT_OK
        );
        // Nothing else from B or the VIP gets in.
        for f in [
            Frame::tcp(POD_B, 8080, POD_A, 40002),
            Frame::tcp(VIP, 80, POD_A, 40002),
        ] {
            assert_eq!(verdict(&mut dp, PROG_TO_POD, f), TC_ACT_SHOT);
        }
        assert_eq!(counter(&dp, "drop_policy"), 2);
    }

    #[test]
    fn a_fully_isolated_pod_reaches_itself_through_its_service() {
        // B is the Service's backend and isolated both ways with no rule.
        let mut dp = setup(0, ENDPOINT_F_INGRESS_ISOLATED | ENDPOINT_F_EGRESS_ISOLATED);
        assert_eq!(
            verdict(&mut dp, PROG_FROM_POD, Frame::tcp(POD_A, 40000, VIP, 80)),
            TC_ACT_OK,
            "A is not isolated: its flow leaves, B's ingress judges it"
        );
        assert_eq!(
            verdict(&mut dp, PROG_TO_POD, Frame::tcp(POD_A, 40000, POD_B, 8080)),
            TC_ACT_SHOT
        );
        // B -> VIP lands on B itself: SNAT to the VIP, and both of B's
        // directions admit it, as loopback is.
        let (v, out) = run(
            &mut dp,
            PROG_FROM_POD,
            &Frame::tcp(POD_B, 41000, VIP, 80).build(b""),
        );
        assert_eq!(v, TC_ACT_OK);
        let hairpin = Frame::parse(&out).unwrap();
        assert_eq!(
            (hairpin.src.to_string(), hairpin.dst.to_string()),
            (VIP.to_string(), POD_B.to_string())
        );
        assert_eq!(
            run(&mut dp, PROG_TO_POD, &out).0,
            TC_ACT_OK,
            "delivered to B from the VIP"
        );
        // B's reply is reverse-translated back to VIP -> B and delivered.
        let (v, reply) = run(
            &mut dp,
            PROG_FROM_POD,
            &Frame::tcp(POD_B, 8080, VIP, 41000).build_ack(b""),
        );
        assert_eq!(v, TC_ACT_OK);
        assert_eq!(run(&mut dp, PROG_TO_POD, &reply).0, TC_ACT_OK);
        assert_eq!(counter(&dp, "drop_policy"), 1, "only A's probe");
    }

    #[test]
    fn nodeport_clients_are_judged_at_the_entry_node_and_trusted_at_the_backend_node() {
        use lb_common::service::SERVICE_F_NODE_PORT;
        const PEER: &str = "172.18.0.12";
        let np = frontend(NODE_IP, 30080, SERVICE_F_NODE_PORT, &[(POD_B, 8080)]);
        let mut dp = setup_with(0, ENDPOINT_F_INGRESS_ISOLATED, &[np]);
        dp.maps.set_node(Some(NODE_IP.parse().unwrap())).unwrap();
        // B admits nobody: the outside client is dropped here, in XDP,
        // before SNAT would hide it behind this node's address.
        let (v, _) = run_xdp(
            &mut dp,
            &Frame::tcp(OUTSIDE, 50000, NODE_IP, 30080).build(b""),
        );
        assert_eq!(v, 1, "XDP_DROP");
        assert_eq!(counter(&dp, "drop_policy"), 1);
        // B admits the world (where the client's address belongs).
        allow(&mut dp, 2, DIR_INGRESS, PROTO_TCP, IDENTITY_WORLD, 8080, 16);
        let (v, out) = run_xdp(
            &mut dp,
            &Frame::tcp(OUTSIDE, 50001, NODE_IP, 30080).build(b""),
        );
        assert_eq!(v, XDP_PASS);
        let fwd = Frame::parse(&out).unwrap();
        assert_eq!(fwd.dst.to_string(), POD_B);

        // At a backend's node: a flow from a peer node's SNAT range passes B's
        // isolation (that node judged it); from any other port it does not.
        let mut dp = setup(0, ENDPOINT_F_INGRESS_ISOLATED);
        dp.maps.set_node(Some(NODE_IP.parse().unwrap())).unwrap();
        dp.maps.peer_nodes.insert(be(PEER), 1, 0).unwrap();
        assert_eq!(
            verdict(&mut dp, PROG_TO_POD, Frame::tcp(PEER, 20000, POD_B, 8080)),
            TC_ACT_OK
        );
        assert_eq!(
            verdict(&mut dp, PROG_TO_POD, Frame::tcp(PEER, 40000, POD_B, 8080)),
            TC_ACT_SHOT,
            "the peer's own connection, from an ephemeral port"
        );
        assert_eq!(
            verdict(
                &mut dp,
                PROG_TO_POD,
                Frame::tcp(OUTSIDE, 20000, POD_B, 8080)
            ),
            TC_ACT_SHOT,
            "not a node"
        );
    }

    #[test]
    fn wildcards_and_port_ranges() {
        let mut dp = setup(0, ENDPOINT_F_INGRESS_ISOLATED);
        // Any identity, TCP ports 32000-32767 (three prefixes).
        for (port, bits) in lb::policy::port_prefixes(32000, 32767) {
            allow(&mut dp, 2, DIR_INGRESS, PROTO_TCP, 0, port, u32::from(bits));
        }
        for (port, want) in [
            (31999, TC_ACT_SHOT),
            (32000, TC_ACT_OK),
            (32500, TC_ACT_OK),
            (32767, TC_ACT_OK),
            (32768, TC_ACT_SHOT),
        ] {
            assert_eq!(
                verdict(&mut dp, PROG_TO_POD, Frame::tcp(OTHER, port, POD_B, port)),
                want,
                "port {port}"
            );
        }
        // Any protocol, any port, from A only.
        allow(&mut dp, 2, DIR_INGRESS, 0, ID_A, 0, 0);
        assert_eq!(
            verdict(&mut dp, PROG_TO_POD, Frame::udp(POD_A, 5000, POD_B, 53)),
            TC_ACT_OK
        );
        assert_eq!(
            verdict(&mut dp, PROG_TO_POD, Frame::udp(OTHER, 5000, POD_B, 53)),
            TC_ACT_SHOT
        );
    }

    #[test]
    fn unisolated_endpoints_and_unknown_addresses_pass() {
        let mut dp = setup(0, 0);
        assert_eq!(
            verdict(&mut dp, PROG_TO_POD, Frame::tcp(OTHER, 1, POD_B, 2)),
            TC_ACT_OK
        );
        assert_eq!(
            verdict(&mut dp, PROG_FROM_POD, Frame::tcp(POD_A, 1, OTHER, 2)),
            TC_ACT_OK
        );
        assert_eq!(counter(&dp, "drop_policy"), 0);
    }

    /// A pod not isolated at all records what it sends at the SYN (its
    /// other packets need no policy lookup): once isolated for ingress,
    /// with no rule, it still gets the replies of its open connection, and
    /// nothing new.
    #[test]
    fn a_pod_isolated_for_ingress_mid_connection_keeps_its_replies() {
        let mut dp = setup(0, 0);
        let sent = Frame::tcp(POD_A, 40000, OTHER, 80);
        assert_eq!(run(&mut dp, PROG_FROM_POD, &sent.build(b"")).0, TC_ACT_OK);
        let ack = sent.build_ack(b"GET");
        assert_eq!(run(&mut dp, PROG_FROM_POD, &ack).0, TC_ACT_OK);
        isolate(&mut dp, POD_A, 1, ENDPOINT_F_INGRESS_ISOLATED);
        assert_eq!(
            answer_verdict(&mut dp, PROG_TO_POD, Frame::tcp(OTHER, 80, POD_A, 40000)),
            TC_ACT_OK,
            "the reply of a connection opened before"
        );
        assert_eq!(
            verdict(&mut dp, PROG_TO_POD, Frame::tcp(OTHER, 80, POD_A, 40001)),
            TC_ACT_SHOT,
            "a new flow to the pod"
        );
    }

    fn isolate(dp: &mut Datapath, pod: &str, endpoint_id: u16, flags: u16) {
        let info = EndpointInfo { endpoint_id, flags };
        dp.maps.endpoints.insert(be(pod), info, 0).unwrap();
    }
}

/// Collects log records (the agent forwards them to tracing instead).
#[derive(Clone, Default)]
struct Collect(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Collect {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        self.0.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

#[test]
fn programs_log_new_flows_only_when_loaded_with_bpf_log() {
    for enabled in [false, true] {
        let mut dp =
            Datapath::load_with(None, enabled, &Default::default()).expect("load programs");
        let want = desired_state(
            &MapState::default(),
            &[service(80, PROTO_TCP, &[("10.244.1.2", 8080)])],
        );
        dp.maps
            .apply(&plan(&MapState::default(), &want))
            .expect("seed maps");
        let lines = Collect::default();
        let mut logger = dp.logger(lines.clone()).expect("log buffer");
        let (verdict, _) = run(
            &mut dp,
            PROG_FROM_POD,
            &Frame::tcp(CLIENT, 40000, VIP, 80).build(b""),
        );
        assert_eq!(verdict, TC_ACT_OK);
        logger.flush();
        let got = lines.0.lock().unwrap().clone();
        if enabled {
            assert_eq!(
                got,
                vec![format!(
                    "new flow {CLIENT}:40000 -> {VIP}:80 to backend 10.244.1.2:8080 (id {})",
                    dp.maps.state().unwrap().backends.keys().next().unwrap()
                )]
            );
        } else {
            assert!(got.is_empty(), "logging is off: {got:?}");
        }
    }
}
