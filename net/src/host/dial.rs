//! Dialling: which of a peer's addresses goes first, and the dials someone
//! waits on — an address, a peer a tunnel is for (through the DHT when no
//! address is known), and the bootstrap peers, redialled when lost.

use std::collections::HashMap;

use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError};
use libp2p::{Multiaddr, PeerId, Swarm, kad};
use tokio::sync::watch;
use tracing::debug;

use super::addr::{dial_rank, peer_of};
use super::bootstrap::{Bootstrap, BootstrapStatus};
use super::handle::Reply;
use crate::behaviour::Behaviour;
use crate::tunnel::TunnelError;

/// A dial to `peer` in [`dial_rank`] order. With no circuit among `addrs`
/// (a peer that says it is reachable) one address at a time, so the
/// connection is TCP whenever TCP works: QUIC, a round trip quicker, would
/// win a race, and a tunnel over QUIC costs about twice the CPU per GiB
/// (BENCHMARKS.md). With circuits, all at once: a NATed peer's own
/// addresses can hang until the transport times out, and the relay must
/// not wait for that.
fn preferred_dial(
    peer: PeerId,
    mut addrs: Vec<Multiaddr>,
    condition: PeerCondition,
) -> libp2p::swarm::dial_opts::WithPeerIdWithAddresses {
    addrs.sort_by_key(dial_rank);
    let circuits = addrs.iter().any(|a| dial_rank(a) == 2);
    let opts = DialOpts::peer_id(peer)
        .condition(condition)
        .addresses(addrs);
    if circuits {
        opts
    } else {
        opts.override_dial_concurrency_factor(std::num::NonZeroU8::MIN)
    }
}

/// Tunnel opens waiting for a connection to one peer.
struct PeerDial {
    /// Our dial, once started (none while the DHT is asked for addresses).
    conn: Option<ConnectionId>,
    replies: Vec<Reply<Result<(), TunnelError>>>,
}

/// The dials the event loop answers when their connection comes up or
/// fails, and the bootstrap peers it keeps connected.
pub(super) struct Dialer {
    /// Each bootstrap peer's addresses, in dial order.
    bootstrap_peers: HashMap<PeerId, Vec<Multiaddr>>,
    /// How each bootstrap address stands, for `/ready` and the logs.
    pub(super) bootstrap: Bootstrap,
    addr_dials: HashMap<ConnectionId, Reply<Result<PeerId, String>>>,
    peer_dials: HashMap<PeerId, PeerDial>,
    lookups: HashMap<kad::QueryId, PeerId>,
}

impl Dialer {
    /// Dial the `bootstrap` peers (each address must end in `/p2p/<peer id>`;
    /// one that does not is reported, not dialled). Also returns the watch
    /// of their status.
    pub(super) fn new(
        swarm: &mut Swarm<Behaviour>,
        bootstrap: &[Multiaddr],
    ) -> (Self, watch::Receiver<Vec<BootstrapStatus>>) {
        let (mut status, status_rx) = Bootstrap::new(bootstrap);
        let mut bootstrap_peers: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for addr in bootstrap {
            if let Some(p) = peer_of(addr) {
                bootstrap_peers.entry(p).or_default().push(addr.clone());
            }
        }
        for (peer, addrs) in &mut bootstrap_peers {
            addrs.sort_by_key(dial_rank);
            let opts = preferred_dial(
                *peer,
                addrs.clone(),
                PeerCondition::DisconnectedAndNotDialing,
            );
            if let Err(e) = swarm.dial(opts.build()) {
                status.on_dial_not_started(*peer, &e);
            }
        }
        let dialer = Dialer {
            bootstrap_peers,
            bootstrap: status,
            addr_dials: HashMap::new(),
            peer_dials: HashMap::new(),
            lookups: HashMap::new(),
        };
        (dialer, status_rx)
    }

    /// The first address of `peer`, if it is a bootstrap peer.
    pub(super) fn bootstrap_addr(&self, peer: &PeerId) -> Option<&Multiaddr> {
        self.bootstrap_peers.get(peer).and_then(|a| a.first())
    }

    pub(super) fn dial_addr(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        addr: Multiaddr,
        r: Reply<Result<PeerId, String>>,
    ) {
        let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
        let id = opts.connection_id();
        match swarm.dial(opts) {
            Ok(()) => {
                self.addr_dials.insert(id, r);
            }
            Err(e) => {
                let _ = r.send(Err(e.to_string()));
            }
        }
    }

    pub(super) fn dial_peer(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        r: Reply<Result<(), TunnelError>>,
    ) {
        if swarm.is_connected(&peer) {
            let _ = r.send(Ok(()));
            return;
        }
        for a in &addrs {
            swarm.add_peer_address(peer, a.clone());
        }
        if let Some(d) = self.peer_dials.get_mut(&peer) {
            d.replies.push(r);
            return;
        }
        self.peer_dials.insert(
            peer,
            PeerDial {
                conn: None,
                replies: vec![r],
            },
        );
        // Our own dial even if another one (a DHT query's, say) is under
        // way: ours has the directory's addresses, and any connection that
        // comes up first answers the waiters.
        let opts = preferred_dial(peer, addrs, PeerCondition::Disconnected)
            .extend_addresses_through_behaviour()
            .build();
        let conn = opts.connection_id();
        match swarm.dial(opts) {
            Ok(()) => {
                if let Some(d) = self.peer_dials.get_mut(&peer) {
                    d.conn = Some(conn);
                }
            }
            Err(e) => match e {
                DialError::NoAddresses => {
                    debug!(%peer, "no known address; asking the DHT");
                    let q = swarm.behaviour_mut().kad.get_closest_peers(peer);
                    self.lookups.insert(q, peer);
                }
                e => self.finish_dial(
                    peer,
                    Err(TunnelError::DialFailed {
                        peer,
                        detail: super::bootstrap::dial_cause(&e),
                    }),
                ),
            },
        }
    }

