//! Gossip topics, reconciliation and the sync protocol that replicate the
//! ledger.
//!
//! Gossip carries new lease events and directory entries as they happen;
//! every message is validated by the store before it is applied or
//! forwarded. Anti-entropy — on connecting, when one of several
//! connections closes, and every `resync_interval` with a random peer —
//! is range-based set reconciliation over `/xe/recon/2.0.0`
//! ([`recon`], [`session`]): peers that agree exchange one fingerprint.
//! Directory entries still come by `/xe/sync/1.0.0`, which also still
//! answers the paged full event sync of older nodes.
//!
//! # Layout
//! - [`recon`]: the reconciliation messages and their processing.
//! - [`session`]: one session over a byte stream (rounds, then transfers).
//! - [`driver`]: sessions between hosts: one at a time per peer, a bounded
//!   number answered at once.

use std::sync::atomic::Ordering;

use libp2p::{PeerId, StreamProtocol, gossipsub};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use xe_store::{
    Applied, DirectoryEntry, EventId, LeaseEvent, LeaseHash, Source, Store, StoreError,
};

use crate::stats::NetStats;

pub mod driver;
pub mod recon;
pub mod session;

/// The reconciliation protocol (version 1 of the wire form in [`recon`]).
pub const RECON_PROTOCOL: StreamProtocol = StreamProtocol::new("/xe/recon/2.0.0");

/// Topic for lease events.
pub const LEASE_TOPIC: &str = "xe/lease-events/1";
/// Topic for directory entries.
pub const DIRECTORY_TOPIC: &str = "xe/directory/1";
/// The sync protocol: directory entries; full event pages for old nodes.
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

/// The `/xe/sync/1.0.0` codec: CBOR, with the request and response caps.
pub fn sync_codec() -> libp2p::request_response::cbor::codec::Codec<SyncRequest, SyncResponse> {
    libp2p::request_response::cbor::codec::Codec::default()
        .set_request_size_maximum(MAX_SYNC_REQUEST)
        .set_response_size_maximum(MAX_SYNC_RESPONSE)
}

/// A gossip message from `from` validated and applied to `store` exactly
/// as the host does with one gossipsub delivered, and the response to a
/// sync request likewise; for the fuzz targets (`fuzz/`), which have no
/// swarm. Returns whether the gossip message would be forwarded.
#[doc(hidden)]
pub fn fuzz_gossip(store: &Store, data: &[u8], from: &PeerId) -> bool {
    let stats = NetStats::default();
    !matches!(
        validate_gossip(store, &stats, data, from),
        Verdict::Now(gossipsub::MessageAcceptance::Reject | gossipsub::MessageAcceptance::Ignore)
    )
}

/// A decoded sync request answered from `store`, and a decoded response
/// applied to it, as the host does; for the fuzz targets.
#[doc(hidden)]
pub fn fuzz_sync(
    store: &Store,
    request: Option<SyncRequest>,
    response: Option<SyncResponse>,
    from: PeerId,
) -> Option<SyncResponse> {
    let answer = request.map(|r| answer_sync(store, r));
    if let Some(r) = response {
        apply_sync(store, &NetStats::default(), from, r);
    }
    answer
}

pub(crate) fn note_applied(stats: &NetStats, ev: &LeaseEvent) {
    stats.events_applied.fetch_add(1, Ordering::Relaxed);
    let lag = xe_store::now_secs().saturating_sub(ev.timestamp());
    stats
        .last_replication_lag_secs
        .store(lag, Ordering::Relaxed);
}

/// What validating one gossip message decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Report this now.
    Now(gossipsub::MessageAcceptance),
    /// An event of this lease applied: forward it, and any deferred
    /// events of the lease that applied with it.
    Applied(LeaseHash),
    /// The event went pending here: it is forwarded only if it applies
    /// while gossipsub still holds it (its create was racing it), else
    /// ignored; see [`crate::host`]'s replication.
    Pending(LeaseHash, EventId, Box<LeaseEvent>),
}

