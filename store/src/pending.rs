//! Pending events: what may wait for its dependency, for how long, and
//! how much of the pending store one source may take (issue 18.2).
//!
//! # What is legitimately pending
//!
//! - An accept, settle, cancel or decline whose lease's create is not here
//!   yet (an *orphan*). Gossip reorders by milliseconds to seconds (two
//!   messages of one peer are validated on two threads); a reconciliation
//!   moves a range in key order `(ts, id)`, so an event signed on a clock
//!   behind its create's sorts first and waits for the create's page —
//!   at most one session, which [`SESSION_TIMEOUT`](crate) of the net
//!   crate bounds at 10 minutes. Its signer cannot be checked (the lease
//!   names the provider), so an orphan costs its sender one signature
//!   with any fresh key: it is the flood.
//! - A settle before its accept on a known lease (*bound*): its signer
//!   was checked against the lease, so only the lease's consumer or
//!   provider can make one.
//!
//! # The rules
//!
//! - **Window.** An orphan is dropped [`PENDING_WINDOW_SECS`] (15 min: a
//!   whole session plus margin) after it *arrived here*; its own timestamp
//!   is the attacker's choice, so the arrival time is stored with it. A
//!   bound event keeps the old rule (its own time plus the retention
//!   window, or with its lease), since a real party signed it.
//! - **Shares.** Each source (a libp2p peer, an API client's IP) may hold
//!   at most its share ([`MAX_PENDING_PER_PEER`], [`MAX_PENDING_PER_CLIENT`]),
//!   each signing key [`MAX_PENDING_PER_SIGNER`], each lease
//!   [`MAX_PENDING_PER_LEASE`], all together [`MAX_PENDING`], plus a
//!   [`LIGHT_RESERVE`] that only sources holding fewer than
//!   [`LIGHT_SOURCE`] may use once the rest is full.
//! - **No eviction.** Over a share the *new* event is refused; nothing
//!   held is ever pushed out, so a flood cannot displace a legitimate
//!   pending event. A refusal costs a legitimate event a delay, not its
//!   existence: pending events are not in the sync set, so the event
//!   arrives again by reconciliation once a peer has applied it.
//! - **Not reconciled, not forwarded.** Pending events stay out of the
//!   sync set (a flood on one node does not spread by reconciliation) and
//!   gossip forwards one only once it applied here (see `xe-net`).

use std::net::IpAddr;

use crate::codec::{decode_event, encode_event};
use crate::ids::{AccountPubKey, LeaseHash};
use crate::lease::LeaseEvent;

/// Most pending events held, all sources together (the disk bound).
pub const MAX_PENDING: usize = 100_000;
/// Beyond [`MAX_PENDING`], room kept for sources that hold fewer than
/// [`LIGHT_SOURCE`] pending events: a few hundred flooding identities
/// filling the main pool still leave honest peers (which hold a handful
/// each, for seconds) able to wait for a create.
pub const LIGHT_RESERVE: usize = 10_000;
/// A source holding fewer pending events than this may use the reserve.
pub const LIGHT_SOURCE: usize = 16;
/// One libp2p peer's share: 1% of [`MAX_PENDING`]. An honest peer's
/// pending events are the few that raced their create, or the events of
/// one reconciliation page signed on a skewed clock: tens, not thousands.
pub const MAX_PENDING_PER_PEER: usize = 1_000;
/// One API client IP's share. An honest client submits an event to a node
/// that lacks its lease only by accident.
pub const MAX_PENDING_PER_CLIENT: usize = 64;
/// One signing key's share. Fresh keys are free, so this only stops a
/// single key spread over many sources.
pub const MAX_PENDING_PER_SIGNER: usize = 512;
/// Pending events of one lease: a settle by each party, an accept, a
/// cancel or decline, and a few re-signed ones. Bounds the bound kind,
/// whose signer is real but may sign settles with any number of times.
pub const MAX_PENDING_PER_LEASE: usize = 8;
/// How long an orphan may wait after it arrived (see the module docs).
pub const PENDING_WINDOW_SECS: u64 = 15 * 60;

/// Where an event came from, for the pending shares.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// This node itself (its provider role, tests, migration): no share.
    Local,
    /// A libp2p peer (gossip propagation source, reconciliation peer), by
    /// its base58 peer id.
    Peer(String),
    /// An HTTP API client, by IP.
    Client(IpAddr),
    /// Held from before sources were recorded.
    Unknown,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Local => f.write_str("this node"),
            Source::Peer(p) => write!(f, "peer {p}"),
            Source::Client(ip) => write!(f, "client {ip}"),
            Source::Unknown => f.write_str("an unrecorded source"),
        }
    }
}

