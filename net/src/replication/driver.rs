//! Reconciliation sessions between hosts, on raw libp2p streams
//! (`/xe/recon/2.0.0`), outside the swarm's event loop: the loop only asks
//! for a session with a peer.
//!
//! - At most one outgoing session per peer; a request that comes while
//!   one runs makes it run once more when it ends, so nothing asked for is
//!   lost and no peer gets a pile of parallel sessions.
//! - Incoming sessions are answered by spawned tasks behind a semaphore
//!   (the inbound stream queue holds nothing: the accept loop only spawns);
//!   over the limit, the stream is dropped and the peer retries next round.
//! - Compaction of ended leases runs here too, at start and every
//!   [`COMPACT_INTERVAL`]: it changes the sync set, so it belongs with it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::PeerId;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use xe_store::Store;

use super::RECON_PROTOCOL;
use super::session::{self, Report, SessionError};
use crate::stats::NetStats;

/// Incoming sessions answered at once.
pub const MAX_INBOUND_SESSIONS: usize = 8;
/// Longest wait for a stream to open (`open_stream` can hang for ever
/// when its dial is dropped, libp2p #6157).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one session may run (a 100k-lease join takes well under this).
const SESSION_TIMEOUT: Duration = Duration::from_secs(600);

/// How often ended leases are compacted. Nodes run the same rule on their
/// own clocks; the interval bounds how long two nodes' sets differ by the
/// leases one of them has compacted and the other not yet.
pub const COMPACT_INTERVAL: Duration = Duration::from_secs(600);

/// How often pending events past their window are dropped: a small part
/// of the 15-minute window (`xe_store::pending::PENDING_WINDOW_SECS`), so
/// an orphan lives at most a minute longer than the rule says.
pub const EXPIRE_PENDING_INTERVAL: Duration = Duration::from_secs(60);

/// Compact leases that ended more than the store's retention window ago,
/// now and every [`COMPACT_INTERVAL`], and drop expired pending events
/// every [`EXPIRE_PENDING_INTERVAL`], until `cancel`.
pub async fn compact_periodically(store: Store, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(COMPACT_INTERVAL);
    let mut expire = tokio::time::interval(EXPIRE_PENDING_INTERVAL);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = expire.tick() => {
                let s = store.clone();
                match tokio::task::spawn_blocking(move || s.expire_pending(xe_store::now_secs())).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => tracing::info!(events = n, "dropped pending events past their window"),
                    Ok(Err(e)) => warn!("expiring pending events failed: {e}"),
                    Err(e) => warn!("expiring pending events: task failed: {e}"),
                }
                continue;
            }
            _ = tick.tick() => {}
        }
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.compact(xe_store::now_secs())).await {
            Ok(Ok(done)) if done.leases + done.events + done.tombstones > 0 => {
                tracing::info!(
                    leases = done.leases,
                    events = done.events,
                    tombstones = done.tombstones,
                    "compacted ended leases"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!("compaction failed: {e}"),
            Err(e) => warn!("compaction task failed: {e}"),
        }
    }
}

/// Whether a peer's session is running, and whether another was asked for.
type Running = Arc<Mutex<HashMap<PeerId, bool>>>;

/// Starts outgoing sessions.
#[derive(Clone)]
pub struct Reconciler {
    control: libp2p_stream::Control,
    store: Store,
    stats: Arc<NetStats>,
    running: Running,
    cancel: CancellationToken,
}

impl Reconciler {
    /// A reconciler for this host.
    pub fn new(
        control: libp2p_stream::Control,
        store: Store,
        stats: Arc<NetStats>,
        cancel: CancellationToken,
    ) -> Self {
        Reconciler {
            control,
            store,
            stats,
            running: Arc::default(),
            cancel,
        }
    }

    /// Reconcile with `peer` now, or again after the running session.
    pub fn start(&self, peer: PeerId) {
        {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(again) = running.get_mut(&peer) {
                *again = true;
                return;
            }
            running.insert(peer, false);
        }
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let r = tokio::select! {
                    () = me.cancel.cancelled() => break,
                    r = tokio::time::timeout(SESSION_TIMEOUT, me.once(peer)) => r,
                };
                match r {
                    Ok(Ok(report)) => debug!(%peer, ?report, "reconciled"),
                    Ok(Err(e)) => debug!(%peer, "reconciliation failed: {e}"),
                    Err(_) => warn!(%peer, "reconciliation took over {SESSION_TIMEOUT:?}; dropped"),
                }
                let mut running = me.running.lock().unwrap_or_else(|p| p.into_inner());
                match running.get_mut(&peer) {
                    Some(again) if *again => *again = false,
                    _ => {
                        running.remove(&peer);
                        break;
                    }
                }
            }
        });
    }

    async fn once(&self, peer: PeerId) -> Result<Report, SessionError> {
        let mut control = self.control.clone();
        let stream = tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, RECON_PROTOCOL))
            .await
            .map_err(|_| SessionError::Timeout(OPEN_TIMEOUT))?
            .map_err(|e| SessionError::Io(std::io::Error::other(e.to_string())))?;
        let mut io = stream.compat();
        let source = xe_store::Source::Peer(peer.to_string());
        let report =
            session::initiate_with(&mut io, &self.store, &self.stats.recon, source).await?;
        let _ = io.shutdown().await;
        self.stats
            .events_applied
            .fetch_add(report.applied as u64, Ordering::Relaxed);
        Ok(report)
    }
}

/// Answer incoming sessions until `cancel`.
pub async fn serve(
    mut control: libp2p_stream::Control,
    store: Store,
    stats: Arc<NetStats>,
    cancel: CancellationToken,
) {
    let mut incoming = match control.accept(RECON_PROTOCOL) {
        Ok(i) => i,
        Err(e) => {
            warn!("cannot answer reconciliation: {e}");
            return;
        }
    };
    let permits = Arc::new(Semaphore::new(MAX_INBOUND_SESSIONS));
    loop {
        let next = tokio::select! {
            () = cancel.cancelled() => break,
            n = incoming.next() => n,
        };
        let Some((peer, stream)) = next else { break };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(%peer, "too many reconciliation sessions; this one is refused");
            continue;
        };
        let (store, stats, cancel) = (store.clone(), stats.clone(), cancel.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut io = stream.compat();
            let r = tokio::select! {
                () = cancel.cancelled() => return,
                r = tokio::time::timeout(
                    SESSION_TIMEOUT,
                    session::respond_with(&mut io, &store, &stats.recon, xe_store::Source::Peer(peer.to_string())),
                ) => r,
            };
            match r {
                Ok(Ok(report)) => {
                    stats
                        .events_applied
                        .fetch_add(report.applied as u64, Ordering::Relaxed);
                    debug!(%peer, ?report, "answered reconciliation");
                }
                Ok(Err(e)) => debug!(%peer, "answering reconciliation failed: {e}"),
                Err(_) => debug!(%peer, "answering reconciliation timed out"),
            }
        });
    }
}
