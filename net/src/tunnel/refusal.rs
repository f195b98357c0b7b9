//! Why a provider refuses a tunnel. The node's validator answers with one
//! of these, the handler logs it and sends its text as the `0x01` message,
//! so the words a client reads are chosen here and nowhere else.

use std::time::Duration;

use xe_store::{AccountAddress, Inactive, LeaseHash, Store};

/// A refused tunnel handshake. Its `Display` is the one-line message the
/// client receives (at most [`super::MAX_ERROR_LEN`] bytes are sent).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelRefusal {
    /// No such lease in this node's ledger (yet).
    #[error("unknown lease {0}")]
    UnknownLease(LeaseHash),
    /// The lease names another provider.
    #[error("this node is not the provider of lease {}", .0.short())]
    NotProvider(LeaseHash),
    /// The lease grants no access now.
    #[error("{}", inactive_text(*.0))]
    Inactive(Inactive),
    /// The provider restarted and has not recovered its VMs yet.
    #[error(
        "the provider is still recovering its VMs after a restart (waited {} s); try again in a minute",
        .0.as_secs()
    )]
    Recovering(Duration),
    /// The VM's sshd did not answer.
    #[error("cannot reach the VM's sshd: {0}")]
    VmUnreachable(String),
    /// The provider's ledger could not be read.
    #[error("store error: {0}")]
    Store(String),
    /// Every `--max-tunnels` slot is taken.
    #[error("provider is at its tunnel limit; try again later")]
    AtTunnelLimit,
    /// The 32-byte lease hash did not arrive in time, or the whole
    /// handshake ran past its deadline.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The stream failed before the lease hash was read.
    #[error("reading the 32-byte lease hash: {0}")]
    ReadingLease(String),
}

/// The provider's check of a lease before it opens a tunnel: known here,
/// names `me` as its provider, grants access now. One rule for every
/// validator (a node's provider role, the tests' stand-ins).
pub fn lease_for_tunnel(
    store: &Store,
    lease: &LeaseHash,
    me: &AccountAddress,
) -> Result<(), TunnelRefusal> {
    let rec = store
        .lease(lease)
        .map_err(|e| TunnelRefusal::Store(e.to_string()))?
        .ok_or(TunnelRefusal::UnknownLease(*lease))?;
    if rec.lease.provider != *me {
        return Err(TunnelRefusal::NotProvider(*lease));
    }
    rec.access().map_err(TunnelRefusal::Inactive)
}

fn inactive_text(why: Inactive) -> String {
    match why {
        Inactive::NotAccepted => "lease is not accepted yet (VM still provisioning)".into(),
        why => format!("lease is {why}"),
    }
}