impl Source {
    /// This source's share of the pending store.
    pub fn share(&self) -> usize {
        match self {
            Source::Peer(_) => MAX_PENDING_PER_PEER,
            Source::Client(_) => MAX_PENDING_PER_CLIENT,
            Source::Local | Source::Unknown => MAX_PENDING,
        }
    }

    fn encode(&self, b: &mut Vec<u8>) {
        let (tag, body): (u8, Vec<u8>) = match self {
            Source::Local => (0, Vec::new()),
            Source::Peer(p) => (1, p.as_bytes().to_vec()),
            Source::Client(IpAddr::V4(ip)) => (2, ip.octets().to_vec()),
            Source::Client(IpAddr::V6(ip)) => (3, ip.octets().to_vec()),
            Source::Unknown => (4, Vec::new()),
        };
        b.push(tag);
        // A peer id's base58 form is ~52 bytes; longer is never made.
        let len = u8::try_from(body.len()).unwrap_or(u8::MAX);
        b.push(len);
        b.extend_from_slice(&body[..usize::from(len)]);
    }

    fn decode(v: &[u8]) -> Result<(Source, &[u8]), String> {
        let (&tag, rest) = v.split_first().ok_or("no source")?;
        let (&len, rest) = rest.split_first().ok_or("no source length")?;
        let body = rest.get(..usize::from(len)).ok_or("truncated source")?;
        let s = match (tag, body.len()) {
            (0, 0) => Source::Local,
            (1, _) => Source::Peer(String::from_utf8(body.to_vec()).map_err(|e| e.to_string())?),
            (2, 4) => Source::Client(IpAddr::from(<[u8; 4]>::try_from(body).expect("4"))),
            (3, 16) => Source::Client(IpAddr::from(<[u8; 16]>::try_from(body).expect("16"))),
            (4, 0) => Source::Unknown,
            (t, n) => return Err(format!("bad source tag {t} ({n} bytes)")),
        };
        Ok((s, &rest[usize::from(len)..]))
    }
}

/// A counter the shares are kept in (in memory, rebuilt at open).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Quota {
    Source(Source),
    Signer(AccountPubKey),
}

/// Why a pending event was not kept. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PendingRefused {
    /// The source holds its share.
    #[error(
        "{from} already has {held} events waiting for leases this node has not seen (its share is {max}); refusing more from it until those leases arrive or the events expire ({PENDING_WINDOW_SECS} s after arrival). Submit events to a node that has the lease"
    )]
    SourceShare {
        /// Who sent it.
        from: Source,
        /// Pending events it holds.
        held: usize,
        /// Its share.
        max: usize,
    },
    /// The signing key holds its share.
    #[error(
        "key {signer} already signed {held} events waiting here for leases this node has not seen (at most {max}); refusing more until those leases arrive"
    )]
    SignerShare {
        /// The event's signer.
        signer: AccountPubKey,
        /// Pending events it signed.
        held: usize,
        /// Its share.
        max: usize,
    },
    /// The lease already has its most pending events.
    #[error(
        "lease {lease} already has {MAX_PENDING_PER_LEASE} events waiting for its create or accept; refusing more for it"
    )]
    LeaseFull {
        /// The lease.
        lease: LeaseHash,
    },
    /// The pending store is full.
    #[error(
        "too many pending events on this node ({held}, at most {MAX_PENDING}); refusing more until their leases arrive; retry later or submit to a node that has the lease"
    )]
    Full {
        /// Pending events held.
        held: usize,
    },
}

/// One stored pending event: the event with when it arrived and from whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingEntry {
    /// Arrival, unix seconds; `None` for an entry from before 18.2 (it is
    /// given a window from when the store was opened).
    pub arrived: Option<u64>,
    pub source: Source,
    pub event: LeaseEvent,
}

/// Marks the entry form with arrival and source. An old entry is the event
/// alone, whose first byte is its kind (1–5) or `{` (JSON).
const ENTRY_V2: u8 = 0xE2;

impl PendingEntry {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![ENTRY_V2];
        b.extend_from_slice(&self.arrived.unwrap_or(0).to_be_bytes());
        self.source.encode(&mut b);
        b.extend_from_slice(&encode_event(&self.event));
        b
    }

    pub fn decode(v: &[u8]) -> Result<PendingEntry, String> {
        if v.first() != Some(&ENTRY_V2) {
            return Ok(PendingEntry {
                arrived: None,
                source: Source::Unknown,
                event: decode_event(v)?,
            });
        }
        let ts = v.get(1..9).ok_or("truncated pending entry")?;
        let arrived = u64::from_be_bytes(<[u8; 8]>::try_from(ts).expect("8 bytes"));
        let (source, rest) = Source::decode(&v[9..])?;
        Ok(PendingEntry {
            arrived: Some(arrived),
            source,
            event: decode_event(rest)?,
        })
    }

    /// Whether a sweep at `now` drops it. `bound`: its lease is here (the
    /// signer was checked); `opened`: when the store was opened (the
    /// arrival of an old entry); `retention`: the store's window.
    pub fn expired(&self, bound: bool, now: u64, opened: u64, retention: u64) -> bool {
        let own = self.event.timestamp().saturating_add(retention) < now;
        let waited = self
            .arrived
            .unwrap_or(opened)
            .saturating_add(PENDING_WINDOW_SECS)
            < now;
        own || (!bound && waited)
    }
}

