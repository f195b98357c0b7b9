//! Replication in the event loop: gossip (publish, validate off the loop,
//! re-send what found no peer), the sync protocol, reconciliation starts,
//! and our directory entry. The protocols themselves are in
//! [`crate::replication`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use libp2p::{PeerId, Swarm, gossipsub, request_response};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use xe_store::{DirectoryEntry, Store, Wallet};

use super::NetStats;
use crate::behaviour::Behaviour;
use crate::replication::driver::Reconciler;
use crate::replication::{
    self, DIRECTORY_TOPIC, GossipMessage, LEASE_TOPIC, SyncRequest, SyncResponse,
};

/// Results that background work hands back to the event loop.
pub(super) enum Internal {
    Validated(gossipsub::MessageId, PeerId, gossipsub::MessageAcceptance),
}

/// Most messages kept for re-publishing when no peer was subscribed yet.
const MAX_UNSENT: usize = 1024;

fn topic_for(msg: &GossipMessage) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(match msg {
        GossipMessage::Event { .. } => LEASE_TOPIC,
        GossipMessage::Directory { .. } => DIRECTORY_TOPIC,
    })
}

/// What the event loop does to replicate: its gossip, sync requests and
/// reconciliation sessions, and the directory entry it announces.
pub(super) struct Replication {
    store: Store,
    stats: Arc<NetStats>,
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
    sync_requests: HashMap<request_response::OutboundRequestId, PeerId>,
    recon: Reconciler,
    /// Gossip that found no subscribed peer; re-sent when one subscribes.
    unsent: VecDeque<Vec<u8>>,
    announce: Option<Arc<Wallet>>,
    directory_ttl: Duration,
}

impl Replication {
    pub(super) fn new(
        store: Store,
        stats: Arc<NetStats>,
        recon: Reconciler,
        announce: Option<Arc<Wallet>>,
        directory_ttl: Duration,
    ) -> Self {
        let (internal_tx, internal_rx) = mpsc::channel(1024);
        Replication {
            store,
            stats,
            internal_tx,
            internal_rx,
            sync_requests: HashMap::new(),
            recon,
            unsent: VecDeque::new(),
            announce,
            directory_ttl,
        }
    }

    /// Whether this node announces a directory entry.
    pub(super) fn announces(&self) -> bool {
        self.announce.is_some()
    }

    /// The next result of background work (gossip validation).
    pub(super) async fn internal(&mut self) -> Option<Internal> {
        self.internal_rx.recv().await
    }

    pub(super) fn publish(&mut self, swarm: &mut Swarm<Behaviour>, msg: &GossipMessage) {
        let data = serde_json::to_vec(msg).expect("gossip messages serialise");
        let topic = topic_for(msg);
        match swarm.behaviour_mut().gossipsub.publish(topic, data.clone()) {
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

    fn flush_unsent(&mut self, swarm: &mut Swarm<Behaviour>) {
        let pending: Vec<Vec<u8>> = self.unsent.drain(..).collect();
        for data in pending {
            let Ok(msg) = serde_json::from_slice::<GossipMessage>(&data) else {
                continue;
            };
            self.publish(swarm, &msg);
        }
    }

    /// Sign and publish our directory entry with `addrs`.
    pub(super) fn announce(&mut self, swarm: &mut Swarm<Behaviour>, addrs: Vec<String>) {
        let Some(wallet) = self.announce.clone() else {
            return;
        };
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
            swarm.local_peer_id().to_string(),
            addrs,
            xe_store::now_secs().max(prev),
            self.directory_ttl.as_secs(),
        );
        match self.store.put_directory(&entry) {
            Ok(_) => self.publish(swarm, &GossipMessage::Directory { entry }),
            Err(e) => warn!("could not store own directory entry: {e}"),
        }
    }

    /// Anti-entropy with `peer`: events by reconciliation, directory
    /// entries by the sync protocol. Both ends see a connection open or
    /// close, so for those only the end with the smaller peer id
    /// reconciles (`either_end`: false): one session moves the events
    /// both ways, two would move them twice.
    pub(super) fn request_sync(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        either_end: bool,
    ) {
        if either_end || *swarm.local_peer_id() < peer {
            self.recon.start(peer);
        }
        let id = swarm
            .behaviour_mut()
            .sync
            .send_request(&peer, SyncRequest::Directory);
        self.sync_requests.insert(id, peer);
    }

    pub(super) fn on_internal(&mut self, swarm: &mut Swarm<Behaviour>, msg: Internal) {
        match msg {
            Internal::Validated(id, peer, acceptance) => {
                if matches!(acceptance, gossipsub::MessageAcceptance::Reject) {
                    self.stats.invalid_messages.fetch_add(1, Ordering::Relaxed);
                }
                let _ = swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&id, &peer, acceptance);
            }
        }
    }

    pub(super) fn on_gossip(&mut self, swarm: &mut Swarm<Behaviour>, ev: gossipsub::Event) {
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
            gossipsub::Event::Subscribed { .. } if !self.unsent.is_empty() => {
                self.flush_unsent(swarm)
            }
            _ => {}
        }
    }

    pub(super) fn on_sync(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        ev: request_response::Event<SyncRequest, SyncResponse>,
    ) {
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
                if swarm
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
