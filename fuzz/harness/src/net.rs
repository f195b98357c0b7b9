//! The overlay's parsers: gossip, the sync codec, reconciliation
//! messages, the tunnel handshake, the Noise-AES-GCM handshake and frames.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::{AsyncReadExt as _, AsyncWriteExt as _, FutureExt as _};
use libp2p::PeerId;
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade};
use libp2p::identity::Keypair;
use libp2p::request_response::Codec as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use tokio_util::compat::TokioAsyncReadCompatExt as _;
use tokio_util::sync::CancellationToken;
use xe_net::OverlayCipher;
use xe_net::replication::recon::{self, Findings, Role};
use xe_net::replication::{SYNC_PROTOCOL, sync_codec as node_sync_codec};
use xe_net::secure::{HandshakeCounts, PROTOCOL, SecureStream, SecurityUpgrade};
use xe_net::tunnel::{
    MAX_ERROR_LEN, STATUS_ERR, STATUS_OK, TunnelError, TunnelRefusal, TunnelRegistry,
    TunnelServerConfig, TunnelValidator, VmConn, client_handshake, handle_stream,
};
use xe_store::{EventId, LeaseHash, Store, SyncKey, SyncSet};

use crate::rt::block_on;

/// Every harness bounds itself by this; past it the input counts as a hang.
const HANG: Duration = Duration::from_secs(10);

fn peer() -> PeerId {
    static PEER: OnceLock<PeerId> = OnceLock::new();
    *PEER.get_or_init(|| {
        Keypair::ed25519_from_bytes([5; 32])
            .expect("key")
            .public()
            .to_peer_id()
    })
}

/// One store for the whole process, as a node has: what an earlier input
/// left in it is part of the next one's world.
fn shared_store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(|| Store::temporary().expect("temporary store"))
}

/// `data` as one gossipsub message on either topic, validated and applied
/// exactly as the host does.
pub fn gossip(data: &[u8]) {
    let _forwarded = xe_net::replication::fuzz_gossip(shared_store(), data, &peer());
}

/// `data[1..]` as a `/xe/sync/1.0.0` request (`data[0]` even) or response
/// (odd), read by the node's codec with its size caps. What reads must
/// write and read back the same; a request is then answered from the
/// store and a response applied to it, as the host does.
pub fn sync_codec(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let mut codec = node_sync_codec();
    let store = shared_store();
    futures::executor::block_on(async {
        if which & 1 == 0 {
            let Ok(req) = codec
                .read_request(&SYNC_PROTOCOL, &mut futures::io::Cursor::new(body))
                .await
            else {
                return;
            };
            let mut out = futures::io::Cursor::new(Vec::new());
            codec
                .write_request(&SYNC_PROTOCOL, &mut out, req.clone())
                .await
                .expect("write a request we read");
            let again = codec
                .read_request(
                    &SYNC_PROTOCOL,
                    &mut futures::io::Cursor::new(out.into_inner()),
                )
                .await
                .expect("read back our own request");
            assert_eq!(
                format!("{again:?}"),
                format!("{req:?}"),
                "sync request round trip"
            );
            xe_net::replication::fuzz_sync(store, Some(req), None, peer());
        } else {
            let Ok(resp) = codec
                .read_response(&SYNC_PROTOCOL, &mut futures::io::Cursor::new(body))
                .await
            else {
                return;
            };
            let mut out = futures::io::Cursor::new(Vec::new());
            codec
                .write_response(&SYNC_PROTOCOL, &mut out, resp.clone())
                .await
                .expect("write a response we read");
            let again = codec
                .read_response(
                    &SYNC_PROTOCOL,
                    &mut futures::io::Cursor::new(out.into_inner()),
                )
                .await
                .expect("read back our own response");
            assert_eq!(
                format!("{again:?}"),
                format!("{resp:?}"),
                "sync response round trip"
            );
            xe_net::replication::fuzz_sync(store, None, Some(resp), peer());
        }
    });
}

/// A fixed set of 40 keys to reconcile against.
fn recon_set() -> &'static SyncSet {
    static SET: OnceLock<SyncSet> = OnceLock::new();
    SET.get_or_init(|| {
        let mut s = SyncSet::new();
        for i in 1..=40u8 {
            s.insert(SyncKey {
                ts: u64::from(i) * 10,
                id: EventId([i; 32]),
            });
        }
        s
    })
}

