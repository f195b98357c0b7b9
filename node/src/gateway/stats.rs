//! Counters the HTTP API exports. Plain atomics: the gateway only adds,
//! readers take a [`GatewayStatsSnapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

/// Why an authentication attempt was rejected. A small fixed set so it can
/// be a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthFailure {
    /// The username is not a 64-character hex lease hash.
    MalformedUsername,
    /// No lease with that hash is known to this node.
    UnknownLease,
    /// The lease exists but the provider has not accepted it yet.
    LeaseNotAccepted,
    /// The lease was settled.
    LeaseSettled,
    /// The lease was cancelled.
    LeaseCancelled,
    /// The provider declined the lease.
    LeaseDeclined,
    /// The lease's time ran out.
    LeaseExpired,
    /// The lease carries no usable access key.
    NoAccessKey,
    /// The presented key is not a plain `ssh-ed25519` key (RSA, ECDSA,
    /// certificates, security keys…).
    WrongKeyType,
    /// An ed25519 key that is not the lease's access key.
    WrongKey,
    /// The local store could not be read.
    StoreError,
    /// Every session slot (`max_connections`) is taken.
    GatewayFull,
}

impl AuthFailure {
    /// Every reason, in label order.
    pub const ALL: [AuthFailure; 12] = [
        AuthFailure::MalformedUsername,
        AuthFailure::UnknownLease,
        AuthFailure::LeaseNotAccepted,
        AuthFailure::LeaseSettled,
        AuthFailure::LeaseCancelled,
        AuthFailure::LeaseDeclined,
        AuthFailure::LeaseExpired,
        AuthFailure::NoAccessKey,
        AuthFailure::WrongKeyType,
        AuthFailure::WrongKey,
        AuthFailure::StoreError,
        AuthFailure::GatewayFull,
    ];

    /// The metrics label.
    pub fn as_str(&self) -> &'static str {
        match self {
            AuthFailure::MalformedUsername => "malformed_username",
            AuthFailure::UnknownLease => "unknown_lease",
            AuthFailure::LeaseNotAccepted => "lease_not_accepted",
            AuthFailure::LeaseSettled => "lease_settled",
            AuthFailure::LeaseCancelled => "lease_cancelled",
            AuthFailure::LeaseDeclined => "lease_declined",
            AuthFailure::LeaseExpired => "lease_expired",
            AuthFailure::NoAccessKey => "no_access_key",
            AuthFailure::WrongKeyType => "wrong_key_type",
            AuthFailure::WrongKey => "wrong_key",
            AuthFailure::StoreError => "store_error",
            AuthFailure::GatewayFull => "gateway_full",
        }
    }

    fn index(&self) -> usize {
        *self as usize
    }
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a connection was closed without (or before) being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionRefusal {
    /// `max_connections` sessions were already authenticated.
    ConnectionLimit,
    /// Too many unauthenticated connections in all (`MaxStartups`).
    Startups,
    /// Too many unauthenticated connections from this source.
    SourceStartups,
    /// The client did not authenticate within the grace time.
    AuthTimeout,
    /// The SSH version exchange failed (not an SSH client, or it hung up).
    Handshake,
}

impl ConnectionRefusal {
    /// Every reason, in label order.
    pub const ALL: [ConnectionRefusal; 5] = [
        ConnectionRefusal::ConnectionLimit,
        ConnectionRefusal::Startups,
        ConnectionRefusal::SourceStartups,
        ConnectionRefusal::AuthTimeout,
        ConnectionRefusal::Handshake,
    ];

    /// The metrics label.
    pub fn as_str(&self) -> &'static str {
        match self {
            ConnectionRefusal::ConnectionLimit => "connection_limit",
            ConnectionRefusal::Startups => "startups",
            ConnectionRefusal::SourceStartups => "source_startups",
            ConnectionRefusal::AuthTimeout => "auth_timeout",
            ConnectionRefusal::Handshake => "handshake",
        }
    }

    fn index(&self) -> usize {
        *self as usize
    }
}

impl std::fmt::Display for ConnectionRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Live gateway counters. Share one `Arc<GatewayStats>` between the gateway
/// and whatever exports it.
#[derive(Debug, Default)]
pub struct GatewayStats {
    connections_active: AtomicU64,
    connections_total: AtomicU64,
    refused: [AtomicU64; ConnectionRefusal::ALL.len()],
    auth_successes: AtomicU64,
    auth_failures: [AtomicU64; AuthFailure::ALL.len()],
    channels_refused: AtomicU64,
    tunnels_active: AtomicU64,
    tunnels_total: AtomicU64,
    tunnel_failures: AtomicU64,
    lease_disconnects: AtomicU64,
    accept_errors: AtomicU64,
    paced: AtomicU64,
    bytes_client_to_vm: AtomicU64,
    bytes_vm_to_client: AtomicU64,
}

/// A point-in-time copy of [`GatewayStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayStatsSnapshot {
    /// Connections open now (authenticated or not).
    pub connections_active: u64,
    /// Connections accepted since start (refused ones excluded).
    pub connections_total: u64,
    /// Connections closed unserved, by reason.
    pub refused: Vec<(ConnectionRefusal, u64)>,
    /// Successful authentications.
    pub auth_successes: u64,
    /// Rejected authentication attempts, by reason.
    pub auth_failures: Vec<(AuthFailure, u64)>,
    /// Channel opens refused (per-connection cap, unsupported type).
    pub channels_refused: u64,
    /// Tunnels to VMs open now.
    pub tunnels_active: u64,
    /// Tunnels opened since start.
    pub tunnels_total: u64,
    /// Tunnel opens that failed (provider unreachable or refusing).
    pub tunnel_failures: u64,
    /// Connections closed because their lease was settled, cancelled or
    /// expired.
    pub lease_disconnects: u64,
    /// Errors from `accept()` on the listener (the loop kept going).
    pub accept_errors: u64,
    /// Connections whose key exchange waited for their source's rate.
    pub paced: u64,
    /// Payload bytes from SSH clients to VMs.
    pub bytes_client_to_vm: u64,
    /// Payload bytes from VMs to SSH clients.
    pub bytes_vm_to_client: u64,
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

