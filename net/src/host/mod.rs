//! The node's libp2p host: one task owns the swarm (the event loop); the
//! rest of the node talks to it through the cloneable [`NetHandle`].

mod dial;
pub(crate) mod peers;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{
    Multiaddr, PeerId, Swarm, autonat, dcutr, gossipsub, identify, kad, relay, request_response,
    tcp,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use xe_store::{AccountAddress, Applied, DirectoryEntry, LeaseEvent, LeaseHash, Store, Wallet};

use crate::NetError;
use crate::behaviour::{Behaviour, BehaviourEvent};
use crate::nat::{MAX_RELAYS, NatConfig, NatInfo, RELAY_RETRY_INTERVAL, Reachability};
use crate::replication::driver::Reconciler;
use crate::replication::{
    self, DIRECTORY_TOPIC, GossipMessage, LEASE_TOPIC, SyncRequest, SyncResponse,
};
use crate::secure::{HandshakeCounts, OverlayCipher, SecurityUpgrade};
use crate::tunnel::{
    self, DEFAULT_HANDSHAKE_TIMEOUT, TUNNEL_PROTOCOL, TunnelError, TunnelRegistry,
    TunnelServerConfig, TunnelStream, TunnelValidator,
};
use dial::{BOOTSTRAP_REDIAL_INTERVAL, Dialer, is_circuit, is_loopback, is_quic, peer_of};
use peers::{Conn, PeerTunnels, Peers, TooManyTunnels};
pub use peers::{ConnPath, MAX_STREAMS_PER_CONNECTION, MAX_TUNNELS_PER_PEER, PeerInfo};

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
    pub recon: replication::session::ReconStats,
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
    let (internal_tx, internal_rx) = mpsc::channel(1024);
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
    tasks.spawn(replication::driver::serve(
        control.clone(),
        store.clone(),
        stats.clone(),
        cancel.clone(),
    ));
    if let Some(window) = config.retention {
        tasks.spawn(replication::driver::compact_periodically(
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
    let relay_candidates = config
        .nat
        .relays
        .iter()
        .filter_map(|a| match peer_of(a) {
            Some(p) => Some((p, a.clone())),
            None => {
                warn!(%a, "--relay address does not end in /p2p/<peer id>; ignored");
                None
            }
        })
        .collect();
    info!(%peer_id, addrs = ?addrs, relay_server = config.nat.relay_server, behind_nat = forced_private, "p2p host listening");
    let recon = Reconciler::new(
        control.clone(),
        store.clone(),
        stats.clone(),
        cancel.clone(),
    );
    let mut lp = EventLoop {
        swarm,
        store,
        listen_addrs: Vec::new(),
        cmd_rx,
        idle_rx,
        internal_tx,
        internal_rx,
        peers: Peers::new(tunnels, peer_tx, conn_tx),
        stats,
        dial,
        sync_requests: HashMap::new(),
        recon,
        unsent: VecDeque::new(),
        announce: config.announce,
        announce_interval: config.announce_interval,
        directory_ttl: config.directory_ttl,
        resync_interval: config.resync_interval,
        nat: config.nat,
        reachability: if forced_private {
            Reachability::Private
        } else {
            Reachability::Unknown
        },
        nat_tx,
        relay_candidates,
        relay_listeners: HashMap::new(),
        relay_addrs: Vec::new(),
        relay_peers: HashMap::new(),
        addrs_changed_at: None,
    };
    for a in addrs {
        lp.on_new_listen_addr(a);
    }
    lp.apply_reachability();
    tasks.spawn(lp.run(cancel));
    Ok(Net { handle, tasks })
}

/// How long address changes are collected before one re-announcement
/// (a relay reservation reports several addresses at once).
const ANNOUNCE_DEBOUNCE: Duration = Duration::from_millis(300);

/// What a peer uses our relay server for.
#[derive(Default)]
struct RelayUse {
    reserved: bool,
    circuits: usize,
}

/// Results that background work hands back to the event loop.
enum Internal {
    Validated(gossipsub::MessageId, PeerId, gossipsub::MessageAcceptance),
}

/// Most messages kept for re-publishing when no peer was subscribed yet.
const MAX_UNSENT: usize = 1024;

struct EventLoop {
    swarm: Swarm<Behaviour>,
    store: Store,
    listen_addrs: Vec<Multiaddr>,
    cmd_rx: mpsc::Receiver<Command>,
    /// Peers whose last tunnel ended (see [`TunnelGuard`]).
    idle_rx: mpsc::Receiver<PeerId>,
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
    stats: Arc<NetStats>,
    peers: Peers,
    dial: Dialer,
    sync_requests: HashMap<request_response::OutboundRequestId, PeerId>,
    recon: Reconciler,
    /// Gossip that found no subscribed peer; re-sent when one subscribes.
    unsent: VecDeque<Vec<u8>>,
    announce: Option<Arc<Wallet>>,
    announce_interval: Duration,
    directory_ttl: Duration,
    resync_interval: Duration,
    nat: NatConfig,
    /// Current verdict (AutoNAT's, or forced by `behind_nat`).
    reachability: Reachability,
    nat_tx: watch::Sender<NatInfo>,
    /// Relays to reserve on, in order of preference: `--relay` ones, then
    /// bootstrap peers that turned out to speak the hop protocol.
    relay_candidates: Vec<(PeerId, Multiaddr)>,
    /// Our listeners on relays (`RELAY/p2p-circuit`).
    relay_listeners: HashMap<ListenerId, PeerId>,
    /// Addresses those listeners reported.
    relay_addrs: Vec<Multiaddr>,
    /// Peers we relay for: a reservation, or circuits in either role.
    relay_peers: HashMap<PeerId, RelayUse>,
    /// Set when our addresses changed; the directory entry is re-announced
    /// [`ANNOUNCE_DEBOUNCE`] later.
    addrs_changed_at: Option<tokio::time::Instant>,
}

fn topic_for(msg: &GossipMessage) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(match msg {
        GossipMessage::Event { .. } => LEASE_TOPIC,
        GossipMessage::Directory { .. } => DIRECTORY_TOPIC,
    })
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
            let changed = self.addrs_changed_at;
            let settle = tokio::time::sleep_until(
                changed.unwrap_or_else(tokio::time::Instant::now) + ANNOUNCE_DEBOUNCE,
            );
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(cmd) = self.cmd_rx.recv() => self.on_command(cmd),
                Some(peer) = self.idle_rx.recv() => self.on_tunnels_idle(peer),
                Some(msg) = self.internal_rx.recv() => self.on_internal(msg),
                ev = self.swarm.select_next_some() => self.on_swarm(ev),
                _ = announce.tick(), if self.announce.is_some() => self.announce_self(),
                _ = resync.tick() => self.resync_random(),
                _ = relays.tick() => self.on_relay_tick(),
                _ = redial.tick() => self.dial.redial_bootstrap(&mut self.swarm),
                () = settle, if changed.is_some() => {
                    self.addrs_changed_at = None;
                    self.announce_self();
                    self.publish_nat_info();
                }
            }
        }
        self.dial.shut_down();
        debug!("p2p event loop stopped");
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::ListenAddrs(r) => {
                let _ = r.send(self.listen_addrs.clone());
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
            Command::Publish(msg) => self.publish(&msg),
            Command::Announce => self.announce_self(),
        }
    }

    fn on_tunnels_idle(&mut self, peer: PeerId) {
        let relay_involved = self.relay_involved(&peer);
        self.peers
            .on_tunnels_idle(&mut self.swarm, peer, relay_involved);
    }

    /// Whether `peer` relays for us or we for it.
    fn relay_involved(&self, peer: &PeerId) -> bool {
        self.relay_candidates.iter().any(|(p, _)| p == peer) || self.relay_peers.contains_key(peer)
    }

    fn publish(&mut self, msg: &GossipMessage) {
        let data = serde_json::to_vec(msg).expect("gossip messages serialise");
        let topic = topic_for(msg);
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic, data.clone())
        {
            Ok(_) | Err(gossipsub::PublishError::Duplicate) => {}
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic)
            | Err(gossipsub::PublishError::AllQueuesFull(_)) => {
                // Not lost: peers pull it by sync on connect, and we re-send
                // as soon as one subscribes.
                if self.unsent.len() >= MAX_UNSENT {
                    self.unsent.pop_front();
                }
                self.unsent.push_back(data);
            }
            Err(e) => warn!("gossip publish failed: {e}"),
        }
    }

    fn flush_unsent(&mut self) {
        let pending: Vec<Vec<u8>> = self.unsent.drain(..).collect();
        for data in pending {
            let Ok(msg) = serde_json::from_slice::<GossipMessage>(&data) else {
                continue;
            };
            self.publish(&msg);
        }
    }

    fn announce_self(&mut self) {
        let Some(wallet) = self.announce.clone() else {
            return;
        };
        let addrs = self.announced_addrs();
        // Entries are ordered by issue time: an update in the same second as
        // the previous one (addresses change in bursts at start-up) must
        // still win, so it is issued at least one second later.
        let prev = self
            .store
            .peer_for_account(&wallet.address())
            .ok()
            .flatten()
            .map_or(0, |e| e.issued_at.saturating_add(1));
        let entry = DirectoryEntry::sign(
            &wallet,
            self.swarm.local_peer_id().to_string(),
            addrs,
            xe_store::now_secs().max(prev),
            self.directory_ttl.as_secs(),
        );
        match self.store.put_directory(&entry) {
            Ok(_) => self.publish(&GossipMessage::Directory { entry }),
            Err(e) => warn!("could not store own directory entry: {e}"),
        }
    }

    fn resync_random(&mut self) {
        let Some(p) = self.peers.random() else {
            return;
        };
        self.request_sync(p, true);
    }

    /// Anti-entropy with `peer`: events by reconciliation, directory
    /// entries by the sync protocol. Both ends see a connection open or
    /// close, so for those only the end with the smaller peer id
    /// reconciles (`either_end`: false): one session moves the events
    /// both ways, two would move them twice.
    fn request_sync(&mut self, peer: PeerId, either_end: bool) {
        if either_end || *self.swarm.local_peer_id() < peer {
            self.recon.start(peer);
        }
        let id = self
            .swarm
            .behaviour_mut()
            .sync
            .send_request(&peer, SyncRequest::Directory);
        self.sync_requests.insert(id, peer);
    }

    fn on_internal(&mut self, msg: Internal) {
        match msg {
            Internal::Validated(id, peer, acceptance) => {
                if matches!(acceptance, gossipsub::MessageAcceptance::Reject) {
                    self.stats.invalid_messages.fetch_add(1, Ordering::Relaxed);
                }
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&id, &peer, acceptance);
            }
        }
    }

    fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => self.on_gossip(e),
            SwarmEvent::Behaviour(BehaviourEvent::Sync(e)) => self.on_sync(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                let known = self.relay_candidates.iter().any(|(p, _)| *p == peer_id);
                if info.protocols.contains(&relay::HOP_PROTOCOL_NAME)
                    && let Some(addr) = self.dial.bootstrap_addr(&peer_id)
                    && !known
                {
                    info!(relay = %peer_id, "bootstrap peer is a relay");
                    self.relay_candidates.push((peer_id, addr.clone()));
                    self.maintain_relays();
                } else if known {
                    // (Re)connected to a relay: reserve again now if the
                    // reservation was lost, rather than at the next retry.
                    self.maintain_relays();
                }
                for a in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, a);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(e)) => self.on_autonat(e),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(e)) => self.on_dcutr(e),
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(e)) => self.on_relay_client(e),
            SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => self.on_relay_server(e),
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
                let relay_involved = self.relay_involved(&peer_id);
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
                    self.request_sync(peer_id, false);
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
                    self.request_sync(peer_id, false);
                }
                if self.peers.on_closed(peer_id, connection_id) {
                    self.relay_peers.remove(&peer_id);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => self
                .dial
                .on_dial_error(&self.swarm, connection_id, peer_id, error),
            SwarmEvent::NewListenAddr { address, .. } => self.on_new_listen_addr(address),
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
                if is_circuit(&address) {
                    self.relay_addrs.retain(|a| a != &address);
                }
                self.addrs_changed();
                self.sync_relay_externals();
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                for a in &addresses {
                    self.listen_addrs.retain(|x| x != a);
                    self.relay_addrs.retain(|x| x != a);
                }
                if let Some(relay) = self.relay_listeners.remove(&listener_id) {
                    match reason {
                        Ok(()) => info!(%relay, "relay listener closed"),
                        Err(e) => {
                            warn!(%relay, "relay reservation failed or lost: {e}; retrying in {}s", RELAY_RETRY_INTERVAL.as_secs())
                        }
                    }
                }
                self.addrs_changed();
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                info!(%address, "external address confirmed");
                self.addrs_changed();
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                debug!(%address, "external address expired");
                self.addrs_changed();
            }
            other => debug!(?other, "swarm event"),
        }
    }

    fn on_gossip(&mut self, ev: gossipsub::Event) {
        match ev {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let store = self.store.clone();
                let tx = self.internal_tx.clone();
                let stats = self.stats.clone();
                // Applying flushes to disk: keep it off the event loop.
                tokio::task::spawn_blocking(move || {
                    let acceptance = replication::validate_gossip(
                        &store,
                        &stats,
                        &message.data,
                        &propagation_source,
                    );
                    let _ = tx.blocking_send(Internal::Validated(
                        message_id,
                        propagation_source,
                        acceptance,
                    ));
                });
            }
            gossipsub::Event::Subscribed { .. } if !self.unsent.is_empty() => self.flush_unsent(),
            _ => {}
        }
    }

    fn on_sync(&mut self, ev: request_response::Event<SyncRequest, SyncResponse>) {
        match ev {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let response = replication::answer_sync(&self.store, request);
                if self
                    .swarm
                    .behaviour_mut()
                    .sync
                    .send_response(channel, response)
                    .is_err()
                {
                    debug!(%peer, "sync requester went away");
                }
            }
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                self.sync_requests.remove(&request_id);
                let store = self.store.clone();
                let stats = self.stats.clone();
                tokio::task::spawn_blocking(move || {
                    replication::apply_sync(&store, &stats, peer, response)
                });
            }
            request_response::Event::OutboundFailure {
                peer,
                error,
                request_id,
                ..
            } => {
                self.sync_requests.remove(&request_id);
                debug!(%peer, "sync request failed: {error}");
            }
            _ => {}
        }
    }
}

