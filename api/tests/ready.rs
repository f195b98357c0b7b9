//! `GET /ready` and `GET /health` of in-process nodes on loopback, over
//! real HTTP: 503 naming each bootstrap address and its cause while no
//! bootstrap peer is connected, 200 once one is, and `/health` always 200.

mod common;

use std::net::SocketAddr;

use axum::http::StatusCode;
use common::*;
use xe_api::{ApiConfig, ApiContext};
use xe_net::{Multiaddr, PeerId};
use xe_node::Node;

/// GET `/ready` until `pred` holds on the answer; between tries, wait for
/// the node's bootstrap status to change (an event, not a sleep). Bounded
/// by [`LIMIT`].
async fn ready_until(node: &Node, api: SocketAddr, pred: impl Fn(&Resp) -> bool) -> Resp {
    let mut changes = node.net.bootstrap();
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        changes.borrow_and_update();
        let r = get(api, "/ready").await;
        if pred(&r) {
            return r;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if tokio::time::timeout(left, changes.changed()).await.is_err() {
            panic!(
                "/ready never matched within {LIMIT:?}; last: {} {}",
                r.status,
                r.text()
            );
        }
    }
}

fn failed(r: &Resp) -> bool {
    r.json()["bootstrap"][0]["last_error"].is_string()
}

fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test]
async fn dead_port_bootstrap_is_503_naming_the_address_and_refused() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let addr: Multiaddr = format!(
        "/ip4/127.0.0.1/tcp/{}/p2p/{}",
        dead_port(),
        PeerId::random()
    )
    .parse()
    .expect("addr");
    let mut node = start_node(dir.path(), false, vec![addr.clone()]).await;
    let api = start_api(ApiContext::from_node(&node), ApiConfig::default()).await;
    let r = ready_until(&node, api.addr, failed).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = r.json();
    assert_eq!(body["ready"], false);
    assert_eq!(
        body["reason"],
        format!("no bootstrap peer connected: {addr}: connection refused (nothing listens there?)")
    );
    assert_eq!(body["bootstrap"][0]["addr"], addr.to_string());
    assert_eq!(body["bootstrap"][0]["connected"], false);

    // Liveness stays 200 and carries the same bootstrap status.
    let h = get(api.addr, "/health").await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.json()["status"], "ok");
    assert_eq!(h.json()["bootstrap"], body["bootstrap"]);
    node.shutdown().await;
}

#[tokio::test]
async fn wrong_peer_id_bootstrap_is_503_naming_the_mismatch() {
    init_tracing();
    let a_dir = tempfile::tempdir().expect("tempdir");
    let mut a = start_node(a_dir.path(), false, vec![]).await;
    let mut addr = a.net.p2p_addrs().await.expect("addrs")[0].clone();
    addr.pop();
    let claimed = PeerId::random();
    let addr = addr.with(xe_net::libp2p_protocol::P2p(claimed));

    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = start_node(dir.path(), false, vec![addr.clone()]).await;
    let api = start_api(ApiContext::from_node(&node), ApiConfig::default()).await;
    let r = ready_until(&node, api.addr, failed).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let reason = r.json()["reason"].as_str().expect("reason").to_string();
    assert_eq!(
        reason,
        format!(
            "no bootstrap peer connected: {addr}: the node there has peer id {}, not {claimed} (wrong /p2p/ part?)",
            a.net.peer_id()
        )
    );
    node.shutdown().await;
    a.shutdown().await;
}

#[tokio::test]
async fn first_node_is_ready_and_a_bootstrapped_one_once_connected() {
    init_tracing();
    let a_dir = tempfile::tempdir().expect("tempdir");
    let mut a = start_node(a_dir.path(), false, vec![]).await;
    let a_api = start_api(ApiContext::from_node(&a), ApiConfig::default()).await;
    let r = get(a_api.addr, "/ready").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "no --bootstrap: ready once listening"
    );
    assert_eq!(r.json()["ready"], true);
    assert_eq!(r.json()["bootstrap"], serde_json::json!([]));

    let boot = a.net.p2p_addrs().await.expect("addrs");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = start_node(dir.path(), false, boot.clone()).await;
    let api = start_api(ApiContext::from_node(&node), ApiConfig::default()).await;
    let r = ready_until(&node, api.addr, |r| r.status == StatusCode::OK).await;
    let body = r.json();
    assert_eq!(body["ready"], true);
    assert!(body.get("reason").is_none(), "{body}");
    assert_eq!(body["bootstrap"][0]["addr"], boot[0].to_string());
    assert_eq!(body["bootstrap"][0]["connected"], true);
    assert_eq!(body["bootstrap"][0]["last_error"], serde_json::Value::Null);
    node.shutdown().await;
    a.shutdown().await;
}
