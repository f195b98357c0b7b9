//! Ledger rules: the encoding vector, every rejection path, order tolerance.

use proptest::prelude::*;
use xe_store::*;

fn wallet(b: u8) -> Wallet {
    Wallet::from_seed([b; 32])
}

fn access_key() -> AccessPubKey {
    AccessPubKey(Wallet::from_seed([3; 32]).public_key().0)
}

/// Terms created three hours ago: old enough for the expiry test's
/// accept two hours ago, young enough that every accept is in the offer's
/// lifetime and the create is far from stale.
fn lease_terms(consumer: &Wallet, provider: &Wallet) -> Lease {
    // One creation time for the whole test process: the fixture is built
    // more than once per test, and must be the same lease each time.
    static CREATED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let created = *CREATED.get_or_init(|| now_secs() - 3 * 3600);
    lease_terms_at(consumer, provider, created)
}

fn lease_terms_at(consumer: &Wallet, provider: &Wallet, created_at: u64) -> Lease {
    Lease {
        consumer: consumer.public_key(),
        provider: provider.address(),
        vcpus: 2,
        memory_mb: 2048,
        disk_gb: 10,
        duration: 3600,
        access_pub_key: access_key(),
        created_at,
        nonce: [7; 16],
    }
}

const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOZkcJ0O9Yl3MY5Wa7sObHRBuqoN2Ig0tGuo6dU2dQmD vm";

struct Fixture {
    consumer: Wallet,
    provider: Wallet,
    stranger: Wallet,
    create: LeaseEvent,
    hash: LeaseHash,
}

fn fixture() -> Fixture {
    let consumer = wallet(1);
    let provider = wallet(2);
    let create = LeaseEvent::create(&consumer, lease_terms(&consumer, &provider));
    let hash = create.lease_hash();
    Fixture {
        consumer,
        provider,
        stranger: wallet(9),
        create,
        hash,
    }
}

/// A change to the encoding, the hash or the signing message fails here.
#[test]
fn encoding_test_vector() {
    let (consumer, provider) = (wallet(1), wallet(2));
    let create = LeaseEvent::create(
        &consumer,
        lease_terms_at(&consumer, &provider, 1_700_000_000),
    );
    let f = Fixture {
        hash: create.lease_hash(),
        create,
        consumer,
        provider,
        stranger: wallet(9),
    };
    let LeaseEvent::Create { sig, .. } = &f.create else {
        unreachable!()
    };
    assert_eq!(
        f.consumer.address().to_hex(),
        "32ba51a9ceaf747c3a6784dff0114fe71d83c65ef160c5044159d07c49d08435"
    );
    assert_eq!(
        f.hash.to_hex(),
        "ebd968236d7f2108e0ae39d99c69b7cb2657e378a40a94ec10ebca3462969149"
    );
    assert_eq!(
        sig.to_hex(),
        "3f2e3e781864d9055a8ea3b552304ea26437136d9eef5330efb5d6c204050fa8\
         9a46257d2164b826d58261fe1dd17fb9e47815e7741ecf24375935a65581bc0b"
    );
    assert_eq!(
        f.create.id().to_hex(),
        "224ae056346c86d4e9588a7bc95b95c144110e6fb929ddf3fbb176db11b65a66"
    );
    // The encoding itself: 11 + 32 + 32 + 4 + 4 + 4 + 8 + 32 + 8 + 16 bytes.
    let LeaseEvent::Create { lease, .. } = &f.create else {
        unreachable!()
    };
    let bytes = lease.encode();
    assert_eq!(bytes.len(), 151);
    assert_eq!(&bytes[..11], b"xe/lease/v1");
    assert_eq!(
        &bytes[75..79],
        &2u32.to_be_bytes(),
        "vcpus follows the two keys"
    );
}

fn store() -> Store {
    Store::temporary().expect("temporary store")
}

#[test]
fn happy_path_and_state_machine() {
    let f = fixture();
    let s = store();
    assert_eq!(
        s.apply_event(&f.create).expect("create"),
        Applied::Changed(LeaseState::Created)
    );
    assert_eq!(s.apply_event(&f.create).expect("dup"), Applied::Duplicate);
    let accept = LeaseEvent::accept(&f.provider, f.hash, now_secs(), HOST_KEY.into());
    assert_eq!(
        s.apply_event(&accept).expect("accept"),
        Applied::Changed(LeaseState::Accepted)
    );
    let rec = s.lease(&f.hash).expect("get").expect("exists");
    assert_eq!(
        rec.accept.as_ref().map(|a| a.vm_host_key.as_str()),
        Some(HOST_KEY)
    );
    let settle = LeaseEvent::settle(&f.consumer, f.hash, now_secs());
    assert_eq!(
        s.apply_event(&settle).expect("settle"),
        Applied::Changed(LeaseState::Settled)
    );
}

