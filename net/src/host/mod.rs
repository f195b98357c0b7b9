//! The node's libp2p host: one task owns the swarm (the event loop); the
//! rest of the node talks to it through the cloneable [`NetHandle`].

mod dial;
mod handle;
mod nat;
pub(crate) mod peers;
mod replication;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, identify, kad, tcp};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use xe_store::{Store, Wallet};

use crate::NetError;
use crate::behaviour::{Behaviour, BehaviourEvent};
use crate::nat::{NatConfig, NatInfo, RELAY_RETRY_INTERVAL, Reachability};
use crate::replication::driver::{self, Reconciler};
use crate::secure::{HandshakeCounts, OverlayCipher, SecurityUpgrade};
use crate::tunnel::{
    self, DEFAULT_HANDSHAKE_TIMEOUT, TunnelRegistry, TunnelServerConfig, TunnelValidator,
};
use dial::{BOOTSTRAP_REDIAL_INTERVAL, Dialer, is_quic};
use handle::Command;
pub use handle::NetHandle;
use nat::{ANNOUNCE_DEBOUNCE, Nat};
use peers::{Conn, PeerTunnels, Peers};
pub use peers::{ConnPath, MAX_STREAMS_PER_CONNECTION, MAX_TUNNELS_PER_PEER, PeerInfo};
use replication::Replication;

/// How a node joins the overlay.
pub struct NetConfig {
    /// Identity (see [`crate::load_or_create_keypair`]).
    pub keypair: libp2p::identity::Keypair,
    /// Addresses to listen on (`/ip4/0.0.0.0/tcp/0`, `/ip4/…/udp/0/quic-v1`).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (each must end in `/p2p/<peer id>`).
    pub bootstrap: Vec<Multiaddr>,
    /// If set, sign and publish this account's directory entry.
    pub announce: Option<Arc<Wallet>>,
    /// How often the directory entry is re-published.
    pub announce_interval: Duration,
    /// Validity of a published directory entry.
    pub directory_ttl: Duration,
    /// How often to re-sync with one connected peer (anti-entropy).
    pub resync_interval: Duration,
    /// Leases that ended longer ago than this are compacted out of the
    /// store (see `xe_store::retention`); `None` keeps everything.
    pub retention: Option<Duration>,
    /// Provider role: validates and serves inbound tunnels.
    pub validator: Option<Arc<dyn TunnelValidator>>,
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
}

