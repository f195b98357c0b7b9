//! Per-source limits shared by the node's doors (the HTTP API, the SSH
//! gateway): who a source is, how many connections it may hold, how fast
//! it may come back. One home, so the two doors count a client the same way.

mod rate;

// The slot table lives in xe-net: the provider's tunnel handshakes count
// the same way.
pub use rate::{MAX_TRACKED_CLIENTS, RateLimit, RateLimiter};
pub use xe_net::Source;
pub use xe_net::slots::{ConnLimits, ConnRefusal, ConnSlot, ConnTable};
