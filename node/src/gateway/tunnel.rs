//! The gateway's view of the overlay: something that opens a byte pipe to a
//! lease's VM sshd. The libp2p implementation lives above this module (it
//! wraps `xe-net`'s `/xe/tunnel/2.0.0` client); tests connect to a local
//! `sshd` over TCP.

use xe_store::LeaseRecord;

/// A byte pipe to a lease's VM sshd, already past any tunnel handshake:
/// the provider's own [`xe_net::VmConn`], boxed.
pub type VmStream = Box<dyn xe_net::VmConn>;

/// Why a tunnel could not be opened: a one-line reason meant for the
/// consumer's terminal and the gateway log, e.g. `provider 1a2b3c4d not
/// found in directory` or `provider refused: lease settled`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct TunnelDialError {
    reason: String,
}

/// Longest reason kept; longer ones are cut (a provider's error message is
/// untrusted text that ends up on a user's terminal).
const MAX_REASON_LEN: usize = 300;

impl TunnelDialError {
    /// A dial error with a human reason. Control characters (line breaks,
    /// escape sequences) are replaced so the reason stays one harmless line.
    pub fn new(reason: impl Into<String>) -> Self {
        let raw: String = reason.into();
        let mut reason: String = raw
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(MAX_REASON_LEN)
            .collect();
        if raw.chars().count() > MAX_REASON_LEN {
            reason.push('…');
        }
        let reason = reason.trim().to_string();
        TunnelDialError {
            reason: if reason.is_empty() {
                "tunnel failed (no reason given)".to_string()
            } else {
                reason
            },
        }
    }

    /// The one-line reason.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// Opens tunnels to the VM behind a lease.
#[async_trait::async_trait]
pub trait TunnelDialer: Send + Sync + 'static {
    /// Open a byte pipe to the lease's VM sshd (via the provider). The
    /// error carries a one-line human reason, e.g. `provider 1a2b3c4d not
    /// found in directory` or `provider refused: lease settled`.
    async fn open(&self, lease: &LeaseRecord) -> Result<VmStream, TunnelDialError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_one_safe_line() {
        let e = TunnelDialError::new("provider refused:\nlease \x1b[31msettled\r\n");
        assert_eq!(e.reason(), "provider refused: lease  [31msettled");
        assert!(!e.to_string().contains('\n'));
        let long = TunnelDialError::new("x".repeat(1000));
        assert!(long.reason().chars().count() <= MAX_REASON_LEN + 1);
        assert_eq!(
            TunnelDialError::new(" \n").reason(),
            "tunnel failed (no reason given)"
        );
    }
}
