//! `/xe/tunnel/2.0.0` between real libp2p hosts on loopback.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use xe_net::tunnel::{MAX_ERROR_LEN, STATUS_ERR, TUNNEL_PROTOCOL};
use xe_net::{OverlayCipher, PeerId, TunnelError};
use xe_store::{LeaseHash, Store, Wallet};

struct Pair {
    provider: TestNode,
    client: TestNode,
    provider_wallet: Wallet,
    consumer: Wallet,
}

async fn pair(backend: std::net::SocketAddr, handshake: Duration) -> Pair {
    pair_with(backend, handshake, &["/ip4/127.0.0.1/tcp/0"], |_| {}).await
}

/// As [`pair`], with the client node offering only `client_cipher`.
async fn pair_with_client_cipher(
    backend: std::net::SocketAddr,
    handshake: Duration,
    client_cipher: OverlayCipher,
) -> Pair {
    pair_with(backend, handshake, &["/ip4/127.0.0.1/tcp/0"], |c| {
        c.overlay_cipher = client_cipher;
    })
    .await
}

/// A provider listening on `provider_listen`, and a client bootstrapped to
/// all its addresses, then changed by `client`.
async fn pair_with(
    backend: std::net::SocketAddr,
    handshake: Duration,
    provider_listen: &[&str],
    client: impl FnOnce(&mut xe_net::NetConfig),
) -> Pair {
    let provider_wallet = Wallet::from_seed([2; 32]);
    let consumer = Wallet::from_seed([1; 32]);
    let store = Store::temporary().expect("store");
    let validator = Arc::new(Provider {
        store: store.clone(),
        me: provider_wallet.address(),
        backend,
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let key = xe_net::load_or_create_keypair(&dir.path().join("k")).expect("key");
    let mut cfg = xe_net::NetConfig {
        listen: provider_listen
            .iter()
            .map(|a| a.parse().expect("addr"))
            .collect(),
        ..Default::default()
    };
    cfg.tunnel.handshake_timeout = handshake;
    let mut roles = xe_net::NetRoles::new(key);
    roles.validator = Some(validator);
    let cancel = tokio_util::sync::CancellationToken::new();
    let net = xe_net::start(roles, cfg, store.clone(), cancel.clone())
        .await
        .expect("start");
    let provider = TestNode {
        net: net.handle,
        store,
        cancel,
        tasks: net.tasks,
        _dir: dir,
    };
    let client = node_with(provider.net.p2p_addrs().await.expect("addrs"), client).await;
    wait_peers(&client, 1).await;
    Pair {
        provider,
        client,
        provider_wallet,
        consumer,
    }
}

impl Pair {
    async fn open(&self, lease: &LeaseHash) -> Result<xe_net::TunnelStream, TunnelError> {
        self.client
            .net
            .open_tunnel(self.provider.net.peer_id(), vec![], lease)
            .await
    }
}

#[tokio::test]
async fn handshake_ok_then_bytes_flow_and_half_close_propagates() {
    let p = pair(echo_backend().await, Duration::from_secs(30)).await;
    let lease = accepted_lease(&p.provider.store, &p.consumer, &p.provider_wallet, 1);
    let mut t = p.open(&lease).await.expect("tunnel");
    t.write_all(b"hello through the overlay")
        .await
        .expect("write");
    // Half-close our side: the echo backend sees EOF, finishes, closes.
    t.shutdown().await.expect("shutdown");
    let mut back = Vec::new();
    t.read_to_end(&mut back).await.expect("read to EOF");
    assert_eq!(back, b"hello through the overlay");
    assert_eq!(
        p.provider.net.registry().count_for(&lease),
        0,
        "registry cleaned up"
    );
}

#[tokio::test]
async fn each_refusal_surfaces_the_providers_message() {
    let p = pair(echo_backend().await, Duration::from_secs(30)).await;
    // Unknown lease.
    let e = p.open(&LeaseHash([9; 32])).await.unwrap_err();
    assert!(
        matches!(&e, TunnelError::Refused(m) if m.contains("unknown lease")),
        "{e}"
    );
    // Settled lease.
    let lease = accepted_lease(&p.provider.store, &p.consumer, &p.provider_wallet, 2);
    p.provider
        .store
        .apply_event(&xe_store::LeaseEvent::settle(
            &p.consumer,
            lease,
            xe_store::now_secs(),
        ))
        .expect("settle");
    let e = p.open(&lease).await.unwrap_err();
    assert!(
        matches!(&e, TunnelError::Refused(m) if m == "lease is settled"),
        "{e}"
    );
    // A lease for another provider.
    let other = Wallet::from_seed([8; 32]);
    let foreign = accepted_lease(&p.provider.store, &p.consumer, &other, 3);
    let e = p.open(&foreign).await.unwrap_err();
    assert!(
        matches!(&e, TunnelError::Refused(m) if m.contains("not the provider of lease")),
        "{e}"
    );
    // Backend down: the dial error is reported.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    };
    let p2 = pair(dead, Duration::from_secs(30)).await;
    let lease = accepted_lease(&p2.provider.store, &p2.consumer, &p2.provider_wallet, 4);
    let e = p2.open(&lease).await.unwrap_err();
    assert!(
        matches!(&e, TunnelError::Refused(m) if m.contains("refused")),
        "{e}"
    );
}

#[tokio::test]
async fn peer_without_the_protocol_is_reported_unsupported() {
    let a = node(vec![]).await;
    let b = node(a.net.p2p_addrs().await.expect("addrs")).await;
    wait_peers(&b, 1).await;
    let e = b
        .net
        .open_tunnel(a.net.peer_id(), vec![], &LeaseHash([1; 32]))
        .await
        .unwrap_err();
    assert!(matches!(e, TunnelError::Unsupported(_)), "{e}");
}

#[tokio::test]
async fn unknown_peer_is_not_found() {
    let a = node(vec![]).await;
    let stranger = libp2p_identity_peer();
    let e = a
        .net
        .open_tunnel(stranger, vec![], &LeaseHash([1; 32]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            TunnelError::PeerNotFound(_) | TunnelError::DialFailed { .. }
        ),
        "{e}"
    );
}

fn libp2p_identity_peer() -> PeerId {
    libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id()
}

#[tokio::test]
async fn error_message_is_capped_at_4k_on_the_client() {
    // A hostile "provider" that answers 0x01 and then 64 KiB of text.
    let hostile = node(vec![]).await;
    let mut incoming = hostile
        .net
        .control()
        .accept(TUNNEL_PROTOCOL)
        .expect("accept");
    tokio::spawn(async move {
        use futures::StreamExt;
        while let Some((_, s)) = incoming.next().await {
            tokio::spawn(async move {
                let mut s = tokio_util::compat::FuturesAsyncReadCompatExt::compat(s);
                let mut h = [0u8; 32];
                let _ = s.read_exact(&mut h).await;
                let mut out = vec![STATUS_ERR];
                out.extend(std::iter::repeat_n(b'x', 64 * 1024));
                let _ = s.write_all(&out).await;
                let _ = s.shutdown().await;
            });
        }
    });
    let c = node(hostile.net.p2p_addrs().await.expect("addrs")).await;
    wait_peers(&c, 1).await;
    let e = c
        .net
        .open_tunnel(hostile.net.peer_id(), vec![], &LeaseHash([1; 32]))
        .await
        .unwrap_err();
    match e {
        TunnelError::Refused(m) => assert_eq!(m.len(), MAX_ERROR_LEN),
        e => panic!("unexpected {e}"),
    }
}

async fn raw_stream(p: &Pair) -> tokio_util::compat::Compat<libp2p::Stream> {
    let mut control = p.client.net.control();
    let s = control
        .open_stream(p.provider.net.peer_id(), TUNNEL_PROTOCOL)
        .await
        .expect("open raw stream");
    tokio_util::compat::FuturesAsyncReadCompatExt::compat(s)
}

#[tokio::test]
async fn silent_and_short_handshakes_are_cut_at_the_deadline() {
    let p = pair(echo_backend().await, Duration::from_millis(300)).await;
    for prefix in [&[][..], &[7u8; 31][..]] {
        let mut s = raw_stream(&p).await;
        s.write_all(prefix).await.expect("write");
        s.flush().await.expect("flush");
        let mut answer = Vec::new();
        // The provider answers on its own once the deadline passes; the
        // outer timeout only bounds a broken implementation.
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut answer))
            .await
            .expect("provider cut the stream")
            .expect("read");
        assert_eq!(answer[0], STATUS_ERR, "prefix len {}", prefix.len());
        assert_eq!(&answer[1..], b"handshake timed out");
    }
}

