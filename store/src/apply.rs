//! Applying events: signature checks outside the lock, then each event's
//! read-modify-write of its lease's bundle inside one [`Page`], one
//! `apply_batch` and one flush for the whole page.

use crate::db::{Applied, LeaseChange, Store};
use crate::error::{StoreError, corrupt, decode_pending};
use crate::ids::LeaseHash;
use crate::layout::{self, Bundle, IndexEntry};
use crate::lease::{EventError, LeaseEvent};
use crate::page::{Page, bundle_in, drop_pending};
use crate::pending::{self, PendingEntry, Source};
use crate::record::{LeaseRecord, Outcome};
use crate::syncset::SyncKey;

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

/// A page of events with the result of each one's own checks (signature,
/// terms, host key); only [`Verified::check`] makes one.
pub struct Verified {
    events: Vec<LeaseEvent>,
    checked: Vec<Result<(), EventError>>,
}

impl Verified {
    /// Check every event of a page (on two threads for a big page).
    pub fn check(events: Vec<LeaseEvent>) -> Self {
        let checked = check_all(&events);
        Verified { events, checked }
    }
}

fn record_of(hash: &LeaseHash, b: &Bundle) -> Result<LeaseRecord, StoreError> {
    b.record().map_err(|d| corrupt(&layout::lease_key(hash), d))
}

impl Store {
    /// Validate and apply one event. A refused event changes nothing; an
    /// event whose lease (or accept) is not known yet is kept pending and
    /// applied when its dependency lands. Durable when it returns.
    pub fn apply_event(&self, ev: &LeaseEvent) -> Result<Applied, StoreError> {
        self.apply_event_from(ev, &Source::Local)
    }

    /// [`Store::apply_event`] for an event from `source`, whose share of
    /// the pending store it may take (see [`crate::pending`]).
    pub fn apply_event_from(
        &self,
        ev: &LeaseEvent,
        source: &Source,
    ) -> Result<Applied, StoreError> {
        let mut results = self.apply_events_from(std::slice::from_ref(ev), source)?;
        results.pop().unwrap_or(Ok(Applied::Duplicate))
    }

    /// Validate and apply a page of events as one atomic write with one
    /// flush: a transaction and a flush per event capped a join at a few
    /// thousand events/s. Each event gets its own result (a refused one
    /// changes nothing); the outer error is a failed write or flush, after
    /// which nothing of the page may be assumed durable. Change
    /// notifications go out after the flush.
    pub fn apply_events(
        &self,
        evs: &[LeaseEvent],
    ) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
        self.apply_events_from(evs, &Source::Local)
    }

    /// [`Store::apply_events`] for events from `source`.
    pub fn apply_events_from(
        &self,
        evs: &[LeaseEvent],
        source: &Source,
    ) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
        // Signatures are checked before taking the lock: that is the
        // expensive part, and it needs no state.
        let checked = check_all(evs);
        self.apply_checked(evs, checked, source)
    }

    /// [`Store::apply_events`] for a page already checked with
    /// [`Verified::check`], so that a caller can check the next page while
    /// this one is written.
    pub fn apply_verified(
        &self,
        page: Verified,
    ) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
        self.apply_verified_from(page, &Source::Local)
    }

    /// [`Store::apply_verified`] for events from `source`.
    pub fn apply_verified_from(
        &self,
        page: Verified,
        source: &Source,
    ) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
        self.apply_checked(&page.events, page.checked, source)
    }

    fn apply_checked(
        &self,
        evs: &[LeaseEvent],
        checked: Vec<Result<(), EventError>>,
        source: &Source,
    ) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
        let _guard = self.lock();
        let mut page = Page::new(&self.inner);
        let mut changes = Vec::new();
        let mut results = Vec::with_capacity(evs.len());
        for (ev, ok) in evs.iter().zip(checked) {
            let r = match ok {
                Err(e) => Err(StoreError::Rejected(e)),
                Ok(()) => match apply_one(&mut page, ev, source, &mut changes) {
                    Err(e @ (StoreError::Db(_) | StoreError::Corrupt { .. })) => return Err(e),
                    r => r,
                },
            };
            results.push(r);
        }
        if !page.is_empty() {
            page.commit()?;
            self.inner.db.flush()?;
        }
        for c in changes {
            self.inner.watchers.changed(&c.lease);
            // No receivers is fine.
            let _ = self.inner.changes.send(c);
        }
        Ok(results)
    }
}

