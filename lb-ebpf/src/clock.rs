//! The time the data path stamps conntrack entries, affinity and flow
//! events with.
//!
//! CLOCK_MONOTONIC as of the last timer tick (`bpf_ktime_get_coarse_ns`),
//! not read from the clock source (`bpf_ktime_get_ns`): every packet of a
//! tracked flow stamps its entry, and the exact read was a tenth of an
//! established packet's cost on these machines (the bench's probes). The
//! timeouts it serves are seconds long; a tick is a few milliseconds. The
//! coarse clock runs up to a tick behind the exact one that userspace
//! reads, so every age on either side is a saturating difference.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;

/// Now, to the last tick.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}
