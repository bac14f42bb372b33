//! Small helpers over JSON objects shared by the lab's controllers.

use std::time::Duration;

use serde_json::{json, Value};

use super::store::{meta_str, parse_rfc3339};

pub fn is_terminating(obj: &Value) -> bool {
    !obj["metadata"]["deletionTimestamp"].is_null()
}

pub fn pod_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// Since when (seconds since the epoch) the pod has been Ready, if it is:
/// the Ready condition's lastTransitionTime, set by the kubelet.
pub fn ready_since(pod: &Value) -> Option<u64> {
    let ready = pod["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready" && c["status"] == "True")?;
    parse_rfc3339(ready["lastTransitionTime"].as_str()?)
}

/// Ready for longer than `min_ready_secs` at `now` (time since the epoch),
/// as Kubernetes' `IsPodAvailable`: with `minReadySeconds` 0 a Ready pod is
/// available at once; otherwise its Ready condition's lastTransitionTime
/// (whole seconds) plus `minReadySeconds` must be before `now`.
pub fn pod_available(pod: &Value, min_ready_secs: u64, now: Duration) -> bool {
    if !pod_ready(pod) {
        return false;
    }
    min_ready_secs == 0
        || ready_since(pod).is_some_and(|since| Duration::from_secs(since + min_ready_secs) < now)
}

/// Every `key: value` of `selector` is among `labels`; an empty selector
/// matches everything.
pub fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Name of the owner of kind `kind`, if any.
pub fn owner<'a>(obj: &'a Value, kind: &str) -> Option<&'a str> {
    obj["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|o| o["kind"] == kind)
        .and_then(|o| o["name"].as_str())
}

pub fn owner_ref(owner: &Value) -> Value {
    json!([{"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta_str(owner, "name"),
            "uid": meta_str(owner, "uid"), "controller": true}])
}

/// FNV-1a, for stable short names derived from content.
pub fn short_hash(s: &str, hex_len: usize) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let full = format!("{h:016x}");
    full[..hex_len.min(16)].to_string()
}

/// A random suffix of lowercase letters and digits, as pod names have.
pub fn random_suffix(len: usize) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut x = STATE.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed) ^ seed;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x % ALPHABET.len() as u64) as usize] as char
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ready: &str, since: Option<&str>) -> Value {
        let mut c = json!({"type": "Ready", "status": ready});
        if let Some(t) = since {
            c["lastTransitionTime"] = json!(t);
        }
        json!({"status": {"conditions": [{"type": "PodScheduled", "status": "True"}, c]}})
    }

    #[test]
    fn a_pod_is_available_once_it_has_been_ready_for_min_ready_seconds() {
        // 2026-01-04T10:20:30Z.
        let t = 1_767_522_030;
        let at = |secs: u64, millis: u64| Duration::from_millis(secs * 1000 + millis);
        let since = Some("2026-01-04T10:20:30Z");
        for (pod, min_ready, now, available) in [
            (pod("False", since), 0, at(t + 60, 0), false),
            (pod("True", since), 0, at(t, 0), true),
            (pod("True", None), 0, at(t, 0), true),
            (pod("True", since), 5, at(t + 4, 999), false),
            // Exactly minReadySeconds is not yet "before now".
            (pod("True", since), 5, at(t + 5, 0), false),
            (pod("True", since), 5, at(t + 5, 1), true),
            (pod("True", None), 5, at(t + 60, 0), false),
            (pod("True", Some("garbage")), 5, at(t + 60, 0), false),
        ] {
            assert_eq!(
                pod_available(&pod, min_ready, now),
                available,
                "{pod} with minReadySeconds {min_ready} at {now:?}"
            );
        }
    }
}
