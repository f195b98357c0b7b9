//! sled persistence: leases, the applied-event log, pending events and the
//! directory. Every write is flushed before the call returns, so an
//! acknowledged event survives a crash.

use std::path::Path;
use std::sync::{Arc, Mutex};

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::broadcast;

use crate::directory::{DirectoryEntry, DirectoryError};
use crate::ids::{AccountAddress, EventId, LeaseHash};
use crate::lease::{EventError, LeaseEvent};
use crate::record::{LeaseRecord, LeaseState, Outcome};

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
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    leases: sled::Tree,
    events: sled::Tree,
    pending: sled::Tree,
    directory: sled::Tree,
    /// Serialises read-modify-write of lease records.
    apply_lock: Mutex<()>,
    changes: broadcast::Sender<LeaseChange>,
    directory_changes: broadcast::Sender<AccountAddress>,
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        key: hex::encode(key),
        detail: e.to_string(),
    })
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
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
        Ok(Store {
            inner: Arc::new(Inner {
                leases: db.open_tree("leases")?,
                events: db.open_tree("events")?,
                pending: db.open_tree("pending")?,
                directory: db.open_tree("directory")?,
                db,
                apply_lock: Mutex::new(()),
                changes,
                directory_changes,
            }),
        })
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
            Some(v) => Ok(Some(decode(&hash.0, &v)?)),
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
                decode(&k, &v)
            })
            .collect()
    }

    /// Whether an event (applied or pending) is known.
    pub fn has_event(&self, id: &EventId) -> Result<bool, StoreError> {
        Ok(self.inner.events.contains_key(id.0)? || self.pending_contains(id)?)
    }

    fn pending_contains(&self, id: &EventId) -> Result<bool, StoreError> {
        for r in self.inner.pending.iter() {
            let (k, _) = r?;
            if k.len() == 64 && k[32..] == id.0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Number of applied events.
    pub fn event_count(&self) -> usize {
        self.inner.events.len()
    }

    /// Number of pending events.
    pub fn pending_count(&self) -> usize {
        self.inner.pending.len()
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
                decode(&k, &v)
            })
            .collect()
    }

    /// Validate and apply one event. A refused event changes nothing; an
    /// event whose lease (or accept) is not known yet is kept pending and
    /// applied when its dependency lands.
    pub fn apply_event(&self, ev: &LeaseEvent) -> Result<Applied, StoreError> {
        ev.check_self()?;
        let _guard = self
            .inner
            .apply_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut changes = Vec::new();
        let result = self.apply_locked(ev, &mut changes)?;
        if result == Applied::Pending || !changes.is_empty() {
            self.inner.db.flush()?;
        }
        for c in changes {
            // No receivers is fine.
            let _ = self.inner.changes.send(c);
        }
        Ok(result)
    }

    fn apply_locked(
        &self,
        ev: &LeaseEvent,
        changes: &mut Vec<LeaseChange>,
    ) -> Result<Applied, StoreError> {
        let hash = ev.lease_hash();
        let id = ev.id();
        if self.inner.events.contains_key(id.0)? {
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
        if wait {
            if self.inner.pending.contains_key(&pkey)? {
                return Ok(Applied::Duplicate);
            }
            if self.inner.pending.len() >= MAX_PENDING {
                return Err(StoreError::PendingFull);
            }
            self.inner.pending.insert(pkey, encode(ev))?;
            return Ok(Applied::Pending);
        }
        let ev_bytes = encode(ev);
        let rec_bytes = next.as_ref().map(encode);
        let r: Result<(), TransactionError<()>> =
            (&self.inner.leases, &self.inner.events, &self.inner.pending).transaction(
                |(l, e, p)| {
                    if let Some(rb) = &rec_bytes {
                        l.insert(&hash.0, rb.as_slice())?;
                    }
                    e.insert(&id.0, ev_bytes.as_slice())?;
                    p.remove(pkey.as_slice())?;
                    Ok::<_, ConflictableTransactionError<()>>(())
                },
            );
        r.map_err(|e| match e {
            TransactionError::Storage(s) => StoreError::Db(s),
            TransactionError::Abort(()) => {
                StoreError::Db(sled::Error::ReportableBug("aborted".into()))
            }
        })?;
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
            let ev: LeaseEvent = decode(&k, &v)?;
            self.inner.pending.remove(&k)?;
            match self.apply_locked(&ev, changes) {
                Ok(_) => {}
                Err(StoreError::Rejected(e)) => {
                    tracing::warn!(lease = %hash.short(), error = %e, "dropping pending event that no longer applies");
                }
                Err(e) => return Err(e),
            }
        }
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
