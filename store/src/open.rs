//! Opening a store: sled's lock, the in-memory state rebuilt from one walk
//! of the index, and stores in the older layout carried over (`migrate`).
//! Above every other part of the store, since opening may apply events.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::broadcast;

use crate::db::Store;
use crate::error::{StoreError, corrupt, decode_pending};
use crate::ids::EventId;
use crate::inner::Inner;
use crate::layout::{self, IndexEntry};
use crate::migrate;
use crate::pending::Quota;
use crate::retention::DEFAULT_RETENTION_SECS;
use crate::syncset::{SyncKey, SyncSet};

/// How long [`Store::open`] waits for a lock that is being released.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Store {
    /// Open (or create) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // A store closed moments ago in this process may still hold its
        // lock: sled releases it when its background threads let go of the
        // database, a few hundred ms after the last handle drops. Another
        // process's lock is held for good; both end as `InUse`.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match sled::Config::new().path(dir).open() {
                Ok(db) => return Self::from_db(db),
                // sled reports a held lock only as this text in an I/O
                // error (sled 0.34's `Config::open`).
                Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                    if std::time::Instant::now() >= deadline {
                        return Err(StoreError::InUse(dir.to_path_buf()));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(StoreError::Db(e)),
            }
        }
    }

    /// A throwaway in-memory store (tests).
    pub fn temporary() -> Result<Self, StoreError> {
        Self::from_db(sled::Config::new().temporary(true).open()?)
    }

    fn from_db(db: sled::Db) -> Result<Self, StoreError> {
        let (changes, _) = broadcast::channel(1024);
        let (directory_changes, _) = broadcast::channel(256);
        let ledger = db.open_tree("ledger")?;
        // The sync set and the counters come from one walk of the index at
        // open; never again afterwards.
        let mut set = SyncSet::new();
        let mut pending_ids = HashSet::new();
        let mut n_events = 0;
        for r in ledger.scan_prefix([layout::INDEX]) {
            let (k, v) = r?;
            let e = IndexEntry::decode(&v).ok_or_else(|| corrupt(&k, "bad index entry"))?;
            let id = EventId::from_slice(&k[1..]).map_err(|e| corrupt(&k, e.to_string()))?;
            if e.pending {
                pending_ids.insert(id);
            } else {
                set.insert(SyncKey { ts: e.ts, id });
                n_events += 1;
            }
        }
        let mut quotas: HashMap<Quota, usize> = HashMap::new();
        for r in ledger.scan_prefix([layout::PENDING]) {
            let (k, v) = r?;
            let p = decode_pending(&k, &v)?;
            *quotas.entry(Quota::Source(p.source)).or_default() += 1;
            *quotas.entry(Quota::Signer(p.event.signer())).or_default() += 1;
        }
        let n_pending = pending_ids.len();
        let store = Store {
            inner: Arc::new(Inner {
                directory: db.open_tree("directory")?,
                ledger,
                db,
                set: RwLock::new(set),
                n_events: AtomicUsize::new(n_events),
                n_pending: AtomicUsize::new(n_pending),
                pending_ids: RwLock::new(pending_ids),
                quotas: Mutex::new(quotas),
                opened_at: crate::now_secs(),
                retention: AtomicU64::new(DEFAULT_RETENTION_SECS),
                apply_lock: Mutex::new(()),
                changes,
                directory_changes,
                watchers: Default::default(),
            }),
        };
        migrate::from_trees(&store)?;
        Ok(store)
    }
}
