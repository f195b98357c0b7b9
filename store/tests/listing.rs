//! Newest-first listing in pages from the creation index.

use xe_store::{AccessPubKey, Lease, LeaseEvent, LeaseRecord, LeaseState, Store, Wallet, now_secs};

fn create(n: u32, created_at: u64) -> LeaseEvent {
    let consumer = Wallet::from_seed([1; 32]);
    let mut nonce = [0u8; 16];
    nonce[..4].copy_from_slice(&n.to_be_bytes());
    LeaseEvent::create(
        &consumer,
        Lease {
            consumer: consumer.public_key(),
            provider: Wallet::from_seed([2; 32]).address(),
            vcpus: 1,
            memory_mb: 512,
            disk_gb: 1,
            duration: 3600,
            access_pub_key: AccessPubKey(Wallet::from_seed([3; 32]).public_key().0),
            created_at,
            nonce,
        },
    )
}

#[test]
fn pages_follow_one_another_newest_first_with_ties_by_hash() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = Store::open(dir.path()).expect("store");
    let t = now_secs();
    // Several leases share a second, to check the order within one.
    let evs: Vec<LeaseEvent> = (0..30).map(|i| create(i, t - u64::from(i / 4))).collect();
    s.apply_events(&evs).expect("apply");
    let mut want = s.leases().expect("all");
    want.sort_by(|a, b| {
        b.lease
            .created_at
            .cmp(&a.lease.created_at)
            .then(a.hash.cmp(&b.hash))
    });
    let mut got: Vec<LeaseRecord> = Vec::new();
    let mut after = None;
    for _ in 0..10 {
        let (page, next) = s
            .leases_newest_first(after.as_ref(), 7, |_| true)
            .expect("page");
        assert!(page.len() <= 7);
        got.extend(page);
        match next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    assert_eq!(got, want);
    // A filter still fills pages; the cursor round-trips as text.
    let (odd, next) = s
        .leases_newest_first(None, 5, |r| r.lease.nonce[3] % 2 == 1)
        .expect("filtered");
    assert_eq!(odd.len(), 5);
    assert!(odd.iter().all(|r| r.lease.nonce[3] % 2 == 1));
    let c = next.expect("more");
    assert_eq!(c.to_string().parse::<xe_store::LeaseCursor>(), Ok(c));
    assert!("12-xyz".parse::<xe_store::LeaseCursor>().is_err());
    // The index is rebuilt for a store written before it existed and
    // survives a reopen.
    drop(s);
    let s = Store::open(dir.path()).expect("reopen");
    let (all, _) = s
        .leases_newest_first(None, 100, |r| r.state() == LeaseState::Created)
        .expect("all");
    assert_eq!(all, want);
}

/// A hex prefix of any length finds the leases it starts; a short one may
/// match several (the caller decides what is ambiguous).
#[test]
fn leases_are_found_by_a_prefix_of_their_hash() {
    let s = Store::temporary().expect("store");
    let t = now_secs();
    let evs: Vec<LeaseEvent> = (0..40).map(|i| create(i, t - 60)).collect();
    s.apply_events(&evs).expect("apply");
    let h = evs[7].lease_hash();
    let hex = h.to_hex();
    for n in [8, 9, 64] {
        assert_eq!(
            s.lease_hashes_with_prefix(&hex[..n], 5).expect("read"),
            vec![h],
            "{n} digits"
        );
    }
    // One hex digit: about 40/16 of them, each starting with it, sorted.
    let some = s.lease_hashes_with_prefix(&hex[..1], 100).expect("read");
    assert!(some.contains(&h));
    assert!(some.iter().all(|x| x.to_hex().starts_with(&hex[..1])));
    assert!(some.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        s.lease_hashes_with_prefix(&hex[..1], 1)
            .expect("read")
            .len(),
        1
    );
}
