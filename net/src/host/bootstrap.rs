//! Bootstrap peers as a person sees them: for each `--bootstrap` address,
//! whether its peer is connected and why the last dial to it failed, in
//! words one can act on. The event loop feeds dial results in; the state
//! is published on a watch ([`crate::NetHandle::bootstrap`]) that the HTTP
//! API's `/ready` and the start-up warning read. Whether the node is ready
//! is decided in one place, [`Readiness`].

use std::error::Error as StdError;
use std::io;
use std::time::Duration;

use libp2p::core::transport::TransportError;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::DialError;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::addr::peer_of;

/// How often bootstrap peers we lost are dialled again. A node whose only
/// peer restarted (a provider behind NAT and its relay, say) must find its
/// way back by itself; a failed dial is one TCP connect, cheap at this rate.
pub(super) const BOOTSTRAP_REDIAL_INTERVAL: Duration = Duration::from_secs(5);

/// How long after start a node given bootstrap peers waits for one of them
/// before it warns, naming each address and its cause. Long enough for a
/// slow first dial across the internet (a TCP connect plus noise and yamux
/// is a few round trips), short enough that a typo is reported while the
/// operator still watches the terminal.
pub const BOOTSTRAP_WARN_AFTER: Duration = Duration::from_secs(10);

/// Why the last dial to a bootstrap address failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    /// The address does not end in `/p2p/<peer id>`, so it is never dialled.
    #[error("the address does not end in /p2p/<peer id>, so it is not dialled")]
    NoPeerId,
    /// Something answered, but with another identity than the `/p2p/` part.
    #[error("the node there has peer id {found}, not {expected} (wrong /p2p/ part?)")]
    WrongPeerId {
        /// The peer id in the address.
        expected: PeerId,
        /// The peer id the node there proved it holds.
        found: PeerId,
    },
    /// The `/p2p/` part is this node's own id.
    #[error("that is this node's own peer id (bootstrap to another node)")]
    OwnPeerId,
    /// TCP RST: the host is up, no process listens on the port.
    #[error("connection refused (nothing listens there?)")]
    Refused,
    /// No answer at all.
    #[error("timed out (host down, or a firewall drops the packets?)")]
    TimedOut,
    /// No route to the host or network.
    #[error("{0} (no route to that address?)")]
    Unreachable(String),
    /// None of this node's transports can dial the address.
    #[error(
        "this node cannot dial that kind of address (expected /ip4|/ip6|/dns/…/tcp/PORT or …/udp/PORT/quic-v1, then /p2p/<peer id>)"
    )]
    Unsupported,
    /// Anything else, as the innermost error that says what went wrong.
    #[error("{0}")]
    Other(String),
}

impl BootstrapError {
    /// The cause of one address's failed transport dial: the innermost
    /// error that says something, since libp2p's nesting (DNS, TCP, the
    /// upgrade) repeats the same cause at every level.
    fn from_transport(e: &TransportError<io::Error>) -> BootstrapError {
        match e {
            TransportError::MultiaddrNotSupported(_) => BootstrapError::Unsupported,
            TransportError::Other(e) => classify(e),
        }
    }
}

/// A failed dial in a few words: each distinct cause once, with how many
/// of the peer's addresses it applies to. libp2p's own text lists every
/// address with its nested transport errors, the cause repeated at every
/// level — hundreds of characters for one "refused".
pub(crate) fn dial_cause(error: &DialError) -> String {
    match error {
        DialError::Transport(errs) => {
            let mut causes: Vec<(String, usize)> = Vec::new();
            for (_, e) in errs {
                let c = BootstrapError::from_transport(e).to_string();
                match causes.iter_mut().find(|(k, _)| *k == c) {
                    Some((_, n)) => *n += 1,
                    None => causes.push((c, 1)),
                }
            }
            let said: Vec<String> = causes
                .into_iter()
                .map(|(c, n)| {
                    if n > 1 {
                        format!("{c} (at {n} addresses)")
                    } else {
                        c
                    }
                })
                .collect();
            if said.is_empty() {
                "no address could be dialled".to_string()
            } else {
                said.join("; ")
            }
        }
        DialError::WrongPeerId { obtained, .. } => format!(
            "the node at its address has another peer id ({obtained}): the provider moved or its entry is stale"
        ),
        DialError::NoAddresses => "no known address".to_string(),
        e => e.to_string(),
    }
}

