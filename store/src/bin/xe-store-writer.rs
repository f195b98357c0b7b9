//! Test helper for the crash test: applies leases to a store in a loop and
//! prints each lease hash only after `apply_event` returned (acknowledged).
//! The test kills it with SIGKILL and checks every printed hash survived.

use std::io::Write;

use xe_store::{Lease, LeaseEvent, Store, Wallet};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: xe-store-writer DIR START");
    let start: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let store = Store::open(std::path::Path::new(&dir)).expect("open store");
    let consumer = Wallet::from_seed([1; 32]);
    let access = Wallet::from_seed([3; 32]).public_key();
    let mut out = std::io::stdout().lock();
    // Bounded: the test kills us long before this runs out.
    for i in start..start + 1_000_000 {
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&i.to_be_bytes());
        let lease = Lease {
            consumer: consumer.public_key(),
            provider: Wallet::from_seed([2; 32]).address(),
            vcpus: 1,
            memory_mb: 512,
            disk_gb: 1,
            duration: 600,
            access_pub_key: xe_store::AccessPubKey(access.0),
            created_at: xe_store::now_secs(),
            nonce,
        };
        let ev = LeaseEvent::create(&consumer, lease);
        let applied = store.apply_event(&ev).expect("apply");
        assert!(
            matches!(applied, xe_store::Applied::Changed(_)),
            "{applied:?}"
        );
        writeln!(out, "{}", ev.lease_hash()).expect("stdout");
        out.flush().expect("flush");
    }
}
