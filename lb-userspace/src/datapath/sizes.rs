//! The sizes of the maps that grow with the cluster, from the agent's
//! settings: the programs declare defaults, and the loader sets these
//! instead (`EbpfLoader::set_max_entries`). A map pinned by an agent with
//! other sizes is refused with an error that says how to resize it, since
//! the kernel cannot resize a map and a silent reuse would leave the agent
//! planning for room the map does not have.

use std::path::Path;

use anyhow::{bail, Context, Result};
use aya::{maps::MapData, EbpfLoader};
use lb_common::{
    conntrack::CONNTRACK_MAX_ENTRIES,
    map_names,
    service::{BACKENDS_MAX_ENTRIES, MAGLEV_MAX_TABLES, SERVICES_MAX_ENTRIES},
};

use crate::plan::Capacity;

/// Entries of the cluster-sized maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// SERVICES: one entry per frontend (VIP, port, protocol) and one per
    /// backend slot of each.
    pub services: u32,
    /// BACKENDS: one per distinct backend address, port and protocol.
    pub backends: u32,
    /// MAGLEV: one table per frontend reached from outside the node.
    pub maglev_tables: u32,
    /// CONNTRACK (LRU, preallocated: about 100 bytes an entry).
    pub conntrack: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: SERVICES_MAX_ENTRIES,
            backends: BACKENDS_MAX_ENTRIES,
            maglev_tables: MAGLEV_MAX_TABLES,
            conntrack: CONNTRACK_MAX_ENTRIES,
        }
    }
}

impl MapSizes {
    /// Each sized map's name and size.
    pub fn by_map(&self) -> [(&'static str, u32); 4] {
        [
            (map_names::SERVICES, self.services),
            (map_names::BACKENDS, self.backends),
            (map_names::MAGLEV, self.maglev_tables),
            (map_names::CONNTRACK, self.conntrack),
        ]
    }

    /// What the planner may fill.
    pub fn capacity(&self) -> Capacity {
        Capacity {
            services: self.services as usize,
            backends: self.backends as usize,
            maglev_tables: self.maglev_tables as usize,
        }
    }

    /// Sizes the maps the loader creates.
    pub fn apply(&self, loader: &mut EbpfLoader) {
        for (name, size) in self.by_map() {
            loader.map_max_entries(name, size);
        }
    }

    /// Refuses maps pinned in `dir` with other sizes than these.
    pub fn check_pinned(&self, dir: &Path) -> Result<()> {
        for (name, want) in self.by_map() {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            let map = MapData::from_pin(&path)
                .with_context(|| format!("opening the pinned map {}", path.display()))?;
            let has = map
                .info()
                .with_context(|| format!("reading the size of {}", path.display()))?
                .max_entries();
            if has != want {
                bail!(
                    "the pinned map {} holds {has} entries, and the settings ask for {want}: \
                     the kernel cannot resize a map, so remove it (`rm {}`; for CONNTRACK this \
                     forgets the tracked connections) and start the agent again, or set the \
                     size back to {has}",
                    path.display(),
                    path.display()
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_planner_fills_what_the_maps_hold() {
        let sizes = MapSizes {
            services: 4_194_304,
            backends: 1_048_576,
            maglev_tables: 131_072,
            conntrack: 2_097_152,
        };
        let cap = sizes.capacity();
        assert_eq!(
            (cap.services, cap.backends, cap.maglev_tables),
            (4_194_304, 1_048_576, 131_072)
        );
        let names: Vec<_> = sizes.by_map().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["SERVICES", "BACKENDS", "MAGLEV", "CONNTRACK"]);
    }
}
