//! Wire-form tests of the session frames.

use super::*;
use xe_store::{AccessPubKey, Lease, Wallet};

fn events() -> Vec<LeaseEvent> {
    let c = Wallet::from_seed([1; 32]);
    let p = Wallet::from_seed([2; 32]);
    let create = LeaseEvent::create(
        &c,
        Lease {
            consumer: c.public_key(),
            provider: p.address(),
            vcpus: 1,
            memory_mb: 512,
            disk_gb: 1,
            duration: 3600,
            access_pub_key: AccessPubKey(Wallet::from_seed([3; 32]).public_key().0),
            created_at: 1_700_000_000,
            nonce: [1; 16],
        },
    );
    let h = create.lease_hash();
    vec![create, LeaseEvent::settle(&c, h, 1_700_000_009)]
}

#[test]
fn event_lists_round_trip_and_hostile_ones_are_named() {
    let evs = events();
    let mut b = Vec::new();
    put_events(&mut b, &evs);
    assert_eq!(take_events(&b).expect("decodes"), evs);
    let err = |b: &[u8]| take_events(b).expect_err("refused").to_string();
    // A count no frame of this size can hold.
    let mut huge = b.clone();
    huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(err(&huge).contains("cannot fit"), "{}", err(&huge));
    assert!(err(&b[..b.len() - 1]).contains("truncated"));
    let mut trailing = b.clone();
    trailing.push(0);
    assert!(err(&trailing).contains("after the last event"));
    // JSON (what the stored form's decoder also reads) is not wire form.
    let json = serde_json::to_vec(&evs[1]).expect("json");
    let mut j = 1u32.to_be_bytes().to_vec();
    j.extend_from_slice(&u16::try_from(json.len()).expect("small").to_be_bytes());
    j.extend_from_slice(&json);
    assert!(err(&j).contains("not a binary event"));
}