#[test]
fn expiry_is_computed_from_accept_time() {
    let f = fixture();
    let s = store();
    s.apply_event(&f.create).expect("create");
    // Accepted two hours ago with a one-hour duration.
    let accept = LeaseEvent::accept(&f.provider, f.hash, now_secs() - 7200, HOST_KEY.into());
    assert_eq!(
        s.apply_event(&accept).expect("accept"),
        Applied::Changed(LeaseState::Expired)
    );
    let rec = s.lease(&f.hash).expect("get").expect("exists");
    assert_eq!(rec.state_at(now_secs() - 7200 + 10), LeaseState::Accepted);
    assert_eq!(rec.state(), LeaseState::Expired);
}

/// Snapshot of everything observable, to prove a refusal changed nothing.
fn snapshot(s: &Store) -> (Vec<LeaseRecord>, usize, usize) {
    (
        s.leases().expect("leases"),
        s.event_count(),
        s.pending_count(),
    )
}

#[test]
fn bad_signature_is_refused_and_changes_nothing() {
    let f = fixture();
    let s = store();
    let LeaseEvent::Create { lease, mut sig } = f.create.clone() else {
        unreachable!()
    };
    sig.0[0] ^= 1;
    let before = snapshot(&s);
    let e = s
        .apply_event(&LeaseEvent::Create { lease, sig })
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Rejected(EventError::BadSignature { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("bad signature"), "{e}");
    assert_eq!(snapshot(&s), before);
}

#[test]
fn tampered_terms_break_the_signature() {
    let f = fixture();
    let s = store();
    let LeaseEvent::Create { mut lease, sig } = f.create.clone() else {
        unreachable!()
    };
    lease.vcpus = 64;
    let e = s
        .apply_event(&LeaseEvent::Create { lease, sig })
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Rejected(EventError::BadSignature { .. })),
        "{e}"
    );
    assert_eq!(s.leases().expect("leases").len(), 0);
}

/// An event signed by the wrong party, or at the wrong point of the
/// lease's life, is refused with its reason and changes nothing; where the
/// right party may do it, a follow-up shows that it works.
#[test]
fn wrong_signer_or_step_is_refused_and_changes_nothing() {
    let f = fixture();
    let t = now_secs;
    let accept = |by: &Wallet| LeaseEvent::accept(by, f.hash, t(), HOST_KEY.into());
    type Refusal = fn(&StoreError) -> bool;
    type FollowUp = Option<(LeaseEvent, LeaseState)>;
    // (case, accepted first, event, refusal, allowed follow-up and its state)
    #[rustfmt::skip]
    let cases: Vec<(&str, bool, LeaseEvent, Refusal, FollowUp)> = vec![
        ("accept by a stranger", false, accept(&f.stranger),
            |e| e.to_string().contains("only the lease's provider may sign it"), None),
        ("accept by the consumer", false, accept(&f.consumer),
            |e| matches!(e, StoreError::Rejected(EventError::WrongSigner { .. })), None),
        ("settle by a stranger", true, LeaseEvent::settle(&f.stranger, f.hash, t()),
            |e| e.to_string().contains("consumer or provider"),
            Some((LeaseEvent::settle(&f.provider, f.hash, t()), LeaseState::Settled))),
        ("cancel after accept", true, LeaseEvent::cancel(&f.consumer, f.hash, t()),
            |e| e.to_string().contains("already accepted; settle it instead"), None),
        ("cancel by the provider", false, LeaseEvent::cancel(&f.provider, f.hash, t()),
            |e| e.to_string().contains("only the lease's consumer"),
            Some((LeaseEvent::cancel(&f.consumer, f.hash, t()), LeaseState::Cancelled))),
    ];
    for (case, accepted, event, refused, then) in cases {
        let s = store();
        s.apply_event(&f.create).expect("create");
        if accepted {
            s.apply_event(&accept(&f.provider)).expect("accept");
        }
        let before = snapshot(&s);
        let e = s.apply_event(&event).unwrap_err();
        assert!(refused(&e), "{case}: {e}");
        assert_eq!(snapshot(&s), before, "{case}: changed the store");
        if let Some((allowed, state)) = then {
            assert_eq!(
                s.apply_event(&allowed).expect(case),
                Applied::Changed(state),
                "{case}: the allowed follow-up"
            );
        }
    }
}

