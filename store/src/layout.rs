//! The ledger's keys in sled: one tree (`ledger`), each key starting with
//! a byte that says what it holds, so that a page of events is one atomic
//! `apply_batch` instead of a transaction over six trees per event.
//!
//! ```text
//! L ‖ lease hash          → bundle: every applied event of the lease
//! I ‖ event id            → lease hash ‖ timestamp u64 ‖ 0 (applied) | 1 (pending)
//! P ‖ lease hash ‖ id     → a pending event (its lease or accept not here yet)
//! C ‖ created_at ‖ !hash  → ()   newest-first listing (see `listing`)
//! T ‖ lease hash          → tombstone: when its create is stale (u64)
//! ```
//!
//! A lease's record is not stored: it is the fold of its bundle's events
//! (create first, then the others in the order they were applied), which
//! the transition rules make independent of that order anyway. Storing the
//! events once, in one value per lease, is what took disk per event from
//! ≈ 1.9 KB (record + event + two index entries, each a sled key) down.
//!
//! ```text
//! bundle  0x02 ‖ create (204 bytes, the event codec without its kind byte)
//!              ‖ { kind u8 ‖ the event codec after kind and lease hash }*
//! ```

use crate::codec::{decode_event, encode_event};
use crate::ids::{EventId, LeaseHash};
use crate::lease::LeaseEvent;
use crate::record::{LeaseRecord, Outcome};

pub(crate) const LEASE: u8 = b'L';
pub(crate) const INDEX: u8 = b'I';
pub(crate) const PENDING: u8 = b'P';
pub(crate) const CREATED: u8 = b'C';
pub(crate) const TOMBSTONE: u8 = b'T';

const BUNDLE_V: u8 = 2;
const CREATE_BODY: usize = 204;

pub(crate) fn lease_key(h: &LeaseHash) -> [u8; 33] {
    prefixed(LEASE, &h.0)
}

pub(crate) fn index_key(id: &EventId) -> [u8; 33] {
    prefixed(INDEX, &id.0)
}

pub(crate) fn tombstone_key(h: &LeaseHash) -> [u8; 33] {
    prefixed(TOMBSTONE, &h.0)
}

pub(crate) fn pending_key(h: &LeaseHash, id: &EventId) -> [u8; 65] {
    let mut k = [0u8; 65];
    k[0] = PENDING;
    k[1..33].copy_from_slice(&h.0);
    k[33..].copy_from_slice(&id.0);
    k
}

pub(crate) fn pending_prefix(h: &LeaseHash) -> [u8; 33] {
    prefixed(PENDING, &h.0)
}

fn prefixed(tag: u8, b: &[u8; 32]) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = tag;
    k[1..].copy_from_slice(b);
    k
}

/// What an `I` entry says about one held event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub lease: LeaseHash,
    pub ts: u64,
    pub pending: bool,
}

impl IndexEntry {
    pub fn encode(&self) -> [u8; 41] {
        let mut v = [0u8; 41];
        v[..32].copy_from_slice(&self.lease.0);
        v[32..40].copy_from_slice(&self.ts.to_be_bytes());
        v[40] = u8::from(self.pending);
        v
    }

    pub fn decode(v: &[u8]) -> Option<IndexEntry> {
        if v.len() != 41 {
            return None;
        }
        let mut lease = [0u8; 32];
        lease.copy_from_slice(&v[..32]);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&v[32..40]);
        Some(IndexEntry {
            lease: LeaseHash(lease),
            ts: u64::from_be_bytes(ts),
            pending: v[40] != 0,
        })
    }
}

/// Every applied event of one lease: its create, then the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bundle {
    pub create: LeaseEvent,
    pub others: Vec<LeaseEvent>,
}

impl Bundle {
    pub fn new(create: LeaseEvent) -> Self {
        Bundle {
            create,
            others: Vec::new(),
        }
    }

    /// The record these events make. Events were checked when applied, in
    /// this order, so a refusal here means the bytes are not what we wrote.
    pub fn record(&self) -> Result<LeaseRecord, String> {
        let LeaseEvent::Create { lease, sig } = &self.create else {
            return Err("bundle does not start with a create".into());
        };
        let mut rec = LeaseRecord::from_create(lease.clone(), *sig);
        for ev in &self.others {
            match rec.apply(ev).map_err(|e| e.to_string())? {
                Outcome::Changed(r) => rec = *r,
                Outcome::Unchanged => {}
                Outcome::Wait(why) => return Err(format!("stored event waits: {why}")),
            }
        }
        Ok(rec)
    }

    /// Every event with its id.
    pub fn events(&self) -> impl Iterator<Item = &LeaseEvent> {
        std::iter::once(&self.create).chain(&self.others)
    }

    pub fn remove(&mut self, id: &EventId) -> bool {
        let before = self.others.len();
        self.others.retain(|e| e.id() != *id);
        before != self.others.len()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(1 + CREATE_BODY + 200 * self.others.len());
        b.push(BUNDLE_V);
        b.extend_from_slice(&encode_event(&self.create)[1..]);
        for ev in &self.others {
            let e = encode_event(ev);
            b.push(e[0]);
            // A second create (another signature over the same terms) has
            // no lease hash field to leave out.
            let skip = if e[0] == 1 { 1 } else { 33 };
            b.extend_from_slice(&e[skip..]);
        }
        b
    }

