//! The `X-Signature` scheme of `POST /tunnel/{leaseHash}/tcp`.
//!
//! Two forms, both ed25519 signatures by the lease's access key (the
//! wallet's lease key, whose public half is the lease's `access_pub_key`):
//!
//! | form | headers | signed message |
//! |---|---|---|
//! | timeless (the seed's) | `X-Signature` | the 32 raw lease-hash bytes |
//! | fresh | `X-Signature`, `X-Timestamp: <unix s>`, `X-Nonce: <32 hex>`, `X-Node: <peer id>` | `"xe/tunnel/v2"` ‖ lease-hash bytes ‖ timestamp u64 BE ‖ nonce 16 ‖ the node's peer id (its base58 text) |
//!
//! What each resists, once someone has captured the headers (a log, a
//! proxy, plain HTTP on a shared network):
//! - timeless: nothing. It opens tunnels to that lease at every node, for
//!   the lease's whole life. It stays for the seed's clients; a node
//!   started with `--http-tunnel-require-fresh` refuses it.
//! - fresh: it opens at most one tunnel, only at the node it names, only
//!   within [`TIMESTAMP_WINDOW`] of its timestamp. Each node remembers the
//!   nonces it has accepted for as long as their timestamps are in the
//!   window, so a replay — even of a request that was refused for another
//!   reason after the signature checked out — is refused. What remains: a
//!   party who captures a request *and* stops it from arriving can use it
//!   once, at that node, within the window. TLS to the node closes that.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use xe_store::{LeaseHash, LeaseKey, Sig};

/// Header carrying the hex signature.
pub const SIGNATURE_HEADER: &str = "x-signature";
/// Header carrying the unix-seconds timestamp of the fresh form.
pub const TIMESTAMP_HEADER: &str = "x-timestamp";
/// Header carrying the fresh form's 16-byte nonce, as 32 hex digits.
pub const NONCE_HEADER: &str = "x-nonce";
/// Header naming the node (its peer id) the fresh form was signed for.
pub const NODE_HEADER: &str = "x-node";
/// The `Upgrade` protocol token of the tunnel.
pub const UPGRADE_PROTOCOL: &str = "xe-tunnel";
/// How far a fresh timestamp may be from the server's clock, either way.
/// Wide enough for unsynchronised laptops, narrow enough that a captured
/// signature is soon useless.
pub const TIMESTAMP_WINDOW: Duration = Duration::from_secs(60);
/// Nonces remembered at once, all leases together (≈ 80 B each).
pub const MAX_SEEN_NONCES: usize = 100_000;
/// Nonces remembered at once for one lease: far above what one consumer's
/// `xe tunnel` opens in two minutes, and it keeps one leaseholder from
/// taking the whole table.
pub const MAX_SEEN_NONCES_PER_LEASE: usize = 1_000;

const DOMAIN: &[u8] = b"xe/tunnel/v2";

/// What binds a fresh signature to one request at one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freshness {
    /// Unix seconds it was signed.
    pub timestamp: u64,
    /// Random, so two requests in one second differ.
    pub nonce: [u8; 16],
    /// The peer id (base58 text) of the node it is for.
    pub node: String,
}

/// The exact bytes an `X-Signature` covers (see the module docs).
pub fn signing_message(lease: &LeaseHash, fresh: Option<&Freshness>) -> Vec<u8> {
    let Some(f) = fresh else {
        return lease.as_bytes().to_vec();
    };
    let mut m = Vec::with_capacity(DOMAIN.len() + 56 + f.node.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(lease.as_bytes());
    m.extend_from_slice(&f.timestamp.to_be_bytes());
    m.extend_from_slice(&f.nonce);
    m.extend_from_slice(f.node.as_bytes());
    m
}

/// Credentials for one tunnel request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelAuth {
    /// The signature.
    pub signature: Sig,
    /// What it is bound to (fresh form), if anything.
    pub fresh: Option<Freshness>,
}

impl TunnelAuth {
    /// Sign the fresh form for the node with peer id `node`, at unix time
    /// `now`, with a new random nonce.
    pub fn fresh(key: &LeaseKey, lease: &LeaseHash, node: &str, now: u64) -> Self {
        let fresh = Freshness {
            timestamp: now,
            nonce: rand::random(),
            node: node.to_string(),
        };
        TunnelAuth {
            signature: key.sign(&signing_message(lease, Some(&fresh))),
            fresh: Some(fresh),
        }
    }

    /// Sign the seed's timeless form (valid as long as the lease).
    pub fn timeless(key: &LeaseKey, lease: &LeaseHash) -> Self {
        TunnelAuth {
            signature: key.sign(&signing_message(lease, None)),
            fresh: None,
        }
    }
}

