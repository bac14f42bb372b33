//! The arithmetic of Kubernetes' rolling update
//! (`pkg/controller/deployment/rolling.go` and `util/deployment_util.go`),
//! on counts only, so that each rule can be tested by table. The lab's
//! Deployment controller (`workloads.rs`) applies it to the store.

use serde_json::{json, Value};

/// Both `maxSurge` and `maxUnavailable` default to this.
const DEFAULT_LIMIT: &str = "25%";

/// An IntOrString of `total`: an integer as it is, a percentage of `total`
/// rounded up or down. `None` for anything else, which the API rejects.
pub fn scaled(v: &Value, total: i64, round_up: bool) -> Option<i64> {
    if let Some(n) = v.as_i64() {
        return (n >= 0).then_some(n);
    }
    let percent: i64 = v.as_str()?.strip_suffix('%')?.parse().ok()?;
    if percent < 0 {
        return None;
    }
    let hundredths = percent * total.max(0);
    Some(if round_up {
        (hundredths + 99) / 100
    } else {
        hundredths / 100
    })
}

/// How far a rolling update of `desired` replicas may go over and under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Pods beyond `desired` that may exist at once (maxSurge, rounded up).
    pub surge: i64,
    /// Pods short of `desired` that may be unavailable (maxUnavailable,
    /// rounded down).
    pub unavailable: i64,
}

/// The limits `spec.strategy.rollingUpdate` sets for `desired` replicas, as
/// `ResolveFenceposts` and `MaxUnavailable` compute them: each defaults to
/// 25% (as does a value the lab cannot read, which a cluster would have
/// refused); if both come to 0 one pod may be unavailable, or the rollout
/// could never start; and no more can be unavailable than there are.
pub fn limits(rolling_update: &Value, desired: i64) -> Limits {
    let get = |field: &str, round_up: bool| {
        scaled(&rolling_update[field], desired, round_up)
            .or_else(|| scaled(&json!(DEFAULT_LIMIT), desired, round_up))
            .unwrap_or(0)
    };
    let surge = get("maxSurge", true);
    let mut unavailable = get("maxUnavailable", false);
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    Limits {
        surge,
        unavailable: unavailable.min(desired.max(0)),
    }
}

/// A ReplicaSet as the rolling update counts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Its spec.replicas.
    pub replicas: i64,
    /// Its pods that are available (Ready for minReadySeconds).
    pub available: i64,
}

/// The new ReplicaSet's replicas (`NewRSNewReplicas`): down to `desired` at
/// once; up towards it as far as `desired + surge` pods in all (`all` is
/// every ReplicaSet's replicas, the new one's included) allow.
pub fn new_replicas(desired: i64, surge: i64, all: i64, new: i64) -> i64 {
    if new >= desired {
        return desired;
    }
    let room = desired + surge - all;
    if room <= 0 {
        return new;
    }
    new + room.min(desired - new)
}

