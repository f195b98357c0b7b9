//! Benchmark: on a 20-node loopback network, the time from publishing a
//! lease event on one node until every node has applied it.
//!
//! Run: `cargo bench -p xe-net --bench replication` (release build).
//! Bounded: 20 nodes, 30 measured events, 30 s per event at most.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use xe_net::{NetConfig, NetHandle, NetRoles};
use xe_store::{Lease, LeaseEvent, LeaseHash, Store, Wallet, now_secs};

const NODES: usize = 20;
const EVENTS: usize = 30;

struct N {
    net: NetHandle,
    store: Store,
    /// Dropping the JoinSet would abort the node; keep it for the run.
    _tasks: tokio::task::JoinSet<()>,
}

async fn start(boot: Vec<xe_net::Multiaddr>, cancel: &CancellationToken) -> N {
    let store = Store::temporary().expect("store");
    let mut cfg = NetConfig::default();
    let roles = NetRoles::new(libp2p::identity::Keypair::generate_ed25519());
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
    cfg.bootstrap = boot;
    let net = xe_net::start(roles, cfg, store.clone(), cancel.child_token())
        .await
        .expect("start");
    N {
        net: net.handle,
        store,
        _tasks: net.tasks,
    }
}

async fn all_have(nodes: &[N], h: &LeaseHash) {
    for n in nodes {
        let mut rx = n.store.subscribe();
        while n.store.lease(h).expect("read").is_none() {
            let _ = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("propagation within 30 s");
        }
    }
}

fn event(consumer: &Wallet, provider: &Wallet, i: u32) -> LeaseEvent {
    let mut nonce = [0u8; 16];
    nonce[..4].copy_from_slice(&i.to_be_bytes());
    LeaseEvent::create(
        consumer,
        Lease {
            consumer: consumer.public_key(),
            provider: provider.address(),
            vcpus: 1,
            memory_mb: 512,
            disk_gb: 1,
            duration: 600,
            access_pub_key: xe_store::AccessPubKey(Wallet::from_seed([3; 32]).public_key().0),
            created_at: now_secs(),
            nonce,
        },
    )
}

#[tokio::main]
async fn main() {
    let cancel = CancellationToken::new();
    let mut nodes: Vec<N> = Vec::new();
    // Each node bootstraps to two earlier ones: a connected random graph,
    // not a star, so events take several gossip hops.
    for i in 0..NODES {
        let mut boot = Vec::new();
        for j in [i.wrapping_sub(1), i / 2] {
            if j < i {
                boot.extend(nodes[j].net.p2p_addrs().await.expect("addrs"));
            }
        }
        nodes.push(start(boot, &cancel).await);
    }
    let consumer = Wallet::from_seed([1; 32]);
    let provider = Wallet::from_seed([2; 32]);
    // Warm-up: let the gossip mesh form.
    for w in 0..3u32 {
        let ev = event(&consumer, &provider, 1_000_000 + w);
        let h = ev.lease_hash();
        nodes[0].net.publish_event(ev).await.expect("publish");
        all_have(&nodes, &h).await;
    }
    let mut samples = Vec::new();
    for i in 0..EVENTS {
        let origin = (i * 7) % NODES;
        let ev = event(&consumer, &provider, i as u32);
        let h = ev.lease_hash();
        let t = Instant::now();
        nodes[origin].net.publish_event(ev).await.expect("publish");
        all_have(&nodes, &h).await;
        samples.push(t.elapsed());
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "replication to all {NODES} nodes over {EVENTS} events: median {:.1} ms, p90 {:.1} ms, min {:.1} ms, max {:.1} ms",
        ms(samples[EVENTS / 2]),
        ms(samples[EVENTS * 9 / 10]),
        ms(samples[0]),
        ms(samples[EVENTS - 1]),
    );
    cancel.cancel();
}
