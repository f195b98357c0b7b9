//! Counters of the API itself (the HTTP tunnel and the write limits), read
//! by `GET /metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Statuses the tunnel endpoint refuses with; one counter each.
pub const TUNNEL_REFUSAL_STATUSES: [u16; 10] = [400, 401, 403, 404, 410, 426, 429, 500, 502, 503];

/// Live API counters.
#[derive(Debug, Default)]
pub struct ApiStats {
    tunnels_active: AtomicU64,
    tunnels_total: AtomicU64,
    tunnel_refusals: [AtomicU64; TUNNEL_REFUSAL_STATUSES.len()],
    /// Bytes from HTTP tunnel clients towards VMs.
    pub(crate) bytes_client_to_vm: Arc<AtomicU64>,
    /// Bytes from VMs towards HTTP tunnel clients.
    pub(crate) bytes_vm_to_client: Arc<AtomicU64>,
    rate_limited: AtomicU64,
    bodies_too_large: AtomicU64,
    bodies_too_slow: AtomicU64,
    connections_refused: AtomicU64,
}

/// Keeps `tunnels_active` incremented while alive.
#[derive(Debug)]
pub(crate) struct OpenTunnelGauge(Arc<ApiStats>);

impl Drop for OpenTunnelGauge {
    fn drop(&mut self) {
        self.0.tunnels_active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ApiStats {
    /// HTTP tunnels open now.
    pub fn tunnels_active(&self) -> u64 {
        self.tunnels_active.load(Ordering::Relaxed)
    }

    /// HTTP tunnels opened since start.
    pub fn tunnels_total(&self) -> u64 {
        self.tunnels_total.load(Ordering::Relaxed)
    }

    /// Tunnel requests refused with `status`, since start.
    pub fn tunnel_refusals(&self, status: u16) -> u64 {
        TUNNEL_REFUSAL_STATUSES
            .iter()
            .position(|s| *s == status)
            .map_or(0, |i| self.tunnel_refusals[i].load(Ordering::Relaxed))
    }

    /// Bytes client → VM through HTTP tunnels.
    pub fn bytes_client_to_vm(&self) -> u64 {
        self.bytes_client_to_vm.load(Ordering::Relaxed)
    }

    /// Bytes VM → client through HTTP tunnels.
    pub fn bytes_vm_to_client(&self) -> u64 {
        self.bytes_vm_to_client.load(Ordering::Relaxed)
    }

    /// Write requests refused with 429.
    pub fn rate_limited(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }

    /// Requests refused with 413.
    /// Requests whose body did not arrive in time (408), since start.
    pub fn bodies_too_slow(&self) -> u64 {
        self.bodies_too_slow.load(Ordering::Relaxed)
    }

    pub(crate) fn record_body_too_slow(&self) {
        self.bodies_too_slow.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections refused by the per-source or global cap, since start.
    pub fn connections_refused(&self) -> u64 {
        self.connections_refused.load(Ordering::Relaxed)
    }

    pub(crate) fn record_connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests refused with 413, since start.
    pub fn bodies_too_large(&self) -> u64 {
        self.bodies_too_large.load(Ordering::Relaxed)
    }

    pub(crate) fn tunnel_opened(self: &Arc<Self>) -> OpenTunnelGauge {
        self.tunnels_total.fetch_add(1, Ordering::Relaxed);
        self.tunnels_active.fetch_add(1, Ordering::Relaxed);
        OpenTunnelGauge(self.clone())
    }

    pub(crate) fn record_tunnel_refusal(&self, status: u16) {
        if let Some(i) = TUNNEL_REFUSAL_STATUSES.iter().position(|s| *s == status) {
            self.tunnel_refusals[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn record_rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_body_too_large(&self) {
        self.bodies_too_large.fetch_add(1, Ordering::Relaxed);
    }
}