/// Why a fresh signature was not taken by [`SeenNonces::remember`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NonceRefusal {
    /// This node already accepted this nonce for this lease.
    #[error(
        "this X-Signature was already used at this node (nonce seen before): sign every tunnel request anew"
    )]
    Replayed,
    /// The lease's share of the table is full.
    #[error(
        "more than {MAX_SEEN_NONCES_PER_LEASE} tunnel requests for this lease within two minutes; wait and retry"
    )]
    LeaseBusy,
    /// The whole table is full.
    #[error(
        "this node is remembering {MAX_SEEN_NONCES} tunnel signatures already; retry in a minute"
    )]
    Full,
}

/// The nonces of accepted fresh signatures, each kept until its timestamp
/// has left the window (after which the signature is refused as old).
#[derive(Debug, Default)]
pub(crate) struct SeenNonces {
    inner: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    until: HashMap<(LeaseHash, [u8; 16]), u64>,
    per_lease: HashMap<LeaseHash, usize>,
}

impl Seen {
    fn forget_expired(&mut self, now: u64) {
        self.until.retain(|_, t| *t >= now);
        self.per_lease.clear();
        for (l, _) in self.until.keys() {
            *self.per_lease.entry(*l).or_insert(0) += 1;
        }
    }
}

impl SeenNonces {
    /// Remember `nonce` for `lease` (signed at `ts`, checked to be in the
    /// window), unless it was seen before or the table is full.
    pub(crate) fn remember(
        &self,
        lease: &LeaseHash,
        nonce: [u8; 16],
        ts: u64,
        now: u64,
    ) -> Result<(), NonceRefusal> {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let key = (*lease, nonce);
        if s.until.get(&key).is_some_and(|t| *t >= now) {
            return Err(NonceRefusal::Replayed);
        }
        let lease_full =
            |s: &Seen| s.per_lease.get(lease).copied().unwrap_or(0) >= MAX_SEEN_NONCES_PER_LEASE;
        // Expired entries are dropped only when they are in the way: a pass
        // is O(table), and the table is bounded.
        if s.until.len() >= MAX_SEEN_NONCES || lease_full(&s) {
            s.forget_expired(now);
        }
        if lease_full(&s) {
            return Err(NonceRefusal::LeaseBusy);
        }
        if s.until.len() >= MAX_SEEN_NONCES {
            return Err(NonceRefusal::Full);
        }
        s.until
            .insert(key, ts.saturating_add(TIMESTAMP_WINDOW.as_secs()));
        *s.per_lease.entry(*lease).or_insert(0) += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_layout() {
        let h = LeaseHash([7; 32]);
        assert_eq!(signing_message(&h, None), vec![7; 32]);
        let f = Freshness {
            timestamp: 0x0102_0304_0506_0708,
            nonce: [9; 16],
            node: "12D3KooW".into(),
        };
        let m = signing_message(&h, Some(&f));
        assert_eq!(&m[..12], b"xe/tunnel/v2");
        assert_eq!(&m[12..44], &[7; 32]);
        assert_eq!(&m[44..52], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&m[52..68], &[9; 16]);
        assert_eq!(&m[68..], b"12D3KooW");
    }

    #[test]
    fn a_nonce_is_taken_once_per_window_and_each_lease_has_a_share() {
        let seen = SeenNonces::default();
        let a = LeaseHash([1; 32]);
        let b = LeaseHash([2; 32]);
        assert_eq!(seen.remember(&a, [1; 16], 1_000, 1_000), Ok(()));
        assert_eq!(
            seen.remember(&a, [1; 16], 1_000, 1_030),
            Err(NonceRefusal::Replayed)
        );
        // The same nonce for another lease is another request.
        assert_eq!(seen.remember(&b, [1; 16], 1_000, 1_000), Ok(()));
        for i in 1..MAX_SEEN_NONCES_PER_LEASE {
            let mut n = [0u8; 16];
            n[..8].copy_from_slice(&(i as u64).to_be_bytes());
            assert_eq!(seen.remember(&a, n, 1_000, 1_000), Ok(()), "{i}");
        }
        assert_eq!(
            seen.remember(&a, [0xee; 16], 1_000, 1_000),
            Err(NonceRefusal::LeaseBusy)
        );
        assert_eq!(
            seen.remember(&b, [0xee; 16], 1_000, 1_000),
            Ok(()),
            "b unaffected"
        );
        // Once the window has passed, the lease's entries are forgotten
        // (and a replay of those is refused as old by the window check).
        let later = 1_000 + TIMESTAMP_WINDOW.as_secs() + 1;
        assert_eq!(seen.remember(&a, [0xee; 16], later, later), Ok(()));
    }
}