/// NAT traversal: reachability, relay reservations, hole punching.
impl EventLoop {
    fn addrs_changed(&mut self) {
        if self.addrs_changed_at.is_none() {
            self.addrs_changed_at = Some(tokio::time::Instant::now());
        }
    }

    fn publish_nat_info(&mut self) {
        let info = NatInfo {
            reachability: self.reachability,
            relay_addrs: self.relay_addrs.iter().map(ToString::to_string).collect(),
        };
        self.nat_tx.send_if_modified(|cur| {
            if *cur == info {
                false
            } else {
                *cur = info;
                true
            }
        });
    }

    fn on_new_listen_addr(&mut self, address: Multiaddr) {
        if is_circuit(&address) {
            info!(%address, "reachable through a relay");
            if !self.relay_addrs.contains(&address) {
                self.relay_addrs.push(address);
            }
        } else if !self.listen_addrs.contains(&address) {
            self.listen_addrs.push(address);
            self.sync_relay_externals();
        }
        self.addrs_changed();
    }

    /// A relay server only serves reservations once it has an external
    /// address, and advertises exactly those to its clients. Without
    /// `--external-addr`, use the listen addresses — the non-loopback ones
    /// when there are any, so NAT'd peers are not told to dial 127.0.0.1 —
    /// and none once AutoNAT says nobody can dial them.
    fn sync_relay_externals(&mut self) {
        if !self.nat.relay_server || !self.nat.external_addrs.is_empty() {
            return;
        }
        let any_routable = self.listen_addrs.iter().any(|a| !is_loopback(a));
        let want: Vec<Multiaddr> = if self.reachability == Reachability::Private {
            Vec::new()
        } else {
            self.listen_addrs
                .iter()
                .filter(|a| !any_routable || !is_loopback(a))
                .cloned()
                .collect()
        };
        let have: Vec<Multiaddr> = self.swarm.external_addresses().cloned().collect();
        for a in &want {
            if !have.contains(a) {
                self.swarm.add_external_address(a.clone());
            }
        }
        for a in have {
            if !is_circuit(&a) && self.listen_addrs.contains(&a) && !want.contains(&a) {
                self.swarm.remove_external_address(&a);
            }
        }
    }

