//! What the gateway tells a user it turns away, in one line each: why
//! authentication failed, and how to connect when a session needs an agent
//! the client did not forward.
//!
//! # How an authentication refusal reaches the terminal
//! OpenSSH shows neither `SSH_MSG_DEBUG` (only with `-v`) nor a banner
//! after the first `USERAUTH_REQUEST` (russh sends its banner at service
//! accept, before the username is known). It does print a disconnect's
//! description ("Received disconnect from …: <text>") at the default
//! LogLevel — but only if it reads the DISCONNECT before it gives up, and
//! it gives up the moment it processes a USERAUTH_FAILURE with nothing
//! left to try. So the DISCONNECT is queued (through the session's
//! [`Handle`]) *before* the handler returns, russh writes it right after
//! that FAILURE, and the FAILURE is one the client answers:
//! - lease-level reasons (bad username, unknown/unaccepted/ended lease)
//!   are known at the client's first `none` request, after which OpenSSH
//!   always goes on to offer a key;
//! - a wrong key is answered with `partial_success`, which makes OpenSSH
//!   reset its key list and offer its keys again. A key offered twice means
//!   the client has run through all of them: only then is the refusal sent,
//!   so a client whose right key comes second still gets in.
//!
//! What is said: the lease ledger is public (any node's API lists it), so
//! a lease's existence and state are no secret. Keys appear only as
//! fingerprints; client-chosen text is cut to `xe_store::human::MAX_ECHO` characters with
//! control characters removed.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use russh::Disconnect;
use russh::keys::HashAlg;
use russh::keys::ssh_key::PublicKey;
use russh::server::{Auth, Handle};
use xe_store::LeaseHash;
use xe_store::human::echo;

use super::stats::AuthFailure;

/// Most key fingerprints named in one refusal.
const MAX_FINGERPRINTS: usize = 3;

/// Bound on queueing the DISCONNECT. The session's queue is empty during
/// authentication (no channel exists yet), so this never waits in
/// practice; the bound keeps a handler from hanging if it ever did.
const QUEUE_LIMIT: Duration = Duration::from_millis(200);

/// The first 8 hex digits, as `xe` prints a lease.
fn short(hash: &LeaseHash) -> String {
    hash.short()
}

/// The one line for an authentication refusal. `lease` is the parsed
/// username (absent when it did not parse); `keys` the fingerprints of the
/// keys the client offered, for key refusals.
pub(crate) fn auth_text(
    reason: AuthFailure,
    user: &str,
    lease: Option<&LeaseHash>,
    keys: &[String],
) -> String {
    let l = lease.map(short).unwrap_or_default();
    let offered = {
        let mut v: Vec<&str> = keys
            .iter()
            .take(MAX_FINGERPRINTS)
            .map(String::as_str)
            .collect();
        if keys.len() > MAX_FINGERPRINTS {
            v.push("...");
        }
        v.join(", ")
    };
    let use_key = "use -i ~/.xe/wallet.lease_key of the wallet that created the lease (with -o IdentitiesOnly=yes)";
    let body = match reason {
        AuthFailure::MalformedUsername => format!(
            "the username must be the 64-hex lease hash (xe lease create prints it), got '{}'",
            echo(user)
        ),
        AuthFailure::UnknownLease => format!(
            "unknown lease {l}: it is not on this gateway's ledger (yet); if you just created it, \
             wait a few seconds for it to replicate and retry (xe lease show {l})"
        ),
        AuthFailure::LeaseNotAccepted => format!(
            "lease {l} is not accepted by its provider yet; retry once xe lease show {l} says accepted"
        ),
        AuthFailure::LeaseSettled => {
            format!("lease {l} is settled and grants no access any more; create a new lease")
        }
        AuthFailure::LeaseCancelled => {
            format!("lease {l} was cancelled and grants no access; create a new lease")
        }
        AuthFailure::LeaseDeclined => format!(
            "lease {l} was declined by its provider and grants no access (xe lease show {l} says why); create a new lease"
        ),
        AuthFailure::LeaseExpired => {
            format!("lease {l} has expired and grants no access; create a new lease")
        }
        AuthFailure::NoAccessKey => {
            format!("lease {l} carries no usable access key, so nobody can log in with it")
        }
        AuthFailure::WrongKeyType => format!(
            "lease {l} takes only its ssh-ed25519 access key; you offered {offered}; {use_key}"
        ),
        AuthFailure::WrongKey => {
            format!("the key you offered ({offered}) is not lease {l}'s access key; {use_key}")
        }
        AuthFailure::StoreError => {
            "the gateway could not read its lease ledger; retry in a moment".to_string()
        }
        AuthFailure::GatewayFull => format!(
            "lease {l} would be let in, but the gateway serves as many sessions as it allows; retry in a minute, or use another gateway"
        ),
    };
    format!("xe gateway: {body}")
}

