//! The node's libp2p host: one task owns the swarm (the event loop); the
//! rest of the node talks to it through the cloneable [`NetHandle`].
//!
//! # Layout
//! - this file: [`NetConfig`], and [`start`], which builds the swarm.
//! - `handle`: [`NetHandle`] and the `Command`s it sends the event loop.
//! - `event_loop`: the task that owns the swarm; it hands each event to
//!   the part below that owns its state, with `&mut swarm`.
//! - `peers`: connections, tunnels per peer ([`MAX_TUNNELS_PER_PEER`]),
//!   [`ConnPath`], and closing connections a better one made redundant.
//! - `dial`: address order and the dials someone waits on.
//! - `bootstrap`: each `--bootstrap` address's status and cause of failure,
//!   and [`Readiness`] (`GET /ready`).
//! - `nat`: our addresses, reachability and relays (the settings and
//!   public types are in [`crate::nat`]).
//! - `replication`: gossip, sync and the directory entry (the protocols
//!   are in [`crate::replication`]).

mod addr;
mod bootstrap;
mod dial;
mod event_loop;
mod handle;
mod nat;
pub(crate) mod peers;
mod replication;

pub use addr::peer_of;
pub use bootstrap::{BOOTSTRAP_WARN_AFTER, BootstrapError, BootstrapStatus, Readiness};
pub use handle::NetHandle;
pub use peers::{ConnPath, MAX_STREAMS_PER_CONNECTION, MAX_TUNNELS_PER_PEER, PeerInfo};

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, tcp};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::info;
use xe_store::{Store, Wallet};

use crate::NetError;
use crate::behaviour::Behaviour;
use crate::nat::{NatConfig, NatInfo, Reachability};
use crate::replication::driver::{self, Reconciler};
use crate::secure::{OverlayCipher, SecurityUpgrade};
use crate::stats::NetStats;
use crate::tunnel::{
    self, DEFAULT_HANDSHAKE_TIMEOUT, TunnelRegistry, TunnelServerConfig, TunnelValidator,
};
use dial::Dialer;
use event_loop::EventLoop;
use nat::Nat;
use peers::{PeerTunnels, Peers};
use replication::Replication;

/// How a host joins the overlay: its settings, all with defaults.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Addresses to listen on (`/ip4/0.0.0.0/tcp/0`, `/ip4/…/udp/0/quic-v1`).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (each must end in `/p2p/<peer id>`).
    pub bootstrap: Vec<Multiaddr>,
    /// When to warn that no bootstrap peer connected yet
    /// ([`BOOTSTRAP_WARN_AFTER`]; tests shorten it).
    pub bootstrap_warn_after: Duration,
    /// How often the directory entry is re-published.
    pub announce_interval: Duration,
    /// Validity of a published directory entry.
    pub directory_ttl: Duration,
    /// How often to re-sync with one connected peer (anti-entropy).
    pub resync_interval: Duration,
    /// Take part in replication: answer and start reconciliation, and ask
    /// peers for their directory, on every connection (the default). A host
    /// that lives for one tunnel and already knows where its provider is
    /// (`xe tunnel --p2p` given the provider, or looking it up through a
    /// node) turns it off: no provider then streams its ledger into a
    /// session's throwaway store, and inbound reconciliation is refused
    /// as an unsupported protocol.
    pub replicate: bool,
    /// Compact the store every `COMPACT_INTERVAL`: leases that ended more
    /// than the store's retention window ago leave it (see
    /// `xe_store::retention`; the window is `Store::set_retention`).
    pub compact: bool,
    /// Provider-side tunnel limits.
    pub tunnel: TunnelServerConfig,
    /// Client-side handshake deadline.
    pub client_handshake_timeout: Duration,
    /// Deadline for connecting to a provider.
    pub dial_timeout: Duration,
    /// Relay server, relays to reserve on, AutoNAT and hole punching.
    pub nat: NatConfig,
    /// Cipher of TCP and relayed connections (see [`crate::secure`]).
    pub overlay_cipher: OverlayCipher,
    /// Most tunnels with one peer, both directions together, before a new
    /// one is refused here ([`crate::TunnelError::TooManyTunnels`]). Kept between
    /// 1 and [`MAX_TUNNELS_PER_PEER`].
    pub max_tunnels_per_peer: usize,
    /// Caps on inbound connections, per source and per peer
    /// ([`crate::inbound`]).
    pub inbound: crate::inbound::InboundCaps,
}

impl NetConfig {
    /// TCP and QUIC on every interface, ports chosen by the kernel: what a
    /// node reachable from other machines listens on, and what hole
    /// punching needs.
    pub fn every_interface() -> Vec<Multiaddr> {
        vec![
            "/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr"),
            "/ip4/0.0.0.0/udp/0/quic-v1"
                .parse()
                .expect("valid multiaddr"),
        ]
    }
}

