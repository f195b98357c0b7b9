//! The pending store under a flood (issue 18.2): shares per source,
//! signer and lease, expiry on arrival time, nothing pushed out, and
//! pending events kept out of the sync set. Real sled stores.

use xe_store::pending::{
    MAX_PENDING_PER_CLIENT, MAX_PENDING_PER_LEASE, MAX_PENDING_PER_PEER, MAX_PENDING_PER_SIGNER,
    PENDING_WINDOW_SECS,
};
use xe_store::*;

const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOZkcJ0O9Yl3MY5Wa7sObHRBuqoN2Ig0tGuo6dU2dQmD vm";

fn terms(consumer: &Wallet, provider: &Wallet, n: u8) -> Lease {
    Lease {
        consumer: consumer.public_key(),
        provider: provider.address(),
        vcpus: 1,
        memory_mb: 512,
        disk_gb: 1,
        duration: 3600,
        access_pub_key: AccessPubKey(Wallet::from_seed([3; 32]).public_key().0),
        created_at: now_secs(),
        nonce: [n; 16],
    }
}

/// A settle for a lease nobody has, signed by a fresh key (the flood).
fn orphan(i: u32) -> LeaseEvent {
    let mut seed = [0x70; 32];
    seed[..4].copy_from_slice(&i.to_be_bytes());
    let mut lease = [0xAB; 32];
    lease[..4].copy_from_slice(&i.to_be_bytes());
    LeaseEvent::settle(&Wallet::from_seed(seed), LeaseHash(lease), now_secs())
}

fn peer(name: &str) -> Source {
    Source::Peer(name.into())
}

