//! Who we are connected to and how: each connection's transport, the
//! tunnels with each peer, and closing connections that a better one made
//! redundant once no tunnel may ride on them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info};

use crate::behaviour::Behaviour;

/// Most concurrent streams (one per tunnel) on one connection, over yamux
/// (see [`crate::mux`]) or QUIC. The defaults (512 and 256) would cap a
/// gateway at that many sessions to one provider.
pub const MAX_STREAMS_PER_CONNECTION: usize = crate::mux::MAX_STREAMS;

/// Most tunnels with one peer. One stream past a connection's limit makes
/// yamux close the whole connection with every tunnel on it, so a gateway
/// refuses the one tunnel instead, below the limit by enough streams for
/// gossip, sync and the DHT.
pub const MAX_TUNNELS_PER_PEER: usize = MAX_STREAMS_PER_CONNECTION - 256;

/// Information about one connected peer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerInfo {
    /// The peer.
    pub peer_id: String,
    /// Remote address of each connection (a relayed connection the peer
    /// dialled shows as `/p2p/<peer>` only; see `relayed`).
    pub addrs: Vec<String>,
    /// Whether any connection is relayed (`/p2p-circuit`).
    pub relayed: bool,
    /// Whether any connection is direct (not through a relay).
    pub direct: bool,
}

impl PeerInfo {
    /// The kind of connection this node has to the peer.
    pub fn path(&self) -> ConnPath {
        ConnPath::from_flags(self.direct, self.relayed)
    }
}

/// How this node is connected to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnPath {
    /// Only direct connections.
    Direct,
    /// Only relayed connections (`/p2p-circuit`).
    Relayed,
    /// Both: DCUtR upgraded a relayed connection and the relayed one is
    /// kept until the tunnels that may ride on it have ended. A new
    /// stream goes over either (libp2p-stream picks a connection).
    DirectAndRelayed,
    /// Not connected.
    None,
}

impl ConnPath {
    fn from_flags(direct: bool, relayed: bool) -> Self {
        match (direct, relayed) {
            (true, false) => ConnPath::Direct,
            (false, true) => ConnPath::Relayed,
            (true, true) => ConnPath::DirectAndRelayed,
            (false, false) => ConnPath::None,
        }
    }
}

impl std::fmt::Display for ConnPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConnPath::Direct => "direct",
            ConnPath::Relayed => "relayed",
            ConnPath::DirectAndRelayed => "direct+relayed",
            ConnPath::None => "none",
        })
    }
}

/// Tunnels open (or being opened) with each peer, in either direction: the
/// ones we opened as a client and the ones we serve as its provider. When
/// the last one with a peer ends, the event loop is told through `idle`.
#[derive(Clone)]
pub(crate) struct PeerTunnels {
    counts: Arc<Mutex<HashMap<PeerId, usize>>>,
    idle: mpsc::Sender<PeerId>,
    limit: usize,
}

/// [`PeerTunnels::try_enter`]'s refusal: `peer` has `limit` tunnels already.
#[derive(Debug)]
pub(crate) struct TooManyTunnels {
    pub(crate) peer: PeerId,
    pub(crate) limit: usize,
}

impl PeerTunnels {
    pub(super) fn new(idle: mpsc::Sender<PeerId>, limit: usize) -> Self {
        PeerTunnels {
            counts: Arc::default(),
            idle,
            limit: limit.clamp(1, MAX_TUNNELS_PER_PEER),
        }
    }

    fn count(&self, peer: &PeerId) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .copied()
            .unwrap_or(0)
    }

    /// Count an inbound tunnel: its stream exists already.
    pub(crate) fn enter(&self, peer: PeerId) -> PeerTunnelSlot {
        *self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(peer)
            .or_default() += 1;
        PeerTunnelSlot {
            tunnels: self.clone(),
            peer,
        }
    }

    /// Count an outbound tunnel, unless `peer` is at the limit; checked and
    /// counted under one lock, so a burst of opens cannot overshoot it.
    pub(super) fn try_enter(&self, peer: PeerId) -> Result<PeerTunnelSlot, TooManyTunnels> {
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(peer).or_default();
        if *n >= self.limit {
            return Err(TooManyTunnels {
                peer,
                limit: self.limit,
            });
        }
        *n += 1;
        Ok(PeerTunnelSlot {
            tunnels: self.clone(),
            peer,
        })
    }
}

