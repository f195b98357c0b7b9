//! Lease events and directory entries spread over gossip and sync between
//! real hosts on loopback, each with its own sled store.

mod common;

use std::sync::Arc;

use common::*;
use xe_net::replication::GossipMessage;
use xe_store::{LeaseEvent, LeaseState, Wallet, now_secs};

/// Five nodes in a line-and-star shape; events created at different nodes
/// reach all; an accept that arrives before its create is kept and applied.
#[tokio::test]
async fn events_from_different_nodes_reach_everyone() {
    let hub = node(vec![]).await;
    let hub_addrs = hub.net.p2p_addrs().await.expect("addrs");
    let mut nodes = vec![hub];
    for _ in 0..4 {
        nodes.push(node(hub_addrs.clone()).await);
    }
    wait_peers(&nodes[0], 4).await;
    let consumer = Wallet::from_seed([1; 32]);
    let provider = Wallet::from_seed([2; 32]);

    // Node 1 creates a lease; node 3 (as provider) accepts it.
    let create = LeaseEvent::create(&consumer, lease_for(&consumer, &provider, 1));
    let hash = create.lease_hash();
    nodes[1]
        .net
        .publish_event(create)
        .await
        .expect("publish create");
    for n in &nodes {
        wait_state(&n.store, &hash, LeaseState::Created).await;
    }
    let accept = LeaseEvent::accept(&provider, hash, now_secs(), UNUSED_VM_HOST_KEY.into());
    nodes[3]
        .net
        .publish_event(accept)
        .await
        .expect("publish accept");
    for n in &nodes {
        wait_state(&n.store, &hash, LeaseState::Accepted).await;
    }

    // Dependency out of order: the accept of a second lease is gossiped
    // before its create exists anywhere but on node 4.
    let create2 = LeaseEvent::create(&consumer, lease_for(&consumer, &provider, 2));
    let hash2 = create2.lease_hash();
    nodes[4].store.apply_event(&create2).expect("local only");
    let accept2 = LeaseEvent::accept(&provider, hash2, now_secs(), UNUSED_VM_HOST_KEY.into());
    nodes[2]
        .net
        .publish_event(accept2)
        .await
        .expect("publish accept first");
    nodes[4]
        .net
        .publish_event(create2)
        .await
        .expect("publish create later");
    for n in &nodes {
        wait_state(&n.store, &hash2, LeaseState::Accepted).await;
    }
    for n in &nodes {
        assert_eq!(n.store.pending_count(), 0);
    }
}

/// A node that joins late pulls everything by sync, across several pages.
#[tokio::test]
async fn late_joiner_catches_up_by_sync() {
    let a = node(vec![]).await;
    let consumer = Wallet::from_seed([1; 32]);
    let provider = Wallet::from_seed([2; 32]);
    // More than one sync page (256) of events, created while nobody listens.
    let mut last = None;
    for i in 0..300u32 {
        let mut l = lease_for(&consumer, &provider, 0);
        l.nonce[..4].copy_from_slice(&i.to_be_bytes());
        let ev = LeaseEvent::create(&consumer, l);
        last = Some(ev.lease_hash());
        a.net.publish_event(ev).await.expect("publish");
    }
    let entry = xe_store::DirectoryEntry::sign(
        &provider,
        a.net.peer_id().to_string(),
        vec![],
        now_secs(),
        600,
    );
    a.net.publish_directory(entry).await.expect("dir");

    let late = node(a.net.p2p_addrs().await.expect("addrs")).await;
    wait_state(&late.store, &last.expect("some"), LeaseState::Created).await;
    // Every lease arrived, not only the last.
    let mut rx = late.store.subscribe();
    // A page's records are readable a moment before its counters move
    // (both before its change notifications go out): wait for both.
    let all = async {
        while late.store.leases().expect("leases").len() < 300 || late.store.event_count() < 300 {
            let _ = rx.recv().await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), all)
        .await
        .expect("all 300 leases synced");
    assert_eq!(late.store.event_count(), 300);
    // The directory comes by its own request beside the reconciliation,
    // which may finish first: wait for the entry (subscribed before the
    // first look, so its arrival is not missed).
    let mut dir_rx = late.store.subscribe_directory();
    let entry = async {
        loop {
            if let Some(e) = late
                .store
                .peer_for_account(&provider.address())
                .expect("dir")
            {
                return e;
            }
            let _ = dir_rx.recv().await;
        }
    };
    let entry = tokio::time::timeout(std::time::Duration::from_secs(20), entry)
        .await
        .expect("directory entry synced");
    assert_eq!(entry.peer_id, a.net.peer_id().to_string());
}

