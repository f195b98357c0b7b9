//! Hex identifiers as newtypes: parsed once at the boundary, never passed
//! around as raw strings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a hex identifier did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HexError {
    /// The text had the wrong number of characters.
    #[error("{what}: expected {expected} hex characters, got {got}")]
    Length {
        /// Which identifier was being parsed.
        what: &'static str,
        /// Expected number of hex characters.
        expected: usize,
        /// Number of characters received.
        got: usize,
    },
    /// The text contained a character outside `0-9a-fA-F`.
    #[error("{what}: invalid character {ch:?} at position {pos} (expected 0-9, a-f)")]
    Char {
        /// Which identifier was being parsed.
        what: &'static str,
        /// The offending character.
        ch: char,
        /// Its index.
        pos: usize,
    },
}

/// Decode exactly `N` bytes of hex, naming `what` in any error.
pub fn parse_hex_array<const N: usize>(what: &'static str, s: &str) -> Result<[u8; N], HexError> {
    if let Some((pos, ch)) = s.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
        return Err(HexError::Char { what, ch, pos });
    }
    if s.len() != N * 2 {
        return Err(HexError::Length {
            what,
            expected: N * 2,
            got: s.chars().count(),
        });
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|_| HexError::Length {
        what,
        expected: N * 2,
        got: s.len(),
    })?;
    Ok(out)
}

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $len:expr, $what:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Human name used in error messages.
            pub const WHAT: &'static str = $what;

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }

            /// Lowercase hex.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// The first 8 hex characters, for logs.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }

            /// Build from a byte slice of the exact length.
            pub fn from_slice(b: &[u8]) -> Result<Self, HexError> {
                <[u8; $len]>::try_from(b)
                    .map(Self)
                    .map_err(|_| HexError::Length { what: $what, expected: $len * 2, got: b.len() * 2 })
            }
        }

        impl FromStr for $name {
            type Err = HexError;
            fn from_str(s: &str) -> Result<Self, HexError> {
                parse_hex_array::<$len>($what, s).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hex_id!(
    /// sha256 of a lease's canonical encoding; the SSH username at the gateway.
    LeaseHash, 32, "lease hash"
);
hex_id!(
    /// An account: hex(sha256("xe/account/v1" ‖ ed25519 public key)).
    AccountAddress, 32, "account address"
);
hex_id!(
    /// The raw 32-byte ed25519 key a consumer will present over SSH.
    AccessPubKey, 32, "access public key"
);
hex_id!(
    /// An account's raw ed25519 public key (the key that signs ledger events).
    AccountPubKey, 32, "account public key"
);
hex_id!(
    /// sha256 of a signed event's canonical encoding; dedupes gossip and sync.
    EventId, 32, "event id"
);
hex_id!(
    /// An ed25519 signature.
    Sig, 64, "signature"
);

impl AccountPubKey {
    /// The account address of this key.
    pub fn address(&self) -> AccountAddress {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"xe/account/v1");
        h.update(self.0);
        AccountAddress(h.finalize().into())
    }

    /// Verify `sig` over `msg` with this key.
    pub fn verify(&self, msg: &[u8], sig: &Sig) -> bool {
        let Ok(vk) = ed25519_dalek::VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        vk.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&sig.0))
            .is_ok()
    }
}

impl AccessPubKey {
    /// Whether these bytes are a valid ed25519 point (not just 32 bytes).
    pub fn is_valid_point(&self) -> bool {
        ed25519_dalek::VerifyingKey::from_bytes(&self.0).is_ok()
    }

    /// Verify `sig` over `msg` with this key.
    pub fn verify(&self, msg: &[u8], sig: &Sig) -> bool {
        AccountPubKey(self.0).verify(msg, sig)
    }

    /// The OpenSSH `authorized_keys` form: `ssh-ed25519 AAAA… comment`.
    pub fn to_openssh(&self, comment: &str) -> String {
        let key = russh::keys::ssh_key::public::Ed25519PublicKey(self.0);
        let pk = russh::keys::ssh_key::PublicKey::new(key.into(), comment);
        pk.to_openssh().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_rejects_bad_hex_with_position() {
        let mut s = "a".repeat(64);
        s.replace_range(10..11, "z");
        let e = s.parse::<LeaseHash>().unwrap_err();
        assert_eq!(
            e,
            HexError::Char {
                what: "lease hash",
                ch: 'z',
                pos: 10
            }
        );
        assert!(e.to_string().contains("position 10"));
    }

    #[test]
    fn parse_rejects_wrong_length() {
        let e = "ab".repeat(31).parse::<AccessPubKey>().unwrap_err();
        assert_eq!(
            e,
            HexError::Length {
                what: "access public key",
                expected: 64,
                got: 62
            }
        );
        assert!("ab".repeat(33).parse::<LeaseHash>().is_err());
    }

    #[test]
    fn roundtrip_lowercase() {
        let h: LeaseHash = "AB".repeat(32).parse().expect("uppercase accepted");
        assert_eq!(h.to_string(), "ab".repeat(32));
        let j = serde_json::to_string(&h).expect("ser");
        assert_eq!(serde_json::from_str::<LeaseHash>(&j).expect("de"), h);
    }
}
