//! Pending flood bench (issue 18.2), bounded: one source floods
//! `XE_FLOOD_N` (default 120,000) settles for leases nobody has, each
//! signed by a fresh key, into a real sled store, in pages of 1,000; then
//! an honest peer's accept races its create. Reports events stored,
//! refused, and whether the honest event got through. Run:
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-ready nice -n 10 cargo test --release -p xe-store \
//!     --test flood_bench -- --ignored --nocapture
//! ```

use std::time::Instant;

use xe_store::*;

const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOZkcJ0O9Yl3MY5Wa7sObHRBuqoN2Ig0tGuo6dU2dQmD vm";

/// The one call that differs between versions (`bench/pending_flood.sh`
/// swaps it for `apply_events` to measure the code before 18.2).
fn apply(s: &Store, evs: &[LeaseEvent], from: &str) -> Vec<Result<Applied, StoreError>> {
    s.apply_events_from(evs, &Source::Peer(from.into()))
        .expect("write")
}

fn orphan(i: u32) -> LeaseEvent {
    let mut seed = [0x72; 32];
    seed[..4].copy_from_slice(&i.to_be_bytes());
    let mut lease = [0xBC; 32];
    lease[..4].copy_from_slice(&i.to_be_bytes());
    LeaseEvent::settle(&Wallet::from_seed(seed), LeaseHash(lease), now_secs())
}

#[test]
#[ignore = "bench: run with --ignored --nocapture"]
fn pending_flood_from_one_source() {
    let n: u32 = std::env::var("XE_FLOOD_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120_000);
    // `XE_FLOOD_SOURCES` > 1 spreads the flood over that many sources
    // (a Sybil with many peer ids), in equal runs.
    let sources: u32 = std::env::var("XE_FLOOD_SOURCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let per = n.div_ceil(sources).max(1);
    let dir = tempfile::tempdir().expect("tmp");
    let s = Store::open(dir.path()).expect("store");
    let (mut stored, mut refused) = (0usize, 0usize);
    let t = Instant::now();
    for first in (0..n).step_by(1000) {
        let evs: Vec<LeaseEvent> = (first..n.min(first + 1000)).map(orphan).collect();
        let from = format!("flooder{}", first / per);
        for r in apply(&s, &evs, &from) {
            match r {
                Ok(Applied::Pending) => stored += 1,
                Err(_) => refused += 1,
                Ok(other) => panic!("unexpected {other:?}"),
            }
        }
    }
    let flood_secs = t.elapsed().as_secs_f64();
    let (c, p) = (Wallet::from_seed([1; 32]), Wallet::from_seed([2; 32]));
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
            created_at: now_secs(),
            nonce: [9; 16],
        },
    );
    let h = create.lease_hash();
    let accept = LeaseEvent::accept(&p, h, now_secs(), HOST_KEY.into());
    let honest = apply(&s, std::slice::from_ref(&accept), "honest").remove(0);
    apply(&s, std::slice::from_ref(&create), "other");
    let state = s.lease(&h).expect("read").map(|r| r.state());
    println!(
        "flood of {n} from {sources} source(s): stored {stored}, refused {refused} ({flood_secs:.1} s); \
         pending held {}; honest racing accept: {honest:?}; lease after its create: {state:?}",
        s.pending_count()
    );
}
