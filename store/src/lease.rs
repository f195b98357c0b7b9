//! Leases and their signed lifecycle events, with the canonical byte
//! encoding that hashes and signatures are computed over.
//!
//! # Encoding, version 1
//!
//! All integers are big-endian; byte strings are fixed length unless noted.
//! The lease hash is `sha256(lease_bytes)` where `lease_bytes` is
//!
//! ```text
//! "xe/lease/v1"                      11 bytes, domain tag and version
//! consumer account public key        32
//! provider account address           32
//! vcpus                              u32
//! memory_mb                          u32
//! disk_gb                            u32
//! duration_secs                      u64
//! access_pub_key (raw ed25519)       32
//! created_at (unix seconds)          u64
//! nonce                              16
//! ```
//!
//! Each event is signed over its own domain-tagged message:
//!
//! ```text
//! create: "xe/create/v1" ‖ lease_hash
//! accept: "xe/accept/v1" ‖ lease_hash ‖ signer_pk ‖ accepted_at u64 ‖ len u16 ‖ vm_host_key (OpenSSH text)
//! settle: "xe/settle/v1" ‖ lease_hash ‖ signer_pk ‖ at u64
//! cancel: "xe/cancel/v1" ‖ lease_hash ‖ signer_pk ‖ at u64
//! decline: "xe/decline/v1" ‖ lease_hash ‖ signer_pk ‖ at u64 ‖ len u16 ‖ reason (UTF-8)
//! ```
//!
//! and an event's id is `sha256(signing message ‖ signature)`. JSON is only
//! the transport form; nothing is ever hashed or verified over JSON.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::{AccessPubKey, AccountAddress, AccountPubKey, EventId, LeaseHash, Sig};
use crate::wallet::Wallet;

/// Bounds on the resources a lease may ask for. They exist so a malformed
/// or hostile event cannot make a provider try to allocate absurd VMs.
pub mod limits {
    /// vCPUs allowed in a lease.
    pub const VCPUS: std::ops::RangeInclusive<u32> = 1..=256;
    /// Memory in MiB allowed in a lease.
    pub const MEMORY_MB: std::ops::RangeInclusive<u32> = 128..=1 << 20;
    /// Disk in GiB allowed in a lease.
    pub const DISK_GB: std::ops::RangeInclusive<u32> = 1..=65_536;
    /// Lease duration in seconds: one minute to one year.
    pub const DURATION_SECS: std::ops::RangeInclusive<u64> = 60..=366 * 24 * 3600;
    /// Longest VM host key line an accept may carry.
    pub const VM_HOST_KEY_LEN: usize = 1024;
    /// Longest reason a decline may carry (bytes of UTF-8).
    pub const DECLINE_REASON_LEN: usize = 300;
}

/// The terms of a lease, as the consumer signs them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The consumer's account key (signs create, cancel, settle).
    pub consumer: AccountPubKey,
    /// The provider that is asked to host the VM.
    pub provider: AccountAddress,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// Disk in GiB.
    pub disk_gb: u32,
    /// Lease length in seconds, counted from acceptance.
    pub duration: u64,
    /// The ed25519 key that may log in over SSH.
    pub access_pub_key: AccessPubKey,
    /// Creation time, unix seconds.
    pub created_at: u64,
    /// Random, so two otherwise equal leases hash differently.
    #[serde(with = "hex16")]
    pub nonce: [u8; 16],
}

mod hex16 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        let s = String::deserialize(d)?;
        crate::ids::parse_hex_array::<16>("nonce", &s).map_err(serde::de::Error::custom)
    }
}

/// How long a created lease waits for its provider. An accept signed more
/// than this after the lease's creation is refused, and a lease nobody
/// accepted by then has lapsed (its state is `expired`). This bounds when
/// any lease can end (creation + this + duration), which is what lets
/// nodes forget a compacted lease entirely once that time is a retention
/// window past (see `retention`).
pub const OFFER_LIFETIME_SECS: u64 = 24 * 3600;

