//! Benchmark: throughput of one `/xe/tunnel/2.0.0` tunnel on loopback over
//! TCP+noise+yamux and over QUIC, against a plain TCP relay between the
//! same endpoints. 1 GiB per run, 3 runs each, median reported.
//!
//! Run: `cargo bench -p xe-net --bench tunnel` (release build).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use xe_net::{NetConfig, PeerId, TunnelValidator, VmConn};
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

#[tokio::main]
async fn main() {
    let backend = sink().await;
    let cancel = CancellationToken::new();
    let mut pcfg = NetConfig::new(libp2p::identity::Keypair::generate_ed25519());
    pcfg.listen = vec![
        "/ip4/127.0.0.1/tcp/0".parse().expect("addr"),
        "/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("addr"),
    ];
    pcfg.validator = Some(Arc::new(AnyLease(backend)));
    let provider = xe_net::start(pcfg, Store::temporary().expect("store"), cancel.clone())
        .await
        .expect("start");
    let paddrs = provider.handle.p2p_addrs().await.expect("addrs");
    let pid = provider.handle.peer_id();

    for (label, proto) in [("TCP+noise+yamux", "/tcp/"), ("QUIC", "/quic-v1")] {
        let mut c = NetConfig::new(libp2p::identity::Keypair::generate_ed25519());
        c.listen = vec![];
        let client = xe_net::start(c, Store::temporary().expect("store"), cancel.clone())
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
