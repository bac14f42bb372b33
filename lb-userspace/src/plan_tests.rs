use super::*;
use crate::translate::DesiredService;
use lb_common::PROTO_TCP;

/// A TCP frontend with backends on port 8080 (shared with the agent's
/// writer tests).
pub(crate) fn svc(vip: &str, port: u16, backends: &[&str]) -> DesiredService {
    DesiredService {
        name: format!("test/{vip}:{port}"),
        vip: vip.parse().unwrap(),
        port,
        proto: PROTO_TCP,
        flags: 0,
        backends: backends
            .iter()
            .map(|ip| BackendAddr {
                ip: ip.parse().unwrap(),
                port: 8080,
                proto: PROTO_TCP,
                local: false,
            })
            .collect(),
        retained: vec![],
        affinity_timeout: None,
        source_ranges: vec![],
    }
}

/// Applies ops to a state, checking after every single op that no master
/// entry points at a missing slot or backend (what a packet could observe).
fn apply_checked(mut state: MapState, ops: &[MapOp]) -> MapState {
    for op in ops {
        state.apply(std::slice::from_ref(op));
        // Every slot a Maglev table names holds a backend that exists.
        for (k, v) in state.services.iter().filter(|(k, _)| k.slot == 0) {
            for slot in state
                .maglev
                .get(&v.rev_nat_id)
                .into_iter()
                .flat_map(|t| t.iter())
            {
                let sk = ServiceKey {
                    slot: *slot as u16,
                    ..*k
                };
                let id = state.services.get(&sk).map(|e| e.backend_id);
                assert!(
                    id.is_some_and(|id| state.backends.contains_key(&id)),
                    "after {op:?}: {k:?}'s Maglev table names slot {slot} without a backend"
                );
            }
        }
        for (k, v) in state.services.iter().filter(|(k, _)| k.slot == 0) {
            for slot in 1..=v.count {
                let sk = ServiceKey { slot, ..*k };
                let entry = state.services.get(&sk);
                assert!(
                    entry.is_some(),
                    "after {op:?}: {k:?} count {} but slot {slot} missing",
                    v.count
                );
                let id = entry.map(|e| e.backend_id).unwrap_or_default();
                assert!(
                    state.backends.contains_key(&id),
                    "after {op:?}: slot {slot} names missing backend {id}"
                );
            }
        }
    }
    state
}

#[test]
fn transitions_never_expose_a_half_written_service() {
    // (case, before, after)
    let cases: Vec<(&str, Vec<DesiredService>, Vec<DesiredService>)> = vec![
        (
            "create",
            vec![],
            vec![svc("10.96.0.1", 80, &["10.244.1.2", "10.244.1.3"])],
        ),
        (
            "grow",
            vec![svc("10.96.0.1", 80, &["10.244.1.2"])],
            vec![svc(
                "10.96.0.1",
                80,
                &["10.244.1.2", "10.244.1.3", "10.244.1.4"],
            )],
        ),
        (
            "shrink",
            vec![svc(
                "10.96.0.1",
                80,
                &["10.244.1.2", "10.244.1.3", "10.244.1.4"],
            )],
            vec![svc("10.96.0.1", 80, &["10.244.1.4"])],
        ),
        (
            "replace all",
            vec![svc("10.96.0.1", 80, &["10.244.1.2", "10.244.1.3"])],
            vec![svc("10.96.0.1", 80, &["10.244.2.2", "10.244.2.3"])],
        ),
        (
            "delete",
            vec![
                svc("10.96.0.1", 80, &["10.244.1.2"]),
                svc("10.96.0.2", 80, &["10.244.1.2"]),
            ],
            vec![svc("10.96.0.2", 80, &["10.244.1.2"])],
        ),
        (
            "to no endpoints",
            vec![svc("10.96.0.1", 80, &["10.244.1.2"])],
            vec![svc("10.96.0.1", 80, &[])],
        ),
    ];
    for (case, before, after) in cases {
        let start = apply_checked(
            MapState::default(),
            &plan(
                &MapState::default(),
                &desired_state(&MapState::default(), &before),
            ),
        );
        let want = desired_state(&start, &after);
        let ops = plan(&start, &want);
        let end = apply_checked(start.clone(), &ops);
        assert_eq!(end, want, "case {case}");
        // Converged: a second plan has nothing to do.
        assert!(
            plan(&end, &desired_state(&end, &after)).is_empty(),
            "case {case}: not idempotent"
        );
    }
}

