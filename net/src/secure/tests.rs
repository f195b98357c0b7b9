//! The AES-GCM handshake and stream over in-memory pipes, with a
//! man-in-the-middle that can flip, record or cut bytes.

use super::*;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

type Pipe = Compat<DuplexStream>;

fn keys() -> (Keypair, LocalKeys) {
    let id = Keypair::generate_ed25519();
    let local = LocalKeys::new(&id).expect("keys");
    (id, local)
}

/// What the middle does to the initiator → responder bytes.
#[derive(Clone, Copy)]
enum Middle {
    Pass,
    /// Flip one bit of the byte at this offset.
    Flip(usize),
    /// Forward this many bytes, then close both ways.
    CutAfter(usize),
}

/// Two pipes joined by a task that applies `middle` and records the
/// initiator → responder bytes.
fn wire(middle: Middle) -> (Pipe, Pipe, tokio::task::JoinHandle<Vec<u8>>) {
    let (a, mut a_mid) = tokio::io::duplex(256 * 1024);
    let (b, mut b_mid) = tokio::io::duplex(256 * 1024);
    let task = tokio::spawn(async move {
        let (mut ar, mut aw) = tokio::io::split(&mut a_mid);
        let (mut br, mut bw) = tokio::io::split(&mut b_mid);
        let forward = async {
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match ar.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let start = seen.len();
                seen.extend_from_slice(&buf[..n]);
                match middle {
                    Middle::Flip(at) if (start..start + n).contains(&at) => {
                        buf[at - start] ^= 0x10;
                    }
                    Middle::CutAfter(at) if start + n >= at => {
                        let _ = bw.write_all(&buf[..at - start]).await;
                        break;
                    }
                    _ => {}
                }
                if bw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = bw.shutdown().await;
            seen
        };
        let back = async {
            let _ = tokio::io::copy(&mut br, &mut aw).await;
            let _ = aw.shutdown().await;
        };
        if let Middle::CutAfter(_) = middle {
            // A cut ends both directions as soon as the forward one stops.
            tokio::pin!(forward);
            tokio::select! {
                seen = &mut forward => seen,
                () = back => forward.await,
            }
        } else {
            tokio::join!(forward, back).0
        }
    });
    (a.compat(), b.compat(), task)
}

async fn connect(
    a: Pipe,
    b: Pipe,
    ka: &LocalKeys,
    kb: &LocalKeys,
) -> (
    Result<(PeerId, SecureStream<Pipe>), SecurityError>,
    Result<(PeerId, SecureStream<Pipe>), SecurityError>,
) {
    tokio::join!(handshake(a, ka, true), handshake(b, kb, false))
}

/// Deterministic bytes: a position-dependent pattern, so a lost, repeated or
/// reordered chunk shows.
fn pattern(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes()[3])
        .collect()
}

/// Writes `total` bytes in random-sized writes (some bigger than a frame),
/// flushing now and then, then closes.
async fn send_pattern(mut w: impl AsyncWrite + Unpin, total: usize, seed: u64) -> io::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sent = 0;
    while sent < total {
        let n = rng.gen_range(1..=3 * MAX_PLAINTEXT).min(total - sent);
        w.write_all(&pattern(sent, n)).await?;
        sent += n;
        if rng.gen_bool(0.3) {
            w.flush().await?;
        }
    }
    w.close().await
}

/// Reads to EOF in random-sized reads; the bytes received.
async fn recv_all(mut r: impl AsyncRead + Unpin, seed: u64) -> io::Result<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut got = Vec::new();
    loop {
        let mut buf = vec![0u8; rng.gen_range(1..=2 * MAX_FRAME)];
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(got);
        }
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn each_end_learns_the_others_identity() {
    let ((ida, ka), (idb, kb)) = (keys(), keys());
    let (a, b, _) = wire(Middle::Pass);
    let (ra, rb) = connect(a, b, &ka, &kb).await;
    assert_eq!(ra.expect("initiator").0, idb.public().to_peer_id());
    assert_eq!(rb.expect("responder").0, ida.public().to_peer_id());
}

