//! A flood of pending events over gossip (issue 18.2), between real hosts
//! on loopback in a line A — B — C: B keeps at most A's share, forwards
//! none of them to C, and a create with its accept sent right after still
//! reaches everyone.

mod common;

use std::time::Duration;

use common::*;
use xe_net::replication::GossipMessage;
use xe_store::pending::MAX_PENDING_PER_PEER;
use xe_store::{LeaseEvent, LeaseHash, LeaseState, Source, Wallet, now_secs};

/// A settle for a lease nobody has, signed by a fresh key.
fn orphan(i: u32) -> LeaseEvent {
    let mut seed = [0x71; 32];
    seed[..4].copy_from_slice(&i.to_be_bytes());
    let mut lease = [0xBA; 32];
    lease[..4].copy_from_slice(&i.to_be_bytes());
    LeaseEvent::settle(&Wallet::from_seed(seed), LeaseHash(lease), now_secs())
}

#[tokio::test]
async fn a_gossip_flood_of_orphans_stops_at_the_first_hop_within_the_share() {
    let a = node(vec![]).await;
    let b = node(a.net.p2p_addrs().await.expect("addrs")).await;
    let c = node(b.net.p2p_addrs().await.expect("addrs")).await;
    wait_peers(&b, 2).await;
    let consumer = Wallet::from_seed([1; 32]);
    let provider = Wallet::from_seed([2; 32]);
    let warm = LeaseEvent::create(&consumer, lease_for(&consumer, &provider, 20));
    a.net.publish_event(warm.clone()).await.expect("warm");
    wait_state(&c.store, &warm.lease_hash(), LeaseState::Created).await;

    let n = MAX_PENDING_PER_PEER as u32 + 100;
    for i in 0..n {
        a.net
            .publish_unchecked(GossipMessage::Event { event: orphan(i) })
            .await
            .expect("publish orphan");
    }
    // A create and its accept, back to back: the accept may be validated
    // before its create at B or C (two threads), goes pending there, and
    // must still be forwarded once the create applies.
    let create = LeaseEvent::create(&consumer, lease_for(&consumer, &provider, 21));
    let hash = create.lease_hash();
    let accept = LeaseEvent::accept(&provider, hash, now_secs(), UNUSED_VM_HOST_KEY.into());
    a.net.publish_event(create).await.expect("create");
    a.net.publish_event(accept).await.expect("accept");
    for n in [&a, &b, &c] {
        wait_state(&n.store, &hash, LeaseState::Accepted).await;
    }

    // B takes in what gossip delivered of the flood: a bounded wait for
    // it to reach A's share (messages may still be in validation).
    let from_a = Source::Peer(a.net.peer_id().to_string());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while b.store.pending_from(&from_a) < MAX_PENDING_PER_PEER
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = b.store.pending_from(&from_a);
    assert!(held > 0, "B took none of the flood");
    assert!(
        held <= MAX_PENDING_PER_PEER,
        "B holds {held}, over A's share"
    );
    // Nothing of it went on from B, and nobody was penalised for it.
    let from_b = Source::Peer(b.net.peer_id().to_string());
    assert_eq!(
        c.store.pending_from(&from_b),
        0,
        "B forwarded pending events"
    );
    for n in [&b, &c] {
        let invalid = n
            .net
            .stats()
            .invalid_messages
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(invalid, 0);
    }
    // Nor do they spread by reconciliation: not in the sync set.
    assert_eq!(
        b.store.with_sync_set(|s| s.len()),
        c.store.with_sync_set(|s| s.len())
    );
}
