//! Fixtures: in-process nodes on loopback, the API on a `127.0.0.1:0`
//! listener, a raw HTTP/1.1 client, signed leases, and waits on real
//! events (store subscriptions, the peer-count watch) — never sleeps.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use xe_api::{ApiConfig, ApiContext, ApiHandle};
use xe_net::Multiaddr;
use xe_node::{Capacity, Node, NodeConfig, ProvideConfig, VmBackend};
use xe_store::{
    AccessPubKey, AccountAddress, Lease, LeaseEvent, LeaseHash, LeaseState, Store, Wallet, now_secs,
};

/// Bound on every wait in these tests.
pub const LIMIT: Duration = Duration::from_secs(60);

pub const SSHD: &str = "/usr/sbin/sshd";
pub const SSH: &str = "/usr/bin/ssh";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// Whether real OpenSSH (client and server) is installed. Without it the
/// calling test is skipped loudly, or fails when `XE_REQUIRE_SSHD=1`.
pub fn openssh_available(test: &str) -> bool {
    let missing: Vec<&str> = [SSHD, SSH]
        .into_iter()
        .filter(|b| !Path::new(b).is_file())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("XE_REQUIRE_SSHD").as_deref() == Ok("1") {
        panic!("{test}: XE_REQUIRE_SSHD=1 but OpenSSH is missing: {missing:?}");
    }
    eprintln!(
        "SKIPPED {test}: OpenSSH missing ({missing:?}); set XE_REQUIRE_SSHD=1 to make this a failure"
    );
    false
}

/// A node on loopback TCP; a provider on the sshd backend if `provide`.
pub async fn start_node(dir: &Path, provide: bool, bootstrap: Vec<Multiaddr>) -> Node {
    let mut cfg = NodeConfig::new(dir.to_path_buf());
    cfg.p2p_listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
    cfg.bootstrap = bootstrap;
    if provide {
        cfg.provide = Some(ProvideConfig {
            backend: VmBackend::Sshd {
                sshd: Some(SSHD.into()),
            },
            capacity: Capacity::default(),
        });
    }
    Node::start(cfg).await.expect("start node")
}

/// A running API server; stops when dropped.
pub struct Api {
    pub addr: SocketAddr,
    pub handle: ApiHandle,
    cancel: CancellationToken,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub async fn start_api(ctx: ApiContext, config: ApiConfig) -> Api {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind api");
    let addr = listener.local_addr().expect("api addr");
    let cancel = CancellationToken::new();
    let (handle, fut) = xe_api::start(listener, ctx, config, cancel.clone()).expect("start api");
    tokio::spawn(fut);
    Api {
        addr,
        handle,
        cancel,
    }
}

impl Api {
    pub fn client(&self) -> xe_api::client::ApiClient {
        xe_api::client::ApiClient::new(format!("http://{}", self.addr).parse().expect("url"))
    }
}

/// One raw HTTP/1.1 exchange.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `error` text of a JSON error body.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field in {:?}", self.json()))
            .to_string()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn http(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Resp {
    let work = async {
        let tcp = TcpStream::connect(addr).await.expect("connect api");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("http handshake");
        tokio::spawn(conn);
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string());
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("request");
        let resp = send.send_request(req).await.expect("send request");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("read body").to_bytes();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    };
    tokio::time::timeout(LIMIT, work)
        .await
        .expect("HTTP exchange timed out")
}

pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    http(addr, Method::GET, path, &[], None).await
}

pub async fn post_json(addr: SocketAddr, path: &str, body: &impl serde::Serialize) -> Resp {
    http(
        addr,
        Method::POST,
        path,
        &[("content-type", "application/json")],
        Some(serde_json::to_vec(body).expect("json")),
    )
    .await
}

/// The fresh form's headers as text: `X-Timestamp`, `X-Nonce`, `X-Node`.
pub type FreshHeaders = (String, String, String);

/// The fresh form's headers of `auth` (which must be fresh).
pub fn fresh_headers(auth: &xe_api::auth::TunnelAuth) -> FreshHeaders {
    let f = auth.fresh.as_ref().expect("a fresh signature");
    (
        f.timestamp.to_string(),
        hex::encode(f.nonce),
        f.node.clone(),
    )
}

