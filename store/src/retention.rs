//! Retention: a lease that ended more than a window ago leaves the store
//! and the sync set; a tombstone (its hash and the time its create goes
//! stale) stays until then so that its events, re-published by anyone, are
//! refused. After that the lease is forgotten entirely: its create is
//! refused as stale everywhere, so the store holds live leases plus about
//! one window of history, not all of history.
//!
//! # When a lease ends, for compaction
//!
//! Never later than its [`Lease::latest_end`] (creation + the offer
//! lifetime + duration), whatever its events say:
//!
//! - cancelled or declined: at the cancel's (decline's) time, or when the
//!   offer lapses if earlier;
//! - lapsed (never accepted within a day): when the offer lapses;
//! - expired: at `accepted_at + duration`;
//! - settled: at its expiry, however early it was settled. A lease settled
//!   early is kept until it would have expired anyway, so that a replay of
//!   its create and accept *without* the settle can only ever make an
//!   expired lease, never one that grants access (see below).
//!
//! Created leases whose offer is open and accepted ones have not ended and
//! are kept; pending events are kept for a window after their own time, and
//! an orphan (its lease unknown here) for much less (see [`crate::pending`]).
//!
//! # The window
//!
//! [`DEFAULT_RETENTION_SECS`] is three days: a node that was offline for
//! less than the window still finds every event it missed (a settle made
//! while it was away reaches it before its peers forget it), and nodes
//! whose clocks differ by minutes compact the same leases within minutes
//! of each other, so the old events they still exchange meanwhile are few.
//! A longer window costs disk and sync-set size in proportion. It may not
//! be shorter than the offer lifetime (one day), or a cancelled lease
//! could be forgotten while its create could still be accepted.
//!
//! # What an old event can do after compaction
//!
//! - On a node that compacted the lease, while it keeps the tombstone:
//!   nothing. Every event naming a tombstoned lease is answered
//!   `Duplicate` without being written, so it is neither applied, nor
//!   gossiped on, nor counted as invalid.
//! - Once the lease's create is stale ([`stale_at`]: its latest end plus
//!   a window), on any node: nothing. The create is refused as stale
//!   (`Duplicate`, unwritten), so the tombstone is no longer needed and is
//!   dropped; other events of the lease wait as pending for a lease that
//!   never comes and are dropped a window after their own time.
//! - In between, on a node that never held the lease (joined after
//!   everyone compacted it, or lost its store): tombstones are not
//!   replicated (they are not signed facts; a peer could forge them to
//!   erase live leases), so the node takes the replayed events. Every
//!   compacted lease ended a window ago, and the window is at least the
//!   offer lifetime, so a replay of any subset of its events gives an
//!   *expired* lease: a cancelled, declined or lapsed lease's offer has lapsed (no
//!   accept is taken after a day, by every node), a settled lease was kept
//!   until its expiry. It grants nothing, no provider can accept it, and
//!   the node compacts it again at its next pass.

use std::sync::atomic::Ordering;

use crate::db::Store;
use crate::error::{StoreError, corrupt, decode_pending};
use crate::ids::LeaseHash;
use crate::layout;
use crate::lease::Lease;
use crate::page::{Page, bundle_in, drop_pending};
use crate::record::{LeaseRecord, LeaseState, OFFER_LIFETIME_SECS};
use crate::syncset::SyncKey;

/// Default retention window: three days (see the module docs).
pub const DEFAULT_RETENTION_SECS: u64 = 3 * 24 * 3600;
/// The shortest window allowed: the offer lifetime.
pub const MIN_RETENTION_SECS: u64 = OFFER_LIFETIME_SECS;

/// A retention window that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "retention window of {0} s is shorter than the one-day offer lifetime ({MIN_RETENTION_SECS} s): a cancelled lease could be forgotten while its create can still be accepted; use at least 1 day"
)]
pub struct WindowTooShort(pub u64);

/// When a lease ended, for compaction; `None` while it has not.
pub fn ended_at(rec: &LeaseRecord, now: u64) -> Option<u64> {
    let end = match rec.state_at(now) {
        LeaseState::Cancelled => rec.cancel.as_ref().map_or(0, |c| c.at),
        LeaseState::Declined => rec.decline.as_ref().map_or(0, |d| d.at),
        LeaseState::Expired | LeaseState::Settled => rec
            .expires_at()
            .unwrap_or_else(|| rec.lease.offer_lapses_at()),
        LeaseState::Created | LeaseState::Accepted => return None,
    };
    Some(end.min(rec.lease.latest_end()))
}