/// A -- B -- C in a line: an invalid event from A is rejected by B, counted,
/// and never reaches C, while a valid event sent after it does.
#[tokio::test]
async fn invalid_event_does_not_spread() {
    let a = node(vec![]).await;
    let b = node(a.net.p2p_addrs().await.expect("addrs")).await;
    let c = node(b.net.p2p_addrs().await.expect("addrs")).await;
    wait_peers(&b, 2).await;
    let consumer = Wallet::from_seed([1; 32]);
    let provider = Wallet::from_seed([2; 32]);
    // Give the gossip mesh a valid event to form around first.
    let warm = LeaseEvent::create(&consumer, lease_for(&consumer, &provider, 10));
    a.net.publish_event(warm.clone()).await.expect("warm");
    wait_state(&c.store, &warm.lease_hash(), LeaseState::Created).await;

    let LeaseEvent::Create { mut lease, sig } =
        LeaseEvent::create(&consumer, lease_for(&consumer, &provider, 11))
    else {
        unreachable!()
    };
    lease.vcpus = 200; // tampered after signing
    let bad = LeaseEvent::Create { lease, sig };
    let bad_hash = bad.lease_hash();
    a.net
        .publish_unchecked(GossipMessage::Event { event: bad })
        .await
        .expect("publish bad");
    let good = LeaseEvent::create(&consumer, lease_for(&consumer, &provider, 12));
    a.net
        .publish_event(good.clone())
        .await
        .expect("publish good");
    wait_state(&c.store, &good.lease_hash(), LeaseState::Created).await;
    wait_state(&b.store, &good.lease_hash(), LeaseState::Created).await;
    assert!(
        b.net
            .stats()
            .invalid_messages
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1,
        "B rejected it"
    );
    for n in [&b, &c] {
        assert!(n.store.lease(&bad_hash).expect("read").is_none());
        assert_eq!(n.store.pending_count(), 0);
    }
}

/// Directory entries announced by a provider answer `peer_for_account`
/// on another node.
#[tokio::test]
async fn provider_announces_directory_entry() {
    let provider = Arc::new(Wallet::from_seed([2; 32]));
    let p = node_with_store(|_, c, roles| {
        c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
        roles.announce = Some(provider.clone());
    })
    .await;
    let g = node(p.net.p2p_addrs().await.expect("addrs")).await;
    wait_peers(&g, 1).await;
    let want = p.net.peer_id().to_string();
    let mut rx = g.store.subscribe_directory();
    // The entry arrives by sync on connect or by gossip; wait on the
    // store's notification, not a timer.
    let found = async {
        loop {
            if let Some(e) = g.store.peer_for_account(&provider.address()).expect("dir") {
                return e;
            }
            let _ = rx.recv().await;
        }
    };
    let e = tokio::time::timeout(std::time::Duration::from_secs(20), found)
        .await
        .expect("entry arrived");
    assert_eq!(e.peer_id, want);
    assert!(
        e.addrs.iter().any(|a| a.starts_with("/ip4/127.0.0.1/tcp/")),
        "{:?}",
        e.addrs
    );
}

