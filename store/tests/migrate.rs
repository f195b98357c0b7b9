//! A store written in the layout before the one-tree ledger (a tree per
//! index, events as JSON) opens with every lease, pending event and
//! tombstone carried over, and its old trees gone.

use xe_store::{AccessPubKey, Lease, LeaseEvent, LeaseHash, LeaseState, Store, Wallet};

const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOZkcJ0O9Yl3MY5Wa7sObHRBuqoN2Ig0tGuo6dU2dQmD vm";

fn create(n: u8, consumer: &Wallet, provider: &Wallet) -> LeaseEvent {
    LeaseEvent::create(
        consumer,
        Lease {
            consumer: consumer.public_key(),
            provider: provider.address(),
            vcpus: 1,
            memory_mb: 512,
            disk_gb: 1,
            duration: 3600,
            access_pub_key: AccessPubKey(Wallet::from_seed([3; 32]).public_key().0),
            created_at: xe_store::now_secs() - 60,
            nonce: [n; 16],
        },
    )
}

#[test]
fn an_old_layout_store_is_carried_over_whole() {
    let (consumer, provider) = (Wallet::from_seed([1; 32]), Wallet::from_seed([2; 32]));
    let c1 = create(1, &consumer, &provider);
    let h1 = c1.lease_hash();
    let a1 = LeaseEvent::accept(&provider, h1, c1.timestamp() + 1, HOST_KEY.into());
    let c2 = create(2, &consumer, &provider);
    let h2 = c2.lease_hash();
    // A settle that waits for an accept that never came.
    let s2 = LeaseEvent::settle(&consumer, h2, c2.timestamp() + 5);
    let gone = LeaseHash([0x55; 32]);

    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = sled::open(dir.path()).expect("old db");
        let events = db.open_tree("events").expect("tree");
        for ev in [&c1, &a1, &c2] {
            let json = serde_json::to_vec(ev).expect("json");
            events.insert(ev.id().0, json).expect("insert");
        }
        let mut pkey = h2.0.to_vec();
        pkey.extend_from_slice(&s2.id().0);
        let pending = db.open_tree("pending").expect("tree");
        pending
            .insert(pkey, serde_json::to_vec(&s2).expect("json"))
            .expect("insert");
        let compacted = db.open_tree("compacted").expect("tree");
        compacted
            .insert(gone.0, &1_000u64.to_be_bytes())
            .expect("insert");
        db.open_tree("leases")
            .expect("tree")
            .insert(h1.0, b"{}")
            .expect("insert");
        db.flush().expect("flush");
    }
    for round in 0..2 {
        let s = Store::open(dir.path()).expect("open carries the old store over");
        let state = |h| s.lease(h).expect("read").map(|r| r.state());
        assert_eq!(state(&h1), Some(LeaseState::Accepted), "round {round}");
        assert_eq!(state(&h2), Some(LeaseState::Created), "round {round}");
        assert_eq!(
            (s.event_count(), s.pending_count()),
            (3, 1),
            "round {round}"
        );
        assert!(s.is_compacted(&gone).expect("read"), "round {round}");
        assert_eq!(s.event(&s2.id()).expect("read"), Some(s2.clone()));
        // The pending settle is held but not reconciled (issue 18.2).
        assert_eq!(s.with_sync_set(|set| set.len()), 3, "round {round}");
        drop(s);
        let db = sled::open(dir.path()).expect("reopen raw");
        let names: Vec<String> = db
            .tree_names()
            .iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        for old in ["events", "pending", "compacted", "leases"] {
            assert!(
                !names.iter().any(|n| n == old),
                "{old} still there: {names:?}"
            );
        }
    }
}