/// `data` as one reconciliation message. What decodes must encode and
/// decode to the same message; it is then processed against a fixed set
/// by both roles, and each reply must itself decode.
pub fn recon(data: &[u8]) {
    let Ok(msg) = recon::decode(data) else {
        return;
    };
    assert_eq!(
        recon::decode(&recon::encode(&msg)).as_ref(),
        Ok(&msg),
        "reconciliation message round trip"
    );
    for role in [Role::Initiator, Role::Responder] {
        let mut findings = Findings::default();
        let reply = recon::process(recon_set(), &msg, role, &mut findings);
        assert_eq!(
            recon::decode(&recon::encode(&reply)).as_ref(),
            Ok(&reply),
            "our own {role:?} reply does not decode"
        );
    }
}

/// What the fake node does with a lease, by the hash's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Valid; the "VM" echoes every byte.
    Echo,
    /// Valid, but dialling the VM fails with a long message.
    DialFails,
    /// Refused with a long message.
    Refused,
    /// Validation never answers: the handshake deadline must.
    Hangs,
    /// Not the provider: `data[1..]` is a provider's answer to our client.
    Client,
}

fn plan(first: u8) -> Plan {
    match first % 5 {
        0 => Plan::Echo,
        1 => Plan::DialFails,
        2 => Plan::Refused,
        3 => Plan::Hangs,
        _ => Plan::Client,
    }
}

/// A message longer than [`MAX_ERROR_LEN`], with multi-byte characters,
/// chosen by the lease hash.
fn long_message(lease: &LeaseHash) -> String {
    String::from_utf8_lossy(&lease.0[1..]).repeat(1 + usize::from(lease.0[1]) * 4)
}

struct FakeNode;

#[async_trait::async_trait]
impl TunnelValidator for FakeNode {
    async fn validate_tunnel_lease(
        &self,
        lease: &LeaseHash,
        _peer: &PeerId,
    ) -> Result<(), TunnelRefusal> {
        match plan(lease.0[0]) {
            Plan::Refused => Err(TunnelRefusal::Store(long_message(lease))),
            Plan::Hangs => std::future::pending().await,
            _ => Ok(()),
        }
    }

    async fn dial_ssh(&self, lease: &LeaseHash) -> Result<Box<dyn VmConn>, TunnelRefusal> {
        if plan(lease.0[0]) == Plan::DialFails {
            return Err(TunnelRefusal::VmUnreachable(long_message(lease)));
        }
        let (vm, mut far) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(&mut far);
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
        Ok(Box::new(vm))
    }

    async fn until_inactive(&self, _lease: &LeaseHash) -> xe_store::Inactive {
        std::future::pending().await
    }
}

/// `data` as the bytes a client sends on a `/xe/tunnel/2.0.0` stream to
/// the provider handler (over an in-memory pipe), which talks to a fake
/// node that, by the lease hash's first byte, echoes, fails to dial,
/// refuses, hangs, or (the fifth case) is a hostile provider whose answer
/// `data[1..]` our client handshake reads instead. The answers must
/// follow the protocol: `0x00` and then exactly the echoed bytes, or
/// `0x01` and at most 4 KiB of UTF-8.
pub fn tunnel(data: &[u8]) {
    block_on(async {
        tokio::time::timeout(HANG, tunnel_inner(data))
            .await
            .expect("tunnel harness hung");
    });
}

async fn tunnel_inner(data: &[u8]) {
    let first = data.first().copied().unwrap_or(0);
    if plan(first) == Plan::Client {
        return tunnel_client(data).await;
    }
    let (mut client, provider) = tokio::io::duplex(256 * 1024);
    let cfg = TunnelServerConfig {
        handshake_timeout: if plan(first) == Plan::Hangs {
            Duration::from_millis(10)
        } else {
            HANG / 2
        },
        max_tunnels: 1,
        ..TunnelServerConfig::default()
    };
    let serve = handle_stream(
        provider,
        peer(),
        Arc::new(FakeNode),
        TunnelRegistry::default(),
        cfg,
        CancellationToken::new(),
    );
    let talk = async {
        let mut answer = Vec::new();
        let (mut r, mut w) = tokio::io::split(&mut client);
        let send = async {
            // The provider may stop reading after the hash: not an error.
            let _ = w.write_all(data).await;
            let _ = w.shutdown().await;
        };
        let (_, read) = tokio::join!(send, r.read_to_end(&mut answer));
        read.expect("read the provider's answer");
        answer
    };
    let ((), answer) = tokio::join!(serve, talk);
    let (&status, rest) = answer.split_first().expect("the provider always answers");
    if data.len() >= 32 && plan(first) == Plan::Echo {
        assert_eq!(status, STATUS_OK);
        assert_eq!(
            rest,
            &data[32..],
            "the tunnel did not carry the bytes unchanged"
        );
    } else {
        assert_eq!(status, STATUS_ERR, "refusal status");
        assert!(rest.len() <= MAX_ERROR_LEN, "refusal longer than 4 KiB");
        let msg = std::str::from_utf8(rest).expect("refusal is UTF-8");
        if data.len() >= 32 && plan(first) == Plan::Hangs {
            assert_eq!(msg, "handshake timed out");
        }
    }
}

