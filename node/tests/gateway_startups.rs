//! Connections that never authenticate must not lock real logins out
//! (issue 18.3): a bounded attack of silent sockets from one loopback
//! source address (127.0.0.2) against the real gateway, a real OpenSSH
//! login from another (127.0.0.1) meanwhile, and pacing of one source's
//! key exchanges.

mod common;

use std::net::SocketAddr;

use common::{Backend, CMD_LIMIT, Scene, run, text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use xe_node::gateway::{ConnectionRefusal, Startups};
use xe_node::limits::RateLimit;
use xe_testkit::require_openssh;

async fn connect_from(src: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::new(src.parse().expect("ip"), 0))
        .expect("bind a loopback source address");
    tokio::time::timeout(CMD_LIMIT, s.connect(to))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// The first bytes the gateway sends (its version line), or nothing if it
/// closes first.
async fn greeting(c: &mut TcpStream) -> Vec<u8> {
    let mut buf = vec![0u8; 64];
    match tokio::time::timeout(CMD_LIMIT, c.read(&mut buf)).await {
        Ok(Ok(n)) => buf[..n].to_vec(),
        Ok(Err(_)) => Vec::new(),
        Err(_) => panic!("the gateway neither greeted nor closed within {CMD_LIMIT:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_from_one_address_lock_no_one_out() {
    require_openssh!("silent_sockets_from_one_address_lock_no_one_out");
    let s = Scene::new(Backend::Sshd, |c| {
        c.max_connections = 5;
        c.startups_per_source = 4;
        // No random drops in this test: far below `start`.
        c.startups = Startups {
            start: 50,
            rate_percent: 30,
            full: 100,
        };
    })
    .await;
    // The attack: 12 sockets from one address that never speak.
    let mut silent = Vec::new();
    for _ in 0..12 {
        silent.push(connect_from("127.0.0.2", s.gw.addr).await);
    }
    let mut greeted = 0;
    for c in &mut silent {
        if greeting(c).await.starts_with(b"SSH-2.0-xe-gateway") {
            greeted += 1;
        }
    }
    assert_eq!(
        greeted, 4,
        "the source's share is 4 unauthenticated connections"
    );
    assert_eq!(s.gw.stats.refused(ConnectionRefusal::SourceStartups), 8);
    // Meanwhile, real logins from elsewhere go through — more of them than
    // there are session slots would be taken if silent sockets counted.
    for i in 0..3 {
        let mut cmd = s.gw_ssh(&s.lease.to_string(), s.key.path());
        cmd.arg("true");
        let out = run(&mut cmd, CMD_LIMIT).await;
        // `true` without an agent gets the gateway's help and exit 1: the
        // point is that it authenticated at all.
        let err = text(&out.stderr);
        assert!(
            !err.contains("Connection closed") && !err.contains("Permission denied"),
            "login {i} while 127.0.0.2 holds its share: {err}"
        );
    }
    assert!(s.gw.stats.auth_successes() >= 3);
    drop(silent);
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_one_source_is_paced_not_served_at_once() {
    let s = Scene::new(Backend::Sshd, |c| {
        c.connect_rate = RateLimit {
            burst: 2,
            per_second: 2.0,
        };
    })
    .await;
    // Six connections at once, each with a version line: the first two
    // get their key exchange at once, the other four wait their turn.
    let mut conns = Vec::new();
    for _ in 0..6 {
        let mut c = connect_from("127.0.0.3", s.gw.addr).await;
        c.write_all(b"SSH-2.0-probe\r\n").await.expect("write");
        conns.push(c);
    }
    for c in &mut conns {
        assert!(
            greeting(c).await.starts_with(b"SSH-2.0-xe-gateway"),
            "every paced connection is served in the end"
        );
    }
    assert_eq!(s.gw.stats.snapshot().paced, 4);
    s.gw.stop().await;
}
