//! The node's libp2p host: one task owns the swarm (the event loop); the
//! rest of the node talks to it through the cloneable [`NetHandle`].

mod dial;
mod nat;
pub(crate) mod peers;
mod replication;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, identify, kad, tcp};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use xe_store::{AccountAddress, Applied, DirectoryEntry, LeaseEvent, LeaseHash, Store, Wallet};

use crate::NetError;
use crate::behaviour::{Behaviour, BehaviourEvent};
use crate::nat::{NatConfig, NatInfo, RELAY_RETRY_INTERVAL, Reachability};
use crate::replication::GossipMessage;
use crate::replication::driver::{self, Reconciler};
use crate::secure::{HandshakeCounts, OverlayCipher, SecurityUpgrade};
use crate::tunnel::{
    self, DEFAULT_HANDSHAKE_TIMEOUT, TUNNEL_PROTOCOL, TunnelError, TunnelRegistry,
    TunnelServerConfig, TunnelStream, TunnelValidator,
};
use dial::{BOOTSTRAP_REDIAL_INTERVAL, Dialer, is_quic};
use nat::{ANNOUNCE_DEBOUNCE, Nat};
use peers::{Conn, PeerTunnels, Peers, TooManyTunnels};
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
    /// one is refused here ([`TunnelError::TooManyTunnels`]). Kept between
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

type Reply<T> = oneshot::Sender<T>;

pub(crate) enum Command {
    ListenAddrs(Reply<Vec<Multiaddr>>),
    Peers(Reply<Vec<PeerInfo>>),
    Path(PeerId, Reply<ConnPath>),
    DialAddr(Multiaddr, Reply<Result<PeerId, String>>),
    DialPeer(PeerId, Vec<Multiaddr>, Reply<Result<(), TunnelError>>),
    Publish(GossipMessage),
    Announce,
}

/// Cloneable handle to the running host.
#[derive(Clone)]
pub struct NetHandle {
    cmd: mpsc::Sender<Command>,
    peer_id: PeerId,
    control: libp2p_stream::Control,
    registry: TunnelRegistry,
    store: Store,
    stats: Arc<NetStats>,
    peer_count: watch::Receiver<usize>,
    nat: watch::Receiver<NatInfo>,
    conn_changes: watch::Receiver<u64>,
    tunnels: PeerTunnels,
    client_handshake_timeout: Duration,
    dial_timeout: Duration,
}

impl NetHandle {
    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Active tunnels served by this node.
    pub fn registry(&self) -> &TunnelRegistry {
        &self.registry
    }

    /// The raw stream control (for protocols other than the tunnel).
    pub fn control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    /// Gossip a message without applying it locally first. Only for tests
    /// that check how peers treat invalid messages.
    #[doc(hidden)]
    pub async fn publish_unchecked(&self, msg: GossipMessage) -> Result<(), NetError> {
        self.cmd
            .send(Command::Publish(msg))
            .await
            .map_err(|_| NetError::Shutdown)
    }

    /// Metrics counters.
    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// The store this host replicates into.
    pub fn store(&self) -> &Store {
        &self.store
    }

