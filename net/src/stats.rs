//! The overlay's counters, read by `/metrics`. Its own file because the
//! host, the replication code and the handle all write to it, and none of
//! them should have to import another to do so.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::secure::HandshakeCounts;

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Gossip messages rejected by validation.
    pub invalid_messages: AtomicU64,
    /// Lease events applied from the network (gossip or sync).
    pub events_applied: AtomicU64,
    /// Seconds between an applied event's own timestamp and its arrival.
    pub last_replication_lag_secs: AtomicU64,
    /// Connections secured, by cipher.
    pub handshakes: Arc<HandshakeCounts>,
    /// Reconciliation sessions and their bytes.
    pub recon: crate::replication::session::ReconStats,
}