/// Apply a gossiped message from `from` (its share of the pending store is
/// `Source::Peer(from)`); the verdict tells gossipsub whether to forward it.
pub(crate) fn validate_gossip(
    store: &Store,
    stats: &NetStats,
    data: &[u8],
    from: &PeerId,
) -> Verdict {
    use gossipsub::MessageAcceptance::{Accept, Ignore, Reject};
    let msg: GossipMessage = match serde_json::from_slice(data) {
        Ok(m) => m,
        Err(e) => {
            warn!(peer = %from, "undecodable gossip: {e}");
            return Verdict::Now(Reject);
        }
    };
    let v = match msg {
        GossipMessage::Event { event } => {
            let lease = event.lease_hash();
            return match store.apply_event_from(&event, &Source::Peer(from.to_string())) {
                Ok(Applied::Changed(_)) => {
                    note_applied(stats, &event);
                    Verdict::Applied(lease)
                }
                Ok(Applied::Pending) => {
                    note_applied(stats, &event);
                    Verdict::Pending(lease, event.id(), Box::new(event))
                }
                Ok(Applied::Duplicate) => Verdict::Now(Ignore),
                Err(StoreError::Rejected(e)) => {
                    warn!(peer = %from, lease = %lease.short(), "invalid lease event dropped: {e}");
                    Verdict::Now(Reject)
                }
                // Over a share is not proof of malice (an honest peer's
                // events can race their creates in bulk): not forwarded,
                // not penalised.
                Err(StoreError::PendingRefused(e)) => {
                    debug!(peer = %from, lease = %lease.short(), "pending event refused: {e}");
                    Verdict::Now(Ignore)
                }
                Err(e) => {
                    warn!("store error applying gossip: {e}");
                    Verdict::Now(Ignore)
                }
            };
        }
        GossipMessage::Directory { entry } => match store.put_directory(&entry) {
            Ok(true) => Accept,
            Ok(false) => Ignore,
            Err(StoreError::Directory(xe_store::DirectoryError::Expired(_))) => Ignore,
            Err(StoreError::Directory(e)) => {
                warn!(peer = %from, "invalid directory entry dropped: {e}");
                Reject
            }
            Err(e) => {
                warn!("store error applying directory entry: {e}");
                Ignore
            }
        },
    };
    Verdict::Now(v)
}

/// The answer to a `/xe/sync/1.0.0` request.
pub(crate) fn answer_sync(store: &Store, request: SyncRequest) -> SyncResponse {
    let failed = |e: StoreError| SyncResponse::Error {
        message: e.to_string(),
    };
    match request {
        SyncRequest::Events { after } => match store.events_after(after, SYNC_PAGE + 1) {
            Ok(mut events) => {
                let more = events.len() > SYNC_PAGE;
                events.truncate(SYNC_PAGE);
                SyncResponse::Events { events, more }
            }
            Err(e) => failed(e),
        },
        SyncRequest::Directory => match store.directory() {
            Ok(mut entries) => {
                entries.truncate(1024);
                SyncResponse::Directory { entries }
            }
            Err(e) => failed(e),
        },
    }
}

/// Take in a `/xe/sync/1.0.0` response. Only directory entries are asked
/// for now (events come by reconciliation); an event page is still
/// applied if a peer sends one.
pub(crate) fn apply_sync(store: &Store, stats: &NetStats, peer: PeerId, response: SyncResponse) {
    match response {
        SyncResponse::Events { events, .. } => match store
            .apply_events_from(&events, &Source::Peer(peer.to_string()))
        {
            Ok(results) => {
                for (ev, r) in events.iter().zip(results) {
                    match r {
                        Ok(Applied::Changed(_)) | Ok(Applied::Pending) => note_applied(stats, ev),
                        Ok(Applied::Duplicate) => {}
                        Err(e) => {
                            warn!(%peer, lease = %ev.lease_hash().short(), "sync: event refused: {e}")
                        }
                    }
                }
            }
            Err(e) => warn!(%peer, "sync: store failed: {e}"),
        },
        SyncResponse::Directory { entries } => {
            for e in &entries {
                if let Err(err) = store.put_directory(e) {
                    debug!(%peer, "sync: directory entry refused: {err}");
                }
            }
        }
        SyncResponse::Error { message } => warn!(%peer, "peer could not answer sync: {message}"),
    }
}
