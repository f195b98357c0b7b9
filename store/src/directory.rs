//! The account directory: signed, expiring entries that say which libp2p
//! peer (and addresses) an account runs on. Gateways use it to find a
//! lease's provider.
//!
//! Signed message, version 1 (integers big-endian, strings u16-length-prefixed):
//! `"xe/directory/v1" ‖ account_pk ‖ peer_id ‖ n_addrs u16 ‖ addrs… ‖ issued_at u64 ‖ expires_at u64`.

use serde::{Deserialize, Serialize};

use crate::ids::{AccountAddress, AccountPubKey, Sig};
use crate::wallet::Wallet;

/// Most addresses one entry may list.
pub const MAX_ADDRS: usize = 16;
/// Longest address or peer id text accepted.
pub const MAX_ADDR_LEN: usize = 512;
/// Longest validity an entry may claim; providers re-announce well before.
pub const MAX_TTL_SECS: u64 = 24 * 3600;

/// One account's location on the overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryEntry {
    /// The account key that signed this entry.
    pub account: AccountPubKey,
    /// libp2p PeerId, base58 text (parsed by the network layer).
    pub peer_id: String,
    /// Multiaddrs the peer can be reached at (may be relay circuits).
    pub addrs: Vec<String>,
    /// Unix seconds; newer entries replace older ones.
    pub issued_at: u64,
    /// Unix seconds after which the entry is ignored.
    pub expires_at: u64,
    /// Signature by `account`.
    pub sig: Sig,
}

/// Why a directory entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    /// Signature does not verify.
    #[error("directory entry for {0}: bad signature")]
    BadSignature(AccountAddress),
    /// Out-of-bounds fields.
    #[error("directory entry for {account}: {detail}")]
    Malformed {
        /// Account.
        account: AccountAddress,
        /// What was wrong.
        detail: String,
    },
    /// Already expired when received.
    #[error("directory entry for {0} has expired")]
    Expired(AccountAddress),
}

fn put_str(m: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(s.as_bytes());
}

impl DirectoryEntry {
    /// Build and sign an entry.
    pub fn sign(
        wallet: &Wallet,
        peer_id: String,
        addrs: Vec<String>,
        issued_at: u64,
        ttl: u64,
    ) -> Self {
        let mut e = DirectoryEntry {
            account: wallet.public_key(),
            peer_id,
            addrs,
            issued_at,
            expires_at: issued_at.saturating_add(ttl),
            sig: Sig([0; 64]),
        };
        e.sig = wallet.sign(&e.signing_message());
        e
    }

    /// Account address.
    pub fn address(&self) -> AccountAddress {
        self.account.address()
    }

    /// The exact signed bytes.
    pub fn signing_message(&self) -> Vec<u8> {
        let mut m = b"xe/directory/v1".to_vec();
        m.extend_from_slice(&self.account.0);
        put_str(&mut m, &self.peer_id);
        m.extend_from_slice(
            &u16::try_from(self.addrs.len())
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        for a in &self.addrs {
            put_str(&mut m, a);
        }
        m.extend_from_slice(&self.issued_at.to_be_bytes());
        m.extend_from_slice(&self.expires_at.to_be_bytes());
        m
    }

    /// Check bounds, signature and expiry against `now`.
    pub fn check(&self, now: u64) -> Result<(), DirectoryError> {
        let account = self.address();
        let bad = |detail: String| Err(DirectoryError::Malformed { account, detail });
        if self.peer_id.is_empty() || self.peer_id.len() > MAX_ADDR_LEN {
            return bad(format!("peer_id must be 1..={MAX_ADDR_LEN} bytes"));
        }
        if self.addrs.len() > MAX_ADDRS {
            return bad(format!("{} addrs, at most {MAX_ADDRS}", self.addrs.len()));
        }
        if let Some(a) = self.addrs.iter().find(|a| a.len() > MAX_ADDR_LEN) {
            return bad(format!(
                "address of {} bytes, at most {MAX_ADDR_LEN}",
                a.len()
            ));
        }
        if self.expires_at <= self.issued_at || self.expires_at - self.issued_at > MAX_TTL_SECS {
            return bad(format!("validity must be 1..={MAX_TTL_SECS} s"));
        }
        if !self.account.verify(&self.signing_message(), &self.sig) {
            return Err(DirectoryError::BadSignature(account));
        }
        if now >= self.expires_at {
            return Err(DirectoryError::Expired(account));
        }
        Ok(())
    }
}
