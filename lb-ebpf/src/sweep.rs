//! `lb_ct_sweep`: the removal of expired conntrack entries, run by the
//! agent through BPF_PROG_TEST_RUN on a batch of `SweepItem`s (the
//! entries its sweep listed as expired, with the time each was last seen).
//! Never attached to an interface.
//!
//! An entry is removed only if it is still the one listed: same
//! `last_seen_ns`. A new connection that took its 5-tuple since (a client
//! reusing its port, a SNAT tuple given to a new flow) wrote a new entry
//! with a new time, and keeps it. The check and the removal are a few
//! instructions apart here; done from user space they were two system
//! calls apart, and a connection opened in between lost its fresh entry
//! (its replies then miss reverse NAT, or its TIME_WAIT guard goes and the
//! tuple clashes later).

use aya_ebpf::programs::XdpContext;
use lb_common::conntrack::{
    ConntrackKey, SweepItem, SWEEP_BATCH, SWEEP_CHANGED, SWEEP_GONE, SWEEP_REMOVED,
};

use crate::{maps::CONNTRACK, packet::ptr_at};

/// Removes each item's entry if unchanged and writes the outcome back into
/// the item (the test run's output data).
#[inline(always)]
pub fn run(ctx: &XdpContext) {
    for i in 0..SWEEP_BATCH {
        let Some(item) =
            ptr_at::<SweepItem, XdpContext>(ctx, i * core::mem::size_of::<SweepItem>())
        else {
            return;
        };
        let item = item as *mut SweepItem;
        // SAFETY: `ptr_at` checked that the whole item lies in the packet.
        unsafe {
            let key = core::ptr::read_unaligned(core::ptr::addr_of!((*item).key));
            let seen = core::ptr::read_unaligned(core::ptr::addr_of!((*item).seen_ns));
            let outcome = remove_if_unchanged(&key, seen);
            core::ptr::write_unaligned(core::ptr::addr_of_mut!((*item).outcome), outcome);
        }
    }
}

#[inline(always)]
fn remove_if_unchanged(key: &ConntrackKey, seen: u64) -> u32 {
    let Some(entry) = CONNTRACK.get_ptr(key) else {
        return SWEEP_GONE;
    };
    // SAFETY: the pointer comes from a successful lookup.
    if unsafe { (*entry).last_seen_ns } != seen {
        return SWEEP_CHANGED;
    }
    match CONNTRACK.remove(key) {
        Ok(()) => SWEEP_REMOVED,
        Err(_) => SWEEP_GONE,
    }
}