    async fn ask<T>(&self, f: impl FnOnce(Reply<T>) -> Command) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.cmd.send(f(tx)).await.map_err(|_| NetError::Shutdown)?;
        rx.await.map_err(|_| NetError::Shutdown)
    }

    /// Concrete listen addresses (without `/p2p`).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.ask(Command::ListenAddrs).await
    }

    /// Listen addresses ending in `/p2p/<peer id>`, ready to give to `--bootstrap`.
    pub async fn p2p_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        let id = self.peer_id;
        Ok(self
            .listen_addrs()
            .await?
            .into_iter()
            .map(|a| a.with(Protocol::P2p(id)))
            .collect())
    }

    /// Connected peers.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NetError> {
        self.ask(Command::Peers).await
    }

    /// A watch of how many peers are connected (await changes, no polling).
    pub fn peer_count(&self) -> watch::Receiver<usize> {
        self.peer_count.clone()
    }

    /// A watch of this node's reachability and relay addresses. It changes
    /// after the directory entry carrying new addresses was published.
    pub fn nat(&self) -> watch::Receiver<NatInfo> {
        self.nat.clone()
    }

    /// Whether other peers can dial this node directly (AutoNAT's verdict,
    /// or `private` when `--behind-nat` forces it).
    pub fn reachability(&self) -> Reachability {
        self.nat.borrow().reachability
    }

    /// A counter bumped whenever a connection opens or closes (await
    /// changes, then look at [`NetHandle::peers`] or [`NetHandle::path_to`]).
    pub fn connection_changes(&self) -> watch::Receiver<u64> {
        self.conn_changes.clone()
    }

    /// How this node is connected to `peer` right now.
    pub async fn path_to(&self, peer: PeerId) -> Result<ConnPath, NetError> {
        self.ask(|r| Command::Path(peer, r)).await
    }

    /// Connect to `addr`; returns the peer once the connection is up.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, NetError> {
        self.ask(|r| Command::DialAddr(addr, r))
            .await?
            .map_err(NetError::Dial)
    }

    /// Apply a lease event locally, then gossip it.
    pub async fn publish_event(&self, event: LeaseEvent) -> Result<Applied, NetError> {
        let store = self.store.clone();
        let ev = event.clone();
        let applied = tokio::task::spawn_blocking(move || store.apply_event(&ev))
            .await
            .map_err(|_| NetError::Shutdown)??;
        self.cmd
            .send(Command::Publish(GossipMessage::Event { event }))
            .await
            .map_err(|_| NetError::Shutdown)?;
        Ok(applied)
    }

    /// Store a directory entry locally, then gossip it.
    pub async fn publish_directory(&self, entry: DirectoryEntry) -> Result<(), NetError> {
        self.store.put_directory(&entry)?;
        self.cmd
            .send(Command::Publish(GossipMessage::Directory { entry }))
            .await
            .map_err(|_| NetError::Shutdown)
    }

    /// Re-sign and publish this node's directory entry now.
    pub async fn announce(&self) -> Result<(), NetError> {
        self.cmd
            .send(Command::Announce)
            .await
            .map_err(|_| NetError::Shutdown)
    }

    /// Open a tunnel to `lease`'s VM on `provider`, dialling `addrs` (or
    /// looking the peer up in the DHT) if not connected.
    pub async fn open_tunnel(
        &self,
        provider: PeerId,
        addrs: Vec<Multiaddr>,
        lease: &LeaseHash,
    ) -> Result<TunnelStream, TunnelError> {
        // Counted from before the dial, so a relayed connection that DCUtR
        // upgrades meanwhile is not closed under the stream being opened.
        let guard =
            self.tunnels
                .try_enter(provider)
                .map_err(
                    |TooManyTunnels { peer, limit }| TunnelError::TooManyTunnels { peer, limit },
                )?;
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Command::DialPeer(provider, addrs, tx))
            .await
            .map_err(|_| TunnelError::Shutdown)?;
        match tokio::time::timeout(self.dial_timeout, rx).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => return Err(TunnelError::Shutdown),
            Err(_) => {
                return Err(TunnelError::DialFailed {
                    peer: provider,
                    detail: format!("timed out after {:?}", self.dial_timeout),
                });
            }
        }
        let mut attempt = 1;
        loop {
            let mut stream = match self.open_tunnel_stream(provider).await {
                Ok(s) => s,
                // The connection libp2p-stream picked closed under it (a
                // redundant one was closed, say) while another remains.
                Err(TunnelError::DialFailed { .. })
                    if attempt < OPEN_ATTEMPTS
                        && self.path_to(provider).await.unwrap_or(ConnPath::None)
                            != ConnPath::None =>
                {
                    attempt += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match tunnel::client_handshake(&mut stream, lease, self.client_handshake_timeout).await
            {
                Ok(()) => {
                    let path = self.path_to(provider).await.unwrap_or(ConnPath::None);
                    return Ok(TunnelStream::new(stream, path, Some(guard)));
                }
                // Closed before a status byte: the provider never saw the
                // stream. libp2p-stream hands inbound streams over through
                // a queue of one and drops the rest of a burst (measured:
                // ~1 % of 10,000 tunnels opened 64 at a time). Nothing
                // happened on the provider, so opening again is safe.
                Err(TunnelError::Io(e)) if attempt < OPEN_ATTEMPTS => {
                    debug!(%provider, attempt, "tunnel stream closed before the handshake ({e}); retrying");
                    tokio::time::sleep(OPEN_RETRY_PAUSE * (1 << (attempt - 1))).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn open_tunnel_stream(
        &self,
        provider: PeerId,
    ) -> Result<Compat<libp2p::Stream>, TunnelError> {
        let mut control = self.control.clone();
        // open_stream can hang forever when a dial is dropped (libp2p #6157).
        let opened = tokio::time::timeout(
            self.client_handshake_timeout,
            control.open_stream(provider, TUNNEL_PROTOCOL),
        )
        .await
        .map_err(|_| TunnelError::HandshakeTimeout(self.client_handshake_timeout))?;
        match opened {
            Ok(s) => Ok(s.compat()),
            Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_)) => {
                Err(TunnelError::Unsupported(provider))
            }
            Err(e) => Err(TunnelError::DialFailed {
                peer: provider,
                detail: e.to_string(),
            }),
        }
    }

    /// Find a lease provider in the directory and open a tunnel to it.
    pub async fn open_tunnel_to_account(
        &self,
        provider: &AccountAddress,
        lease: &LeaseHash,
    ) -> Result<TunnelStream, TunnelError> {
        let entry = self
            .store
            .peer_for_account(provider)
            .ok()
            .flatten()
            .ok_or_else(|| {
                TunnelError::Refused(format!(
                    "provider {} is not in the directory (not announced, or its entry expired)",
                    provider.short()
                ))
            })?;
        let peer: PeerId = entry.peer_id.parse().map_err(|_| {
            TunnelError::Refused(format!(
                "provider {} announced an invalid peer id",
                provider.short()
            ))
        })?;
        let addrs = entry.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        self.open_tunnel(peer, addrs, lease).await
    }
}

/// A running host.
pub struct Net {
    /// Handle for the rest of the node.
    pub handle: NetHandle,
    /// The event loop and tunnel server; end when the token is cancelled.
    pub tasks: tokio::task::JoinSet<()>,
}

/// Tries at opening a tunnel stream whose handshake was cut before any
/// answer, and the first pause (doubling: 20 ms … 320 ms, 620 ms in all).
/// Four tries with linear pauses still lost 1 of 8,000 tunnels opened 64
/// at a time to one busy provider.
const OPEN_ATTEMPTS: u32 = 6;
const OPEN_RETRY_PAUSE: Duration = Duration::from_millis(20);

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
