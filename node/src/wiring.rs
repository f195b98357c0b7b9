//! Glue between the gateway and the overlay: the libp2p implementation of
//! the gateway's `TunnelDialer`, and gateway start-up inside a node.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use xe_net::{NetHandle, TunnelError};
use xe_store::{LeaseRecord, Store};

use crate::gateway::{
    Gateway, GatewayConfig, GatewayStats, TunnelDialError, TunnelDialer, TunnelStream,
};
use crate::node::{NodeConfig, NodeError, SshConfig};

/// Opens tunnels over `/xe/tunnel/2.0.0` to the provider the directory names.
pub struct NetDialer {
    net: NetHandle,
}

impl NetDialer {
    /// A dialer over `net`.
    pub fn new(net: NetHandle) -> Self {
        NetDialer { net }
    }
}

#[async_trait::async_trait]
impl TunnelDialer for NetDialer {
    async fn open(&self, lease: &LeaseRecord) -> Result<TunnelStream, TunnelDialError> {
        let provider = lease.lease.provider;
        match self
            .net
            .open_tunnel_to_account(&provider, &lease.hash)
            .await
        {
            Ok(s) => {
                info!(lease = %lease.hash.short(), provider = %provider.short(), path = %s.path(), "tunnel opened");
                Ok(Box::new(s))
            }
            Err(TunnelError::Refused(m)) => {
                Err(TunnelDialError::new(format!("provider refused: {m}")))
            }
            Err(e) => Err(TunnelDialError::new(e.to_string())),
        }
    }
}

/// Bind and spawn the SSH gateway; returns its bound address and counters.
pub(crate) async fn start_gateway(
    cfg: &NodeConfig,
    ssh: &SshConfig,
    store: &Store,
    net: &NetHandle,
    cancel: &CancellationToken,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(SocketAddr, Arc<GatewayStats>), NodeError> {
    let mut gcfg = GatewayConfig::new(&cfg.data_dir);
    gcfg.max_connections = ssh.max_connections;
    gcfg.auth_grace = ssh.auth_grace;
    let stats = Arc::new(GatewayStats::new());
    let gateway = Gateway::new(
        gcfg,
        store.clone(),
        Arc::new(NetDialer::new(net.clone())),
        stats.clone(),
    )
    .map_err(|e| NodeError::Gateway(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(ssh.listen)
        .await
        .map_err(|source| NodeError::Io {
            what: format!("binding the SSH gateway to {}", ssh.listen),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| NodeError::Io {
        what: "reading the SSH gateway address".into(),
        source,
    })?;
    info!(%addr, fingerprint = %gateway.host_key_fingerprint(), "SSH gateway enabled");
    let token = cancel.child_token();
    tasks.spawn(async move {
        if let Err(e) = gateway.run(listener, token).await {
            error!("SSH gateway stopped: {e}");
        }
    });
    Ok((addr, stats))
}
