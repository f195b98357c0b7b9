//! `Store::until_inactive`: a waiter wakes when its lease is settled or
//! expires, at once when it is inactive already, and leaves no trace.

use std::time::Duration;

use xe_store::*;

const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOZkcJ0O9Yl3MY5Wa7sObHRBuqoN2Ig0tGuo6dU2dQmD vm";

/// The bound on a broken implementation; the waits end on events.
const BOUND: Duration = Duration::from_secs(30);

/// An accepted lease of `duration` seconds, created and accepted `age`
/// seconds ago.
fn accepted_ago(store: &Store, duration: u64, age: u64, nonce: u8) -> (LeaseHash, Wallet) {
    let consumer = Wallet::from_seed([1; 32]);
    let provider = Wallet::from_seed([2; 32]);
    let now = now_secs() - age;
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
            created_at: now,
            nonce: [nonce; 16],
        },
    );
    let hash = create.lease_hash();
    store.apply_event(&create).expect("create");
    store
        .apply_event(&LeaseEvent::accept(&provider, hash, now, HOST_KEY.into()))
        .expect("accept");
    (hash, consumer)
}

/// An accepted lease of `duration` seconds, accepted now.
fn accepted(store: &Store, duration: u64, nonce: u8) -> (LeaseHash, Wallet) {
    accepted_ago(store, duration, 0, nonce)
}

#[tokio::test]
async fn a_settle_wakes_the_waiter_with_the_reason() {
    let store = Store::temporary().expect("store");
    let (hash, consumer) = accepted(&store, 3600, 1);
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.until_inactive(&hash).await })
    };
    // The waiter is registered once the table says so (no sleep needed
    // for correctness: a settle before registration is seen by its first
    // read; this only makes the test exercise the wake-up path).
    while store.leases_waited_on() == 0 {
        tokio::task::yield_now().await;
    }
    store
        .apply_event(&LeaseEvent::settle(&consumer, hash, now_secs()))
        .expect("settle");
    let why = tokio::time::timeout(BOUND, waiter)
        .await
        .expect("woken by the settle")
        .expect("task");
    assert_eq!(why, Inactive::Settled);
    assert_eq!(store.leases_waited_on(), 0, "the waiter left the table");
}

#[tokio::test]
async fn expiry_ends_the_wait_without_any_write() {
    let store = Store::temporary().expect("store");
    // The shortest lease (60 s), accepted 58 s ago: two seconds left.
    let (hash, _) = accepted_ago(&store, 60, 58, 2);
    assert_eq!(
        store.lease(&hash).expect("read").map(|r| r.access()),
        Some(Ok(()))
    );
    let why = tokio::time::timeout(BOUND, store.until_inactive(&hash))
        .await
        .expect("woken by the lease's end");
    assert_eq!(why, Inactive::Expired);
}

#[tokio::test]
async fn an_inactive_or_unknown_lease_ends_the_wait_at_once() {
    let store = Store::temporary().expect("store");
    let (hash, consumer) = accepted(&store, 3600, 3);
    store
        .apply_event(&LeaseEvent::settle(&consumer, hash, now_secs()))
        .expect("settle");
    assert_eq!(store.until_inactive(&hash).await, Inactive::Settled);
    assert_eq!(
        store.until_inactive(&LeaseHash([9; 32])).await,
        Inactive::Expired
    );
    assert_eq!(store.leases_waited_on(), 0);
}

#[tokio::test]
async fn a_change_to_another_lease_does_not_end_the_wait() {
    let store = Store::temporary().expect("store");
    let (kept, _) = accepted(&store, 3600, 4);
    let (other, consumer) = accepted(&store, 3600, 5);
    let wait = store.until_inactive(&kept);
    tokio::pin!(wait);
    // Poll once so the waiter is armed, then end the other lease.
    assert!(futures_poll_once(wait.as_mut()).await.is_none());
    store
        .apply_event(&LeaseEvent::settle(&consumer, other, now_secs()))
        .expect("settle other");
    assert!(
        futures_poll_once(wait.as_mut()).await.is_none(),
        "still active"
    );
}

/// Poll `f` once: `Some` if it finished.
async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
    let mut f = f;
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}
