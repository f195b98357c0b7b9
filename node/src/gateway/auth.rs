//! Who may log in: exactly the seed's rule. The username is the 64-hex
//! lease hash; the lease must exist, be accepted (not settled, cancelled or
//! expired) and carry an access key; the presented key must be a plain
//! `ssh-ed25519` key whose 32 raw bytes are that access key.

use russh::keys::ssh_key::PublicKey;
use xe_store::{Inactive, LeaseHash, LeaseRecord, Store};

use super::stats::AuthFailure;

/// Parse the username as a lease hash (hex, either case).
pub(crate) fn parse_username(user: &str) -> Result<LeaseHash, AuthFailure> {
    user.parse::<LeaseHash>()
        .map_err(|_| AuthFailure::MalformedUsername)
}

/// The raw ed25519 bytes of a presented key, or why it is unusable.
pub(crate) fn ed25519_bytes(key: &PublicKey) -> Result<[u8; 32], AuthFailure> {
    key.key_data()
        .ed25519()
        .map(|k| k.0)
        .ok_or(AuthFailure::WrongKeyType)
}

/// The refusal a lease that grants no access gets.
pub(crate) fn failure_of(why: Inactive) -> AuthFailure {
    match why {
        Inactive::NotAccepted => AuthFailure::LeaseNotAccepted,
        Inactive::Settled => AuthFailure::LeaseSettled,
        Inactive::Cancelled => AuthFailure::LeaseCancelled,
        Inactive::Declined => AuthFailure::LeaseDeclined,
        Inactive::Expired => AuthFailure::LeaseExpired,
    }
}

/// The lease behind `hash`, if it grants access now.
pub(crate) fn active_lease(store: &Store, hash: &LeaseHash) -> Result<LeaseRecord, AuthFailure> {
    let rec = match store.lease(hash) {
        Ok(Some(rec)) => rec,
        Ok(None) => return Err(AuthFailure::UnknownLease),
        Err(e) => {
            tracing::error!(lease = %hash.short(), error = %e, "store read failed during SSH auth");
            return Err(AuthFailure::StoreError);
        }
    };
    rec.access().map_err(failure_of)?;
    if rec.lease.access_pub_key.0 == [0u8; 32] || !rec.lease.access_pub_key.is_valid_point() {
        return Err(AuthFailure::NoAccessKey);
    }
    Ok(rec)
}

/// The whole check: username, key type, lease state, key equality.
pub(crate) fn check(
    store: &Store,
    user: &str,
    key: &PublicKey,
) -> Result<LeaseRecord, AuthFailure> {
    let hash = parse_username(user)?;
    let raw = ed25519_bytes(key)?;
    let rec = active_lease(store, &hash)?;
    if rec.lease.access_pub_key.0 != raw {
        return Err(AuthFailure::WrongKey);
    }
    Ok(rec)
}

/// Client-chosen text (a username, a host) made safe for a log line:
/// escaped and cut short.
pub(crate) fn loggable(user: &str) -> String {
    const MAX: usize = 80;
    let mut s: String = user.escape_debug().take(MAX).collect();
    if user.escape_debug().nth(MAX).is_some() {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert_eq!(parse_username("root"), Err(AuthFailure::MalformedUsername));
        assert_eq!(
            parse_username(&"a".repeat(63)),
            Err(AuthFailure::MalformedUsername)
        );
        assert_eq!(
            parse_username(&"g".repeat(64)),
            Err(AuthFailure::MalformedUsername)
        );
        assert!(parse_username(&"aB".repeat(32)).is_ok());
        assert_eq!(loggable("a\nb"), "a\\nb");
        assert!(loggable(&"x".repeat(500)).ends_with('…'));
    }
}
