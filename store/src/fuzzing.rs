//! Entry points for the fuzz targets (`fuzz/`) into the store's private
//! stored forms. Not an API: each function decodes hostile bytes the way
//! the store does when it reads its own trees, and panics only if a
//! property the store relies on breaks (a decoded value that does not
//! survive its own encoding).

use crate::codec::{decode_event, encode_event};
use crate::ids::LeaseHash;
use crate::layout::{Bundle, IndexEntry};
use crate::pending::PendingEntry;

/// Feed `data` to every decoder of a stored value: an event, an index
/// entry, a lease bundle, a pending entry. Whatever decodes must encode
/// back to something that decodes to the same value; bundles are also
/// folded into their record, as a read does.
pub fn stored_forms(data: &[u8]) {
    if let Ok(ev) = decode_event(data) {
        let again = decode_event(&encode_event(&ev)).expect("an encoded event decodes");
        assert_eq!(again, ev, "event encoding round trip");
        // Reading an event also hashes and verifies it.
        let _ = (ev.lease_hash(), ev.id(), ev.check_self());
    }
    if let Some(ix) = IndexEntry::decode(data) {
        // Any non-zero flag byte reads as pending and is written back as 1,
        // so compare the values, not the bytes.
        assert_eq!(
            IndexEntry::decode(&ix.encode()),
            Some(ix),
            "index entry round trip"
        );
    }
    let hash = match data.get(..32) {
        Some(h) => LeaseHash(h.try_into().expect("32 bytes")),
        None => LeaseHash([0; 32]),
    };
    if let Ok(b) = Bundle::decode(&hash, data) {
        let again = Bundle::decode(&hash, &b.encode()).expect("an encoded bundle decodes");
        assert_eq!(again, b, "bundle round trip");
        let _ = b.record();
    }
    if let Ok(p) = PendingEntry::decode(data) {
        let again = PendingEntry::decode(&p.encode()).expect("an encoded pending entry decodes");
        // An old-form entry (no arrival) re-encodes in the new form with
        // arrival 0; the source and event must survive either way.
        assert_eq!(again.event, p.event, "pending entry event round trip");
        assert_eq!(again.source, p.source, "pending entry source round trip");
        assert_eq!(again.arrived.unwrap_or(0), p.arrived.unwrap_or(0));
    }
}

/// Real encodings of the private stored forms, for the seed corpus: the
/// bundle of `create` with `others`, an index entry and a pending entry
/// of each event.
pub fn stored_seeds(
    create: &crate::lease::LeaseEvent,
    others: &[crate::lease::LeaseEvent],
) -> Vec<Vec<u8>> {
    let mut bundle = Bundle::new(create.clone());
    bundle.others = others.to_vec();
    let mut out = vec![bundle.encode()];
    for (i, ev) in others.iter().enumerate() {
        out.push(
            IndexEntry {
                lease: ev.lease_hash(),
                ts: ev.timestamp(),
                pending: i % 2 == 0,
            }
            .encode()
            .to_vec(),
        );
        let source = match i % 3 {
            0 => crate::pending::Source::Peer("12D3KooWfuzz".into()),
            1 => crate::pending::Source::Client([127, 0, 0, 1].into()),
            _ => crate::pending::Source::Local,
        };
        out.push(
            PendingEntry {
                arrived: Some(ev.timestamp()),
                source,
                event: ev.clone(),
            }
            .encode(),
        );
    }
    out
}
