//! Compaction of ended leases on real sled files: live leases are never
//! dropped, compacted ones never come back, and the sync set follows.

use proptest::prelude::*;
use xe_store::retention::{ended_at, stale_at};
use xe_store::syncset::{Bound, Fingerprint, SyncKey};
use xe_store::{
    AccessPubKey, Applied, Lease, LeaseEvent, LeaseHash, LeaseRecord, Store, Wallet, now_secs,
};

const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOZkcJ0O9Yl3MY5Wa7sObHRBuqoN2Ig0tGuo6dU2dQmD vm";
const DAY: u64 = 86_400;
const WINDOW: u64 = 3 * DAY;

fn wallets() -> (Wallet, Wallet) {
    (Wallet::from_seed([1; 32]), Wallet::from_seed([2; 32]))
}

/// One lease's events. `accept`/`settle`/`cancel` are offsets in seconds
/// from `created_at` (None: no such event).
fn lease_events(
    n: u32,
    created_at: u64,
    duration: u64,
    accept: Option<u64>,
    settle: Option<u64>,
    cancel: Option<u64>,
) -> Vec<LeaseEvent> {
    let (consumer, provider) = wallets();
    let mut nonce = [0u8; 16];
    nonce[..4].copy_from_slice(&n.to_be_bytes());
    let create = LeaseEvent::create(
        &consumer,
        Lease {
            consumer: consumer.public_key(),
            provider: provider.address(),
            vcpus: 1,
            memory_mb: 512,
            disk_gb: 1,
            duration,
            access_pub_key: AccessPubKey(Wallet::from_seed([3; 32]).public_key().0),
            created_at,
            nonce,
        },
    );
    let h = create.lease_hash();
    let mut out = vec![create];
    if let Some(c) = cancel {
        out.push(LeaseEvent::cancel(&consumer, h, created_at + c));
    }
    if let Some(a) = accept {
        out.push(LeaseEvent::accept(
            &provider,
            h,
            created_at + a,
            HOST_KEY.into(),
        ));
        if let Some(s) = settle {
            out.push(LeaseEvent::settle(&consumer, h, created_at + a + s));
        }
    }
    out
}

fn fingerprint(s: &Store) -> Fingerprint {
    s.with_sync_set(|set| set.fingerprint(&SyncKey::MIN, &Bound::End))
}

