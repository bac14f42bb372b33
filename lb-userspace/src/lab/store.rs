//! The lab's object store: JSON objects by kind, namespace and name, one
//! resourceVersion counter, and a bounded history of events so that a watch
//! can resume from a resourceVersion, or get `410 Gone` when it is too old.

use std::{
    collections::{BTreeMap, VecDeque},
    ops::Bound,
    sync::{Arc, Mutex, MutexGuard},
};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::{admission, kinds::Kind};

/// How many events are kept for resuming watches.
const HISTORY: usize = 50_000;

#[derive(Clone, Debug)]
pub struct Event {
    pub kind: Kind,
    /// ADDED, MODIFIED or DELETED.
    pub event_type: &'static str,
    /// Shared with the store and every watch it goes to: an event is
    /// copied to each subscriber, an object never.
    pub object: Arc<Value>,
    pub rv: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
    /// A request the server cannot read (400), as opposed to an object it
    /// read and refuses (Invalid, 422).
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    UnsupportedMedia(String),
    #[error("resourceVersion {0} is too old")]
    Gone(u64),
    #[error("the object has been modified; please apply your changes to the latest version")]
    Conflict,
}

impl StoreError {
    pub fn code(&self) -> u16 {
        match self {
            StoreError::NotFound(_) => 404,
            StoreError::AlreadyExists(_) | StoreError::Conflict => 409,
            StoreError::Invalid(_) => 422,
            StoreError::BadRequest(_) => 400,
            StoreError::UnsupportedMedia(_) => 415,
            StoreError::Gone(_) => 410,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::NotFound(_) => "NotFound",
            StoreError::AlreadyExists(_) => "AlreadyExists",
            StoreError::Conflict => "Conflict",
            StoreError::Invalid(_) => "Invalid",
            StoreError::BadRequest(_) => "BadRequest",
            StoreError::UnsupportedMedia(_) => "UnsupportedMediaType",
            StoreError::Gone(_) => "Expired",
        }
    }

    /// A `Status` object, as the API server returns errors.
    pub fn status(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.to_string(), "reason": self.reason(), "code": self.code()})
    }
}

pub type Key = (Kind, String, String);

/// Which page of a list: at most `limit` objects, after `after`
/// (the first page's resourceVersion, and the last namespace and name sent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRequest {
    pub limit: usize,
    pub after: Option<(u64, String, String)>,
}

#[derive(Default)]
pub struct Inner {
    pub rv: u64,
    /// Each object as written, shared with the events and lists that carry
    /// it (kube-apiserver's watch cache shares objects the same way): a list
    /// of 10,000 objects copies 10,000 pointers under the lock, not trees.
    pub objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Event>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest_rv: u64,
    uid: u64,
    /// The uids of the objects present: the garbage collector's question.
    pub uids: std::collections::HashSet<String>,
    /// Allocated ClusterIPs -> (namespace, name) of their Service.
    pub cluster_ips: BTreeMap<std::net::Ipv4Addr, (String, String)>,
}

impl Inner {
    pub fn list(&self, kind: Kind, ns: Option<&str>) -> Vec<&Value> {
        let first = Bound::Included((kind, String::new(), String::new()));
        self.list_from(kind, ns, first).map(|v| &**v).collect()
    }

    /// `list`, shared: what a watch sends as its first ADDED events, held
    /// without copying while it is sent.
    pub fn list_shared(&self, kind: Kind, ns: Option<&str>) -> Vec<Arc<Value>> {
        let first = Bound::Included((kind, String::new(), String::new()));
        self.list_from(kind, ns, first).cloned().collect()
    }

    /// Objects of `kind` (in `ns`, or all) in key order, from `start` on.
    fn list_from<'a, 'n>(
        &'a self,
        kind: Kind,
        ns: Option<&'n str>,
        start: Bound<Key>,
    ) -> impl Iterator<Item = &'a Arc<Value>> + use<'a, 'n> {
        // Keys sort by kind, then namespace: one namespace is one range.
        let start = match (ns, start) {
            (Some(ns), Bound::Included((_, n, _)) | Bound::Excluded((_, n, _)))
                if n.as_str() < ns =>
            {
                Bound::Included((kind, ns.to_string(), String::new()))
            }
            (_, start) => start,
        };
        self.objects
            .range((start, Bound::Unbounded))
            .take_while(move |((k, n, _), _)| *k == kind && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v)
    }

    /// Objects of `kind` in `ns` whose names start with `prefix`.
    pub fn with_prefix<'a>(
        &'a self,
        kind: Kind,
        ns: &'a str,
        prefix: &'a str,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        let start = (kind, ns.to_string(), prefix.to_string());
        self.objects
            .range(start..)
            .take_while(move |((k, n, name), _)| *k == kind && n == ns && name.starts_with(prefix))
            .map(|(_, v)| &**v)
    }

    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(kind, ns.to_string(), name.to_string()))
            .map(|v| &**v)
    }
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<Event>,
    /// Closing every open watch (fault injection): bump to end them all.
    pub watch_epoch: Arc<tokio::sync::watch::Sender<u64>>,
    /// The API server is "gone" (fault injection): every request fails.
    down: Arc<std::sync::atomic::AtomicBool>,
    /// Streaming lists refused, as Kubernetes 1.33 does with its WatchList
    /// feature gate off by default (fault injection).
    no_watch_list: Arc<std::sync::atomic::AtomicBool>,
}