    pub fn decode(hash: &LeaseHash, v: &[u8]) -> Result<Bundle, String> {
        if v.first() != Some(&BUNDLE_V) || v.len() < 1 + CREATE_BODY {
            return Err("not a lease bundle".into());
        }
        let mut ev = Vec::with_capacity(1 + CREATE_BODY);
        ev.push(1);
        ev.extend_from_slice(&v[1..1 + CREATE_BODY]);
        let create = decode_event(&ev)?;
        let mut rest = &v[1 + CREATE_BODY..];
        let mut others = Vec::new();
        while let Some((&kind, body)) = rest.split_first() {
            let len = body_len(kind, body)?;
            let mut e = Vec::with_capacity(33 + len);
            e.push(kind);
            if kind != 1 {
                e.extend_from_slice(&hash.0);
            }
            e.extend_from_slice(&body[..len]);
            others.push(decode_event(&e)?);
            rest = &body[len..];
        }
        Ok(Bundle { create, others })
    }
}

/// Bytes of one bundled event's body (after its kind byte).
fn body_len(kind: u8, body: &[u8]) -> Result<usize, String> {
    let len = match kind {
        1 => CREATE_BODY,
        // accept: signer 32 ‖ accepted_at 8 ‖ len u16 ‖ key ‖ sig 64;
        // decline: signer 32 ‖ at 8 ‖ len u16 ‖ reason ‖ sig 64
        2 | 5 => {
            let l = body.get(40..42).ok_or("truncated accept or decline")?;
            42 + usize::from(u16::from_be_bytes([l[0], l[1]])) + 64
        }
        3 | 4 => 32 + 8 + 64,
        k => return Err(format!("unknown event kind byte {k} in bundle")),
    };
    if body.len() < len {
        return Err("truncated bundle".into());
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::tests::{HOST_KEY, signed_create};
    use crate::record::LeaseState;
    use crate::wallet::Wallet;

    #[test]
    fn bundles_round_trip_and_fold_into_the_record() {
        let c = Wallet::from_seed([1; 32]);
        let p = Wallet::from_seed([2; 32]);
        let create = signed_create(&c, &p);
        let h = create.lease_hash();
        let key = HOST_KEY;
        let mut b = Bundle::new(create);
        for ev in [
            LeaseEvent::accept(&p, h, 1_700_000_001, key.into()),
            LeaseEvent::accept(&p, h, 1_700_000_005, key.into()),
            LeaseEvent::settle(&c, h, 1_700_000_009),
            LeaseEvent::settle(&p, h, 1_700_000_008),
        ] {
            b.others.push(ev);
            let bytes = b.encode();
            assert_eq!(Bundle::decode(&h, &bytes), Ok(b.clone()));
            assert!(Bundle::decode(&h, &bytes[..bytes.len() - 1]).is_err());
        }
        let rec = b.record().expect("record");
        assert_eq!(rec.accept.map(|a| a.accepted_at), Some(1_700_000_001));
        assert_eq!(rec.settle.map(|s| s.at), Some(1_700_000_008));
        // Create + 2 accepts + 2 settles, each stored once and without
        // the lease hash (an accept with this key is 190 bytes, a settle 105).
        assert_eq!(b.encode().len(), 205 + 2 * 190 + 2 * 105);
    }

    #[test]
    fn a_decline_bundles_and_folds_and_an_accept_voids_it() {
        let c = Wallet::from_seed([1; 32]);
        let p = Wallet::from_seed([2; 32]);
        let create = signed_create(&c, &p);
        let h = create.lease_hash();
        let mut b = Bundle::new(create);
        b.others
            .push(LeaseEvent::decline(&p, h, 1_700_000_002, "over capacity"));
        let bytes = b.encode();
        assert_eq!(Bundle::decode(&h, &bytes), Ok(b.clone()));
        let rec = b.record().expect("record");
        assert_eq!(rec.state_at(1_700_000_003), LeaseState::Declined);
        assert_eq!(rec.decline.map(|d| d.reason), Some("over capacity".into()));
        // Same facts, either order: the accept wins, the decline is void.
        b.others
            .push(LeaseEvent::accept(&p, h, 1_700_000_004, HOST_KEY.into()));
        let rec = b.record().expect("record");
        assert_eq!(rec.state_at(1_700_000_005), LeaseState::Accepted);
        assert!(rec.decline.is_none());
        // Accept first: the decline is refused (the store also drops a
        // decline that an accept voided, so both orders keep one set).
        let mut accepted = Bundle::new(b.create.clone());
        accepted.others.push(b.others[1].clone());
        assert_eq!(
            accepted
                .record()
                .expect("record")
                .apply(&b.others[0])
                .map(|_| ()),
            Err(crate::lease::EventError::BadTransition {
                kind: crate::lease::EventKind::Decline,
                lease: h,
                reason: "the lease is already accepted; settle it instead",
            })
        );
        // Only the provider may decline.
        let by_consumer = LeaseEvent::decline(&c, h, 1_700_000_002, "no");
        let fresh = Bundle::new(signed_create(&c, &p)).record().expect("record");
        assert!(matches!(
            fresh.apply(&by_consumer),
            Err(crate::lease::EventError::WrongSigner { .. })
        ));
    }

    #[test]
    fn index_entries_round_trip() {
        let e = IndexEntry {
            lease: LeaseHash([9; 32]),
            ts: 77,
            pending: true,
        };
        assert_eq!(IndexEntry::decode(&e.encode()), Some(e));
        assert_eq!(IndexEntry::decode(&[0; 40]), None);
    }
}
