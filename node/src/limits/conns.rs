//! Who may hold the API's connections. One global cap alone let a single
//! address fill every slot with slow requests and lock everyone else out;
//! here each source also has its own share, and the last slots are kept
//! for sources that hold none, so a newcomer (a `/health` probe, a tunnel
//! from another consumer) gets in while others are saturated.

use std::collections::HashMap;
use std::net::IpAddr;

use std::sync::{Arc, Mutex};
pub use xe_net::Source;

/// The caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once, all sources together.
    pub global: usize,
    /// Connections one [`Source`] may hold.
    pub per_source: usize,
    /// Of `global`, the last this many go only to sources that hold no
    /// connection yet.
    pub reserve: usize,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnRefusal {
    /// The source holds its share.
    #[error(
        "{from} already holds {held} connections, the most one address may hold; close some (or reuse one) and try again"
    )]
    SourceFull {
        /// Who.
        from: Source,
        /// How many it holds.
        held: usize,
    },
    /// Every slot is taken, or only reserved ones are left and this
    /// source already holds some.
    #[error("the node's API is at its connection limit ({global}); try again shortly")]
    Full {
        /// The global cap.
        global: usize,
    },
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<Source, usize>,
}

/// The live table. Cloning shares it.
#[derive(Debug, Clone)]
pub struct ConnTable {
    limits: ConnLimits,
    counts: Arc<Mutex<Counts>>,
}

/// A held connection slot, released on drop.
#[derive(Debug)]
pub struct ConnSlot {
    source: Source,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total -= 1;
        if let Some(n) = c.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                c.by_source.remove(&self.source);
            }
        }
    }
}

impl ConnTable {
    /// A table enforcing `limits`.
    pub fn new(limits: ConnLimits) -> Self {
        ConnTable {
            limits,
            counts: Arc::new(Mutex::new(Counts::default())),
        }
    }

    /// A slot for a connection from `ip`, or why not.
    pub fn admit(&self, ip: IpAddr) -> Result<ConnSlot, ConnRefusal> {
        let source = Source::of(ip);
        let l = self.limits;
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let held = c.by_source.get(&source).copied().unwrap_or(0);
        if held >= l.per_source {
            return Err(ConnRefusal::SourceFull { from: source, held });
        }
        let open = l.global.saturating_sub(l.reserve);
        if c.total >= l.global || (c.total >= open && held > 0) {
            return Err(ConnRefusal::Full { global: l.global });
        }
        c.total += 1;
        *c.by_source.entry(source).or_insert(0) += 1;
        Ok(ConnSlot {
            source,
            counts: self.counts.clone(),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
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
        let t = ConnTable::new(ConnLimits {
            global: 8,
            per_source: 4,
            reserve: 2,
        });
        let a: Vec<_> = (0..4)
            .map(|_| t.admit(ip("198.18.0.1")).expect("a"))
            .collect();
        assert!(matches!(
            t.admit(ip("198.18.0.1")),
            Err(ConnRefusal::SourceFull { held: 4, .. })
        ));
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
            Err(ConnRefusal::Full { global: 8 })
        ));
        assert_eq!(t.open(), 8);
        drop((a, b, c, d));
        assert_eq!(t.open(), 0);
        assert!(t.admit(ip("198.18.0.1")).is_ok(), "slots come back");
    }
}