pub fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or("")
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner::default())),
            events: broadcast::channel(65_536).0,
            watch_epoch: Arc::new(tokio::sync::watch::channel(0).0),
            down: Arc::default(),
            no_watch_list: Arc::default(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (each write
        // is a single insert), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn record(&self, inner: &mut Inner, kind: Kind, event_type: &'static str, object: Arc<Value>) {
        if kind == Kind::Service {
            if let Ok(ip) = object["spec"]["clusterIP"].as_str().unwrap_or("").parse() {
                if event_type == "DELETED" {
                    inner.cluster_ips.remove(&ip);
                } else {
                    let owner = (
                        meta_str(&object, "namespace").to_string(),
                        meta_str(&object, "name").to_string(),
                    );
                    inner.cluster_ips.insert(ip, owner);
                }
            }
        }
        let uid = meta_str(&object, "uid");
        if event_type == "DELETED" {
            inner.uids.remove(uid);
        } else if !uid.is_empty() && !inner.uids.contains(uid) {
            inner.uids.insert(uid.to_string());
        }
        let ev = Event {
            kind,
            event_type,
            object,
            rv: inner.rv,
        };
        inner.history.push_back(ev.clone());
        while inner.history.len() > HISTORY {
            if let Some(old) = inner.history.pop_front() {
                inner.oldest_rv = old.rv;
            }
        }
        let _ = self.events.send(ev);
    }

    /// Creates an object. Fills in namespace, uid, resourceVersion and
    /// creationTimestamp, and runs admission (ClusterIP/NodePort allocation).
    pub fn create(&self, kind: Kind, mut obj: Value) -> Result<Value, StoreError> {
        let mut inner = self.lock();
        normalise(kind, &mut obj)?;
        let ns = meta_str(&obj, "namespace").to_string();
        let name = meta_str(&obj, "name").to_string();
        if kind.namespaced() && kind != Kind::Event && inner.get(Kind::Namespace, "", &ns).is_none()
        {
            return Err(StoreError::NotFound(format!("namespaces \"{ns}\"")));
        }
        let key = (kind, ns, name.clone());
        if inner.objects.contains_key(&key) {
            return Err(StoreError::AlreadyExists(format!(
                "{} \"{name}\"",
                kind.plural()
            )));
        }
        admission::admit(kind, &mut obj, None, &inner)?;
        inner.rv += 1;
        inner.uid += 1;
        let rv = inner.rv;
        let uid = inner.uid;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        obj["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{uid:012x}"));
        obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
        obj["metadata"]["generation"] = json!(1);
        let obj = Arc::new(obj);
        inner.objects.insert(key, obj.clone());
        self.record(&mut inner, kind, "ADDED", obj.clone());
        Ok(Arc::unwrap_or_clone(obj))
    }

    /// Replaces an object. A resourceVersion in `obj`, if any, must match.
    pub fn replace(&self, kind: Kind, mut obj: Value) -> Result<Value, StoreError> {
        let mut inner = self.lock();
        normalise(kind, &mut obj)?;
        let key = (
            kind,
            meta_str(&obj, "namespace").to_string(),
            meta_str(&obj, "name").to_string(),
        );
        let Some(old) = inner.objects.get(&key).cloned() else {
            return Err(StoreError::NotFound(format!(
                "{} \"{}\"",
                kind.plural(),
                key.2
            )));
        };
        let given_rv = meta_str(&obj, "resourceVersion");
        if !given_rv.is_empty() && given_rv != meta_str(&old, "resourceVersion") {
            return Err(StoreError::Conflict);
        }
        admission::admit(kind, &mut obj, Some(&*old), &inner)?;
        // Fields the server owns stay as they were.
        for f in ["uid", "creationTimestamp", "deletionTimestamp"] {
            if obj["metadata"].get(f).is_none() && !old["metadata"][f].is_null() {
                obj["metadata"][f] = old["metadata"][f].clone();
            }
        }
        let generation = old["metadata"]["generation"].as_u64().unwrap_or(1);
        obj["metadata"]["generation"] = json!(if obj["spec"] != old["spec"] {
            generation + 1
        } else {
            generation
        });
        if obj == *old {
            return Ok(Arc::unwrap_or_clone(old));
        }
        inner.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        let obj = Arc::new(obj);
        inner.objects.insert(key, obj.clone());
        self.record(&mut inner, kind, "MODIFIED", obj.clone());
        Ok(Arc::unwrap_or_clone(obj))
    }

    /// Removes an object at once.
    pub fn delete(&self, kind: Kind, ns: &str, name: &str) -> Result<Value, StoreError> {
        let mut inner = self.lock();
        let key = (kind, ns.to_string(), name.to_string());
        let Some(obj) = inner.objects.remove(&key) else {
            return Err(StoreError::NotFound(format!(
                "{} \"{name}\"",
                kind.plural()
            )));
        };
        inner.rv += 1;
        let mut obj = Arc::unwrap_or_clone(obj);
        obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        let obj = Arc::new(obj);
        self.record(&mut inner, kind, "DELETED", obj.clone());
        Ok(Arc::unwrap_or_clone(obj))
    }

    /// Deletion as the API server does it for Pods: mark with a
    /// deletionTimestamp and let the kubelet finish; other kinds go at once.
    pub fn request_delete(&self, kind: Kind, ns: &str, name: &str) -> Result<Value, StoreError> {
        if kind != Kind::Pod {
            return self.delete(kind, ns, name);
        }
        let mut obj = self.get(kind, ns, name)?;
        if obj["metadata"]
            .get("deletionTimestamp")
            .is_some_and(|v| !v.is_null())
        {
            return Ok(obj);
        }
        obj["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
        obj["metadata"]["resourceVersion"] = json!("");
        self.replace(kind, obj)
    }

    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Result<Value, StoreError> {
        self.lock()
            .get(kind, ns, name)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("{} \"{name}\"", kind.plural())))
    }

    pub fn list(&self, kind: Kind, ns: Option<&str>) -> (Vec<Value>, u64) {
        let inner = self.lock();
        (
            inner.list(kind, ns).into_iter().cloned().collect(),
            inner.rv,
        )
    }

    /// One page of a list, as kube-apiserver pages with `limit` and
    /// `continue`: up to `limit` objects of `kind` (in `ns`, or all) that
    /// `keep` admits, after the object named `after` (namespace, name),
    /// whether more follow, and the resourceVersion of the list's first
    /// page (`snapshot_rv`, or now for a first page). Later pages show the
    /// objects as they are now: a change between pages comes again to the
    /// watch that resumes at the first page's version, so a client sees
    /// every object at its latest state either way. `Gone` when that
    /// version's history is compacted away (kube-apiserver's "continue
    /// token too old").
    pub fn list_page(
        &self,
        kind: Kind,
        ns: Option<&str>,
        page: &PageRequest,
        keep: impl Fn(&Value) -> bool,
    ) -> Result<(Vec<Arc<Value>>, bool, u64), StoreError> {
        let inner = self.lock();
        let rv = match &page.after {
            Some((rv, _, _)) if *rv < inner.oldest_rv => return Err(StoreError::Gone(*rv)),
            Some((rv, _, _)) => *rv,
            None => inner.rv,
        };
        let start = match &page.after {
            Some((_, n, name)) => Bound::Excluded((kind, n.clone(), name.clone())),
            None => Bound::Included((kind, String::new(), String::new())),
        };
        let mut matching = inner.list_from(kind, ns, start).filter(|v| keep(v));
        let items: Vec<Arc<Value>> = matching.by_ref().take(page.limit).cloned().collect();
        let more = matching.next().is_some();
        Ok((items, more, rv))
    }

    /// Events after `rv` for a watch, and a receiver for later ones; both
    /// taken under the lock so nothing falls between them.
    pub fn watch_from(
        &self,
        rv: u64,
    ) -> Result<(Vec<Event>, broadcast::Receiver<Event>), StoreError> {
        let inner = self.lock();
        if rv < inner.oldest_rv {
            return Err(StoreError::Gone(rv));
        }
        let backlog = inner
            .history
            .iter()
            .filter(|e| e.rv > rv)
            .cloned()
            .collect();
        Ok((backlog, self.events.subscribe()))
    }

    /// Forgets the event history: every watch resuming from an earlier
    /// resourceVersion gets 410 Gone (fault injection).
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.history.clear();
        inner.oldest_rv = inner.rv;
    }

    /// Takes the API server away (every request fails, open watches end)
    /// or brings it back (fault injection). The store itself stays usable,
    /// as etcd does while an API server restarts.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
        if down {
            self.drop_watches();
        }
    }

    pub fn is_down(&self) -> bool {
        self.down.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Serves streaming lists (`sendInitialEvents`, Kubernetes 1.32 and
    /// 1.34 on) or refuses them with 422 as 1.33 does (fault injection).
    pub fn set_watch_list(&self, on: bool) {
        self.no_watch_list
            .store(!on, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn watch_list(&self) -> bool {
        !self.no_watch_list.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Ends every open watch stream (fault injection).
    pub fn drop_watches(&self) {
        self.watch_epoch.send_modify(|e| *e += 1);
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }
}

/// Sets apiVersion/kind, defaults the namespace, checks the name.
fn normalise(kind: Kind, obj: &mut Value) -> Result<(), StoreError> {
    if !obj.is_object() {
        return Err(StoreError::Invalid("object is not a JSON object".into()));
    }
    obj["apiVersion"] = json!(kind.api_version());
    obj["kind"] = json!(kind.name());
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    if kind.namespaced() {
        if meta_str(obj, "namespace").is_empty() {
            obj["metadata"]["namespace"] = json!("default");
        }
    } else if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("namespace");
    }
    let name = meta_str(obj, "name");
    if name.is_empty()
        || name.len() > 253
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return Err(StoreError::Invalid(format!(
            "{} name {name:?} is not a valid DNS subdomain",
            kind.name()
        )));
    }
    Ok(())
}

pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Seconds since the epoch as the API writes times: whole seconds, UTC.
pub fn rfc3339(secs: u64) -> String {
    // Civil date from days since epoch (Howard Hinnant's algorithm).
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The whole seconds since the epoch of a UTC time as `rfc3339` writes it
/// (a fraction of a second, if any, is dropped, as the API drops it).
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let num = |t: &str| t.parse::<i64>().ok();
    let mut ymd = date.splitn(3, '-').map(num);
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let time = time.split_once('.').map_or(time, |(whole, _)| whole);
    let mut hms = time.splitn(3, ':').map(num);
    let (hh, mm, ss) = (hms.next()??, hms.next()??, hms.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days since epoch from the civil date (the inverse of `rfc3339`'s).
    let y = y - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(items: &[Arc<Value>]) -> Vec<&str> {
        items.iter().map(|o| meta_str(o, "name")).collect()
    }

    #[test]
    fn a_list_comes_in_pages_that_resume_after_the_last_name_and_keep_the_first_version() {
        let store = Store::new();
        for name in ["a", "b", "c", "d", "e"] {
            store
                .create(Kind::Namespace, json!({"metadata": {"name": name}}))
                .expect("namespace");
        }
        let first = PageRequest {
            limit: 2,
            after: None,
        };
        let (items, more, rv) = store
            .list_page(Kind::Namespace, None, &first, |_| true)
            .expect("first page");
        assert_eq!((names(&items), more), (vec!["a", "b"], true));
        // A change between pages: the deleted object is not listed, and the
        // version stays the first page's (the watch resumes from there).
        store.delete(Kind::Namespace, "", "c").expect("delete");
        let next = PageRequest {
            limit: 2,
            after: Some((rv, String::new(), "b".into())),
        };
        let (items, more, rv2) = store
            .list_page(Kind::Namespace, None, &next, |_| true)
            .expect("second page");
        assert_eq!((names(&items), more, rv2), (vec!["d", "e"], false, rv));
        let only_e = store
            .list_page(Kind::Namespace, None, &first, |o| {
                meta_str(o, "name") == "e"
            })
            .expect("filtered");
        assert_eq!((names(&only_e.0), only_e.1), (vec!["e"], false));
        store.compact();
        assert!(matches!(
            store.list_page(Kind::Namespace, None, &next, |_| true),
            Err(StoreError::Gone(_))
        ));
    }

    #[test]
    fn times_are_written_and_read_back_in_whole_seconds() {
        for (secs, text) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (951_868_800, "2000-03-01T00:00:00Z"),
            (1_767_522_030, "2026-01-04T10:20:30Z"),
            (4_107_542_399, "2100-02-28T23:59:59Z"),
        ] {
            assert_eq!(rfc3339(secs), text);
            assert_eq!(parse_rfc3339(text), Some(secs), "{text}");
        }
        assert_eq!(
            parse_rfc3339("2026-01-04T10:20:30.999Z"),
            Some(1_767_522_030)
        );
        for bad in [
            "",
            "2026-01-04",
            "2026-01-04T10:20:30",
            "2026-13-04T10:20:30Z",
            "2026-01-04T10:61:30Z",
            "2026-01-04T10:20:30+01:00",
            "x026-01-04T10:20:30Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }
}