async fn tunnel_client(data: &[u8]) {
    let (mut ours, mut theirs) = tokio::io::duplex(64 * 1024);
    let lease = LeaseHash([7; 32]);
    let reply = data.get(1..).unwrap_or_default();
    let provider = async {
        let mut hash = [0u8; 32];
        theirs
            .read_exact(&mut hash)
            .await
            .expect("the client sends the hash");
        assert_eq!(hash, lease.0);
        let _ = theirs.write_all(reply).await;
        let _ = theirs.shutdown().await;
    };
    let (r, ()) = tokio::join!(client_handshake(&mut ours, &lease, HANG / 2), provider);
    match (reply.first(), r) {
        (Some(&STATUS_OK), Ok(())) => {}
        (Some(&STATUS_ERR), Err(TunnelError::Refused(msg))) => {
            let want = String::from_utf8_lossy(&reply[1..reply.len().min(1 + MAX_ERROR_LEN)]);
            assert_eq!(msg, want);
        }
        (Some(&b), Err(TunnelError::UnexpectedStatus(s))) if b > STATUS_ERR => assert_eq!(s, b),
        (None, Err(TunnelError::Io(_))) => {}
        (want, got) => panic!("provider answer {want:?} gave {got:?}"),
    }
}

/// Two identities and their upgrades, built once.
struct NoiseKeys {
    initiator: SecurityUpgrade,
    responder: SecurityUpgrade,
    initiator_id: PeerId,
    responder_id: PeerId,
}

fn noise_keys() -> &'static NoiseKeys {
    static KEYS: OnceLock<NoiseKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let up = |seed: u8| {
            let id = Keypair::ed25519_from_bytes([seed; 32]).expect("key");
            let peer = id.public().to_peer_id();
            let up = SecurityUpgrade::new(
                &id,
                OverlayCipher::AesGcm,
                Arc::new(HandshakeCounts::default()),
            )
            .expect("upgrade");
            (up, peer)
        };
        let (initiator, initiator_id) = up(11);
        let (responder, responder_id) = up(12);
        NoiseKeys {
            initiator,
            responder,
            initiator_id,
            responder_id,
        }
    })
}

/// `/xe/noise-aesgcm/1.0.0` against a hostile peer. `data[0] % 4`: 0, our
/// responder reads `data[1..]` as the initiator's bytes; 1, our initiator
/// reads them as the responder's; 2 and 3, an honest handshake (each side
/// must learn the other's identity), then `data[1..]` is a script of
/// honest writes, large unflushed writes, raw bytes injected into the
/// responder's socket and reads of chosen sizes. Without injections the
/// responder must read exactly what was written; with them, at most a
/// prefix of it (an injected byte never becomes plaintext).
pub fn noise(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    block_on(async {
        tokio::time::timeout(HANG, async {
            match mode % 4 {
                0 => hostile_bytes(rest, false).await,
                1 => hostile_bytes(rest, true).await,
                _ => frames(rest).await,
            }
        })
        .await
        .expect("noise harness hung");
    });
}

async fn hostile_bytes(bytes: &[u8], we_initiate: bool) {
    let keys = noise_keys();
    let (ours, mut theirs) = tokio::io::duplex(1 << 20);
    let ours = ours.compat();
    let hs = async {
        let r = if we_initiate {
            keys.initiator
                .clone()
                .upgrade_outbound(ours, PROTOCOL)
                .await
        } else {
            keys.responder.clone().upgrade_inbound(ours, PROTOCOL).await
        };
        // Random bytes cannot complete a handshake with our keys.
        assert!(r.is_err(), "a handshake with a scripted peer succeeded");
    };
    let peer = async {
        let (mut r, mut w) = tokio::io::split(&mut theirs);
        let send = async {
            let _ = w.write_all(bytes).await;
            let _ = w.shutdown().await;
        };
        let mut sink = Vec::new();
        let _ = tokio::join!(send, r.read_to_end(&mut sink));
    };
    tokio::join!(hs, peer);
}

