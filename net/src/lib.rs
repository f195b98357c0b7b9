//! xe-net: the libp2p overlay.
//!
//! # Layout
//! - [`host`]: the swarm's event loop and the cloneable [`NetHandle`]
//!   (dial, publish, open tunnels, peers).
//! - [`behaviour`]: identify, ping, Kademlia, gossipsub, sync, raw streams,
//!   relay, DCUtR, AutoNAT.
//! - [`replication`]: gossip topics and the paged sync protocol that carry
//!   lease events and directory entries into the store.
//! - [`tunnel`]: the `/xe/tunnel/2.0.0` protocol — handshake, provider
//!   handler, [`TunnelRegistry`], byte pipe.
//! - [`nat`]: relay v2 (server and client), DCUtR and AutoNAT — how a
//!   provider behind NAT with no open port stays reachable.
//! - [`secure`]: the connection security upgrade — libp2p's Noise XX
//!   handshake with AES-256-GCM, standard `/noise` as the fallback.
//! - [`identity`]: the persistent `p2p_key`.
#![forbid(unsafe_code)]

use std::path::PathBuf;

// The NetworkBehaviour derive generates an undocumented event enum.
#[allow(missing_docs)]
pub mod behaviour;
pub mod host;
pub mod identity;
pub mod inbound;
pub mod mux;
pub mod nat;
pub mod replication;
pub mod secure;
pub mod slots;
pub mod source;
pub mod stats;
pub mod tunnel;

pub use host::{
    BootstrapError, BootstrapStatus, ConnPath, MAX_TUNNELS_PER_PEER, Net, NetConfig, NetHandle,
    NetRoles, PeerInfo, Readiness, peer_of, start,
};
pub use identity::load_or_create_keypair;
pub use libp2p::multiaddr::Protocol as libp2p_protocol;
pub use libp2p::{Multiaddr, PeerId};
pub use nat::{NatConfig, NatInfo, Reachability};
pub use secure::OverlayCipher;
pub use source::Source;
pub use stats::NetStats;
pub use tunnel::{
    TunnelError, TunnelRefusal, TunnelRegistry, TunnelStream, TunnelValidator, VmConn,
};

/// Errors of the network layer.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The identity file could not be used.
    #[error("p2p identity {path}: {detail}")]
    Identity {
        /// File.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The identity file could not be read or written (permissions, a
    /// link, I/O); the error names the file and the fix.
    #[error("p2p identity: {0}")]
    IdentityFile(#[source] xe_store::secret_file::SecretFileError),
    /// Building transports failed.
    #[error("p2p transport: {0}")]
    Transport(String),
    /// A listen address could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Listen(Multiaddr, String),
    /// A dial failed.
    #[error("dial failed: {0}")]
    Dial(String),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] xe_store::StoreError),
    /// The host has stopped.
    #[error("p2p host is shut down")]
    Shutdown,
}
