//! Benchmark: throughput of one `/xe/tunnel/2.0.0` tunnel on loopback,
//! direct versus through a circuit relay v2 relay (a third host in the same
//! process), TCP+noise+yamux underneath. 1 GiB per run, 3 runs each,
//! median reported.
//!
//! Run: `cargo bench -p xe-net --bench nat` (release build).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use xe_net::{ConnPath, Multiaddr, NetConfig, NetRoles};
use xe_store::{LeaseHash, Store};

mod support;

use support::{AnyLease, RUNS, median, mibs, push, sink};

fn loopback_tcp() -> Vec<Multiaddr> {
    vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")]
}

#[tokio::main]
async fn main() {
    let cancel = CancellationToken::new();
    let store = || Store::temporary().expect("store");
    let key = libp2p::identity::Keypair::generate_ed25519;

    // The relay.
    let mut rcfg = NetConfig::default();
    let relay_roles = NetRoles::new(key());
    rcfg.listen = loopback_tcp();
    rcfg.nat.relay_server = true;
    let relay = xe_net::start(relay_roles, rcfg, store(), cancel.clone())
        .await
        .expect("relay");
    let relay_addrs = relay.handle.p2p_addrs().await.expect("addrs");

    // The provider: listens on loopback (for the direct run) and reserves
    // on the relay. No hole punching anywhere, so the relayed run stays
    // relayed.
    let mut pcfg = NetConfig::default();
    let mut provider_roles = NetRoles::new(key());
    pcfg.listen = loopback_tcp();
    pcfg.bootstrap = relay_addrs;
    pcfg.nat.behind_nat = true;
    pcfg.nat.hole_punching = false;
    provider_roles.validator = Some(Arc::new(AnyLease(sink().await)));
    let provider = xe_net::start(provider_roles, pcfg, store(), cancel.clone())
        .await
        .expect("provider");
    let pid = provider.handle.peer_id();
    let direct = provider.handle.p2p_addrs().await.expect("addrs");
    let mut nat = provider.handle.nat();
    let circuit: Vec<Multiaddr> = tokio::time::timeout(
        Duration::from_secs(20),
        nat.wait_for(|i| !i.relay_addrs.is_empty()),
    )
    .await
    .expect("reservation in time")
    .expect("provider alive")
    .relay_addrs
    .iter()
    .map(|a| a.parse().expect("multiaddr"))
    .collect();

    for (label, addrs, want) in [
        ("direct", direct, ConnPath::Direct),
        ("relayed", circuit, ConnPath::Relayed),
    ] {
        let mut c = NetConfig::default();
        let client_roles = NetRoles::new(key());
        c.listen = vec![];
        c.nat.hole_punching = false;
        let client = xe_net::start(client_roles, c, store(), cancel.clone())
            .await
            .expect("client");
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            let t = client
                .handle
                .open_tunnel(pid, addrs.clone(), &LeaseHash([1; 32]))
                .await
                .expect("tunnel");
            assert_eq!(t.path(), want, "{label} run took the {} path", t.path());
            runs.push(push(t).await);
        }
        let m = median(runs);
        println!(
            "tunnel {label:<8} (TCP+noise+yamux): 1 GiB in {:.2} s = {:.0} MiB/s (median of {RUNS})",
            m.as_secs_f64(),
            mibs(m)
        );
    }
    cancel.cancel();
}
