//! Inbound connections that have not finished their handshake (TCP is up,
//! the Noise and muxer upgrades are not) are capped, in all and per source.
//! Each costs memory (≈ 24 KB measured) and a handshake's CPU; libp2p alone
//! takes any number of them, so one address opening sockets it never speaks
//! on could pin memory and crowd out honest peers' handshakes.
//!
//! Relayed connections carry no IP of their own and are not counted here
//! (the relay server's own limits apply to them).

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

/// Why an inbound connection was not taken.
#[derive(Debug, thiserror::Error)]
pub enum InboundRefusal {
    /// The source has its share of handshakes in flight.
    #[error("{0} already has {MAX_PENDING_INBOUND_PER_SOURCE} inbound handshakes in flight")]
    SourceBusy(Source),
    /// Every slot is taken.
    #[error("{MAX_PENDING_INBOUND} inbound handshakes already in flight")]
    Full,
}

/// The behaviour: counts and refuses; no protocol of its own.
#[derive(Debug)]
pub struct InboundLimits {
    global: usize,
    per_source: usize,
    pending: HashMap<ConnectionId, Source>,
    by_source: HashMap<Source, usize>,
}

impl Default for InboundLimits {
    fn default() -> Self {
        InboundLimits::new(MAX_PENDING_INBOUND, MAX_PENDING_INBOUND_PER_SOURCE)
    }
}

impl InboundLimits {
    /// Caps of `global` in all and `per_source` per source.
    pub fn new(global: usize, per_source: usize) -> Self {
        InboundLimits {
            global,
            per_source,
            pending: HashMap::new(),
            by_source: HashMap::new(),
        }
    }

    fn forget(&mut self, id: ConnectionId) {
        if let Some(src) = self.pending.remove(&id)
            && let Some(n) = self.by_source.get_mut(&src)
        {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&src);
            }
        }
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
        if self.pending.len() >= self.global {
            return Err(ConnectionDenied::new(InboundRefusal::Full));
        }
        let n = self.by_source.entry(src).or_insert(0);
        if *n >= self.per_source {
            return Err(ConnectionDenied::new(InboundRefusal::SourceBusy(src)));
        }
        *n += 1;
        self.pending.insert(id, src);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        _peer: PeerId,
        _local: &Multiaddr,
        _remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.forget(id);
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
        if let FromSwarm::ListenFailure(f) = event {
            self.forget(f.connection_id);
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
