//! Shared fixtures: real libp2p hosts on loopback, each with its own sled store.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use xe_net::{Multiaddr, NetConfig, NetHandle};
use xe_store::{Lease, LeaseEvent, LeaseHash, LeaseState, Store, Wallet};

pub const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOZkcJ0O9Yl3MY5Wa7sObHRBuqoN2Ig0tGuo6dU2dQmD vm";

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
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("db")).expect("store");
    let key = xe_net::load_or_create_keypair(&dir.path().join("p2p_key")).expect("key");
    let mut cfg = NetConfig::new(key);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
    cfg.bootstrap = bootstrap;
    tweak(&mut cfg);
    let cancel = CancellationToken::new();
    let net = xe_net::start(cfg, store.clone(), cancel.clone())
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
    let mut w = node.net.peer_count();
    tokio::time::timeout(Duration::from_secs(20), w.wait_for(|c| *c >= n))
        .await
        .expect("peers connected in time")
        .expect("host alive");
}

/// Wait (bounded) until `store` holds `lease` in `state`, driven by the
/// store's change notifications rather than polling.
pub async fn wait_state(store: &Store, lease: &LeaseHash, state: LeaseState) {
    let mut rx = store.subscribe();
    let check = |s: &Store| s.lease(lease).expect("read").map(|r| r.state()) == Some(state);
    let fut = async {
        loop {
            if check(store) {
                return;
            }
            match rx.recv().await {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("store closed: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .unwrap_or_else(|_| panic!("lease {} did not reach {state} in time", lease.short()));
}

pub fn lease_for(consumer: &Wallet, provider: &Wallet, n: u8) -> Lease {
    Lease {
        consumer: consumer.public_key(),
        provider: provider.address(),
        vcpus: 1,
        memory_mb: 512,
        disk_gb: 1,
        duration: 3600,
        access_pub_key: xe_store::AccessPubKey(Wallet::from_seed([3; 32]).public_key().0),
        created_at: xe_store::now_secs(),
        nonce: [n; 16],
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
            HOST_KEY.into(),
        ))
        .expect("accept");
    hash
}

pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}