#[tokio::test]
async fn bytes_arrive_exactly_both_ways_at_once() {
    let (ka, kb) = (keys().1, keys().1);
    let (a, b, _) = wire(Middle::Pass);
    let (ra, rb) = connect(a, b, &ka, &kb).await;
    let (sa, sb) = (ra.expect("a").1, rb.expect("b").1);
    let (a_read, a_write) = sa.split();
    let (b_read, b_write) = sb.split();
    const TOTAL: usize = 6 * 1024 * 1024 + 12_345;
    let (a_sent, b_sent, a_got, b_got) = tokio::join!(
        send_pattern(a_write, TOTAL, 1),
        send_pattern(b_write, TOTAL, 2),
        recv_all(a_read, 3),
        recv_all(b_read, 4),
    );
    a_sent.expect("a writes");
    b_sent.expect("b writes");
    let want = pattern(0, TOTAL);
    assert!(a_got.expect("a reads") == want, "a received other bytes");
    assert!(b_got.expect("b reads") == want, "b received other bytes");
}

#[tokio::test]
async fn no_plaintext_crosses_the_wire() {
    let (ka, kb) = (keys().1, keys().1);
    let (a, b, mid) = wire(Middle::Pass);
    let (ra, rb) = connect(a, b, &ka, &kb).await;
    let (mut sa, sb) = (ra.expect("a").1, rb.expect("b").1);
    let marker = b"lease 9f86d081884c7d659a2feaa0c55ad015 secret marker";
    let plain: Vec<u8> = marker.repeat(4096);
    let (w, r) = tokio::join!(
        async {
            sa.write_all(&plain).await?;
            sa.close().await
        },
        recv_all(sb, 5)
    );
    w.expect("write");
    assert_eq!(r.expect("read"), plain);
    let seen = mid.await.expect("middle");
    assert!(seen.len() > plain.len(), "every byte crossed the middle");
    assert!(
        !seen.windows(16).any(|w| w == &marker[..16]),
        "the plaintext marker is visible on the wire"
    );
}

#[tokio::test]
async fn a_flipped_bit_is_an_error_never_data() {
    let (ka, kb) = (keys().1, keys().1);
    // Well past the handshake (≈ 200 bytes initiator → responder).
    let (a, b, _) = wire(Middle::Flip(100_000));
    let (ra, rb) = connect(a, b, &ka, &kb).await;
    let (sa, mut sb) = (ra.expect("a").1, rb.expect("b").1);
    // The reader drops its end on the error, so the writer fails too.
    let (_, got) = tokio::join!(send_pattern(sa, 1024 * 1024, 6), async move {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match sb.read(&mut buf).await {
                Ok(0) => return Ok(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err((e, got)),
            }
        }
    });
    let (e, got) = got.expect_err("a tampered frame must not read cleanly");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    assert!(
        got.len() < 100_000,
        "read {} bytes past the flip",
        got.len()
    );
    assert_eq!(
        got,
        pattern(0, got.len()),
        "bytes before the flip are intact"
    );
}

#[tokio::test]
async fn a_connection_cut_inside_a_frame_is_an_error_not_eof() {
    let (ka, kb) = (keys().1, keys().1);
    let (a, b, _) = wire(Middle::CutAfter(50_000));
    let (ra, rb) = connect(a, b, &ka, &kb).await;
    let (mut sa, sb) = (ra.expect("a").1, rb.expect("b").1);
    let (_, got) = tokio::join!(
        async {
            // The writer may fail once the middle is gone; that is fine.
            let _ = sa.write_all(&pattern(0, 1024 * 1024)).await;
            let _ = sa.close().await;
        },
        recv_all(sb, 7)
    );
    let e = got.expect_err("a truncated stream must not look complete");
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
}

