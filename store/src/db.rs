//! sled persistence: the ledger (one tree, keys in [`crate::layout`]) and
//! the directory. [`Store::apply_event`] flushes before it returns, so an
//! acknowledged event survives a crash; [`Store::apply_events`] applies a
//! whole page as one atomic batch under one flush (see [`crate::apply`]).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use tokio::sync::broadcast;

use crate::directory::DirectoryEntry;
pub use crate::error::StoreError;
use crate::error::{corrupt, decode, decode_pending, encode};
use crate::ids::{AccountAddress, EventId, LeaseHash};
use crate::inner::Inner;
pub use crate::inner::LeaseChange;
use crate::layout::{self, Bundle, IndexEntry};
use crate::lease::LeaseEvent;
use crate::page::{Page, bundle_in};
use crate::record::{Inactive, LeaseRecord, LeaseState};
use crate::syncset::SyncSet;

pub use crate::pending::MAX_PENDING;
use crate::pending::Quota;

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

/// The ledger and directory on disk.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

impl Store {
    pub(crate) fn lock(&self) -> MutexGuard<'_, ()> {
        self.inner
            .apply_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Read the sync set (held briefly: writers wait on it).
    pub fn with_sync_set<R>(&self, f: impl FnOnce(&SyncSet) -> R) -> R {
        let set = self.inner.set.read().unwrap_or_else(|p| p.into_inner());
        f(&set)
    }

    fn index(&self, id: &EventId) -> Result<Option<IndexEntry>, StoreError> {
        let k = layout::index_key(id);
        match self.inner.ledger.get(k)? {
            Some(v) => Ok(Some(
                IndexEntry::decode(&v).ok_or_else(|| corrupt(&k, "bad index entry"))?,
            )),
            None => Ok(None),
        }
    }

    fn bundle(&self, hash: &LeaseHash) -> Result<Option<Bundle>, StoreError> {
        bundle_in(&Page::new(&self.inner), hash)
    }

    /// One held event (applied or pending) by id.
    pub fn event(&self, id: &EventId) -> Result<Option<LeaseEvent>, StoreError> {
        let Some(e) = self.index(id)? else {
            return Ok(None);
        };
        if e.pending {
            return self.pending_event(&e.lease, id);
        }
        Ok(self
            .bundle(&e.lease)?
            .and_then(|b| b.events().find(|ev| ev.id() == *id).cloned()))
    }

    fn pending_event(
        &self,
        lease: &LeaseHash,
        id: &EventId,
    ) -> Result<Option<LeaseEvent>, StoreError> {
        let k = layout::pending_key(lease, id);
        match self.inner.ledger.get(k)? {
            Some(v) => Ok(Some(decode_pending(&k, &v)?.event)),
            None => Ok(None),
        }
    }

    /// Whether an event is held and applied (`Some(true)`), held pending
    /// (`Some(false)`) or not held (`None`).
    pub fn event_status(&self, id: &EventId) -> Result<Option<bool>, StoreError> {
        Ok(self.index(id)?.map(|e| !e.pending))
    }

