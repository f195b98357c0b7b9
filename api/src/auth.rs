//! The `X-Signature` scheme of `POST /tunnel/{leaseHash}/tcp`.
//!
//! Two forms, both ed25519 signatures by the lease's access key (the
//! wallet's lease key, whose public half is the lease's `access_pub_key`):
//!
//! | form | headers | signed message |
//! |---|---|---|
//! | timeless (the seed's) | `X-Signature` | the 32 raw lease-hash bytes |
//! | fresh | `X-Signature`, `X-Timestamp: <unix seconds>` | lease-hash bytes ‖ timestamp as 8 bytes big-endian |
//!
//! A captured timeless signature opens the tunnel for as long as the lease
//! lives. A fresh one is accepted only within [`TIMESTAMP_WINDOW`] of the
//! server's clock, and a server started with `--http-tunnel-require-fresh`
//! refuses the timeless form altogether. Within the window a captured fresh
//! signature can still be replayed: the window is the residual exposure.

use std::time::Duration;

use xe_store::{LeaseHash, LeaseKey, Sig};

/// Header carrying the hex signature.
pub const SIGNATURE_HEADER: &str = "x-signature";
/// Header carrying the unix-seconds timestamp of the fresh form.
pub const TIMESTAMP_HEADER: &str = "x-timestamp";
/// The `Upgrade` protocol token of the tunnel.
pub const UPGRADE_PROTOCOL: &str = "xe-tunnel";
/// How far a fresh timestamp may be from the server's clock, either way.
/// Wide enough for unsynchronised laptops, narrow enough that a captured
/// signature is soon useless.
pub const TIMESTAMP_WINDOW: Duration = Duration::from_secs(60);

/// The exact bytes an `X-Signature` covers: the raw lease hash, followed
/// by the timestamp (8 bytes big-endian) in the fresh form.
pub fn signing_message(lease: &LeaseHash, timestamp: Option<u64>) -> Vec<u8> {
    let mut m = Vec::with_capacity(40);
    m.extend_from_slice(lease.as_bytes());
    if let Some(ts) = timestamp {
        m.extend_from_slice(&ts.to_be_bytes());
    }
    m
}

/// Credentials for one tunnel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelAuth {
    /// The signature.
    pub signature: Sig,
    /// The timestamp it covers (fresh form), if any.
    pub timestamp: Option<u64>,
}

impl TunnelAuth {
    /// Sign the fresh form at unix time `now` with the lease key.
    pub fn fresh(key: &LeaseKey, lease: &LeaseHash, now: u64) -> Self {
        TunnelAuth {
            signature: key.sign(&signing_message(lease, Some(now))),
            timestamp: Some(now),
        }
    }

    /// Sign the seed's timeless form (valid as long as the lease).
    pub fn timeless(key: &LeaseKey, lease: &LeaseHash) -> Self {
        TunnelAuth {
            signature: key.sign(&signing_message(lease, None)),
            timestamp: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_layout() {
        let h = LeaseHash([7; 32]);
        assert_eq!(signing_message(&h, None), vec![7; 32]);
        let m = signing_message(&h, Some(0x0102_0304_0506_0708));
        assert_eq!(&m[..32], &[7; 32]);
        assert_eq!(&m[32..], &[1, 2, 3, 4, 5, 6, 7, 8]);
    }
}