impl Lease {
    /// Unix second after which no accept is taken for this lease.
    pub fn offer_lapses_at(&self) -> u64 {
        self.created_at.saturating_add(OFFER_LIFETIME_SECS)
    }

    /// The latest this lease can end whatever events come: its offer
    /// lapses unaccepted, or the latest possible accept expires.
    pub fn latest_end(&self) -> u64 {
        self.offer_lapses_at().saturating_add(self.duration)
    }

    /// The canonical v1 byte encoding (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(11 + 32 + 32 + 12 + 8 + 32 + 8 + 16);
        b.extend_from_slice(b"xe/lease/v1");
        b.extend_from_slice(&self.consumer.0);
        b.extend_from_slice(&self.provider.0);
        b.extend_from_slice(&self.vcpus.to_be_bytes());
        b.extend_from_slice(&self.memory_mb.to_be_bytes());
        b.extend_from_slice(&self.disk_gb.to_be_bytes());
        b.extend_from_slice(&self.duration.to_be_bytes());
        b.extend_from_slice(&self.access_pub_key.0);
        b.extend_from_slice(&self.created_at.to_be_bytes());
        b.extend_from_slice(&self.nonce);
        b
    }

    /// sha256 of the canonical encoding.
    pub fn hash(&self) -> LeaseHash {
        LeaseHash(Sha256::digest(self.encode()).into())
    }

    /// The consumer's account address.
    pub fn consumer_address(&self) -> AccountAddress {
        self.consumer.address()
    }

    /// Check the terms are within [`limits`] and the keys are real keys.
    pub fn check_terms(&self) -> Result<(), EventError> {
        let bad = |field: &'static str, detail: String| Err(EventError::BadTerms { field, detail });
        if !limits::VCPUS.contains(&self.vcpus) {
            return bad(
                "vcpus",
                format!("{} not in {:?}", self.vcpus, limits::VCPUS),
            );
        }
        if !limits::MEMORY_MB.contains(&self.memory_mb) {
            return bad(
                "memory_mb",
                format!("{} not in {:?}", self.memory_mb, limits::MEMORY_MB),
            );
        }
        if !limits::DISK_GB.contains(&self.disk_gb) {
            return bad(
                "disk_gb",
                format!("{} not in {:?}", self.disk_gb, limits::DISK_GB),
            );
        }
        if !limits::DURATION_SECS.contains(&self.duration) {
            return bad(
                "duration",
                format!("{} s not in {:?}", self.duration, limits::DURATION_SECS),
            );
        }
        if !self.access_pub_key.is_valid_point() {
            return bad("access_pub_key", "not a valid ed25519 public key".into());
        }
        Ok(())
    }
}

/// What kind of lifecycle event this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// Consumer creates the lease.
    Create,
    /// Named provider accepts (VM is running).
    Accept,
    /// Consumer or provider ends the lease.
    Settle,
    /// Consumer withdraws before acceptance.
    Cancel,
    /// Named provider refuses the lease, with a reason, before accepting.
    Decline,
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EventKind::Create => "create",
            EventKind::Accept => "accept",
            EventKind::Settle => "settle",
            EventKind::Cancel => "cancel",
            EventKind::Decline => "decline",
        })
    }
}

