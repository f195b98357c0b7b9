//! NAT traversal between real libp2p hosts on loopback: a provider with no
//! listen address at all (nothing can dial it) is reachable only through a
//! relay's circuit; xe's relay limits let a tunnel outlive libp2p's
//! default 128 KiB; without a relay server it is unreachable; DCUtR
//! upgrades a relayed connection and the open tunnel survives the upgrade.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xe_net::{ConnPath, Multiaddr, PeerId, Reachability};
use xe_store::Wallet;

async fn relay(enabled: bool) -> TestNode {
    node_with(vec![], |c| c.nat.relay_server = enabled).await
}

/// A provider behind "NAT" (`behind_nat`), bootstrapped to `relay`;
/// `listen` empty means it has no address at all.
async fn provider(
    relay: &TestNode,
    seed: [u8; 32],
    backend: std::net::SocketAddr,
    listen: Vec<Multiaddr>,
) -> TestNode {
    let bootstrap = relay.net.p2p_addrs().await.expect("addrs");
    let wallet = Arc::new(Wallet::from_seed(seed));
    node_with_store(|store, cfg, roles| {
        cfg.listen = listen;
        cfg.bootstrap = bootstrap;
        cfg.nat.behind_nat = true;
        roles.validator = Some(Arc::new(Provider {
            store: store.clone(),
            me: wallet.address(),
            backend,
        }));
        roles.announce = Some(wallet);
    })
    .await
}

/// Wait (bounded) until `node` has at least one relay address.
async fn wait_relay_addrs(node: &TestNode) -> Vec<Multiaddr> {
    let mut w = node.net.nat();
    let info = tokio::time::timeout(
        Duration::from_secs(20),
        w.wait_for(|i| !i.relay_addrs.is_empty()),
    )
    .await
    .expect("relay reservation in time")
    .expect("host alive")
    .clone();
    assert_eq!(info.reachability, Reachability::Private);
    info.relay_addrs
        .iter()
        .map(|a| a.parse().expect("multiaddr"))
        .collect()
}

/// Wait (bounded, on connection events) until `node`'s path to `peer` is `want`.
async fn wait_path(node: &TestNode, peer: PeerId, want: ConnPath) {
    let mut w = node.net.connection_changes();
    let fut = async {
        loop {
            if node.net.path_to(peer).await.expect("path") == want {
                return;
            }
            w.changed().await.expect("host alive");
        }
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .unwrap_or_else(|_| panic!("path to {peer} never became {want}"));
}

#[tokio::test]
async fn a_provider_with_no_address_is_reached_through_the_relay_beyond_default_limits() {
    let r = relay(true).await;
    let pw = Wallet::from_seed([21; 32]);
    let pseed = [21; 32];
    let consumer = Wallet::from_seed([22; 32]);
    let p = provider(&r, pseed, hashing_backend().await, vec![]).await;
    let relay_addrs = wait_relay_addrs(&p).await;
    assert!(
        relay_addrs
            .iter()
            .all(|a| a.to_string().contains("/p2p-circuit")),
        "{relay_addrs:?}"
    );
    assert!(p.net.listen_addrs().await.expect("addrs").is_empty());

    // The gateway has no listen address either and has never met P: the
    // directory entry (gossiped via the relay) is all it knows.
    let g = node_with(r.net.p2p_addrs().await.expect("addrs"), |c| {
        c.listen = vec![]
    })
    .await;
    let mut dir = g.store.subscribe_directory();
    let entry = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(e) = g.store.peer_for_account(&pw.address()).expect("dir")
                && e.addrs.iter().any(|a| a.contains("/p2p-circuit"))
            {
                return e;
            }
            let _ = dir.recv().await;
        }
    })
    .await
    .expect("directory entry with a circuit address reached the gateway");
    assert!(
        entry.addrs[0].contains("/p2p-circuit"),
        "circuit address first: {:?}",
        entry.addrs
    );

    // The provider validates against the store its validator reads.
    let lease = accepted_lease(&p.store, &consumer, &pw, 1);
    let mut t = g
        .net
        .open_tunnel_to_account(&pw.address(), &lease)
        .await
        .expect("tunnel through the relay");
    assert_eq!(t.path(), ConnPath::Relayed);
    // 8 MiB: 64× libp2p's default circuit byte limit (128 KiB).
    let mut data = vec![0u8; 8 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8;
    }
    t.write_all(&data).await.expect("write");
    t.shutdown().await.expect("shutdown");
    let mut digest = Vec::new();
    t.read_to_end(&mut digest).await.expect("digest");
    assert_eq!(digest, Sha256::digest(&data).to_vec(), "byte-exact");

    let peers = g.net.peers().await.expect("peers");
    let to_p = peers
        .iter()
        .find(|x| x.peer_id == p.net.peer_id().to_string())
        .expect("connected to P");
    assert!(to_p.relayed && !to_p.direct, "{to_p:?}");
    let back = p.net.peers().await.expect("peers");
    let to_g = back
        .iter()
        .find(|x| x.peer_id == g.net.peer_id().to_string())
        .expect("P sees G");
    assert!(to_g.relayed && !to_g.direct, "{to_g:?}");
    assert_eq!(p.net.reachability(), Reachability::Private);
}

