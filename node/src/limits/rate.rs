//! Per-source token buckets for write requests (every method but GET and
//! HEAD); a source is what [`Source`] says (an IPv4 address,
//! an IPv6 /64). A client over its budget gets `429` with `Retry-After`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use xe_net::Source;

/// Most client addresses tracked at once. When the table is full, buckets
/// that have refilled completely are forgotten (they carry no state worth
/// keeping); if it is still full, new clients are refused until some
/// refill — failing closed, so a flood of source addresses cannot reset
/// everyone's budget.
pub const MAX_TRACKED_CLIENTS: usize = 10_000;

/// A token bucket's shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Requests a client may make back to back.
    pub burst: u32,
    /// Requests per second it regains, up to `burst`.
    pub per_second: f64,
}

impl Default for RateLimit {
    /// 20 back to back, then 5 per second: far above what `xe lease` and
    /// `xe tunnel` need, far below what would load the ledger.
    fn default() -> Self {
        RateLimit {
            burst: 20,
            per_second: 5.0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The table of buckets.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<Source, Bucket>>,
}

impl RateLimiter {
    /// A table of buckets of shape `limit`.
    pub fn new(limit: RateLimit) -> Self {
        RateLimiter {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + dt * self.limit.per_second).min(f64::from(self.limit.burst));
        b.last = now;
    }

    /// Take one token for `ip`, or say how long until one is available.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let ip = Source::of(ip);
        let now = Instant::now();
        let burst = f64::from(self.limit.burst);
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(&ip) && map.len() >= MAX_TRACKED_CLIENTS {
            map.retain(|_, b| {
                let mut c = *b;
                self.refill(&mut c, now);
                c.tokens < burst
            });
            if map.len() >= MAX_TRACKED_CLIENTS {
                return Err(self.wait_for_one(0.0));
            }
        }
        let b = map.entry(ip).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        self.refill(b, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.wait_for_one(b.tokens))
        }
    }

    fn wait_for_one(&self, tokens: f64) -> Duration {
        if self.limit.per_second <= 0.0 {
            // Never refills: tell the client to come back much later.
            return Duration::from_secs(3600);
        }
        Duration::from_secs_f64(((1.0 - tokens) / self.limit.per_second).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_refill() {
        let l = RateLimiter::new(RateLimit {
            burst: 2,
            per_second: 1.0,
        });
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(l.check(ip).is_ok());
        assert!(l.check(ip).is_ok());
        let wait = l.check(ip).unwrap_err();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another client has its own bucket.
        assert!(l.check(other).is_ok());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(l.check(ip).is_ok());
        assert!(l.check(ip).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn one_ipv6_64_is_one_client() {
        let l = RateLimiter::new(RateLimit {
            burst: 1,
            per_second: 1.0,
        });
        let a: IpAddr = "2001:db8:5:6::1".parse().unwrap();
        let b: IpAddr = "2001:db8:5:6:ffff::2".parse().unwrap();
        let other: IpAddr = "2001:db8:5:7::1".parse().unwrap();
        assert!(l.check(a).is_ok());
        assert!(
            l.check(b).is_err(),
            "a new address in the same /64 is no new budget"
        );
        assert!(l.check(other).is_ok());
    }
}
