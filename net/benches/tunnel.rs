//! Benchmark: throughput of one `/xe/tunnel/2.0.0` tunnel on loopback over
//! TCP+noise+yamux and over QUIC, against a plain TCP relay between the
//! same endpoints. 1 GiB per run, 3 runs each, median reported.
//!
//! Run: `cargo bench -p xe-net --bench tunnel` (release build).

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use xe_net::{NetConfig, NetRoles};
use xe_store::{LeaseHash, Store};

mod support;

use support::{AnyLease, RUNS, median, mibs, push, sink};

#[tokio::main]
async fn main() {
    let backend = sink().await;
    let cancel = CancellationToken::new();
    let mut pcfg = NetConfig::default();
    let mut provider_roles = NetRoles::new(libp2p::identity::Keypair::generate_ed25519());
    pcfg.listen = vec![
        "/ip4/127.0.0.1/tcp/0".parse().expect("addr"),
        "/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("addr"),
    ];
    provider_roles.validator = Some(Arc::new(AnyLease(backend)));
    let provider = xe_net::start(
        provider_roles,
        pcfg,
        Store::temporary().expect("store"),
        cancel.clone(),
    )
    .await
    .expect("start");
    let paddrs = provider.handle.p2p_addrs().await.expect("addrs");
    let pid = provider.handle.peer_id();

    for (label, proto) in [("TCP+noise+yamux", "/tcp/"), ("QUIC", "/quic-v1")] {
        let mut c = NetConfig::default();
        let client_roles = NetRoles::new(libp2p::identity::Keypair::generate_ed25519());
        c.listen = vec![];
        let client = xe_net::start(
            client_roles,
            c,
            Store::temporary().expect("store"),
            cancel.clone(),
        )
        .await
        .expect("start");
        let addr: Vec<_> = paddrs
            .iter()
            .filter(|a| a.to_string().contains(proto))
            .cloned()
            .collect();
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            let t = client
                .handle
                .open_tunnel(pid, addr.clone(), &LeaseHash([1; 32]))
                .await
                .expect("tunnel");
            runs.push(push(t).await);
        }
        let m = median(runs);
        println!(
            "tunnel over {label:<16}: 1 GiB in {:.2} s = {:.0} MiB/s (median of {RUNS})",
            m.as_secs_f64(),
            mibs(m)
        );
    }

    // Plain TCP relay between the same endpoints, as the floor.
    let relay = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let raddr = relay.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut a, _)) = relay.accept().await {
            tokio::spawn(async move {
                let mut b = TcpStream::connect(backend).await.expect("backend");
                let _ =
                    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 64 * 1024, 64 * 1024)
                        .await;
            });
        }
    });
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let s = TcpStream::connect(raddr).await.expect("relay");
        s.set_nodelay(true).expect("nodelay");
        runs.push(push(s).await);
    }
    let m = median(runs);
    println!(
        "plain TCP relay       : 1 GiB in {:.2} s = {:.0} MiB/s (median of {RUNS})",
        m.as_secs_f64(),
        mibs(m)
    );
    cancel.cancel();
}