/// Apply `n` orphans from `source`; (kept pending, refused over a share).
fn flood(s: &Store, source: &Source, first: u32, n: u32) -> (usize, usize) {
    let evs: Vec<LeaseEvent> = (first..first + n).map(orphan).collect();
    let mut kept = 0;
    let mut refused = 0;
    for r in s.apply_events_from(&evs, source).expect("write") {
        match r {
            Ok(Applied::Pending) => kept += 1,
            Err(StoreError::PendingRefused(_)) => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    (kept, refused)
}

#[test]
fn a_flooding_peer_hits_its_share_and_a_legitimate_orphan_still_waits_and_applies() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = Store::open(dir.path()).expect("store");
    let flooder = peer("flooder");
    let (kept, refused) = flood(&s, &flooder, 0, MAX_PENDING_PER_PEER as u32 + 50);
    assert_eq!((kept, refused), (MAX_PENDING_PER_PEER, 50));
    assert_eq!(s.pending_from(&flooder), MAX_PENDING_PER_PEER);
    // The error says who, how many, and what to do.
    let err = s
        .apply_event_from(&orphan(999_999), &flooder)
        .expect_err("over its share");
    let text = err.to_string();
    assert!(
        text.contains("peer flooder") && text.contains("share is 1000"),
        "{text}"
    );
    // Pending events are not reconciled: the set holds none of them.
    assert_eq!(s.with_sync_set(|set| set.len()), 0);

    // An honest peer's accept racing its create still waits, and applies.
    let (c, p) = (Wallet::from_seed([1; 32]), Wallet::from_seed([2; 32]));
    let create = LeaseEvent::create(&c, terms(&c, &p, 1));
    let h = create.lease_hash();
    let accept = LeaseEvent::accept(&p, h, now_secs(), HOST_KEY.into());
    let honest = peer("honest");
    assert_eq!(
        s.apply_event_from(&accept, &honest).expect("accept"),
        Applied::Pending
    );
    assert_eq!(s.pending_from(&honest), 1);
    s.apply_event_from(&create, &peer("other")).expect("create");
    assert_eq!(
        s.lease(&h).expect("read").map(|r| r.state()),
        Some(LeaseState::Accepted)
    );
    assert_eq!(s.pending_from(&honest), 0);
    assert_eq!(s.pending_count(), MAX_PENDING_PER_PEER);

    // The shares survive a restart (rebuilt from the stored entries).
    drop(s);
    let s = Store::open(dir.path()).expect("reopen");
    assert_eq!(s.pending_from(&flooder), MAX_PENDING_PER_PEER);
    assert!(matches!(
        s.apply_event_from(&orphan(1_000_001), &flooder),
        Err(StoreError::PendingRefused(
            PendingRefused::SourceShare { .. }
        ))
    ));
    assert_eq!(
        s.lease(&h).expect("read").map(|r| r.state()),
        Some(LeaseState::Accepted)
    );
}

#[test]
fn an_api_client_has_a_small_share_and_one_key_a_bounded_one() {
    let s = Store::temporary().expect("store");
    let client = Source::Client("198.18.0.9".parse().expect("ip"));
    let (kept, refused) = flood(&s, &client, 0, MAX_PENDING_PER_CLIENT as u32 + 10);
    assert_eq!((kept, refused), (MAX_PENDING_PER_CLIENT, 10));
    // One key over many sources: stopped at its own share.
    let key = Wallet::from_seed([0x42; 32]);
    let mut refused = 0;
    for i in 0..MAX_PENDING_PER_SIGNER as u32 + 5 {
        let mut lease = [0xCD; 32];
        lease[..4].copy_from_slice(&i.to_be_bytes());
        let ev = LeaseEvent::settle(&key, LeaseHash(lease), now_secs());
        match s.apply_event_from(&ev, &peer(&format!("p{i}"))) {
            Ok(Applied::Pending) => {}
            Err(StoreError::PendingRefused(PendingRefused::SignerShare { .. })) => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(refused, 5);
}

#[test]
fn a_lease_holds_a_bounded_number_of_pending_events() {
    let s = Store::temporary().expect("store");
    let (c, p) = (Wallet::from_seed([1; 32]), Wallet::from_seed([2; 32]));
    let create = LeaseEvent::create(&c, terms(&c, &p, 2));
    let h = create.lease_hash();
    s.apply_event(&create).expect("create");
    // Settles before any accept: bound to the lease, signed by its consumer.
    let t = now_secs();
    for i in 0..MAX_PENDING_PER_LEASE as u64 {
        let ev = LeaseEvent::settle(&c, h, t + i);
        assert_eq!(
            s.apply_event_from(&ev, &peer("x")).expect("pending"),
            Applied::Pending
        );
    }
    let more = LeaseEvent::settle(&c, h, t + 100);
    assert!(matches!(
        s.apply_event_from(&more, &peer("x")),
        Err(StoreError::PendingRefused(PendingRefused::LeaseFull { .. }))
    ));
}

/// Time is driven through `expire_pending(now)`: an orphan goes a window
/// after it arrived whatever its own timestamp says; a settle waiting for
/// the accept of a lease that is here (signed by its consumer) stays.
#[test]
fn orphans_expire_on_arrival_time_and_bound_events_stay() {
    let s = Store::temporary().expect("store");
    let arrived = now_secs();
    assert_eq!(flood(&s, &peer("f"), 0, 20), (20, 0));
    let (c, p) = (Wallet::from_seed([1; 32]), Wallet::from_seed([2; 32]));
    let create = LeaseEvent::create(&c, terms(&c, &p, 3));
    let h = create.lease_hash();
    s.apply_event(&create).expect("create");
    let waiting = LeaseEvent::settle(&c, h, now_secs());
    assert_eq!(s.apply_event(&waiting).expect("settle"), Applied::Pending);

    assert_eq!(
        s.expire_pending(arrived + PENDING_WINDOW_SECS - 1)
            .expect("sweep"),
        0
    );
    assert_eq!(s.pending_count(), 21);
    // Two seconds of margin: the flood may have arrived a second later.
    assert_eq!(
        s.expire_pending(arrived + PENDING_WINDOW_SECS + 2)
            .expect("sweep"),
        20
    );
    assert_eq!(s.pending_count(), 1);
    assert_eq!(s.pending_from(&peer("f")), 0);
    // The flooder's share is free again.
    assert_eq!(flood(&s, &peer("f"), 100, 1), (1, 0));
    // The bound settle still applies when its accept comes.
    let accept = LeaseEvent::accept(&p, h, now_secs(), HOST_KEY.into());
    s.apply_event(&accept).expect("accept");
    assert_eq!(
        s.lease(&h).expect("read").map(|r| r.state()),
        Some(LeaseState::Settled)
    );
    assert_eq!(s.pending_count(), 1, "the new orphan only");
}
