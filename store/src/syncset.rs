//! The sync set: every event a node holds (applied or pending), as sorted
//! `(timestamp, event id)` keys with order-independent fingerprints over
//! ranges. Range-based set reconciliation (`xe-net`'s `replication::recon`)
//! compares two nodes' sets through these fingerprints and descends only
//! into ranges that differ.
//!
//! Keys sort by the event's own signed timestamp first, so events of one
//! period sit together: a node that was away for an hour differs from its
//! peers in the last few ranges only, not in ranges spread over all history.
//!
//! The fingerprint of a range is `sha256(tag ‖ Σ ids mod 2²⁵⁶ ‖ count)`,
//! truncated to 16 bytes (the sum-based construction described for
//! Negentropy). A sum can be updated by adding or subtracting one id, so the
//! whole set's fingerprint is kept up to date in O(1) per insert and is O(1)
//! to read: two nodes that agree compare one fingerprint and are done.
//! Sub-ranges are summed by walking the range (O(range)); that work is only
//! paid where sets differ.

use std::collections::BTreeSet;
use std::ops::Bound as StdBound;

use sha2::{Digest, Sha256};

use crate::ids::EventId;

/// One element of the sync set. Ordered by `ts`, then `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SyncKey {
    /// The event's own timestamp (unix seconds, as signed).
    pub ts: u64,
    /// The event id.
    pub id: EventId,
}

impl SyncKey {
    /// The smallest key: the lower bound of the first range.
    pub const MIN: SyncKey = SyncKey {
        ts: 0,
        id: EventId([0; 32]),
    };

    /// The 40-byte big-endian form (sled key; sorts like the key).
    pub fn to_bytes(&self) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[..8].copy_from_slice(&self.ts.to_be_bytes());
        b[8..].copy_from_slice(&self.id.0);
        b
    }

    /// Parse the 40-byte form.
    pub fn from_bytes(b: &[u8]) -> Option<SyncKey> {
        if b.len() != 40 {
            return None;
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&b[..8]);
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[8..]);
        Some(SyncKey {
            ts: u64::from_be_bytes(ts),
            id: EventId(id),
        })
    }
}

/// The exclusive upper end of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bound {
    /// Up to, not including, this key.
    Key(SyncKey),
    /// To the end of the key space.
    End,
}

impl Bound {
    fn as_std(&self) -> StdBound<SyncKey> {
        match self {
            Bound::Key(k) => StdBound::Excluded(*k),
            Bound::End => StdBound::Unbounded,
        }
    }
}

/// Count and fingerprint of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    /// Elements in the range.
    pub count: u64,
    /// Truncated hash of the id sum and the count.
    pub hash: [u8; 16],
}

/// A 256-bit accumulator: the sum of ids, little-endian limbs, mod 2²⁵⁶.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Acc([u64; 4]);

fn limbs(id: &EventId) -> [u64; 4] {
    let mut l = [0u64; 4];
    for (i, chunk) in id.0.chunks_exact(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        l[i] = u64::from_le_bytes(b);
    }
    l
}

impl Acc {
    fn add(&mut self, id: &EventId) {
        let x = limbs(id);
        let mut carry = false;
        for (a, b) in self.0.iter_mut().zip(x) {
            let (s1, c1) = a.overflowing_add(b);
            let (s2, c2) = s1.overflowing_add(u64::from(carry));
            *a = s2;
            carry = c1 || c2;
        }
    }

    fn sub(&mut self, id: &EventId) {
        let x = limbs(id);
        let mut borrow = false;
        for (a, b) in self.0.iter_mut().zip(x) {
            let (s1, c1) = a.overflowing_sub(b);
            let (s2, c2) = s1.overflowing_sub(u64::from(borrow));
            *a = s2;
            borrow = c1 || c2;
        }
    }

    fn finish(&self, count: u64) -> Fingerprint {
        let mut h = Sha256::new();
        h.update(b"xe/recon/fp/v1");
        for l in self.0 {
            h.update(l.to_le_bytes());
        }
        h.update(count.to_be_bytes());
        let d = h.finalize();
        let mut hash = [0u8; 16];
        hash.copy_from_slice(&d[..16]);
        Fingerprint { count, hash }
    }
}

/// The fingerprint of a set of ids (any order), as [`SyncSet`] computes it.
pub fn fingerprint_of<'a>(ids: impl IntoIterator<Item = &'a EventId>) -> Fingerprint {
    let mut acc = Acc::default();
    let mut n = 0u64;
    for id in ids {
        acc.add(id);
        n += 1;
    }
    acc.finish(n)
}

/// The shortest bound that is above `prev` and at most `next` (`prev <
/// next`): the timestamp alone when they differ in it, else the id prefix
/// one byte longer than their common prefix, zero-filled. The wire form
/// sends only that prefix.
pub fn minimal_bound(prev: &SyncKey, next: &SyncKey) -> SyncKey {
    if prev.ts != next.ts {
        return SyncKey {
            ts: next.ts,
            id: EventId([0; 32]),
        };
    }
    let common = prev
        .id
        .0
        .iter()
        .zip(next.id.0.iter())
        .take_while(|(a, b)| a == b)
        .count();
    let len = (common + 1).min(32);
    let mut id = [0u8; 32];
    id[..len].copy_from_slice(&next.id.0[..len]);
    SyncKey {
        ts: next.ts,
        id: EventId(id),
    }
}

