//! NAT traversal: circuit relay v2 (server and client), DCUtR hole
//! punching and AutoNAT, and the settings and state that tie them together.
//!
//! How a provider with no public address and no open port becomes
//! reachable:
//!
//! 1. AutoNAT asks connected peers to dial it back. If nobody can, the node
//!    is [`Reachability::Private`] (or `--behind-nat` says so up front).
//! 2. A private node reserves a slot on its relays — the `--relay`
//!    addresses, else every bootstrap peer that speaks the relay hop
//!    protocol — by listening on `RELAY_ADDR/p2p-circuit`.
//! 3. Its directory entry then lists `RELAY_ADDR/p2p-circuit/p2p/ME`
//!    first; a gateway that is not already connected dials that, and the
//!    relay splices the two connections together.
//! 4. DCUtR tries to turn the relayed connection into a direct one (hole
//!    punching). If it succeeds, the relayed connection is kept until the
//!    tunnels on it have ended (an open SSH session survives the upgrade)
//!    and then closed, so later tunnels use the direct connection; if it
//!    fails, the relay carries the tunnels — which is why an xe relay's
//!    circuit limits are sized for SSH sessions, not for hole-punch
//!    signalling (see [`RELAY_MAX_CIRCUIT_DURATION`]).

use std::num::NonZeroU32;
use std::time::Duration;

use libp2p::{Multiaddr, autonat, relay};

/// How long a relay keeps one circuit open. libp2p's default is 2 minutes,
/// meant for DCUtR signalling only; a circuit carries the whole libp2p
/// connection between a gateway and a provider (every tunnel to that
/// provider, multiplexed), so cutting it cuts SSH sessions. Leases last at
/// most a year (`xe_store` limits), so a year and a day means the relay
/// never ends a session its lease still allows; settlement and expiry close
/// tunnels themselves. (The protocol carries this as u32 seconds.)
pub const RELAY_MAX_CIRCUIT_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// Bytes a relay forwards per circuit before cutting it: 0 = unlimited.
/// libp2p's default (128 KiB) would end an SSH session within seconds of a
/// file transfer; a byte cap cannot be chosen that fits `scp` of a disk
/// image and still means something. Operators who cannot afford to relay
/// run with `--no-relay-server`.
pub const RELAY_MAX_CIRCUIT_BYTES: u64 = 0;
/// Relayed connections a relay carries at once (libp2p default 16). Each is
/// one gateway–provider pair with any number of tunnels inside.
pub const RELAY_MAX_CIRCUITS: usize = 256;
/// Relayed connections per peer (libp2p default 4): a gateway reaching many
/// NAT'd providers through one relay needs one per provider.
pub const RELAY_MAX_CIRCUITS_PER_PEER: usize = 64;
/// NAT'd nodes one relay keeps reachable (libp2p default 128).
pub const RELAY_MAX_RESERVATIONS: usize = 1024;
/// A reservation lasts this long before the client renews it (at 3/4).
pub const RELAY_RESERVATION_DURATION: Duration = Duration::from_secs(3600);

/// Most relays a private node reserves on at once: each adds one or more
/// addresses to its directory entry, which holds at most
/// [`xe_store::directory::MAX_ADDRS`].
pub const MAX_RELAYS: usize = 3;
/// How often a private node retries relays it could not reserve on (or
/// whose reservation was lost with the connection).
pub const RELAY_RETRY_INTERVAL: Duration = Duration::from_secs(30);
/// Delay before the first AutoNAT probe: enough for identify to have run on
/// the bootstrap connections, short enough that a NAT'd provider is
/// reachable a few seconds after start.
pub const AUTONAT_BOOT_DELAY: Duration = Duration::from_secs(5);

/// Whether other peers can dial this node directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reachability {
    /// Not known yet (AutoNAT has not concluded).
    #[default]
    Unknown,
    /// AutoNAT confirmed a dial-back to one of our addresses.
    Public,
    /// Dial-backs failed, or `--behind-nat` said so.
    Private,
}

impl std::fmt::Display for Reachability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reachability::Unknown => "unknown",
            Reachability::Public => "public",
            Reachability::Private => "private",
        })
    }
}