/// The headers of a tunnel request: signature, the fresh form's three if
/// given, and the upgrade pair unless `upgrade` is false.
pub fn tunnel_headers(
    sig: &str,
    fresh: Option<&FreshHeaders>,
    upgrade: bool,
) -> Vec<(&'static str, String)> {
    let mut h = vec![("x-signature", sig.to_string())];
    if let Some((ts, nonce, node)) = fresh {
        h.push(("x-timestamp", ts.clone()));
        h.push(("x-nonce", nonce.clone()));
        h.push(("x-node", node.clone()));
    }
    if upgrade {
        h.push(("connection", "Upgrade".into()));
        h.push(("upgrade", "xe-tunnel".into()));
    }
    h
}

pub async fn post_tunnel(
    addr: SocketAddr,
    lease: &str,
    headers: &[(&'static str, String)],
) -> Resp {
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    http(
        addr,
        Method::POST,
        &format!("/tunnel/{lease}/tcp"),
        &h,
        None,
    )
    .await
}

/// Lease terms for `consumer` at `provider`, created at `created_at`.
pub fn terms(
    consumer: &Wallet,
    provider: AccountAddress,
    access: AccessPubKey,
    created_at: u64,
    duration: u64,
) -> Lease {
    Lease {
        consumer: consumer.public_key(),
        provider,
        vcpus: 1,
        memory_mb: 512,
        disk_gb: 1,
        duration,
        access_pub_key: access,
        created_at,
        nonce: rand::random(),
    }
}

/// A host key line for leases whose VM is never contacted.
pub const UNUSED_VM_HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOZkcJ0O9Yl3MY5Wa7sObHRBuqoN2Ig0tGuo6dU2dQmD";

/// Apply create (and accept by `provider`, if given) to `store` only.
pub fn local_lease(
    store: &Store,
    consumer: &Wallet,
    provider: &Wallet,
    access: AccessPubKey,
    accepted_at: Option<u64>,
    duration: u64,
) -> LeaseHash {
    let created = accepted_at.unwrap_or_else(now_secs);
    let ev = LeaseEvent::create(
        consumer,
        terms(consumer, provider.address(), access, created, duration),
    );
    let hash = ev.lease_hash();
    store.apply_event(&ev).expect("apply create");
    if let Some(at) = accepted_at {
        store
            .apply_event(&LeaseEvent::accept(
                provider,
                hash,
                at,
                UNUSED_VM_HOST_KEY.into(),
            ))
            .expect("apply accept");
    }
    hash
}

/// Wait until `store` holds `lease` in `state`.
pub async fn wait_state(store: &Store, lease: &LeaseHash, state: LeaseState) {
    let mut rx = store.subscribe();
    let work = async {
        loop {
            if let Ok(Some(r)) = store.lease(lease)
                && r.state() == state
            {
                return;
            }
            // Any change (or a lag) is a reason to look again.
            let _ = rx.recv().await;
        }
    };
    tokio::time::timeout(LIMIT, work).await.unwrap_or_else(|_| {
        panic!(
            "lease {} did not reach {state} within {LIMIT:?}",
            lease.short()
        )
    });
}

/// Wait until `store` has an unexpired directory entry for `account`.
pub async fn wait_directory(store: &Store, account: &AccountAddress) {
    let mut rx = store.subscribe_directory();
    let work = async {
        loop {
            if let Ok(Some(_)) = store.peer_for_account(account) {
                return;
            }
            let _ = rx.recv().await;
        }
    };
    tokio::time::timeout(LIMIT, work).await.unwrap_or_else(|_| {
        panic!(
            "no directory entry for {} within {LIMIT:?}",
            account.short()
        )
    });
}

/// Wait until `node` has at least `n` connected peers.
pub async fn wait_peers(node: &Node, n: usize) {
    let mut rx = node.net.peer_count();
    tokio::time::timeout(LIMIT, rx.wait_for(|c| *c >= n))
        .await
        .expect("peers did not connect in time")
        .expect("peer watch closed");
}
