//! The JSON bodies the API sends and the client reads. One definition for
//! both sides, so a field renamed on the server breaks the client's build,
//! not a user's script.

use serde::{Deserialize, Serialize};
use xe_store::{
    AccessPubKey, AccountAddress, AccountPubKey, DirectoryEntry, LeaseHash, LeaseRecord, LeaseState,
};

/// Every error response: `{"error": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One line saying what was wrong, precise enough to act on.
    pub error: String,
}

/// One lease as `GET /leases` and `GET /leases/{hash}` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseView {
    /// 64-hex lease hash (the SSH username at a gateway).
    pub lease_hash: LeaseHash,
    /// `created`, `accepted`, `settled`, `cancelled` or `expired`, as of now.
    pub state: LeaseState,
    /// The consumer's account address.
    pub consumer: AccountAddress,
    /// The consumer's account public key (signs create, cancel, settle).
    pub consumer_pub_key: AccountPubKey,
    /// The provider's account address.
    pub provider: AccountAddress,
    /// Raw ed25519 key (hex) allowed to log in and to sign `X-Signature`.
    pub access_pub_key: AccessPubKey,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// Disk, GiB.
    pub disk_gb: u32,
    /// Lease length in seconds, counted from acceptance.
    pub duration: u64,
    /// Unix seconds the consumer signed the lease.
    pub created_at: u64,
    /// Unix seconds the provider accepted it.
    pub accepted_at: Option<u64>,
    /// Unix seconds it expires (once accepted).
    pub expires_at: Option<u64>,
    /// The VM's SSH host key line (once accepted), for pinning.
    pub vm_host_key: Option<String>,
    /// Unix seconds it was settled.
    pub settled_at: Option<u64>,
    /// Who settled it.
    pub settled_by: Option<AccountAddress>,
    /// Unix seconds it was cancelled.
    pub cancelled_at: Option<u64>,
    /// Unix seconds the provider declined it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declined_at: Option<u64>,
    /// The provider's reason for declining it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decline_reason: Option<String>,
}

impl LeaseView {
    /// The view of a stored record, with its state at unix time `now`.
    pub fn from_record(rec: &LeaseRecord, now: u64) -> Self {
        LeaseView {
            lease_hash: rec.hash,
            state: rec.state_at(now),
            consumer: rec.lease.consumer_address(),
            consumer_pub_key: rec.lease.consumer,
            provider: rec.lease.provider,
            access_pub_key: rec.lease.access_pub_key,
            vcpus: rec.lease.vcpus,
            memory_mb: rec.lease.memory_mb,
            disk_gb: rec.lease.disk_gb,
            duration: rec.lease.duration,
            created_at: rec.lease.created_at,
            accepted_at: rec.accept.as_ref().map(|a| a.accepted_at),
            expires_at: rec.expires_at(),
            vm_host_key: rec.accept.as_ref().map(|a| a.vm_host_key.clone()),
            settled_at: rec.settle.as_ref().map(|s| s.at),
            settled_by: rec.settle.as_ref().map(|s| s.by),
            cancelled_at: rec.cancel.as_ref().map(|c| c.at),
            declined_at: rec.decline.as_ref().map(|d| d.at),
            decline_reason: rec.decline.as_ref().map(|d| d.reason.clone()),
        }
    }
}

/// What `POST /leases` did with a submitted event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitResult {
    /// The lease the event is about.
    pub lease_hash: LeaseHash,
    /// `create`, `accept`, `settle` or `cancel`.
    pub kind: String,
    /// `changed` (201), `duplicate` (200: already known, nothing changed)
    /// or `pending` (202: kept until the event it depends on arrives).
    pub applied: String,
    /// The lease's state after applying, when known.
    pub state: Option<LeaseState>,
}

