//! The reconciliation logic alone, over in-memory sets: convergence for
//! random overlapping sets, and what it costs.

use std::collections::HashMap;

use proptest::prelude::*;
use xe_store::EventId;
use xe_store::syncset::{Bound, SyncKey, SyncSet};

use super::*;

fn key(i: u64, ts_spread: u64) -> SyncKey {
    use sha2::{Digest, Sha256};
    SyncKey {
        ts: 1_700_000_000 + i % ts_spread.max(1),
        id: EventId(Sha256::digest(i.to_be_bytes()).into()),
    }
}

struct Run {
    rounds: usize,
    bytes: usize,
}

/// One session of `a` (initiator) with `b`, through the wire encoding,
/// then the transfers it found, as the real session performs them.
fn session(a: &mut SyncSet, b: &mut SyncSet, all: &HashMap<EventId, SyncKey>) -> Run {
    let mut f = Findings::default();
    let mut msg = initial(a);
    let mut run = Run {
        rounds: 0,
        bytes: 0,
    };
    while !msg.is_done() {
        assert!(run.rounds < 64, "reconciliation did not finish");
        run.rounds += 1;
        let wire = encode(&msg);
        run.bytes += wire.len();
        let reply = process(
            b,
            &decode(&wire).expect("decodes"),
            Role::Responder,
            &mut Findings::default(),
        );
        let wire = encode(&reply);
        run.bytes += wire.len();
        msg = process(a, &decode(&wire).expect("decodes"), Role::Initiator, &mut f);
    }
    for id in &f.need {
        a.insert(all[id]);
    }
    for (lo, hi) in &f.need_ranges {
        for k in b.keys(lo, hi, usize::MAX) {
            a.insert(k);
        }
    }
    for id in &f.have {
        b.insert(all[id]);
    }
    for (lo, hi) in &f.have_ranges {
        for k in a.keys(lo, hi, usize::MAX) {
            b.insert(k);
        }
    }
    run
}

fn sets(
    n: u64,
    ts_spread: u64,
    in_a: impl Fn(u64) -> bool,
    in_b: impl Fn(u64) -> bool,
) -> (SyncSet, SyncSet, HashMap<EventId, SyncKey>) {
    let (mut a, mut b, mut all) = (SyncSet::new(), SyncSet::new(), HashMap::new());
    for i in 0..n {
        let k = key(i, ts_spread);
        all.insert(k.id, k);
        if in_a(i) {
            a.insert(k);
        }
        if in_b(i) {
            b.insert(k);
        }
    }
    (a, b, all)
}

fn same(a: &SyncSet, b: &SyncSet) -> bool {
    a.keys(&SyncKey::MIN, &Bound::End, usize::MAX) == b.keys(&SyncKey::MIN, &Bound::End, usize::MAX)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Any two overlapping subsets of one universe are equal after one
    /// session, whatever the sizes and however many keys share a timestamp.
    #[test]
    fn random_overlapping_sets_converge(
        n in 0u64..3000,
        spread in 1u64..500,
        seed_a in any::<u64>(),
        seed_b in any::<u64>(),
        pa in 0u64..=100,
        pb in 0u64..=100,
    ) {
        let pick = |seed: u64, p: u64| move |i: u64| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed).rotate_left(17) % 100 < p;
        let (mut a, mut b, all) = sets(n, spread, pick(seed_a, pa), pick(seed_b, pb));
        session(&mut a, &mut b, &all);
        prop_assert!(same(&a, &b));
        // And a second session between the now-equal sets costs one
        // fingerprint each way, whatever n is.
        let again = session(&mut a, &mut b, &all);
        prop_assert_eq!(again.rounds, 1);
        prop_assert!(again.bytes <= EQUAL_SETS_MAX_BYTES, "{} bytes", again.bytes);
    }
}