#[tokio::test]
async fn settling_the_lease_gives_the_client_eof() {
    let p = pair(echo_backend().await, Duration::from_secs(30)).await;
    let lease = accepted_lease(&p.provider.store, &p.consumer, &p.provider_wallet, 5);
    let mut t = p.open(&lease).await.expect("tunnel");
    t.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    t.read_exact(&mut buf).await.expect("echo");
    assert_eq!(p.provider.net.registry().count_for(&lease), 1);
    p.provider
        .store
        .apply_event(&xe_store::LeaseEvent::settle(
            &p.consumer,
            lease,
            xe_store::now_secs(),
        ))
        .expect("settle");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut rest))
        .await
        .expect("EOF arrives")
        .unwrap_or(0);
    assert_eq!(n, 0, "no more data after close");
}

/// (AES-GCM handshakes, ChaCha20 handshakes) a node has completed.
fn handshakes(n: &TestNode) -> (u64, u64) {
    let h = &n.net.stats().handshakes;
    (
        h.aes_gcm.load(std::sync::atomic::Ordering::Relaxed),
        h.chacha20.load(std::sync::atomic::Ordering::Relaxed),
    )
}

#[tokio::test]
async fn one_gib_arrives_byte_exact() {
    let p = pair(hashing_backend().await, Duration::from_secs(30)).await;
    let lease = accepted_lease(&p.provider.store, &p.consumer, &p.provider_wallet, 6);
    send_and_check_digest(&p, &lease, 1024).await;
    // Two current nodes secure every connection (AutoNAT dial-backs add
    // some) with AES-GCM.
    for (who, n) in [("client", &p.client), ("provider", &p.provider)] {
        let (aes, chacha) = handshakes(n);
        assert!(
            aes >= 1 && chacha == 0,
            "{who}: {aes} aes-gcm, {chacha} chacha20"
        );
    }
}

