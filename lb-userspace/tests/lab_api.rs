//! The lab's API server through kube-rs, as the agent uses it: CRUD, list,
//! watch from a resourceVersion, 410 Gone after compaction, dropped watches
//! and a reflector that recovers from both.

mod common;

use std::time::Duration;

use common::kubectl::{rows, Kubectl};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::{
    api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams},
    runtime::{reflector, watcher, WatchStreamExt},
    Client,
};
use lb::lab::{apiserver, kinds::Kind, kubeconfig, store::Store};
use serde_json::json;

async fn serve() -> (Store, Client, tempdir::Dir) {
    let store = Store::new();
    store
        .create(Kind::Namespace, json!({"metadata": {"name": "default"}}))
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = apiserver::router(store.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempdir::Dir::new();
    let path = dir.0.join("kubeconfig");
    std::fs::write(&path, kubeconfig(port)).unwrap();
    let client = lb::agent::client(Some(&path)).await.unwrap();
    (store, client, dir)
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("lb-lab-api-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn service(name: &str) -> Service {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"ports": [{"port": 80}], "selector": {"app": name}}})).unwrap()
}

#[tokio::test]
async fn crud_and_list_through_kube_rs() {
    let (_store, client, _dir) = serve().await;
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let created = api
        .create(&PostParams::default(), &service("web"))
        .await
        .unwrap();
    let ip = created
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .unwrap();
    assert!(ip.starts_with("10.96."), "allocated {ip}");
    let err = api
        .create(&PostParams::default(), &service("web"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err:?}"
    );

    let mut changed = created.clone();
    changed.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 81;
    let replaced = api
        .replace("web", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert_eq!(
        replaced.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some(ip.as_str()),
        "clusterIP kept"
    );
    assert_ne!(
        replaced.metadata.resource_version,
        created.metadata.resource_version
    );

    let list = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    api.delete("web", &DeleteParams::default()).await.unwrap();
    assert!(api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());
    let missing: Api<Namespace> = Api::all(client);
    assert!(matches!(missing.get("nope").await, Err(kube::Error::Api(s)) if s.code == 404));
}

#[tokio::test]
async fn watch_resumes_from_a_resource_version_and_gets_410_after_compaction() {
    let (store, client, _dir) = serve().await;
    let api: Api<Service> = Api::namespaced(client, "default");
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    api.create(&PostParams::default(), &service("a"))
        .await
        .unwrap();
    api.delete("a", &DeleteParams::default()).await.unwrap();

    // Resuming from before the two writes replays both.
    let events: Vec<_> = api
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .unwrap()
        .take(2)
        .try_collect()
        .await
        .unwrap();
    assert!(
        matches!(&events[0], WatchEvent::Added(s) if s.metadata.name.as_deref() == Some("a")),
        "{events:?}"
    );
    assert!(matches!(&events[1], WatchEvent::Deleted(_)), "{events:?}");

    // After compaction the same resourceVersion is too old.
    store.compact();
    let mut stream = api
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .unwrap()
        .boxed();
    match stream.next().await {
        Some(Ok(WatchEvent::Error(e))) => assert_eq!(e.code, 410),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
}

/// A streaming list (`sendInitialEvents`): the objects as ADDED events, the
/// bookmark that ends them at the state's resourceVersion, then the changes
/// after it; refused with 422 while the WatchList feature is off, as
/// Kubernetes 1.33 refuses it.
#[tokio::test]
async fn a_streaming_list_sends_the_state_then_its_end_and_is_refused_with_watch_list_off() {
    let (store, client, _dir) = serve().await;
    let api: Api<Service> = Api::namespaced(client, "default");
    for name in ["a", "b"] {
        api.create(&PostParams::default(), &service(name))
            .await
            .unwrap();
    }
    let mut stream = api
        .watch(&WatchParams::streaming_lists().timeout(5), "0")
        .await
        .unwrap()
        .boxed();
    let mut added = vec![];
    let end_rv = loop {
        match stream.next().await {
            Some(Ok(WatchEvent::Added(s))) => added.push(s.metadata.name.unwrap()),
            Some(Ok(WatchEvent::Bookmark(b))) => {
                assert_eq!(
                    b.metadata
                        .annotations
                        .get("k8s.io/initial-events-end")
                        .map(String::as_str),
                    Some("true"),
                    "{:?}",
                    b.metadata.annotations
                );
                break b.metadata.resource_version;
            }
            other => panic!("expected ADDED events and the end bookmark, got {other:?}"),
        }
    };
    assert_eq!(added, ["a", "b"]);
    assert_eq!(end_rv, store.current_rv().to_string());
    api.delete("a", &DeleteParams::default()).await.unwrap();
    loop {
        match stream.next().await {
            // The periodic ones.
            Some(Ok(WatchEvent::Bookmark(_))) => continue,
            Some(Ok(WatchEvent::Deleted(s))) => {
                assert_eq!(s.metadata.name.as_deref(), Some("a"));
                break;
            }
            other => panic!("expected the deletion after the state, got {other:?}"),
        }
    }

    store.set_watch_list(false);
    match api
        .watch(&WatchParams::streaming_lists().timeout(5), "0")
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(s.message.contains("WatchList"), "{s:?}");
        }
        Ok(_) => panic!("a streaming list was served with WatchList off"),
        Err(e) => panic!("expected 422, got {e:?}"),
    }
    // Bookmarks and resourceVersionMatch=NotOlderThan are required, as
    // kube-apiserver requires them.
    // (kube-rs checks both itself: the request is written by hand.)
    store.set_watch_list(true);
    for query in [
        "sendInitialEvents=true&resourceVersionMatch=NotOlderThan",
        "sendInitialEvents=true&allowWatchBookmarks=true",
    ] {
        let request = axum::http::Request::get(format!(
            "/api/v1/namespaces/default/services?watch=true&{query}"
        ))
        .body(vec![])
        .unwrap();
        match api.clone().into_client().request_text(request).await {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 422, "{query}: {s:?}"),
            other => panic!("{query}: expected 422, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn reflector_recovers_from_dropped_watches_and_410() {
    let (store, client, _dir) = serve().await;
    let api: Api<Service> = Api::namespaced(client, "default");
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api.clone(), watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    tokio::spawn(stream.for_each(|_| async {}));
    reader.wait_until_ready().await.unwrap();

    let wait_for = |want: &'static [&'static str]| {
        let reader = reader.clone();
        async move {
            let mut names = vec![];
            for _ in 0..100 {
                names = reader
                    .state()
                    .iter()
                    .filter_map(|s| s.metadata.name.clone())
                    .collect::<Vec<_>>();
                names.sort();
                if names == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("reflector has {names:?}, wanted {want:?}");
        }
    };
    api.create(&PostParams::default(), &service("a"))
        .await
        .unwrap();
    wait_for(&["a"]).await;
    store.drop_watches();
    api.create(&PostParams::default(), &service("b"))
        .await
        .unwrap();
    wait_for(&["a", "b"]).await;
    // The next watch resumes from a resourceVersion that compaction made
    // too old: the reflector must relist and drop "a".
    store.compact();
    store.drop_watches();
    api.create(&PostParams::default(), &service("c"))
        .await
        .unwrap();
    api.delete("a", &DeleteParams::default()).await.unwrap();
    wait_for(&["b", "c"]).await;
}

/// Runs the real kubectl (on the PATH, as users run it) against the lab's
/// API server, with a HOME of its own (kubectl caches discovery there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_discovers_the_labs_resources_and_reads_objects_through_them() {
    let (store, client, dir) = serve().await;
    let k = Kubectl::at(dir.0.join("kubeconfig"), dir.0.clone());
    Api::<Service>::namespaced(client, "default")
        .create(&PostParams::default(), &service("web"))
        .await
        .unwrap();
    // Aggregated discovery, as kubectl asks for it first.
    let resources = k.run(&["api-resources", "--no-headers"]).await;
    for (plural, short, group_version, kind) in [
        ("services", "svc", "v1", "Service"),
        ("pods", "po", "v1", "Pod"),
        ("namespaces", "ns", "v1", "Namespace"),
        ("deployments", "deploy", "apps/v1", "Deployment"),
        ("replicasets", "rs", "apps/v1", "ReplicaSet"),
        (
            "networkpolicies",
            "netpol",
            "networking.k8s.io/v1",
            "NetworkPolicy",
        ),
    ] {
        let line = resources
            .lines()
            .find(|l| l.split_whitespace().next() == Some(plural))
            .unwrap_or_else(|| panic!("{plural} not in:\n{resources}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        assert!(
            words.contains(&short) && words.contains(&group_version) && words.contains(&kind),
            "{line}"
        );
    }
    assert!(resources
        .lines()
        .any(|l| l.starts_with("endpointslices") && l.contains("discovery.k8s.io/v1")));
    // Short names resolve, and objects come back as the store has them.
    assert_eq!(
        k.run(&["get", "svc", "-o", "name"]).await.trim(),
        "service/web"
    );
    assert_eq!(
        k.run(&["get", "svc", "web", "-o", "jsonpath={.spec.ports[0].port}"])
            .await,
        "80"
    );
    assert!(k
        .run(&["get", "ns", "-o", "name"])
        .await
        .lines()
        .any(|l| l == "namespace/default"));
    assert!(k
        .run(&["get", "netpol", "-A", "-o", "name"])
        .await
        .trim()
        .is_empty());
    // Server-side printing: the columns kube-apiserver prints.
    let svc = store.get(Kind::Service, "default", "web").unwrap();
    let cluster_ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    let table = rows(&k.run(&["get", "svc"]).await);
    assert_eq!(
        table[0],
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ]
    );
    assert_eq!(
        table[1][..5],
        ["web", "ClusterIP", cluster_ip.as_str(), "<none>", "80/TCP"]
    );
    let wide = rows(&k.run(&["get", "svc", "web", "-o", "wide"]).await);
    assert_eq!(wide[0].last().map(String::as_str), Some("SELECTOR"));
    assert_eq!(wide[1].last().map(String::as_str), Some("app=web"));
    let namespaces = rows(&k.run(&["get", "ns"]).await);
    assert_eq!(namespaces[0], ["NAME", "STATUS", "AGE"]);
    assert!(namespaces
        .iter()
        .any(|r| r.len() == 3 && r[0] == "default" && r[1] == "Active"));
    // The legacy form, which a plain JSON Accept gets.
    let core: serde_json::Value =
        serde_json::from_str(&k.run(&["get", "--raw", "/api/v1"]).await).unwrap();
    assert_eq!(core["kind"], "APIResourceList");
    assert!(core["resources"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "services" && r["shortNames"] == json!(["svc"])));
}
