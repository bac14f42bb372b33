//! Writing the NetworkPolicy state into the maps, and reading it back.

use aya::maps::lpm_trie::Key;
use lb_common::policy::{IpcacheKey, PolicyEntry, POLICY_KEY_FIXED_BITS};

use super::Maps;
use crate::policy::{PolicyDelta, PolicyState};

/// Writes what changed (`PolicyEngine::flush`), in `apply`'s order:
/// ipcache and rules first, then endpoints, removals last. The count of
/// writes.
pub fn apply_delta(maps: &mut Maps, delta: &PolicyDelta) -> anyhow::Result<usize> {
    let ipcache_key = |k: &(u32, u8)| Key::new(u32::from(k.1), IpcacheKey { addr: k.0 });
    let rule_key = |k: &(lb_common::policy::PolicyKey, u8)| {
        Key::new(POLICY_KEY_FIXED_BITS + u32::from(k.1), k.0)
    };
    for (k, v) in &delta.ipcache {
        if let Some(v) = v {
            maps.ipcache.insert(&ipcache_key(k), v, 0)?;
        }
    }
    for (k, v) in &delta.rules {
        if let Some(rule) = v {
            maps.policy
                .insert(&rule_key(k), PolicyEntry { rule_id: *rule }, 0)?;
        }
    }
    for (addr, v) in &delta.endpoints {
        if let Some(ep) = v {
            maps.endpoints.insert(addr, ep, 0)?;
        }
    }
    for (addr, present) in &delta.peer_nodes {
        if *present {
            maps.peer_nodes.insert(addr, 1, 0)?;
        } else {
            let _ = maps.peer_nodes.remove(addr);
        }
    }
    // Removals of what is already gone are not errors (a repair may have
    // removed it first).
    for (addr, v) in &delta.endpoints {
        if v.is_none() {
            let _ = maps.endpoints.remove(addr);
        }
    }
    for (k, v) in &delta.rules {
        if v.is_none() {
            let _ = maps.policy.remove(&rule_key(k));
        }
    }
    for (k, v) in &delta.ipcache {
        if v.is_none() {
            let _ = maps.ipcache.remove(&ipcache_key(k));
        }
    }
    Ok(delta.len())
}

/// Brings the policy maps to `want`: ipcache and rules first, then the
/// endpoints (so a pod becomes isolated only once its rules are there, and
/// stops being isolated before they go), removals last.
pub fn apply(maps: &mut Maps, want: &PolicyState) -> anyhow::Result<usize> {
    let cur = current(maps)?;
    let mut n = 0;
    for (k, v) in &want.ipcache {
        if cur.ipcache.get(k) != Some(v) {
            maps.ipcache
                .insert(&Key::new(u32::from(k.1), IpcacheKey { addr: k.0 }), v, 0)?;
            n += 1;
        }
    }
    for ((k, bits), rule) in &want.rules {
        if cur.rules.get(&(*k, *bits)) != Some(rule) {
            let key = Key::new(POLICY_KEY_FIXED_BITS + u32::from(*bits), *k);
            maps.policy
                .insert(&key, PolicyEntry { rule_id: *rule }, 0)?;
            n += 1;
        }
    }
    for (addr, ep) in &want.endpoints {
        if cur.endpoints.get(addr) != Some(ep) {
            maps.endpoints.insert(addr, ep, 0)?;
            n += 1;
        }
    }
    for addr in &want.peer_nodes {
        if !cur.peer_nodes.contains(addr) {
            maps.peer_nodes.insert(addr, 1, 0)?;
            n += 1;
        }
    }
    for addr in cur.peer_nodes.difference(&want.peer_nodes) {
        let _ = maps.peer_nodes.remove(addr);
        n += 1;
    }
    for addr in cur
        .endpoints
        .keys()
        .filter(|a| !want.endpoints.contains_key(a))
    {
        let _ = maps.endpoints.remove(addr);
        n += 1;
    }
    for (k, bits) in cur.rules.keys().filter(|k| !want.rules.contains_key(k)) {
        let _ = maps
            .policy
            .remove(&Key::new(POLICY_KEY_FIXED_BITS + u32::from(*bits), *k));
        n += 1;
    }
    for k in cur.ipcache.keys().filter(|k| !want.ipcache.contains_key(k)) {
        let _ = maps
            .ipcache
            .remove(&Key::new(u32::from(k.1), IpcacheKey { addr: k.0 }));
        n += 1;
    }
    Ok(n)
}

/// What the policy maps hold.
pub fn current(maps: &Maps) -> anyhow::Result<PolicyState> {
    let mut s = PolicyState::default();
    for item in maps.ipcache.iter() {
        let (k, v) = item?;
        s.ipcache.insert((k.data().addr, k.prefix_len() as u8), v);
    }
    for item in maps.policy.iter() {
        let (k, v) = item?;
        let bits = k.prefix_len().saturating_sub(POLICY_KEY_FIXED_BITS) as u8;
        s.rules.insert((k.data(), bits), v.rule_id);
    }
    for item in maps.endpoints.iter() {
        let (k, v) = item?;
        s.endpoints.insert(k, v);
    }
    for item in maps.peer_nodes.keys() {
        s.peer_nodes.insert(item?);
    }
    Ok(s)
}
