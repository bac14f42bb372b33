//! Per-CPU counters. Per-CPU, so no atomics are needed on the hot path.

use aya_ebpf::programs::TcContext;

use crate::maps::METRICS;

#[inline(always)]
pub fn count(ctx: &TcContext, reason: u32) {
    if let Some(counter) = METRICS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(ctx.len());
        }
    }
}
