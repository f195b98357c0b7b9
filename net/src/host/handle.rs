//! The cloneable [`NetHandle`] the rest of the node holds, and the
//! [`Command`]s it sends the event loop.

use std::sync::Arc;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};
use tracing::debug;
use xe_store::{AccountAddress, Applied, DirectoryEntry, LeaseEvent, LeaseHash, Store};

use super::bootstrap::{BootstrapStatus, Readiness};
use super::peers::{ConnPath, PeerInfo, PeerTunnels, TooManyTunnels};
use crate::NetError;
use crate::nat::{NatInfo, Reachability};
use crate::replication::GossipMessage;
use crate::stats::NetStats;
use crate::tunnel::{self, TUNNEL_PROTOCOL, TunnelError, TunnelRegistry, TunnelStream};

/// Tries at opening a tunnel stream whose handshake was cut before any
/// answer, and the first pause (doubling: 20 ms … 320 ms, 620 ms in all).
/// Four tries with linear pauses still lost 1 of 8,000 tunnels opened 64
/// at a time to one busy provider.
const OPEN_ATTEMPTS: u32 = 6;
const OPEN_RETRY_PAUSE: Duration = Duration::from_millis(20);

pub(super) type Reply<T> = oneshot::Sender<T>;

/// Most events submitted here that went pending and are watched, to be
/// gossiped once they apply (each watch is a task and a change
/// subscription). Beyond, such an event spreads by reconciliation only.
pub(super) const MAX_PENDING_PUBLISH: usize = 256;
/// How long such an event is watched: its create is in flight to this
/// node (gossip takes well under a second); later, reconciliation
/// carries it within one `resync_interval` of it applying.
const PENDING_PUBLISH_WAIT: Duration = Duration::from_secs(10);

/// What a [`NetHandle`] asks of the event loop.
pub(super) enum Command {
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
    pub(super) cmd: mpsc::Sender<Command>,
    pub(super) peer_id: PeerId,
    pub(super) control: libp2p_stream::Control,
    pub(super) registry: TunnelRegistry,
    pub(super) store: Store,
    pub(super) stats: Arc<NetStats>,
    pub(super) peer_count: watch::Receiver<usize>,
    pub(super) nat: watch::Receiver<NatInfo>,
    pub(super) conn_changes: watch::Receiver<u64>,
    pub(super) bootstrap: watch::Receiver<Vec<BootstrapStatus>>,
    pub(super) tunnels: PeerTunnels,
    pub(super) client_handshake_timeout: Duration,
    pub(super) dial_timeout: Duration,
    /// Watches of submitted events that went pending.
    pub(super) pending_publish: Arc<tokio::sync::Semaphore>,
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

    /// A watch of each `--bootstrap` address's status, in the order given:
    /// connected or not, and why its last dial failed (await changes).
    pub fn bootstrap(&self) -> watch::Receiver<Vec<BootstrapStatus>> {
        self.bootstrap.clone()
    }

    /// Whether this node is ready (`GET /ready`): listening, and connected
    /// to a bootstrap peer if it was given any. See [`Readiness`].
    pub fn readiness(&self) -> Readiness {
        Readiness {
            bootstrap: self.bootstrap.borrow().clone(),
        }
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
        self.publish_event_from(event, xe_store::Source::Local)
            .await
    }

    /// [`NetHandle::publish_event`] for an event from `source` (an API client),
    /// whose share of the pending store it takes. An event that went
    /// pending is not gossiped now: peers would only hold it pending too
    /// (a flood through our API would fill theirs under our name). It is
    /// gossiped if it applies within [`PENDING_PUBLISH_WAIT`] (its create
    /// was on its way here), else reaches peers by reconciliation once it
    /// applies.
    pub async fn publish_event_from(
        &self,
        event: LeaseEvent,
        source: xe_store::Source,
    ) -> Result<Applied, NetError> {
        let store = self.store.clone();
        let ev = event.clone();
        let applied = tokio::task::spawn_blocking(move || store.apply_event_from(&ev, &source))
            .await
            .map_err(|_| NetError::Shutdown)??;
        if applied == Applied::Pending {
            self.publish_when_applied(event);
            return Ok(applied);
        }
        self.cmd
            .send(Command::Publish(GossipMessage::Event { event }))
            .await
            .map_err(|_| NetError::Shutdown)?;
        Ok(applied)
    }

    fn publish_when_applied(&self, event: LeaseEvent) {
        publish_when_applied(
            self.store.clone(),
            &self.pending_publish,
            event,
            self.cmd.clone(),
            Command::Publish,
        );
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
        // Said once, about the provider the consumer knows (its account),
        // not the peer id and every address libp2p tried.
        let unreachable = |cause: String| TunnelError::ProviderUnreachable {
            provider: *provider,
            announced_at: entry.issued_at,
            cause,
        };
        match self.open_tunnel(peer, addrs, lease).await {
            Err(TunnelError::DialFailed { detail, .. }) => Err(unreachable(detail)),
            Err(TunnelError::PeerNotFound(_)) => Err(unreachable(
                "no address for it is known here, and the DHT has none either".to_string(),
            )),
            r => r,
        }
    }
}

/// Watch an event that went pending (while a permit of `permits` is
/// free, for [`PENDING_PUBLISH_WAIT`]) and send `wrap(its gossip)` on `tx`
/// once it applies: gossiped then, not while it is an orphan.
pub(super) fn publish_when_applied<M: Send + 'static>(
    store: Store,
    permits: &Arc<tokio::sync::Semaphore>,
    event: LeaseEvent,
    tx: mpsc::Sender<M>,
    wrap: fn(GossipMessage) -> M,
) {
    let Ok(permit) = permits.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let (id, lease) = (event.id(), event.lease_hash());
        // Subscribed before the first look: a change in between is not
        // lost.
        let mut changes = store.subscribe();
        let watch = async {
            loop {
                match store.event_status(&id) {
                    Ok(Some(true)) => return true,
                    Ok(Some(false)) => {}
                    // Dropped (expired, refused once its lease came).
                    Ok(None) | Err(_) => return false,
                }
                loop {
                    match changes.recv().await {
                        Ok(c) if c.lease != lease => continue,
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(_) => return false,
                    }
                }
            }
        };
        if let Ok(true) = tokio::time::timeout(PENDING_PUBLISH_WAIT, watch).await {
            let _ = tx.send(wrap(GossipMessage::Event { event })).await;
        }
    });
}