fn apply_one(
    page: &mut Page<'_>,
    ev: &LeaseEvent,
    source: &Source,
    changes: &mut Vec<LeaseChange>,
) -> Result<Applied, StoreError> {
    let hash = ev.lease_hash();
    let id = ev.id();
    let skey = SyncKey {
        ts: ev.timestamp(),
        id,
    };
    let ikey = layout::index_key(&id);
    let held = match page.get_index(&ikey, &skey)? {
        Some(v) => Some(IndexEntry::decode(&v).ok_or_else(|| corrupt(&ikey, "bad index entry"))?),
        None => None,
    };
    if held.is_some_and(|e| !e.pending) {
        return Ok(Applied::Duplicate);
    }
    let was_pending = held.is_some();
    let mut bundle = bundle_in(page, &hash)?;
    // A compacted lease's events are refused as known: a replay is not
    // misbehaviour (a peer may simply be behind), but it changes nothing.
    // Compaction removes the bundle as it writes the tombstone, so only a
    // lease without a bundle can have one.
    if bundle.is_none() && page.contains(&layout::tombstone_key(&hash))? {
        return Ok(Applied::Duplicate);
    }
    // A lease that ended a window ago everywhere is forgotten: its create
    // is refused as stale (see `retention`), like a tombstoned one.
    if let (None, LeaseEvent::Create { lease, .. }) = (&bundle, ev)
        && crate::retention::stale_at(lease, page.retention()) < crate::now_secs()
    {
        return Ok(Applied::Duplicate);
    }
    let current = match &bundle {
        Some(b) => Some(record_of(&hash, b)?),
        None => None,
    };
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
    let pkey = layout::pending_key(&hash, &id);
    if wait {
        if was_pending {
            return Ok(Applied::Duplicate);
        }
        pending::admit(page, &hash, ev, source)?;
        let held = PendingEntry {
            arrived: Some(crate::now_secs()),
            source: source.clone(),
            event: ev.clone(),
        };
        page.put(&pkey, held.encode());
        let entry = IndexEntry {
            lease: hash,
            ts: skey.ts,
            pending: true,
        };
        page.put(&ikey, entry.encode().to_vec());
        page.d_pending += 1;
        // Not in the sync set: see `pending`.
        page.pending_op(id, pending::charges(source, ev), true);
        return Ok(Applied::Pending);
    }
    match &mut bundle {
        None => {
            bundle = Some(Bundle::new(ev.clone()));
            if let Some(n) = &next {
                let ck = crate::listing::created_key(n.lease.created_at, &hash);
                page.put(&ck, Vec::new());
            }
        }
        Some(b) => b.others.push(ev.clone()),
    }
    // An accept that voids a cancel or a decline drops it from the ledger
    // too: a node that saw the accept first refuses that event, so keeping
    // it here would leave the two nodes' sets different for ever, costing
    // a reconciliation round trip every time they meet.
    if let (Some(cur), Some(n), Some(b)) = (&current, &next, &mut bundle) {
        let voided_cancel = cur
            .cancel
            .as_ref()
            .filter(|_| n.cancel.is_none())
            .map(|c| (c.at, c.event_id));
        let voided_decline = cur
            .decline
            .as_ref()
            .filter(|_| n.decline.is_none())
            .map(|d| (d.at, d.event_id));
        for (ts, id) in [voided_cancel, voided_decline].into_iter().flatten() {
            if b.remove(&id) {
                page.del(&layout::index_key(&id));
                page.set_op(SyncKey { ts, id }, false);
                page.d_events -= 1;
            }
        }
    }
    let b = bundle.as_ref().expect("set above");
    page.put(&layout::lease_key(&hash), b.encode());
    let entry = IndexEntry {
        lease: hash,
        ts: skey.ts,
        pending: false,
    };
    page.put(&ikey, entry.encode().to_vec());
    if was_pending {
        let held = match page.get(&pkey)? {
            Some(v) => decode_pending(&pkey, &v)?.source,
            None => return Err(corrupt(&ikey, "pending index entry without its event")),
        };
        page.del(&pkey);
        page.d_pending -= 1;
        page.pending_op(id, pending::charges(&held, ev), false);
    }
    page.d_events += 1;
    page.set_op(skey, true);
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
    // Most pages (a join's in time order) leave nothing pending: then
    // there is no prefix to scan.
    if page.any_pending() {
        retry_pending(page, &hash, changes)?;
    }
    Ok(Applied::Changed(new))
}

/// Re-apply events that were waiting on this lease.
fn retry_pending(
    page: &mut Page<'_>,
    hash: &LeaseHash,
    changes: &mut Vec<LeaseChange>,
) -> Result<(), StoreError> {
    let prefix = layout::pending_prefix(hash);
    for (k, v) in page.scan_prefix(&prefix)? {
        // Applying one of them retries this lease's pending events again
        // (recursively), which may already have applied or dropped the
        // rest of this list.
        if !page.contains(&k)? {
            continue;
        }
        let held = decode_pending(&k, &v)?;
        // Still waiting (a settle whose accept is not here yet) leaves it
        // pending; applying removes it from `P` in the same page.
        match apply_one(page, &held.event, &held.source, changes) {
            Ok(_) => {}
            Err(StoreError::Rejected(e)) => {
                tracing::warn!(lease = %hash.short(), error = %e, "dropping pending event that no longer applies");
                drop_pending(page, &k, &held);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
