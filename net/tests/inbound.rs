//! One address opening TCP connections it never speaks on holds at most
//! its share of inbound handshakes (issue 18.6); honest peers still
//! connect meanwhile. Real libp2p hosts on loopback, raw sockets from
//! 127.0.0.2.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use xe_net::inbound::MAX_PENDING_INBOUND_PER_SOURCE;
use xe_net::libp2p_protocol as P;

async fn tcp_addr(node: &TestNode) -> SocketAddr {
    let addrs = node.net.p2p_addrs().await.expect("addrs");
    addrs
        .iter()
        .find_map(|a| {
            let mut ip = None;
            let mut port = None;
            for p in a.iter() {
                match p {
                    P::Ip4(i) => ip = Some(i),
                    P::Tcp(t) => port = Some(t),
                    _ => {}
                }
            }
            Some(SocketAddr::new(ip?.into(), port?))
        })
        .expect("a TCP listen address")
}

/// Whether the node closed `c` at once (refused) rather than keeping it
/// open waiting for a handshake that never comes. The node's handshake
/// timeout is far longer than the bound here.
async fn closed_at_once(c: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), c.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_from_one_address_hold_only_its_share_of_handshakes() {
    let target = node(vec![]).await;
    let addr = tcp_addr(&target).await;
    let mut silent = Vec::new();
    for _ in 0..MAX_PENDING_INBOUND_PER_SOURCE + 4 {
        let s = TcpSocket::new_v4().expect("socket");
        s.bind("127.0.0.2:0".parse().expect("addr")).expect("bind");
        silent.push(s.connect(addr).await.expect("connect"));
    }
    // All at once: the node also drops a handshake that stalls too long,
    // so looking at them one after the other would see those closes too.
    let verdicts = futures::future::join_all(silent.iter_mut().map(closed_at_once)).await;
    let refused = verdicts.iter().filter(|v| **v).count();
    assert_eq!(
        refused, 4,
        "the source's share is {MAX_PENDING_INBOUND_PER_SOURCE}"
    );
    // An honest peer (from 127.0.0.1) still gets in while they are held.
    let honest = node(target.net.p2p_addrs().await.expect("addrs")).await;
    wait_peers(&honest, 1).await;
    drop(silent);
}