#[tokio::test]
async fn a_peer_with_only_standard_noise_still_carries_tunnels_byte_exact() {
    // A node from before the AES-GCM upgrade (or one set to chacha20)
    // negotiates plain `/noise` with a current node.
    let p = pair_with_client_cipher(
        hashing_backend().await,
        Duration::from_secs(30),
        OverlayCipher::ChaCha20,
    )
    .await;
    let lease = accepted_lease(&p.provider.store, &p.consumer, &p.provider_wallet, 7);
    send_and_check_digest(&p, &lease, 64).await;
    for (who, n) in [("client", &p.client), ("provider", &p.provider)] {
        let (aes, chacha) = handshakes(n);
        assert!(
            aes == 0 && chacha >= 1,
            "{who}: {aes} aes-gcm, {chacha} chacha20"
        );
    }
}

/// Sends `mib` MiB of pseudo-random bytes through a tunnel to the hashing
/// backend and compares its SHA-256 with ours.
async fn send_and_check_digest(p: &Pair, lease: &LeaseHash, mib: usize) {
    let t = p.open(lease).await.expect("tunnel");
    let (mut r, mut w) = tokio::io::split(t);
    let writer = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut block = vec![0u8; 1024 * 1024];
        let mut seed = 0x9e3779b97f4a7c15u64;
        for _ in 0..mib {
            for chunk in block.chunks_mut(8) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
            }
            h.update(&block);
            w.write_all(&block).await.expect("write");
        }
        w.shutdown().await.expect("half-close");
        h.finalize().to_vec()
    });
    let mut remote = Vec::new();
    r.read_to_end(&mut remote).await.expect("digest");
    let local = writer.await.expect("writer");
    assert_eq!(hex::encode(remote), hex::encode(local));
}

/// The transports of `node`'s connections to `peer`, e.g. `["quic", "tcp"]`.
async fn transports(node: &TestNode, peer: PeerId) -> Vec<&'static str> {
    let peers = node.net.peers().await.expect("peers");
    let mut t: Vec<&'static str> = peers
        .iter()
        .filter(|p| p.peer_id == peer.to_string())
        .flat_map(|p| p.addrs.iter())
        .map(|a| {
            if a.contains("/quic-v1") {
                "quic"
            } else {
                "tcp"
            }
        })
        .collect();
    t.sort_unstable();
    t
}

/// Waits (bounded) until `node`'s connections to `peer` use exactly `want`.
async fn wait_transports(node: &TestNode, peer: PeerId, want: &[&str]) {
    let mut changes = node.net.connection_changes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = transports(node, peer).await;
        let mut dedup = now.clone();
        dedup.dedup();
        if dedup == want {
            return;
        }
        assert!(
            tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_ok(),
            "connections to {peer} still {now:?}, want {want:?}"
        );
    }
}

