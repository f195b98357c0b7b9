//! Shared scaffolding for the tunnel throughput benches: a counting sink
//! behind the provider, a validator that admits any lease, and the 1 GiB
//! push that checks no byte was lost.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use xe_net::{PeerId, TunnelRefusal, TunnelValidator, VmConn};
use xe_store::LeaseHash;

/// Bytes pushed per run.
pub const BYTES: u64 = 1 << 30;
/// Runs per path; the median is reported.
pub const RUNS: usize = 3;

/// Backend: counts what it receives, answers the count (8 bytes) at EOF.
pub async fn sink() -> std::net::SocketAddr {
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

/// A provider validator that admits any lease and dials `0`.
pub struct AnyLease(pub std::net::SocketAddr);

#[async_trait::async_trait]
impl TunnelValidator for AnyLease {
    async fn validate_tunnel_lease(&self, _: &LeaseHash, _: &PeerId) -> Result<(), TunnelRefusal> {
        Ok(())
    }
    async fn until_inactive(&self, _: &LeaseHash) -> xe_store::Inactive {
        std::future::pending().await
    }
    async fn dial_ssh(&self, _: &LeaseHash) -> Result<Box<dyn VmConn>, TunnelRefusal> {
        let s = TcpStream::connect(self.0)
            .await
            .map_err(|e| TunnelRefusal::VmUnreachable(e.to_string()))?;
        let _ = s.set_nodelay(true);
        Ok(Box::new(s))
    }
}

/// Push [`BYTES`] through `s`, half-close, and check the sink's count.
pub async fn push<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> Duration {
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

/// MiB/s for one run of [`BYTES`].
pub fn mibs(d: Duration) -> f64 {
    (BYTES as f64 / (1024.0 * 1024.0)) / d.as_secs_f64()
}

/// Median of the runs.
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}