type Io = tokio_util::compat::Compat<DuplexStream>;

/// Move whatever the initiator wrote into the responder's socket.
async fn forward(from: &mut DuplexStream, to: &mut DuplexStream) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Some(Ok(n)) = from.read(&mut buf).now_or_never() {
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n]).await.expect("forward");
    }
}

async fn frames(script: &[u8]) {
    let keys = noise_keys();
    let (a, mut a_mid) = tokio::io::duplex(1 << 20);
    let (b, mut b_mid) = tokio::io::duplex(1 << 20);
    let both = async {
        tokio::join!(
            keys.initiator
                .clone()
                .upgrade_outbound(a.compat(), PROTOCOL),
            keys.responder.clone().upgrade_inbound(b.compat(), PROTOCOL)
        )
    };
    let pass = async {
        let (mut ar, mut aw) = tokio::io::split(&mut a_mid);
        let (mut br, mut bw) = tokio::io::split(&mut b_mid);
        let _ = tokio::join!(
            tokio::io::copy(&mut ar, &mut bw),
            tokio::io::copy(&mut br, &mut aw)
        );
    };
    // Every handshake byte has been read by its receiver when both sides
    // return, so stopping the pass-through here loses nothing.
    let (init, resp) = tokio::select! {
        biased;
        r = both => r,
        () = pass => panic!("the pipes closed during the handshake"),
    };
    let (seen_resp, init) = init.expect("honest initiator handshake");
    let (seen_init, resp) = resp.expect("honest responder handshake");
    assert_eq!(
        seen_resp, keys.responder_id,
        "initiator learned the wrong peer"
    );
    assert_eq!(
        seen_init, keys.initiator_id,
        "responder learned the wrong peer"
    );
    let (futures::future::Either::Left(mut init), futures::future::Either::Left(mut resp)) =
        (init, resp)
    else {
        panic!("negotiated {PROTOCOL} but got standard noise");
    };
    run_script(script, &mut init, &mut resp, &mut a_mid, &mut b_mid).await;
}

async fn run_script(
    script: &[u8],
    init: &mut SecureStream<Io>,
    resp: &mut SecureStream<Io>,
    a_mid: &mut DuplexStream,
    b_mid: &mut DuplexStream,
) {
    const BUDGET: usize = 512 * 1024;
    let (mut sent, mut got) = (Vec::new(), Vec::new());
    let mut injected = false;
    let mut failed = false;
    let mut buf = vec![0u8; 256 * 1024];
    let mut i = 0;
    while i + 1 < script.len() && !failed {
        let (op, n) = (script[i], usize::from(script[i + 1]));
        i += 2;
        match op % 4 {
            0 => {
                let chunk = &script[i..(i + n).min(script.len())];
                i += chunk.len();
                init.write_all(chunk).await.expect("honest write");
                init.flush().await.expect("honest flush");
                sent.extend_from_slice(chunk);
            }
            1 if sent.len() < BUDGET => {
                // Large and unflushed: crosses frame boundaries.
                let start = sent.len();
                let chunk: Vec<u8> = (start..start + n * 512).map(|k| k as u8).collect();
                init.write_all(&chunk).await.expect("honest write");
                sent.extend_from_slice(&chunk);
            }
            2 => {
                let chunk = &script[i..(i + n).min(script.len())];
                i += chunk.len();
                b_mid.write_all(chunk).await.expect("inject");
                injected = true;
            }
            3 => match resp.read(&mut buf[..=n]).now_or_never() {
                Some(Ok(k)) => got.extend_from_slice(&buf[..k]),
                Some(Err(_)) => failed = true,
                None => {}
            },
            _ => {}
        }
        forward(a_mid, b_mid).await;
    }
    let _ = init.close().await;
    forward(a_mid, b_mid).await;
    b_mid.shutdown().await.expect("close");
    if !failed {
        let mut rest = Vec::new();
        let r = resp.read_to_end(&mut rest).await;
        got.extend_from_slice(&rest);
        failed = r.is_err();
    }
    if injected {
        assert!(sent.starts_with(&got), "injected bytes became plaintext");
    } else {
        assert!(!failed, "an untampered stream failed");
        assert!(
            got == sent,
            "the responder read other bytes than were written"
        );
    }
}
