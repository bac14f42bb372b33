//! NAT and conntrack under churn, on crafted packets (BPF_PROG_TEST_RUN):
//! retransmitted and reopening SYNs, when a closed connection's SNAT tuple
//! may go to a new one, the counters of what could not be done, and the
//! sweep's removal of expired entries. The
//! SNAT range is narrowed to one port so each clash is certain. Needs root.

mod dp;

use std::time::Duration;

use dp::*;
use lb::{
    datapath::{Datapath, PROG_FROM_POD},
    packet::{Frame, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};
use lb_common::{
    conntrack::{
        ConntrackEntry, ConntrackKey, SweepItem, CT_FORWARD, CT_F_BACKEND_CLOSED_FIRST,
        CT_F_CLOSING, CT_F_RESET, CT_REPLY, NO_TIME_WAIT_HOLD_NS, SWEEP_CHANGED, SWEEP_GONE,
        SWEEP_REMOVED,
    },
    node::NodeConfig,
    service::SERVICE_F_NODE_PORT,
    PROTO_TCP,
};

const BACKEND: &str = "10.244.2.5";
const OTHER_CLIENT: &str = "172.18.0.101";
const XDP_DROP: u32 = 1;
/// The one SNAT port of these tests.
const SNAT_PORT: u16 = 20000;

/// A NodePort with one remote backend, and a one-port SNAT range.
fn nodeport_with_one_snat_port() -> Datapath {
    let mut dp = datapath_with(&[frontend(
        NODE_IP,
        30080,
        SERVICE_F_NODE_PORT,
        &[(BACKEND, 8080)],
    )]);
    let addr: std::net::Ipv4Addr = NODE_IP.parse().unwrap();
    let cfg = NodeConfig {
        addr: u32::from(addr).to_be(),
        snat_port_min: SNAT_PORT,
        snat_port_count: 1,
    };
    dp.maps.node.set(0, cfg, 0).unwrap();
    dp
}

/// A client's SYN (sequence number `seq`) to the NodePort from outside:
/// the verdict and the frame as forwarded.
fn syn(dp: &mut Datapath, client: &str, port: u16, seq: u32) -> (u32, Option<Frame>) {
    let (verdict, out) = run_xdp(
        dp,
        &Frame::tcp(client, port, NODE_IP, 30080).build_tcp(b"", TCP_SYN, seq),
    );
    (verdict, Frame::parse(&out).ok())
}

/// The backend's packet with `flags` to the SNAT port, as restored.
fn from_backend(dp: &mut Datapath, flags: u8) -> Frame {
    let (verdict, out) = run_xdp(
        dp,
        &Frame::tcp(BACKEND, 8080, NODE_IP, SNAT_PORT).build_with_flags(b"", flags),
    );
    assert_eq!(verdict, XDP_PASS);
    Frame::parse(&out).unwrap()
}

fn client_packet(dp: &mut Datapath, client: &str, port: u16, flags: u8) -> u32 {
    run_xdp(
        dp,
        &Frame::tcp(client, port, NODE_IP, 30080).build_with_flags(b"", flags),
    )
    .0
}

fn reply_flags(dp: &Datapath) -> u16 {
    let key = ct_key(BACKEND, 8080, NODE_IP, SNAT_PORT, PROTO_TCP, CT_REPLY);
    dp.maps.conntrack.get(&key, 0).unwrap().flags
}

/// Long enough for a tuple without TIME_WAIT at the backend to be free.
fn past_the_short_hold() {
    std::thread::sleep(Duration::from_nanos(NO_TIME_WAIT_HOLD_NS) + Duration::from_millis(100));
}

#[test]
fn a_retransmitted_syn_keeps_its_snat_port_and_backend() {
    let mut dp = nodeport_with_one_snat_port();
    let (v, first) = syn(&mut dp, OUTSIDE, 50000, 7);
    assert_eq!(v, XDP_PASS);
    let first = first.expect("valid checksums");
    assert_eq!(first.sport, SNAT_PORT);
    // Before, the first SYN's own reply entry made the port look taken: the
    // retransmission left from another port (or, here, was dropped).
    let (v, again) = syn(&mut dp, OUTSIDE, 50000, 7);
    assert_eq!(v, XDP_PASS, "a retransmitted SYN passes");
    assert_eq!(again, Some(first), "with the same translation");
    assert_eq!(counter(&dp, "snat_alloc_failed"), 0);
    assert_eq!(counter(&dp, "ct_reopened"), 0);
}

#[test]
fn a_backend_answering_a_syn_with_an_ack_is_counted_as_a_clash() {
    let mut dp = nodeport_with_one_snat_port();
    syn(&mut dp, OUTSIDE, 50000, 7);
    // An older connection's TIME_WAIT socket on the tuple answers so.
    from_backend(&mut dp, TCP_ACK);
    assert_eq!(counter(&dp, "tuple_clash"), 1);
    // Only the first answer is judged; a SYN-ACK first is no clash.
    from_backend(&mut dp, TCP_ACK);
    assert_eq!(counter(&dp, "tuple_clash"), 1);
    let mut dp = nodeport_with_one_snat_port();
    syn(&mut dp, OUTSIDE, 50000, 7);
    from_backend(&mut dp, TCP_SYN | TCP_ACK);
    from_backend(&mut dp, TCP_ACK);
    assert_eq!(counter(&dp, "tuple_clash"), 0);
}

#[test]
fn a_closed_snat_tuple_goes_to_another_connection_only_once_the_backend_forgot_it() {
    let mut dp = nodeport_with_one_snat_port();
    assert_eq!(syn(&mut dp, OUTSIDE, 50000, 7).0, XDP_PASS);

    // The one tuple is live: another client's SYN finds no port.
    assert_eq!(syn(&mut dp, OTHER_CLIENT, 50000, 9).0, XDP_DROP);
    assert_eq!(counter(&dp, "snat_alloc_failed"), 1);
    assert!(counter(&dp, "snat_retries") >= 127, "every try was made");

    // The backend closes first (it will sit in TIME_WAIT); the client
    // answers with its FIN. Both entries know, whichever side sent it.
    assert_eq!(
        from_backend(&mut dp, TCP_FIN | TCP_ACK),
        Frame::tcp(NODE_IP, 30080, OUTSIDE, 50000)
    );
    assert_eq!(
        client_packet(&mut dp, OUTSIDE, 50000, TCP_FIN | TCP_ACK),
        XDP_PASS
    );
    let fwd = ct_key(OUTSIDE, 50000, NODE_IP, 30080, PROTO_TCP, CT_FORWARD);
    assert_eq!(
        reply_flags(&dp) & (CT_F_CLOSING | CT_F_BACKEND_CLOSED_FIRST),
        CT_F_CLOSING | CT_F_BACKEND_CLOSED_FIRST
    );
    assert_ne!(
        dp.maps.conntrack.get(&fwd, 0).unwrap().flags & CT_F_CLOSING,
        0
    );

    // Within the backend's TIME_WAIT no other connection may have it, not
    // even the same client's from another port: its SYN's sequence number
    // and timestamp are unrelated to the old connection's, and the backend
    // would answer it with the old connection's ACK.
    past_the_short_hold();
    assert_eq!(syn(&mut dp, OTHER_CLIENT, 50000, 9).0, XDP_DROP);
    assert_eq!(syn(&mut dp, OUTSIDE, 50002, 11).0, XDP_DROP);
    assert_eq!(counter(&dp, "tuple_reused"), 0);

    // The same client 4-tuple may: a new connection on it (another
    // sequence number) replaces the closed one's entries.
    let (v, out) = syn(&mut dp, OUTSIDE, 50000, 1_000_000);
    assert_eq!(v, XDP_PASS);
    assert_eq!(out.unwrap().sport, SNAT_PORT, "its own tuple again");
    assert_eq!(counter(&dp, "ct_reopened"), 1);
    let entry = dp.maps.conntrack.get(&fwd, 0).unwrap();
    assert_eq!(entry.flags & CT_F_CLOSING, 0, "a fresh entry");
    assert_eq!(entry.syn_seq, 1_000_000u32.to_be());

    // A SYN on the open connection's 5-tuple with another sequence number
    // opens another connection (the client lost the old one): balanced
    // again, on its own tuple.
    assert_eq!(syn(&mut dp, OUTSIDE, 50000, 2_000_000).0, XDP_PASS);
    assert_eq!(counter(&dp, "ct_reopened"), 2);

    // This time the client closes first: no TIME_WAIT at the backend, so
    // the tuple is free shortly after the last packet.
    client_packet(&mut dp, OUTSIDE, 50000, TCP_FIN | TCP_ACK);
    from_backend(&mut dp, TCP_FIN | TCP_ACK);
    assert_eq!(
        reply_flags(&dp) & (CT_F_CLOSING | CT_F_BACKEND_CLOSED_FIRST),
        CT_F_CLOSING
    );
    assert_eq!(
        syn(&mut dp, OTHER_CLIENT, 50000, 9).0,
        XDP_DROP,
        "not at once"
    );
    past_the_short_hold();
    let (v, out) = syn(&mut dp, OTHER_CLIENT, 50000, 9);
    assert_eq!(v, XDP_PASS, "another client takes the closed tuple");
    assert_eq!(out.unwrap().sport, SNAT_PORT);
    assert_eq!(counter(&dp, "tuple_reused"), 1);
    assert_eq!(
        from_backend(&mut dp, TCP_SYN | TCP_ACK),
        Frame::tcp(NODE_IP, 30080, OTHER_CLIENT, 50000),
        "the backend's answers go to the new connection"
    );

    // An RST after the backend's FIN does not free it: the backend's
    // TIME_WAIT takes an RST only at the sequence number it expects next
    // and ignores others, which clients send (lab_churn found one: the
    // next connection on the tuple met the TIME_WAIT socket).
    from_backend(&mut dp, TCP_FIN | TCP_ACK);
    client_packet(&mut dp, OTHER_CLIENT, 50000, TCP_FIN | TCP_ACK);
    client_packet(&mut dp, OTHER_CLIENT, 50000, TCP_RST);
    assert_ne!(reply_flags(&dp) & CT_F_RESET, 0);
    past_the_short_hold();
    assert_eq!(
        syn(&mut dp, OUTSIDE, 50002, 11).0,
        XDP_DROP,
        "held as after any close the backend began"
    );

    // A reset before any FIN of the backend (a connection aborted) leaves
    // no socket at the backend: free after the short hold.
    assert_eq!(syn(&mut dp, OTHER_CLIENT, 50000, 3_000_000).0, XDP_PASS);
    from_backend(&mut dp, TCP_SYN | TCP_ACK);
    client_packet(&mut dp, OTHER_CLIENT, 50000, TCP_RST);
    assert_eq!(
        reply_flags(&dp) & (CT_F_RESET | CT_F_BACKEND_CLOSED_FIRST),
        CT_F_RESET
    );
    past_the_short_hold();
    assert_eq!(syn(&mut dp, OUTSIDE, 50002, 11).0, XDP_PASS);
    assert_eq!(counter(&dp, "tuple_reused"), 2);
}

#[test]
fn packets_whose_entries_were_evicted_are_counted() {
    let mut dp = nodeport_with_one_snat_port();
    // A backend's answer to an SNAT port nobody holds (from a pod: every
    // pod has an endpoint entry).
    let pod: std::net::Ipv4Addr = BACKEND.parse().unwrap();
    let ep = lb_common::policy::EndpointInfo {
        endpoint_id: 1,
        ..Default::default()
    };
    dp.maps
        .endpoints
        .insert(u32::from(pod).to_be(), ep, 0)
        .unwrap();
    let (v, _) = run_xdp(
        &mut dp,
        &Frame::tcp(BACKEND, 8080, NODE_IP, SNAT_PORT).build_ack(b""),
    );
    assert_eq!(v, XDP_PASS, "left to the node's stack");
    assert_eq!(counter(&dp, "reply_miss"), 1);
    // From outside: an ACK of a connection the table no longer has.
    assert_eq!(client_packet(&mut dp, OUTSIDE, 50000, TCP_ACK), XDP_PASS);
    assert_eq!(counter(&dp, "ct_miss_midflow"), 1);
    // From a pod: an ACK to a ClusterIP without an entry; translated by
    // hash all the same.
    let mut dp = datapath_with(&[service(80, PROTO_TCP, &[("10.244.1.2", 8080)])]);
    let (v, out) = run(
        &mut dp,
        PROG_FROM_POD,
        &Frame::tcp(CLIENT, 40000, VIP, 80).build_ack(b"GET"),
    );
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(Frame::parse(&out).unwrap().dst.to_string(), "10.244.1.2");
    assert_eq!(counter(&dp, "ct_miss_midflow"), 1);
    // SYNs are new connections, not misses.
    run(
        &mut dp,
        PROG_FROM_POD,
        &Frame::tcp(CLIENT, 40001, VIP, 80).build(b""),
    );
    assert_eq!(counter(&dp, "ct_miss_midflow"), 1);
}

/// The agent's sweep hands the entries it listed as expired to
/// `lb_ct_sweep`, which removes only those unchanged since: one that a new
/// connection took meanwhile (here the 151st, rewritten with a new time)
/// stays. Two batches, and an entry already gone.
#[test]
fn the_sweep_removes_only_entries_no_packet_touched_since_they_were_listed() {
    let mut dp = datapath_with(&[]);
    let seen_at = |ns| ConntrackEntry {
        last_seen_ns: ns,
        flags: CT_F_CLOSING,
        ..Default::default()
    };
    let keys: Vec<ConntrackKey> = (0..200)
        .map(|i| ct_key(CLIENT, 10_000 + i, VIP, 80, PROTO_TCP, CT_FORWARD))
        .collect();
    for k in &keys {
        dp.maps.conntrack.insert(k, seen_at(1_000), 0).unwrap();
    }
    let mut items: Vec<SweepItem> = keys
        .iter()
        .chain([ct_key(CLIENT, 9_999, VIP, 80, PROTO_TCP, CT_FORWARD)].iter())
        .map(|k| SweepItem {
            key: *k,
            seen_ns: 1_000,
            ..Default::default()
        })
        .collect();
    dp.maps
        .conntrack
        .insert(keys[150], seen_at(2_000), 0)
        .unwrap();

    dp.remove_unchanged(&mut items).unwrap();

    for (i, item) in items.iter().enumerate() {
        let want = match i {
            150 => SWEEP_CHANGED,
            200 => SWEEP_GONE,
            _ => SWEEP_REMOVED,
        };
        assert_eq!(item.outcome, want, "item {i}");
    }
    let left: Vec<ConntrackKey> = dp.maps.conntrack.keys().map(|k| k.unwrap()).collect();
    assert_eq!(left, vec![keys[150]], "only the retaken entry is left");
    assert_eq!(
        dp.maps.conntrack.get(&keys[150], 0).unwrap().last_seen_ns,
        2_000
    );
}

/// The sweep lists the table in batches (`BPF_MAP_LOOKUP_BATCH`), several
/// of them here: every entry is seen once, with its own value; the expired
/// ones are removed, the live ones counted in the summary and kept.
#[test]
fn the_sweep_lists_every_entry_in_batches_and_removes_the_expired() {
    let mut dp = datapath_with(&[]);
    let now = lb::conntrack::monotonic_ns().unwrap();
    let count = 3 * lb::datapath::batch::LOOKUP_BATCH as u32 + 17;
    let key = |i: u32| {
        ct_key(
            CLIENT,
            (i % 60_000) as u16,
            VIP,
            80 + (i / 60_000) as u16,
            PROTO_TCP,
            CT_FORWARD,
        )
    };
    // Every third entry closed 20 s ago (expired: 10 s), the others live.
    for i in 0..count {
        let closed = i % 3 == 0;
        let entry = ConntrackEntry {
            last_seen_ns: if closed { now - 20_000_000_000 } else { now },
            flags: if closed { CT_F_CLOSING } else { 0 },
            backend_id: i,
            ..Default::default()
        };
        dp.maps.conntrack.insert(key(i), entry, 0).unwrap();
    }

    let mut listed = std::collections::HashMap::new();
    lb::datapath::batch::for_each_entry(&dp.maps.conntrack, |k, e| {
        assert!(
            listed.insert(*k, e.backend_id).is_none(),
            "{k:?} listed twice"
        );
    })
    .unwrap();
    assert_eq!(listed.len(), count as usize);
    for i in 0..count {
        assert_eq!(listed.get(&key(i)), Some(&i), "entry {i}");
    }

    let (summary, swept) =
        lb::conntrack::sweep(&mut dp, &lb::conntrack::Timeouts::default()).unwrap();
    let expired = count.div_ceil(3) as usize;
    assert_eq!(swept.removed, expired);
    assert_eq!(swept.kept, 0);
    assert_eq!(summary.tcp_established, count as usize - expired);
    assert_eq!(summary.total(), count as usize - expired);
    let left = dp.maps.conntrack.keys().filter(Result::is_ok).count();
    assert_eq!(left, count as usize - expired);
    assert!(dp.maps.conntrack.get(&key(0), 0).is_err());
    assert!(dp.maps.conntrack.get(&key(1), 0).is_ok());
}

/// Two new flows on two CPUs whose port orders meet both find the same
/// tuple free; only one may take it (`take_tuple`), or both SYNs go out on
/// one tuple and the backend answers one with the other's ACK (a clash,
/// met once in 360,000 connections in `lab_churn`). With one SNAT port,
/// two clients send their SYNs at the same moment from two threads, round
/// after round: never are both translated, and the port's reply entry
/// names the one that was.
#[test]
fn two_flows_at_once_never_take_the_same_snat_tuple() {
    const ROUNDS: usize = 3000;
    let mut dp = nodeport_with_one_snat_port();
    let clients = [OUTSIDE, OTHER_CLIENT];
    let reply_key = ct_key(BACKEND, 8080, NODE_IP, SNAT_PORT, PROTO_TCP, CT_REPLY);
    let syns = clients.map(|c| Frame::tcp(c, 50000, NODE_IP, 30080).build_tcp(b"", TCP_SYN, 7));
    let mut both = 0;
    for round in 0..ROUNDS {
        let keys: Vec<ConntrackKey> = dp.maps.conntrack.keys().map(|k| k.unwrap()).collect();
        for k in keys {
            dp.maps.conntrack.remove(&k).unwrap();
        }
        let prog: &aya::programs::Xdp = dp.xdp().unwrap();
        let start = std::sync::Barrier::new(2);
        let verdicts: Vec<u32> = std::thread::scope(|s| {
            let runs: Vec<_> = syns
                .iter()
                .map(|frame| {
                    let start = &start;
                    s.spawn(move || {
                        let mut out = vec![0u8; frame.len() + 256];
                        start.wait();
                        let opts = aya::programs::TestRunOptions {
                            data_in: Some(frame),
                            data_out: Some(&mut out),
                            repeat: 1,
                            ..Default::default()
                        };
                        use aya::programs::TestRun;
                        prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let passed: Vec<usize> = (0..2).filter(|&i| verdicts[i] == XDP_PASS).collect();
        if passed.len() == 2 {
            both += 1;
            continue;
        }
        assert_eq!(passed.len(), 1, "round {round}: one SYN gets the port");
        let reply = dp.maps.conntrack.get(&reply_key, 0).unwrap();
        let client: std::net::Ipv4Addr = clients[passed[0]].parse().unwrap();
        assert_eq!(reply.snat_addr, u32::from(client).to_be(), "round {round}");
    }
    eprintln!(
        "{ROUNDS} rounds: tuple_raced {}, snat_alloc_failed {}",
        counter(&dp, "tuple_raced"),
        counter(&dp, "snat_alloc_failed")
    );
    assert_eq!(both, 0, "rounds in which both SYNs took the one port");
}