impl Default for NetConfig {
    /// Loopback TCP+QUIC on random ports, no bootstrap peers.
    fn default() -> Self {
        NetConfig {
            listen: vec![
                "/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr"),
                "/ip4/127.0.0.1/udp/0/quic-v1"
                    .parse()
                    .expect("valid multiaddr"),
            ],
            bootstrap: Vec::new(),
            bootstrap_warn_after: BOOTSTRAP_WARN_AFTER,
            announce_interval: Duration::from_secs(300),
            directory_ttl: Duration::from_secs(1800),
            resync_interval: Duration::from_secs(60),
            compact: true,
            replicate: true,
            tunnel: TunnelServerConfig::default(),
            client_handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            dial_timeout: Duration::from_secs(20),
            nat: NatConfig::default(),
            overlay_cipher: OverlayCipher::default(),
            max_tunnels_per_peer: MAX_TUNNELS_PER_PEER,
            inbound: crate::inbound::InboundCaps::default(),
        }
    }
}

/// What a host is and does beyond its settings: the identity it dials
/// and answers with, and the roles the node gives it. Apart from
/// [`NetConfig`] so that settings can be defaulted, copied and embedded
/// (a node's config holds a `NetConfig`) without a key or a store in hand.
pub struct NetRoles {
    /// Identity (see [`crate::load_or_create_keypair`]).
    pub keypair: libp2p::identity::Keypair,
    /// If set, sign and publish this account's directory entry.
    pub announce: Option<Arc<Wallet>>,
    /// Provider role: validates and serves inbound tunnels.
    pub validator: Option<Arc<dyn TunnelValidator>>,
}

impl NetRoles {
    /// A host with `keypair` that neither announces nor serves tunnels.
    pub fn new(keypair: libp2p::identity::Keypair) -> Self {
        NetRoles {
            keypair,
            announce: None,
            validator: None,
        }
    }

    /// As [`NetRoles::new`] with a fresh ed25519 identity, for a host that
    /// lives for one task (`xe tunnel --p2p`) and should not be linkable
    /// across runs.
    pub fn ephemeral() -> Self {
        NetRoles::new(libp2p::identity::Keypair::generate_ed25519())
    }
}

/// A running host.
pub struct Net {
    /// Handle for the rest of the node.
    pub handle: NetHandle,
    /// The event loop and tunnel server; end when the token is cancelled.
    pub tasks: tokio::task::JoinSet<()>,
}

