//! Before `xe ssh` starts ssh: does the lease let this wallet in now? The
//! gateway would refuse a login for the same reasons, but ssh shows a
//! refusal as one terse line among its own; here the reason comes first
//! and plainly, with what to do.

use anyhow::bail;
use xe_api::client::{ApiClient, ClientError};
use xe_api::types::LeaseView;
use xe_store::{LeaseKey, LeaseState};

/// The node's view of the lease named by `lease` (a full hash or a unique
/// prefix), refused with a reason a person acts on unless it is accepted
/// and its access key is `key`.
pub async fn usable_lease(
    client: &ApiClient,
    lease: &str,
    key: &LeaseKey,
) -> anyhow::Result<LeaseView> {
    let short = &lease[..lease.len().min(8)];
    let view = match client.lease_by_prefix(lease).await {
        Ok(v) => v,
        Err(ClientError::Status {
            status, message, ..
        }) if status.as_u16() == 404 => bail!(
            "lease {short} is not known to the node at {}: check the hash (`xe lease list --mine`); \
             if it was created through another node moments ago, wait for it to arrive here ({message})",
            client.url()
        ),
        Err(ClientError::Status {
            status, message, ..
        }) if status.as_u16() == 409 => {
            bail!("lease prefix {short} is ambiguous: {message}; give more hex digits")
        }
        Err(e) => return Err(e.into()),
    };
    admits(view, key)
}

/// `view`, refused with a reason a person acts on unless the lease is
/// accepted and its access key is `key` (however the view was obtained:
/// from a node, or from the overlay by `--p2p`).
pub fn admits(view: LeaseView, key: &LeaseKey) -> anyhow::Result<LeaseView> {
    let s = view.lease_hash.short();
    match view.state {
        LeaseState::Accepted => {}
        LeaseState::Created => bail!(
            "lease {s} is not accepted yet, so there is no VM to reach: wait for the provider \
             (`xe lease show {s}`), or withdraw it with `xe lease cancel {s}`"
        ),
        st => bail!(
            "lease {s} is {st}: it grants no access any more (`xe lease show {s}` for when); \
             create a new lease with `xe lease create`"
        ),
    }
    if view.access_pub_key != key.access_pub_key() {
        bail!(
            "lease {s} does not admit the lease key {} (its access key is {}): the lease was created \
             with another wallet; pass that wallet with --wallet (or XE_WALLET)",
            key.path().display(),
            view.access_pub_key
        );
    }
    Ok(view)
}