/// The old ReplicaSets' replicas, oldest first, after one scale-down step
/// (`reconcileOldReplicaSets`). Unavailable old pods go first, as far as
/// availability allows once the new ReplicaSet's not-yet-available pods
/// are counted out (they serve nobody, and would block the rollout); then
/// available ones, as long as `desired - max_unavailable` stay available.
pub fn old_replicas(desired: i64, max_unavailable: i64, new: Counts, old: &[Counts]) -> Vec<i64> {
    let mut out: Vec<i64> = old.iter().map(|c| c.replicas).collect();
    let old_total: i64 = out.iter().sum();
    if old_total == 0 {
        return out;
    }
    let min_available = desired - max_unavailable;
    let new_unavailable = new.replicas - new.available;
    let max_scaled_down = old_total + new.replicas - min_available - new_unavailable;
    if max_scaled_down <= 0 {
        return out;
    }
    let mut cleaned = 0;
    for (replicas, c) in out.iter_mut().zip(old) {
        let cut = (*replicas - c.available)
            .max(0)
            .min(max_scaled_down - cleaned);
        *replicas -= cut;
        cleaned += cut;
    }
    let available = new.available + old.iter().map(|c| c.available).sum::<i64>();
    let mut may_go = available - min_available;
    for replicas in out.iter_mut() {
        if may_go <= 0 {
            break;
        }
        let cut = (*replicas).min(may_go);
        *replicas -= cut;
        may_go -= cut;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_stay_percentages_scale_and_round() {
        for (v, total, round_up, want) in [
            (json!(1), 4, true, Some(1)),
            (json!(3), 4, false, Some(3)),
            (json!("25%"), 4, true, Some(1)),
            (json!("25%"), 4, false, Some(1)),
            (json!("25%"), 3, true, Some(1)),
            (json!("25%"), 3, false, Some(0)),
            (json!("25%"), 10, true, Some(3)),
            (json!("25%"), 10, false, Some(2)),
            (json!("0%"), 4, true, Some(0)),
            (json!("100%"), 4, false, Some(4)),
            (json!("150%"), 4, false, Some(6)),
            (json!("25%"), 0, true, Some(0)),
            (json!("30"), 4, true, None),
            (json!("x%"), 4, true, None),
            (json!("-10%"), 4, true, None),
            (json!(-1), 4, true, None),
            (json!(1.5), 4, true, None),
            (Value::Null, 4, true, None),
        ] {
            assert_eq!(scaled(&v, total, round_up), want, "{v} of {total}");
        }
    }

    #[test]
    fn limits_default_to_25_percent_and_never_both_zero() {
        let l = |surge, unavailable| Limits { surge, unavailable };
        for (rolling_update, desired, want) in [
            (json!({}), 4, l(1, 1)),
            (Value::Null, 4, l(1, 1)),
            (
                json!({"maxSurge": "25%", "maxUnavailable": "25%"}),
                4,
                l(1, 1),
            ),
            (json!({}), 10, l(3, 2)),
            (json!({}), 1, l(1, 0)),
            (json!({"maxSurge": 0, "maxUnavailable": 0}), 4, l(0, 1)),
            (
                json!({"maxSurge": "0%", "maxUnavailable": "10%"}),
                4,
                l(0, 1),
            ),
            (json!({"maxSurge": 2, "maxUnavailable": 0}), 4, l(2, 0)),
            (json!({"maxUnavailable": "100%"}), 4, l(1, 4)),
            (json!({"maxUnavailable": 10}), 4, l(1, 4)),
            (json!({"maxSurge": "lots"}), 4, l(1, 1)),
            (json!({}), 0, l(0, 0)),
        ] {
            assert_eq!(
                limits(&rolling_update, desired),
                want,
                "{rolling_update} of {desired}"
            );
        }
    }

    #[test]
    fn the_new_replica_set_grows_within_the_surge() {
        // (desired, surge, all replicas, new replicas) -> new replicas.
        for (desired, surge, all, new, want) in [
            (4, 1, 0, 0, 4),
            (4, 1, 4, 0, 1),
            (4, 1, 5, 1, 1),
            (4, 1, 4, 1, 2),
            (4, 1, 3, 2, 4),
            (4, 1, 4, 4, 4),
            (4, 1, 6, 5, 4),
            (4, 0, 4, 0, 0),
            (4, 0, 3, 0, 1),
            (4, 4, 4, 0, 4),
            (0, 0, 1, 1, 0),
        ] {
            assert_eq!(
                new_replicas(desired, surge, all, new),
                want,
                "desired {desired}, surge {surge}, {all} in all, {new} new"
            );
        }
    }

    #[test]
    fn old_replica_sets_shrink_only_by_what_is_available() {
        // (desired, maxUnavailable, new, old oldest first) -> old replicas.
        for (desired, unavailable, new, old, want) in [
            // Seed 003 (4 replicas, 25%/25%): the first step.
            (4, 1, c(1, 0), vec![c(4, 4)], vec![3]),
            // Two new pods not yet Ready for minReadySeconds: wait.
            (4, 1, c(2, 0), vec![c(3, 3)], vec![3]),
            // They are: two old ones may go.
            (4, 1, c(2, 2), vec![c(3, 3)], vec![1]),
            (4, 1, c(4, 2), vec![c(1, 1)], vec![1]),
            (4, 1, c(4, 4), vec![c(1, 1)], vec![0]),
            // Unavailable old pods go first, within what may be scaled down
            // (5 pods, 3 must stay available, 1 new is not yet).
            (4, 1, c(1, 0), vec![c(4, 2)], vec![3]),
            (4, 1, c(1, 1), vec![c(4, 0)], vec![2]),
            (4, 1, c(0, 0), vec![c(4, 3)], vec![3]),
            // The oldest ReplicaSet shrinks first.
            (4, 1, c(1, 1), vec![c(2, 2), c(2, 2)], vec![0, 2]),
            // maxUnavailable 0: an old pod goes once a new one is available.
            (4, 0, c(1, 0), vec![c(4, 4)], vec![4]),
            (4, 0, c(1, 1), vec![c(4, 4)], vec![3]),
            (4, 1, c(4, 4), vec![], vec![]),
            (4, 1, c(4, 4), vec![c(0, 0)], vec![0]),
        ] {
            assert_eq!(
                old_replicas(desired, unavailable, new, &old),
                want,
                "desired {desired}, maxUnavailable {unavailable}, new {new:?}, old {old:?}"
            );
        }
    }

    /// How many times a rollout from `desired` old pods has to wait for new
    /// pods to become available, when the controller does what it can at
    /// each wait (one step per pass, scale-up first, as Kubernetes does).
    fn waits(desired: i64, limits: Limits) -> usize {
        let mut new = Counts::default();
        let mut old = c(desired, desired);
        for waited in 0..100 {
            loop {
                let all = new.replicas + old.replicas;
                let n = new_replicas(desired, limits.surge, all, new.replicas);
                let o = old_replicas(desired, limits.unavailable, new, &[old])[0];
                if n != new.replicas {
                    new.replicas = n;
                } else if o != old.replicas {
                    old = c(o, old.available.min(o));
                } else {
                    break;
                }
            }
            if old.replicas == 0 && new.available == desired {
                return waited;
            }
            new.available = new.replicas;
        }
        panic!("the rollout never ends: new {new:?}, old {old:?}");
    }

    fn c(replicas: i64, available: i64) -> Counts {
        Counts {
            replicas,
            available,
        }
    }

    #[test]
    fn a_rollout_waits_for_each_wave_of_new_pods() {
        let l = |surge, unavailable| Limits { surge, unavailable };
        for (desired, limits, want) in [
            // Seed 003: two waves of two new pods, each Ready for
            // minReadySeconds before the old ones make room for the next.
            (4, l(1, 1), 2),
            (4, l(0, 1), 4),
            (4, l(1, 0), 4),
            (4, l(4, 0), 1),
            (4, l(2, 2), 1),
            (1, l(1, 0), 1),
        ] {
            assert_eq!(
                waits(desired, limits),
                want,
                "{desired} replicas, {limits:?}"
            );
        }
    }
}
