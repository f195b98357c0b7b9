//! NAT traversal in the event loop: our addresses, reachability, relay
//! reservations (as a client) and relay use (as a server), hole punching.
//! The settings and the types others see are in [`crate::nat`].

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, autonat, dcutr, kad, relay};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::addr::{is_circuit, is_loopback, peer_of};
use crate::behaviour::Behaviour;
use crate::nat::{MAX_RELAYS, NatConfig, NatInfo, RELAY_RETRY_INTERVAL, Reachability};

/// How long address changes are collected before one re-announcement
/// (a relay reservation reports several addresses at once).
pub(super) const ANNOUNCE_DEBOUNCE: Duration = Duration::from_millis(300);

/// What a peer uses our relay server for.
#[derive(Default)]
struct RelayUse {
    reserved: bool,
    circuits: usize,
}

/// The `--relay` addresses as (relay, address); each must end in
/// `/p2p/<peer id>`.
pub(super) fn relay_candidates(relays: &[Multiaddr]) -> Vec<(PeerId, Multiaddr)> {
    relays
        .iter()
        .filter_map(|a| match peer_of(a) {
            Some(p) => Some((p, a.clone())),
            None => {
                warn!(%a, "--relay address does not end in /p2p/<peer id>; ignored");
                None
            }
        })
        .collect()
}

/// Our addresses and how others reach us.
pub(super) struct Nat {
    config: NatConfig,
    /// Concrete listen addresses (no relay circuits).
    listen_addrs: Vec<Multiaddr>,
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

impl Nat {
    pub(super) fn new(
        config: NatConfig,
        nat_tx: watch::Sender<NatInfo>,
        relay_candidates: Vec<(PeerId, Multiaddr)>,
    ) -> Self {
        Nat {
            reachability: if config.behind_nat {
                Reachability::Private
            } else {
                Reachability::Unknown
            },
            config,
            nat_tx,
            listen_addrs: Vec::new(),
            relay_candidates,
            relay_listeners: HashMap::new(),
            relay_addrs: Vec::new(),
            relay_peers: HashMap::new(),
            addrs_changed_at: None,
        }
    }

    /// Concrete listen addresses (not the relay circuits).
    pub(super) fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listen_addrs.clone()
    }

    /// When our addresses first changed since they were last announced.
    pub(super) fn addrs_changed_at(&self) -> Option<tokio::time::Instant> {
        self.addrs_changed_at
    }

    /// The changed addresses are being announced.
    pub(super) fn addrs_announced(&mut self) {
        self.addrs_changed_at = None;
    }

    /// Whether `peer` relays for us or we for it.
    pub(super) fn relay_involved(&self, peer: &PeerId) -> bool {
        self.relay_candidates.iter().any(|(p, _)| p == peer) || self.relay_peers.contains_key(peer)
    }

    /// The last connection to `peer` closed.
    pub(super) fn peer_gone(&mut self, peer: &PeerId) {
        self.relay_peers.remove(peer);
    }

    pub(super) fn addrs_changed(&mut self) {
        if self.addrs_changed_at.is_none() {
            self.addrs_changed_at = Some(tokio::time::Instant::now());
        }
    }

