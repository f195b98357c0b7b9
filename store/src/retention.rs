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
//! - Tombstones are never dropped: 40 bytes (plus sled's overhead) per
//!   ended lease against ~4.5 KB on disk for its events, record and indexes.

use crate::apply::bundle_in;
use crate::db::{Store, StoreError, decode_ev};
use crate::ids::LeaseHash;
use crate::layout;
use crate::page::Page;
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
        Ok(self
            .inner
            .ledger
            .contains_key(layout::tombstone_key(hash))?)
    }

    /// Compact every lease that ended more than `window` seconds before
    /// `now`. One flush for the pass. Live leases are never touched: the
    /// test is [`ended_at`], on the record as stored.
    pub fn compact(&self, now: u64, window: u64) -> Result<Compacted, StoreError> {
        let mut due: Vec<(LeaseHash, u64)> = Vec::new();
        self.for_each_lease(|rec| {
            if let Some(end) = ended_at(&rec, now)
                && end.saturating_add(window) < now
            {
                due.push((rec.hash, end));
            }
            Ok(())
        })?;
        let mut done = Compacted::default();
        // Pages of a bounded size: the lock is not held for a whole pass.
        for chunk in due.chunks(256) {
            let _guard = self.lock();
            let mut page = Page::new(&self.inner);
            for (hash, end) in chunk {
                let n = compact_one(&mut page, hash, *end, now, window)?;
                if n > 0 {
                    done.events += n;
                    done.leases += 1;
                }
            }
            page.commit()?;
        }
        if done.leases > 0 {
            self.inner.db.flush()?;
        }
        Ok(done)
    }
}

/// Remove one lease's events, record and index entries and leave its
/// tombstone; the number of events removed (0: not due after all).
fn compact_one(
    page: &mut Page<'_>,
    hash: &LeaseHash,
    end: u64,
    now: u64,
    window: u64,
) -> Result<usize, StoreError> {
    // Re-read under the lock: an event applied since the scan may have
    // moved the end (a later accept, say).
    let Some(bundle) = bundle_in(page, hash)? else {
        return Ok(0);
    };
    let rec = bundle
        .record()
        .map_err(|d| crate::apply::corrupt(&layout::lease_key(hash), d))?;
    if ended_at(&rec, now).is_none_or(|e| e != end || e.saturating_add(window) >= now) {
        return Ok(0);
    }
    let mut removed = 0;
    for ev in bundle.events() {
        let id = ev.id();
        page.del(&layout::index_key(&id));
        page.set_op(
            SyncKey {
                ts: ev.timestamp(),
                id,
            },
            false,
        );
        page.d_events -= 1;
        removed += 1;
    }
    for (k, v) in page.scan_prefix(&layout::pending_prefix(hash))? {
        let ev = decode_ev(&k, &v)?;
        crate::apply::drop_pending(page, &k, &ev);
        removed += 1;
    }
    page.del(&layout::lease_key(hash));
    page.del(&crate::listing::created_key(rec.lease.created_at, hash));
    page.put(&layout::tombstone_key(hash), end.to_be_bytes().to_vec());
    Ok(removed)
}
