//! The state behind every [`Store`](crate::Store) handle: the trees, the
//! in-memory sync set and counters, and the change feeds. It sits below
//! everything that reads or writes the ledger, so that a [`Page`] and the
//! store's operations can share it without importing one another.
//!
//! [`Page`]: crate::page::Page

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Mutex, RwLock};

use tokio::sync::broadcast;

use crate::ids::{AccountAddress, EventId, LeaseHash};
use crate::pending::Quota;
use crate::record::LeaseState;
use crate::syncset::SyncSet;
use crate::watch::Watchers;

/// A lease changed state (sent after the write is durable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseChange {
    /// Which lease.
    pub lease: LeaseHash,
    /// State before (None if the lease was new).
    pub old: Option<LeaseState>,
    /// State now.
    pub new: LeaseState,
}

pub(crate) struct Inner {
    pub(crate) db: sled::Db,
    pub(crate) ledger: sled::Tree,
    pub(crate) directory: sled::Tree,
    /// Every held event as a sync key, with its running fingerprint.
    pub(crate) set: RwLock<SyncSet>,
    /// Counts kept beside the tree: sled's `len()` walks the whole tree,
    /// and a pending-limit check that called it on every pending insert
    /// once made a join quadratic.
    pub(crate) n_events: AtomicUsize,
    pub(crate) n_pending: AtomicUsize,
    /// Ids of pending events. They are not in the sync set (see
    /// [`crate::pending`]), and a page must still tell one from an
    /// unknown event without reading the tree.
    pub(crate) pending_ids: RwLock<HashSet<EventId>>,
    /// Pending events per source and per signer (the shares).
    pub(crate) quotas: Mutex<HashMap<Quota, usize>>,
    /// When the store was opened: the arrival time given to pending
    /// entries written before arrival times were stored.
    pub(crate) opened_at: u64,
    /// The retention window, seconds (see [`crate::retention`]).
    pub(crate) retention: AtomicU64,
    /// Serialises read-modify-write of lease bundles.
    pub(crate) apply_lock: Mutex<()>,
    pub(crate) changes: broadcast::Sender<LeaseChange>,
    pub(crate) directory_changes: broadcast::Sender<AccountAddress>,
    /// Who waits for which lease to end
    /// ([`Store::until_inactive`](crate::Store::until_inactive)).
    pub(crate) watchers: Watchers,
}
