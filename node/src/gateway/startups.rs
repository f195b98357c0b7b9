//! Connections that have not authenticated yet ("startups", as OpenSSH
//! calls them) are counted apart from sessions. One cap for both let 100
//! silent sockets from one address hold every slot for the whole auth
//! grace, locking every real login out. Here:
//!
//! - each source (an IPv4 address, an IPv6 /64) may hold
//!   [`GatewayConfig::startups_per_source`] unauthenticated connections;
//! - beyond `start` unauthenticated connections in all, new ones are
//!   refused at random with a probability rising from `rate` % to 100 % at
//!   `full` (OpenSSH's `MaxStartups start:rate:full`), and those admitted
//!   get the shorter [`GatewayConfig::pressure_grace`];
//! - each source's key exchanges are paced by a token bucket
//!   ([`GatewayConfig::connect_rate`]): a burst of connections from one
//!   address waits its turn instead of costing the gateway a key exchange
//!   each at once (ssh-audit's DHEat);
//! - sessions (authenticated connections) are capped separately by
//!   [`GatewayConfig::max_connections`], and are never touched by any of
//!   this.

use std::net::IpAddr;
use std::time::Duration;

use crate::limits::{ConnLimits, ConnRefusal, ConnSlot, ConnTable, RateLimiter};

use super::stats::ConnectionRefusal;
use super::{GatewayConfig, Startups};

/// The pre-authentication side of the gateway's limits.
pub(crate) struct StartupGate {
    table: ConnTable,
    pace: RateLimiter,
    startups: Startups,
    grace: Duration,
    pressure_grace: Duration,
}

/// An admitted connection: its place among the unauthenticated ones (given
/// up when it authenticates) and the time it has to do so.
pub(crate) struct Startup {
    pub(crate) slot: ConnSlot,
    pub(crate) grace: Duration,
}

impl StartupGate {
    pub(crate) fn new(c: &GatewayConfig) -> Self {
        StartupGate {
            table: ConnTable::new(
                ConnLimits {
                    global: c.startups.full,
                    per_source: c.startups_per_source,
                    reserve: 0,
                },
                "unauthenticated connections",
            ),
            pace: RateLimiter::new(c.connect_rate),
            startups: c.startups,
            grace: c.auth_grace,
            pressure_grace: c.pressure_grace.min(c.auth_grace),
        }
    }

    /// Admit a new connection from `ip`, or say why not. `roll` is a
    /// uniform random number in [0, 1) (a parameter so tests decide).
    pub(crate) fn admit(&self, ip: IpAddr, roll: f64) -> Result<Startup, ConnectionRefusal> {
        let open = self.table.open();
        if roll < drop_probability(self.startups, open) {
            return Err(ConnectionRefusal::Startups);
        }
        let slot = self.table.admit(ip).map_err(|e| match e {
            ConnRefusal::SourceFull { .. } => ConnectionRefusal::SourceStartups,
            ConnRefusal::Full { .. } => ConnectionRefusal::Startups,
        })?;
        let grace = if open >= self.startups.start {
            self.pressure_grace
        } else {
            self.grace
        };
        Ok(Startup { slot, grace })
    }

    /// How long `ip` must wait before its key exchange starts (zero if it
    /// has a token now; the token is then spent).
    pub(crate) fn pace(&self, ip: IpAddr) -> Duration {
        self.pace.check(ip).err().unwrap_or(Duration::ZERO)
    }

    /// Unauthenticated connections open now.
    pub(crate) fn open(&self) -> usize {
        self.table.open()
    }
}

/// OpenSSH's rule: no drops below `start`; from `start`, `rate` % rising
/// linearly to 100 % at `full`.
fn drop_probability(s: Startups, open: usize) -> f64 {
    if open < s.start {
        return 0.0;
    }
    if open >= s.full {
        return 1.0;
    }
    let rate = f64::from(s.rate_percent) / 100.0;
    let span = (s.full - s.start) as f64;
    rate + (1.0 - rate) * (open - s.start) as f64 / span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_follow_maxstartups() {
        let s = Startups {
            start: 10,
            rate_percent: 30,
            full: 100,
        };
        assert_eq!(drop_probability(s, 9), 0.0);
        assert!((drop_probability(s, 10) - 0.30).abs() < 1e-9);
        assert!((drop_probability(s, 55) - 0.65).abs() < 1e-9);
        assert_eq!(drop_probability(s, 100), 1.0);
    }

    #[test]
    fn a_source_gets_its_share_and_pressure_shortens_the_grace() {
        let mut c = GatewayConfig::new(std::path::Path::new("/nonexistent"));
        c.startups = Startups {
            start: 2,
            rate_percent: 30,
            full: 6,
        };
        c.startups_per_source = 3;
        c.pressure_grace = Duration::from_secs(5);
        let g = StartupGate::new(&c);
        let a: IpAddr = "198.18.0.1".parse().expect("ip");
        let b: IpAddr = "198.18.0.2".parse().expect("ip");
        // A roll of 0.99 passes every drop below `full`.
        let first = g.admit(a, 0.99).expect("first");
        assert_eq!(first.grace, c.auth_grace);
        let _second = g.admit(a, 0.99).expect("second");
        let third = g.admit(a, 0.99).expect("third, under pressure");
        assert_eq!(third.grace, Duration::from_secs(5));
        assert_eq!(
            g.admit(a, 0.99).err(),
            Some(ConnectionRefusal::SourceStartups)
        );
        // Another source is still let in, unless the roll says drop.
        let _b = g.admit(b, 0.99).expect("another source");
        assert_eq!(g.admit(b, 0.0).err(), Some(ConnectionRefusal::Startups));
        drop(first);
        assert_eq!(g.open(), 3);
    }
}
