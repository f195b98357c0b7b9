//! Shared fixtures: real libp2p hosts on loopback, each with its own sled store.
#![allow(dead_code)]

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use xe_net::{
    Multiaddr, NetConfig, NetHandle, NetRoles, PeerId, TunnelRefusal, TunnelValidator, VmConn,
};
use xe_store::{Lease, LeaseEvent, LeaseHash, Store, Wallet};

#[allow(unused_imports)] // each test binary uses a different subset
pub use xe_testkit::{UNUSED_VM_HOST_KEY, wait_state};

pub struct TestNode {
    pub net: NetHandle,
    pub store: Store,
    pub cancel: CancellationToken,
    pub tasks: tokio::task::JoinSet<()>,
    pub _dir: tempfile::TempDir,
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub async fn node_with(bootstrap: Vec<Multiaddr>, tweak: impl FnOnce(&mut NetConfig)) -> TestNode {
    node_with_store(|_, cfg, _| {
        cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
        cfg.bootstrap = bootstrap;
        tweak(cfg);
    })
    .await
}

/// A node with a fresh store and key, configured by `setup`, which also
/// sees the store (a provider's validator reads it).
pub async fn node_with_store(
    setup: impl FnOnce(&Store, &mut NetConfig, &mut NetRoles),
) -> TestNode {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("db")).expect("store");
    let key = xe_net::load_or_create_keypair(&dir.path().join("p2p_key")).expect("key");
    let mut cfg = NetConfig::default();
    let mut roles = NetRoles::new(key);
    setup(&store, &mut cfg, &mut roles);
    let cancel = CancellationToken::new();
    let net = xe_net::start(roles, cfg, store.clone(), cancel.clone())
        .await
        .expect("start");
    TestNode {
        net: net.handle,
        store,
        cancel,
        tasks: net.tasks,
        _dir: dir,
    }
}

pub async fn node(bootstrap: Vec<Multiaddr>) -> TestNode {
    node_with(bootstrap, |_| {}).await
}

/// Wait (bounded) until `node` is connected to at least `n` peers.
pub async fn wait_peers(node: &TestNode, n: usize) {
    xe_testkit::wait_peers(node.net.peer_count(), n).await;
}

/// Terms whose hash depends only on the wallets and `n` (created now): the
/// same lease can be created in several stores.
pub fn lease_for(consumer: &Wallet, provider: &Wallet, n: u8) -> Lease {
    let access = xe_store::AccessPubKey(Wallet::from_seed([3; 32]).public_key().0);
    Lease {
        nonce: [n; 16],
        ..xe_testkit::terms(
            consumer,
            provider.address(),
            access,
            xe_store::now_secs(),
            3600,
        )
    }
}

pub fn accepted_lease(store: &Store, consumer: &Wallet, provider: &Wallet, n: u8) -> LeaseHash {
    let create = LeaseEvent::create(consumer, lease_for(consumer, provider, n));
    let hash = create.lease_hash();
    store.apply_event(&create).expect("create");
    store
        .apply_event(&LeaseEvent::accept(
            provider,
            hash,
            xe_store::now_secs(),
            UNUSED_VM_HOST_KEY.into(),
        ))
        .expect("accept");
    hash
}

pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}

/// A provider's validator backed by a real store and a real TCP backend:
/// accepted leases of `me` are served by dialling `backend`.
pub struct Provider {
    pub store: Store,
    pub me: xe_store::AccountAddress,
    pub backend: std::net::SocketAddr,
}

#[async_trait::async_trait]
impl TunnelValidator for Provider {
    async fn validate_tunnel_lease(
        &self,
        lease: &LeaseHash,
        _peer: &PeerId,
    ) -> Result<(), TunnelRefusal> {
        xe_net::tunnel::lease_for_tunnel(&self.store, lease, &self.me)
    }
    async fn until_inactive(&self, lease: &LeaseHash) -> xe_store::Inactive {
        self.store.until_inactive(lease).await
    }
    async fn dial_ssh(&self, _lease: &LeaseHash) -> Result<Box<dyn VmConn>, TunnelRefusal> {
        let s = tokio::net::TcpStream::connect(self.backend)
            .await
            .map_err(|e| TunnelRefusal::VmUnreachable(e.to_string()))?;
        Ok(Box::new(s))
    }
}

/// Serve every connection to a fresh loopback listener with `conn`, each
/// in a task of its own.
async fn backend<F, Fut>(conn: F) -> std::net::SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(conn(s));
        }
    });
    addr
}

/// A TCP echo backend standing in for a VM's sshd; it passes EOF on.
pub async fn echo_backend() -> std::net::SocketAddr {
    backend(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// A backend that hashes everything it receives, then answers with the
/// 32-byte SHA-256 digest and closes.
pub async fn hashing_backend() -> std::net::SocketAddr {
    backend(|mut s| async move {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => h.update(&buf[..n]),
            }
        }
        let _ = s.write_all(&h.finalize()).await;
        let _ = s.shutdown().await;
    })
    .await
}