/// The pending events held, as the page being written would leave them:
/// what [`admit`] weighs a new one against. The page implements it; it is
/// a trait because the page's counters are kept by [`Quota`], so the page
/// sits above this module and cannot be named here.
pub(crate) trait Held {
    /// Pending events of `lease`; `None` if they could not be read.
    fn of_lease(&self, lease: &LeaseHash) -> Option<usize>;
    /// Pending events charged to `q`.
    fn charged(&self, q: &Quota) -> usize;
    /// Pending events in all.
    fn total(&self) -> usize;
}

/// Whether one more pending event for `lease` from `source` fits its
/// shares (checked in this order: lease, signer, source, node). Callers
/// hold the apply lock; `page` sees the page's own earlier writes.
pub(crate) fn admit(
    page: &impl Held,
    lease: &LeaseHash,
    ev: &LeaseEvent,
    source: &Source,
) -> Result<(), PendingRefused> {
    // Unreadable counts as full: refusing is safe, admitting unbounded is not.
    let here = page.of_lease(lease).unwrap_or(usize::MAX);
    if here >= MAX_PENDING_PER_LEASE {
        return Err(PendingRefused::LeaseFull { lease: *lease });
    }
    let local = matches!(source, Source::Local);
    let signer = ev.signer();
    let signed = page.charged(&Quota::Signer(signer));
    if !local && signed >= MAX_PENDING_PER_SIGNER {
        return Err(PendingRefused::SignerShare {
            signer,
            held: signed,
            max: MAX_PENDING_PER_SIGNER,
        });
    }
    let held = page.charged(&Quota::Source(source.clone()));
    if held >= source.share() {
        return Err(PendingRefused::SourceShare {
            from: source.clone(),
            held,
            max: source.share(),
        });
    }
    let total = page.total();
    let reserve = if held < LIGHT_SOURCE {
        LIGHT_RESERVE
    } else {
        0
    };
    if total >= MAX_PENDING + reserve {
        return Err(PendingRefused::Full { held: total });
    }
    Ok(())
}

/// The two shares a pending event is charged to.
pub(crate) fn charges(source: &Source, ev: &LeaseEvent) -> [Quota; 2] {
    [Quota::Source(source.clone()), Quota::Signer(ev.signer())]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wallet::Wallet;

    #[test]
    fn entries_round_trip_and_old_ones_still_read() {
        let w = Wallet::from_seed([4; 32]);
        let ev = LeaseEvent::settle(&w, LeaseHash([7; 32]), 1_700_000_000);
        for source in [
            Source::Local,
            Source::Peer("12D3KooWexample".into()),
            Source::Client("198.18.0.7".parse().expect("ip")),
            Source::Client("::1".parse().expect("ip")),
            Source::Unknown,
        ] {
            let e = PendingEntry {
                arrived: Some(1_800_000_000),
                source,
                event: ev.clone(),
            };
            let b = e.encode();
            assert_eq!(PendingEntry::decode(&b), Ok(e));
            assert!(PendingEntry::decode(&b[..b.len() - 1]).is_err());
        }
        // The form written before 18.2: the event alone.
        let old = PendingEntry::decode(&encode_event(&ev)).expect("old entry");
        assert_eq!((old.arrived, old.source), (None, Source::Unknown));
    }

    #[test]
    fn orphans_expire_on_arrival_bound_events_on_their_own_time() {
        let w = Wallet::from_seed([4; 32]);
        // Signed "in the future" to dodge an expiry on its own time.
        let ev = LeaseEvent::settle(&w, LeaseHash([7; 32]), 4_000_000_000);
        let e = PendingEntry {
            arrived: Some(1_000),
            source: Source::Unknown,
            event: ev,
        };
        let day = 86_400;
        assert!(!e.expired(false, 1_000 + PENDING_WINDOW_SECS, 0, day));
        assert!(e.expired(false, 1_001 + PENDING_WINDOW_SECS, 0, day));
        assert!(!e.expired(true, 1_001 + PENDING_WINDOW_SECS, 0, day));
        let old = PendingEntry { arrived: None, ..e };
        assert!(!old.expired(false, 1_001 + PENDING_WINDOW_SECS, 5_000, day));
    }
}
