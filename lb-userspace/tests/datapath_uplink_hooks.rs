//! The uplink program runs on XDP (`lb_uplink`) or tc ingress
//! (`lb_uplink_tc`), one body for both (`lb-ebpf/src/uplink.rs`). Each
//! scenario here runs the same packets through both, on twin data paths
//! programmed alike, and checks that the two decide the same and write the
//! same bytes; `datapath.rs` and `datapath_nat.rs` check what the XDP one
//! decides. Needs root.

mod dp;

use dp::*;
use lb::{
    datapath::{Datapath, PROG_UPLINK_TC},
    packet::Frame,
    translate::DesiredService,
};
use lb_common::service::{
    SERVICE_F_CLUSTER_IP, SERVICE_F_EXTERNAL, SERVICE_F_LOCAL, SERVICE_F_NODE_PORT,
    SERVICE_F_SOURCE_RANGES,
};

const XDP_DROP: u32 = 1;
const TCP_FIN_ACK: u8 = 0x11;
const TCP_ACK: u8 = 0x10;

/// The two hooks' data paths, programmed with the same Services.
struct Twins {
    xdp: Datapath,
    tc: Datapath,
}

impl Twins {
    fn new(services: &[DesiredService]) -> Self {
        let mut twins = Twins {
            xdp: datapath_with(services),
            tc: datapath_with(services),
        };
        for dp in [&mut twins.xdp, &mut twins.tc] {
            dp.maps.set_node(Some(NODE_IP.parse().unwrap())).unwrap();
        }
        twins
    }

    /// Runs `input` through both; both must pass it, or both drop it, with
    /// the same bytes out. Returns whether it passed and the frame.
    fn run(&mut self, what: &str, input: &[u8]) -> (bool, Vec<u8>) {
        let (xv, xout) = run_xdp(&mut self.xdp, input);
        let (tv, tout) = run(&mut self.tc, PROG_UPLINK_TC, input);
        let passed = match (xv, tv) {
            (XDP_PASS, TC_ACT_OK) => true,
            (XDP_DROP, TC_ACT_SHOT) => false,
            other => panic!("{what}: verdicts (xdp, tc) {other:?} differ"),
        };
        if passed {
            assert_eq!(xout, tout, "{what}: the hooks wrote different bytes");
        }
        (passed, xout)
    }
}

fn nodeport(flags: u16) -> DesiredService {
    frontend(
        NODE_IP,
        30080,
        SERVICE_F_NODE_PORT | flags,
        &[("10.244.2.5", 8080), ("10.244.2.6", 8080)],
    )
}

#[test]
fn a_nodeport_connection_is_translated_alike_by_both_hooks() {
    let mut t = Twins::new(&[nodeport(0)]);
    let syn = Frame::tcp(OUTSIDE, 50000, NODE_IP, 30080);
    let (passed, out) = t.run("SYN", &syn.build_tcp(b"", 0x02, 7));
    assert!(passed);
    let fwd = Frame::parse(&out).expect("valid checksums after DNAT and SNAT");
    assert_eq!(fwd.src.to_string(), NODE_IP, "SNATed to the node");
    let backend = fwd.dst.to_string();
    // The backend's answer, the client's next packets, and the close.
    let reply = Frame::tcp(&backend, 8080, NODE_IP, fwd.sport);
    let (passed, out) = t.run("SYN-ACK", &reply.build_tcp(b"", 0x12, 100));
    assert!(passed);
    assert_eq!(
        Frame::parse(&out).unwrap(),
        Frame::tcp(NODE_IP, 30080, OUTSIDE, 50000),
        "the reply gets frontend and client back"
    );
    for (what, payload, flags) in [
        ("ACK", &b""[..], TCP_ACK),
        ("data", &b"GET / HTTP/1.0\r\n\r\n"[..], TCP_ACK),
        ("FIN", &b""[..], TCP_FIN_ACK),
    ] {
        let (passed, out) = t.run(what, &syn.build_with_flags(payload, flags));
        assert!(passed);
        assert_eq!(Frame::parse(&out).unwrap(), fwd, "{what}");
    }
    let (_, out) = t.run("reply data", &reply.build_ack(b"pong"));
    assert_eq!(
        Frame::parse(&out).unwrap(),
        Frame::tcp(NODE_IP, 30080, OUTSIDE, 50000)
    );
}

