//! The agent's memory: the allocator, and what it holds.
//!
//! jemalloc, not glibc's malloc: the watchers decode objects on the
//! runtime's worker threads, and glibc gives each thread an arena of its
//! own that keeps what was freed in it. At 10,000 Services its arenas
//! held 80 MB for a 50 MB heap (the control bench: peak 113 MiB with
//! glibc, 106 with jemalloc, and the first pass 20% faster).

use std::ptr::null_mut;

use tikv_jemalloc_ctl::{epoch, stats};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The resident set (VmRSS), in MiB.
pub fn resident_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// What the program has allocated and not freed, in MiB (jemalloc's
/// `stats.allocated`, as of now).
pub fn heap_mib() -> u64 {
    if epoch::advance().is_err() {
        return 0;
    }
    stats::allocated::read().map_or(0, |b| (b >> 20) as u64)
}

/// Hands the pages of freed memory back to the kernel at once, where
/// jemalloc would wait up to 10 s (`dirty_decay_ms`): after a full pass,
/// which frees the whole desired state it built.
pub fn hand_back() {
    // `arena.<MALLCTL_ARENAS_ALL>.purge`: every arena; takes no value.
    const PURGE_ALL: &std::ffi::CStr = c"arena.4096.purge";
    // SAFETY: a void mallctl, called with no old or new value as it must be.
    unsafe {
        tikv_jemalloc_sys::mallctl(PURGE_ALL.as_ptr(), null_mut(), null_mut(), null_mut(), 0);
    }
}
