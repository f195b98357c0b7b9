//! Range-based reconciliation between real sled stores: over an in-process
//! byte stream (to run many random cases), and between real libp2p hosts
//! on loopback (to check what crosses the wire).

mod common;

use std::time::Duration;

use common::*;
use proptest::prelude::*;
use tokio_util::compat::FuturesAsyncReadCompatExt;
use xe_net::replication::RECON_PROTOCOL;
use xe_net::replication::session::{self, ReconStats, Report};
use xe_store::syncset::{Bound, SyncKey};
use xe_store::{LeaseEvent, Store, Wallet, now_secs};

/// `n` leases, each created and accepted, every other one settled
/// (≈ 2.5 events per lease), nonces from `first`.
fn ledger(first: u32, n: u32) -> Vec<LeaseEvent> {
    let consumer = Wallet::from_seed([1; 32]);
    let provider = Wallet::from_seed([2; 32]);
    let t = now_secs();
    let mut out = Vec::new();
    for i in first..first + n {
        let mut l = lease_for(&consumer, &provider, 0);
        l.nonce[..4].copy_from_slice(&i.to_be_bytes());
        let create = LeaseEvent::create(&consumer, l);
        let h = create.lease_hash();
        out.push(create);
        out.push(LeaseEvent::accept(
            &provider,
            h,
            t,
            UNUSED_VM_HOST_KEY.into(),
        ));
        if i % 2 == 0 {
            out.push(LeaseEvent::settle(&consumer, h, t + 1));
        }
    }
    out
}

/// One session, `a` initiating, over an in-process stream.
async fn reconcile(a: &Store, b: &Store) -> (Report, Report) {
    let (mut x, mut y) = tokio::io::duplex(64 * 1024);
    let (sa, sb) = (ReconStats::default(), ReconStats::default());
    let (ra, rb) = tokio::join!(
        session::initiate(&mut x, a, &sa),
        session::respond(&mut y, b, &sb)
    );
    (ra.expect("initiator"), rb.expect("responder"))
}

fn fingerprint(s: &Store) -> xe_store::syncset::Fingerprint {
    s.with_sync_set(|set| set.fingerprint(&SyncKey::MIN, &Bound::End))
}