/// NAT traversal settings of a host.
#[derive(Debug, Clone)]
pub struct NatConfig {
    /// Serve circuit relay v2 for other peers (`--relay-server`).
    pub relay_server: bool,
    /// Addresses other peers can reach this node at (`--external-addr`).
    /// A relay advertises these in reservations; if empty, a relay server
    /// advertises its listen addresses (non-loopback ones when it has any).
    pub external_addrs: Vec<Multiaddr>,
    /// Relays to reserve on (`--relay`), each ending in `/p2p/<peer id>`.
    /// Non-empty forces relay listening whatever AutoNAT says.
    pub relays: Vec<Multiaddr>,
    /// Treat this node as not publicly reachable from the start
    /// (`--behind-nat`): reserve on relays without waiting for AutoNAT.
    pub behind_nat: bool,
    /// Try DCUtR hole punching on relayed connections (on by default).
    pub hole_punching: bool,
}

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig {
            relay_server: false,
            external_addrs: Vec::new(),
            relays: Vec::new(),
            behind_nat: false,
            hole_punching: true,
        }
    }
}

/// What a host knows about its own reachability; see
/// [`crate::NetHandle::nat`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NatInfo {
    /// AutoNAT's verdict, or `private` when forced.
    pub reachability: Reachability,
    /// `/p2p-circuit` addresses this node is reachable at (active relay
    /// reservations), as announced in its directory entry.
    pub relay_addrs: Vec<String>,
}

/// New circuits one source peer may open in a burst (libp2p default 30,
/// refilled at one per 2 minutes). A gateway dials every circuit address a
/// provider announces at once (one per relay address; the losers close),
/// and reaches many providers, so the default throttles real use.
pub const RELAY_CIRCUIT_BURST_PER_PEER: u32 = 120;
/// One more circuit per source peer every this long.
pub const RELAY_CIRCUIT_REFILL_PER_PEER: Duration = Duration::from_secs(5);
/// Burst and refill per source IP (many peers share an IP behind a NAT).
pub const RELAY_CIRCUIT_BURST_PER_IP: u32 = 240;
/// One more circuit per source IP every this long.
pub const RELAY_CIRCUIT_REFILL_PER_IP: Duration = Duration::from_secs(2);

/// The relay server configuration described by the constants above.
/// Reservation rate limits stay at libp2p's defaults (30 per peer, then
/// one per 2 minutes; a reservation lasts an hour).
pub(crate) fn relay_server_config() -> relay::Config {
    let defaults = relay::Config::default();
    let config = relay::Config {
        max_reservations: RELAY_MAX_RESERVATIONS,
        reservation_duration: RELAY_RESERVATION_DURATION,
        reservation_rate_limiters: defaults.reservation_rate_limiters,
        max_circuits: RELAY_MAX_CIRCUITS,
        max_circuits_per_peer: RELAY_MAX_CIRCUITS_PER_PEER,
        max_circuit_duration: RELAY_MAX_CIRCUIT_DURATION,
        max_circuit_bytes: RELAY_MAX_CIRCUIT_BYTES,
        circuit_src_rate_limiters: Vec::new(),
        ..defaults
    };
    config
        .circuit_src_per_peer(
            NonZeroU32::new(RELAY_CIRCUIT_BURST_PER_PEER).expect("non-zero constant"),
            RELAY_CIRCUIT_REFILL_PER_PEER,
        )
        .circuit_src_per_ip(
            NonZeroU32::new(RELAY_CIRCUIT_BURST_PER_IP).expect("non-zero constant"),
            RELAY_CIRCUIT_REFILL_PER_IP,
        )
}

/// AutoNAT v1 configuration. `only_global_ips` is off: xe networks run on
/// LANs and in test namespaces, and the server only ever dials the
/// client's observed IP, so a private-range address is a fair probe.
pub(crate) fn autonat_config() -> autonat::Config {
    autonat::Config {
        boot_delay: AUTONAT_BOOT_DELAY,
        only_global_ips: false,
        // Answer more probes than the default 3 per second per peer: a
        // gateway is the probe server of every provider behind it.
        throttle_clients_global_max: 64,
        ..autonat::Config::default()
    }
}
