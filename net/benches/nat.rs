//! Benchmark: throughput of one `/xe/tunnel/2.0.0` tunnel on loopback,
//! direct versus through a circuit relay v2 relay (a third host in the same
//! process), TCP+noise+yamux underneath. 1 GiB per run, 3 runs each,
//! median reported.
//!
//! Run: `cargo bench -p xe-net --bench nat` (release build).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use xe_net::{ConnPath, Multiaddr, NetConfig, PeerId, TunnelValidator, VmConn};
use xe_store::{LeaseHash, Store};

const BYTES: u64 = 1 << 30;
const RUNS: usize = 3;

/// Backend: counts what it receives, answers the count (8 bytes) at EOF.
async fn sink() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    a
}

struct AnyLease(std::net::SocketAddr);

#[async_trait::async_trait]
impl TunnelValidator for AnyLease {
    async fn validate_tunnel_lease(&self, _: &LeaseHash, _: &PeerId) -> Result<(), String> {
        Ok(())
    }
    async fn dial_ssh(&self, _: &LeaseHash) -> Result<Box<dyn VmConn>, String> {
        let s = TcpStream::connect(self.0)
            .await
            .map_err(|e| e.to_string())?;
        let _ = s.set_nodelay(true);
        Ok(Box::new(s))
    }
}

async fn push<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> Duration {
    let block = vec![0x5au8; 256 * 1024];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < BYTES {
        s.write_all(&block).await.expect("write");
        sent += block.len() as u64;
    }
    s.shutdown().await.expect("shutdown");
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await.expect("count");
    assert_eq!(u64::from_be_bytes(n), BYTES, "bytes lost");
    t.elapsed()
}

fn mibs(d: Duration) -> f64 {
    (BYTES as f64 / (1024.0 * 1024.0)) / d.as_secs_f64()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn loopback_tcp() -> Vec<Multiaddr> {
    vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")]
}

#[tokio::main]
async fn main() {
    let cancel = CancellationToken::new();
    let store = || Store::temporary().expect("store");
    let key = libp2p::identity::Keypair::generate_ed25519;

    // The relay.
    let mut rcfg = NetConfig::new(key());
    rcfg.listen = loopback_tcp();
    rcfg.nat.relay_server = true;
    let relay = xe_net::start(rcfg, store(), cancel.clone())
        .await
        .expect("relay");
    let relay_addrs = relay.handle.p2p_addrs().await.expect("addrs");

    // The provider: listens on loopback (for the direct run) and reserves
    // on the relay. No hole punching anywhere, so the relayed run stays
    // relayed.
    let mut pcfg = NetConfig::new(key());
    pcfg.listen = loopback_tcp();
    pcfg.bootstrap = relay_addrs;
    pcfg.nat.behind_nat = true;
    pcfg.nat.hole_punching = false;
    pcfg.validator = Some(Arc::new(AnyLease(sink().await)));
    let provider = xe_net::start(pcfg, store(), cancel.clone())
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
        let mut c = NetConfig::new(key());
        c.listen = vec![];
        c.nat.hole_punching = false;
        let client = xe_net::start(c, store(), cancel.clone())
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
