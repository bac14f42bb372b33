//! Kubernetes Events on the objects the agent could not program (a Service
//! with a bad port, a policy with a bad CIDR...), so that `kubectl describe`
//! says why. Each distinct problem is published once per agent, in the
//! background: a slow or absent API server never holds up the data path.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    runtime::events::{Event, EventType, Recorder, Reporter},
    Client,
};

use crate::translate::ObjectError;

/// The reference to the object an error names (`Kind namespace/name`).
pub fn object_reference(error: &ObjectError) -> Option<ObjectReference> {
    let (kind, rest) = error.object.split_once(' ')?;
    let (namespace, name) = match rest.split_once('/') {
        Some((ns, name)) => (Some(ns.to_string()), name),
        None => (None, rest),
    };
    let api_version = match kind {
        "Service" | "Pod" | "Namespace" | "Node" => "v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        "NetworkPolicy" => "networking.k8s.io/v1",
        _ => return None,
    };
    Some(ObjectReference {
        api_version: Some(api_version.into()),
        kind: Some(kind.into()),
        namespace,
        name: Some(name.to_string()),
        ..Default::default()
    })
}

pub struct EventPublisher {
    recorder: Recorder,
    published: BTreeSet<(String, String)>,
}

impl EventPublisher {
    pub fn new(client: Client, node_name: Option<&str>) -> Self {
        let reporter = Reporter {
            controller: "lb-agent".into(),
            instance: node_name.map(str::to_string),
        };
        Self {
            recorder: Recorder::new(client, reporter),
            published: BTreeSet::new(),
        }
    }

    /// Publishes a Warning for each error not published before; forgets the
    /// ones that went away (so a problem that comes back is told again).
    pub fn sync(&mut self, errors: &[&ObjectError]) {
        let now: BTreeSet<(String, String)> = errors
            .iter()
            .map(|e| (e.object.clone(), e.message.clone()))
            .collect();
        for e in errors {
            let key = (e.object.clone(), e.message.clone());
            if self.published.contains(&key) {
                continue;
            }
            let Some(reference) = object_reference(e) else {
                continue;
            };
            let recorder = self.recorder.clone();
            let event = Event {
                type_: EventType::Warning,
                reason: "NotProgrammed".into(),
                note: Some(truncate(&e.message, 1024)),
                action: "Program".into(),
                secondary: None,
            };
            let object = e.object.clone();
            tokio::spawn(async move {
                if let Err(err) = recorder.publish(&event, &reference).await {
                    tracing::debug!("event on {object}: {err}");
                }
            });
        }
        self.published = now;
    }
}

/// Events carry at most 1 kB of note.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_kind_group_namespace_and_name() {
        let r = |object: &str| {
            object_reference(&ObjectError {
                object: object.into(),
                message: String::new(),
            })
        };
        let np = r("NetworkPolicy x/bad-cidr").unwrap();
        assert_eq!(np.api_version.as_deref(), Some("networking.k8s.io/v1"));
        assert_eq!(np.namespace.as_deref(), Some("x"));
        assert_eq!(np.name.as_deref(), Some("bad-cidr"));
        let slice = r("EndpointSlice default/web-abc").unwrap();
        assert_eq!(slice.api_version.as_deref(), Some("discovery.k8s.io/v1"));
        assert_eq!(r("Gadget a/b"), None);
        assert_eq!(r("garbage"), None);
    }

    #[test]
    fn notes_are_cut_at_a_character_boundary() {
        assert_eq!(truncate("ééé", 3), "é");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