    pub(super) fn publish_nat_info(&mut self) {
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

    pub(super) fn on_new_listen_addr(&mut self, swarm: &mut Swarm<Behaviour>, address: Multiaddr) {
        if is_circuit(&address) {
            info!(%address, "reachable through a relay");
            if !self.relay_addrs.contains(&address) {
                self.relay_addrs.push(address);
            }
        } else if !self.listen_addrs.contains(&address) {
            self.listen_addrs.push(address);
            self.sync_relay_externals(swarm);
        }
        self.addrs_changed();
    }

    pub(super) fn on_expired_listen_addr(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        address: Multiaddr,
    ) {
        self.listen_addrs.retain(|a| a != &address);
        if is_circuit(&address) {
            self.relay_addrs.retain(|a| a != &address);
        }
        self.addrs_changed();
        self.sync_relay_externals(swarm);
    }

    pub(super) fn on_listener_closed(
        &mut self,
        listener_id: ListenerId,
        addresses: Vec<Multiaddr>,
        reason: Result<(), std::io::Error>,
    ) {
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

    /// `peer_id` told us its protocols: a bootstrap peer that speaks the
    /// hop protocol (first address `bootstrap_addr`) becomes a relay
    /// candidate.
    pub(super) fn on_identify(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer_id: PeerId,
        protocols: &[StreamProtocol],
        bootstrap_addr: Option<&Multiaddr>,
    ) {
        let known = self.relay_candidates.iter().any(|(p, _)| *p == peer_id);
        if protocols.contains(&relay::HOP_PROTOCOL_NAME)
            && let Some(addr) = bootstrap_addr
            && !known
        {
            info!(relay = %peer_id, "bootstrap peer is a relay");
            self.relay_candidates.push((peer_id, addr.clone()));
            self.maintain_relays(swarm);
        } else if known {
            // (Re)connected to a relay: reserve again now if the
            // reservation was lost, rather than at the next retry.
            self.maintain_relays(swarm);
        }
    }

    /// A relay server only serves reservations once it has an external
    /// address, and advertises exactly those to its clients. Without
    /// `--external-addr`, use the listen addresses — the non-loopback ones
    /// when there are any, so NAT'd peers are not told to dial 127.0.0.1 —
    /// and none once AutoNAT says nobody can dial them.
    fn sync_relay_externals(&mut self, swarm: &mut Swarm<Behaviour>) {
        if !self.config.relay_server || !self.config.external_addrs.is_empty() {
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
        let have: Vec<Multiaddr> = swarm.external_addresses().cloned().collect();
        for a in &want {
            if !have.contains(a) {
                swarm.add_external_address(a.clone());
            }
        }
        for a in have {
            if !is_circuit(&a) && self.listen_addrs.contains(&a) && !want.contains(&a) {
                swarm.remove_external_address(&a);
            }
        }
    }

    /// The directory entry's addresses, best first: confirmed external
    /// addresses (our public address, or our relay circuit), then relay
    /// addresses, then listen addresses — at most `MAX_ADDRS`, each once.
    pub(super) fn announced_addrs(&self, swarm: &Swarm<Behaviour>) -> Vec<String> {
        let me = *swarm.local_peer_id();
        let mut out: Vec<String> = Vec::new();
        let all = swarm
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
        self.config.behind_nat
            || !self.config.relays.is_empty()
            || self.reachability == Reachability::Private
    }

    pub(super) fn apply_reachability(&mut self, swarm: &mut Swarm<Behaviour>) {
        // A node others cannot dial is no use in their routing tables
        // (it would only slow their lookups); it still queries the DHT.
        let mode = if self.reachability == Reachability::Private {
            kad::Mode::Client
        } else {
            kad::Mode::Server
        };
        swarm.behaviour_mut().kad.set_mode(Some(mode));
        if self.reachability == Reachability::Private
            && self.config.relay_server
            && self.config.external_addrs.is_empty()
        {
            warn!(
                "relay server enabled but this node is not publicly reachable: not relaying (pass --external-addr if peers can reach it, or --no-relay-server)"
            );
        }
        self.sync_relay_externals(swarm);
        self.maintain_relays(swarm);
        self.publish_nat_info();
    }

    /// Reserve on relays while we need them; drop the reservations once
    /// AutoNAT finds us publicly reachable (unless forced).
    fn maintain_relays(&mut self, swarm: &mut Swarm<Behaviour>) {
        if !self.wants_relays() {
            if self.reachability == Reachability::Public && !self.relay_listeners.is_empty() {
                info!("publicly reachable: dropping relay reservations");
                for id in self.relay_listeners.keys().copied().collect::<Vec<_>>() {
                    swarm.remove_listener(id);
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
            match swarm.listen_on(circuit.clone()) {
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

    pub(super) fn on_relay_tick(&mut self, swarm: &mut Swarm<Behaviour>) {
        if self.wants_relays() && self.relay_candidates.is_empty() {
            warn!(
                reachability = %self.reachability,
                "not publicly reachable and no relay available: pass --relay or bootstrap to a node with --relay-server"
            );
        }
        self.maintain_relays(swarm);
    }

    pub(super) fn on_autonat(&mut self, swarm: &mut Swarm<Behaviour>, ev: autonat::Event) {
        match ev {
            autonat::Event::StatusChanged { old, new } => {
                info!(?old, ?new, "AutoNAT status changed");
                if self.config.behind_nat {
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
                    self.apply_reachability(swarm);
                }
            }
            autonat::Event::InboundProbe(e) => debug!(?e, "AutoNAT inbound probe"),
            autonat::Event::OutboundProbe(e) => debug!(?e, "AutoNAT outbound probe"),
        }
    }

    pub(super) fn on_relay_client(&mut self, ev: relay::client::Event) {
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

    pub(super) fn on_relay_server(&mut self, ev: relay::Event) {
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

/// DCUtR's outcome; on success, the peer whose relayed connection a direct
/// one can now replace.
pub(super) fn hole_punched(ev: dcutr::Event) -> Option<PeerId> {
    match ev.result {
        Ok(_) => {
            info!(peer = %ev.remote_peer_id, "hole punch succeeded: direct connection");
            Some(ev.remote_peer_id)
        }
        Err(e) => {
            info!(peer = %ev.remote_peer_id, "hole punch failed, the relay carries this connection: {e}");
            None
        }
    }
}
