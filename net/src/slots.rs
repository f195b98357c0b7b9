//! Slots shared fairly: a global cap alone lets one client fill every slot
//! and lock everyone else out, so each key (a source address, a peer) also
//! has its own share, and the last slots are kept for keys that hold none,
//! so a newcomer gets in while others are saturated. The HTTP API's
//! connections and tunnels, the SSH gateway's unauthenticated connections
//! and the provider's tunnel handshakes all count this way.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::Source;

/// What a table is keyed by, for its refusals ("the most one address may
/// hold").
pub trait SlotKey: Hash + Eq + Copy + fmt::Display + fmt::Debug + Send + 'static {
    /// What one key is, in a sentence.
    const KIND: &'static str;
}

impl SlotKey for Source {
    const KIND: &'static str = "address";
}

impl SlotKey for libp2p::PeerId {
    const KIND: &'static str = "peer";
}

/// The caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Slots held at once, all keys together.
    pub global: usize,
    /// Slots one key may hold.
    pub per_source: usize,
    /// Of `global`, the last this many go only to keys that hold none yet.
    pub reserve: usize,
}

/// Why a slot was not given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotRefusal<K: SlotKey> {
    /// The key holds its share.
    #[error(
        "{from} already holds {held} {what}, the most one {kind} may hold; close some (or reuse one) and try again",
        kind = K::KIND
    )]
    SourceFull {
        /// Who.
        from: K,
        /// How many it holds.
        held: usize,
        /// What the slots are for ("connections").
        what: &'static str,
    },
    /// Every slot is taken, or only reserved ones are left and this key
    /// already holds some.
    #[error("the node is at its limit of {global} {what}; try again shortly")]
    Full {
        /// The global cap.
        global: usize,
        /// What the slots are for.
        what: &'static str,
    },
}

/// Why a connection was not admitted.
pub type ConnRefusal = SlotRefusal<Source>;

#[derive(Debug)]
struct Counts<K> {
    total: usize,
    by_key: HashMap<K, usize>,
}

/// The live table. Cloning shares it.
#[derive(Debug, Clone)]
pub struct SlotTable<K: SlotKey> {
    limits: ConnLimits,
    what: &'static str,
    counts: Arc<Mutex<Counts<K>>>,
}

/// Slots per source address.
pub type ConnTable = SlotTable<Source>;

/// A held slot, released on drop.
#[derive(Debug)]
pub struct Slot<K: SlotKey> {
    key: K,
    counts: Arc<Mutex<Counts<K>>>,
}

/// A held connection slot.
pub type ConnSlot = Slot<Source>;

impl<K: SlotKey> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total -= 1;
        if let Some(n) = c.by_key.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                c.by_key.remove(&self.key);
            }
        }
    }
}

impl<K: SlotKey> SlotTable<K> {
    /// A table of `what` ("connections", "tunnel handshakes") enforcing
    /// `limits`.
    pub fn new(limits: ConnLimits, what: &'static str) -> Self {
        SlotTable {
            limits,
            what,
            counts: Arc::new(Mutex::new(Counts {
                total: 0,
                by_key: HashMap::new(),
            })),
        }
    }

    /// A slot for `key`, or why not.
    pub fn admit_key(&self, key: K) -> Result<Slot<K>, SlotRefusal<K>> {
        let l = self.limits;
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let held = c.by_key.get(&key).copied().unwrap_or(0);
        if held >= l.per_source {
            return Err(SlotRefusal::SourceFull {
                from: key,
                held,
                what: self.what,
            });
        }
        let open = l.global.saturating_sub(l.reserve);
        if c.total >= l.global || (c.total >= open && held > 0) {
            return Err(SlotRefusal::Full {
                global: l.global,
                what: self.what,
            });
        }
        c.total += 1;
        *c.by_key.entry(key).or_insert(0) += 1;
        Ok(Slot {
            key,
            counts: self.counts.clone(),
        })
    }

    /// Slots held now.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl SlotTable<Source> {
    /// A slot for a connection from `ip` (its [`Source`]), or why not.
    pub fn admit(&self, ip: IpAddr) -> Result<ConnSlot, ConnRefusal> {
        self.admit_key(Source::of(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_source_gets_its_share_and_newcomers_the_reserve() {
        let t = ConnTable::new(
            ConnLimits {
                global: 8,
                per_source: 4,
                reserve: 2,
            },
            "connections",
        );
        let a: Vec<_> = (0..4)
            .map(|_| t.admit(ip("198.18.0.1")).expect("a"))
            .collect();
        let refused = t.admit(ip("198.18.0.1")).expect_err("a's share is 4");
        assert!(matches!(refused, ConnRefusal::SourceFull { held: 4, .. }));
        assert!(
            refused
                .to_string()
                .contains("already holds 4 connections, the most one address may hold"),
            "{refused}"
        );
        let b: Vec<_> = (0..2)
            .map(|_| t.admit(ip("198.18.0.2")).expect("b"))
            .collect();
        // 6 of 8 taken: the last 2 are for sources holding none.
        assert!(matches!(
            t.admit(ip("198.18.0.2")),
            Err(ConnRefusal::Full { .. })
        ));
        let c = t
            .admit(ip("198.18.0.3"))
            .expect("newcomer gets a reserved slot");
        let d = t.admit(ip("198.18.0.4")).expect("and another");
        assert!(matches!(
            t.admit(ip("198.18.0.5")),
            Err(ConnRefusal::Full { global: 8, .. })
        ));
        assert_eq!(t.open(), 8);
        drop((a, b, c, d));
        assert_eq!(t.open(), 0);
        assert!(t.admit(ip("198.18.0.1")).is_ok(), "slots come back");
    }
}
