//! One client must not lock the API away from others (issue 18.1): a
//! bounded attack from real sockets on several loopback source addresses
//! (127.0.0.x), holding slow request bodies, against a real node's API.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use xe_api::{ApiConfig, ApiContext};

/// A connection from `src` (a 127.0.0.x address) to the API.
async fn connect_from(src: &str, api: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::new(src.parse::<IpAddr>().expect("ip"), 0))
        .expect("bind source address");
    tokio::time::timeout(LIMIT, s.connect(api))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Headers of a POST whose 100-byte body never comes, and its first byte.
async fn slow_post(src: &str, api: SocketAddr) -> TcpStream {
    let mut c = connect_from(src, api).await;
    c.write_all(b"POST /leases HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        .await
        .expect("write");
    c
}

/// Everything the server sends until it closes (bounded).
async fn read_all(mut c: TcpStream) -> String {
    let mut buf = Vec::new();
    tokio::time::timeout(LIMIT, c.read_to_end(&mut buf))
        .await
        .expect("server answered and closed in time")
        .expect("read");
    String::from_utf8_lossy(&buf).into_owned()
}

/// `GET /health` from `src`: the status line.
async fn health_from(src: &str, api: SocketAddr) -> String {
    let mut c = connect_from(src, api).await;
    c.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    read_all(c)
        .await
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_from_some_sources_lock_out_no_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = start_node(&dir.path().join("node"), false, vec![]).await;
    let config = ApiConfig {
        max_connections: 12,
        max_connections_per_source: 4,
        connection_reserve: 4,
        body_read_timeout: Duration::from_secs(2),
        ..ApiConfig::default()
    };
    let api = start_api(ApiContext::from_node(&node), config).await;

    // One source takes its share with bodies it never finishes…
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(slow_post("127.0.0.2", api.addr).await);
    }
    // …and its next connection is refused with the reason, at once — even
    // though it already sent its request (closing on unread data would
    // reset the connection and lose the answer).
    let refused = read_all(slow_post("127.0.0.2", api.addr).await).await;
    assert!(
        refused.starts_with("HTTP/1.1 503") && refused.contains("already holds 4 connections"),
        "{refused}"
    );
    // Everyone else still gets in.
    assert_eq!(health_from("127.0.0.3", api.addr).await, "HTTP/1.1 200 OK");

    // A second source fills up to the reserve (8 of 12 taken): beyond
    // that only sources holding nothing are let in.
    for _ in 0..4 {
        held.push(slow_post("127.0.0.4", api.addr).await);
    }
    let third: Vec<TcpStream> = vec![slow_post("127.0.0.5", api.addr).await];
    let refused = read_all(connect_from("127.0.0.5", api.addr).await).await;
    assert!(
        refused.starts_with("HTTP/1.1 503") && refused.contains("at its limit of"),
        "a source already holding one does not get a reserved slot: {refused}"
    );
    assert_eq!(
        health_from("127.0.0.6", api.addr).await,
        "HTTP/1.1 200 OK",
        "a newcomer gets a reserved slot"
    );

    // The bodies never came: each slow request ends with 408 and its
    // connection closes, giving the slot back.
    for c in held {
        let answer = read_all(c).await;
        assert!(
            answer.starts_with("HTTP/1.1 408")
                && answer.contains("did not arrive within 2 s of its headers"),
            "{answer}"
        );
    }
    drop(third);
    assert_eq!(health_from("127.0.0.2", api.addr).await, "HTTP/1.1 200 OK");
    assert!(api.handle.stats().bodies_too_slow() >= 8);
    assert!(api.handle.stats().connections_refused() >= 2);
    let metrics = get(api.addr, "/metrics").await.text();
    assert!(
        metrics.contains("xe_http_body_timeout_total")
            && metrics.contains("xe_http_connections_refused_total"),
        "{metrics}"
    );
    node.shutdown().await;
}
