//! The event loop: one task owns the swarm and `select!`s over commands,
//! swarm events and timers, handing each to the part that owns its state
//! (peers, dialling, NAT, replication) with `&mut swarm`.

use std::time::Duration;

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::swarm::SwarmEvent;
use libp2p::{PeerId, Swarm, identify, kad};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::addr::is_quic;
use super::bootstrap::BOOTSTRAP_REDIAL_INTERVAL;
use super::dial::Dialer;
use super::handle::Command;
use super::nat::{self, ANNOUNCE_DEBOUNCE, Nat};
use super::peers::{Conn, Peers};
use super::replication::Replication;
use crate::behaviour::{Behaviour, BehaviourEvent};
use crate::nat::RELAY_RETRY_INTERVAL;

/// The task that owns the swarm. It delegates each concern to the part
/// that owns its state, lending it the swarm.
pub(super) struct EventLoop {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) cmd_rx: mpsc::Receiver<Command>,
    /// Peers whose last tunnel ended (see [`super::peers::PeerTunnelSlot`]).
    pub(super) idle_rx: mpsc::Receiver<PeerId>,
    pub(super) peers: Peers,
    pub(super) dial: Dialer,
    pub(super) nat: Nat,
    pub(super) replication: Replication,
    pub(super) announce_interval: Duration,
    pub(super) resync_interval: Duration,
}

impl EventLoop {
    pub(super) async fn run(mut self, cancel: CancellationToken) {
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
                    self.dial.bootstrap.on_peer_connected(peer_id, true);
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
                if num_established == 0 {
                    self.dial.bootstrap.on_peer_connected(peer_id, false);
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