/// Walk `e`'s chain (looking inside `io::Error`s too, whose `source()`
/// skips the error they wrap) for an I/O kind we have words for; else the
/// innermost message.
fn classify(e: &io::Error) -> BootstrapError {
    let mut innermost = e.to_string();
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        let next = if let Some(io) = err.downcast_ref::<io::Error>() {
            if let Some(found) = by_kind(io.kind(), io) {
                return found;
            }
            match io.get_ref() {
                Some(inner) => Some(inner as &(dyn StdError + 'static)),
                None => io.source(),
            }
        } else {
            err.source()
        };
        if next.is_none() {
            innermost = err.to_string();
        }
        cur = next;
    }
    // libp2p's transparent wrappers (DNS, `Either`) print the OS error but
    // hand out only its source, so the `io::Error` itself may never show up
    // in the chain: recognise its text as the OS's own for an errno.
    if let Some(os) = (1..256)
        .map(io::Error::from_raw_os_error)
        .find(|os| os.to_string() == innermost)
        && let Some(found) = by_kind(os.kind(), &os)
    {
        return found;
    }
    BootstrapError::Other(innermost)
}

fn by_kind(kind: io::ErrorKind, e: &io::Error) -> Option<BootstrapError> {
    match kind {
        io::ErrorKind::ConnectionRefused => Some(BootstrapError::Refused),
        io::ErrorKind::TimedOut => Some(BootstrapError::TimedOut),
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            Some(BootstrapError::Unreachable(e.to_string()))
        }
        _ => None,
    }
}

/// One `--bootstrap` address and how it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapStatus {
    /// The address as given (ending in `/p2p/<peer id>`).
    pub addr: Multiaddr,
    /// Its peer id, if the address has one.
    pub peer: Option<PeerId>,
    /// Whether this node is connected to that peer now (over any
    /// connection, inbound ones included).
    pub connected: bool,
    /// Why the last dial to this address failed, since the peer was last
    /// connected (`None`: no failure since, or no answer yet).
    pub last_error: Option<BootstrapError>,
}

/// Whether a node is ready to serve: every listener is up (a host exists
/// only once they are) and, if it was given bootstrap peers, one of them is
/// connected. The first node of a network has none and is ready at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Each bootstrap address's status, in the order given.
    pub bootstrap: Vec<BootstrapStatus>,
}

impl Readiness {
    /// Whether the node is ready.
    pub fn is_ready(&self) -> bool {
        self.bootstrap.is_empty() || self.bootstrap.iter().any(|b| b.connected)
    }

    /// Why the node is not ready (`None` when it is), e.g. `no bootstrap
    /// peer connected: /ip4/…/p2p/…: connection refused (nothing listens
    /// there?)`, each address with its last cause.
    pub fn reason(&self) -> Option<String> {
        if self.is_ready() {
            return None;
        }
        let each: Vec<String> = self
            .bootstrap
            .iter()
            .map(|b| match &b.last_error {
                Some(e) => format!("{}: {e}", b.addr),
                None => format!("{}: no answer yet (still dialling)", b.addr),
            })
            .collect();
        Some(format!("no bootstrap peer connected: {}", each.join("; ")))
    }
}

/// The bootstrap addresses' state, owned by the event loop's dialer.
pub(super) struct Bootstrap {
    entries: Vec<BootstrapStatus>,
    tx: watch::Sender<Vec<BootstrapStatus>>,
}

