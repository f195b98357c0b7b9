//! Bootstrap status on real libp2p hosts on loopback: each `--bootstrap`
//! address's cause of failure in words one acts on, readiness, and a
//! bootstrap peer that starts after the node that dials it.

mod common;

use std::time::Duration;

use common::*;
use tokio_util::sync::CancellationToken;
use xe_net::{BootstrapError, BootstrapStatus, Multiaddr, NetConfig, NetRoles, PeerId};

/// Bound on every wait here: several redial rounds (5 s each).
const LIMIT: Duration = Duration::from_secs(30);

/// Wait (bounded) until the node's first bootstrap entry satisfies `pred`.
async fn wait_bootstrap(
    node: &TestNode,
    what: &str,
    pred: impl Fn(&BootstrapStatus) -> bool,
) -> BootstrapStatus {
    let mut w = node.net.bootstrap();
    let v = tokio::time::timeout(LIMIT, w.wait_for(|v| v.first().is_some_and(&pred)))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "bootstrap status {what} within {LIMIT:?}: {:?}",
                node.net.readiness()
            )
        })
        .expect("host alive")
        .clone();
    v[0].clone()
}

/// A loopback TCP port nobody listens on (bound, then released).
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

async fn tcp_addr(node: &TestNode) -> Multiaddr {
    let addrs = node.net.p2p_addrs().await.expect("addrs");
    addrs.into_iter().next().expect("one listen address")
}

#[tokio::test]
async fn dead_port_is_reported_as_refused_and_not_ready() {
    let stranger = PeerId::random();
    let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{}/p2p/{stranger}", dead_port())
        .parse()
        .expect("addr");
    let b = node(vec![addr.clone()]).await;
    let st = wait_bootstrap(&b, "refused", |s| s.last_error.is_some()).await;
    assert_eq!(st.addr, addr);
    assert!(!st.connected);
    assert_eq!(st.last_error, Some(BootstrapError::Refused));
    let r = b.net.readiness();
    assert!(!r.is_ready());
    let reason = r.reason().expect("a reason");
    assert_eq!(
        reason,
        format!("no bootstrap peer connected: {addr}: connection refused (nothing listens there?)")
    );
}

#[tokio::test]
async fn wrong_peer_id_names_both_ids() {
    let a = node(vec![]).await;
    let real = tcp_addr(&a).await;
    let mut wrong = real.clone();
    wrong.pop();
    let claimed = PeerId::random();
    let wrong = wrong.with(xe_net::libp2p_protocol::P2p(claimed));
    let b = node(vec![wrong.clone()]).await;
    let st = wait_bootstrap(&b, "wrong peer id", |s| s.last_error.is_some()).await;
    assert_eq!(
        st.last_error,
        Some(BootstrapError::WrongPeerId {
            expected: claimed,
            found: a.net.peer_id(),
        })
    );
    let reason = b.net.readiness().reason().expect("not ready");
    assert!(
        reason.contains(&format!(
            "the node there has peer id {}, not {claimed} (wrong /p2p/ part?)",
            a.net.peer_id()
        )),
        "{reason}"
    );
    assert!(reason.contains(&wrong.to_string()), "{reason}");
}

#[tokio::test]
async fn correct_bootstrap_connects_and_is_ready() {
    let a = node(vec![]).await;
    assert!(a.net.readiness().is_ready(), "no bootstrap: ready at once");
    let b = node(vec![tcp_addr(&a).await]).await;
    let st = wait_bootstrap(&b, "connected", |s| s.connected).await;
    assert_eq!(st.last_error, None);
    assert!(b.net.readiness().is_ready());
    assert_eq!(b.net.readiness().reason(), None);
}

#[tokio::test]
async fn address_without_peer_id_is_reported_not_dialled() {
    let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{}", dead_port())
        .parse()
        .expect("addr");
    let b = node(vec![addr]).await;
    let st = b.net.bootstrap().borrow()[0].clone();
    assert_eq!(st.last_error, Some(BootstrapError::NoPeerId));
    assert!(!b.net.readiness().is_ready());
}

/// A provider started before its gateway: refused at first, then connected
/// on a redial once the gateway listens, and the failure is cleared.
#[tokio::test]
async fn bootstrap_peer_started_later_is_reached_on_a_redial() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = xe_net::load_or_create_keypair(&dir.path().join("p2p_key")).expect("key");
    let port = dead_port();
    let listen: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().expect("addr");
    let addr = listen
        .clone()
        .with(xe_net::libp2p_protocol::P2p(key.public().to_peer_id()));
    let b = node(vec![addr]).await;
    wait_bootstrap(&b, "refused", |s| {
        s.last_error == Some(BootstrapError::Refused)
    })
    .await;

    let store = xe_store::Store::open(&dir.path().join("db")).expect("store");
    let mut cfg = NetConfig::default();
    let roles = NetRoles::new(key);
    cfg.listen = vec![listen];
    let cancel = CancellationToken::new();
    let _late = xe_net::start(roles, cfg, store, cancel.clone())
        .await
        .expect("start");
    let st = wait_bootstrap(&b, "connected after a redial", |s| s.connected).await;
    assert_eq!(st.last_error, None, "a connection clears the old failure");
    assert!(b.net.readiness().is_ready());
    cancel.cancel();
}