/// `GET /node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// libp2p PeerId.
    pub peer_id: String,
    /// The node's account address.
    pub address: AccountAddress,
    /// Listen multiaddrs, each ending in `/p2p/<peer_id>` (give one to
    /// `xe node --bootstrap`).
    pub listen_addrs: Vec<String>,
    /// SSH gateway port, 0 when the gateway is off.
    pub ssh_port: u16,
    /// This API's port.
    pub api_port: u16,
    /// xe version.
    pub version: String,
    /// Connected peers.
    pub peers: Vec<PeerView>,
    /// What this node does: `replica` always, plus `provider`, `gateway`, `api`.
    pub roles: Vec<String>,
    /// Whether `POST /tunnel/…` refuses the timeless `X-Signature` form.
    pub http_tunnel_require_fresh: bool,
    /// What AutoNAT concluded: `public`, `private` or `unknown`.
    #[serde(default)]
    pub reachability: String,
}

/// `GET /ready` (200 when `ready`, else 503), and the `bootstrap` part of
/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyView {
    /// Listening, and connected to a bootstrap peer if given any.
    pub ready: bool,
    /// Why not, naming each bootstrap address and its last cause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Connected peers.
    pub peers: usize,
    /// Each `--bootstrap` address, in the order given.
    pub bootstrap: Vec<BootstrapView>,
}

/// One `--bootstrap` address in [`ReadyView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapView {
    /// The address as given.
    pub addr: String,
    /// Whether its peer is connected now.
    pub connected: bool,
    /// Why the last dial to it failed, since it was last connected.
    pub last_error: Option<String>,
}

impl ReadyView {
    /// The view of `r`, with `peers` connected peers.
    pub fn new(r: &xe_net::Readiness, peers: usize) -> Self {
        ReadyView {
            ready: r.is_ready(),
            reason: r.reason(),
            peers,
            bootstrap: r
                .bootstrap
                .iter()
                .map(|b| BootstrapView {
                    addr: b.addr.to_string(),
                    connected: b.connected,
                    last_error: b.last_error.as_ref().map(ToString::to_string),
                })
                .collect(),
        }
    }
}

/// One connected peer in [`NodeInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    /// PeerId.
    pub peer_id: String,
    /// Remote address of each connection.
    pub addrs: Vec<String>,
    /// Whether a connection is relayed.
    pub relayed: bool,
    /// `direct`, `relayed`, or `direct+relayed` (while a hole-punched
    /// connection replaces a relayed one).
    pub path: String,
}

/// One directory entry, as `GET /providers` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderView {
    /// The account address (what `xe lease create --provider` takes).
    pub address: AccountAddress,
    /// The account's public key.
    pub account_pub_key: AccountPubKey,
    /// Its libp2p PeerId.
    pub peer_id: String,
    /// Where it can be reached.
    pub addrs: Vec<String>,
    /// Unix seconds the entry was signed.
    pub issued_at: u64,
    /// Unix seconds after which the entry is ignored.
    pub expires_at: u64,
    /// Whether this node is connected to that peer right now.
    pub connected: bool,
}

impl ProviderView {
    /// The view of a directory entry.
    pub fn from_entry(e: &DirectoryEntry, connected: bool) -> Self {
        ProviderView {
            address: e.address(),
            account_pub_key: e.account,
            peer_id: e.peer_id.clone(),
            addrs: e.addrs.clone(),
            issued_at: e.issued_at,
            expires_at: e.expires_at,
            connected,
        }
    }
}

/// `GET /vms/{lease}` on a provider: the VM's status, or why the lease
/// was not taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmView {
    /// The lease.
    pub lease: LeaseHash,
    /// `provisioning`, `running`, `stopped`, `error`, or `declined` (the
    /// provider did not take the lease; `error` says why).
    pub status: String,
    /// `qemu`, `lima`, `sshd` or `dev`; absent when declined.
    pub backend: Option<String>,
    /// The VM sshd's local port on the provider, while running.
    pub ssh_port: Option<u16>,
    /// The VM's host key line.
    pub host_key: Option<String>,
    /// What went wrong (provisioning error, or the decline reason).
    pub error: Option<String>,
    /// For real VMs (qemu): the accelerator and why it was chosen, e.g.
    /// `tcg (/sys/module/kvm_pvm is present: …)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
}