impl NetConfig {
    /// Defaults for `keypair`: loopback TCP+QUIC on random ports.
    pub fn new(keypair: libp2p::identity::Keypair) -> Self {
        NetConfig {
            keypair,
            listen: vec![
                "/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr"),
                "/ip4/127.0.0.1/udp/0/quic-v1"
                    .parse()
                    .expect("valid multiaddr"),
            ],
            bootstrap: Vec::new(),
            announce: None,
            announce_interval: Duration::from_secs(300),
            directory_ttl: Duration::from_secs(1800),
            resync_interval: Duration::from_secs(60),
            retention: Some(Duration::from_secs(xe_store::DEFAULT_RETENTION_SECS)),
            validator: None,
            tunnel: TunnelServerConfig::default(),
            client_handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            dial_timeout: Duration::from_secs(20),
            nat: NatConfig::default(),
            overlay_cipher: OverlayCipher::default(),
            max_tunnels_per_peer: MAX_TUNNELS_PER_PEER,
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Gossip messages rejected by validation.
    pub invalid_messages: AtomicU64,
    /// Lease events applied from the network (gossip or sync).
    pub events_applied: AtomicU64,
    /// Seconds between an applied event's own timestamp and its arrival.
    pub last_replication_lag_secs: AtomicU64,
    /// Connections secured, by cipher.
    pub handshakes: Arc<HandshakeCounts>,
    /// Reconciliation sessions and their bytes.
    pub recon: crate::replication::session::ReconStats,
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
    config: NetConfig,
    store: Store,
    cancel: CancellationToken,
) -> Result<Net, NetError> {
    let peer_id = config.keypair.public().to_peer_id();
    let nat = config.nat.clone();
    let stats = Arc::new(NetStats::default());
    let cipher = config.overlay_cipher;
    let security = || {
        let counts = stats.handshakes.clone();
        move |k: &libp2p::identity::Keypair| SecurityUpgrade::new(k, cipher, counts)
    };
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
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
        .with_behaviour(|key, relay_client| Behaviour::new(key, relay_client, &nat))
        .map_err(|e| NetError::Transport(e.to_string()))?
        // Tunnels and gossip keep connections busy; an idle one is cheap to keep.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
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
    // Peers whose last tunnel ended, from `TunnelGuard`s; as deep as the
    // command queue this once shared. When it is full the relay tick
    // catches up.
    let (idle_tx, idle_rx) = mpsc::channel(256);
    let registry = TunnelRegistry::default();
    let tunnels = PeerTunnels::new(idle_tx, config.max_tunnels_per_peer);
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
        tunnels: tunnels.clone(),
        client_handshake_timeout: config.client_handshake_timeout,
        dial_timeout: config.dial_timeout,
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(driver::serve(
        control.clone(),
        store.clone(),
        stats.clone(),
        cancel.clone(),
    ));
    if let Some(window) = config.retention {
        tasks.spawn(driver::compact_periodically(
            store.clone(),
            window,
            cancel.clone(),
        ));
    }
    if let Some(validator) = config.validator.clone() {
        tasks.spawn(tunnel::serve(
            control.clone(),
            validator,
            registry,
            config.tunnel.clone(),
            tunnels.clone(),
            cancel.clone(),
        ));
    }
    let dial = Dialer::new(&mut swarm, &config.bootstrap);
    let relay_candidates = nat::relay_candidates(&config.nat.relays);
    info!(%peer_id, addrs = ?addrs, relay_server = config.nat.relay_server, behind_nat = forced_private, "p2p host listening");
    let recon = Reconciler::new(
        control.clone(),
        store.clone(),
        stats.clone(),
        cancel.clone(),
    );
    let mut lp = EventLoop {
        swarm,
        cmd_rx,
        idle_rx,
        peers: Peers::new(tunnels, peer_tx, conn_tx),
        dial,
        replication: Replication::new(store, stats, recon, config.announce, config.directory_ttl),
        announce_interval: config.announce_interval,
        resync_interval: config.resync_interval,
        nat: Nat::new(config.nat, nat_tx, relay_candidates),
    };
    for a in addrs {
        lp.nat.on_new_listen_addr(&mut lp.swarm, a);
    }
    lp.nat.apply_reachability(&mut lp.swarm);
    tasks.spawn(lp.run(cancel));
    Ok(Net { handle, tasks })
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    cmd_rx: mpsc::Receiver<Command>,
    /// Peers whose last tunnel ended (see [`TunnelGuard`]).
    idle_rx: mpsc::Receiver<PeerId>,
    peers: Peers,
    dial: Dialer,
    replication: Replication,
    announce_interval: Duration,
    resync_interval: Duration,
    nat: Nat,
}

impl EventLoop {
    async fn run(mut self, cancel: CancellationToken) {
        let mut announce = tokio::time::interval(self.announce_interval);
        let mut resync = tokio::time::interval(self.resync_interval);
        resync.tick().await;
        let mut relays = tokio::time::interval(RELAY_RETRY_INTERVAL);
        relays.tick().await;
        let mut redial = tokio::time::interval(BOOTSTRAP_REDIAL_INTERVAL);
        redial.tick().await;
        loop {
            let changed = self.nat.addrs_changed_at();
            let settle = tokio::time::sleep_until(
                changed.unwrap_or_else(tokio::time::Instant::now) + ANNOUNCE_DEBOUNCE,
            );
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(cmd) = self.cmd_rx.recv() => self.on_command(cmd),
                Some(peer) = self.idle_rx.recv() => self.on_tunnels_idle(peer),
                Some(msg) = self.replication.internal() => {
                    self.replication.on_internal(&mut self.swarm, msg)
                }
                ev = self.swarm.select_next_some() => self.on_swarm(ev),
                _ = announce.tick(), if self.replication.announces() => self.announce_self(),
                _ = resync.tick() => self.resync_random(),
                _ = relays.tick() => {
                    self.nat.on_relay_tick(&mut self.swarm);
                    self.peers
                        .retire_pending(&mut self.swarm, |p| self.nat.relay_involved(p));
                }
                _ = redial.tick() => self.dial.redial_bootstrap(&mut self.swarm),
                () = settle, if changed.is_some() => {
                    self.nat.addrs_announced();
                    self.announce_self();
                    self.nat.publish_nat_info();
                }
            }
        }
        self.dial.shut_down();
        debug!("p2p event loop stopped");
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::ListenAddrs(r) => {
                let _ = r.send(self.nat.listen_addrs());
            }
            Command::Peers(r) => {
                let _ = r.send(self.peers.list());
            }
            Command::Path(peer, r) => {
                let _ = r.send(self.peers.path_to(&peer));
            }
            Command::DialAddr(addr, r) => self.dial.dial_addr(&mut self.swarm, addr, r),
            Command::DialPeer(peer, addrs, r) => {
                self.dial.dial_peer(&mut self.swarm, peer, addrs, r)
            }
            Command::Publish(msg) => self.replication.publish(&mut self.swarm, &msg),
            Command::Announce => self.announce_self(),
        }
    }

    fn on_tunnels_idle(&mut self, peer: PeerId) {
        let relay_involved = self.nat.relay_involved(&peer);
        self.peers
            .on_tunnels_idle(&mut self.swarm, peer, relay_involved);
    }

    fn announce_self(&mut self) {
        if self.replication.announces() {
            let addrs = self.nat.announced_addrs(&self.swarm);
            self.replication.announce(&mut self.swarm, addrs);
        }
    }

    fn resync_random(&mut self) {
        let Some(p) = self.peers.random() else {
            return;
        };
        self.replication.request_sync(&mut self.swarm, p, true);
    }

    fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => {
                self.replication.on_gossip(&mut self.swarm, e)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Sync(e)) => {
                self.replication.on_sync(&mut self.swarm, e)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                self.nat.on_identify(
                    &mut self.swarm,
                    peer_id,
                    &info.protocols,
                    self.dial.bootstrap_addr(&peer_id),
                );
                for a in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, a);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(e)) => {
                self.nat.on_autonat(&mut self.swarm, e)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(e)) => {
                if let Some(peer) = nat::hole_punched(e) {
                    self.peers.retire_relayed(&mut self.swarm, peer);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(e)) => self.nat.on_relay_client(e),
            SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => self.nat.on_relay_server(e),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result,
                ..
            })) => self.dial.on_lookup(&mut self.swarm, id, result),
            SwarmEvent::Behaviour(_) => {}
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let remote = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => address.clone(),
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr.clone(),
                };
                let relayed = endpoint.is_relayed();
                if relayed {
                    info!(peer = %peer_id, %remote, dialer = endpoint.is_dialer(), "relayed connection established");
                } else {
                    debug!(peer = %peer_id, %remote, "connected");
                }
                let relay_involved = self.nat.relay_involved(&peer_id);
                self.peers.on_established(
                    &mut self.swarm,
                    peer_id,
                    connection_id,
                    Conn {
                        quic: is_quic(&remote),
                        remote: remote.clone(),
                        relayed,
                        dialer: endpoint.is_dialer(),
                    },
                    relay_involved,
                );
                self.dial.on_connected(
                    &mut self.swarm,
                    peer_id,
                    connection_id,
                    remote,
                    relayed,
                    endpoint.is_dialer(),
                );
                if num_established.get() == 1 {
                    self.replication
                        .request_sync(&mut self.swarm, peer_id, false);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                // Gossip in flight on the closed connection is lost, and
                // gossipsub does not resend it over the ones that remain:
                // pull what we may have missed now rather than at the next
                // anti-entropy round (up to `resync_interval`). A peer
                // that is gone altogether is synced when it reconnects.
                if num_established > 0 {
                    debug!(peer = %peer_id, "a connection closed, others remain: syncing");
                    self.replication
                        .request_sync(&mut self.swarm, peer_id, false);
                }
                if self.peers.on_closed(peer_id, connection_id) {
                    self.nat.peer_gone(&peer_id);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => self
                .dial
                .on_dial_error(&self.swarm, connection_id, peer_id, error),
            SwarmEvent::NewListenAddr { address, .. } => {
                self.nat.on_new_listen_addr(&mut self.swarm, address)
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.nat.on_expired_listen_addr(&mut self.swarm, address)
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => self.nat.on_listener_closed(listener_id, addresses, reason),
            SwarmEvent::ExternalAddrConfirmed { address } => {
                info!(%address, "external address confirmed");
                self.nat.addrs_changed();
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                debug!(%address, "external address expired");
                self.nat.addrs_changed();
            }
            other => debug!(?other, "swarm event"),
        }
    }
}