impl GatewayStats {
    /// Fresh zeroed counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Connections open now.
    pub fn connections_active(&self) -> u64 {
        get(&self.connections_active)
    }

    /// Connections accepted since start.
    pub fn connections_total(&self) -> u64 {
        get(&self.connections_total)
    }

    /// Connections refused for `reason`.
    pub fn refused(&self, reason: ConnectionRefusal) -> u64 {
        get(&self.refused[reason.index()])
    }

    /// Successful authentications.
    pub fn auth_successes(&self) -> u64 {
        get(&self.auth_successes)
    }

    /// Authentication attempts rejected for `reason`.
    pub fn auth_failures(&self, reason: AuthFailure) -> u64 {
        get(&self.auth_failures[reason.index()])
    }

    /// Tunnels open now.
    pub fn tunnels_active(&self) -> u64 {
        get(&self.tunnels_active)
    }

    /// Tunnel opens that failed.
    pub fn tunnel_failures(&self) -> u64 {
        get(&self.tunnel_failures)
    }

    /// Connections closed because their lease ended.
    pub fn lease_disconnects(&self) -> u64 {
        get(&self.lease_disconnects)
    }

    /// Payload bytes client → VM.
    pub fn bytes_client_to_vm(&self) -> u64 {
        get(&self.bytes_client_to_vm)
    }

    /// Payload bytes VM → client.
    pub fn bytes_vm_to_client(&self) -> u64 {
        get(&self.bytes_vm_to_client)
    }

    /// Copy every counter.
    pub fn snapshot(&self) -> GatewayStatsSnapshot {
        GatewayStatsSnapshot {
            connections_active: self.connections_active(),
            connections_total: self.connections_total(),
            refused: ConnectionRefusal::ALL
                .iter()
                .map(|r| (*r, self.refused(*r)))
                .collect(),
            auth_successes: self.auth_successes(),
            auth_failures: AuthFailure::ALL
                .iter()
                .map(|r| (*r, self.auth_failures(*r)))
                .collect(),
            channels_refused: get(&self.channels_refused),
            tunnels_active: self.tunnels_active(),
            tunnels_total: get(&self.tunnels_total),
            tunnel_failures: self.tunnel_failures(),
            lease_disconnects: self.lease_disconnects(),
            accept_errors: get(&self.accept_errors),
            paced: get(&self.paced),
            bytes_client_to_vm: self.bytes_client_to_vm(),
            bytes_vm_to_client: self.bytes_vm_to_client(),
        }
    }

    // ---- updates (gateway-internal) ----

    pub(crate) fn connection_opened(self: &std::sync::Arc<Self>) -> ActiveGuard {
        inc(&self.connections_total);
        ActiveGuard::new(self.clone(), Gauge::Connections)
    }

    pub(crate) fn tunnel_opened(self: &std::sync::Arc<Self>) -> ActiveGuard {
        inc(&self.tunnels_total);
        ActiveGuard::new(self.clone(), Gauge::Tunnels)
    }

    pub(crate) fn record_refusal(&self, reason: ConnectionRefusal) {
        inc(&self.refused[reason.index()]);
    }

    pub(crate) fn record_auth_failure(&self, reason: AuthFailure) {
        inc(&self.auth_failures[reason.index()]);
    }

    pub(crate) fn record_auth_success(&self) {
        inc(&self.auth_successes);
    }

    pub(crate) fn record_channel_refused(&self) {
        inc(&self.channels_refused);
    }

    pub(crate) fn record_tunnel_failure(&self) {
        inc(&self.tunnel_failures);
    }

    pub(crate) fn record_lease_disconnect(&self) {
        inc(&self.lease_disconnects);
    }

    pub(crate) fn record_accept_error(&self) {
        inc(&self.accept_errors);
    }

    pub(crate) fn record_paced(&self) {
        inc(&self.paced);
    }

    pub(crate) fn add_client_to_vm(&self, n: usize) {
        self.bytes_client_to_vm
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_vm_to_client(&self, n: usize) {
        self.bytes_vm_to_client
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy)]
enum Gauge {
    Connections,
    Tunnels,
}

/// Keeps a gauge incremented while alive.
#[derive(Debug)]
pub(crate) struct ActiveGuard {
    stats: std::sync::Arc<GatewayStats>,
    gauge: Gauge,
}

impl ActiveGuard {
    fn new(stats: std::sync::Arc<GatewayStats>, gauge: Gauge) -> Self {
        inc(stats.gauge(gauge));
        ActiveGuard { stats, gauge }
    }
}

impl GatewayStats {
    fn gauge(&self, g: Gauge) -> &AtomicU64 {
        match g {
            Gauge::Connections => &self.connections_active,
            Gauge::Tunnels => &self.tunnels_active,
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.stats.gauge(self.gauge).fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn labels_and_indexes_line_up() {
        for (i, r) in AuthFailure::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        for (i, r) in ConnectionRefusal::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let s = Arc::new(GatewayStats::new());
        s.record_auth_failure(AuthFailure::WrongKey);
        {
            let _g = s.connection_opened();
            assert_eq!(s.connections_active(), 1);
        }
        assert_eq!(s.connections_active(), 0);
        assert_eq!(s.connections_total(), 1);
        let snap = s.snapshot();
        assert!(snap.auth_failures.contains(&(AuthFailure::WrongKey, 1)));
    }
}
