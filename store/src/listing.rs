//! Leases newest first, a page at a time, from an index: `GET /leases` on
//! a million leases must not decode (or hold) a million records.
//!
//! The index key is `C` ‖ `created_at` (big-endian) ‖ the lease hash with
//! every bit flipped (see [`crate::layout`]); walked backwards it gives the newest
//! first and, within one second, hashes in ascending order (the order the
//! HTTP API always used).

use std::fmt;
use std::str::FromStr;

use crate::db::Store;
use crate::error::StoreError;
use crate::ids::LeaseHash;
use crate::layout;
use crate::record::LeaseRecord;

/// Where a page ends: the next page starts after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseCursor {
    /// The last listed lease's creation time.
    pub created_at: u64,
    /// Its hash.
    pub hash: LeaseHash,
}

impl fmt::Display for LeaseCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.created_at, self.hash)
    }
}

/// Why a cursor did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cursor {0:?}: expected <created_at>-<64 hex lease hash>")]
pub struct CursorError(String);

impl FromStr for LeaseCursor {
    type Err = CursorError;
    fn from_str(s: &str) -> Result<Self, CursorError> {
        let bad = || CursorError(s.chars().take(100).collect());
        let (t, h) = s.split_once('-').ok_or_else(bad)?;
        Ok(LeaseCursor {
            created_at: t.parse().map_err(|_| bad())?,
            hash: h.parse().map_err(|_| bad())?,
        })
    }
}

pub(crate) fn created_key(created_at: u64, hash: &LeaseHash) -> [u8; 41] {
    let mut k = [0u8; 41];
    k[0] = layout::CREATED;
    k[1..9].copy_from_slice(&created_at.to_be_bytes());
    for (d, s) in k[9..].iter_mut().zip(hash.0) {
        *d = !s;
    }
    k
}

fn hash_of(key: &[u8]) -> Option<LeaseHash> {
    let mut h = [0u8; 32];
    if key.len() != 41 {
        return None;
    }
    for (d, s) in h.iter_mut().zip(&key[9..]) {
        *d = !s;
    }
    Some(LeaseHash(h))
}

impl Store {
    /// Up to `limit` leases that `keep` accepts, newest first, starting
    /// after `after`; with the cursor to pass for the next page when the
    /// page is full. Records are decoded one at a time; at most `limit`
    /// are held. A filter that matches little still walks the index
    /// (time grows with the leases skipped, memory does not).
    pub fn leases_newest_first(
        &self,
        after: Option<&LeaseCursor>,
        limit: usize,
        mut keep: impl FnMut(&LeaseRecord) -> bool,
    ) -> Result<(Vec<LeaseRecord>, Option<LeaseCursor>), StoreError> {
        let from = vec![layout::CREATED];
        let iter = match after {
            Some(c) => self
                .inner
                .ledger
                .range(from..created_key(c.created_at, &c.hash).to_vec()),
            None => self.inner.ledger.range(from..vec![layout::CREATED + 1]),
        };
        let mut out = Vec::new();
        for r in iter.rev() {
            if out.len() >= limit {
                break;
            }
            let (k, _) = r?;
            let Some(hash) = hash_of(&k) else { continue };
            // Compaction removes the index entry with the record; a miss
            // here is a race with it, not corruption.
            let Some(rec) = self.lease(&hash)? else {
                continue;
            };
            if keep(&rec) {
                out.push(rec);
            }
        }
        let next = (out.len() >= limit && limit > 0)
            .then(|| out.last())
            .flatten()
            .map(|r| LeaseCursor {
                created_at: r.lease.created_at,
                hash: r.hash,
            });
        Ok((out, next))
    }

    /// The hashes of up to `limit` leases whose hex form starts with
    /// `prefix` (lowercase hex, any length), in hash order: what a user
    /// types when they copy the 8-hex short form xe prints.
    pub fn lease_hashes_with_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<LeaseHash>, StoreError> {
        let whole = hex::decode(&prefix[..prefix.len() / 2 * 2]).unwrap_or_default();
        let mut key = vec![layout::LEASE];
        key.extend_from_slice(&whole);
        let mut out = Vec::new();
        for r in self.inner.ledger.scan_prefix(key) {
            if out.len() >= limit {
                break;
            }
            let (k, _) = r?;
            let Ok(h) = LeaseHash::from_slice(&k[1..]) else {
                continue;
            };
            if h.to_hex().starts_with(prefix) {
                out.push(h);
            }
        }
        Ok(out)
    }
}
