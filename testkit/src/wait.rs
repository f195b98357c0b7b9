//! Bounded waits on real events, never sleeps: each fails the test with
//! what it waited for after [`LIMIT`].

use tokio::sync::{broadcast::error::RecvError, watch};
use xe_store::{LeaseHash, LeaseState, Store};

use crate::LIMIT;

/// Wait until `store` holds `lease` in `state`, woken by the store's change
/// notifications.
pub async fn wait_state(store: &Store, lease: &LeaseHash, state: LeaseState) {
    let mut rx = store.subscribe();
    let reached = |s: &Store| s.lease(lease).expect("read").map(|r| r.state()) == Some(state);
    let work = async {
        loop {
            if reached(store) {
                return;
            }
            // Any change (or a lag) is a reason to look again.
            match rx.recv().await {
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(e) => panic!("store closed: {e}"),
            }
        }
    };
    tokio::time::timeout(LIMIT, work).await.unwrap_or_else(|_| {
        panic!(
            "lease {} did not reach {state} within {LIMIT:?}",
            lease.short()
        )
    });
}

/// Wait until a host's peer-count watch (`NetHandle::peer_count()`) shows at
/// least `n` connected peers.
pub async fn wait_peers(mut peers: watch::Receiver<usize>, n: usize) {
    tokio::time::timeout(LIMIT, peers.wait_for(|c| *c >= n))
        .await
        .unwrap_or_else(|_| panic!("fewer than {n} peers connected within {LIMIT:?}"))
        .expect("host alive (peer watch open)");
}
