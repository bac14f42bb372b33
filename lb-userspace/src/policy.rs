//! NetworkPolicy: from API objects to the data path's identities, ipcache,
//! endpoints and policy entries. Pure functions; see `lb_common::policy`.

/// Splits the port range `start..=end` into (port, prefix bits) pairs that
/// cover it exactly, for the policy LPM trie (`endPort` ranges).
pub fn port_prefixes(start: u16, end: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, end) = (u32::from(start), u32::from(end));
    while lo <= end {
        // The largest aligned block starting at lo that stays within end.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros().min(16)
        };
        while lo + size - 1 > end {
            size >>= 1;
        }
        out.push((lo as u16, (16 - size.trailing_zeros()) as u8));
        lo += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(prefixes: &[(u16, u8)]) -> Vec<u16> {
        let mut ports: Vec<u16> = prefixes
            .iter()
            .flat_map(|(p, bits)| {
                let size = 1u32 << (16 - u32::from(*bits));
                (u32::from(*p)..u32::from(*p) + size).map(|x| x as u16)
            })
            .collect();
        ports.sort();
        ports
    }

    #[test]
    fn port_ranges_become_exact_prefix_covers() {
        // (start, end, number of prefixes)
        for (start, end, n) in [
            (80, 80, 1),
            (32000, 32767, 2),
            (1, 65535, 16),
            (0, 65535, 1),
            (8080, 8081, 1),
            (8081, 8082, 2),
        ] {
            let p = port_prefixes(start, end);
            assert_eq!(
                covered(&p),
                (start..=end).collect::<Vec<_>>(),
                "{start}-{end}"
            );
            assert_eq!(p.len(), n, "{start}-{end}: {p:?}");
        }
    }
}