#[tokio::test]
async fn without_a_relay_server_the_provider_is_unreachable() {
    let r = relay(false).await;
    let pw = Wallet::from_seed([23; 32]);
    let pseed = [23; 32];
    let consumer = Wallet::from_seed([24; 32]);
    let p = provider(&r, pseed, echo_backend().await, vec![]).await;
    wait_peers(&p, 1).await;
    let lease = accepted_lease(&p.store, &consumer, &pw, 1);
    // The address P would have if R relayed: R refuses the circuit.
    let circuit: Multiaddr = format!("{}/p2p-circuit", r.net.p2p_addrs().await.expect("addrs")[0])
        .parse()
        .expect("addr");
    let g = node_with(vec![], |c| c.listen = vec![]).await;
    let e = g
        .net
        .open_tunnel(p.net.peer_id(), vec![circuit], &lease)
        .await
        .expect_err("no relay, no way in");
    assert!(matches!(e, xe_net::TunnelError::DialFailed { .. }), "{e}");
    assert!(p.net.nat().borrow().relay_addrs.is_empty());
}

#[tokio::test]
async fn hole_punch_upgrades_and_the_open_tunnel_survives() {
    let r = relay(true).await;
    let pw = Wallet::from_seed([25; 32]);
    let pseed = [25; 32];
    let consumer = Wallet::from_seed([26; 32]);
    // This time P listens (on loopback), so a hole punch can reach it; the
    // gateway is only told P's circuit address.
    let p = provider(
        &r,
        pseed,
        echo_backend().await,
        vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
    )
    .await;
    let circuit = wait_relay_addrs(&p).await;
    let g = node(vec![]).await;
    let lease = accepted_lease(&p.store, &consumer, &pw, 1);
    let pid = p.net.peer_id();
    let mut t1 = g
        .net
        .open_tunnel(pid, circuit.clone(), &lease)
        .await
        .expect("tunnel");
    assert_ne!(t1.path(), ConnPath::Direct, "first connection is relayed");
    // DCUtR adds a direct connection; the relayed one stays while t1 is open.
    wait_path(&g, pid, ConnPath::DirectAndRelayed).await;
    t1.write_all(b"still here after the upgrade")
        .await
        .expect("write");
    let mut buf = [0u8; 28];
    t1.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"still here after the upgrade");
    assert_eq!(
        g.net.path_to(pid).await.expect("path"),
        ConnPath::DirectAndRelayed,
        "relayed connection kept while a tunnel may use it"
    );
    // Last tunnel gone: the relayed connection is closed; new tunnels go direct.
    drop(t1);
    wait_path(&g, pid, ConnPath::Direct).await;
    let mut t2 = g
        .net
        .open_tunnel(pid, circuit, &lease)
        .await
        .expect("tunnel");
    assert_eq!(t2.path(), ConnPath::Direct);
    t2.write_all(b"direct").await.expect("write");
    let mut b2 = [0u8; 6];
    t2.read_exact(&mut b2).await.expect("read");
    assert_eq!(&b2, b"direct");
}
