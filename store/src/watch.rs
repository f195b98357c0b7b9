//! Waiting for a lease to stop granting access: the one mechanism behind
//! "close what this lease holds when it ends" — the gateway's sessions, the
//! provider's tunnels, the HTTP API's tunnels.
//!
//! A lease ends by an event (settle, cancel, decline: the store wakes the
//! waiters of the leases a write changed) or by time (expiry: each waiter
//! sleeps until its lease's end). Waiters are kept per lease, so a write
//! wakes only those of the leases it touched, however many sessions are
//! open — a per-session subscription to the change feed would wake every
//! session for every change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::StoreError;
use crate::ids::LeaseHash;
use crate::record::{Inactive, LeaseRecord};

/// The longest single sleep towards an expiry; the state is looked at again
/// after it. Keeps `Instant` arithmetic far from overflow for absurd times.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// After a failed store read, how long before looking again.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// How long until unix second `at`, to the millisecond; never less than
/// [`MIN_SLEEP`], so a wake-up on the edge of a second cannot spin.
fn until(at: u64) -> Duration {
    let target = std::time::UNIX_EPOCH + Duration::from_secs(at);
    target
        .duration_since(std::time::SystemTime::now())
        .unwrap_or(Duration::ZERO)
        .clamp(MIN_SLEEP, MAX_SLEEP)
}

/// The shortest sleep towards an expiry.
const MIN_SLEEP: Duration = Duration::from_millis(20);

/// Waiters per lease.
#[derive(Default)]
pub(crate) struct Watchers {
    by_lease: Mutex<HashMap<LeaseHash, (Arc<Notify>, usize)>>,
}

/// One waiter's registration; leaves the table when dropped.
struct Watch<'a> {
    table: &'a Watchers,
    lease: LeaseHash,
    notify: Arc<Notify>,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut m = self.table.lock();
        if let Some((_, n)) = m.get_mut(&self.lease) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.lease);
            }
        }
    }
}

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseHash, (Arc<Notify>, usize)>> {
        self.by_lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn watch(&self, lease: LeaseHash) -> Watch<'_> {
        let mut m = self.lock();
        let (notify, n) = m
            .entry(lease)
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        *n += 1;
        let notify = notify.clone();
        drop(m);
        Watch {
            table: self,
            lease,
            notify,
        }
    }

    /// A write changed `lease`: its waiters look again.
    pub(crate) fn changed(&self, lease: &LeaseHash) {
        if let Some((notify, _)) = self.lock().get(lease) {
            notify.notify_waiters();
        }
    }

    /// Leases with at least one waiter (tests, diagnostics).
    pub(crate) fn waiting(&self) -> usize {
        self.lock().len()
    }

    /// The wait behind [`Store::until_inactive`](crate::Store::until_inactive):
    /// `read` reads `lease` as stored.
    pub(crate) async fn until_inactive(
        &self,
        lease: &LeaseHash,
        read: impl Fn() -> Result<Option<LeaseRecord>, StoreError>,
    ) -> Inactive {
        let watch = self.watch(*lease);
        loop {
            // Armed before the state is read, so a write that lands in
            // between still wakes it.
            let notified = watch.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake = match read() {
                Ok(None) => return Inactive::Expired,
                Ok(Some(rec)) => match rec.access() {
                    Err(why) => return why,
                    Ok(()) => rec.expires_at().map_or(MAX_SLEEP, until),
                },
                Err(e) => {
                    tracing::error!(lease = %lease.short(), error = %e, "store read failed while waiting for the lease to end; retrying");
                    RETRY_AFTER_ERROR
                }
            };
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(wake) => {}
            }
        }
    }
}