/// Whether no other key could succeed where this one failed.
fn is_lease_level(reason: AuthFailure) -> bool {
    !matches!(reason, AuthFailure::WrongKey | AuthFailure::WrongKeyType)
}

/// What happened next after a rejected attempt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// First time this reason/key was seen: count it.
    Count,
    /// Seen before; only answer.
    Repeat,
}

/// One connection's refusals: which keys failed, whether the refusal was
/// already sent, and the session handle to send it through.
pub(crate) struct Refusals {
    /// Set by the connection task as soon as the session runs; the first
    /// authentication request comes several round trips later.
    handle: Arc<OnceLock<Handle>>,
    /// Fingerprints of rejected keys, in order offered.
    keys: Vec<String>,
    /// The most specific key reason so far (a wrong ed25519 key beats a
    /// key of the wrong type).
    key_reason: Option<AuthFailure>,
    /// Lease-level reasons already counted.
    counted: Vec<AuthFailure>,
    sent: bool,
    /// Distinct wrong keys tolerated before refusing anyway (partial
    /// rejections do not count towards russh's own attempt limit).
    max_keys: usize,
}

impl Refusals {
    pub(crate) fn new(handle: Arc<OnceLock<Handle>>, max_keys: usize) -> Self {
        Refusals {
            handle,
            keys: Vec::new(),
            key_reason: None,
            counted: Vec::new(),
            sent: false,
            max_keys: max_keys.max(1),
        }
    }

    /// A rejection at the `none` probe (only lease-level reasons exist
    /// there): send the reason now.
    pub(crate) async fn at_none(
        &mut self,
        reason: AuthFailure,
        user: &str,
        lease: Option<&LeaseHash>,
    ) -> (Verdict, Auth) {
        let verdict = self.count_lease_level(reason);
        self.send(auth_text(reason, user, lease, &[])).await;
        (verdict, reject(false))
    }

    /// A rejected key (offered or signed). Lease-level reasons are sent at
    /// once; key reasons once the client has offered every key it has.
    pub(crate) async fn at_key(
        &mut self,
        reason: AuthFailure,
        user: &str,
        lease: Option<&LeaseHash>,
        key: &PublicKey,
    ) -> (Verdict, Auth) {
        if is_lease_level(reason) {
            let verdict = self.count_lease_level(reason);
            self.send(auth_text(reason, user, lease, &[])).await;
            // Partial, so that the client sends one more request and reads
            // the DISCONNECT queued behind this FAILURE.
            return (verdict, reject(true));
        }
        let fp = format!(
            "{} {}",
            key.algorithm().as_str(),
            key.fingerprint(HashAlg::Sha256)
        );
        let verdict = if self.keys.contains(&fp) {
            Verdict::Repeat
        } else {
            self.keys.push(fp);
            Verdict::Count
        };
        if self.key_reason != Some(AuthFailure::WrongKey) {
            self.key_reason = Some(reason);
        }
        if verdict == Verdict::Repeat || self.keys.len() >= self.max_keys {
            let reason = self.key_reason.unwrap_or(reason);
            let text = auth_text(reason, user, lease, &self.keys);
            self.send(text).await;
        }
        (verdict, reject(true))
    }

