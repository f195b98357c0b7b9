//! The state of one lease, derived from the facts (signed events) known
//! about it. Facts only accumulate, so state only moves forward, and the
//! tie-break rules below make the result independent of arrival order.

use serde::{Deserialize, Serialize};

use crate::ids::{AccountAddress, EventId, LeaseHash, Sig};
use crate::lease::{EventError, EventKind, Lease, LeaseEvent};

/// Slack allowed between a lease's creation time and its acceptance time,
/// for clocks that disagree between consumer and provider.
pub const CLOCK_SKEW_SECS: u64 = 300;

pub use crate::lease::OFFER_LIFETIME_SECS;

/// Where a lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    /// Signed by the consumer, waiting for the provider.
    Created,
    /// Provider runs the VM; access is granted until expiry.
    Accepted,
    /// Ended by consumer or provider.
    Settled,
    /// Withdrawn by the consumer before acceptance.
    Cancelled,
    /// Refused by the provider before acceptance (the reason is in the
    /// record's decline).
    Declined,
    /// Accepted, but `accepted_at + duration` has passed; or never
    /// accepted within [`OFFER_LIFETIME_SECS`] of its creation.
    Expired,
}

impl LeaseState {
    /// All states, for metrics and filters.
    pub const ALL: [LeaseState; 6] = [
        LeaseState::Created,
        LeaseState::Accepted,
        LeaseState::Settled,
        LeaseState::Cancelled,
        LeaseState::Declined,
        LeaseState::Expired,
    ];

    /// Lowercase name.
    pub fn as_str(&self) -> &'static str {
        match self {
            LeaseState::Created => "created",
            LeaseState::Accepted => "accepted",
            LeaseState::Settled => "settled",
            LeaseState::Cancelled => "cancelled",
            LeaseState::Declined => "declined",
            LeaseState::Expired => "expired",
        }
    }

    /// Whether the lease has ended for good.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            LeaseState::Settled
                | LeaseState::Cancelled
                | LeaseState::Declined
                | LeaseState::Expired
        )
    }
}

impl std::fmt::Display for LeaseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LeaseState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        LeaseState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown lease state {s:?} (expected created, accepted, settled, cancelled, declined or expired)"))
    }
}

/// Why a lease grants no access now: the one answer the gateway, the
/// provider's tunnel check and the HTTP tunnel all give.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Inactive {
    /// Created, not accepted by its provider (yet).
    #[error("created, not accepted by its provider yet")]
    NotAccepted,
    /// Ended by its consumer or provider.
    #[error("settled")]
    Settled,
    /// Withdrawn before acceptance.
    #[error("cancelled")]
    Cancelled,
    /// Refused by its provider.
    #[error("declined")]
    Declined,
    /// Its time ran out (or its offer lapsed).
    #[error("expired")]
    Expired,
}

/// The provider's acceptance, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptFact {
    /// Unix seconds.
    pub accepted_at: u64,
    /// VM SSH host key line.
    pub vm_host_key: String,
    /// The accept event's id (tie-break between competing accepts).
    pub event_id: EventId,
}

/// A settle or cancel, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndFact {
    /// Who signed it.
    pub by: AccountAddress,
    /// Unix seconds.
    pub at: u64,
    /// The event's id (tie-break).
    pub event_id: EventId,
}

impl EndFact {
    /// Its place among competing facts of its kind.
    fn key(&self) -> (u64, EventId) {
        (self.at, self.event_id)
    }
}

/// The provider's refusal, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclineFact {
    /// Unix seconds.
    pub at: u64,
    /// Why, as the provider put it.
    pub reason: String,
    /// The event's id (tie-break).
    pub event_id: EventId,
}

/// Everything known about one lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The lease hash.
    pub hash: LeaseHash,
    /// The terms.
    pub lease: Lease,
    /// Consumer's create signature.
    pub create_sig: Sig,
    /// Acceptance, if any.
    pub accept: Option<AcceptFact>,
    /// Settlement, if any.
    pub settle: Option<EndFact>,
    /// Cancellation, if any (only while not accepted).
    pub cancel: Option<EndFact>,
    /// The provider's refusal, if any (only while not accepted).
    #[serde(default)]
    pub decline: Option<DeclineFact>,
}

/// What applying an event to a record did.
#[derive(Debug)]
pub enum Outcome {
    /// The record changed.
    Changed(Box<LeaseRecord>),
    /// The event was already reflected; nothing to write.
    Unchanged,
    /// The event cannot apply yet (a settle before its accept); keep it.
    Wait(&'static str),
}

impl LeaseRecord {
    /// A record from a (self-checked) create event.
    pub fn from_create(lease: Lease, sig: Sig) -> Self {
        LeaseRecord {
            hash: lease.hash(),
            lease,
            create_sig: sig,
            accept: None,
            settle: None,
            cancel: None,
            decline: None,
        }
    }

    /// Unix second at which the lease expires, once accepted.
    pub fn expires_at(&self) -> Option<u64> {
        self.accept
            .as_ref()
            .map(|a| a.accepted_at.saturating_add(self.lease.duration))
    }

