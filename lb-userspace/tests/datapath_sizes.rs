//! The cluster-sized maps take their sizes from the agent's settings, and a
//! map pinned with other sizes is refused rather than reused. Needs root.

use std::path::PathBuf;

use lb::datapath::{Datapath, MapSizes};

/// A pin directory of this test's own, removed (maps unpinned) however the
/// test ends.
struct PinDir(PathBuf);

impl PinDir {
    fn new(test: &str) -> Self {
        let dir = PathBuf::from(format!("/sys/fs/bpf/lbtest-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn small() -> MapSizes {
    MapSizes {
        services: 64,
        backends: 32,
        maglev_tables: 8,
        conntrack: 4096,
    }
}

/// What the kernel says each sized map holds.
fn sizes_in_kernel(dir: &std::path::Path) -> Vec<(String, u32)> {
    small()
        .by_map()
        .iter()
        .map(|(name, _)| {
            let map = aya::maps::MapData::from_pin(dir.join(name)).unwrap();
            (name.to_string(), map.info().unwrap().max_entries())
        })
        .collect()
}

#[test]
fn the_maps_have_the_sizes_of_the_settings_and_a_pinned_map_of_another_size_is_refused() {
    let pins = PinDir::new("sizes");
    let dp = Datapath::load_with(Some(&pins.0), false, &small()).expect("load (are you root?)");
    let want: Vec<(String, u32)> = small()
        .by_map()
        .iter()
        .map(|(n, s)| (n.to_string(), *s))
        .collect();
    assert_eq!(sizes_in_kernel(&pins.0), want);
    drop(dp);

    // An agent restarted with other sizes finds the old maps pinned.
    let bigger = MapSizes {
        services: 128,
        ..small()
    };
    let err = match Datapath::load_with(Some(&pins.0), false, &bigger) {
        Ok(_) => panic!("a pinned SERVICES map of 64 entries was reused for 128"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("SERVICES holds 64 entries, and the settings ask for 128")
            && err.contains("rm "),
        "{err}"
    );
    assert_eq!(sizes_in_kernel(&pins.0), want, "nothing was changed");

    // With the sizes it was pinned with, it is reused.
    Datapath::load_with(Some(&pins.0), false, &small()).expect("reuse");
}
