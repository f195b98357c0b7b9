//! Fixtures: in-process nodes on loopback, the API on a `127.0.0.1:0`
//! listener, a raw HTTP/1.1 client, signed leases, and waits on real
//! events (store subscriptions, the peer-count watch) — never sleeps.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::path::Path;

use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use xe_api::{ApiConfig, ApiContext, ApiHandle};
use xe_net::Multiaddr;
use xe_node::{Capacity, Node, NodeConfig, ProvideConfig, VmBackend};
use xe_store::{AccessPubKey, AccountAddress, LeaseHash, Store, Wallet};

#[allow(unused_imports)] // each test binary uses a different subset
pub use xe_testkit::{
    LIMIT, SSH, SSHD, UNUSED_VM_HOST_KEY, init_tracing, openssh_available, terms, wait_state,
};

/// A node on loopback TCP; a provider on the sshd backend if `provide`.
pub async fn start_node(dir: &Path, provide: bool, bootstrap: Vec<Multiaddr>) -> Node {
    let mut cfg = NodeConfig::new(dir.to_path_buf());
    cfg.net.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
    cfg.net.bootstrap = bootstrap;
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

/// Apply create (and accept by `provider`, if given) to `store` only.
pub fn local_lease(
    store: &Store,
    consumer: &Wallet,
    provider: &Wallet,
    access: AccessPubKey,
    accepted_at: Option<u64>,
    duration: u64,
) -> LeaseHash {
    xe_testkit::apply_lease(
        store,
        consumer,
        provider,
        access,
        accepted_at,
        duration,
        UNUSED_VM_HOST_KEY,
    )
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
    xe_testkit::wait_peers(node.net.peer_count(), n).await;
}