#[test]
fn ids_are_kept_for_unchanged_backends_and_services() {
    let first = desired_state(
        &MapState::default(),
        &[svc("10.96.0.1", 80, &["10.244.1.2", "10.244.1.3"])],
    );
    let second = desired_state(
        &first,
        &[svc("10.96.0.1", 80, &["10.244.1.3", "10.244.1.9"])],
    );
    let id_of = |s: &MapState, ip: &str| {
        s.backends
            .iter()
            .find(|(_, b)| backend_addr(b).ip.to_string() == ip)
            .map(|(id, _)| *id)
    };
    assert_eq!(id_of(&first, "10.244.1.3"), id_of(&second, "10.244.1.3"));
    // The new backend gets a fresh id, not the one just freed.
    assert_eq!(id_of(&second, "10.244.1.9"), Some(3));
    let master = service_key("10.96.0.1".parse().unwrap(), 80, PROTO_TCP, 0);
    assert_eq!(
        first.services[&master].rev_nat_id,
        second.services[&master].rev_nat_id
    );
}

#[test]
fn a_backend_that_stops_being_ready_keeps_its_entry_until_it_leaves_the_slice() {
    let start = desired_state(
        &MapState::default(),
        &[svc("10.96.0.1", 80, &["10.244.1.2", "10.244.1.3"])],
    );
    let mut terminating = svc("10.96.0.1", 80, &["10.244.1.2"]);
    terminating.retained = svc("10.96.0.1", 80, &["10.244.1.3"]).backends;
    let during = desired_state(&start, &[terminating]);
    let master = service_key("10.96.0.1".parse().unwrap(), 80, PROTO_TCP, 0);
    assert_eq!(
        during.services[&master].count, 1,
        "no new flows to the terminating backend"
    );
    assert_eq!(
        during.backends, start.backends,
        "its backend entry stays, with the same id"
    );
    let gone = desired_state(&during, &[svc("10.96.0.1", 80, &["10.244.1.2"])]);
    assert_eq!(gone.backends.len(), 1, "removed once it leaves the slice");
}

#[test]
fn plan_orders_backends_then_slots_then_master_then_removals() {
    let start = desired_state(
        &MapState::default(),
        &[svc("10.96.0.1", 80, &["10.244.1.2", "10.244.1.3"])],
    );
    let want = desired_state(&start, &[svc("10.96.0.1", 80, &["10.244.1.9"])]);
    let ops = plan(&start, &want);
    let kinds: Vec<&str> = ops
        .iter()
        .map(|op| match op {
            MapOp::PutBackend(..) => "put-backend",
            MapOp::PutService(k, _) if k.slot == 0 => "put-master",
            MapOp::PutService(..) => "put-slot",
            MapOp::DeleteService(k) if k.slot == 0 => "del-master",
            MapOp::DeleteService(..) => "del-slot",
            MapOp::DeleteBackend(..) => "del-backend",
            MapOp::PutMaglev(..) => "put-maglev",
            MapOp::DeleteMaglev(..) => "del-maglev",
            MapOp::PutSourceRange(..) => "put-range",
            MapOp::DeleteSourceRange(..) => "del-range",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "put-backend",
            "put-slot",
            "put-maglev",
            "put-master",
            "del-slot",
            "del-backend",
            "del-backend"
        ]
    );
}

