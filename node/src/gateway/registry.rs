//! Lease → authenticated connections, so that a lease that ends takes its
//! connections with it.
//!
//! A connection registers *before* its authentication is accepted and then
//! re-reads the lease; the watcher removes entries *after* the store has
//! changed. So a settle that races an authentication is always seen by one
//! of the two.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use xe_store::{LeaseHash, Store};

#[derive(Default)]
struct Inner {
    by_lease: HashMap<LeaseHash, HashMap<u64, CancellationToken>>,
}

/// The shared table.
#[derive(Clone, Default)]
pub(crate) struct Registry {
    inner: Arc<Mutex<Inner>>,
}

/// Removes the registration when dropped.
pub(crate) struct Registration {
    registry: Registry,
    lease: LeaseHash,
    conn: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.remove(&self.lease, self.conn);
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves a plain map behind; keep
        // using it rather than poisoning every later connection.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register connection `conn` for `lease`; cancelling `kill` closes it.
    pub(crate) fn register(
        &self,
        lease: LeaseHash,
        conn: u64,
        kill: CancellationToken,
    ) -> Registration {
        self.lock()
            .by_lease
            .entry(lease)
            .or_default()
            .insert(conn, kill);
        Registration {
            registry: self.clone(),
            lease,
            conn,
        }
    }

    fn remove(&self, lease: &LeaseHash, conn: u64) {
        let mut g = self.lock();
        if let Some(m) = g.by_lease.get_mut(lease) {
            m.remove(&conn);
            if m.is_empty() {
                g.by_lease.remove(lease);
            }
        }
    }

    /// Close every connection of `lease`; returns how many there were.
    pub(crate) fn kill_lease(&self, lease: &LeaseHash) -> usize {
        let conns = self.lock().by_lease.remove(lease).unwrap_or_default();
        for token in conns.values() {
            token.cancel();
        }
        conns.len()
    }

    /// Leases with at least one connection.
    pub(crate) fn leases(&self) -> Vec<LeaseHash> {
        self.lock().by_lease.keys().copied().collect()
    }

    /// Number of registered connections (tests, diagnostics).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().by_lease.values().map(|m| m.len()).sum()
    }
}

/// Follow the store and close connections of leases that end. Returns when
/// `shutdown` is cancelled. `rx` must be subscribed before the gateway
/// accepts its first connection.
pub(crate) async fn watch_leases(
    store: Store,
    mut rx: tokio::sync::broadcast::Receiver<xe_store::LeaseChange>,
    registry: Registry,
    shutdown: CancellationToken,
) {
    loop {
        let change = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = rx.recv() => c,
        };
        match change {
            Ok(c) if c.new.is_final() => {
                let n = registry.kill_lease(&c.lease);
                if n > 0 {
                    tracing::info!(
                        lease = %c.lease.short(),
                        state = %c.new,
                        connections = n,
                        "lease ended; closing its SSH connections"
                    );
                }
            }
            Ok(_) => {}
            Err(RecvError::Lagged(missed)) => {
                // Missed changes: re-check every lease that has connections.
                tracing::warn!(
                    missed,
                    "lease change feed lagged; re-checking connected leases"
                );
                for lease in registry.leases() {
                    let ended = match store.lease(&lease) {
                        Ok(Some(rec)) => rec.access().is_err(),
                        Ok(None) => true,
                        Err(e) => {
                            tracing::error!(lease = %lease.short(), error = %e, "store read failed while re-checking");
                            false
                        }
                    };
                    if ended {
                        registry.kill_lease(&lease);
                    }
                }
            }
            // The store (and its sender) is gone: nothing more will change.
            Err(RecvError::Closed) => {
                shutdown.cancelled().await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_kill_and_drop() {
        let r = Registry::default();
        let lease = LeaseHash([1; 32]);
        let a = CancellationToken::new();
        let b = CancellationToken::new();
        let ga = r.register(lease, 1, a.clone());
        let gb = r.register(lease, 2, b.clone());
        assert_eq!(r.len(), 2);
        drop(gb);
        assert_eq!(r.len(), 1);
        assert!(!b.is_cancelled());
        assert_eq!(r.kill_lease(&lease), 1);
        assert!(a.is_cancelled());
        drop(ga);
        assert_eq!(r.len(), 0);
    }
}