/// The fixed bound on a session between equal sets (one fingerprint and
/// an empty answer; the count is a varint, so it grows by one byte per 7
/// bits of N, up to 10).
const EQUAL_SETS_MAX_BYTES: usize = 32;

#[test]
fn equal_sets_cost_the_same_at_any_size() {
    for n in [0u64, 1, 1_000, 100_000] {
        let (mut a, mut b, all) = sets(n, 86_400, |_| true, |_| true);
        let run = session(&mut a, &mut b, &all);
        assert_eq!(run.rounds, 1, "n = {n}");
        assert!(
            run.bytes <= EQUAL_SETS_MAX_BYTES,
            "n = {n}: {} bytes",
            run.bytes
        );
    }
}

/// d recent keys missing on one side of 100k: the bytes grow with d and
/// only slowly with N (O(d · log N)), far from the 3.2 MB of ids a full
/// exchange would take.
#[test]
fn a_few_differences_cost_a_few_ranges() {
    let n = 100_000u64;
    for d in [1u64, 10, 100] {
        // Keys are in time order by index: the missing ones are the newest.
        let (mut a, mut b, all) = sets(n, n, |i| i < n - d, |_| true);
        let run = session(&mut a, &mut b, &all);
        assert!(same(&a, &b));
        let bound = 2_000 + (d as usize) * 1_500;
        assert!(
            run.bytes < bound,
            "d = {d}: {} bytes, bound {bound}",
            run.bytes
        );
        // Scattered differences (not only the newest) cost more ranges
        // but stay in the same order.
        let (mut a, mut b, all) = sets(n, n, |i| i % (n / d) != 7, |_| true);
        let run = session(&mut a, &mut b, &all);
        assert!(same(&a, &b));
        let bound = 2_000 + (d as usize) * 6_000;
        assert!(
            run.bytes < bound,
            "scattered d = {d}: {} bytes, bound {bound}",
            run.bytes
        );
    }
}

#[test]
fn an_empty_side_moves_the_whole_range_in_one_round_trip() {
    let (mut a, mut b, all) = sets(50_000, 1_000, |_| false, |_| true);
    let run = session(&mut a, &mut b, &all);
    assert_eq!(run.rounds, 1);
    assert!(same(&a, &b));
    let (mut a, mut b, all) = sets(50_000, 1_000, |_| true, |_| false);
    let run = session(&mut a, &mut b, &all);
    assert_eq!(run.rounds, 1);
    assert!(same(&a, &b));
}

#[test]
fn hostile_messages_are_refused_not_panicked_on() {
    assert_eq!(decode(&[]), Err(DecodeError::Truncated(0)));
    assert_eq!(decode(&[2]), Err(DecodeError::Version(2)));
    assert!(matches!(
        decode(&[1, 9]),
        Err(DecodeError::Tag { what: "bound", .. })
    ));
    // End, then another range.
    assert!(matches!(
        decode(&[1, 0, 0, 0, 0]),
        Err(DecodeError::Order(1))
    ));
    // Bounds going down.
    let down = [1, 1, 5, 0, 0, 1, 4, 0, 0];
    assert!(matches!(decode(&down), Err(DecodeError::Order(1))));
    // An id list claiming more ids than there are bytes.
    assert!(matches!(
        decode(&[1, 0, 2, 0x7f]),
        Err(DecodeError::TooLarge(_))
    ));
    // An id prefix over 32 bytes.
    assert!(matches!(
        decode(&[1, 1, 0, 33]),
        Err(DecodeError::TooLarge(_))
    ));
    // A valid message round-trips.
    let (a, _, _) = sets(100, 10, |_| true, |_| false);
    let m = Message {
        ranges: a
            .split(&SyncKey::MIN, &Bound::End, 16)
            .into_iter()
            .map(|(upper, fp)| Range {
                upper,
                mode: Mode::Fp(fp),
            })
            .collect(),
    };
    assert_eq!(decode(&encode(&m)), Ok(m));
}