/// An accept signed more than the offer lifetime after the lease's
/// creation is refused and changes nothing; a lease nobody accepted in
/// time reads as expired; an accept at the last second still counts.
#[test]
fn an_accept_after_the_offer_lapsed_is_refused() {
    use xe_store::record::OFFER_LIFETIME_SECS;
    let (consumer, provider) = (wallet(1), wallet(2));
    let t = now_secs() - OFFER_LIFETIME_SECS - 600;
    let create = LeaseEvent::create(&consumer, lease_terms_at(&consumer, &provider, t));
    let h = create.lease_hash();
    let s = store();
    assert_eq!(
        s.apply_event(&create).expect("create"),
        Applied::Changed(LeaseState::Expired),
        "a lapsed offer is expired"
    );
    let before = snapshot(&s);
    let late = LeaseEvent::accept(&provider, h, t + OFFER_LIFETIME_SECS + 1, HOST_KEY.into());
    let e = s.apply_event(&late).unwrap_err();
    assert!(e.to_string().contains("the offer had lapsed"), "{e}");
    assert_eq!(snapshot(&s), before);
    let in_time = LeaseEvent::accept(&provider, h, t + OFFER_LIFETIME_SECS, HOST_KEY.into());
    assert_eq!(
        s.apply_event(&in_time).expect("accept"),
        Applied::Changed(LeaseState::Accepted)
    );
}

#[test]
fn event_for_unknown_lease_is_pending_not_applied() {
    let f = fixture();
    let s = store();
    let accept = LeaseEvent::accept(&f.provider, f.hash, now_secs(), HOST_KEY.into());
    assert_eq!(s.apply_event(&accept).expect("accept"), Applied::Pending);
    assert!(s.lease(&f.hash).expect("get").is_none());
    assert_eq!(s.event_count(), 0);
    assert_eq!(s.pending_count(), 1);
    // When the create lands, the accept applies.
    assert_eq!(
        s.apply_event(&f.create).expect("create"),
        Applied::Changed(LeaseState::Created)
    );
    assert_eq!(
        s.lease(&f.hash).expect("get").expect("exists").state(),
        LeaseState::Accepted
    );
    assert_eq!(s.pending_count(), 0);
    assert_eq!(s.event_count(), 2);
}

#[test]
fn pending_event_with_wrong_signer_is_dropped_when_its_lease_arrives() {
    let f = fixture();
    let s = store();
    let bogus = LeaseEvent::accept(&f.stranger, f.hash, now_secs(), HOST_KEY.into());
    assert_eq!(s.apply_event(&bogus).expect("pending"), Applied::Pending);
    s.apply_event(&f.create).expect("create");
    assert_eq!(
        s.lease(&f.hash).expect("get").expect("exists").state(),
        LeaseState::Created
    );
    assert_eq!(s.pending_count(), 0);
}

#[test]
fn malformed_hex_and_wrong_key_length_are_named() {
    let e = "zz".repeat(32).parse::<LeaseHash>().unwrap_err();
    assert!(
        e.to_string()
            .contains("invalid character 'z' at position 0"),
        "{e}"
    );
    let e = "ab".repeat(16).parse::<AccessPubKey>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "access public key: expected 64 hex characters, got 32"
    );
    // Through JSON (the API's boundary) the same errors surface.
    let f = fixture();
    let mut v = serde_json::to_value(&f.create).expect("json");
    v["lease"]["access_pub_key"] = serde_json::Value::String("ab".repeat(31));
    let e = serde_json::from_value::<LeaseEvent>(v).unwrap_err();
    assert!(
        e.to_string().contains("expected 64 hex characters, got 62"),
        "{e}"
    );
}

#[test]
fn out_of_range_terms_are_named() {
    let c = wallet(1);
    let p = wallet(2);
    let mut terms = lease_terms(&c, &p);
    terms.vcpus = 0;
    let e = LeaseEvent::create(&c, terms).check_self().unwrap_err();
    assert!(e.to_string().contains("vcpus"), "{e}");
    let mut terms = lease_terms(&c, &p);
    // The first [b; 32] that is not a curve point.
    let bad = (0..=255u8)
        .map(|b| AccessPubKey([b; 32]))
        .find(|k| !k.is_valid_point())
        .expect("some byte pattern is not a point");
    terms.access_pub_key = bad;
    let e = LeaseEvent::create(&c, terms).check_self().unwrap_err();
    assert!(e.to_string().contains("access_pub_key"), "{e}");
}

