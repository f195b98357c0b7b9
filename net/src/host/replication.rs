//! Replication in the event loop: gossip (publish, validate off the loop,
//! re-send what found no peer), the sync protocol, reconciliation starts,
//! and our directory entry. The protocols themselves are in
//! [`crate::replication`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use libp2p::{PeerId, Swarm, gossipsub, request_response};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use xe_store::{DirectoryEntry, EventId, LeaseHash, Store, Wallet};

use crate::behaviour::Behaviour;
use crate::replication::driver::Reconciler;
use crate::replication::{
    self, DIRECTORY_TOPIC, GossipMessage, LEASE_TOPIC, SyncRequest, SyncResponse, Verdict,
};
use crate::stats::NetStats;

/// Results that background work hands back to the event loop.
pub(super) enum Internal {
    Validated(gossipsub::MessageId, PeerId, Verdict),
    /// A pending event that applied after its gossip verdict: publish it.
    Publish(GossipMessage),
}

/// Most messages kept for re-publishing when no peer was subscribed yet.
const MAX_UNSENT: usize = 1024;

/// How long a pending gossip event's verdict is held back, waiting for
/// its create to apply. Gossipsub keeps an unvalidated message for its
/// history (5 heartbeats of 700 ms, 3.5 s) and forgets it after: an
/// Accept later than that forwards nothing. A create racing its own
/// settle through the mesh arrives within milliseconds.
const DEFER_FOR: Duration = Duration::from_secs(3);
/// Most verdicts held back at once; beyond, a pending event is ignored at
/// once (a flood of orphans must not grow this map).
const MAX_DEFERRED: usize = 4096;

/// A gossip event that went pending here, not yet reported.
struct Deferred {
    message: gossipsub::MessageId,
    peer: PeerId,
    event: EventId,
    since: Instant,
    /// The event, to publish if it applies after its verdict was given.
    full: Box<xe_store::LeaseEvent>,
}

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
    /// Pending gossip events by lease, reported once they apply (Accept:
    /// forwarded) or after [`DEFER_FOR`] (Ignore: not forwarded). An event
    /// whose lease this node has not seen is never passed on: a flood of
    /// orphans stops at the first hop.
    deferred: HashMap<LeaseHash, Vec<Deferred>>,
    n_deferred: usize,
    /// Watches of events ignored while pending, published if they apply
    /// later (validation of a backlog can outlast gossipsub's wait).
    late: Arc<tokio::sync::Semaphore>,
    announce: Option<Arc<Wallet>>,
    directory_ttl: Duration,
    /// [`crate::NetConfig::replicate`]: off, this host starts no
    /// reconciliation or directory sync of its own.
    replicate: bool,
}

impl Replication {
    pub(super) fn new(
        store: Store,
        stats: Arc<NetStats>,
        recon: Reconciler,
        announce: Option<Arc<Wallet>>,
        directory_ttl: Duration,
        replicate: bool,
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
            deferred: HashMap::new(),
            n_deferred: 0,
            late: Arc::new(tokio::sync::Semaphore::new(
                super::handle::MAX_PENDING_PUBLISH,
            )),
            announce,
            directory_ttl,
            replicate,
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
        if !self.replicate {
            return;
        }
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
        let (id, peer, verdict) = match msg {
            Internal::Validated(id, peer, verdict) => (id, peer, verdict),
            Internal::Publish(msg) => return self.publish(swarm, &msg),
        };
        match verdict {
            Verdict::Now(acceptance) => report(swarm, &self.stats, &id, &peer, acceptance),
            Verdict::Applied(lease) => {
                report(swarm, &self.stats, &id, &peer, Accept);
                self.resolve(swarm, &lease, false);
            }
            Verdict::Pending(lease, event, full) if self.n_deferred < MAX_DEFERRED => {
                self.deferred.entry(lease).or_default().push(Deferred {
                    message: id,
                    peer,
                    event,
                    since: Instant::now(),
                    full,
                });
                self.n_deferred += 1;
            }
            Verdict::Pending(..) => report(swarm, &self.stats, &id, &peer, Ignore),
        }
        self.expire_deferred(swarm);
    }

    /// Report the held-back events of `lease` that applied (Accept); with
    /// `all`, also the rest (Ignore).
    fn resolve(&mut self, swarm: &mut Swarm<Behaviour>, lease: &LeaseHash, all: bool) {
        let Some(list) = self.deferred.remove(lease) else {
            return;
        };
        let before = list.len();
        let mut kept = Vec::new();
        for d in list {
            // A read of one index entry; the event loop can afford it
            // for the few events that raced their create.
            let applied = matches!(self.store.event_status(&d.event), Ok(Some(true)));
            if applied {
                report(swarm, &self.stats, &d.message, &d.peer, Accept);
            } else if all {
                report(swarm, &self.stats, &d.message, &d.peer, Ignore);
                // Published by us if it applies later: its create may be
                // queued behind a flood's validation.
                super::handle::publish_when_applied(
                    self.store.clone(),
                    &self.late,
                    *d.full,
                    self.internal_tx.clone(),
                    Internal::Publish,
                );
            } else {
                kept.push(d);
            }
        }
        self.n_deferred -= before - kept.len();
        if !kept.is_empty() {
            self.deferred.insert(*lease, kept);
        }
    }

    /// Report every held-back event older than [`DEFER_FOR`].
    fn expire_deferred(&mut self, swarm: &mut Swarm<Behaviour>) {
        let old: Vec<LeaseHash> = self
            .deferred
            .iter()
            .filter(|(_, l)| l.iter().any(|d| d.since.elapsed() >= DEFER_FOR))
            .map(|(h, _)| *h)
            .collect();
        for h in old {
            self.resolve(swarm, &h, true);
        }
    }

    pub(super) fn on_gossip(&mut self, swarm: &mut Swarm<Behaviour>, ev: gossipsub::Event) {
        if self.n_deferred > 0 {
            self.expire_deferred(swarm);
        }
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
                    let verdict = replication::validate_gossip(
                        &store,
                        &stats,
                        &message.data,
                        &propagation_source,
                    );
                    let _ = tx.blocking_send(Internal::Validated(
                        message_id,
                        propagation_source,
                        verdict,
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

use gossipsub::MessageAcceptance::{Accept, Ignore};

fn report(
    swarm: &mut Swarm<Behaviour>,
    stats: &NetStats,
    id: &gossipsub::MessageId,
    peer: &PeerId,
    acceptance: gossipsub::MessageAcceptance,
) {
    if matches!(acceptance, gossipsub::MessageAcceptance::Reject) {
        stats.invalid_messages.fetch_add(1, Ordering::Relaxed);
    }
    // False when gossipsub no longer holds the message (a late verdict).
    let _ = swarm
        .behaviour_mut()
        .gossipsub
        .report_message_validation_result(id, peer, acceptance);
}