/// One tunnel with `peer`; when the last one ends the event loop is told,
/// so it can close connections that a better one made redundant.
pub(crate) struct PeerTunnelSlot {
    tunnels: PeerTunnels,
    peer: PeerId,
}

impl Drop for PeerTunnelSlot {
    fn drop(&mut self) {
        let mut m = self
            .tunnels
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let idle = match m.get_mut(&self.peer) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                m.remove(&self.peer);
                true
            }
            None => false,
        };
        drop(m);
        if idle {
            // If the queue is full the periodic relay check catches up.
            let _ = self.tunnels.idle.try_send(self.peer);
        }
    }
}

/// One open connection.
pub(super) struct Conn {
    /// The remote's address (for a relayed connection we accepted, only
    /// `/p2p/<peer>` is known).
    pub(super) remote: Multiaddr,
    /// Through a relay (`/p2p-circuit`).
    pub(super) relayed: bool,
    /// Over QUIC.
    pub(super) quic: bool,
    /// We dialled it.
    pub(super) dialer: bool,
}

/// Open connections and the tunnels riding on them, per peer.
pub(super) struct Peers {
    /// Open connections per peer.
    connections: HashMap<PeerId, HashMap<ConnectionId, Conn>>,
    /// Tunnels with each peer, either direction (see [`PeerTunnelSlot`]).
    tunnels: PeerTunnels,
    /// Peers whose relayed connections are to be closed once their last
    /// tunnel ends (DCUtR found a direct path).
    retiring: HashSet<PeerId>,
    /// Peers whose QUIC connections are to be closed once their last tunnel
    /// ends (a direct TCP one exists; see `retire_quic`).
    quic_retiring: HashSet<PeerId>,
    peer_tx: watch::Sender<usize>,
    /// Bumped on every connection opened or closed.
    conn_tx: watch::Sender<u64>,
}

impl Peers {
    pub(super) fn new(
        tunnels: PeerTunnels,
        peer_tx: watch::Sender<usize>,
        conn_tx: watch::Sender<u64>,
    ) -> Self {
        Peers {
            connections: HashMap::new(),
            tunnels,
            retiring: HashSet::new(),
            quic_retiring: HashSet::new(),
            peer_tx,
            conn_tx,
        }
    }

    pub(super) fn list(&self) -> Vec<PeerInfo> {
        self.connections
            .iter()
            .map(|(p, conns)| PeerInfo {
                peer_id: p.to_string(),
                addrs: conns.values().map(|c| c.remote.to_string()).collect(),
                relayed: conns.values().any(|c| c.relayed),
                direct: conns.values().any(|c| !c.relayed),
            })
            .collect()
    }

    /// A connected peer, picked at random.
    pub(super) fn random(&self) -> Option<PeerId> {
        let peers: Vec<PeerId> = self.connections.keys().copied().collect();
        if peers.is_empty() {
            return None;
        }
        Some(peers[rand::random::<usize>() % peers.len()])
    }

    pub(super) fn path_to(&self, peer: &PeerId) -> ConnPath {
        match self.connections.get(peer) {
            Some(conns) => ConnPath::from_flags(
                conns.values().any(|c| !c.relayed),
                conns.values().any(|c| c.relayed),
            ),
            None => ConnPath::None,
        }
    }

    /// `conn` to `peer_id` came up; `relay_involved` as for
    /// [`Peers::retire_quic`].
    pub(super) fn on_established(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer_id: PeerId,
        connection_id: ConnectionId,
        conn: Conn,
        relay_involved: bool,
    ) {
        self.connections
            .entry(peer_id)
            .or_default()
            .insert(connection_id, conn);
        self.retire_quic(swarm, peer_id, Some(connection_id), relay_involved);
        self.retire_relayed(swarm, peer_id);
        self.peer_tx.send_replace(self.connections.len());
        self.conn_tx.send_modify(|n| *n += 1);
    }

