//! The lab's cluster DNS server: what the kube-dns pod runs (`lb lab dns`).
//! It watches Services, EndpointSlices and Namespaces through the lab's API
//! server, as CoreDNS does, and answers on UDP and TCP port 53 of the pod's
//! network namespace (sockets opened inside it, the process itself stays on
//! the host, where the API server listens on loopback).

use std::{
    net::{TcpListener as StdTcpListener, UdpSocket as StdUdpSocket},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    runtime::{reflector, watcher, WatchStreamExt},
    Api, Client,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Notify,
};

use super::dns::{self, Zone};

type Shared = Arc<RwLock<Arc<Zone>>>;

fn watch<K>(api: Api<K>, changed: Arc<Notify>) -> reflector::Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while stream.next().await.is_some() {
            changed.notify_one();
        }
    });
    reader
}

fn current(zone: &Shared) -> Arc<Zone> {
    zone.read().map(|z| z.clone()).unwrap_or_default()
}

async fn serve_udp(sock: UdpSocket, zone: Shared) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(resp) = dns::respond(&current(&zone), &buf[..n]) {
            let _ = sock.send_to(&resp, peer).await;
        }
    }
}

/// DNS over TCP: each message after its two-byte length.
async fn serve_tcp_conn(mut conn: TcpStream, zone: Shared) -> std::io::Result<()> {
    loop {
        let len = match conn.read_u16().await {
            Ok(l) => usize::from(l),
            Err(_) => return Ok(()),
        };
        let mut msg = vec![0u8; len];
        conn.read_exact(&mut msg).await?;
        let Some(resp) = dns::respond(&current(&zone), &msg) else {
            return Ok(());
        };
        let len = u16::try_from(resp.len()).unwrap_or(u16::MAX);
        conn.write_u16(len).await?;
        conn.write_all(&resp).await?;
    }
}

pub async fn run(netns: String, kubeconfig: PathBuf) -> Result<()> {
    let client: Client = crate::agent::client(Some(&kubeconfig)).await?;
    let changed = Arc::new(Notify::new());
    let services = watch(Api::<Service>::all(client.clone()), changed.clone());
    let slices = watch(Api::<EndpointSlice>::all(client.clone()), changed.clone());
    let namespaces = watch(Api::<Namespace>::all(client), changed.clone());
    for ready in [
        services.wait_until_ready().await,
        slices.wait_until_ready().await,
        namespaces.wait_until_ready().await,
    ] {
        ready.context("watch ended")?;
    }
    let zone: Shared = Arc::default();
    let rebuild = {
        let zone = zone.clone();
        move || {
            let svcs = services.state();
            let sls = slices.state();
            let built = Zone::from_objects(
                svcs.iter().map(|s| s.as_ref()),
                sls.iter().map(|s| s.as_ref()),
                namespaces
                    .state()
                    .iter()
                    .filter_map(|n| n.metadata.name.clone()),
            );
            if let Ok(mut z) = zone.write() {
                *z = Arc::new(built);
            }
        }
    };
    rebuild();
    tokio::spawn(async move {
        loop {
            changed.notified().await;
            // A burst of changes is one rebuild (at 10,000 Services a
            // rebuild reads them all: at most five a second).
            tokio::time::sleep(Duration::from_millis(200)).await;
            rebuild();
        }
    });
    let (udp, tcp) = crate::netns::run_in(&netns, || -> std::io::Result<_> {
        let udp = StdUdpSocket::bind(("0.0.0.0", 53))?;
        let tcp = StdTcpListener::bind(("0.0.0.0", 53))?;
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        Ok((udp, tcp))
    })?
    .with_context(|| format!("binding port 53 in {netns}"))?;
    let udp = UdpSocket::from_std(udp)?;
    let tcp = TcpListener::from_std(tcp)?;
    tokio::spawn(serve_udp(udp, zone.clone()));
    // The kubelet waits for this line before it reports the pod ready.
    println!("ready");
    eprintln!("cluster DNS for {} on port 53 (UDP, TCP)", dns::DOMAIN);
    loop {
        if let Ok((conn, _)) = tcp.accept().await {
            tokio::spawn(serve_tcp_conn(conn, zone.clone()));
        }
    }
}
