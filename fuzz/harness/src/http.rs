//! Raw bytes into the HTTP API of a real node, over a loopback socket.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use xe_api::{ApiConfig, ApiContext, RateLimit};
use xe_node::{Node, NodeConfig};

use crate::rt;

struct Fixture {
    addr: SocketAddr,
    _node: Node,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        rt::block_on(async {
            let dir = tempfile::tempdir().expect("temp dir");
            let mut cfg = NodeConfig::new(dir.path().to_path_buf());
            cfg.net.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
            let node = Node::start(cfg).await.expect("start node");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind api");
            let addr = listener.local_addr().expect("api addr");
            // One client sends everything: lift the per-source limits so
            // inputs reach the handlers instead of a 429.
            let config = ApiConfig {
                write_rate: RateLimit {
                    burst: u32::MAX,
                    per_second: 1e9,
                },
                max_connections_per_source: 10_000,
                max_connections: 10_000,
                ..ApiConfig::default()
            };
            let (_handle, serve) = xe_api::start(
                listener,
                ApiContext::from_node(&node),
                config,
                CancellationToken::new(),
            )
            .expect("start api");
            tokio::spawn(serve);
            Fixture {
                addr,
                _node: node,
                _dir: dir,
            }
        })
    })
}

/// `data` as the bytes of one client connection to the API of a node on
/// loopback (no provider role): requests, pipelined requests, bodies,
/// upgrades. Nothing may panic, and the API must close the connection
/// after the client's EOF.
pub fn http_api(data: &[u8]) {
    let f = fixture();
    let _ = rt::exchange(f.addr, data, Duration::from_secs(10));
}