/// A node whose bootstrap peer restarts (same identity, same port) finds
/// its way back by itself and catches up on what it missed.
#[tokio::test]
async fn lost_bootstrap_peer_is_redialled_after_it_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = xe_net::load_or_create_keypair(&dir.path().join("k")).expect("key");
    let start_b = |port: u16, store: xe_store::Store| {
        let key = key.clone();
        async move {
            let mut cfg = xe_net::NetConfig::default();
            let roles = xe_net::NetRoles::new(key);
            cfg.listen = vec![format!("/ip4/127.0.0.1/tcp/{port}").parse().expect("addr")];
            let cancel = tokio_util::sync::CancellationToken::new();
            let net = xe_net::start(roles, cfg, store, cancel.clone())
                .await
                .expect("start");
            (net, cancel)
        }
    };
    let b_store = xe_store::Store::temporary().expect("store");
    let (b, b_cancel) = start_b(0, b_store.clone()).await;
    let b_addrs = b.handle.p2p_addrs().await.expect("addrs");
    let port: u16 = b_addrs[0]
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(p) => Some(p),
            _ => None,
        })
        .expect("tcp port");
    let a = node(b_addrs).await;
    wait_peers(&a, 1).await;

    // B goes away; A notices.
    b_cancel.cancel();
    let xe_net::Net { handle, mut tasks } = b;
    while tasks.join_next().await.is_some() {}
    drop(handle);
    let mut w = a.net.peer_count();
    tokio::time::timeout(std::time::Duration::from_secs(20), w.wait_for(|c| *c == 0))
        .await
        .expect("A saw B leave")
        .expect("alive");

    // B comes back on the same address with an event A has not seen.
    let consumer = Wallet::from_seed([1; 32]);
    let provider = Wallet::from_seed([2; 32]);
    let ev = LeaseEvent::create(&consumer, lease_for(&consumer, &provider, 77));
    b_store.apply_event(&ev).expect("apply on B");
    let (_b2, _b2_cancel) = start_b(port, b_store).await;
    wait_peers(&a, 1).await;
    wait_state(&a.store, &ev.lease_hash(), LeaseState::Created).await;
}

/// Gossip in flight on a connection that closes is lost. The peers must
/// catch up over the connection that remains at once, not at the next
/// anti-entropy round (an hour here). The closing connection is a QUIC one
/// born beside TCP, which the host closes itself.
#[tokio::test]
async fn a_closed_connection_beside_others_triggers_a_sync() {
    let hour = |c: &mut xe_net::NetConfig| {
        c.resync_interval = std::time::Duration::from_secs(3600);
        c.listen = vec![
            "/ip4/127.0.0.1/tcp/0".parse().expect("tcp"),
            "/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("quic"),
        ];
    };
    let consumer = Wallet::from_seed([1; 32]);
    let provider = Wallet::from_seed([2; 32]);
    let a = node_with(vec![], hour).await;
    let b = node_with(vec![], hour).await;
    // Written straight into b's store: never gossiped, so only a sync from
    // b can bring either event to a.
    let first = LeaseEvent::create(&consumer, lease_for(&consumer, &provider, 1));
    b.store.apply_event(&first).expect("apply");
    let addrs = a.net.p2p_addrs().await.expect("addrs");
    let (quic, tcp): (Vec<_>, Vec<_>) = addrs
        .into_iter()
        .partition(|m| m.to_string().contains("/quic-v1"));
    b.net
        .dial(tcp.into_iter().next().expect("a TCP address"))
        .await
        .expect("dial TCP");
    // The sync on first connect has run: a holds the first event.
    wait_state(&a.store, &first.lease_hash(), LeaseState::Created).await;

    let second = LeaseEvent::create(&consumer, lease_for(&consumer, &provider, 2));
    b.store.apply_event(&second).expect("apply");
    b.net
        .dial(quic.into_iter().next().expect("a QUIC address"))
        .await
        .expect("dial QUIC");
    wait_state(&a.store, &second.lease_hash(), LeaseState::Created).await;
}
