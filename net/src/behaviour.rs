//! The libp2p behaviours a node runs, and how each is configured.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, autonat, dcutr, gossipsub, identify, kad, ping, relay, request_response,
};
use sha2::{Digest, Sha256};

use crate::replication::{
    DIRECTORY_TOPIC, LEASE_TOPIC, MAX_GOSSIP_MESSAGE, SYNC_PROTOCOL, SyncRequest, SyncResponse,
};

/// Our own Kademlia protocol name, so we never join a foreign DHT.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/xe/kad/1.0.0");
/// Identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/xe/id/1.0.0";

/// All behaviours of an xe node.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) kad: kad::Behaviour<kad::store::MemoryStore>,
    pub(crate) gossipsub: gossipsub::Behaviour,
    pub(crate) sync: request_response::cbor::Behaviour<SyncRequest, SyncResponse>,
    pub(crate) stream: libp2p_stream::Behaviour,
    /// Dial and listen through relays (`/p2p-circuit` addresses).
    pub(crate) relay_client: relay::client::Behaviour,
    /// Circuit relay v2 server, when this node relays for others.
    pub(crate) relay: Toggle<relay::Behaviour>,
    /// Hole punching: upgrade relayed connections to direct ones.
    pub(crate) dcutr: Toggle<dcutr::Behaviour>,
    /// Are we publicly reachable? (Client and server.)
    pub(crate) autonat: autonat::Behaviour,
    /// Caps on inbound handshakes in flight and established inbound
    /// connections, per source and per peer.
    pub(crate) inbound: crate::inbound::InboundLimits,
}

fn gossipsub(key: &Keypair) -> Result<gossipsub::Behaviour, String> {
    let config = gossipsub::ConfigBuilder::default()
        // Nothing is forwarded until the store has validated it.
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(MAX_GOSSIP_MESSAGE)
        // Content-addressed ids: the same event from two peers is one message.
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::from(Sha256::digest(&m.data).to_vec())
        })
        .heartbeat_interval(Duration::from_millis(700))
        .build()
        .map_err(|e| e.to_string())?;
    let mut b =
        gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), config)?;
    // Penalise peers that forward invalid events. The other default
    // penalties are switched off: quiet topics must not look like
    // misbehaviour, and many peers share one address behind a NAT (and on
    // loopback), so IP colocation is no signal here.
    let mut params = gossipsub::PeerScoreParams {
        ip_colocation_factor_weight: 0.0,
        ..Default::default()
    };
    for topic in [LEASE_TOPIC, DIRECTORY_TOPIC] {
        params.topics.insert(
            gossipsub::IdentTopic::new(topic).hash(),
            gossipsub::TopicScoreParams {
                topic_weight: 1.0,
                time_in_mesh_weight: 0.0,
                first_message_deliveries_weight: 0.0,
                mesh_message_deliveries_weight: 0.0,
                mesh_failure_penalty_weight: 0.0,
                invalid_message_deliveries_weight: -100.0,
                invalid_message_deliveries_decay: 0.5,
                ..Default::default()
            },
        );
    }
    b.with_peer_score(params, gossipsub::PeerScoreThresholds::default())?;
    for topic in [LEASE_TOPIC, DIRECTORY_TOPIC] {
        b.subscribe(&gossipsub::IdentTopic::new(topic))
            .map_err(|e| e.to_string())?;
    }
    Ok(b)
}

impl Behaviour {
    /// Build every behaviour for `key`; `relay_client` comes from the
    /// swarm builder's relay transport.
    pub fn new(
        key: &Keypair,
        relay_client: relay::client::Behaviour,
        nat: &crate::nat::NatConfig,
        inbound: crate::inbound::InboundCaps,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let peer_id = key.public().to_peer_id();
        let mut kad = kad::Behaviour::with_config(
            peer_id,
            kad::store::MemoryStore::new(peer_id),
            kad::Config::new(KAD_PROTOCOL),
        );
        // Answer DHT queries even without a confirmed external address, so
        // loopback and LAN networks work; a node found to be behind NAT
        // switches to client mode (host.rs, `apply_reachability`).
        kad.set_mode(Some(kad::Mode::Server));
        let codec = crate::replication::sync_codec();
        Ok(Behaviour {
            identify: identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                    .with_agent_version(format!("xe/{}", env!("CARGO_PKG_VERSION"))),
            ),
            ping: ping::Behaviour::default(),
            kad,
            gossipsub: gossipsub(key)?,
            sync: request_response::Behaviour::with_codec(
                codec,
                [(SYNC_PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(30)),
            ),
            stream: libp2p_stream::Behaviour::new(),
            relay_client,
            relay: Toggle::from(
                nat.relay_server
                    .then(|| relay::Behaviour::new(peer_id, crate::nat::relay_server_config())),
            ),
            dcutr: Toggle::from(nat.hole_punching.then(|| dcutr::Behaviour::new(peer_id))),
            autonat: autonat::Behaviour::new(peer_id, crate::nat::autonat_config()),
            inbound: crate::inbound::InboundLimits::new(inbound),
        })
    }
}