/// The address without a trailing `/p2p/…`: libp2p reports dialled
/// addresses with or without it.
fn without_p2p(addr: &Multiaddr) -> Multiaddr {
    let mut a = addr.clone();
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

impl Bootstrap {
    pub(super) fn new(addrs: &[Multiaddr]) -> (Bootstrap, watch::Receiver<Vec<BootstrapStatus>>) {
        let entries: Vec<BootstrapStatus> = addrs
            .iter()
            .map(|addr| {
                let peer = peer_of(addr);
                BootstrapStatus {
                    addr: addr.clone(),
                    peer,
                    connected: false,
                    last_error: None,
                }
            })
            .collect();
        let (tx, rx) = watch::channel(entries.clone());
        let mut b = Bootstrap { entries, tx };
        for i in 0..b.entries.len() {
            if b.entries[i].peer.is_none() {
                b.record(i, BootstrapError::NoPeerId);
            }
        }
        b.publish();
        (b, rx)
    }

    fn publish(&self) {
        self.tx.send_if_modified(|v| {
            let changed = *v != self.entries;
            if changed {
                v.clone_from(&self.entries);
            }
            changed
        });
    }

    /// Note a failure of entry `i`: a warning the first time and whenever
    /// the cause changes, a debug line when a redial fails the same way.
    fn record(&mut self, i: usize, err: BootstrapError) {
        let e = &mut self.entries[i];
        if e.last_error.as_ref() == Some(&err) {
            debug!("bootstrap {} failed again: {err}", e.addr);
        } else {
            warn!("bootstrap {} failed: {err}", e.addr);
            e.last_error = Some(err);
        }
    }

    /// A dial to `peer` could not even start.
    pub(super) fn on_dial_not_started(&mut self, peer: PeerId, error: &DialError) {
        if matches!(error, DialError::DialPeerConditionFalse(_)) {
            return; // connected or already dialling: nothing failed
        }
        self.on_dial_error(Some(peer), error);
    }

    /// A dial (ours or anyone's) failed: note it on each bootstrap address
    /// it concerns.
    pub(super) fn on_dial_error(&mut self, peer: Option<PeerId>, error: &DialError) {
        let Some(peer) = peer else { return };
        let mine: Vec<usize> = (0..self.entries.len())
            .filter(|&i| self.entries[i].peer == Some(peer))
            .collect();
        if mine.is_empty() {
            return;
        }
        let find = |entries: &[BootstrapStatus], addr: &Multiaddr| {
            let addr = without_p2p(addr);
            mine.iter()
                .copied()
                .find(|&i| without_p2p(&entries[i].addr) == addr)
        };
        match error {
            DialError::Transport(errs) => {
                for (addr, e) in errs {
                    if let Some(i) = find(&self.entries, addr) {
                        self.record(i, BootstrapError::from_transport(e));
                    }
                }
            }
            DialError::WrongPeerId { obtained, address } => {
                let i = find(&self.entries, address).unwrap_or(mine[0]);
                let err = BootstrapError::WrongPeerId {
                    expected: peer,
                    found: *obtained,
                };
                self.record(i, err);
            }
            DialError::LocalPeerId { .. } => {
                for i in mine {
                    self.record(i, BootstrapError::OwnPeerId);
                }
            }
            DialError::Denied { cause } => {
                let err = BootstrapError::Other(format!("refused by this node: {cause}"));
                for i in mine {
                    self.record(i, err.clone());
                }
            }
            // Aborted (shutdown), a condition that was false, or no
            // address left to try: nothing about the address itself.
            DialError::Aborted | DialError::DialPeerConditionFalse(_) | DialError::NoAddresses => {
                debug!(%peer, "bootstrap dial ended: {error}");
            }
        }
        self.publish();
    }

    /// `peer` is connected (first connection) or gone (last one closed).
    pub(super) fn on_peer_connected(&mut self, peer: PeerId, connected: bool) {
        for e in self.entries.iter_mut().filter(|e| e.peer == Some(peer)) {
            if connected && !e.connected && e.last_error.is_some() {
                info!("bootstrap {} connected", e.addr);
            }
            e.connected = connected;
            if connected {
                e.last_error = None;
            }
        }
        self.publish();
    }
}

/// Warn once if no bootstrap peer is connected [`BOOTSTRAP_WARN_AFTER`]
/// after start, naming each address and its cause. The node keeps
/// running and redialling: a provider may be started before its gateway.
pub(super) async fn warn_if_unconnected(
    mut rx: watch::Receiver<Vec<BootstrapStatus>>,
    after: Duration,
    cancel: CancellationToken,
) {
    if rx.borrow().is_empty() {
        return;
    }
    let connected = tokio::select! {
        () = cancel.cancelled() => return,
        r = tokio::time::timeout(after, rx.wait_for(|v| v.iter().any(|b| b.connected))) => r.is_ok(),
    };
    if connected {
        return;
    }
    let readiness = Readiness {
        bootstrap: rx.borrow().clone(),
    };
    if let Some(reason) = readiness.reason() {
        warn!(
            "{reason} — {} s after start; still retrying every {} s (is the address in --bootstrap right, and is that node running?)",
            after.as_secs(),
            BOOTSTRAP_REDIAL_INTERVAL.as_secs()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_is_found_inside_wrapped_io_errors() {
        let inner = io::Error::from(io::ErrorKind::ConnectionRefused);
        let wrapped = io::Error::other(inner);
        let twice = io::Error::other(wrapped);
        assert_eq!(classify(&twice), BootstrapError::Refused);
    }

    /// What libp2p's transparent wrappers leave: the OS error's text.
    #[test]
    fn refused_is_found_by_the_os_errors_text() {
        let text = io::Error::from(io::ErrorKind::ConnectionRefused);
        let os = (1..256)
            .map(io::Error::from_raw_os_error)
            .find(|e| e.kind() == text.kind())
            .expect("an errno for ECONNREFUSED");
        let wrapped = io::Error::other(os.to_string());
        assert_eq!(classify(&wrapped), BootstrapError::Refused);
    }

    #[test]
    fn other_errors_keep_only_the_innermost_message() {
        let wrapped = io::Error::other(io::Error::other("handshake failed: bad frame"));
        assert_eq!(
            classify(&io::Error::other(wrapped)),
            BootstrapError::Other("handshake failed: bad frame".into())
        );
    }

    #[test]
    fn ready_without_bootstrap_and_reason_names_each_address() {
        assert!(Readiness { bootstrap: vec![] }.is_ready());
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/9".parse().expect("addr");
        let r = Readiness {
            bootstrap: vec![BootstrapStatus {
                addr: addr.clone(),
                peer: None,
                connected: false,
                last_error: Some(BootstrapError::Refused),
            }],
        };
        assert!(!r.is_ready());
        assert_eq!(
            r.reason().as_deref(),
            Some(
                "no bootstrap peer connected: /ip4/127.0.0.1/tcp/9: connection refused (nothing listens there?)"
            )
        );
    }
}