#[test]
fn hostile_host_key_in_accept_is_refused() {
    let f = fixture();
    let s = store();
    s.apply_event(&f.create).expect("create");
    for key in [
        "ssh-ed25519 AAAA\nmalicious",
        "not a key",
        &"x".repeat(5000),
    ] {
        let e = s
            .apply_event(&LeaseEvent::accept(
                &f.provider,
                f.hash,
                now_secs(),
                key.into(),
            ))
            .unwrap_err();
        assert!(e.to_string().contains("vm_host_key"), "{e}");
    }
    assert_eq!(
        s.lease(&f.hash).expect("get").expect("exists").state(),
        LeaseState::Created
    );
}

#[test]
fn subscription_reports_changes_after_they_are_durable() {
    let f = fixture();
    let s = store();
    let mut rx = s.subscribe();
    s.apply_event(&f.create).expect("create");
    s.apply_event(&LeaseEvent::accept(
        &f.provider,
        f.hash,
        now_secs(),
        HOST_KEY.into(),
    ))
    .expect("accept");
    let a = rx.try_recv().expect("created change");
    assert_eq!((a.old, a.new), (None, LeaseState::Created));
    let b = rx.try_recv().expect("accepted change");
    assert_eq!(
        (b.old, b.new),
        (Some(LeaseState::Created), LeaseState::Accepted)
    );
    assert_eq!(b.lease, f.hash);
}

#[test]
fn directory_entries_verify_and_newest_wins() {
    let s = store();
    let p = wallet(2);
    let now = now_secs();
    let e1 = DirectoryEntry::sign(
        &p,
        "12D3KooWA".into(),
        vec!["/ip4/127.0.0.1/tcp/1".into()],
        now,
        600,
    );
    let e2 = DirectoryEntry::sign(&p, "12D3KooWB".into(), vec![], now + 1, 600);
    assert!(s.put_directory(&e2).expect("put"));
    assert!(!s.put_directory(&e1).expect("older ignored"));
    assert_eq!(
        s.peer_for_account(&p.address())
            .expect("get")
            .expect("some")
            .peer_id,
        "12D3KooWB"
    );
    let mut forged = e2.clone();
    forged.peer_id = "12D3KooWEvil".into();
    forged.issued_at += 10;
    assert!(matches!(
        s.put_directory(&forged),
        Err(StoreError::Directory(DirectoryError::BadSignature(_)))
    ));
    let expired = DirectoryEntry::sign(&wallet(4), "x".into(), vec![], now - 1000, 10);
    assert!(matches!(
        s.put_directory(&expired),
        Err(StoreError::Directory(DirectoryError::Expired(_)))
    ));
}

/// A set of valid events for one lease: create, two accepts (a provider
/// that accepted twice), settles from both sides, a racing cancel and a
/// racing decline.
fn event_set() -> Vec<LeaseEvent> {
    let f = fixture();
    let t = now_secs();
    vec![
        f.create.clone(),
        LeaseEvent::accept(&f.provider, f.hash, t, HOST_KEY.into()),
        LeaseEvent::accept(&f.provider, f.hash, t + 5, HOST_KEY.into()),
        LeaseEvent::settle(&f.consumer, f.hash, t + 100),
        LeaseEvent::settle(&f.provider, f.hash, t + 100),
        LeaseEvent::cancel(&f.consumer, f.hash, t - 1),
        LeaseEvent::decline(&f.provider, f.hash, t - 2, "over capacity"),
    ]
}

/// The record, and how many events the store keeps for it: nodes that saw
/// the same events in different orders must keep the same set too (a
/// voided cancel or decline is dropped, not kept beside the accept).
fn final_record(events: &[LeaseEvent], subset: u32) -> (Option<LeaseRecord>, usize) {
    let s = store();
    for (i, ev) in events.iter().enumerate() {
        if subset & (1 << i) != 0 {
            // Order-dependent refusals (cancel after accept) are allowed.
            let _ = s.apply_event(ev);
        }
    }
    let f = fixture();
    (s.lease(&f.hash).expect("get"), s.event_count())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    /// Every permutation of every subset of a valid event set ends in the
    /// same record (and so the same state) as the canonical order.
    #[test]
    fn any_order_converges(perm in Just((0..7usize).collect::<Vec<_>>()).prop_shuffle(), subset in 1u32..128) {
        let events = event_set();
        let shuffled: Vec<LeaseEvent> = perm.iter().map(|&i| events[i].clone()).collect();
        let shuffled_subset = perm.iter().enumerate().fold(0u32, |acc, (pos, &i)| {
            if subset & (1 << i) != 0 { acc | (1 << pos) } else { acc }
        });
        prop_assert_eq!(final_record(&shuffled, shuffled_subset), final_record(&events, subset));
    }
}
