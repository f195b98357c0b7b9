//! Per-source limits shared by the node's doors (the HTTP API, the SSH
//! gateway): who a source is, how many connections it may hold, how fast
//! it may come back. One home, so the two doors count a client the same way.

mod conns;
mod rate;

pub use conns::{ConnLimits, ConnRefusal, ConnSlot, ConnTable, Source};
pub use rate::{MAX_TRACKED_CLIENTS, RateLimit, RateLimiter};
