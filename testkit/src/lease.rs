//! Lease fixtures: terms with the smallest resources, and leases created
//! (and accepted) in one store.

use xe_store::{
    AccessPubKey, AccountAddress, Lease, LeaseEvent, LeaseHash, Store, Wallet, now_secs,
};

/// A host key line for leases whose VM is never contacted.
pub const UNUSED_VM_HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOZkcJ0O9Yl3MY5Wa7sObHRBuqoN2Ig0tGuo6dU2dQmD";

/// Lease terms for `consumer` at `provider` (1 vCPU, 512 MB, 1 GB), created
/// at `created_at`, lasting `duration` seconds, with a random nonce.
pub fn terms(
    consumer: &Wallet,
    provider: AccountAddress,
    access: AccessPubKey,
    created_at: u64,
    duration: u64,
) -> Lease {
    Lease {
        consumer: consumer.public_key(),
        provider,
        vcpus: 1,
        memory_mb: 512,
        disk_gb: 1,
        duration,
        access_pub_key: access,
        created_at,
        nonce: rand::random(),
    }
}

/// Apply a create of [`terms`] to `store` and, if `accepted_at` is given,
/// `provider`'s accept at that time with `vm_host_key` (created at the
/// accept time, else now).
pub fn apply_lease(
    store: &Store,
    consumer: &Wallet,
    provider: &Wallet,
    access: AccessPubKey,
    accepted_at: Option<u64>,
    duration: u64,
    vm_host_key: &str,
) -> LeaseHash {
    let created_at = accepted_at.unwrap_or_else(now_secs);
    let create = LeaseEvent::create(
        consumer,
        terms(consumer, provider.address(), access, created_at, duration),
    );
    let hash = create.lease_hash();
    store.apply_event(&create).expect("apply create");
    if let Some(at) = accepted_at {
        let accept = LeaseEvent::accept(provider, hash, at, vm_host_key.to_string());
        store.apply_event(&accept).expect("apply accept");
    }
    hash
}
