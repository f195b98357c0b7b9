//! What a multiaddr is, as the host needs to know it: whose it is, which
//! transport, whether it is loopback or a relayed circuit, and in which
//! order a peer's addresses are tried.

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// The peer a multiaddr ends in (`…/p2p/<peer id>`): what a bootstrap
/// or relay address must name.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(p)) => Some(p),
        _ => None,
    }
}

/// Dial order: TCP, then QUIC, then relayed circuits.
pub(super) fn dial_rank(addr: &Multiaddr) -> u8 {
    if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        2
    } else {
        u8::from(is_quic(addr))
    }
}

/// Whether `addr` is a QUIC address.
pub(super) fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
}

/// Whether `addr` is a loopback address.
pub(super) fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

/// Whether `addr` is a relayed circuit (`…/p2p-circuit/…`).
pub(super) fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}
