//! The API kinds the lab serves, and where they live in the URL space.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    Endpoints,
    EndpointSlice,
    NetworkPolicy,
    Deployment,
    ReplicaSet,
    Event,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::Service,
        Kind::Endpoints,
        Kind::EndpointSlice,
        Kind::NetworkPolicy,
        Kind::Deployment,
        Kind::ReplicaSet,
        Kind::Event,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::Endpoints => "Endpoints",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Deployment => "Deployment",
            Kind::ReplicaSet => "ReplicaSet",
            Kind::Event => "Event",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::Endpoints => "endpoints",
            Kind::EndpointSlice => "endpointslices",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::Deployment => "deployments",
            Kind::ReplicaSet => "replicasets",
            Kind::Event => "events",
        }
    }

    /// `apiVersion` as written in objects.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Namespace
            | Kind::Node
            | Kind::Pod
            | Kind::Service
            | Kind::Endpoints
            | Kind::Event => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::NetworkPolicy => "networking.k8s.io/v1",
            Kind::Deployment | Kind::ReplicaSet => "apps/v1",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }

    /// The singular resource name discovery gives (`kubectl get service`).
    pub fn singular(self) -> String {
        self.name().to_ascii_lowercase()
    }

    /// The short names kube-apiserver gives the kind (`kubectl get svc`).
    pub fn short_names(self) -> &'static [&'static str] {
        match self {
            Kind::Namespace => &["ns"],
            Kind::Node => &["no"],
            Kind::Pod => &["po"],
            Kind::Service => &["svc"],
            Kind::Endpoints => &["ep"],
            Kind::EndpointSlice => &[],
            Kind::NetworkPolicy => &["netpol"],
            Kind::Deployment => &["deploy"],
            Kind::ReplicaSet => &["rs"],
            Kind::Event => &["ev"],
        }
    }

    /// Category `all` (`kubectl get all`), as kube-apiserver puts these in it.
    pub fn in_category_all(self) -> bool {
        matches!(
            self,
            Kind::Pod | Kind::Service | Kind::Deployment | Kind::ReplicaSet
        )
    }

    /// Whether the lab serves `.../NAME/status` for the kind as
    /// kube-apiserver does (the lab's status writes go through it).
    pub fn has_status(self) -> bool {
        !matches!(
            self,
            Kind::Endpoints | Kind::EndpointSlice | Kind::NetworkPolicy | Kind::Event
        )
    }

    /// Whether the lab serves `.../NAME/scale` (autoscaling/v1 Scale), as
    /// `kubectl scale` uses.
    pub fn has_scale(self) -> bool {
        matches!(self, Kind::Deployment | Kind::ReplicaSet)
    }

    /// Finds a kind by apiVersion and kind (as in a manifest). events.k8s.io
    /// Events are stored with core Events.
    pub fn from_manifest(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| {
            k.name() == kind
                && (k.api_version() == api_version
                    || (kind == "Event" && api_version == "events.k8s.io/v1"))
        })
    }

    /// Finds a kind by URL group/version and plural.
    pub fn from_path(group_version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| {
            k.plural() == plural
                && (k.api_version() == group_version
                    || (*k == Kind::Event && group_version == "events.k8s.io/v1"))
        })
    }
}
