//! The agent's memory: the allocator, and what it holds.
//!
//! jemalloc, not glibc's malloc: the watchers decode objects on the
//! runtime's worker threads, and glibc gives each thread an arena of its
//! own that keeps what was freed in it. At 10,000 Services its arenas
//! held 80 MB for a 50 MB heap (the control bench: peak 113 MiB with
//! glibc, 106 with jemalloc, and the first pass 20% faster).

use std::{
    alloc::{GlobalAlloc, Layout},
    ptr::null_mut,
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
};

use tikv_jemalloc_ctl::{epoch, stats};

#[global_allocator]
static ALLOCATOR: Counting<tikv_jemallocator::Jemalloc> = Counting(tikv_jemallocator::Jemalloc);

/// jemalloc's options, read at its start: freed pages go back to the
/// kernel at once (`MADV_DONTNEED`), not after 10 s as dirty pages and then
/// as lazily freed (`MADV_FREE`) ones that still count as resident. The
/// agent frees most of what its first pass builds, and the listing's pages
/// of JSON: with the defaults its resident peak at 10,000 Services was
/// 91-95 MiB for a heap that peaked at 60, with these 83 MiB, the first
/// pass as fast (the control bench, three syncs each).
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: &[u8] = b"dirty_decay_ms:0,muzzy_decay_ms:0\0";

/// Bytes the program asked for and has not freed, and the most it held at
/// once since `reset_peak`: the bench's measure of what the agent keeps per
/// Service and what a pass needs on top (jemalloc's own figure has no peak).
/// Two relaxed atomic adds per allocation, against jemalloc's ~20 ns.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// An allocator that counts the bytes `A` hands out (`live_bytes`,
/// `peak_bytes`).
pub struct Counting<A>(pub A);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    if now > PEAK.load(Relaxed) {
        PEAK.fetch_max(now, Relaxed);
    }
}

// SAFETY: every call is passed to `A` unchanged; only counters are added.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            grew(new_size);
        }
        p
    }
}

/// Bytes allocated and not freed, as the program asked for them (without
/// the allocator's rounding and metadata).
pub fn live_bytes() -> usize {
    LIVE.load(Relaxed)
}

/// The most `live_bytes` has been since the last `reset_peak`.
pub fn peak_bytes() -> usize {
    PEAK.load(Relaxed)
}

/// Starts a new peak from what is live now.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Relaxed), Relaxed);
}

/// The resident set (VmRSS), in MiB.
pub fn resident_mib() -> u64 {
    status_mib("VmRSS:")
}

/// The most the resident set has been (VmHWM), in MiB.
pub fn resident_peak_mib() -> u64 {
    status_mib("VmHWM:")
}

fn status_mib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
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

/// Hands the pages of freed memory back to the kernel now: after a full
/// pass, which frees the whole desired state it built (with `MALLOC_CONF`
/// there is little left to hand back; this stays for a `_RJEM_MALLOC_CONF`
/// that sets other decay times).
pub fn hand_back() {
    // `arena.<MALLCTL_ARENAS_ALL>.purge`: every arena; takes no value.
    const PURGE_ALL: &std::ffi::CStr = c"arena.4096.purge";
    // SAFETY: a void mallctl, called with no old or new value as it must be.
    unsafe {
        tikv_jemalloc_sys::mallctl(PURGE_ALL.as_ptr(), null_mut(), null_mut(), null_mut(), 0);
    }
}