    /// The state at unix time `now`.
    pub fn state_at(&self, now: u64) -> LeaseState {
        if self.settle.is_some() {
            LeaseState::Settled
        } else if self.accept.is_some() {
            match self.expires_at() {
                Some(t) if now >= t => LeaseState::Expired,
                _ => LeaseState::Accepted,
            }
        } else if self.cancel.is_some() {
            LeaseState::Cancelled
        } else if self.decline.is_some() {
            LeaseState::Declined
        } else if now >= self.lease.offer_lapses_at() {
            LeaseState::Expired
        } else {
            LeaseState::Created
        }
    }

    /// Does the lease grant access at unix time `now`, and if not, why.
    /// Only an accepted, unexpired, unsettled lease does.
    pub fn access_at(&self, now: u64) -> Result<(), Inactive> {
        match self.state_at(now) {
            LeaseState::Accepted => Ok(()),
            LeaseState::Created => Err(Inactive::NotAccepted),
            LeaseState::Settled => Err(Inactive::Settled),
            LeaseState::Cancelled => Err(Inactive::Cancelled),
            LeaseState::Declined => Err(Inactive::Declined),
            LeaseState::Expired => Err(Inactive::Expired),
        }
    }

    /// [`LeaseRecord::access_at`] now.
    pub fn access(&self) -> Result<(), Inactive> {
        self.access_at(crate::now_secs())
    }

    /// The state now.
    pub fn state(&self) -> LeaseState {
        self.state_at(crate::now_secs())
    }

    /// Apply a self-checked event for this lease. Checks the signer's
    /// entitlement and the transition; never mutates `self`.
    ///
    /// Order tolerance: competing accepts (or settles, cancels, declines)
    /// keep the smallest `(timestamp, event id)`; an accept that races a
    /// cancel or a decline wins (the consumer then settles), so every node
    /// converges on one record.
    pub fn apply(&self, ev: &LeaseEvent) -> Result<Outcome, EventError> {
        let kind = ev.kind();
        let lease = self.hash;
        let signer = ev.signer().address();
        let provider = self.lease.provider;
        let consumer = self.lease.consumer_address();
        let id = ev.id();
        let signed_by = |ok: bool, allowed: &'static str| {
            ok.then_some(()).ok_or(EventError::WrongSigner {
                kind,
                lease,
                signer,
                allowed,
            })
        };
        let refuse = |reason: &'static str| EventError::BadTransition {
            kind,
            lease,
            reason,
        };
        let before_accept = || match self.accept {
            Some(_) => Err(refuse("the lease is already accepted; settle it instead")),
            None => Ok(()),
        };
        // Competing facts of one kind: the smallest (time, event id) is
        // the one every node keeps.
        let replaces = |have: Option<(u64, EventId)>, at: u64| have.is_none_or(|h| (at, id) < h);
        let mut next = self.clone();
        match ev {
            LeaseEvent::Create { .. } => return Ok(Outcome::Unchanged),
            LeaseEvent::Accept {
                accepted_at,
                vm_host_key,
                ..
            } => {
                signed_by(signer == provider, "the lease's provider")?;
                if accepted_at.saturating_add(CLOCK_SKEW_SECS) < self.lease.created_at {
                    return Err(refuse("accepted_at is before the lease was created"));
                }
                if *accepted_at > self.lease.offer_lapses_at() {
                    return Err(refuse(
                        "accepted_at is more than a day after the lease was created: the offer had lapsed",
                    ));
                }
                let have = self.accept.as_ref().map(|a| (a.accepted_at, a.event_id));
                if !replaces(have, *accepted_at) {
                    return Ok(Outcome::Unchanged);
                }
                next.accept = Some(AcceptFact {
                    accepted_at: *accepted_at,
                    vm_host_key: vm_host_key.clone(),
                    event_id: id,
                });
                // An accept that raced a cancel or a decline wins; they
                // are void.
                next.cancel = None;
                next.decline = None;
            }
            LeaseEvent::Settle { at, .. } => {
                signed_by(
                    signer == provider || signer == consumer,
                    "the lease's consumer or provider",
                )?;
                if self.accept.is_none() {
                    return Ok(Outcome::Wait("settle waits for the lease's accept"));
                }
                if !replaces(self.settle.as_ref().map(EndFact::key), *at) {
                    return Ok(Outcome::Unchanged);
                }
                next.settle = Some(EndFact {
                    by: signer,
                    at: *at,
                    event_id: id,
                });
            }
            LeaseEvent::Cancel { at, .. } => {
                signed_by(signer == consumer, "the lease's consumer")?;
                before_accept()?;
                if !replaces(self.cancel.as_ref().map(EndFact::key), *at) {
                    return Ok(Outcome::Unchanged);
                }
                next.cancel = Some(EndFact {
                    by: signer,
                    at: *at,
                    event_id: id,
                });
            }
            LeaseEvent::Decline { at, reason, .. } => {
                signed_by(signer == provider, "the lease's provider")?;
                before_accept()?;
                let have = self.decline.as_ref().map(|d| (d.at, d.event_id));
                if !replaces(have, *at) {
                    return Ok(Outcome::Unchanged);
                }
                next.decline = Some(DeclineFact {
                    at: *at,
                    reason: reason.clone(),
                    event_id: id,
                });
            }
        }
        debug_assert_ne!(kind, EventKind::Create);
        Ok(Outcome::Changed(Box::new(next)))
    }
}
