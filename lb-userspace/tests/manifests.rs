//! The shipped manifests: every object is a valid Kubernetes object of its
//! kind with no unknown field (each is decoded into its k8s-openapi type and
//! must encode back to everything it said); the ClusterRole grants exactly
//! what the agent's watchers and event recorder use; the DaemonSet, its
//! ConfigMap and the agent's settings agree with each other.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde_json::Value;

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// The YAML files under `dir`, but its `kustomization.yaml` (kustomize's
/// own, not an object).
fn object_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .filter(|p| p.file_stem().is_none_or(|s| s != "kustomization"))
        .collect();
    files.sort();
    files
}

/// Every document of every object file under `dir`, with its file name.
fn documents(dir: &Path) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for f in object_files(dir) {
        let text = std::fs::read_to_string(&f).unwrap();
        let docs = lb::yaml::documents(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        out.extend(docs.into_iter().map(|v| (f.display().to_string(), v)));
    }
    out
}

/// Paths in `original` that `decoded` lost or changed: unknown fields, or
/// values the type does not hold as written.
fn lost_fields(original: &Value, decoded: &Value, path: &str, out: &mut Vec<String>) {
    match (original, decoded) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => lost_fields(v, w, &p, out),
                    // An empty value the type leaves out says nothing.
                    None if v.is_null() || v == &Value::Object(Default::default()) => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost_fields(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

fn decode<T>(doc: &Value) -> Result<Value, String>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

/// Checks one object against the API type of its kind.
fn validate(doc: &Value) -> Result<(), String> {
    use k8s_openapi::api::{
        apps::v1::{Deployment, ReplicaSet},
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    };
    let kind = (
        doc["apiVersion"].as_str().unwrap_or(""),
        doc["kind"].as_str().unwrap_or(""),
    );
    let decoded = match kind {
        ("apps/v1", "DaemonSet") => decode::<DaemonSet>(doc),
        ("apps/v1", "Deployment") => decode::<Deployment>(doc),
        ("apps/v1", "ReplicaSet") => decode::<ReplicaSet>(doc),
        ("v1", "ServiceAccount") => decode::<ServiceAccount>(doc),
        ("v1", "ConfigMap") => decode::<ConfigMap>(doc),
        ("v1", "Namespace") => decode::<Namespace>(doc),
        ("v1", "Pod") => decode::<Pod>(doc),
        ("v1", "Service") => decode::<Service>(doc),
        ("discovery.k8s.io/v1", "EndpointSlice") => decode::<EndpointSlice>(doc),
        ("networking.k8s.io/v1", "NetworkPolicy") => decode::<NetworkPolicy>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => decode::<ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => decode::<ClusterRoleBinding>(doc),
        (v, k) => return Err(format!("unknown kind {v}/{k}")),
    }?;
    let mut lost = Vec::new();
    lost_fields(doc, &decoded, "", &mut lost);
    if lost.is_empty() {
        Ok(())
    } else {
        Err(format!("unknown or mistyped fields: {}", lost.join(", ")))
    }
}

#[test]
fn every_manifest_is_a_valid_object_of_its_kind() {
    let mut checked = 0;
    for dir in ["install", "demo"] {
        for (file, doc) in documents(&manifests_dir().join(dir)) {
            let name = doc["metadata"]["name"].as_str().unwrap_or("?").to_string();
            if let Err(e) = validate(&doc) {
                panic!("{file}: {} {name}: {e}", doc["kind"]);
            }
            checked += 1;
        }
    }
    // rbac (3), configmap, daemonset; the demo's Deployment, Service, Pods, policy.
    assert!(checked >= 9, "only {checked} objects found");
}

#[test]
fn the_check_catches_a_misspelt_field_and_a_wrong_type() {
    let (_, mut ds) = documents(&manifests_dir().join("install"))
        .into_iter()
        .find(|(_, d)| d["kind"] == "DaemonSet")
        .unwrap();
    assert_eq!(validate(&ds), Ok(()));
    ds["spec"]["template"]["spec"]["hostNetwrok"] = Value::Bool(true);
    let err = validate(&ds).unwrap_err();
    assert!(err.contains(".spec.template.spec.hostNetwrok"), "{err}");
    ds["spec"]["template"]["spec"]
        .as_object_mut()
        .unwrap()
        .remove("hostNetwrok");
    ds["spec"]["template"]["spec"]["hostNetwork"] = Value::String("yes".into());
    assert!(validate(&ds).is_err());
    assert!(validate(&serde_json::json!({"apiVersion": "v1", "kind": "Frobnicator"})).is_err());
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct KindCluster {
    kind: String,
    api_version: String,
    networking: KindNetworking,
    nodes: Vec<KindNode>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KindNetworking {
    kube_proxy_mode: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KindNode {
    role: String,
}

#[test]
fn the_kind_cluster_has_no_kube_proxy() {
    let text = std::fs::read_to_string(manifests_dir().join("kind/cluster.yaml")).unwrap();
    let c: KindCluster = lb::yaml::from_str(&text).unwrap();
    assert_eq!(c.kind, "Cluster");
    assert_eq!(c.api_version, "kind.x-k8s.io/v1alpha4");
    assert_eq!(c.networking.kube_proxy_mode, "none");
    assert!(c.nodes.iter().filter(|n| n.role == "worker").count() >= 1);
}

fn install_object<T: serde::de::DeserializeOwned>(kind: &str) -> T {
    let (_, doc) = documents(&manifests_dir().join("install"))
        .into_iter()
        .find(|(_, d)| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in manifests/install"));
    serde_json::from_value(doc).unwrap()
}

#[test]
fn the_cluster_role_grants_exactly_what_the_agent_uses() {
    let role: ClusterRole = install_object("ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{rule:?}"
        );
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let mut used = BTreeSet::new();
    for (group, resource) in lb::agent::WATCHED {
        for verb in ["get", "list", "watch"] {
            used.insert((group.to_string(), resource.to_string(), verb.to_string()));
        }
    }
    for verb in ["create", "patch"] {
        let (group, resource) = lb::agent::EVENTS;
        used.insert((group.to_string(), resource.to_string(), verb.to_string()));
    }
    let extra: Vec<_> = granted.difference(&used).collect();
    let missing: Vec<_> = used.difference(&granted).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "ClusterRole grants more than the agent uses: {extra:?}; lacks: {missing:?}"
    );

    let binding: ClusterRoleBinding = install_object("ClusterRoleBinding");
    let sa: ServiceAccount = install_object("ServiceAccount");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(binding.role_ref.name), role.metadata.name);
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
}

#[test]
fn the_daemon_set_runs_the_agent_with_least_privilege() {
    let ds: DaemonSet = install_object("DaemonSet");
    let sa: ServiceAccount = install_object("ServiceAccount");
    let cm: ConfigMap = install_object("ConfigMap");
    let spec = ds.spec;
    assert_eq!(
        spec.update_strategy.and_then(|u| u.type_).as_deref(),
        Some("RollingUpdate")
    );
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(ds.metadata.namespace, sa.metadata.namespace);
    let c = &pod.containers[0];

    // Capabilities, not privileged.
    let sc = c.security_context.clone().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    let added: BTreeSet<String> = caps.add.unwrap_or_default().into_iter().collect();
    let want: BTreeSet<String> = ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"]
        .map(String::from)
        .into();
    assert_eq!(added, want);

    // NODE_NAME from the downward API.
    let env = c.env.clone().unwrap_or_default();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );

    // The settings file: mounted from the ConfigMap where --config says.
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(args[0], "agent");
    let config_arg = args
        .iter()
        .position(|a| a == "--config")
        .map(|i| PathBuf::from(&args[i + 1]))
        .unwrap();
    let data = cm.data.clone().unwrap();
    let file = config_arg.file_name().unwrap().to_str().unwrap();
    let settings: Value = lb::yaml::from_str(&data[file]).unwrap();
    let volumes = pod.volumes.clone().unwrap_or_default();
    let mounts = c.volume_mounts.clone().unwrap_or_default();
    let mount_of = |path: &Path| {
        mounts
            .iter()
            .filter(|m| path.starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("nothing mounted at {}", path.display()))
    };
    let volume = |name: &str| volumes.iter().find(|v| v.name == name).unwrap();
    let cfg_volume = volume(&mount_of(&config_arg).name);
    assert_eq!(
        cfg_volume.config_map.as_ref().map(|c| c.name.as_str()),
        cm.metadata.name.as_deref()
    );

    // bpffs where the maps are pinned, the host's /proc/sys/net writable,
    // and the cgroup hierarchy.
    let pin_dir = PathBuf::from(settings["pin-dir"].as_str().unwrap());
    let bpffs = volume(&mount_of(&pin_dir).name);
    assert_eq!(bpffs.host_path.as_ref().unwrap().path, "/sys/fs/bpf");
    let sysctl = PathBuf::from(settings["proc-sys-net"].as_str().unwrap());
    let m = mount_of(&sysctl);
    assert_ne!(m.read_only, Some(true));
    assert_eq!(
        volume(&m.name).host_path.as_ref().unwrap().path,
        "/proc/sys/net"
    );
    assert!(volumes.iter().any(|v| v
        .host_path
        .as_ref()
        .is_some_and(|h| h.path == "/sys/fs/cgroup")));

    // Probes on the agent's health endpoints, on the port it serves.
    let port: i32 = settings["metrics-addr"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    for (probe, path) in [
        (c.readiness_probe.clone(), "/readyz"),
        (c.liveness_probe.clone(), "/healthz"),
    ] {
        let get = probe.and_then(|p| p.http_get).unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port)
        );
    }
}

/// `(apiVersion, kind, namespace, name)` -> object.
fn by_identity(docs: impl IntoIterator<Item = Value>) -> std::collections::BTreeMap<String, Value> {
    docs.into_iter()
        .map(|d| {
            let m = &d["metadata"];
            let id = format!(
                "{} {} {}/{}",
                d["apiVersion"].as_str().unwrap_or(""),
                d["kind"].as_str().unwrap_or(""),
                m["namespace"].as_str().unwrap_or(""),
                m["name"].as_str().unwrap_or("")
            );
            (id, d)
        })
        .collect()
}

/// The objects `kubectl kustomize DIR` renders (the real kubectl, which
/// these machines have on the PATH).
fn kustomize(dir: &Path) -> Vec<Value> {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("running kubectl kustomize (kubectl must be on the PATH)");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    lb::yaml::documents(&String::from_utf8_lossy(&out.stdout)).unwrap()
}

fn kustomization(dir: &Path) -> Value {
    lb::yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap()).unwrap()
}

#[test]
fn the_kustomization_lists_every_install_file() {
    let dir = manifests_dir().join("install");
    let listed: BTreeSet<String> = kustomization(&dir)["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let files: BTreeSet<String> = object_files(&dir)
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        listed, files,
        "a file left out of resources: is silently not installed"
    );
}

#[test]
fn kubectl_apply_k_installs_exactly_the_validated_objects() {
    let dir = manifests_dir().join("install");
    let rendered = by_identity(kustomize(&dir));
    let files = by_identity(documents(&dir).into_iter().map(|(_, d)| d));
    assert_eq!(
        rendered.keys().collect::<Vec<_>>(),
        files.keys().collect::<Vec<_>>()
    );
    for (id, doc) in &rendered {
        assert_eq!(doc, &files[id], "{id} differs once rendered");
        validate(doc).unwrap_or_else(|e| panic!("{id} as rendered: {e}"));
    }
}

#[test]
fn an_overlay_sets_the_image_in_one_place() {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kz-{}", std::process::id()));
    let (base, overlay) = (root.join("install"), root.join("overlay"));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(&overlay).unwrap();
    for entry in std::fs::read_dir(manifests_dir().join("install")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, base.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        overlay.join("kustomization.yaml"),
        "resources: [../install]\nimages:\n  - name: localhost/lb\n    newName: ghcr.io/example/lb\n    newTag: \"0.2.0\"\n",
    )
    .unwrap();
    let rendered = by_identity(kustomize(&overlay));
    let plain = by_identity(kustomize(&base));
    std::fs::remove_dir_all(&root).unwrap();
    assert_eq!(rendered.len(), plain.len());
    for (id, doc) in &rendered {
        let mut want = plain[id].clone();
        if doc["kind"] == "DaemonSet" {
            // The agent and its CNI installer run the same image.
            for list in ["containers", "initContainers"] {
                assert_eq!(
                    doc["spec"]["template"]["spec"][list][0]["image"], "ghcr.io/example/lb:0.2.0",
                    "{list}"
                );
                want["spec"]["template"]["spec"][list][0]["image"] =
                    "ghcr.io/example/lb:0.2.0".into();
            }
        }
        assert_eq!(doc, &want, "{id}: only the image may change");
    }
}
