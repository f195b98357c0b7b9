//! The store's parsers: lease JSON, hex ids and usernames, the stored
//! forms, and the ledger's apply order.

use std::str::FromStr;
use std::sync::OnceLock;

use xe_store::{
    AccessPubKey, AccountAddress, AccountPubKey, EventId, Lease, LeaseCursor, LeaseEvent,
    LeaseHash, LeaseRecord, LeaseState, Sig, Store, Wallet, now_secs,
};

/// `data` as the JSON of a lease event, lease terms and a lease record
/// (what the HTTP API reads from clients and the CLI from nodes). What
/// parses must survive serialising again; then it is hashed, verified and
/// asked for its state as the node and CLI would.
pub fn lease_json(data: &[u8]) {
    if let Ok(ev) = serde_json::from_slice::<LeaseEvent>(data) {
        let again: LeaseEvent =
            serde_json::from_slice(&serde_json::to_vec(&ev).expect("serialise")).expect("reparse");
        assert_eq!(again, ev, "lease event JSON round trip");
        let _ = (ev.kind(), ev.lease_hash(), ev.id(), ev.timestamp());
        let _ = ev.check_self();
    }
    if let Ok(l) = serde_json::from_slice::<Lease>(data) {
        let again: Lease =
            serde_json::from_slice(&serde_json::to_vec(&l).expect("serialise")).expect("reparse");
        assert_eq!(again, l, "lease terms JSON round trip");
        let _ = (l.hash(), l.check_terms(), l.consumer_address());
        if l.check_terms().is_ok() {
            let _ = (l.offer_lapses_at(), l.latest_end());
        }
    }
    if let Ok(r) = serde_json::from_slice::<LeaseRecord>(data) {
        let again: LeaseRecord =
            serde_json::from_slice(&serde_json::to_vec(&r).expect("serialise")).expect("reparse");
        assert_eq!(again, r, "lease record JSON round trip");
        let now = now_secs();
        let _ = (r.state_at(now), r.access_at(now), r.expires_at(), r.state());
    }
}

/// `data` as text given to every hex id parser (lease hashes are also the
/// SSH gateway's usernames), the lease-list cursor and a state name. What
/// parses must print back to a string that parses to the same value.
pub fn ids(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    fn check<T: FromStr + ToString + PartialEq + std::fmt::Debug>(s: &str) {
        if let Ok(v) = s.parse::<T>() {
            let again = v.to_string().parse::<T>().ok();
            assert_eq!(again.as_ref(), Some(&v), "{s:?} does not round trip");
        }
    }
    check::<LeaseHash>(&s);
    check::<AccountAddress>(&s);
    check::<AccountPubKey>(&s);
    check::<AccessPubKey>(&s);
    check::<EventId>(&s);
    check::<Sig>(&s);
    check::<LeaseCursor>(&s);
    if let Ok(st) = s.parse::<LeaseState>() {
        assert_eq!(st.as_str().parse::<LeaseState>().ok(), Some(st));
    }
    if let Ok(k) = s.parse::<AccessPubKey>() {
        let _ = (k.is_valid_point(), k.to_openssh("fuzz"));
    }
    let _ = xe_store::ids::parse_hex_array::<32>("fuzz", &s);
}

/// `data` as every stored value the store decodes from its trees: the
/// compact event form, index entries, lease bundles, pending entries.
pub fn stored_forms(data: &[u8]) {
    xe_store::fuzzing::stored_forms(data);
}

/// Valid and invalid events of two leases, signed once per process.
pub(crate) fn ledger_events() -> &'static [LeaseEvent] {
    static EVENTS: OnceLock<Vec<LeaseEvent>> = OnceLock::new();
    EVENTS.get_or_init(|| {
        let consumer = Wallet::from_seed([1; 32]);
        let provider = Wallet::from_seed([2; 32]);
        let stranger = Wallet::from_seed([9; 32]);
        let other = Wallet::from_seed([4; 32]);
        let t = now_secs();
        let terms = |nonce: u8, provider: &Wallet| Lease {
            consumer: consumer.public_key(),
            provider: provider.address(),
            vcpus: 2,
            memory_mb: 2048,
            disk_gb: 10,
            duration: 3600,
            access_pub_key: AccessPubKey(Wallet::from_seed([3; 32]).public_key().0),
            created_at: t - 3 * 3600,
            nonce: [nonce; 16],
        };
        let a = LeaseEvent::create(&consumer, terms(7, &provider));
        let ha = a.lease_hash();
        let b = LeaseEvent::create(&consumer, terms(8, &other));
        let hb = b.lease_hash();
        const HOST_KEY: &str =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOZkcJ0O9Yl3MY5Wa7sObHRBuqoN2Ig0tGuo6dU2dQmD vm";
        vec![
            a,
            LeaseEvent::accept(&provider, ha, t, HOST_KEY.into()),
            LeaseEvent::accept(&provider, ha, t + 5, HOST_KEY.into()),
            LeaseEvent::settle(&consumer, ha, t + 100),
            LeaseEvent::settle(&provider, ha, t + 90),
            LeaseEvent::cancel(&consumer, ha, t - 1),
            LeaseEvent::decline(&provider, ha, t - 2, "over capacity"),
            // Signed by nobody in the lease: pending until its create, then
            // dropped; refused after it.
            LeaseEvent::settle(&stranger, ha, t + 50),
            LeaseEvent::accept(&stranger, ha, t - 3, HOST_KEY.into()),
            b,
            LeaseEvent::decline(&other, hb, t - 10, "no"),
            LeaseEvent::cancel(&consumer, hb, t - 20),
            LeaseEvent::accept(&other, hb, t - 5, HOST_KEY.into()),
            LeaseEvent::settle(&other, hb, t + 10),
        ]
    })
}

/// What two stores must agree on after the same events.
type Ledger = (Vec<Option<LeaseRecord>>, usize, usize, usize);

fn ledger_after(events: &[&LeaseEvent]) -> Ledger {
    let s = Store::temporary().expect("temporary store");
    for ev in events {
        // Order-dependent refusals (a cancel after an accept) are allowed.
        let _ = s.apply_event(ev);
    }
    let all = ledger_events();
    let records = [&all[0], &all[9]]
        .iter()
        .map(|c| s.lease(&c.lease_hash()).expect("read lease"))
        .collect();
    let keys = s.with_sync_set(|set| set.len());
    (records, s.event_count(), s.pending_count(), keys)
}

/// The ledger's apply order: each byte of `data` picks one of a fixed set
/// of signed events (repeats are redeliveries), applied in that order to a
/// fresh store; a second store gets the same set once each in a canonical
/// order. Both must end with the same records, events kept, pending
/// events and reconciliation keys.
pub fn ledger_order(data: &[u8]) {
    let all = ledger_events();
    let picked: Vec<&LeaseEvent> = data
        .iter()
        .take(48)
        .map(|b| &all[*b as usize % all.len()])
        .collect();
    if picked.is_empty() {
        return;
    }
    let mut canonical: Vec<usize> = data
        .iter()
        .take(48)
        .map(|b| *b as usize % all.len())
        .collect();
    canonical.sort_unstable();
    canonical.dedup();
    let canonical: Vec<&LeaseEvent> = canonical.into_iter().map(|i| &all[i]).collect();
    let a = ledger_after(&picked);
    let b = ledger_after(&canonical);
    assert_eq!(a, b, "the same events in another order ended differently");
}
