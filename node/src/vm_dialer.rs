//! The one way this node reaches a lease's VM.

use std::sync::Arc;

use tracing::info;
use xe_net::{NetHandle, TunnelError};
use xe_store::LeaseRecord;

use crate::gateway::{TunnelDialError, TunnelDialer, VmStream};

/// Opens a byte pipe to a lease's VM sshd: in-process when this node is
/// the lease's provider (a peer cannot open a stream to itself), else over
/// `/xe/tunnel/2.0.0` to the provider the directory names. The SSH gateway
/// and the HTTP API's tunnel both reach VMs through this.
pub struct VmDialer {
    net: NetHandle,
    /// Set when this node is also a provider: its own leases are reached
    /// in-process, since a peer cannot open a stream to itself.
    local: Option<Arc<crate::provider::Provider>>,
}

impl VmDialer {
    /// A dialer over `net`; `local` is this node's provider role, if any.
    pub fn new(net: NetHandle, local: Option<Arc<crate::provider::Provider>>) -> Self {
        VmDialer { net, local }
    }
}

#[async_trait::async_trait]
impl TunnelDialer for VmDialer {
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