    fn count_lease_level(&mut self, reason: AuthFailure) -> Verdict {
        if self.counted.contains(&reason) {
            Verdict::Repeat
        } else {
            self.counted.push(reason);
            Verdict::Count
        }
    }

    /// Queue the DISCONNECT; russh writes it after the FAILURE the handler
    /// is about to return, and closes the connection.
    async fn send(&mut self, text: String) {
        if self.sent {
            return;
        }
        self.sent = true;
        let Some(handle) = self.handle.get() else {
            tracing::debug!("no session handle yet; the refusal goes out without its reason");
            return;
        };
        let queued = tokio::time::timeout(
            QUEUE_LIMIT,
            handle.disconnect(Disconnect::NoMoreAuthMethodsAvailable, text, "en".into()),
        )
        .await;
        if !matches!(queued, Ok(Ok(()))) {
            tracing::debug!("could not queue the refusal's DISCONNECT");
        }
    }
}

fn reject(partial_success: bool) -> Auth {
    Auth::Reject {
        proceed_with_methods: None,
        partial_success,
    }
}

/// The help for a session the gateway cannot run without the client's
/// agent (a terminal, a command, a subsystem such as sftp): how to connect
/// instead. `what` names what was asked for, e.g. "a terminal".
pub(crate) fn needs_agent_text(lease: &LeaseHash, what: &str, gateway: SocketAddr) -> String {
    format!(
        "lease {short} is active, but {what} through the gateway needs your SSH agent \
         (ssh -A with the lease key loaded), which this connection did not forward.\n\
         Connect end to end with the VM's sshd instead:\n\
         \x20 xe ssh {hash} --gateway {gateway}\n\
         \x20 ssh -i ~/.xe/wallet.lease_key -o HostKeyAlias={hash} \
         -o ProxyCommand='ssh -i ~/.xe/wallet.lease_key -p {port} -W %h:%p {hash}@{ip}' root@vm\n\
         \x20 (HostKeyAlias pins the VM's key under the lease, not under the name vm every lease shares)\n\
         For scp, sftp, rsync and IDEs (scp does not forward an agent), add a host entry:\n\
         \x20 xe ssh-config {hash} --gateway {gateway} >> ~/.ssh/config   (then: scp FILE xe-{short}:, sftp xe-{short})\n\
         \x20 or pass -o ProxyJump={hash}@{gateway} -o HostKeyAlias={hash} and use root@vm as the host.\n\
         Or forward the agent that holds the lease key:\n\
         \x20 ssh -A -p {port} {hash}@{ip}",
        short = lease.short(),
        hash = lease,
        port = gateway.port(),
        ip = gateway.ip(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_is_short_and_clean() {
        assert_eq!(echo("ro\x1b[31mot\n"), "ro[31mot");
        let long = echo(&"x".repeat(500));
        assert_eq!(long.chars().count(), xe_store::human::MAX_ECHO + 3);
        assert!(long.ends_with("...") && long.is_ascii());
    }

    #[test]
    fn every_reason_names_the_lease_and_fits_one_line() {
        let h = LeaseHash([0x1a; 32]);
        for r in AuthFailure::ALL {
            let t = auth_text(r, "u", Some(&h), &["ssh-ed25519 SHA256:x".into()]);
            assert!(!t.contains('\n'), "{t}");
            if !matches!(r, AuthFailure::MalformedUsername | AuthFailure::StoreError) {
                assert!(t.contains("1a1a1a1a"), "{r}: {t}");
            }
        }
        let t = auth_text(AuthFailure::MalformedUsername, "root\r\n", None, &[]);
        assert!(t.ends_with("got 'root'"), "{t}");
    }
}