    /// The directory entry's addresses, best first: confirmed external
    /// addresses (our public address, or our relay circuit), then relay
    /// addresses, then listen addresses — at most `MAX_ADDRS`, each once.
    fn announced_addrs(&self) -> Vec<String> {
        let me = *self.swarm.local_peer_id();
        let mut out: Vec<String> = Vec::new();
        let all = self
            .swarm
            .external_addresses()
            .chain(self.relay_addrs.iter())
            .chain(self.listen_addrs.iter());
        for a in all {
            // A confirmed relay address ends in /p2p/<us>; listeners report
            // it without. Announce one form.
            let mut a = a.clone();
            if a.iter().last() == Some(Protocol::P2p(me)) {
                a.pop();
            }
            let s = a.to_string();
            if !out.contains(&s) {
                out.push(s);
            }
        }
        out.truncate(xe_store::directory::MAX_ADDRS);
        out
    }

    /// Whether this node should be listening through relays now.
    fn wants_relays(&self) -> bool {
        self.nat.behind_nat
            || !self.nat.relays.is_empty()
            || self.reachability == Reachability::Private
    }

    fn apply_reachability(&mut self) {
        // A node others cannot dial is no use in their routing tables
        // (it would only slow their lookups); it still queries the DHT.
        let mode = if self.reachability == Reachability::Private {
            kad::Mode::Client
        } else {
            kad::Mode::Server
        };
        self.swarm.behaviour_mut().kad.set_mode(Some(mode));
        if self.reachability == Reachability::Private
            && self.nat.relay_server
            && self.nat.external_addrs.is_empty()
        {
            warn!(
                "relay server enabled but this node is not publicly reachable: not relaying (pass --external-addr if peers can reach it, or --no-relay-server)"
            );
        }
        self.sync_relay_externals();
        self.maintain_relays();
        self.publish_nat_info();
    }