    /// The held events for `ids`, in order, skipping any not held
    /// (compacted or never seen), at most `max_bytes` of their stored form
    /// in all (at least one); with how many of `ids` were looked at (the
    /// rest did not fit).
    pub fn events_by_ids(
        &self,
        ids: &[EventId],
        max_bytes: usize,
    ) -> Result<(Vec<LeaseEvent>, usize), StoreError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        // A page of a time range holds a few events of each lease, rarely
        // next to one another (other leases' events of the same seconds
        // sit between): each lease's bundle is read, and its events' ids
        // computed, once for the page.
        let mut leases: HashMap<LeaseHash, Vec<(EventId, LeaseEvent)>> = HashMap::new();
        for (i, id) in ids.iter().enumerate() {
            let Some(e) = self.index(id)? else { continue };
            let ev = if e.pending {
                self.pending_event(&e.lease, id)?
            } else {
                let evs = match leases.entry(e.lease) {
                    Entry::Occupied(o) => o.into_mut(),
                    Entry::Vacant(v) => {
                        let b = self.bundle(&e.lease)?;
                        let evs = b.map_or_else(Vec::new, |b| {
                            b.events().map(|ev| (ev.id(), ev.clone())).collect()
                        });
                        v.insert(evs)
                    }
                };
                evs.iter()
                    .find(|(eid, _)| eid == id)
                    .map(|(_, ev)| ev.clone())
            };
            if let Some(ev) = ev {
                bytes += crate::codec::encode_event(&ev).len();
                if bytes > max_bytes && !out.is_empty() {
                    return Ok((out, i));
                }
                out.push(ev);
            }
        }
        Ok((out, ids.len()))
    }

    /// Lease state changes from now on. A lagging receiver should re-scan
    /// with [`Store::leases_newest_first`]; changes are not replayed after
    /// a restart.
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
        match self.bundle(hash)? {
            Some(b) => Ok(Some(
                b.record()
                    .map_err(|d| corrupt(&layout::lease_key(hash), d))?,
            )),
            None => Ok(None),
        }
    }

    /// Every lease record, decoded one at a time (memory stays flat).
    pub fn for_each_lease(
        &self,
        mut f: impl FnMut(LeaseRecord) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        for r in self.inner.ledger.scan_prefix([layout::LEASE]) {
            let (k, v) = r?;
            let hash = LeaseHash::from_slice(&k[1..]).map_err(|e| corrupt(&k, e.to_string()))?;
            let rec = Bundle::decode(&hash, &v)
                .and_then(|b| b.record())
                .map_err(|d| corrupt(&k, d))?;
            f(rec)?;
        }
        Ok(())
    }

    /// Every lease, in one vector (tests and small stores; a node lists
    /// with [`Store::leases_newest_first`] or [`Store::for_each_lease`]).
    pub fn leases(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        let mut out = Vec::new();
        self.for_each_lease(|r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }

    /// Whether an event (applied or pending) is held.
    pub fn has_event(&self, id: &EventId) -> Result<bool, StoreError> {
        Ok(self.inner.ledger.contains_key(layout::index_key(id))?)
    }

    /// Number of applied events.
    pub fn event_count(&self) -> usize {
        self.inner.n_events.load(Ordering::Relaxed)
    }

    /// Number of pending events.
    pub fn pending_count(&self) -> usize {
        self.inner.n_pending.load(Ordering::Relaxed)
    }

    /// Pending events held from `source` (its use of its share).
    pub fn pending_from(&self, source: &crate::pending::Source) -> usize {
        let q = self.inner.quotas.lock().unwrap_or_else(|p| p.into_inner());
        q.get(&Quota::Source(source.clone())).copied().unwrap_or(0)
    }

    /// Applied events with id greater than `after`, in id order, at most
    /// `limit` (the old sync protocol's page).
    pub fn events_after(
        &self,
        after: Option<EventId>,
        limit: usize,
    ) -> Result<Vec<LeaseEvent>, StoreError> {
        let from = match after {
            Some(a) => std::ops::Bound::Excluded(layout::index_key(&a).to_vec()),
            None => std::ops::Bound::Included(vec![layout::INDEX]),
        };
        let to = std::ops::Bound::Excluded(vec![layout::INDEX + 1]);
        let mut out = Vec::new();
        for r in self.inner.ledger.range((from, to)) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = r?;
            let e = IndexEntry::decode(&v).ok_or_else(|| corrupt(&k, "bad index entry"))?;
            if e.pending {
                continue;
            }
            let id = EventId::from_slice(&k[1..]).map_err(|e| corrupt(&k, e.to_string()))?;
            if let Some(ev) = self.event(&id)? {
                out.push(ev);
            }
        }
        Ok(out)
    }

    /// Validate and store a directory entry if it is newer than what we have.
    /// Returns whether it replaced anything.
    pub fn put_directory(&self, entry: &DirectoryEntry) -> Result<bool, StoreError> {
        entry.check(crate::now_secs())?;
        let _guard = self.lock();
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

    /// Resolves once `lease` no longer grants access (at once if it does
    /// not now), with the reason. A lease the store does not hold (never
    /// seen, or forgotten long after it ended) counts as expired. A failed
    /// store read is logged and retried: a session is not cut for a
    /// read error.
    pub async fn until_inactive(&self, lease: &LeaseHash) -> Inactive {
        self.inner
            .watchers
            .until_inactive(lease, || self.lease(lease))
            .await
    }

    /// Leases someone waits on with [`Store::until_inactive`].
    pub fn leases_waited_on(&self) -> usize {
        self.inner.watchers.waiting()
    }
}
