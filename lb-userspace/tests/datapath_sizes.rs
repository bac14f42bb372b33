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

fn backend(id: u32) -> lb::plan::MapOp {
    let b = lb_common::backend::Backend {
        addr: (0x0a00_0000 + id).to_be(),
        port: 8080u16.to_be(),
        proto: lb_common::PROTO_TCP,
        ..bytemuck::Zeroable::zeroed()
    };
    lb::plan::MapOp::PutBackend(id, b)
}

/// `Maps::apply` writes a run of one kind of entry in batches: every entry
/// lands, a delete of an entry already gone passes over it, and a map that
/// fills stops the write at the entry that does not fit, named.
#[test]
fn batched_writes_land_whole_deletes_pass_over_missing_keys_and_a_full_map_names_the_entry() {
    use lb::plan::{service_key, MapOp};
    let pins = PinDir::new("batch");
    let mut dp = Datapath::load_with(Some(&pins.0), false, &small()).expect("load (are you root?)");
    let vip = std::net::Ipv4Addr::new(10, 96, 0, 1);
    let mut ops: Vec<MapOp> = (1..=20).map(backend).collect();
    ops.extend((0..10u16).map(|slot| {
        MapOp::PutService(
            service_key(vip, 80, lb_common::PROTO_TCP, slot),
            bytemuck::Zeroable::zeroed(),
        )
    }));
    dp.maps
        .apply(&ops)
        .expect("writing 20 backends and 10 service entries");
    let state = dp.maps.state().expect("reading the maps");
    assert_eq!(
        state.backends.keys().copied().collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    assert_eq!(state.services.len(), 10);

    // 3 and 7 twice: the second delete of each finds nothing, and the
    // deletes after it still happen.
    let deletes: Vec<MapOp> = [3, 7, 3, 99, 7, 11]
        .into_iter()
        .map(MapOp::DeleteBackend)
        .chain(
            [0u16, 5, 42]
                .map(|slot| MapOp::DeleteService(service_key(vip, 80, lb_common::PROTO_TCP, slot))),
        )
        .collect();
    dp.maps.apply(&deletes).expect("deleting, some twice");
    let state = dp.maps.state().expect("reading the maps");
    let left: Vec<u32> = (1..=20).filter(|i| ![3, 7, 11].contains(i)).collect();
    assert_eq!(state.backends.keys().copied().collect::<Vec<_>>(), left);
    assert_eq!(state.services.len(), 8);

    // 17 held, room for 32: of 40 more, the first 15 fit and the 16th does not.
    let more: Vec<MapOp> = (101..=140).map(backend).collect();
    let err = dp
        .maps
        .apply(&more)
        .expect_err("the backends map has room for 32");
    let msg = format!("{err:#}");
    assert!(msg.contains("entry 16 of 40"), "{msg}");
    let state = dp.maps.state().expect("reading the maps");
    assert_eq!(state.backends.len(), 32, "{:?}", state.backends.keys());
}