#[test]
fn udp_with_and_without_a_checksum_is_translated_alike() {
    let mut svc = service(30053, lb_common::PROTO_UDP, &[("10.244.2.5", 53)]);
    svc.vip = NODE_IP.parse().unwrap();
    svc.flags = SERVICE_F_NODE_PORT;
    let mut t = Twins::new(&[svc]);
    let query = Frame::udp(OUTSIDE, 40001, NODE_IP, 30053).build(b"query");
    let (passed, out) = t.run("UDP query", &query);
    assert!(passed);
    assert_eq!(Frame::parse(&out).unwrap().dport, 53);
    // A zero UDP checksum means none, and stays so on both hooks.
    let mut no_sum = Frame::udp(OUTSIDE, 40002, NODE_IP, 30053).build(b"query");
    let sum_at = no_sum.len() - b"query".len() - 2;
    no_sum[sum_at..sum_at + 2].copy_from_slice(&[0, 0]);
    let (passed, out) = t.run("UDP without a checksum", &no_sum);
    assert!(passed);
    assert_eq!(&out[sum_at..sum_at + 2], &[0, 0]);
}

#[test]
fn local_policy_cluster_ips_source_ranges_and_bad_packets_are_decided_alike() {
    let mut ranged = frontend(
        "172.18.255.10",
        80,
        SERVICE_F_EXTERNAL | SERVICE_F_SOURCE_RANGES,
        &[("10.244.1.5", 8080)],
    );
    ranged.source_ranges = vec![("172.18.0.96".parse().unwrap(), 28)];
    let local = frontend(
        NODE_IP,
        30081,
        SERVICE_F_NODE_PORT | SERVICE_F_LOCAL,
        &[("10.244.1.7", 8080)],
    );
    let cluster_ip = frontend(VIP, 80, SERVICE_F_CLUSTER_IP, &[("10.244.1.5", 8080)]);
    let mut t = Twins::new(&[ranged, local, cluster_ip]);

    let (passed, out) = t.run(
        "externalTrafficPolicy Local",
        &Frame::tcp(OUTSIDE, 50000, NODE_IP, 30081).build(b""),
    );
    assert!(passed);
    assert_eq!(
        Frame::parse(&out).unwrap(),
        Frame::tcp(OUTSIDE, 50000, "10.244.1.7", 8080),
        "no SNAT"
    );
    let in_range = Frame::tcp(OUTSIDE, 50001, "172.18.255.10", 80).build(b"");
    assert!(t.run("a client in the source ranges", &in_range).0);
    let outside_range = Frame::tcp("172.18.0.200", 50000, "172.18.255.10", 80).build(b"");
    assert!(
        !t.run("a client outside the source ranges", &outside_range)
            .0
    );
    let to_cluster_ip = Frame::tcp(OUTSIDE, 50002, VIP, 80).build(b"");
    let (passed, out) = t.run("a ClusterIP from outside", &to_cluster_ip);
    assert!(passed);
    assert_eq!(out, to_cluster_ip, "left as it came");
    let full = Frame::tcp(OUTSIDE, 50003, NODE_IP, 30081).build(b"");
    // Cut inside the TCP header (BPF_PROG_TEST_RUN gives a tc program no
    // IPv4 packet shorter than its IP header).
    for cut in [34, 40, 50] {
        let (passed, out) = t.run("a truncated packet", &full[..cut]);
        assert!(passed, "cut at {cut}");
        assert_eq!(out, &full[..cut], "cut at {cut}: untouched");
    }
}