fn apply_all(s: &Store, evs: &[LeaseEvent]) {
    for r in s.apply_events(evs).expect("apply") {
        // A cancel racing an accept may be refused; that is the ledger's rule.
        let _ = r;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Random leases of every kind and age: compaction keeps exactly the
    /// ones that have not ended more than the window ago, unchanged, and
    /// tombstones the rest; a fresh store given only the kept leases' events
    /// has the same sync set.
    #[test]
    fn compaction_never_drops_a_live_lease(
        leases in proptest::collection::vec(
            (0u64..20 * DAY, 60u64..10 * DAY, proptest::option::of(0u64..DAY),
             proptest::option::of(0u64..5 * DAY), proptest::option::of(0u64..DAY)),
            1..12,
        ),
    ) {
        let now = now_secs();
        let dir = tempfile::tempdir().expect("tmp");
        let s = Store::open(dir.path()).expect("store");
        let mut all: Vec<(LeaseHash, Vec<LeaseEvent>)> = Vec::new();
        for (i, (age, duration, accept, settle, cancel)) in leases.into_iter().enumerate() {
            let evs = lease_events(i as u32, now - age, duration, accept, settle, cancel);
            apply_all(&s, &evs);
            all.push((evs[0].lease_hash(), evs));
        }
        let before: Vec<Option<LeaseRecord>> =
            all.iter().map(|(h, _)| s.lease(h).expect("read")).collect();
        s.compact(now).expect("compact");
        let kept = Store::temporary().expect("fresh");
        for ((h, evs), rec) in all.iter().zip(before) {
            let LeaseEvent::Create { lease, .. } = &evs[0] else { unreachable!() };
            // A create already stale is never taken: nothing to compact;
            // the lease's other events wait as pending, and go a window
            // after their own time (the fresh store is compacted below).
            if stale_at(lease, WINDOW) < now {
                prop_assert!(rec.is_none(), "stale create taken");
                prop_assert!(!s.is_compacted(h).expect("read"));
                apply_all(&kept, evs);
                continue;
            }
            let rec = rec.expect("every lease that is not stale was applied");
            let due = ended_at(&rec, now).is_some_and(|e| e + WINDOW < now);
            if due {
                prop_assert!(s.lease(h).expect("read").is_none(), "ended lease kept");
                prop_assert!(s.is_compacted(h).expect("read"));
            } else {
                prop_assert_eq!(s.lease(h).expect("read"), Some(rec), "live lease changed");
                apply_all(&kept, evs);
            }
        }
        prop_assert_eq!(kept.compact(now).expect("compact").leases, 0);
        prop_assert_eq!(fingerprint(&s), fingerprint(&kept));
        prop_assert_eq!(s.event_count(), kept.event_count());
        prop_assert_eq!(s.pending_count(), kept.pending_count());
        // Reopening reads the same state back.
        drop(s);
        let s = Store::open(dir.path()).expect("reopen");
        prop_assert_eq!(fingerprint(&s), fingerprint(&kept));
        prop_assert_eq!(s.event_count(), kept.event_count());
    }
}

/// Every event of a compacted lease, re-published in any order (alone, as
/// a page, again and again), is refused as known and changes nothing:
/// no record, no event, no pending entry, no sync-set change.
#[test]
fn a_replayed_old_event_resurrects_nothing() {
    let now = now_secs();
    let s = Store::temporary().expect("store");
    // Created 4.5 days ago: ended more than the 3-day window ago, and not
    // stale yet (that is 5 days after creation for a one-day lease).
    let t = now - 4 * DAY - DAY / 2;
    // Settled early (two hours into a one-day lease).
    let settled = lease_events(1, t, DAY, Some(10), Some(7200), None);
    let cancelled = lease_events(2, t, DAY, None, None, Some(5));
    let expired = lease_events(3, t, DAY, Some(1), None, None);
    // Live: accepted an hour ago for a day.
    let live = lease_events(4, now - 3600, DAY, Some(1), None, None);
    for evs in [&settled, &cancelled, &expired, &live] {
        apply_all(&s, evs);
    }
    let done = s.compact(now).expect("compact");
    assert_eq!(done.leases, 3);
    assert_eq!(done.events, 3 + 2 + 2);
    let fp = fingerprint(&s);
    let count = s.event_count();
    let mut replay: Vec<LeaseEvent> = [&settled, &cancelled, &expired]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    replay.reverse();
    for ev in &replay {
        assert_eq!(s.apply_event(ev).expect("apply"), Applied::Duplicate);
    }
    for r in s.apply_events(&replay).expect("page") {
        assert_eq!(r.expect("apply"), Applied::Duplicate);
    }
    for evs in [&settled, &cancelled, &expired] {
        let h = evs[0].lease_hash();
        assert!(s.lease(&h).expect("read").is_none());
        assert!(s.is_compacted(&h).expect("read"));
        for ev in evs.iter() {
            assert!(!s.has_event(&ev.id()).expect("read"));
        }
    }
    assert_eq!(s.pending_count(), 0);
    assert_eq!(s.event_count(), count);
    assert_eq!(fingerprint(&s), fp);
    // The live lease is untouched and still takes new events.
    let h = live[0].lease_hash();
    assert!(s.lease(&h).expect("read").is_some());
    let (consumer, _) = wallets();
    let settle = LeaseEvent::settle(&consumer, h, now);
    assert!(matches!(
        s.apply_event(&settle).expect("settle"),
        Applied::Changed(_)
    ));
}

/// A settle that comes for a lease compacted as *expired* does not bring
/// it back either (the lease is gone for good, whichever way it ended).
#[test]
fn an_event_never_seen_for_a_compacted_lease_is_refused_too() {
    let now = now_secs();
    let s = Store::temporary().expect("store");
    let t = now - 4 * DAY - DAY / 2;
    let expired = lease_events(5, t, DAY, Some(1), None, None);
    apply_all(&s, &expired);
    assert_eq!(s.compact(now).expect("compact").leases, 1);
    let (consumer, _) = wallets();
    let late = LeaseEvent::settle(&consumer, expired[0].lease_hash(), t + 100);
    assert_eq!(s.apply_event(&late).expect("apply"), Applied::Duplicate);
    assert!(s.lease(&expired[0].lease_hash()).expect("read").is_none());
    assert_eq!(s.event_count(), 0);
}

/// A create whose lease must have ended a window ago (creation + the
/// one-day offer + duration + window) is refused as stale and leaves
/// nothing behind: this is what lets tombstones go.
#[test]
fn a_stale_create_is_refused_and_stores_nothing() {
    let now = now_secs();
    let s = Store::temporary().expect("store");
    let old = lease_events(6, now - 6 * DAY, DAY, Some(1), Some(5), None);
    for r in s.apply_events(&old).expect("page") {
        assert!(matches!(
            r.expect("apply"),
            Applied::Duplicate | Applied::Pending
        ));
    }
    let h = old[0].lease_hash();
    assert!(s.lease(&h).expect("read").is_none());
    assert_eq!(s.event_count(), 0);
    // Its accept and settle wait for a create that never comes, and go a
    // window after their own time.
    assert_eq!(s.pending_count(), 2);
    let done = s.compact(now).expect("compact");
    assert_eq!((done.leases, done.events), (0, 2));
    assert_eq!(s.pending_count(), 0);
    assert_eq!(s.with_sync_set(|set| set.len()), 0);
}

/// A tombstone is kept until the lease's create is stale, then dropped; a
/// recent pending event is kept; a lapsed offer (never accepted) is
/// compacted like any ended lease.
#[test]
fn tombstones_go_when_the_create_is_stale() {
    let now = now_secs();
    let s = Store::temporary().expect("store");
    let t = now - 4 * DAY - DAY / 2;
    let lapsed = lease_events(7, t, DAY, None, None, None);
    apply_all(&s, &lapsed);
    let h = lapsed[0].lease_hash();
    assert_eq!(
        s.lease(&h).expect("read").map(|r| r.state()),
        Some(xe_store::LeaseState::Expired)
    );
    let (consumer, _) = wallets();
    let waiting = LeaseEvent::settle(&consumer, LeaseHash([0x42; 32]), now - 60);
    assert_eq!(s.apply_event(&waiting).expect("apply"), Applied::Pending);
    assert_eq!(s.compact(now).expect("compact").leases, 1);
    assert!(s.is_compacted(&h).expect("read"));
    assert_eq!(s.pending_count(), 1, "a recent pending event is kept");
    let LeaseEvent::Create { lease, .. } = &lapsed[0] else {
        unreachable!()
    };
    let stale = stale_at(lease, WINDOW);
    assert_eq!(s.compact(stale - 1).expect("compact").tombstones, 0);
    assert!(s.is_compacted(&h).expect("read"));
    assert_eq!(s.compact(stale + 1).expect("compact").tombstones, 1);
    assert!(!s.is_compacted(&h).expect("read"));
}

#[test]
fn a_window_shorter_than_the_offer_lifetime_is_refused() {
    let s = Store::temporary().expect("store");
    let e = s.set_retention(3600).expect_err("refused");
    assert!(e.to_string().contains("use at least 1 day"), "{e}");
    assert_eq!(s.retention(), WINDOW);
    s.set_retention(2 * DAY).expect("two days");
    assert_eq!(s.retention(), 2 * DAY);
}
