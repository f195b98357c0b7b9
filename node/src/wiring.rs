//! Glue between the gateway and the overlay: the libp2p implementation of
//! the gateway's `TunnelDialer`, and gateway start-up inside a node.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use xe_net::{NetHandle, TunnelError};
use xe_store::{LeaseRecord, Store};

use crate::gateway::{
    Gateway, GatewayConfig, GatewayStats, TunnelDialError, TunnelDialer, VmStream,
};
use crate::node::{NodeConfig, NodeError, SshConfig};

/// Opens tunnels over `/xe/tunnel/2.0.0` to the provider the directory names.
pub struct NetDialer {
    net: NetHandle,
    /// Set when this node is also a provider: its own leases are reached
    /// in-process, since a peer cannot open a stream to itself.
    local: Option<Arc<crate::provider::Provider>>,
}

impl NetDialer {
    /// A dialer over `net`; `local` is this node's provider role, if any.
    pub fn new(net: NetHandle, local: Option<Arc<crate::provider::Provider>>) -> Self {
        NetDialer { net, local }
    }
}

#[async_trait::async_trait]
impl TunnelDialer for NetDialer {
    async fn open(&self, lease: &LeaseRecord) -> Result<VmStream, TunnelDialError> {
        let provider = lease.lease.provider;
        if let Some(p) = self.local.as_ref().filter(|p| p.address() == provider) {
            let s = p
                .open_local(&lease.hash, &self.net.peer_id())
                .await
                .map_err(|m| TunnelDialError::new(format!("provider refused: {m}")))?;
            info!(lease = %lease.hash.short(), path = "local", "tunnel opened");
            return Ok(Box::new(s));
        }
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
    local: Option<Arc<crate::provider::Provider>>,
    ssh: &SshConfig,
    store: &Store,
    net: &NetHandle,
    cancel: &CancellationToken,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(SocketAddr, Arc<GatewayStats>), NodeError> {
    let mut gcfg = GatewayConfig::new(&cfg.data_dir);
    gcfg.max_connections = ssh.max_connections;
    gcfg.auth_grace = ssh.auth_grace;
    gcfg.startups = ssh.startups;
    gcfg.startups_per_source = ssh.startups_per_source;
    gcfg.connect_rate = ssh.connect_rate;
    let stats = Arc::new(GatewayStats::new());
    let gateway = Gateway::new(
        gcfg,
        store.clone(),
        Arc::new(NetDialer::new(net.clone(), local)),
        stats.clone(),
    )?;
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