/// Build the swarm, start listening and dialling, and spawn the event loop.
/// Returns once every listen address is bound.
pub async fn start(
    roles: NetRoles,
    config: NetConfig,
    store: Store,
    cancel: CancellationToken,
) -> Result<Net, NetError> {
    let peer_id = roles.keypair.public().to_peer_id();
    let nat = config.nat.clone();
    let stats = Arc::new(NetStats::default());
    let cipher = config.overlay_cipher;
    let security = || {
        let counts = stats.handshakes.clone();
        move |k: &libp2p::identity::Keypair| SecurityUpgrade::new(k, cipher, counts)
    };
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(roles.keypair.clone())
        .with_tokio()
        // Noise with AES-GCM, not TLS: libp2p-tls puts ChaCha20-Poly1305
        // first and measured 20 % more CPU per GiB than noise (BENCHMARKS.md).
        .with_tcp(
            tcp::Config::default().nodelay(true),
            security(),
            crate::mux::config,
        )
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_quic_config(|mut c| {
            c.max_concurrent_stream_limit = MAX_STREAMS_PER_CONNECTION as u32;
            c
        })
        .with_dns()
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_relay_client(security(), crate::mux::config)
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_behaviour(|key, relay_client| Behaviour::new(key, relay_client, &nat, config.inbound))
        .map_err(|e| NetError::Transport(e.to_string()))?
        // Tunnels and gossip keep connections busy; an idle one is cheap to keep.
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(3600))
                // Streams being negotiated hold what their peer sent.
                .with_max_negotiating_inbound_streams(crate::mux::MAX_NEGOTIATING_STREAMS)
        })
        .build();
    for addr in &config.listen {
        refuse_if_taken(addr)?;
    }
    let mut listeners = HashSet::new();
    for addr in &config.listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen(addr.clone(), e.to_string()))?;
        listeners.insert(id);
    }
    // Wait until each listener has an address, so callers can read ports.
    let mut addrs = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    while !listeners.is_empty() {
        tokio::select! {
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::NewListenAddr { listener_id, address } => {
                    listeners.remove(&listener_id);
                    addrs.push(address);
                }
                SwarmEvent::ListenerClosed { addresses, reason, .. } => {
                    return Err(NetError::Listen(addresses.first().cloned().unwrap_or(Multiaddr::empty()), format!("{reason:?}")));
                }
                SwarmEvent::ListenerError { error, .. } => return Err(NetError::Listen(Multiaddr::empty(), error.to_string())),
                _ => {}
            },
            () = &mut deadline => return Err(NetError::Listen(Multiaddr::empty(), "no listen address after 10 s".into())),
        }
    }
    for a in &config.nat.external_addrs {
        swarm.add_external_address(a.clone());
    }
    let control = swarm.behaviour().stream.new_control();
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let (peer_tx, peer_rx) = watch::channel(0);
    let forced_private = config.nat.behind_nat;
    let (nat_tx, nat_rx) = watch::channel(NatInfo {
        reachability: if forced_private {
            Reachability::Private
        } else {
            Reachability::Unknown
        },
        relay_addrs: Vec::new(),
    });
    let (conn_tx, conn_rx) = watch::channel(0u64);
    // Peers whose last tunnel ended, from `PeerTunnelSlot`s; as deep as the
    // command queue this once shared. When it is full the relay tick
    // catches up.
    let (idle_tx, idle_rx) = mpsc::channel(256);
    let registry = TunnelRegistry::default();
    let tunnels = PeerTunnels::new(idle_tx, config.max_tunnels_per_peer);
    let (dial, bootstrap_rx) = Dialer::new(&mut swarm, &config.bootstrap);
    let handle = NetHandle {
        cmd: cmd_tx.clone(),
        peer_id,
        control: control.clone(),
        registry: registry.clone(),
        store: store.clone(),
        stats: stats.clone(),
        peer_count: peer_rx,
        nat: nat_rx,
        conn_changes: conn_rx,
        bootstrap: bootstrap_rx.clone(),
        tunnels: tunnels.clone(),
        client_handshake_timeout: config.client_handshake_timeout,
        dial_timeout: config.dial_timeout,
        pending_publish: Arc::new(tokio::sync::Semaphore::new(handle::MAX_PENDING_PUBLISH)),
    };
    let mut tasks = tokio::task::JoinSet::new();
    if config.replicate {
        tasks.spawn(driver::serve(
            control.clone(),
            store.clone(),
            stats.clone(),
            cancel.clone(),
        ));
    }
    if config.compact {
        tasks.spawn(driver::compact_periodically(store.clone(), cancel.clone()));
    }
    if let Some(validator) = roles.validator.clone() {
        tasks.spawn(tunnel::serve(
            control.clone(),
            validator,
            registry,
            config.tunnel.clone(),
            tunnels.clone(),
            cancel.clone(),
        ));
    }
    tasks.spawn(bootstrap::warn_if_unconnected(
        bootstrap_rx,
        config.bootstrap_warn_after,
        cancel.clone(),
    ));
    let relay_candidates = nat::relay_candidates(&config.nat.relays);
    info!(%peer_id, addrs = ?addrs, relay_server = config.nat.relay_server, behind_nat = forced_private, "p2p host listening");
    let recon = Reconciler::new(
        control.clone(),
        store.clone(),
        stats.clone(),
        cancel.clone(),
    );
    let mut nat = Nat::new(config.nat, nat_tx, relay_candidates);
    for a in addrs {
        nat.on_new_listen_addr(&mut swarm, a);
    }
    nat.apply_reachability(&mut swarm);
    let lp = EventLoop {
        swarm,
        cmd_rx,
        idle_rx,
        peers: Peers::new(tunnels, peer_tx, conn_tx),
        dial,
        nat,
        replication: Replication::new(
            store,
            stats,
            recon,
            roles.announce,
            config.directory_ttl,
            config.replicate,
        ),
        announce_interval: config.announce_interval,
        resync_interval: config.resync_interval,
    };
    tasks.spawn(lp.run(cancel));
    Ok(Net { handle, tasks })
}

/// libp2p binds listen ports with `SO_REUSEPORT` (so that dials can leave
/// from them, for hole punching), which lets a second node on the host bind
/// the same port and take half the first one's connections at random. A
/// plain bind of the same address, dropped at once, fails exactly when
/// another socket already listens there: then this node refuses to start.
fn refuse_if_taken(addr: &Multiaddr) -> Result<(), NetError> {
    use libp2p::multiaddr::Protocol;
    let mut it = addr.iter();
    let ip: std::net::IpAddr = match it.next() {
        Some(Protocol::Ip4(a)) => a.into(),
        Some(Protocol::Ip6(a)) => a.into(),
        _ => return Ok(()),
    };
    let taken = |e: std::io::Error| {
        NetError::Listen(
            addr.clone(),
            format!(
                "{e}: another process (another xe node?) already listens there; stop it or choose another port with --p2p-listen"
            ),
        )
    };
    match it.next() {
        Some(Protocol::Tcp(port)) if port != 0 => {
            std::net::TcpListener::bind((ip, port)).map_err(taken)?;
        }
        Some(Protocol::Udp(port)) if port != 0 => {
            std::net::UdpSocket::bind((ip, port)).map_err(taken)?;
        }
        _ => {}
    }
    Ok(())
}