#[tokio::test]
async fn a_payload_signed_for_another_static_key_is_refused() {
    // The attacker replays the victim's identity payload with its own noise
    // static key: the signature does not cover that key.
    let ((_, victim), (_, attacker), (_, honest)) = (keys(), keys(), keys());
    let impostor = LocalKeys {
        dh_private: attacker.dh_private.clone(),
        payload: victim.payload.clone(),
    };
    let (a, b, _) = wire(Middle::Pass);
    let (ra, _) = connect(a, b, &honest, &impostor).await;
    match ra {
        Err(SecurityError::Identity(m)) => assert!(m.contains("does not verify"), "{m}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("the impostor was accepted"),
    }
}

#[tokio::test]
async fn a_payload_in_the_first_message_is_refused() {
    let (_, local) = keys();
    let (a, b, _) = wire(Middle::Pass);
    let responder = tokio::spawn(async move { handshake(b, &local, false).await.map(|_| ()) });
    // A hostile initiator: `-> e` with bytes after the ephemeral key.
    let mut hs = builder()
        .local_private_key(&keys().1.dh_private)
        .expect("key")
        .build_initiator()
        .expect("initiator");
    let mut msg = vec![0u8; MAX_FRAME];
    let n = hs.write_message(b"smuggled", &mut msg).expect("write");
    let mut a = a;
    write_frame(&mut a, &msg[..n]).await.expect("send");
    // Then hang up: a responder that went on would fail reading message 3
    // (an I/O error), not refuse message 1.
    drop(a);
    match responder.await.expect("join") {
        Err(SecurityError::Identity(m)) => assert!(m.contains("first handshake message"), "{m}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(()) => panic!("a first message with a payload was accepted"),
    }
}

#[test]
fn malformed_payloads_are_refused_with_a_reason() {
    let id = Keypair::generate_ed25519();
    let static_key = [7u8; 32];
    let sig = id
        .sign(&[STATIC_KEY_DOMAIN, &static_key].concat())
        .expect("sign");
    let good = encode_payload(&id.public().encode_protobuf(), &sig);
    assert_eq!(
        verify_payload(&good, &static_key).expect("good payload"),
        id.public().to_peer_id()
    );
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("empty", vec![], "malformed"),
        ("truncated", good[..good.len() - 1].to_vec(), "malformed"),
        ("trailing", [&good[..], &[0]].concat(), "trailing"),
        (
            "garbage key",
            encode_payload(&[1, 2, 3], &sig),
            "does not decode",
        ),
        (
            "other domain",
            encode_payload(
                &id.public().encode_protobuf(),
                &id.sign(&[b"noise-libp2p-static-key:", &static_key[..]].concat())
                    .expect("sign"),
            ),
            "does not verify",
        ),
    ];
    for (name, payload, want) in cases {
        match verify_payload(&payload, &static_key) {
            Err(SecurityError::Identity(m)) => assert!(m.contains(want), "{name}: {m}"),
            other => panic!("{name}: expected a refusal, got {other:?}"),
        }
    }
}

#[test]
fn cipher_names_parse_and_print() {
    for c in [OverlayCipher::AesGcm, OverlayCipher::ChaCha20] {
        assert_eq!(c.to_string().parse::<OverlayCipher>(), Ok(c));
    }
    let e = "aes".parse::<OverlayCipher>().expect_err("unknown");
    assert!(e.contains("expected aes-gcm or chacha20"), "{e}");
}

/// Fixed keys for the test vectors: identity seed, noise static private
/// key, ephemeral private key, per side.
const VECTOR_KEYS: [([u8; 32], [u8; 32], [u8; 32]); 2] = [
    ([0x01; 32], [0x11; 32], [0x21; 32]),
    ([0x02; 32], [0x12; 32], [0x22; 32]),
];

/// X25519 public key of `private`, through snow's own resolver.
fn x25519_public(private: &[u8]) -> Vec<u8> {
    use snow::resolvers::CryptoResolver;
    let mut dh = DefaultResolver
        .resolve_dh(&snow::params::DHChoice::Curve25519)
        .expect("x25519");
    dh.set(private);
    dh.pubkey().to_vec()
}

/// The handshake of `PROTOCOL` with fixed keys, message by message, then
/// one transport frame from each side: what a second implementation must
/// produce byte for byte (`vectors.txt`).
fn vector_transcript() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut sides = Vec::new();
    for (i, (seed, static_priv, eph)) in VECTOR_KEYS.iter().enumerate() {
        let id = Keypair::ed25519_from_bytes(*seed).expect("identity");
        let static_pub = x25519_public(static_priv);
        let sig = id
            .sign(&[STATIC_KEY_DOMAIN, &static_pub].concat())
            .expect("sign");
        let payload = encode_payload(&id.public().encode_protobuf(), &sig);
        let name = if i == 0 { "initiator" } else { "responder" };
        out.push((
            format!("{name}.peer_id"),
            id.public().to_peer_id().to_string(),
        ));
        out.push((format!("{name}.static_public"), hex::encode(&static_pub)));
        out.push((format!("{name}.payload"), hex::encode(&payload)));
        let b = builder()
            .local_private_key(static_priv)
            .expect("static")
            .fixed_ephemeral_key_for_testing_only(eph);
        let hs = if i == 0 {
            b.build_initiator()
        } else {
            b.build_responder()
        }
        .expect("handshake state");
        sides.push((hs, payload, id.public().to_peer_id()));
    }
    let mut sides = sides.into_iter();
    let (mut ini, ini_payload, ini_peer) = sides.next().expect("initiator");
    let (mut res, res_payload, res_peer) = sides.next().expect("responder");
    let mut msg = vec![0u8; MAX_FRAME];
    let mut got = vec![0u8; MAX_FRAME];
    let n = ini.write_message(&[], &mut msg).expect("m1");
    out.push(("message1".into(), hex::encode(&msg[..n])));
    assert_eq!(res.read_message(&msg[..n], &mut got).expect("read m1"), 0);
    let n = res.write_message(&res_payload, &mut msg).expect("m2");
    out.push(("message2".into(), hex::encode(&msg[..n])));
    let k = ini.read_message(&msg[..n], &mut got).expect("read m2");
    let static_res = ini.get_remote_static().expect("rs").to_vec();
    assert_eq!(
        verify_payload(&got[..k], &static_res).expect("verify"),
        res_peer
    );
    let n = ini.write_message(&ini_payload, &mut msg).expect("m3");
    out.push(("message3".into(), hex::encode(&msg[..n])));
    let k = res.read_message(&msg[..n], &mut got).expect("read m3");
    let static_ini = res.get_remote_static().expect("rs").to_vec();
    assert_eq!(
        verify_payload(&got[..k], &static_ini).expect("verify"),
        ini_peer
    );
    let mut ini = ini.into_transport_mode().expect("transport");
    let mut res = res.into_transport_mode().expect("transport");
    let n = ini
        .write_message(b"hello from the initiator", &mut msg)
        .expect("t1");
    out.push(("transport.initiator_first".into(), hex::encode(&msg[..n])));
    assert_eq!(
        res.read_message(&msg[..n], &mut got).expect("read t1"),
        b"hello from the initiator".len()
    );
    let n = res
        .write_message(b"hello from the responder", &mut msg)
        .expect("t2");
    out.push(("transport.responder_first".into(), hex::encode(&msg[..n])));
    out
}

/// Test vectors a second implementation of `PROTOCOL` can check: the keys
/// are in `VECTOR_KEYS`, the bytes in `vectors.txt` (one `name hex` per
/// line; a frame on the wire is 2-byte big-endian length ‖ these bytes).
/// `XE_PRINT_VECTORS=1` prints them instead of checking.
#[test]
fn the_handshake_matches_its_test_vectors() {
    let lines: Vec<String> = vector_transcript()
        .into_iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    if std::env::var("XE_PRINT_VECTORS").as_deref() == Ok("1") {
        println!("{}", lines.join("\n"));
        return;
    }
    let want: Vec<&str> = include_str!("vectors.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(lines, want);
}