#[test]
fn backends_keep_their_slots_while_others_come_and_go() {
    let master = service_key("10.96.0.1".parse().unwrap(), 80, PROTO_TCP, 0);
    let slot_of = |s: &MapState, ip: &str| {
        (1..=s.services[&master].count).find(|slot| {
            let v = s.services[&ServiceKey {
                slot: *slot,
                ..master
            }];
            backend_addr(&s.backends[&v.backend_id]).ip.to_string() == ip
        })
    };
    let a = desired_state(
        &MapState::default(),
        &[svc("10.96.0.1", 80, &["10.244.1.5", "10.244.1.9"])],
    );
    // A backend that sorts first joins: the others stay where they were.
    let b = desired_state(
        &a,
        &[svc(
            "10.96.0.1",
            80,
            &["10.244.1.2", "10.244.1.5", "10.244.1.9"],
        )],
    );
    assert_eq!(slot_of(&b, "10.244.1.5"), slot_of(&a, "10.244.1.5"));
    assert_eq!(slot_of(&b, "10.244.1.9"), slot_of(&a, "10.244.1.9"));
    assert_eq!(slot_of(&b, "10.244.1.2"), Some(3));
    // One leaves: the last slot's backend moves into the hole, nobody else.
    let c = desired_state(&b, &[svc("10.96.0.1", 80, &["10.244.1.2", "10.244.1.9"])]);
    assert_eq!(slot_of(&c, "10.244.1.9"), slot_of(&b, "10.244.1.9"));
    assert_eq!(c.services[&master].count, 2);
}

#[test]
fn services_that_would_overflow_a_map_are_left_out_whole() {
    let named = |name: &str, vip: &str, port: u16, backends: &[&str]| DesiredService {
        name: format!("default/{name}:p{port}"),
        ..svc(vip, port, backends)
    };
    let cap = |services, backends, maglev_tables| Capacity {
        services,
        backends,
        maglev_tables,
    };
    let a80 = named("a", "10.96.0.1", 80, &["10.244.1.1", "10.244.1.2"]);
    let a81 = named("a", "10.96.0.1", 81, &["10.244.1.1", "10.244.1.2"]);
    let b80 = named("b", "10.96.0.2", 80, &["10.244.1.3"]);
    let c80 = named("c", "10.96.0.3", 80, &[]);
    let all = vec![a80.clone(), a81.clone(), b80.clone(), c80.clone()];
    // (capacity, Services kept, the error's map)
    let cases = [
        (cap(100, 100, 100), vec!["a", "a", "b", "c"], None),
        // 5 backends counted once per frontend, 3 distinct: too many for
        // `fits_whole`, and the accounting keeps everything all the same.
        (cap(100, 3, 100), vec!["a", "a", "b", "c"], None),
        // a takes 6 SERVICES entries (2 masters, 4 slots), b 2, c 1.
        (cap(6, 100, 100), vec!["a", "a"], Some("SERVICES")),
        (cap(8, 100, 100), vec!["a", "a", "b"], Some("SERVICES")),
        // a's two ports share their 2 backends; b needs a third.
        (cap(100, 2, 100), vec!["a", "a", "c"], Some("BACKENDS")),
        // 1 table only: a needs 2, so a goes (whole) and b takes it.
        (cap(100, 100, 1), vec!["b", "c"], Some("MAGLEV")),
    ];
    for (capacity, want, full) in cases {
        let (kept, errors) = fit_to_capacity(all.clone(), &capacity);
        let names: Vec<&str> = kept.iter().map(|s| &s.name[8..9]).collect();
        assert_eq!(names, want, "{capacity:?}");
        match full {
            None => assert!(errors.is_empty()),
            Some(map) => {
                assert!(!errors.is_empty(), "{capacity:?}");
                assert!(
                    errors.iter().all(|e| e.message.contains(map)
                        && e.message.contains("full")
                        && e.object.starts_with("Service default/")),
                    "{errors:?}"
                );
            }
        }
    }
    // A ClusterIP frontend has no Maglev table, so it never fills MAGLEV
    // (100,000 ClusterIP Services were left out past 65,536 tables).
    let cluster_ip = DesiredService {
        flags: lb_common::service::SERVICE_F_CLUSTER_IP,
        ..named("d", "10.96.0.4", 80, &["10.244.1.4"])
    };
    let (kept, errors) = fit_to_capacity(vec![cluster_ip], &cap(100, 100, 0));
    assert_eq!(kept.len(), 1, "{errors:?}");
}