/// A signed ledger event. The JSON form is tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LeaseEvent {
    /// The consumer's signed lease.
    Create {
        /// The terms.
        lease: Lease,
        /// Consumer's signature over `"xe/create/v1" ‖ lease_hash`.
        sig: Sig,
    },
    /// The provider's acceptance.
    Accept {
        /// Which lease.
        lease_hash: LeaseHash,
        /// Provider account key; its address must equal `lease.provider`.
        signer: AccountPubKey,
        /// Unix seconds; the lease expires at `accepted_at + duration`.
        accepted_at: u64,
        /// The VM's SSH host key (`ssh-ed25519 AAAA…`), so clients can pin it.
        vm_host_key: String,
        /// Signature.
        sig: Sig,
    },
    /// Ends the lease (consumer or provider).
    Settle {
        /// Which lease.
        lease_hash: LeaseHash,
        /// Consumer or provider key.
        signer: AccountPubKey,
        /// Unix seconds.
        at: u64,
        /// Signature.
        sig: Sig,
    },
    /// Withdraws the lease before acceptance (consumer only).
    Cancel {
        /// Which lease.
        lease_hash: LeaseHash,
        /// Consumer key.
        signer: AccountPubKey,
        /// Unix seconds.
        at: u64,
        /// Signature.
        sig: Sig,
    },
    /// The provider will not host the lease (provider only, before
    /// accepting): over capacity, a VM that failed to start. Everyone
    /// learns at once why, instead of waiting out the offer.
    Decline {
        /// Which lease.
        lease_hash: LeaseHash,
        /// Provider account key.
        signer: AccountPubKey,
        /// Unix seconds.
        at: u64,
        /// Why, for the consumer: one line, at most
        /// [`limits::DECLINE_REASON_LEN`] bytes.
        reason: String,
        /// Signature.
        sig: Sig,
    },
}

/// Why an event was refused. Each variant names the check that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The signature does not verify against the signer key.
    #[error(
        "bad signature on {kind} event for lease {lease}: it does not verify against the signer key"
    )]
    BadSignature {
        /// Event kind.
        kind: EventKind,
        /// Lease it names.
        lease: LeaseHash,
    },
    /// A lease term is out of range.
    #[error("bad lease terms: {field}: {detail}")]
    BadTerms {
        /// Field name.
        field: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The signer is not the party entitled to this event.
    #[error("{kind} for lease {lease} signed by {signer}, but only {allowed} may sign it")]
    WrongSigner {
        /// Event kind.
        kind: EventKind,
        /// Lease.
        lease: LeaseHash,
        /// Signer's address.
        signer: AccountAddress,
        /// Who may sign.
        allowed: &'static str,
    },
    /// The event is not allowed in the lease's current state.
    #[error("{kind} refused for lease {lease}: {reason}")]
    BadTransition {
        /// Event kind.
        kind: EventKind,
        /// Lease.
        lease: LeaseHash,
        /// Why.
        reason: &'static str,
    },
    /// The decline's reason is not one short printable line.
    #[error("decline for lease {lease}: reason {detail}")]
    BadReason {
        /// Lease.
        lease: LeaseHash,
        /// What was wrong.
        detail: String,
    },
    /// The accept's host key is malformed.
    #[error("accept for lease {lease}: vm_host_key {detail}")]
    BadHostKey {
        /// Lease.
        lease: LeaseHash,
        /// What was wrong.
        detail: String,
    },
}

fn tagged(tag: &[u8], lease: &LeaseHash, signer: &AccountPubKey, at: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(tag.len() + 72);
    m.extend_from_slice(tag);
    m.extend_from_slice(&lease.0);
    m.extend_from_slice(&signer.0);
    m.extend_from_slice(&at.to_be_bytes());
    m
}

impl LeaseEvent {
    /// Kind of event.
    pub fn kind(&self) -> EventKind {
        match self {
            LeaseEvent::Create { .. } => EventKind::Create,
            LeaseEvent::Accept { .. } => EventKind::Accept,
            LeaseEvent::Settle { .. } => EventKind::Settle,
            LeaseEvent::Cancel { .. } => EventKind::Cancel,
            LeaseEvent::Decline { .. } => EventKind::Decline,
        }
    }

    /// The lease this event is about.
    pub fn lease_hash(&self) -> LeaseHash {
        match self {
            LeaseEvent::Create { lease, .. } => lease.hash(),
            LeaseEvent::Accept { lease_hash, .. }
            | LeaseEvent::Settle { lease_hash, .. }
            | LeaseEvent::Cancel { lease_hash, .. }
            | LeaseEvent::Decline { lease_hash, .. } => *lease_hash,
        }
    }

    /// The key that signed this event.
    pub fn signer(&self) -> AccountPubKey {
        match self {
            LeaseEvent::Create { lease, .. } => lease.consumer,
            LeaseEvent::Accept { signer, .. }
            | LeaseEvent::Settle { signer, .. }
            | LeaseEvent::Cancel { signer, .. }
            | LeaseEvent::Decline { signer, .. } => *signer,
        }
    }

