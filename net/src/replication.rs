//! Gossip topics and the sync protocol that replicate the ledger.
//!
//! Gossip carries new lease events and directory entries as they happen;
//! every message is validated by the store before it is applied or
//! forwarded. A node that was away pulls, on connecting, every event the
//! peer has, page by page over `/xe/sync/1.0.0` (applying is idempotent).

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};
use xe_store::{DirectoryEntry, EventId, LeaseEvent};

/// Topic for lease events.
pub const LEASE_TOPIC: &str = "xe/lease-events/1";
/// Topic for directory entries.
pub const DIRECTORY_TOPIC: &str = "xe/directory/1";
/// The sync protocol.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/xe/sync/1.0.0");
/// Events per sync page. One event is well under 1 KiB of CBOR, so a page
/// stays far below the response cap.
pub const SYNC_PAGE: usize = 256;
/// Largest sync request accepted.
pub const MAX_SYNC_REQUEST: u64 = 4 * 1024;
/// Largest sync response accepted.
pub const MAX_SYNC_RESPONSE: u64 = 1024 * 1024;
/// Largest gossip message; events and entries are a few hundred bytes.
pub const MAX_GOSSIP_MESSAGE: usize = 16 * 1024;

/// A gossip payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub enum GossipMessage {
    /// A lease event.
    Event {
        /// The event.
        event: LeaseEvent,
    },
    /// A directory entry.
    Directory {
        /// The entry.
        entry: DirectoryEntry,
    },
}

/// Sync request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SyncRequest {
    /// Applied events with id greater than `after`.
    Events {
        /// Cursor (exclusive).
        after: Option<EventId>,
    },
    /// All unexpired directory entries.
    Directory,
}

/// Sync response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SyncResponse {
    /// One page of events; `more` says whether to ask again after the last.
    Events {
        /// Events in id order.
        events: Vec<LeaseEvent>,
        /// Whether another page follows.
        more: bool,
    },
    /// Directory entries.
    Directory {
        /// Entries (bounded by the response cap).
        entries: Vec<DirectoryEntry>,
    },
    /// The responder failed.
    Error {
        /// Why.
        message: String,
    },
}
