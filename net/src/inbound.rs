//! Caps on inbound connections, so that one address cannot pin this node's
//! memory or crowd out honest peers; libp2p alone takes any number.
//!
//! - Handshakes in flight (TCP is up, the Noise and muxer upgrades are
//!   not), in all and per source: each costs ≈ 24 KB (measured) and a
//!   handshake's CPU.
//! - Established inbound connections per source and per peer: each may
//!   park streams the node has not read yet, up to
//!   [`crate::mux::MAX_PARKED_STREAMS`] × 256 KiB (yamux's initial window),
//!   so the number of them bounds what one address can make the node hold.
//!   A peer id costs nothing to make, so the per-source cap is the one that
//!   matters; the per-peer one keeps one identity from using a source's
//!   whole share.
//!
//! Relayed connections carry no IP of their own and are counted only per
//! peer here (the relay server's own limits apply to them).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::multiaddr::Protocol;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

use crate::Source;

/// Inbound handshakes in flight at once, all sources.
pub const MAX_PENDING_INBOUND: usize = 256;
/// Inbound handshakes in flight at once from one source.
pub const MAX_PENDING_INBOUND_PER_SOURCE: usize = 16;
/// Established inbound connections from one source. A NAT may put several
/// honest nodes behind one address; each needs one or two.
pub const MAX_ESTABLISHED_PER_SOURCE: usize = 16;
/// Established inbound connections from one peer: TCP and QUIC, a
/// relayed one and its direct upgrade, and a simultaneous dial.
pub const MAX_ESTABLISHED_PER_PEER: usize = 6;

/// Why an inbound connection was not taken.
#[derive(Debug, thiserror::Error)]
pub enum InboundRefusal {
    /// The source has its share of handshakes in flight.
    #[error("{0} already has {MAX_PENDING_INBOUND_PER_SOURCE} inbound handshakes in flight")]
    SourceBusy(Source),
    /// Every slot is taken.
    #[error("{MAX_PENDING_INBOUND} inbound handshakes already in flight")]
    Full,
    /// The source has its share of established connections.
    #[error("{0} already has {1} inbound connections")]
    SourceConnections(Source, usize),
    /// The peer has its share of established connections.
    #[error("peer {0} already has {1} inbound connections")]
    PeerConnections(PeerId, usize),
}

/// The caps [`InboundLimits`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct InboundCaps {
    /// Handshakes in flight, all sources.
    pub pending: usize,
    /// Handshakes in flight from one source.
    pub pending_per_source: usize,
    /// Established inbound connections from one source.
    pub established_per_source: usize,
    /// Established inbound connections from one peer.
    pub established_per_peer: usize,
}

impl Default for InboundCaps {
    fn default() -> Self {
        InboundCaps {
            pending: MAX_PENDING_INBOUND,
            pending_per_source: MAX_PENDING_INBOUND_PER_SOURCE,
            established_per_source: MAX_ESTABLISHED_PER_SOURCE,
            established_per_peer: MAX_ESTABLISHED_PER_PEER,
        }
    }
}

/// The behaviour: counts and refuses; no protocol of its own.
#[derive(Debug, Default)]
pub struct InboundLimits {
    caps: InboundCaps,
    pending: Counted<Source>,
    established_by_source: Counted<Source>,
    established_by_peer: Counted<PeerId>,
}

/// Connections counted under a key (their source or peer).
#[derive(Debug)]
struct Counted<K> {
    of: HashMap<ConnectionId, K>,
    count: HashMap<K, usize>,
}

impl<K> Default for Counted<K> {
    fn default() -> Self {
        Counted {
            of: HashMap::new(),
            count: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Copy> Counted<K> {
    fn len(&self) -> usize {
        self.of.len()
    }

    fn count(&self, k: &K) -> usize {
        self.count.get(k).copied().unwrap_or(0)
    }

    fn add(&mut self, id: ConnectionId, k: K) {
        *self.count.entry(k).or_insert(0) += 1;
        self.of.insert(id, k);
    }

    fn forget(&mut self, id: ConnectionId) {
        if let Some(k) = self.of.remove(&id)
            && let Some(n) = self.count.get_mut(&k)
        {
            *n -= 1;
            if *n == 0 {
                self.count.remove(&k);
            }
        }
    }
}

impl InboundLimits {
    /// Enforce `caps`.
    pub fn new(caps: InboundCaps) -> Self {
        InboundLimits {
            caps,
            ..InboundLimits::default()
        }
    }

    /// Refused when `src` holds its share of established connections.
    fn source_has_room(&self, src: Source) -> Result<(), ConnectionDenied> {
        let cap = self.caps.established_per_source;
        if self.established_by_source.count(&src) >= cap {
            return Err(ConnectionDenied::new(InboundRefusal::SourceConnections(
                src, cap,
            )));
        }
        Ok(())
    }

    fn forget(&mut self, id: ConnectionId) {
        self.pending.forget(id);
        self.established_by_source.forget(id);
        self.established_by_peer.forget(id);
    }
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        return None;
    }
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(a) => Some(IpAddr::V4(a)),
        Protocol::Ip6(a) => Some(IpAddr::V6(a)),
        _ => None,
    })
}

impl NetworkBehaviour for InboundLimits {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(ip) = ip_of(remote) else {
            return Ok(());
        };
        let src = Source::of(ip);
        if self.pending.len() >= self.caps.pending {
            return Err(ConnectionDenied::new(InboundRefusal::Full));
        }
        if self.pending.count(&src) >= self.caps.pending_per_source {
            return Err(ConnectionDenied::new(InboundRefusal::SourceBusy(src)));
        }
        // Refused here already, before the handshake's cost, when the
        // source has its share of established connections.
        self.source_has_room(src)?;
        self.pending.add(id, src);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.pending.forget(id);
        let per_peer = self.caps.established_per_peer;
        if self.established_by_peer.count(&peer) >= per_peer {
            return Err(ConnectionDenied::new(InboundRefusal::PeerConnections(
                peer, per_peer,
            )));
        }
        if let Some(ip) = ip_of(remote) {
            let src = Source::of(ip);
            self.source_has_room(src)?;
            self.established_by_source.add(id, src);
        }
        self.established_by_peer.add(id, peer);
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            // Also when another behaviour denied a connection we counted.
            FromSwarm::ListenFailure(f) => self.forget(f.connection_id),
            FromSwarm::ConnectionClosed(c) => self.forget(c.connection_id),
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}
