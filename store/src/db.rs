//! sled persistence: leases, the applied-event log, pending events, the
//! sync set and the directory. [`Store::apply_event`] flushes before it
//! returns, so an acknowledged event survives a crash;
//! [`Store::apply_events`] applies a whole page under one flush.
//!
//! Trees: `leases` (hash → record), `events` (id → applied event),
//! `pending` (hash ‖ id → event waiting for its lease or accept),
//! `pending_ids` (id → hash, so membership is one lookup), `by_lease`
//! (hash ‖ id → timestamp: every held event, by lease for compaction, and
//! the source of the in-memory [`SyncSet`] at open), `compacted` (hash → end time: tombstones, see
//! [`crate::retention`]), `by_created` (newest-first listing, see
//! [`crate::listing`]) and `directory`.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::broadcast;

use crate::codec::encode_event;
use crate::directory::{DirectoryEntry, DirectoryError};
use crate::ids::{AccountAddress, EventId, LeaseHash};
use crate::lease::{EventError, LeaseEvent};
use crate::record::{LeaseRecord, LeaseState, Outcome};
use crate::syncset::{SyncKey, SyncSet};

/// Most pending (not yet applicable) events kept, so a peer cannot fill
/// the disk with events for leases that will never exist.
pub const MAX_PENDING: usize = 100_000;

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The event was refused; nothing was written.
    #[error(transparent)]
    Rejected(#[from] EventError),
    /// The directory entry was refused; nothing was written.
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    /// Too many pending events.
    #[error("too many pending events ({MAX_PENDING}); refusing more until their leases arrive")]
    PendingFull,
    /// sled failed.
    #[error("store: {0}")]
    Db(#[from] sled::Error),
    /// A stored value did not decode (corruption or a format change).
    #[error("store: corrupt record under {key}: {detail}")]
    Corrupt {
        /// The key.
        key: String,
        /// Decode error.
        detail: String,
    },
}

/// What `apply_event` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Applied; the lease is now in this state.
    Changed(LeaseState),
    /// Already known; nothing changed.
    Duplicate,
    /// Kept until the event it depends on arrives.
    Pending,
}

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

/// The ledger and directory on disk.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) db: sled::Db,
    pub(crate) leases: sled::Tree,
    pub(crate) events: sled::Tree,
    pub(crate) pending: sled::Tree,
    pub(crate) pending_ids: sled::Tree,
    pub(crate) by_lease: sled::Tree,
    pub(crate) compacted: sled::Tree,
    pub(crate) by_created: sled::Tree,
    pub(crate) directory: sled::Tree,
    /// Every held event as a sync key, with its running fingerprint.
    pub(crate) set: RwLock<SyncSet>,
    /// Counts kept beside the trees: sled's `len()` walks the whole tree,
    /// and the old pending-limit check called it on every pending insert,
    /// which made a join quadratic.
    pub(crate) n_events: AtomicUsize,
    pub(crate) n_pending: AtomicUsize,
    /// Serialises read-modify-write of lease records.
    pub(crate) apply_lock: Mutex<()>,
    changes: broadcast::Sender<LeaseChange>,
    directory_changes: broadcast::Sender<AccountAddress>,
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    key: &[u8],
    v: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        key: hex::encode(key),
        detail: e.to_string(),
    })
}

/// Signature and terms checks of a page, on two threads when the page is
/// big enough to pay for one: verification is most of a join's CPU.
fn check_all(evs: &[LeaseEvent]) -> Vec<Result<(), EventError>> {
    let serial = |evs: &[LeaseEvent]| evs.iter().map(LeaseEvent::check_self).collect::<Vec<_>>();
    if evs.len() < 64 {
        return serial(evs);
    }
    let (a, b) = evs.split_at(evs.len() / 2);
    std::thread::scope(|s| {
        let other = s.spawn(|| serial(b));
        let mut out = serial(a);
        // A panicked thread (none is expected) is redone here.
        out.extend(other.join().unwrap_or_else(|_| serial(b)));
        out
    })
}

/// A lease record as stored (see [`crate::codec`]).
pub(crate) fn decode_rec(key: &[u8], v: &[u8]) -> Result<LeaseRecord, StoreError> {
    crate::codec::decode_record(v).map_err(|detail| StoreError::Corrupt {
        key: hex::encode(key),
        detail,
    })
}

/// An event as stored (see [`crate::codec`]).
pub(crate) fn decode_ev(key: &[u8], v: &[u8]) -> Result<LeaseEvent, StoreError> {
    crate::codec::decode_event(v).map_err(|detail| StoreError::Corrupt {
        key: hex::encode(key),
        detail,
    })
}

pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("ledger types always serialise")
}

impl Store {
    /// Open (or create) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::from_db(sled::Config::new().path(dir).open()?)
    }

    /// A throwaway in-memory store (tests).
    pub fn temporary() -> Result<Self, StoreError> {
        Self::from_db(sled::Config::new().temporary(true).open()?)
    }

    fn from_db(db: sled::Db) -> Result<Self, StoreError> {
        let (changes, _) = broadcast::channel(1024);
        let (directory_changes, _) = broadcast::channel(256);
        let events = db.open_tree("events")?;
        let pending = db.open_tree("pending")?;
        let pending_ids = db.open_tree("pending_ids")?;
        let by_lease = db.open_tree("by_lease")?;
        let leases = db.open_tree("leases")?;
        let by_created = db.open_tree("by_created")?;
        if by_created.is_empty() && !leases.is_empty() {
            crate::listing::rebuild_index(&leases, &by_created)?;
        }
        // One walk of each tree at open; never again afterwards.
        let n_events = events.len();
        let n_pending = pending.len();
        if by_lease.is_empty() && n_events + n_pending > 0 {
            rebuild_sync_index(&events, &pending, &pending_ids, &by_lease)?;
        }
        let mut set = SyncSet::new();
        // The sync set is not stored on its own: `by_lease` holds every
        // held event's id and timestamp (one tree fewer to write per event).
        for r in by_lease.iter() {
            let (k, v) = r?;
            let key = sync_key_of(&k, &v).ok_or_else(|| StoreError::Corrupt {
                key: hex::encode(&k),
                detail: "by_lease entry is not 64 + 8 bytes".into(),
            })?;
            set.insert(key);
        }
        Ok(Store {
            inner: Arc::new(Inner {
                leases,
                events,
                pending,
                pending_ids,
                by_lease,
                compacted: db.open_tree("compacted")?,
                by_created,
                directory: db.open_tree("directory")?,
                db,
                set: RwLock::new(set),
                n_events: AtomicUsize::new(n_events),
                n_pending: AtomicUsize::new(n_pending),
                apply_lock: Mutex::new(()),
                changes,
                directory_changes,
            }),
        })
    }

    /// Read the sync set (held briefly: writers wait on it).
    pub fn with_sync_set<R>(&self, f: impl FnOnce(&SyncSet) -> R) -> R {
        let set = self.inner.set.read().unwrap_or_else(|p| p.into_inner());
        f(&set)
    }

    /// One held event (applied or pending) by id.
    pub fn event(&self, id: &EventId) -> Result<Option<LeaseEvent>, StoreError> {
        if let Some(v) = self.inner.events.get(id.0)? {
            return Ok(Some(decode_ev(&id.0, &v)?));
        }
        let Some(hash) = self.inner.pending_ids.get(id.0)? else {
            return Ok(None);
        };
        let mut pkey = hash.to_vec();
        pkey.extend_from_slice(&id.0);
        match self.inner.pending.get(&pkey)? {
            Some(v) => Ok(Some(decode_ev(&pkey, &v)?)),
            None => Ok(None),
        }
    }

    /// The held events for `ids`, skipping any not held (compacted or
    /// never seen), at most `max_bytes` of JSON in all (at least one).
    pub fn events_by_ids(
        &self,
        ids: &[EventId],
        max_bytes: usize,
    ) -> Result<Vec<LeaseEvent>, StoreError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for id in ids {
            if let Some(ev) = self.event(id)? {
                // The JSON size: what the caller will send.
                bytes += encode(&ev).len();
                if bytes > max_bytes && !out.is_empty() {
                    break;
                }
                out.push(ev);
            }
        }
        Ok(out)
    }

    /// Lease state changes from now on. A lagging receiver should re-scan
    /// with [`Store::leases`]; changes are not replayed after a restart.
    pub fn subscribe(&self) -> broadcast::Receiver<LeaseChange> {
        self.inner.changes.subscribe()
    }

    /// Accounts whose directory entry was replaced, from now on.
    pub fn subscribe_directory(&self) -> broadcast::Receiver<AccountAddress> {
        self.inner.directory_changes.subscribe()
    }

    /// Flush everything to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.db.flush()?;
        Ok(())
    }

    /// One lease.
    pub fn lease(&self, hash: &LeaseHash) -> Result<Option<LeaseRecord>, StoreError> {
        match self.inner.leases.get(hash.0)? {
            Some(v) => Ok(Some(decode_rec(&hash.0, &v)?)),
            None => Ok(None),
        }
    }

    /// Every lease.
    pub fn leases(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        self.inner
            .leases
            .iter()
            .map(|r| {
                let (k, v) = r?;
                decode_rec(&k, &v)
            })
            .collect()
    }

    /// Whether an event (applied or pending) is known.
    pub fn has_event(&self, id: &EventId) -> Result<bool, StoreError> {
        Ok(self.inner.events.contains_key(id.0)? || self.inner.pending_ids.contains_key(id.0)?)
    }

    /// Number of applied events.
    pub fn event_count(&self) -> usize {
        self.inner.n_events.load(Ordering::Relaxed)
    }

    /// Number of pending events.
    pub fn pending_count(&self) -> usize {
        self.inner.n_pending.load(Ordering::Relaxed)
    }

    /// Applied events with id greater than `after`, in id order, at most
    /// `limit` (the sync protocol's page).
    pub fn events_after(
        &self,
        after: Option<EventId>,
        limit: usize,
    ) -> Result<Vec<LeaseEvent>, StoreError> {
        let iter = match after {
            Some(a) => self.inner.events.range((
                std::ops::Bound::Excluded(a.0.to_vec()),
                std::ops::Bound::Unbounded,
            )),
            None => self.inner.events.iter(),
        };
        iter.take(limit)
            .map(|r| {
                let (k, v) = r?;
                decode_ev(&k, &v)
            })
            .collect()
    }

    /// Validate and apply one event. A refused event changes nothing; an
    /// event whose lease (or accept) is not known yet is kept pending and
    /// applied when its dependency lands.
    pub fn apply_event(&self, ev: &LeaseEvent) -> Result<Applied, StoreError> {
        let mut results = self.apply_events(std::slice::from_ref(ev))?;
        results.pop().unwrap_or(Ok(Applied::Duplicate))
    }

    /// Validate and apply a page of events with one flush for all of them:
    /// the per-event flush capped a join at ~1,600 events/s. Each event
    /// gets its own result (a refused one changes nothing); the outer error
    /// is a failed flush, after which nothing of the page may be assumed
    /// durable. Change notifications go out after the flush.
    pub fn apply_events(
        &self,
        evs: &[LeaseEvent],
    ) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
        // Signatures are checked before taking the lock: that is the
        // expensive part, and it needs no state.
        let checked = check_all(evs);
        let _guard = self
            .inner
            .apply_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut changes = Vec::new();
        let mut results = Vec::with_capacity(evs.len());
        let mut wrote = false;
        for (ev, ok) in evs.iter().zip(checked) {
            let r = match ok {
                Err(e) => Err(StoreError::Rejected(e)),
                Ok(()) => match self.apply_locked(ev, &mut changes) {
                    Err(e @ (StoreError::Db(_) | StoreError::Corrupt { .. })) => return Err(e),
                    r => r,
                },
            };
            wrote |= matches!(r, Ok(Applied::Pending) | Ok(Applied::Changed(_)));
            results.push(r);
        }
        if wrote || !changes.is_empty() {
            self.inner.db.flush()?;
        }
        for c in changes {
            // No receivers is fine.
            let _ = self.inner.changes.send(c);
        }
        Ok(results)
    }

    fn set_mut(&self) -> std::sync::RwLockWriteGuard<'_, SyncSet> {
        self.inner.set.write().unwrap_or_else(|p| p.into_inner())
    }

    fn apply_locked(
        &self,
        ev: &LeaseEvent,
        changes: &mut Vec<LeaseChange>,
    ) -> Result<Applied, StoreError> {
        let hash = ev.lease_hash();
        let id = ev.id();
        // A compacted lease's events are refused as known: a replay is not
        // misbehaviour (a peer may simply be behind), but it changes nothing.
        if self.inner.events.contains_key(id.0)? || self.inner.compacted.contains_key(hash.0)? {
            return Ok(Applied::Duplicate);
        }
        let current = self.lease(&hash)?;
        let (next, wait) = match (&current, ev) {
            (None, LeaseEvent::Create { lease, sig }) => {
                (Some(LeaseRecord::from_create(lease.clone(), *sig)), false)
            }
            (None, _) => (None, true),
            (Some(_), LeaseEvent::Create { .. }) => (None, false),
            (Some(rec), _) => match rec.apply(ev)? {
                Outcome::Changed(r) => (Some(*r), false),
                Outcome::Unchanged => (None, false),
                Outcome::Wait(_) => (None, true),
            },
        };
        let mut pkey = hash.0.to_vec();
        pkey.extend_from_slice(&id.0);
        let skey = SyncKey {
            ts: ev.timestamp(),
            id,
        };
        let was_pending = self.inner.pending_ids.contains_key(id.0)?;
        if wait {
            if was_pending {
                return Ok(Applied::Duplicate);
            }
            if self.inner.n_pending.load(Ordering::Relaxed) >= MAX_PENDING {
                return Err(StoreError::PendingFull);
            }
            let ev_bytes = encode_event(ev);
            let r: Result<(), TransactionError<()>> = (
                &self.inner.pending,
                &self.inner.pending_ids,
                &self.inner.by_lease,
            )
                .transaction(|(p, pi, bl)| {
                    p.insert(pkey.as_slice(), ev_bytes.as_slice())?;
                    pi.insert(&id.0, &hash.0)?;
                    bl.insert(pkey.as_slice(), &skey.ts.to_be_bytes())?;
                    Ok::<_, ConflictableTransactionError<()>>(())
                });
            r.map_err(tx_error)?;
            self.inner.n_pending.fetch_add(1, Ordering::Relaxed);
            self.set_mut().insert(skey);
            return Ok(Applied::Pending);
        }
        // An accept that voids a cancel drops the cancel from the ledger
        // too: a node that saw the accept first refuses that cancel, so
        // keeping it here would leave the two nodes' sets different for
        // ever, costing a reconciliation round trip every time they meet.
        let voided = match (&current, &next) {
            (Some(cur), Some(n)) if n.cancel.is_none() => cur.cancel.as_ref().map(|c| SyncKey {
                ts: c.at,
                id: c.event_id,
            }),
            _ => None,
        };
        let ev_bytes = encode_event(ev);
        let rec_bytes = next.as_ref().map(crate::codec::encode_record);
        let created_key = match (&current, &next) {
            (None, Some(n)) => Some(crate::listing::created_key(n.lease.created_at, &hash)),
            _ => None,
        };
        let r: Result<(), TransactionError<()>> = (
            &self.inner.leases,
            &self.inner.events,
            &self.inner.pending,
            &self.inner.pending_ids,
            &self.inner.by_lease,
            &self.inner.by_created,
        )
            .transaction(|(l, e, p, pi, bl, bc)| {
                if let Some(ck) = &created_key {
                    bc.insert(&ck[..], &[])?;
                }
                if let Some(rb) = &rec_bytes {
                    l.insert(&hash.0, rb.as_slice())?;
                }
                e.insert(&id.0, ev_bytes.as_slice())?;
                p.remove(pkey.as_slice())?;
                pi.remove(&id.0)?;
                bl.insert(pkey.as_slice(), &skey.ts.to_be_bytes())?;
                if let Some(v) = &voided {
                    e.remove(&v.id.0)?;
                    let mut vk = hash.0.to_vec();
                    vk.extend_from_slice(&v.id.0);
                    bl.remove(vk)?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            });
        r.map_err(tx_error)?;
        self.inner.n_events.fetch_add(1, Ordering::Relaxed);
        if was_pending {
            self.inner.n_pending.fetch_sub(1, Ordering::Relaxed);
        }
        {
            let mut set = self.set_mut();
            set.insert(skey);
            if let Some(v) = &voided
                && set.remove(v)
            {
                self.inner.n_events.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let Some(next) = next else {
            return Ok(Applied::Duplicate);
        };
        let now = crate::now_secs();
        let new = next.state_at(now);
        let old = current.as_ref().map(|c| c.state_at(now));
        if old != Some(new) {
            changes.push(LeaseChange {
                lease: hash,
                old,
                new,
            });
        }
        self.retry_pending(&hash, changes)?;
        Ok(Applied::Changed(new))
    }

    /// Re-apply events that were waiting on this lease.
    fn retry_pending(
        &self,
        hash: &LeaseHash,
        changes: &mut Vec<LeaseChange>,
    ) -> Result<(), StoreError> {
        let waiting: Vec<(sled::IVec, sled::IVec)> = self
            .inner
            .pending
            .scan_prefix(hash.0)
            .collect::<Result<_, _>>()?;
        for (k, v) in waiting {
            // Applying one of them retries this lease's pending events
            // again (recursively), which may already have applied or
            // dropped the rest of this list.
            if !self.inner.pending.contains_key(&k)? {
                continue;
            }
            let ev: LeaseEvent = decode_ev(&k, &v)?;
            // Still waiting (a settle whose accept is not here yet) leaves
            // it pending; applying removes it from `pending` in the same
            // transaction that records it.
            match self.apply_locked(&ev, changes) {
                Ok(_) => {}
                Err(StoreError::Rejected(e)) => {
                    tracing::warn!(lease = %hash.short(), error = %e, "dropping pending event that no longer applies");
                    self.drop_pending(&k, &ev)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn drop_pending(&self, pkey: &[u8], ev: &LeaseEvent) -> Result<(), StoreError> {
        let id = ev.id();
        let skey = SyncKey {
            ts: ev.timestamp(),
            id,
        };
        let r: Result<(), TransactionError<()>> = (
            &self.inner.pending,
            &self.inner.pending_ids,
            &self.inner.by_lease,
        )
            .transaction(|(p, pi, bl)| {
                p.remove(pkey)?;
                pi.remove(&id.0)?;
                bl.remove(pkey)?;
                Ok::<_, ConflictableTransactionError<()>>(())
            });
        r.map_err(tx_error)?;
        self.inner.n_pending.fetch_sub(1, Ordering::Relaxed);
        self.set_mut().remove(&skey);
        Ok(())
    }

    /// Validate and store a directory entry if it is newer than what we have.
    /// Returns whether it replaced anything.
    pub fn put_directory(&self, entry: &DirectoryEntry) -> Result<bool, StoreError> {
        entry.check(crate::now_secs())?;
        let _guard = self
            .inner
            .apply_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let addr = entry.address();
        if let Some(old) = self.directory_raw(&addr)?
            && (old.issued_at, &old.sig.0[..]) >= (entry.issued_at, &entry.sig.0[..])
        {
            return Ok(false);
        }
        self.inner.directory.insert(addr.0, encode(entry))?;
        self.inner.db.flush()?;
        let _ = self.inner.directory_changes.send(addr);
        Ok(true)
    }

    fn directory_raw(&self, addr: &AccountAddress) -> Result<Option<DirectoryEntry>, StoreError> {
        match self.inner.directory.get(addr.0)? {
            Some(v) => Ok(Some(decode(&addr.0, &v)?)),
            None => Ok(None),
        }
    }

    /// The unexpired directory entry for an account.
    pub fn peer_for_account(
        &self,
        addr: &AccountAddress,
    ) -> Result<Option<DirectoryEntry>, StoreError> {
        let now = crate::now_secs();
        Ok(self.directory_raw(addr)?.filter(|e| e.expires_at > now))
    }

    /// All unexpired directory entries.
    pub fn directory(&self) -> Result<Vec<DirectoryEntry>, StoreError> {
        let now = crate::now_secs();
        let mut out = Vec::new();
        for r in self.inner.directory.iter() {
            let (k, v) = r?;
            let e: DirectoryEntry = decode(&k, &v)?;
            if e.expires_at > now {
                out.push(e);
            }
        }
        Ok(out)
    }
}

pub(crate) fn tx_error(e: TransactionError<()>) -> StoreError {
    match e {
        TransactionError::Storage(s) => StoreError::Db(s),
        TransactionError::Abort(()) => StoreError::Db(sled::Error::ReportableBug("aborted".into())),
    }
}

/// The sync key a `by_lease` entry (hash ‖ id → timestamp) stands for.
pub(crate) fn sync_key_of(k: &[u8], v: &[u8]) -> Option<SyncKey> {
    let id = EventId::from_slice(k.get(32..64)?).ok()?;
    let ts = u64::from_be_bytes(<[u8; 8]>::try_from(v).ok()?);
    (k.len() == 64).then_some(SyncKey { ts, id })
}

/// Fill the `by_lease` and `pending_ids` trees from the events of a store
/// written before they existed.
fn rebuild_sync_index(
    events: &sled::Tree,
    pending: &sled::Tree,
    pending_ids: &sled::Tree,
    by_lease: &sled::Tree,
) -> Result<(), StoreError> {
    for r in events.iter().chain(pending.iter()) {
        let (k, v) = r?;
        let ev: LeaseEvent = decode_ev(&k, &v)?;
        let id = ev.id();
        let key = SyncKey {
            ts: ev.timestamp(),
            id,
        };
        let mut lk = ev.lease_hash().0.to_vec();
        lk.extend_from_slice(&id.0);
        by_lease.insert(lk, &key.ts.to_be_bytes())?;
        if k.len() == 64 {
            pending_ids.insert(id.0, &k[..32])?;
        }
    }
    by_lease.flush()?;
    Ok(())
}
