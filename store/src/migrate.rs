//! Stores written before the one-tree layout (trees `events`, `pending`,
//! `compacted`, `leases` and their indexes) are moved into it at open: the
//! held events are applied again, creates first, through the normal path
//! (so nothing unchecked enters), tombstones are copied, and the old trees
//! are dropped. A crash half way is safe: the old trees are dropped only
//! after the new layout is flushed, and applying an event twice is a no-op.

use crate::db::Store;
use crate::error::{StoreError, decode_ev};
use crate::layout;
use crate::lease::{LeaseEvent, limits};
use crate::record::OFFER_LIFETIME_SECS;

const OLD_TREES: [&str; 7] = [
    "events",
    "pending",
    "pending_ids",
    "by_lease",
    "compacted",
    "leases",
    "by_created",
];
const PAGE: usize = 1024;

pub(crate) fn from_trees(store: &Store) -> Result<(), StoreError> {
    let db = &store.inner.db;
    let names = db.tree_names();
    if !OLD_TREES
        .iter()
        .any(|t| names.iter().any(|n| n == t.as_bytes()))
    {
        return Ok(());
    }
    let mut moved = 0usize;
    {
        let compacted = db.open_tree("compacted")?;
        // An old tombstone holds the lease's end, not its terms: it is kept
        // as long as the longest lease could still be replayed.
        let keep = OFFER_LIFETIME_SECS + limits::DURATION_SECS.end() + store.retention();
        for r in compacted.iter() {
            let (k, v) = r?;
            let end = <[u8; 8]>::try_from(&v[..]).map_or(0, u64::from_be_bytes);
            let mut key = vec![layout::TOMBSTONE];
            key.extend_from_slice(&k);
            store
                .inner
                .ledger
                .insert(key, &end.saturating_add(keep).to_be_bytes())?;
        }
        let mut evs: Vec<LeaseEvent> = Vec::new();
        for tree in ["events", "pending"] {
            for r in db.open_tree(tree)?.iter() {
                let (k, v) = r?;
                evs.push(decode_ev(&k, &v)?);
            }
        }
        // Creates first, then in time order, so little goes pending.
        evs.sort_by_key(|e| (!matches!(e, LeaseEvent::Create { .. }), e.timestamp()));
        for page in evs.chunks(PAGE) {
            for r in store.apply_events(page)? {
                match r {
                    Ok(_) => moved += 1,
                    // The old layout held only checked events; one that no
                    // longer passes is reported and left behind.
                    Err(e) => tracing::warn!(error = %e, "old store: event not carried over"),
                }
            }
        }
    }
    store.flush()?;
    for t in OLD_TREES {
        db.drop_tree(t)?;
    }
    db.flush()?;
    tracing::info!(events = moved, "store moved to the one-tree layout");
    Ok(())
}