/// A lease's events in every order the permutation proptest uses
/// (create, competing accepts and settles, a racing cancel), for a few
/// leases, split at random between two stores with overlap.
fn event_pool() -> Vec<LeaseEvent> {
    let consumer = Wallet::from_seed([1; 32]);
    let provider = Wallet::from_seed([2; 32]);
    let t = now_secs();
    let mut out = Vec::new();
    for n in 0..4u8 {
        let create = LeaseEvent::create(&consumer, lease_for(&consumer, &provider, n));
        let h = create.lease_hash();
        out.extend([
            create,
            LeaseEvent::accept(&provider, h, t, UNUSED_VM_HOST_KEY.into()),
            LeaseEvent::accept(&provider, h, t + 5, UNUSED_VM_HOST_KEY.into()),
            LeaseEvent::settle(&consumer, h, t + 100),
            LeaseEvent::settle(&provider, h, t + 100),
            LeaseEvent::cancel(&consumer, h, t - 1),
        ]);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Two stores holding random overlapping subsets, each applied in a
    /// random order, hold the same records after reconciling; then a
    /// session between them costs a fixed few bytes.
    #[test]
    fn stores_with_random_overlapping_subsets_converge(
        in_a in proptest::collection::vec(any::<bool>(), 24),
        in_b in proptest::collection::vec(any::<bool>(), 24),
        order in Just((0..24usize).collect::<Vec<_>>()).prop_shuffle(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        let pool = event_pool();
        let (a, b) = (Store::temporary().expect("a"), Store::temporary().expect("b"));
        for &i in &order {
            // Order-dependent refusals (a cancel after an accept) are allowed.
            if in_a[i] { let _ = a.apply_event(&pool[i]); }
            if in_b[i] { let _ = b.apply_event(&pool[i]); }
        }
        rt.block_on(async {
            // A voided cancel can take one extra session to leave both sides.
            for _ in 0..3 {
                if fingerprint(&a) == fingerprint(&b) { break; }
                reconcile(&a, &b).await;
            }
        });
        prop_assert_eq!(fingerprint(&a), fingerprint(&b));
        prop_assert_eq!(a.leases().expect("a"), b.leases().expect("b"));
        // Pending events are not reconciled (issue 18.2): each side keeps
        // only those it was given, until their leases arrive.
        prop_assert_eq!(a.event_count(), b.event_count());
        let (ra, _) = rt.block_on(reconcile(&a, &b));
        prop_assert_eq!(ra.rounds, 1);
        prop_assert!(ra.bytes_sent + ra.bytes_received <= EQUAL_MAX_BYTES, "{:?}", ra);
    }
}

/// Frame bytes of a whole session between equal stores: one fingerprint
/// (≤ 30 bytes), an empty answer and the closing frame, with their length
/// prefixes. Independent of the number of events.
const EQUAL_MAX_BYTES: u64 = 64;

/// Equal stores of 2,500 events exchange the same few bytes as empty ones,
/// through a real libp2p stream between two hosts on loopback.
#[tokio::test]
async fn equal_stores_cost_a_fixed_few_bytes_between_hosts() {
    let hour = |c: &mut xe_net::NetConfig| c.resync_interval = Duration::from_secs(3600);
    let a = node_with(vec![], hour).await;
    let events = ledger(0, 1000);
    a.store.apply_events(&events).expect("a");
    let b = node_with(a.net.p2p_addrs().await.expect("addrs"), hour).await;
    b.store.apply_events(&events).expect("b");
    wait_peers(&b, 1).await;
    let mut control = b.net.control();
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        control.open_stream(a.net.peer_id(), RECON_PROTOCOL),
    )
    .await
    .expect("opened in time")
    .expect("stream");
    let report = session::initiate(&mut stream.compat(), &b.store, &ReconStats::default())
        .await
        .expect("session");
    assert_eq!(report.rounds, 1);
    assert_eq!(report.received, 0);
    assert!(
        report.bytes_sent + report.bytes_received <= EQUAL_MAX_BYTES,
        "{report:?}"
    );
}

/// Wait (bounded) until `store` holds `n` applied events, on its change
/// notifications.
async fn wait_events(store: &Store, n: usize) {
    let mut rx = store.subscribe();
    let fut = async {
        while store.event_count() < n {
            let _ = rx.recv().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .unwrap_or_else(|_| panic!("{} of {n} events after 60 s", store.event_count()));
}

/// A node that was offline while 1,000 events were written catches up
/// when it comes back, and what crosses the wire is about those 1,000
/// events, not the 5,000 it already had.
#[tokio::test]
async fn offline_node_catches_up_exchanging_only_the_difference() {
    let hour = |c: &mut xe_net::NetConfig| c.resync_interval = Duration::from_secs(3600);
    let a = node_with(vec![], hour).await;
    let old = ledger(0, 2000);
    a.store.apply_events(&old).expect("old");
    let addrs = a.net.p2p_addrs().await.expect("addrs");
    let mut b = node_with(addrs.clone(), hour).await;
    wait_events(&b.store, old.len()).await;
    let b_store = b.store.clone();
    // B goes offline; its store (and the directory holding it) stays.
    b.cancel.cancel();
    while b.tasks.join_next().await.is_some() {}

    // 400 new leases ≈ 1,000 events, written while B is away (straight
    // into A's store: no gossip can carry them).
    let new = ledger(1_000_000, 400);
    let d = new.len();
    a.store.apply_events(&new).expect("new");

    let key = xe_net::load_or_create_keypair(&b._dir.path().join("p2p_key")).expect("key");
    let mut cfg = xe_net::NetConfig::default();
    let roles = xe_net::NetRoles::new(key);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
    cfg.bootstrap = addrs;
    cfg.resync_interval = Duration::from_secs(3600);
    let cancel = tokio_util::sync::CancellationToken::new();
    let back = xe_net::start(roles, cfg, b_store.clone(), cancel.clone())
        .await
        .expect("restart");
    wait_events(&b_store, old.len() + d).await;
    let s = &back.handle.stats().recon;
    let total = s.bytes_sent.load(std::sync::atomic::Ordering::Relaxed)
        + s.bytes_received.load(std::sync::atomic::Ordering::Relaxed);
    // The new events' wire form (length + stored form), plus a bound for
    // the ranges that located them.
    let wire = |evs: &[LeaseEvent]| -> usize {
        evs.iter()
            .map(|e| 2 + xe_store::codec::encode_event(e).len())
            .sum()
    };
    let payload = wire(&new);
    let full = wire(&old);
    // Locating them costs their ids (32 bytes, both ways) and the
    // fingerprints of the ranges around them: ≈ 90 bytes an event here
    // (291 kB in all for 200 kB of events), never anything like the
    // 1 MB of events B already had.
    assert!(
        (total as usize) < payload + 96 * d + 32 * 1024,
        "{total} bytes for {d} events of {payload} bytes (the old ones: {full})"
    );
    assert_eq!(fingerprint(&a.store), fingerprint(&b_store));
    cancel.cancel();
}

/// A lease compacted on A and still held by B (which keeps everything):
/// B's reconciliation pushes its old events to A, and A takes none of
/// them back. Nothing is revived.
#[tokio::test]
async fn a_compacted_lease_pushed_back_by_a_peer_is_not_revived() {
    let a = node(vec![]).await;
    let keep_all = |c: &mut xe_net::NetConfig| c.compact = false;
    let b = node_with(a.net.p2p_addrs().await.expect("addrs"), keep_all).await;
    wait_peers(&b, 1).await;
    // A one-day lease created 4.5 days ago and settled at once: it ended
    // (at its expiry) 3.5 days ago, past the 3-day window, and its create
    // is not stale yet (that is 5 days after creation), so B still takes it.
    let consumer = Wallet::from_seed([1; 32]);
    let provider = Wallet::from_seed([2; 32]);
    let t = now_secs() - 4 * 86_400 - 43_200;
    let mut l = lease_for(&consumer, &provider, 42);
    l.created_at = t;
    l.duration = 86_400;
    let create = LeaseEvent::create(&consumer, l);
    let h = create.lease_hash();
    let old = vec![
        create,
        LeaseEvent::accept(&provider, h, t + 1, UNUSED_VM_HOST_KEY.into()),
        LeaseEvent::settle(&consumer, h, t + 2),
    ];
    a.store.apply_events(&old).expect("a");
    b.store.apply_events(&old).expect("b");
    a.store.compact(now_secs()).expect("compact");
    assert!(a.store.is_compacted(&h).expect("read"));
    let before = fingerprint(&a.store);

    let mut control = b.net.control();
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        control.open_stream(a.net.peer_id(), RECON_PROTOCOL),
    )
    .await
    .expect("opened in time")
    .expect("stream");
    let report = session::initiate(&mut stream.compat(), &b.store, &ReconStats::default())
        .await
        .expect("session");
    assert_eq!(report.sent, 3, "B offered its old events: {report:?}");
    assert!(a.store.lease(&h).expect("read").is_none());
    assert_eq!(a.store.event_count(), 0);
    assert_eq!(a.store.pending_count(), 0);
    assert_eq!(fingerprint(&a.store), before);
}

/// A host with `replicate` off (a one-tunnel consumer) does not answer
/// reconciliation: a peer's session is refused as an unsupported protocol,
/// so no provider streams its ledger into it.
#[tokio::test]
async fn a_host_that_does_not_replicate_refuses_reconciliation() {
    let a = node(vec![]).await;
    let b = node_with(a.net.p2p_addrs().await.expect("addrs"), |c| {
        c.replicate = false;
    })
    .await;
    wait_peers(&a, 1).await;
    let control = a.net.control();
    let open_recon = |peer| {
        let mut control = control.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(20),
                control.open_stream(peer, RECON_PROTOCOL),
            )
            .await
            .expect("the open is answered")
        }
    };
    let opened = open_recon(b.net.peer_id()).await;
    assert!(
        matches!(
            opened,
            Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_))
        ),
        "reconciliation with a non-replicating host: {:?}",
        opened.map(drop)
    );
    // A replicating host answers the same open.
    let c = node(a.net.p2p_addrs().await.expect("addrs")).await;
    wait_peers(&a, 2).await;
    let opened = open_recon(c.net.peer_id()).await;
    assert!(
        opened.is_ok(),
        "a replicating host answers: {:?}",
        opened.map(drop)
    );
}