#[tokio::test]
async fn a_quic_connection_born_beside_a_tcp_one_is_closed_and_tunnels_stay_on_tcp() {
    // The client reaches the provider over TCP, then a QUIC connection
    // comes up too (as an AutoNAT dial-back or a DHT query's dial would).
    // New tunnels would be spread at random over both, so the QUIC one
    // goes at once.
    let listen = ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"];
    let mut quic = None;
    let p = pair_with(
        echo_backend().await,
        Duration::from_secs(30),
        &listen,
        |c| {
            let (q, tcp): (Vec<_>, Vec<_>) = std::mem::take(&mut c.bootstrap)
                .into_iter()
                .partition(|a| a.to_string().contains("/quic-v1"));
            quic = q.into_iter().next();
            c.bootstrap = tcp;
        },
    )
    .await;
    let provider = p.provider.net.peer_id();
    wait_transports(&p.client, provider, &["tcp"]).await;
    p.client
        .net
        .dial(quic.expect("a QUIC address"))
        .await
        .expect("dial QUIC");
    wait_transports(&p.client, provider, &["tcp"]).await;
    wait_transports(&p.provider, p.client.net.peer_id(), &["tcp"]).await;
    let lease = accepted_lease(&p.provider.store, &p.consumer, &p.provider_wallet, 8);
    for round in 0..4u8 {
        let mut t = p.open(&lease).await.expect("tunnel");
        t.write_all(&[round; 4]).await.expect("write");
        let mut back = [0u8; 4];
        t.read_exact(&mut back).await.expect("echo");
        assert_eq!(back, [round; 4]);
    }
    assert_eq!(transports(&p.client, provider).await, ["tcp"]);
}

/// One stream past a connection's limit would make yamux close it with
/// every tunnel on it. The opener refuses the one tunnel instead, and the
/// tunnels already open keep working. The limit is lowered to 2 here.
#[tokio::test]
async fn a_tunnel_past_the_per_peer_limit_is_refused_and_the_others_live_on() {
    let p = pair_with(
        echo_backend().await,
        Duration::from_secs(30),
        &["/ip4/127.0.0.1/tcp/0"],
        |c| c.max_tunnels_per_peer = 2,
    )
    .await;
    let lease = accepted_lease(&p.provider.store, &p.consumer, &p.provider_wallet, 9);
    let mut first = p.open(&lease).await.expect("first tunnel");
    let second = p.open(&lease).await.expect("second tunnel");
    match p.open(&lease).await {
        Err(TunnelError::TooManyTunnels { limit: 2, peer }) => {
            assert_eq!(peer, p.provider.net.peer_id());
        }
        Err(e) => panic!("expected TooManyTunnels, got {e}"),
        Ok(_) => panic!("a third tunnel opened past the limit of 2"),
    }
    first.write_all(b"still here").await.expect("write");
    let mut back = [0u8; 10];
    first.read_exact(&mut back).await.expect("echo");
    assert_eq!(&back, b"still here");
    // A slot frees when a tunnel ends.
    drop(second);
    let mut third = p.open(&lease).await.expect("a tunnel once one has closed");
    third.write_all(b"x").await.expect("write");
    let mut one = [0u8; 1];
    third.read_exact(&mut one).await.expect("echo");
    assert_eq!(&one, b"x");
}

/// The converse: a QUIC connection came first and a TCP one joins it (a
/// peer that knew only our QUIC address, then dialled TCP). The QUIC one
/// goes once no tunnel is open with the peer: while one is, it stays, since
/// a tunnel may be riding on it.
#[tokio::test]
async fn an_older_quic_connection_goes_once_tcp_is_up_and_its_tunnels_end() {
    let listen = ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"];
    let mut tcp = None;
    let p = pair_with(
        echo_backend().await,
        Duration::from_secs(30),
        &listen,
        |c| {
            let (quic, t): (Vec<_>, Vec<_>) = std::mem::take(&mut c.bootstrap)
                .into_iter()
                .partition(|a| a.to_string().contains("/quic-v1"));
            tcp = t.into_iter().next();
            c.bootstrap = quic;
        },
    )
    .await;
    let provider = p.provider.net.peer_id();
    wait_transports(&p.client, provider, &["quic"]).await;
    let lease = accepted_lease(&p.provider.store, &p.consumer, &p.provider_wallet, 10);
    let mut open = p.open(&lease).await.expect("tunnel over QUIC");
    p.client
        .net
        .dial(tcp.expect("a TCP address"))
        .await
        .expect("dial TCP");
    // A tunnel is open: both connections stay.
    assert_eq!(transports(&p.client, provider).await, ["quic", "tcp"]);
    open.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    open.read_exact(&mut back).await.expect("echo");
    assert_eq!(&back, b"ping");
    drop(open);
    wait_transports(&p.client, provider, &["tcp"]).await;
    wait_transports(&p.provider, p.client.net.peer_id(), &["tcp"]).await;
    let mut t = p.open(&lease).await.expect("tunnel over TCP");
    t.write_all(b"pong").await.expect("write");
    t.read_exact(&mut back).await.expect("echo");
    assert_eq!(&back, b"pong");
}
