//! The operations the programs are made of, one tc program each, for
//! `cargo xtask bench`'s cost table (never attached). Each parses the
//! packet (as every path does) and then does one thing once, against the
//! same maps as `lb_from_pod`; its cost above `probe_parse` is the cost of
//! that one thing. The verdict says the operation did what the bench set it
//! up to do (a lookup that must hit did), so a probe cannot measure a
//! shortcut: `TC_ACT_OK` when it did, `TC_ACT_SHOT` when not.

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::classifier,
    programs::TcContext,
};
use lb_common::{csum::State, metrics::reason, service::ServiceKey};

use crate::{
    conntrack,
    maps::{BACKENDS, CONNTRACK, MAGLEV, SERVICES},
    metrics::count,
    nat::{self, Side},
    packet::{self, Flow, Parsed},
    policy,
};

#[inline(always)]
fn verdict(done: bool) -> i32 {
    if done {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

#[inline(always)]
fn flow(ctx: &TcContext) -> Option<Flow> {
    match packet::parse(ctx) {
        Parsed::Flow(f) => Some(f),
        _ => None,
    }
}

/// Parsing alone: the base every other probe is measured against.
#[classifier]
pub fn probe_parse(ctx: TcContext) -> i32 {
    verdict(flow(&ctx).is_some_and(|f| f.dport != 0))
}

/// A conntrack lookup that finds the flow's entry (an established packet).
#[classifier]
pub fn probe_ct_hit(ctx: TcContext) -> i32 {
    let Some(f) = flow(&ctx) else {
        return TC_ACT_SHOT;
    };
    verdict(CONNTRACK.get_ptr(conntrack::forward_key(&f)).is_some())
}

/// A conntrack lookup that finds nothing (the reply-key lookup every
/// packet from a pod makes first).
#[classifier]
pub fn probe_ct_miss(ctx: TcContext) -> i32 {
    let Some(f) = flow(&ctx) else {
        return TC_ACT_SHOT;
    };
    verdict(CONNTRACK.get_ptr(conntrack::reply_key(&f)).is_none())
}

/// The clock, read once as the paths read it (`clock::now`, to the last
/// tick: conntrack stamps each packet's entry).
#[classifier]
pub fn probe_clock(ctx: TcContext) -> i32 {
    let Some(f) = flow(&ctx) else {
        return TC_ACT_SHOT;
    };
    let now = crate::clock::now();
    verdict(now != 0 && f.dport != 0)
}

/// The exact clock (`bpf_ktime_get_ns`), which the paths read before.
#[classifier]
pub fn probe_clock_exact(ctx: TcContext) -> i32 {
    let Some(f) = flow(&ctx) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    verdict(now != 0 && f.dport != 0)
}

/// A Service lookup that finds the frontend.
#[classifier]
pub fn probe_service_hit(ctx: TcContext) -> i32 {
    let Some(f) = flow(&ctx) else {
        return TC_ACT_SHOT;
    };
    let key = ServiceKey::new(f.daddr, f.dport, f.proto, 0);
    verdict(SERVICES.get_ptr(key).is_some())
}

/// A backend lookup by id (backend 1: the bench's first).
#[classifier]
pub fn probe_backend_hit(ctx: TcContext) -> i32 {
    let Some(f) = flow(&ctx) else {
        return TC_ACT_SHOT;
    };
    verdict(BACKENDS.get_ptr(1u32).is_some() && f.dport != 0)
}

/// One per-CPU counter add (what every path does once).
#[classifier]
pub fn probe_count(ctx: TcContext) -> i32 {
    let Some(f) = flow(&ctx) else {
        return TC_ACT_SHOT;
    };
    count(&ctx, reason::FORWARDED);
    verdict(f.dport != 0)
}

/// One checksum helper call (`bpf_l4_csum_replace`, an address that
/// stays the same: the packet is unchanged, the work is done).
#[classifier]
pub fn probe_csum_helper(ctx: TcContext) -> i32 {
    let Some(f) = flow(&ctx) else {
        return TC_ACT_SHOT;
    };
    let done = ctx
        .l4_csum_replace(
            f.l4_csum_off(),
            f.daddr as u64,
            f.daddr as u64,
            BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .is_ok();
    verdict(done)
}

/// An ipcache lookup (longest-prefix match) of the destination: what a
/// policy decision starts with.
#[classifier]
pub fn probe_lpm(ctx: TcContext) -> i32 {
    let Some(f) = flow(&ctx) else {
        return TC_ACT_SHOT;
    };
    verdict(policy::identity_of(f.daddr) != lb_common::policy::IDENTITY_WORLD)
}

/// A conntrack write: the flow's entry written again (an LRU map takes a
/// fresh element for every update, as for a new flow's two inserts).
#[classifier]
pub fn probe_ct_update(ctx: TcContext) -> i32 {
    let Some(f) = flow(&ctx) else {
        return TC_ACT_SHOT;
    };
    let key = conntrack::forward_key(&f);
    // SAFETY: copied out at once.
    let Some(entry) = CONNTRACK.get_ptr(key).map(|e| unsafe { *e }) else {
        return TC_ACT_SHOT;
    };
    verdict(CONNTRACK.insert(key, entry, 0).is_ok())
}

/// A Maglev table lookup (map-in-map: the Service's table, then its
/// entry), for the Service with rev-NAT id 1 (the bench's measured one).
#[classifier]
pub fn probe_maglev(ctx: TcContext) -> i32 {
    let Some(f) = flow(&ctx) else {
        return TC_ACT_SHOT;
    };
    let entry = u32::from(f.sport) % 7;
    // SAFETY: copied out at once.
    let slot = unsafe { MAGLEV.get_value(&1u32, &entry) }.copied();
    verdict(slot.is_some_and(|s| s != 0))
}

/// Another address and port for the packet's destination (the rewrite
/// probes' DNAT).
#[inline(always)]
fn elsewhere(f: &Flow) -> (u32, u16) {
    (f.daddr ^ 0x0101_0000, f.dport ^ 0x0101)
}

/// DNAT of the destination's address and port and back, as the paths
/// rewrite: the port's checksum change written in place, the state told by
/// the address's helper call (`nat::rewrite`). Two rewrites, one helper
/// call each.
#[classifier]
pub fn probe_rewrite(ctx: TcContext) -> i32 {
    let Some(f) = flow(&ctx) else {
        return TC_ACT_SHOT;
    };
    let to = elsewhere(&f);
    let there = Flow {
        daddr: to.0,
        dport: to.1,
        ..f
    };
    let back = (f.daddr, f.dport);
    let done = nat::rewrite(&ctx, &f, Side::Destination, to, State::Unknown).is_ok()
        && nat::rewrite(&ctx, &there, Side::Destination, back, State::Unknown).is_ok();
    verdict(done)
}

/// The same DNAT and back with a helper call for each port change too, as
/// the paths rewrote before session 21: the address alone, then the port
/// alone with the checksum's state unknown. Four helper calls.
#[classifier]
pub fn probe_rewrite_helpers(ctx: TcContext) -> i32 {
    let Some(f) = flow(&ctx) else {
        return TC_ACT_SHOT;
    };
    let to = elsewhere(&f);
    let steps = [
        (f, (to.0, f.dport)),
        (Flow { daddr: to.0, ..f }, to),
        (
            Flow {
                daddr: to.0,
                dport: to.1,
                ..f
            },
            (f.daddr, to.1),
        ),
        (Flow { dport: to.1, ..f }, (f.daddr, f.dport)),
    ];
    let mut done = true;
    for (from, to) in steps {
        done &= nat::rewrite(&ctx, &from, Side::Destination, to, State::Unknown).is_ok();
    }
    verdict(done)
}