    /// Reserve on relays while we need them; drop the reservations once
    /// AutoNAT finds us publicly reachable (unless forced).
    fn maintain_relays(&mut self) {
        if !self.wants_relays() {
            if self.reachability == Reachability::Public && !self.relay_listeners.is_empty() {
                info!("publicly reachable: dropping relay reservations");
                for id in self.relay_listeners.keys().copied().collect::<Vec<_>>() {
                    self.swarm.remove_listener(id);
                }
            }
            return;
        }
        let mut active: HashSet<PeerId> = self.relay_listeners.values().copied().collect();
        for (relay, addr) in self.relay_candidates.clone() {
            if active.len() >= MAX_RELAYS {
                break;
            }
            if active.contains(&relay) {
                continue;
            }
            let circuit = addr.with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    info!(%relay, addr = %circuit, "reserving a slot on relay");
                    self.relay_listeners.insert(id, relay);
                    active.insert(relay);
                }
                Err(e) => warn!(%relay, addr = %circuit, "cannot listen through relay: {e}"),
            }
        }
        if active.is_empty() && self.relay_candidates.is_empty() {
            debug!(
                "not publicly reachable and no relay known yet (--relay, or a bootstrap peer running --relay-server)"
            );
        }
    }

    fn on_relay_tick(&mut self) {
        if self.wants_relays() && self.relay_candidates.is_empty() {
            warn!(
                reachability = %self.reachability,
                "not publicly reachable and no relay available: pass --relay or bootstrap to a node with --relay-server"
            );
        }
        self.maintain_relays();
        let Self {
            swarm,
            peers,
            relay_candidates,
            relay_peers,
            ..
        } = self;
        peers.retire_pending(swarm, |peer| {
            relay_candidates.iter().any(|(p, _)| p == peer) || relay_peers.contains_key(peer)
        });
    }

    fn on_autonat(&mut self, ev: autonat::Event) {
        match ev {
            autonat::Event::StatusChanged { old, new } => {
                info!(?old, ?new, "AutoNAT status changed");
                if self.nat.behind_nat {
                    return;
                }
                let r = match new {
                    autonat::NatStatus::Public(_) => Reachability::Public,
                    autonat::NatStatus::Private => Reachability::Private,
                    // Keep acting on the last verdict while AutoNAT re-checks.
                    autonat::NatStatus::Unknown => return,
                };
                if r != self.reachability {
                    self.reachability = r;
                    self.apply_reachability();
                }
            }
            autonat::Event::InboundProbe(e) => debug!(?e, "AutoNAT inbound probe"),
            autonat::Event::OutboundProbe(e) => debug!(?e, "AutoNAT outbound probe"),
        }
    }

    fn on_dcutr(&mut self, ev: dcutr::Event) {
        match ev.result {
            Ok(_) => {
                info!(peer = %ev.remote_peer_id, "hole punch succeeded: direct connection");
                self.peers
                    .retire_relayed(&mut self.swarm, ev.remote_peer_id);
            }
            Err(e) => {
                info!(peer = %ev.remote_peer_id, "hole punch failed, the relay carries this connection: {e}")
            }
        }
    }

    fn on_relay_client(&mut self, ev: relay::client::Event) {
        match ev {
            relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                limit,
            } => {
                if renewal {
                    debug!(relay = %relay_peer_id, "relay reservation renewed");
                } else {
                    info!(relay = %relay_peer_id, ?limit, "relay reservation accepted");
                }
            }
            relay::client::Event::OutboundCircuitEstablished {
                relay_peer_id,
                limit,
            } => debug!(relay = %relay_peer_id, ?limit, "outbound circuit established"),
            relay::client::Event::InboundCircuitEstablished { src_peer_id, limit } => {
                debug!(src = %src_peer_id, ?limit, "inbound circuit established")
            }
        }
    }

    fn on_relay_server(&mut self, ev: relay::Event) {
        match ev {
            relay::Event::ReservationReqAccepted {
                src_peer_id,
                renewed,
            } => {
                self.relay_peers.entry(src_peer_id).or_default().reserved = true;
                if renewed {
                    debug!(peer = %src_peer_id, "relay: reservation renewed");
                } else {
                    info!(peer = %src_peer_id, "relay: reservation accepted");
                }
            }
            relay::Event::ReservationReqDenied {
                src_peer_id,
                status,
            } => warn!(peer = %src_peer_id, ?status, "relay: reservation denied"),
            relay::Event::ReservationTimedOut { src_peer_id } => {
                debug!(peer = %src_peer_id, "relay: reservation expired");
                self.relay_use_ended(src_peer_id, |u| u.reserved = false);
            }
            relay::Event::ReservationClosed { src_peer_id } => {
                debug!(peer = %src_peer_id, "relay: reservation closed");
                self.relay_use_ended(src_peer_id, |u| u.reserved = false);
            }
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                info!(src = %src_peer_id, dst = %dst_peer_id, "relay: circuit opened");
                for p in [src_peer_id, dst_peer_id] {
                    self.relay_peers.entry(p).or_default().circuits += 1;
                }
            }
            relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                status,
            } => warn!(src = %src_peer_id, dst = %dst_peer_id, ?status, "relay: circuit denied"),
            relay::Event::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                error,
            } => {
                info!(src = %src_peer_id, dst = %dst_peer_id, ?error, "relay: circuit closed");
                for p in [src_peer_id, dst_peer_id] {
                    self.relay_use_ended(p, |u| u.circuits = u.circuits.saturating_sub(1));
                }
            }
            other => debug!(?other, "relay event"),
        }
    }

    fn relay_use_ended(&mut self, peer: PeerId, end: impl FnOnce(&mut RelayUse)) {
        if let Some(u) = self.relay_peers.get_mut(&peer) {
            end(u);
            if !u.reserved && u.circuits == 0 {
                self.relay_peers.remove(&peer);
            }
        }
    }
}
