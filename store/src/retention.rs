//! Retention: a lease that ended more than a window ago leaves the store
//! and the sync set; a tombstone (its hash and end time, 40 bytes) stays so
//! that its events, re-published by anyone, are refused.
//!
//! # When a lease ends, for compaction
//!
//! - cancelled: at the cancel's time;
//! - expired: at `accepted_at + duration`;
//! - settled: at the later of the settle's time and the expiry. A lease
//!   settled early is kept until it would have expired anyway, so that a
//!   replay of its create and accept *without* the settle can only ever
//!   make an expired lease, never one that grants access (see below).
//!
//! Created leases (never accepted nor cancelled) have not ended and are
//! kept; so are pending events of leases never seen.
//!
//! # The window
//!
//! [`DEFAULT_RETENTION_SECS`] is three days: a node that was offline for
//! less than the window still finds every event it missed (a settle made
//! while it was away reaches it before its peers forget it), and nodes
//! whose clocks differ by minutes compact the same leases within minutes
//! of each other, so the old events they still exchange meanwhile are few.
//! A longer window costs disk and sync-set size in proportion.
//!
//! # What an old event can do after compaction
//!
//! - On a node that compacted the lease: nothing. Every event naming a
//!   tombstoned lease is answered `Duplicate` without being written, so
//!   it is neither applied, nor gossiped on, nor counted as invalid.
//! - On a node that never held the lease (joined after everyone compacted
//!   it, or lost its store): tombstones are not replicated (they are not
//!   signed facts; a peer could forge them to erase live leases), so the
//!   node takes the replayed events. A replayed create + accept of an
//!   expired or settled lease gives an *expired* lease (the settled one
//!   was kept until its expiry, above), which grants nothing and is
//!   compacted again at the node's next pass. A replayed create of a
//!   *cancelled* lease gives a *created* lease again: it grants nothing,
//!   but a provider whose store was wiped could accept it anew. That is
//!   the one revival left, and only after the provider lost its own
//!   tombstone; refusing to accept creates older than the window would
//!   close it (a provider-side rule, not implemented here).
//! - Tombstones are never dropped: 40 bytes per ended lease against
//!   ~5 KB for its events and record.

use std::sync::atomic::Ordering;

use sled::Transactional;
use sled::transaction::ConflictableTransactionError;

use crate::db::{Store, StoreError, decode_rec, tx_error};
use crate::ids::{EventId, LeaseHash};
use crate::record::{LeaseRecord, LeaseState};
use crate::syncset::SyncKey;

/// Default retention window: three days (see the module docs).
pub const DEFAULT_RETENTION_SECS: u64 = 3 * 24 * 3600;

/// When a lease ended, for compaction; `None` while it has not.
pub fn ended_at(rec: &LeaseRecord, now: u64) -> Option<u64> {
    match rec.state_at(now) {
        LeaseState::Cancelled => rec.cancel.as_ref().map(|c| c.at),
        LeaseState::Expired => rec.expires_at(),
        LeaseState::Settled => {
            let at = rec.settle.as_ref().map_or(0, |s| s.at);
            Some(at.max(rec.expires_at().unwrap_or(0)))
        }
        LeaseState::Created | LeaseState::Accepted => None,
    }
}

/// What one compaction pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Leases removed (tombstoned).
    pub leases: usize,
    /// Events removed with them.
    pub events: usize,
}

impl Store {
    /// Whether this lease was compacted (its events are refused).
    pub fn is_compacted(&self, hash: &LeaseHash) -> Result<bool, StoreError> {
        Ok(self.inner.compacted.contains_key(hash.0)?)
    }

    /// Compact every lease that ended more than `window` seconds before
    /// `now`. One flush for the pass. Live leases are never touched: the
    /// test is [`ended_at`], on the record as stored.
    pub fn compact(&self, now: u64, window: u64) -> Result<Compacted, StoreError> {
        let mut due: Vec<(LeaseHash, u64)> = Vec::new();
        for r in self.inner.leases.iter() {
            let (k, v) = r?;
            let rec: LeaseRecord = decode_rec(&k, &v)?;
            if let Some(end) = ended_at(&rec, now)
                && end.saturating_add(window) < now
            {
                due.push((rec.hash, end));
            }
        }
        let mut done = Compacted::default();
        for (hash, end) in due {
            done.events += self.compact_one(&hash, end, now, window)?;
            done.leases += 1;
        }
        if done.leases > 0 {
            self.inner.db.flush()?;
        }
        Ok(done)
    }

    fn compact_one(
        &self,
        hash: &LeaseHash,
        end: u64,
        now: u64,
        window: u64,
    ) -> Result<usize, StoreError> {
        let _guard = self
            .inner
            .apply_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Re-read under the lock: an event applied since the scan may have
        // moved the end (a later accept, say).
        let Some(rec) = self.lease(hash)? else {
            return Ok(0);
        };
        if ended_at(&rec, now).is_none_or(|e| e != end || e.saturating_add(window) >= now) {
            return Ok(0);
        }
        let created = crate::listing::created_key(rec.lease.created_at, hash);
        let mut held: Vec<(SyncKey, bool)> = Vec::new();
        for r in self.inner.by_lease.scan_prefix(hash.0) {
            let (k, v) = r?;
            let id = EventId::from_slice(&k[32..]).map_err(|e| StoreError::Corrupt {
                key: hex::encode(&k),
                detail: e.to_string(),
            })?;
            let ts = <[u8; 8]>::try_from(&v[..])
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    key: hex::encode(&k),
                    detail: "index value is not 8 bytes".into(),
                })?;
            let pending = self.inner.pending_ids.contains_key(id.0)?;
            held.push((SyncKey { ts, id }, pending));
        }
        let inner = &self.inner;
        let r = (
            &inner.leases,
            &inner.events,
            &inner.pending,
            &inner.pending_ids,
            &inner.by_lease,
            &inner.compacted,
            &inner.by_created,
        )
            .transaction(|(l, e, p, pi, bl, c, bc)| {
                l.remove(&hash.0)?;
                bc.remove(&created[..])?;
                for (k, _) in &held {
                    let mut lk = hash.0.to_vec();
                    lk.extend_from_slice(&k.id.0);
                    e.remove(&k.id.0)?;
                    p.remove(lk.as_slice())?;
                    pi.remove(&k.id.0)?;
                    bl.remove(lk)?;
                }
                c.insert(&hash.0, &end.to_be_bytes())?;
                Ok::<_, ConflictableTransactionError<()>>(())
            });
        r.map_err(tx_error)?;
        let mut set = inner.set.write().unwrap_or_else(|p| p.into_inner());
        for (k, pending) in &held {
            set.remove(k);
            let counter = if *pending {
                &inner.n_pending
            } else {
                &inner.n_events
            };
            counter.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(held.len())
    }
}