    /// The event's own timestamp (creation, acceptance, settle or cancel).
    pub fn timestamp(&self) -> u64 {
        match self {
            LeaseEvent::Create { lease, .. } => lease.created_at,
            LeaseEvent::Accept { accepted_at, .. } => *accepted_at,
            LeaseEvent::Settle { at, .. }
            | LeaseEvent::Cancel { at, .. }
            | LeaseEvent::Decline { at, .. } => *at,
        }
    }

    fn sig(&self) -> &Sig {
        match self {
            LeaseEvent::Create { sig, .. }
            | LeaseEvent::Accept { sig, .. }
            | LeaseEvent::Settle { sig, .. }
            | LeaseEvent::Cancel { sig, .. }
            | LeaseEvent::Decline { sig, .. } => sig,
        }
    }

    /// The exact message the signature covers.
    pub fn signing_message(&self) -> Vec<u8> {
        match self {
            LeaseEvent::Create { lease, .. } => {
                let mut m = b"xe/create/v1".to_vec();
                m.extend_from_slice(&lease.hash().0);
                m
            }
            LeaseEvent::Accept {
                lease_hash,
                signer,
                accepted_at,
                vm_host_key,
                ..
            } => {
                let mut m = tagged(b"xe/accept/v1", lease_hash, signer, *accepted_at);
                let len = u16::try_from(vm_host_key.len()).unwrap_or(u16::MAX);
                m.extend_from_slice(&len.to_be_bytes());
                m.extend_from_slice(vm_host_key.as_bytes());
                m
            }
            LeaseEvent::Settle {
                lease_hash,
                signer,
                at,
                ..
            } => tagged(b"xe/settle/v1", lease_hash, signer, *at),
            LeaseEvent::Cancel {
                lease_hash,
                signer,
                at,
                ..
            } => tagged(b"xe/cancel/v1", lease_hash, signer, *at),
            LeaseEvent::Decline {
                lease_hash,
                signer,
                at,
                reason,
                ..
            } => {
                let mut m = tagged(b"xe/decline/v1", lease_hash, signer, *at);
                let len = u16::try_from(reason.len()).unwrap_or(u16::MAX);
                m.extend_from_slice(&len.to_be_bytes());
                m.extend_from_slice(reason.as_bytes());
                m
            }
        }
    }

    /// Content id: sha256 of signing message ‖ signature.
    pub fn id(&self) -> EventId {
        let mut h = Sha256::new();
        h.update(self.signing_message());
        h.update(self.sig().0);
        EventId(h.finalize().into())
    }

    /// The checks an event passes on its own, before its lease is known:
    /// the signature verifies, terms are in range, the host key parses.
    pub fn check_self(&self) -> Result<(), EventError> {
        if let LeaseEvent::Create { lease, .. } = self {
            lease.check_terms()?;
        }
        if let LeaseEvent::Accept {
            lease_hash,
            vm_host_key,
            ..
        } = self
        {
            check_host_key(lease_hash, vm_host_key)?;
        }
        if let LeaseEvent::Decline {
            lease_hash, reason, ..
        } = self
        {
            check_reason(lease_hash, reason)?;
        }
        if !self.signer().verify(&self.signing_message(), self.sig()) {
            return Err(EventError::BadSignature {
                kind: self.kind(),
                lease: self.lease_hash(),
            });
        }
        Ok(())
    }

    /// Sign a new lease with the consumer's wallet.
    pub fn create(wallet: &Wallet, lease: Lease) -> Self {
        let mut ev = LeaseEvent::Create {
            lease,
            sig: Sig([0; 64]),
        };
        let sig = wallet.sign(&ev.signing_message());
        if let LeaseEvent::Create { sig: s, .. } = &mut ev {
            *s = sig;
        }
        ev
    }