/// The sorted set with a running whole-set fingerprint.
#[derive(Debug, Default, Clone)]
pub struct SyncSet {
    keys: BTreeSet<SyncKey>,
    total: Acc,
}

impl SyncSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a key; false if it was there.
    pub fn insert(&mut self, k: SyncKey) -> bool {
        let new = self.keys.insert(k);
        if new {
            self.total.add(&k.id);
        }
        new
    }

    /// Remove a key; false if it was not there.
    pub fn remove(&mut self, k: &SyncKey) -> bool {
        let had = self.keys.remove(k);
        if had {
            self.total.sub(&k.id);
        }
        had
    }

    /// Whether the key is in the set.
    pub fn contains(&self, k: &SyncKey) -> bool {
        self.keys.contains(k)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn range(&self, lo: &SyncKey, hi: &Bound) -> impl Iterator<Item = &SyncKey> {
        // An inverted range (a hostile peer's bounds) is empty, not a panic.
        let empty = matches!(hi, Bound::Key(h) if h <= lo);
        let r = if empty {
            None
        } else {
            Some(self.keys.range((StdBound::Included(*lo), hi.as_std())))
        };
        r.into_iter().flatten()
    }

    /// Fingerprint of `[lo, hi)`. O(1) for the whole key space, O(range)
    /// otherwise.
    pub fn fingerprint(&self, lo: &SyncKey, hi: &Bound) -> Fingerprint {
        if *lo == SyncKey::MIN && *hi == Bound::End {
            return self.total.finish(self.keys.len() as u64);
        }
        let mut acc = Acc::default();
        let mut n = 0u64;
        for k in self.range(lo, hi) {
            acc.add(&k.id);
            n += 1;
        }
        acc.finish(n)
    }

    /// Number of keys in `[lo, hi)`, stopping early at `cap`.
    pub fn count_upto(&self, lo: &SyncKey, hi: &Bound, cap: usize) -> usize {
        self.range(lo, hi).take(cap).count()
    }

    /// Keys in `[lo, hi)`, at most `limit`.
    pub fn keys(&self, lo: &SyncKey, hi: &Bound, limit: usize) -> Vec<SyncKey> {
        self.range(lo, hi).take(limit).copied().collect()
    }

    /// Split `[lo, hi)` into at most `parts` sub-ranges of about equal size,
    /// each given by its upper bound and fingerprint; the last ends at `hi`.
    /// One pass over the range.
    pub fn split(&self, lo: &SyncKey, hi: &Bound, parts: usize) -> Vec<(Bound, Fingerprint)> {
        let keys: Vec<&SyncKey> = self.range(lo, hi).collect();
        let n = keys.len();
        let parts = parts.clamp(1, n.max(1));
        let mut out = Vec::with_capacity(parts);
        let mut start = 0;
        for p in 0..parts {
            let end = (p + 1) * n / parts;
            let mut acc = Acc::default();
            for k in &keys[start..end] {
                acc.add(&k.id);
            }
            let upper = if p + 1 == parts {
                *hi
            } else {
                Bound::Key(minimal_bound(keys[end - 1], keys[end]))
            };
            out.push((upper, acc.finish((end - start) as u64)));
            start = end;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ts: u64, b: u8) -> SyncKey {
        let mut id = [b; 32];
        id[31] = b.wrapping_mul(7);
        SyncKey {
            ts,
            id: EventId(id),
        }
    }

    #[test]
    fn whole_set_fingerprint_matches_a_walk_and_is_order_free() {
        let mut a = SyncSet::new();
        let mut b = SyncSet::new();
        for i in 0..50u8 {
            a.insert(key(u64::from(i % 5), i));
        }
        for i in (0..50u8).rev() {
            b.insert(key(u64::from(i % 5), i));
        }
        let all = a.fingerprint(&SyncKey::MIN, &Bound::End);
        assert_eq!(all, b.fingerprint(&SyncKey::MIN, &Bound::End));
        let walked = fingerprint_of(a.keys.iter().map(|k| &k.id));
        assert_eq!(all, walked);
        a.remove(&key(3, 3));
        assert_ne!(a.fingerprint(&SyncKey::MIN, &Bound::End), all);
        a.insert(key(3, 3));
        assert_eq!(a.fingerprint(&SyncKey::MIN, &Bound::End), all);
    }

    #[test]
    fn split_covers_the_range_with_minimal_bounds() {
        let mut s = SyncSet::new();
        for i in 0..100u8 {
            s.insert(key(u64::from(i / 10), i));
        }
        let parts = s.split(&SyncKey::MIN, &Bound::End, 16);
        assert_eq!(parts.len(), 16);
        assert_eq!(parts.iter().map(|(_, f)| f.count).sum::<u64>(), 100);
        let mut lo = SyncKey::MIN;
        for (hi, fp) in &parts {
            assert_eq!(s.fingerprint(&lo, hi), *fp);
            if let Bound::Key(k) = hi {
                lo = *k;
            }
        }
        assert_eq!(parts.last().map(|p| p.0), Some(Bound::End));
    }

    #[test]
    fn inverted_range_is_empty() {
        let mut s = SyncSet::new();
        s.insert(key(5, 1));
        assert_eq!(s.count_upto(&key(9, 0), &Bound::Key(key(1, 0)), 10), 0);
    }
}
