//! A node refuses to start on a TCP or UDP port another node already
//! listens on (libp2p binds with SO_REUSEPORT, so both would start and
//! share connections at random).

mod common;

use common::*;
use tokio_util::sync::CancellationToken;
use xe_net::{Multiaddr, NetConfig, NetError, NetRoles};
use xe_store::Store;

#[tokio::test]
async fn a_taken_listen_port_fails_the_start_with_address_in_use() {
    let first = node_with(vec![], |c| {
        c.listen = vec![
            "/ip4/127.0.0.1/tcp/0".parse().expect("addr"),
            "/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("addr"),
        ];
    })
    .await;
    let taken: Vec<Multiaddr> = first.net.listen_addrs().await.expect("addrs");
    assert_eq!(taken.len(), 2, "{taken:?}");
    for addr in taken {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(&dir.path().join("db")).expect("store");
        let key = xe_net::load_or_create_keypair(&dir.path().join("p2p_key")).expect("key");
        let mut cfg = NetConfig::default();
        let roles = NetRoles::new(key);
        cfg.listen = vec![addr.clone()];
        let cancel = CancellationToken::new();
        let r = xe_net::start(roles, cfg, store, cancel.clone()).await;
        cancel.cancel();
        match r {
            Err(NetError::Listen(a, why)) => {
                assert_eq!(a, addr);
                assert!(why.contains("already listens there"), "{why}");
            }
            Err(e) => panic!("{addr}: wrong error {e}"),
            Ok(_) => panic!("a second node started on {addr}"),
        }
    }
}