/// When a lease's create is refused as stale: a window after the latest
/// it can have ended. Every node has compacted it by then.
pub fn stale_at(lease: &Lease, window: u64) -> u64 {
    lease.latest_end().saturating_add(window)
}

/// What one compaction pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Leases removed (tombstoned).
    pub leases: usize,
    /// Events removed with them, and pending events that waited too long.
    pub events: usize,
    /// Tombstones dropped (their leases' creates are stale now).
    pub tombstones: usize,
}

impl Store {
    /// The retention window in seconds: how long an ended lease is kept,
    /// and (with its terms) when its create is refused as stale.
    pub fn retention(&self) -> u64 {
        self.inner.retention.load(Ordering::Relaxed)
    }

    /// Set the retention window (default three days, at least one).
    pub fn set_retention(&self, secs: u64) -> Result<(), WindowTooShort> {
        if secs < MIN_RETENTION_SECS {
            return Err(WindowTooShort(secs));
        }
        self.inner.retention.store(secs, Ordering::Relaxed);
        Ok(())
    }

    /// Whether this lease was compacted and its tombstone is still kept
    /// (its events are refused).
    pub fn is_compacted(&self, hash: &LeaseHash) -> Result<bool, StoreError> {
        Ok(self
            .inner
            .ledger
            .contains_key(layout::tombstone_key(hash))?)
    }

    /// Compact every lease that ended more than the retention window
    /// before `now`, drop pending events a window older than `now` and
    /// tombstones whose lease is stale. One flush for the pass. Live
    /// leases are never touched: the test is [`ended_at`], on the record
    /// as stored.
    pub fn compact(&self, now: u64) -> Result<Compacted, StoreError> {
        let window = self.retention();
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
        let _guard = self.lock();
        let mut page = Page::new(&self.inner);
        done.events += expire_in(&mut page, now, self.inner.opened_at, window)?;
        for (k, v) in page.scan_prefix(&[layout::TOMBSTONE])? {
            let stale = <[u8; 8]>::try_from(&v[..]).map(u64::from_be_bytes);
            if stale.is_ok_and(|t| t < now) {
                page.del(&k);
                done.tombstones += 1;
            }
        }
        let wrote = !page.is_empty();
        page.commit()?;
        if done.leases > 0 || wrote {
            self.inner.db.flush()?;
        }
        Ok(done)
    }
}

impl Store {
    /// Drop pending events that waited too long by `now` (see
    /// [`crate::pending`]: an orphan [`PENDING_WINDOW_SECS`] after it
    /// arrived, any a retention window after its own time); how many.
    /// Also part of [`Store::compact`]; cheap enough to run every minute.
    ///
    /// [`PENDING_WINDOW_SECS`]: crate::pending::PENDING_WINDOW_SECS
    pub fn expire_pending(&self, now: u64) -> Result<usize, StoreError> {
        if self.pending_count() == 0 {
            return Ok(0);
        }
        let _guard = self.lock();
        let mut page = Page::new(&self.inner);
        let n = expire_in(&mut page, now, self.inner.opened_at, self.retention())?;
        if !page.is_empty() {
            page.commit()?;
            self.inner.db.flush()?;
        }
        Ok(n)
    }
}

fn expire_in(page: &mut Page<'_>, now: u64, opened: u64, window: u64) -> Result<usize, StoreError> {
    let mut n = 0;
    for (k, v) in page.scan_prefix(&[layout::PENDING])? {
        let held = decode_pending(&k, &v)?;
        let bound = page.contains(&layout::lease_key(&held.event.lease_hash()))?;
        if held.expired(bound, now, opened, window) {
            drop_pending(page, &k, &held);
            n += 1;
        }
    }
    Ok(n)
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
        .map_err(|d| corrupt(&layout::lease_key(hash), d))?;
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
        let held = decode_pending(&k, &v)?;
        drop_pending(page, &k, &held);
        removed += 1;
    }
    page.del(&layout::lease_key(hash));
    page.del(&crate::listing::created_key(rec.lease.created_at, hash));
    let stale = stale_at(&rec.lease, window);
    page.put(&layout::tombstone_key(hash), stale.to_be_bytes().to_vec());
    Ok(removed)
}
