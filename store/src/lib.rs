//! xe-store: the lease ledger.
//!
//! There is no central database: every node keeps its own copy of the same
//! signed facts, so a node only checks signatures and never trusts a peer.
//!
//! # Layout
//! - [`ids`]: hex newtypes (`LeaseHash`, `AccountAddress`, `AccessPubKey`, …).
//! - [`secret_file`]: the one way a key file is written (atomic, 0600) and
//!   read (refused when group/others may read it).
//! - [`wallet`]: account seed files and the per-wallet SSH lease key.
//! - [`lease`]: lease terms, signed events, the canonical encoding.
//! - [`record`]: a lease's state derived from its facts; the transition rules.
//! - [`directory`]: signed account → PeerId entries.
//! - [`codec`]: the compact stored form of events.
//! - [`db`]: sled persistence with flushed writes and a change subscription;
//!   the keys are in `layout`, a page of events is applied by `apply`, a
//!   store is opened (and an older layout carried over) by `open`. They
//!   share `error`, `inner` (the state behind a handle) and `page` (one
//!   atomic write), which import none of them.
//! - [`listing`]: leases newest first, a page at a time.
//! - [`pending`]: events waiting for their lease: shares per source,
//!   signer and lease, the arrival window.
//! - [`retention`]: compaction of leases that ended long ago, tombstones.
//! - [`syncset`]: the sorted set of held events with range fingerprints,
//!   which reconciliation between nodes compares.
#![forbid(unsafe_code)]

mod apply;
pub mod codec;
pub mod db;
pub mod directory;
mod error;
mod inner;
// The fuzz targets' way into private stored forms (fuzz/, FUZZING.md).
#[doc(hidden)]
pub mod fuzzing;
pub mod human;
pub mod ids;
mod layout;
pub mod lease;
pub mod listing;
mod migrate;
mod open;
mod page;
pub mod pending;
pub mod record;
pub mod retention;
pub mod secret_file;
pub mod syncset;
pub mod wallet;
mod watch;

pub use apply::Verified;
pub use db::{Applied, LeaseChange, Store, StoreError};
pub use directory::{DirectoryEntry, DirectoryError};
pub use ids::{AccessPubKey, AccountAddress, AccountPubKey, EventId, HexError, LeaseHash, Sig};
pub use lease::{EventError, EventKind, Lease, LeaseEvent};
pub use listing::LeaseCursor;
pub use pending::{PendingRefused, Source};
pub use record::{Inactive, LeaseRecord, LeaseState};
pub use retention::{Compacted, DEFAULT_RETENTION_SECS, WindowTooShort};
pub use syncset::{SyncKey, SyncSet};
pub use wallet::{LeaseKey, Wallet, WalletError, lease_key_path};

/// Unix time in seconds.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
