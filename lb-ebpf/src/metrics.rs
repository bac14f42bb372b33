//! Per-CPU counters. Per-CPU, so no atomics are needed on the hot path.

use crate::{maps::METRICS, packet::Packet};

#[inline(always)]
pub fn count<P: Packet>(ctx: &P, reason: u32) {
    if let Some(counter) = METRICS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += (ctx.data_end() - ctx.data()) as u64;
        }
    }
}

/// Adds `n` to a counter of events that are not packets (bytes unchanged).
#[inline(always)]
pub fn count_events(reason: u32, n: u32) {
    if let Some(counter) = METRICS.get_ptr_mut(reason) {
        // SAFETY: as in `count`.
        unsafe { (*counter).packets += u64::from(n) };
    }
}