    fn finish_dial(&mut self, peer: PeerId, result: Result<(), TunnelError>) {
        let replies = self
            .peer_dials
            .remove(&peer)
            .map(|d| d.replies)
            .unwrap_or_default();
        for r in replies {
            let _ = r.send(match &result {
                Ok(()) => Ok(()),
                Err(TunnelError::PeerNotFound(p)) => Err(TunnelError::PeerNotFound(*p)),
                // The cause as it is: wrapping the whole error's text
                // would say "could not connect to peer P" twice.
                Err(TunnelError::DialFailed { detail, .. }) => Err(TunnelError::DialFailed {
                    peer,
                    detail: detail.clone(),
                }),
                Err(e) => Err(TunnelError::DialFailed {
                    peer,
                    detail: e.to_string(),
                }),
            });
        }
    }

    /// A DHT lookup that [`Dialer::dial_peer`] started has an answer.
    pub(super) fn on_lookup(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        id: kad::QueryId,
        result: kad::QueryResult,
    ) {
        if let Some(peer) = self.lookups.remove(&id) {
            let found = match result {
                kad::QueryResult::GetClosestPeers(Ok(ok)) => {
                    ok.peers.into_iter().find(|p| p.peer_id == peer)
                }
                _ => None,
            };
            match found {
                Some(info) if !info.addrs.is_empty() => {
                    let opts = DialOpts::peer_id(peer).addresses(info.addrs).build();
                    if let Some(d) = self.peer_dials.get_mut(&peer) {
                        d.conn = Some(opts.connection_id());
                    }
                    if let Err(e) = swarm.dial(opts) {
                        self.finish_dial(
                            peer,
                            Err(TunnelError::DialFailed {
                                peer,
                                detail: super::bootstrap::dial_cause(&e),
                            }),
                        );
                    }
                }
                _ => self.finish_dial(peer, Err(TunnelError::PeerNotFound(peer))),
            }
        }
    }

    /// A connection to `peer_id` came up: answer whoever waits on it.
    pub(super) fn on_connected(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer_id: PeerId,
        connection_id: ConnectionId,
        remote: Multiaddr,
        relayed: bool,
        dialer: bool,
    ) {
        if let Some(r) = self.addr_dials.remove(&connection_id) {
            let _ = r.send(Ok(peer_id));
        }
        if dialer && !relayed && self.bootstrap_peers.contains_key(&peer_id) {
            swarm.behaviour_mut().kad.add_address(&peer_id, remote);
            let _ = swarm.behaviour_mut().kad.bootstrap();
        }
        self.finish_dial(peer_id, Ok(()));
    }

    pub(super) fn on_dial_error(
        &mut self,
        swarm: &Swarm<Behaviour>,
        connection_id: ConnectionId,
        peer_id: Option<PeerId>,
        error: DialError,
    ) {
        if let Some(r) = self.addr_dials.remove(&connection_id) {
            let _ = r.send(Err(error.to_string()));
        }
        self.bootstrap.on_dial_error(peer_id, &error);
        // Only our own dial's failure answers the waiters: another
        // dial to the same peer (a DHT query's) may fail while ours
        // is still trying.
        if let Some(peer) = peer_id
            && !swarm.is_connected(&peer)
            && self
                .peer_dials
                .get(&peer)
                .is_some_and(|d| d.conn == Some(connection_id))
        {
            self.finish_dial(
                peer,
                Err(TunnelError::DialFailed {
                    peer,
                    detail: super::bootstrap::dial_cause(&error),
                }),
            );
        }
    }

    pub(super) fn redial_bootstrap(&mut self, swarm: &mut Swarm<Behaviour>) {
        let lost: Vec<(PeerId, Vec<Multiaddr>)> = self
            .bootstrap_peers
            .iter()
            .filter(|(p, _)| !swarm.is_connected(p))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        for (peer, addrs) in lost {
            let opts =
                preferred_dial(peer, addrs, PeerCondition::DisconnectedAndNotDialing).build();
            match swarm.dial(opts) {
                Ok(()) => debug!(%peer, "redialling bootstrap peer"),
                Err(e) => {
                    debug!(%peer, "bootstrap redial not started: {e}");
                    self.bootstrap.on_dial_not_started(peer, &e);
                }
            }
        }
    }

    /// The host stopped: tell every waiting tunnel open.
    pub(super) fn shut_down(&mut self) {
        for (_, dial) in self.peer_dials.drain() {
            for r in dial.replies {
                let _ = r.send(Err(TunnelError::Shutdown));
            }
        }
    }
}
