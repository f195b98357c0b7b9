//! One atomic write to the ledger tree: reads see the page's own earlier
//! writes, and nothing reaches sled (or the in-memory sync set and
//! counters) until [`Page::commit`] applies it as one `apply_batch`. A
//! page that fails half way leaves the store as it was.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::Ordering;

use crate::error::{StoreError, corrupt};
use crate::ids::{EventId, LeaseHash};
use crate::inner::Inner;
use crate::layout::{self, Bundle};
use crate::pending::{self, Held, PendingEntry, Quota};
use crate::syncset::SyncKey;

/// A key and its value.
pub(crate) type Entry = (Vec<u8>, Vec<u8>);

pub(crate) struct Page<'a> {
    inner: &'a Inner,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    set: Vec<(SyncKey, bool)>,
    /// Pending ids joining (`true`) or leaving the in-memory pending set.
    pending: Vec<(EventId, bool)>,
    quotas: HashMap<Quota, isize>,
    pub d_events: isize,
    pub d_pending: isize,
}

impl<'a> Page<'a> {
    pub fn new(inner: &'a Inner) -> Self {
        Page {
            inner,
            writes: BTreeMap::new(),
            set: Vec::new(),
            pending: Vec::new(),
            quotas: HashMap::new(),
            d_events: 0,
            d_pending: 0,
        }
    }

    pub fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(w) = self.writes.get(k) {
            return Ok(w.clone());
        }
        Ok(self.inner.ledger.get(k)?.map(|v| v.to_vec()))
    }

    /// `get` for an event's index entry, answered from the in-memory sync
    /// set when the event is not held at all (a join's every event): the
    /// set and the `I` entries change together, under the apply lock, so
    /// only a key the set holds needs a read of the tree.
    pub fn get_index(&self, k: &[u8], key: &SyncKey) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(w) = self.writes.get(k) {
            return Ok(w.clone());
        }
        let held = {
            let set = self.inner.set.read().unwrap_or_else(|p| p.into_inner());
            set.contains(key)
        } || {
            let p = self
                .inner
                .pending_ids
                .read()
                .unwrap_or_else(|p| p.into_inner());
            p.contains(&key.id)
        };
        if !held {
            return Ok(None);
        }
        Ok(self.inner.ledger.get(k)?.map(|v| v.to_vec()))
    }

    /// Whether any event is pending, here or in the page.
    pub fn any_pending(&self) -> bool {
        self.pending_total() > 0
    }

    pub fn contains(&self, k: &[u8]) -> Result<bool, StoreError> {
        if let Some(w) = self.writes.get(k) {
            return Ok(w.is_some());
        }
        Ok(self.inner.ledger.contains_key(k)?)
    }

    pub fn put(&mut self, k: &[u8], v: Vec<u8>) {
        self.writes.insert(k.to_vec(), Some(v));
    }

    pub fn del(&mut self, k: &[u8]) {
        self.writes.insert(k.to_vec(), None);
    }

    /// Every entry under `prefix` as this page would leave it.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        let mut out: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for r in self.inner.ledger.scan_prefix(prefix) {
            let (k, v) = r?;
            out.insert(k.to_vec(), v.to_vec());
        }
        let from = Bound::Included(prefix.to_vec());
        for (k, w) in self
            .writes
            .range((from, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            match w {
                Some(v) => out.insert(k.clone(), v.clone()),
                None => out.remove(k),
            };
        }
        Ok(out.into_iter().collect())
    }

    /// A held event joins (`true`) or leaves the sync set at commit.
    pub fn set_op(&mut self, key: SyncKey, insert: bool) {
        self.set.push((key, insert));
    }

    /// A pending event is kept (`true`) or leaves (`false`) at commit:
    /// its id, and its charge to its source's and signer's shares.
    pub fn pending_op(&mut self, id: EventId, charges: [Quota; 2], keep: bool) {
        self.pending.push((id, keep));
        for q in charges {
            *self.quotas.entry(q).or_default() += if keep { 1 } else { -1 };
        }
    }

    pub fn pending_total(&self) -> usize {
        self.inner
            .n_pending
            .load(Ordering::Relaxed)
            .saturating_add_signed(self.d_pending)
    }

    pub fn retention(&self) -> u64 {
        self.inner.retention.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Write the page (not yet flushed) and publish it to the sync set and
    /// the counters. Callers hold the store's apply lock.
    pub fn commit(self) -> Result<(), StoreError> {
        if self.writes.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (k, w) in self.writes {
            match w {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        self.inner.ledger.apply_batch(batch)?;
        let mut set = self.inner.set.write().unwrap_or_else(|p| p.into_inner());
        for (key, insert) in self.set {
            if insert {
                set.insert(key);
            } else {
                set.remove(&key);
            }
        }
        drop(set);
        let mut ids = self
            .inner
            .pending_ids
            .write()
            .unwrap_or_else(|p| p.into_inner());
        for (id, keep) in self.pending {
            if keep {
                ids.insert(id);
            } else {
                ids.remove(&id);
            }
        }
        drop(ids);
        let mut quotas = self.inner.quotas.lock().unwrap_or_else(|p| p.into_inner());
        for (q, d) in self.quotas {
            let n = quotas
                .get(&q)
                .copied()
                .unwrap_or(0)
                .saturating_add_signed(d);
            if n == 0 {
                // A source with nothing pending leaves the map: a flood of
                // fresh identities must not grow it for ever.
                quotas.remove(&q);
            } else {
                quotas.insert(q, n);
            }
        }
        drop(quotas);
        add(&self.inner.n_events, self.d_events);
        add(&self.inner.n_pending, self.d_pending);
        Ok(())
    }
}

/// The bundle of a lease as the page sees it.
pub(crate) fn bundle_in(page: &Page<'_>, hash: &LeaseHash) -> Result<Option<Bundle>, StoreError> {
    let k = layout::lease_key(hash);
    match page.get(&k)? {
        Some(v) => Bundle::decode(hash, &v)
            .map(Some)
            .map_err(|d| corrupt(&k, d)),
        None => Ok(None),
    }
}

/// A pending event leaves with its index entry and its charges: one that
/// no longer applies, one past its window, one of a compacted lease.
pub(crate) fn drop_pending(page: &mut Page<'_>, pkey: &[u8], held: &PendingEntry) {
    let id = held.event.id();
    page.del(pkey);
    page.del(&layout::index_key(&id));
    page.d_pending -= 1;
    page.pending_op(id, pending::charges(&held.source, &held.event), false);
}

impl Held for Page<'_> {
    fn of_lease(&self, lease: &LeaseHash) -> Option<usize> {
        self.scan_prefix(&layout::pending_prefix(lease))
            .ok()
            .map(|v| v.len())
    }

    fn charged(&self, q: &Quota) -> usize {
        let base = {
            let m = self.inner.quotas.lock().unwrap_or_else(|p| p.into_inner());
            m.get(q).copied().unwrap_or(0)
        };
        base.saturating_add_signed(self.quotas.get(q).copied().unwrap_or(0))
    }

    fn total(&self) -> usize {
        self.pending_total()
    }
}

fn add(counter: &std::sync::atomic::AtomicUsize, d: isize) {
    if d >= 0 {
        counter.fetch_add(d.unsigned_abs(), Ordering::Relaxed);
    } else {
        counter.fetch_sub(d.unsigned_abs(), Ordering::Relaxed);
    }
}