    /// A connection to `peer_id` closed; true if it was the last one.
    pub(super) fn on_closed(&mut self, peer_id: PeerId, connection_id: ConnectionId) -> bool {
        let mut gone = false;
        if let Some(conns) = self.connections.get_mut(&peer_id) {
            if conns.remove(&connection_id).is_some_and(|c| c.relayed) {
                info!(peer = %peer_id, "relayed connection closed");
            }
            if !conns.values().any(|c| c.relayed) {
                self.retiring.remove(&peer_id);
            }
            if !conns.values().any(|c| c.quic && !c.relayed) {
                self.quic_retiring.remove(&peer_id);
            }
            if conns.is_empty() {
                self.connections.remove(&peer_id);
                gone = true;
            }
        }
        self.peer_tx.send_replace(self.connections.len());
        self.conn_tx.send_modify(|n| *n += 1);
        gone
    }

    /// The last tunnel with `peer` ended: close what waited for that.
    pub(super) fn on_tunnels_idle(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        relay_involved: bool,
    ) {
        if self.retiring.contains(&peer) {
            self.retire_relayed(swarm, peer);
        }
        if self.quic_retiring.contains(&peer) {
            self.retire_quic(swarm, peer, None, relay_involved);
        }
    }

    /// Retry every retirement still waiting (an idle message can be lost
    /// to a full queue).
    pub(super) fn retire_pending(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        relay_involved: impl Fn(&PeerId) -> bool,
    ) {
        for peer in self.retiring.clone() {
            self.retire_relayed(swarm, peer);
        }
        for peer in self.quic_retiring.clone() {
            self.retire_quic(swarm, peer, None, relay_involved(&peer));
        }
    }

    /// Close the QUIC connections to `peer` that a direct TCP one made
    /// redundant: libp2p-stream puts each new tunnel on a random connection
    /// to the peer, and a tunnel over QUIC costs about twice the CPU per GiB
    /// (BENCHMARKS.md). One just `born` beside TCP (an AutoNAT dial-back, a
    /// DHT query's dial) goes at once: nothing rides on it yet, and a tunnel
    /// that picks it in that instant is retried (`open_tunnel`). Older ones
    /// go once no tunnel with the peer is open either way. Gossip in flight
    /// on a closed connection is pulled by the sync the close starts.
    /// Peers that relay for us, or that we relay for (`relay_involved`),
    /// keep everything: their circuits and reservation may ride on any
    /// connection.
    pub(super) fn retire_quic(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        born: Option<ConnectionId>,
        relay_involved: bool,
    ) {
        let Some(conns) = self.connections.get(&peer) else {
            self.quic_retiring.remove(&peer);
            return;
        };
        let tcp = conns.values().any(|c| !c.relayed && !c.quic);
        let quic: Vec<ConnectionId> = conns
            .iter()
            .filter(|(_, c)| c.quic && !c.relayed)
            .map(|(id, _)| *id)
            .collect();
        if !tcp || quic.is_empty() || relay_involved {
            self.quic_retiring.remove(&peer);
            return;
        }
        let busy = self.tunnels.count(&peer) > 0;
        let (now, later): (Vec<_>, Vec<_>) =
            quic.into_iter().partition(|id| !busy || Some(*id) == born);
        for id in now {
            debug!(%peer, newborn = (Some(id) == born), "closing a QUIC connection: a direct TCP one exists");
            swarm.close_connection(id);
        }
        if later.is_empty() {
            self.quic_retiring.remove(&peer);
        } else {
            self.quic_retiring.insert(peer);
        }
    }

    /// Close the relayed connections we dialled to `peer` once a direct one
    /// exists and no tunnel with it is open either way (ours, or ones we
    /// serve), so none can be riding on them.
    pub(super) fn retire_relayed(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId) {
        let Some(conns) = self.connections.get(&peer) else {
            self.retiring.remove(&peer);
            return;
        };
        if !conns.values().any(|c| !c.relayed) {
            self.retiring.remove(&peer);
            return;
        }
        let ours: Vec<ConnectionId> = conns
            .iter()
            .filter(|(_, c)| c.relayed && c.dialer)
            .map(|(id, _)| *id)
            .collect();
        if ours.is_empty() {
            self.retiring.remove(&peer);
            return;
        }
        let busy = self.tunnels.count(&peer);
        if busy > 0 {
            info!(%peer, tunnels = busy, "direct connection up; keeping the relayed one until its tunnels end");
            self.retiring.insert(peer);
            return;
        }
        self.retiring.remove(&peer);
        for id in ours {
            info!(%peer, "closing the relayed connection: a direct one replaced it");
            swarm.close_connection(id);
        }
    }
}
