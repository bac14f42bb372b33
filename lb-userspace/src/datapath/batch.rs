//! Reading a whole hash map in a few system calls (`BPF_MAP_LOOKUP_BATCH`,
//! Linux 5.6+). aya 0.14's iterator makes two system calls per entry
//! (`get_next_key`, then `lookup`): at 600,000 conntrack entries that was
//! 1.2 million calls per sweep, on the cores the node's traffic needs
//! (`docs/nat-under-churn.md`). A batch copies every entry of a run of
//! hash buckets at once, each bucket read under its lock. Writes go the
//! same way: a 1,021-entry Maglev table in one call, not 1,021.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{bail, Result};
use aya::maps::{HashMap, IterableMap, MapData};
use bytemuck::Pod;

/// `BPF_MAP_LOOKUP_BATCH` in `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `BPF_MAP_UPDATE_BATCH`, the same enum.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// `BPF_MAP_DELETE_BATCH`, the same enum.
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries written or deleted per call. The kernel takes them one by one
/// either way; the bound only keeps one call from holding the CPU long.
pub const WRITE_BATCH: usize = 8192;

/// Entries asked for per call. A call returns fewer when the next bucket
/// does not fit whole; with a hash map's buckets of a few entries, 4,096
/// turns a million entries into about 250 calls.
pub const LOOKUP_BATCH: usize = 4096;

/// `union bpf_attr`'s `batch` member, as the kernel lays it out.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct BatchAttr {
    /// Where to start (a hash map's bucket index); 0 (NULL) for the first.
    in_batch: u64,
    /// Where the next call starts, written by the kernel.
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: room for this many entries; out: how many were written.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid `union bpf_attr` prefix for the batch
    // commands; the buffers it points at are the caller's to guarantee.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Writes `values[i]` at index `i` of an array map, all in one call.
pub fn fill_array<V: Pod + aya::Pod>(
    map: &aya::maps::Array<MapData, V>,
    values: &[V],
) -> Result<()> {
    // aya checked the value size when it made the typed handle.
    let map: &MapData = IterableMap::map(map);
    let keys: Vec<u32> = (0..values.len() as u32).collect();
    let mut done = 0;
    while done < values.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: (values.len() - done) as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // The buffers hold `count` keys and values of the map's sizes.
        match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
            Ok(()) => return Ok(()),
            // Interrupted part way: `count` says how many were written.
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => done += attr.count as usize,
            Err(e) => bail!("BPF_MAP_UPDATE_BATCH: {e}"),
        }
    }
    Ok(())
}

fn map_fd<K: Pod + aya::Pod, V: Pod + aya::Pod>(map: &HashMap<MapData, K, V>) -> u32 {
    let map: &MapData = IterableMap::map(map);
    map.fd().as_fd().as_raw_fd() as u32
}

/// Writes `values[i]` at `keys[i]` of a hash map, thousands per call: a
/// full pass of 10,000 Services is 200,000 entries, which one update call
/// each spent most of a second on (every system call is dear on this kind
/// of machine). Stops at the first entry the kernel refuses (a full map:
/// E2BIG), naming it; those before it are written.
pub fn update_entries<K: Pod + aya::Pod, V: Pod + aya::Pod>(
    map: &HashMap<MapData, K, V>,
    keys: &[K],
    values: &[V],
) -> Result<()> {
    if keys.len() != values.len() {
        bail!("{} keys for {} values", keys.len(), values.len());
    }
    in_batches(BPF_MAP_UPDATE_BATCH, map_fd(map), keys, Some(values))
}

/// Deletes `keys` from a hash map, thousands per call. A key the map does
/// not hold is passed over: it is gone, as asked.
pub fn delete_entries<K: Pod + aya::Pod, V: Pod + aya::Pod>(
    map: &HashMap<MapData, K, V>,
    keys: &[K],
) -> Result<()> {
    in_batches::<K, V>(BPF_MAP_DELETE_BATCH, map_fd(map), keys, None)
}

/// The loop both share: `WRITE_BATCH` entries per call, going on after an
/// interrupted call from where the kernel says it stopped. Deletes (no
/// `values`) step over a missing key, at which the kernel stops.
fn in_batches<K: Pod, V: Pod>(
    cmd: libc::c_long,
    map_fd: u32,
    keys: &[K],
    values: Option<&[V]>,
) -> Result<()> {
    let name = if values.is_some() {
        "BPF_MAP_UPDATE_BATCH"
    } else {
        "BPF_MAP_DELETE_BATCH"
    };
    let mut done = 0;
    while done < keys.len() {
        let n = (keys.len() - done).min(WRITE_BATCH);
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values.map_or(0, |v| v[done..].as_ptr() as u64),
            count: n as u32,
            map_fd,
            ..Default::default()
        };
        // aya checked the key and value sizes when it made the typed
        // handle; the buffers hold `n` of each past `done`.
        match bpf(cmd, &mut attr) {
            Ok(()) => done += n,
            // `count` says how many went in before the call stopped.
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => done += attr.count as usize,
            Err(e) if values.is_none() && e.raw_os_error() == Some(libc::ENOENT) => {
                done += attr.count as usize + 1
            }
            Err(e) => bail!(
                "{name}: entry {} of {}: {e}",
                done + attr.count as usize + 1,
                keys.len()
            ),
        }
    }
    Ok(())
}

/// Calls `each` with every (key, value) of a hash or LRU hash map, a batch
/// at a time. An entry written or removed while the listing runs may or may
/// not be seen, as with any listing of a live map; each bucket's entries are
/// read together under its lock.
pub fn for_each_entry<K: Pod + aya::Pod, V: Pod + aya::Pod>(
    map: &HashMap<MapData, K, V>,
    mut each: impl FnMut(&K, &V),
) -> Result<()> {
    // aya checked, when it made the typed handle, that K and V have the
    // map's key and value sizes: the buffers below fit what the kernel writes.
    let map: &MapData = IterableMap::map(map);
    let mut room = LOOKUP_BATCH;
    let mut keys = vec![K::zeroed(); room];
    let mut values = vec![V::zeroed(); room];
    // The kernel's batch token for hash maps is a u32 bucket index.
    let mut start: u32 = 0;
    let mut next: u32 = 0;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &start as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: room as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // `attr` points at buffers of `room` keys and values of the map's
        // own sizes (see above) and at two u32 tokens, all alive for the call.
        let err = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr).err();
        match err.as_ref().and_then(std::io::Error::raw_os_error) {
            // Interrupted before it copied anything: ask again.
            Some(libc::EINTR) => continue,
            // One bucket holds more than `room` entries: make room.
            Some(libc::ENOSPC) if attr.count == 0 && room < 1 << 20 => {
                room *= 2;
                keys.resize(room, K::zeroed());
                values.resize(room, V::zeroed());
                continue;
            }
            Some(libc::ENOENT) | None => {}
            Some(_) => bail!(
                "BPF_MAP_LOOKUP_BATCH: {}",
                err.map(|e| e.to_string()).unwrap_or_default()
            ),
        }
        let n = (attr.count as usize).min(room);
        for (k, v) in keys[..n].iter().zip(&values[..n]) {
            each(k, v);
        }
        // ENOENT: the last bucket was read.
        if err.is_some() {
            return Ok(());
        }
        start = next;
        first = false;
    }
}
