//! Raw bytes into the SSH gateway, over a loopback socket.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use xe_node::gateway::{
    Gateway, GatewayConfig, GatewayStats, Startups, TunnelDialError, TunnelDialer, VmStream,
};
use xe_node::limits::RateLimit;
use xe_store::{LeaseRecord, Store};

use crate::rt;

struct NoTunnels;

#[async_trait::async_trait]
impl TunnelDialer for NoTunnels {
    async fn open(&self, _lease: &LeaseRecord) -> Result<VmStream, TunnelDialError> {
        Err(TunnelDialError::new("fuzzing: no providers"))
    }
}

struct Fixture {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        rt::block_on(async {
            let dir = tempfile::tempdir().expect("temp dir");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind gateway");
            let addr = listener.local_addr().expect("gateway addr");
            let mut config = GatewayConfig::new(dir.path());
            // One client makes every connection: lift the per-source and
            // rate limits so inputs reach russh instead of a refusal.
            config.max_connections = 10_000;
            config.startups = Startups {
                start: 10_000,
                rate_percent: 0,
                full: 10_000,
            };
            config.startups_per_source = 10_000;
            config.connect_rate = RateLimit {
                burst: u32::MAX,
                per_second: 1e9,
            };
            config.auth_rejection_time = Duration::ZERO;
            let gw = Gateway::new(
                config,
                Store::temporary().expect("store"),
                Arc::new(NoTunnels),
                Arc::new(GatewayStats::new()),
            )
            .expect("gateway");
            tokio::spawn(gw.run(listener, CancellationToken::new()));
            Fixture { addr, _dir: dir }
        })
    })
}

/// `data` as the bytes of one client connection to the SSH gateway: the
/// version line, then binary packets (unencrypted until a key exchange
/// completes, which a byte fuzzer cannot finish). Nothing may panic, and
/// the gateway must close the connection after the client's EOF.
pub fn ssh_gateway(data: &[u8]) {
    let f = fixture();
    let _ = rt::exchange(f.addr, data, Duration::from_secs(10));
}