    /// Sign an accept with the provider's wallet.
    pub fn accept(
        wallet: &Wallet,
        lease_hash: LeaseHash,
        accepted_at: u64,
        vm_host_key: String,
    ) -> Self {
        let mut ev = LeaseEvent::Accept {
            lease_hash,
            signer: wallet.public_key(),
            accepted_at,
            vm_host_key,
            sig: Sig([0; 64]),
        };
        let s = wallet.sign(&ev.signing_message());
        if let LeaseEvent::Accept { sig, .. } = &mut ev {
            *sig = s;
        }
        ev
    }

    /// Sign a settle with the consumer's or provider's wallet.
    pub fn settle(wallet: &Wallet, lease_hash: LeaseHash, at: u64) -> Self {
        let mut ev = LeaseEvent::Settle {
            lease_hash,
            signer: wallet.public_key(),
            at,
            sig: Sig([0; 64]),
        };
        let s = wallet.sign(&ev.signing_message());
        if let LeaseEvent::Settle { sig, .. } = &mut ev {
            *sig = s;
        }
        ev
    }

    /// Sign a decline with the provider's wallet; `reason` is fitted with
    /// [`decline_reason`].
    pub fn decline(wallet: &Wallet, lease_hash: LeaseHash, at: u64, reason: &str) -> Self {
        let mut ev = LeaseEvent::Decline {
            lease_hash,
            signer: wallet.public_key(),
            at,
            reason: decline_reason(reason),
            sig: Sig([0; 64]),
        };
        let s = wallet.sign(&ev.signing_message());
        if let LeaseEvent::Decline { sig, .. } = &mut ev {
            *sig = s;
        }
        ev
    }

    /// Sign a cancel with the consumer's wallet.
    pub fn cancel(wallet: &Wallet, lease_hash: LeaseHash, at: u64) -> Self {
        let mut ev = LeaseEvent::Cancel {
            lease_hash,
            signer: wallet.public_key(),
            at,
            sig: Sig([0; 64]),
        };
        let s = wallet.sign(&ev.signing_message());
        if let LeaseEvent::Cancel { sig, .. } = &mut ev {
            *sig = s;
        }
        ev
    }
}

/// A decline's reason is shown to people: one line of printable text.
fn check_reason(lease: &LeaseHash, reason: &str) -> Result<(), EventError> {
    let bad = |detail: String| {
        Err(EventError::BadReason {
            lease: *lease,
            detail,
        })
    };
    if reason.trim().is_empty() {
        return bad("is empty; say why the lease is declined".into());
    }
    if reason.len() > limits::DECLINE_REASON_LEN {
        return bad(format!(
            "is {} bytes, at most {} allowed",
            reason.len(),
            limits::DECLINE_REASON_LEN
        ));
    }
    if reason.chars().any(char::is_control) {
        return bad("contains a control character (line break, escape, NUL)".into());
    }
    Ok(())
}

/// Fit `reason` into a decline: control characters become spaces and it
/// is cut (on a character boundary) to [`limits::DECLINE_REASON_LEN`].
pub fn decline_reason(reason: &str) -> String {
    let mut out: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > limits::DECLINE_REASON_LEN {
        let mut cut = limits::DECLINE_REASON_LEN - '…'.len_utf8();
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    if out.trim().is_empty() {
        "declined".to_string()
    } else {
        out
    }
}

/// A VM host key in an accept must be a single-line OpenSSH public key.
fn check_host_key(lease: &LeaseHash, key: &str) -> Result<(), EventError> {
    let bad = |detail: String| {
        Err(EventError::BadHostKey {
            lease: *lease,
            detail,
        })
    };
    if key.len() > limits::VM_HOST_KEY_LEN {
        return bad(format!(
            "is {} bytes, at most {} allowed",
            key.len(),
            limits::VM_HOST_KEY_LEN
        ));
    }
    if key.contains(['\n', '\r', '\0']) {
        return bad("contains a line break or NUL".into());
    }
    if russh::keys::ssh_key::PublicKey::from_openssh(key).is_err() {
        return bad("is not an OpenSSH public key line (expected `ssh-ed25519 AAAA…`)".into());
    }
    Ok(())
}
