//! The seed corpora, built from real encodings (`fuzz/corpus/<target>/`).
//! Regenerate with
//! `cargo test -p xe-fuzz-harness --test corpus -- --ignored write_seeds`.

use libp2p::request_response::Codec as _;
use xe_net::replication::recon::{self, Findings, Role};
use xe_net::replication::{GossipMessage, SYNC_PROTOCOL, SyncRequest, SyncResponse, sync_codec};
use xe_store::{DirectoryEntry, EventId, LeaseEvent, Store, SyncKey, SyncSet, Wallet, now_secs};

use crate::store::ledger_events;

/// Seeds of one target: (file name, bytes).
pub type Seeds = Vec<(String, Vec<u8>)>;

/// The seeds of `target`.
pub fn seeds(target: &str) -> Seeds {
    match target {
        "lease_json" => lease_json(),
        "ids" => ids(),
        "stored_forms" => stored_forms(),
        "ledger_order" => ledger_order(),
        "gossip" => gossip(),
        "sync_codec" => sync(),
        "recon" => recon_seeds(),
        "tunnel" => tunnel(),
        "noise" => noise(),
        "http_api" => http(),
        "ssh_gateway" => ssh(),
        other => panic!("no seeds for {other}"),
    }
}

fn named(prefix: &str, items: impl IntoIterator<Item = Vec<u8>>) -> Seeds {
    items
        .into_iter()
        .enumerate()
        .map(|(i, b)| (format!("{prefix}-{i:02}"), b))
        .collect()
}

fn record_json() -> Vec<u8> {
    let s = Store::temporary().expect("store");
    let evs = ledger_events();
    for ev in &evs[..3] {
        s.apply_event(ev).expect("apply");
    }
    let rec = s.lease(&evs[0].lease_hash()).expect("read").expect("lease");
    serde_json::to_vec_pretty(&rec).expect("json")
}

fn lease_json() -> Seeds {
    let evs = ledger_events();
    let mut out: Vec<Vec<u8>> = evs
        .iter()
        .map(|e| serde_json::to_vec(e).expect("json"))
        .collect();
    if let LeaseEvent::Create { lease, .. } = &evs[0] {
        out.push(serde_json::to_vec(lease).expect("json"));
    }
    out.push(record_json());
    named("json", out)
}

fn ids() -> Seeds {
    let evs = ledger_events();
    let ev = &evs[1];
    let w = Wallet::from_seed([1; 32]);
    let hash = ev.lease_hash().to_hex();
    let items = vec![
        hash.clone(),
        hash.to_uppercase(),
        hash[..63].to_string(),
        ev.id().to_hex(),
        w.address().to_hex(),
        w.public_key().to_hex(),
        xe_store::ids::AccessPubKey(w.public_key().0).to_hex(),
        hex_sig(ev),
        format!("{}-{hash}", now_secs()),
        "active".into(),
        "settled".into(),
    ];
    named("id", items.into_iter().map(String::into_bytes))
}

fn hex_sig(ev: &LeaseEvent) -> String {
    serde_json::to_value(ev).expect("json")["sig"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn stored_forms() -> Seeds {
    let evs = ledger_events();
    let mut out: Vec<Vec<u8>> = evs.iter().map(xe_store::codec::encode_event).collect();
    out.push(serde_json::to_vec(&evs[1]).expect("json"));
    out.extend(xe_store::fuzzing::stored_seeds(&evs[0], &evs[1..7]));
    named("stored", out)
}

fn ledger_order() -> Seeds {
    let n = ledger_events().len() as u8;
    named(
        "order",
        vec![
            (0..n).collect(),
            (0..n).rev().collect(),
            vec![1, 2, 3, 0, 7, 9, 12, 11, 10, 13],
            vec![5, 6, 0, 0, 1, 4, 3, 8, 8],
        ],
    )
}

fn directory_entry() -> DirectoryEntry {
    let w = Wallet::from_seed([2; 32]);
    let peer = libp2p::identity::Keypair::ed25519_from_bytes([2; 32])
        .expect("key")
        .public()
        .to_peer_id();
    DirectoryEntry::sign(
        &w,
        peer.to_string(),
        vec![format!("/ip4/127.0.0.1/tcp/4001/p2p/{peer}")],
        now_secs(),
        3600,
    )
}

fn gossip() -> Seeds {
    let mut out: Vec<Vec<u8>> = ledger_events()
        .iter()
        .map(|e| serde_json::to_vec(&GossipMessage::Event { event: e.clone() }).expect("json"))
        .collect();
    out.push(
        serde_json::to_vec(&GossipMessage::Directory {
            entry: directory_entry(),
        })
        .expect("json"),
    );
    named("gossip", out)
}

fn sync() -> Seeds {
    let mut codec = sync_codec();
    let evs = ledger_events();
    let mut out = Vec::new();
    futures::executor::block_on(async {
        for req in [
            SyncRequest::Events { after: None },
            SyncRequest::Events {
                after: Some(evs[1].id()),
            },
            SyncRequest::Directory,
        ] {
            let mut b = futures::io::Cursor::new(vec![0u8]);
            b.set_position(1);
            codec
                .write_request(&SYNC_PROTOCOL, &mut b, req)
                .await
                .expect("encode");
            out.push(b.into_inner());
        }
        for resp in [
            SyncResponse::Events {
                events: evs.to_vec(),
                more: false,
            },
            SyncResponse::Directory {
                entries: vec![directory_entry()],
            },
            SyncResponse::Error {
                message: "store failed".into(),
            },
        ] {
            let mut b = futures::io::Cursor::new(vec![1u8]);
            b.set_position(1);
            codec
                .write_response(&SYNC_PROTOCOL, &mut b, resp)
                .await
                .expect("encode");
            out.push(b.into_inner());
        }
    });
    named("sync", out)
}

fn recon_seeds() -> Seeds {
    // Two sets that overlap, so the messages carry every mode.
    let mut a = SyncSet::new();
    let mut b = SyncSet::new();
    for i in 1..=60u8 {
        let k = SyncKey {
            ts: u64::from(i) * 7,
            id: EventId([i; 32]),
        };
        if i % 5 != 0 {
            a.insert(k);
        }
        if i % 7 != 0 && i < 50 {
            b.insert(k);
        }
    }
    let mut out = Vec::new();
    let mut msg = recon::initial(&a);
    let mut findings = Findings::default();
    for round in 0..8 {
        out.push(recon::encode(&msg));
        if msg.is_done() {
            break;
        }
        let (set, role) = if round % 2 == 0 {
            (&b, Role::Responder)
        } else {
            (&a, Role::Initiator)
        };
        msg = recon::process(set, &msg, role, &mut findings);
    }
    named("recon", out)
}

fn tunnel() -> Seeds {
    let lease = |first: u8, second: u8| {
        let mut v = vec![first, second];
        v.extend_from_slice(&[0xe2, 0x82, 0xac].repeat(10));
        v
    };
    let mut echo = lease(0, 0);
    echo.extend_from_slice(b"SSH-2.0-OpenSSH_9.2\r\nand some bytes");
    named(
        "tunnel",
        vec![
            echo,
            lease(1, 200),
            lease(2, 255),
            lease(3, 0),
            vec![4, 0],
            [&[4u8, 1][..], b"lease settled"].concat(),
            vec![4, 7],
            vec![0; 10],
        ],
    )
}

fn noise() -> Seeds {
    // Scripts for modes 2 and 3: (op, n) pairs, op 0 followed by n bytes.
    let script = [
        &[2u8, 0, 5][..],
        b"hello",
        &[3, 10, 1, 200, 3, 255, 0, 3],
        b"abc",
        &[3, 1, 1, 255, 1, 255, 3, 255],
    ]
    .concat();
    let inject = [&[3u8, 0, 4][..], b"ping", &[2, 6, 0, 4, 1, 2, 3, 4, 3, 9]].concat();
    named(
        "noise",
        vec![
            [&[0u8, 0, 32][..], &[9; 32]].concat(),
            [&[1u8, 0, 80][..], &[9; 80]].concat(),
            script,
            inject,
        ],
    )
}

fn http() -> Seeds {
    let evs = ledger_events();
    let hash = evs[0].lease_hash().to_hex();
    let body = serde_json::to_string(&evs[0]).expect("json");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").into_bytes();
    let mut out = vec![
        get("/health"),
        get("/ready"),
        get("/node"),
        get("/leases?state=active&limit=5"),
        get(&format!("/leases?cursor={}-{hash}", now_secs())),
        get(&format!("/leases/{hash}")),
        get("/providers"),
        get("/vms"),
        get(&format!("/vms/{hash}")),
        get("/metrics"),
        get("/nowhere"),
        format!(
            "POST /leases HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
        format!(
            "POST /tunnel/{hash}/tcp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: upgrade\r\nUpgrade: xe-tunnel\r\nX-Signature: {}\r\nX-Timestamp: {}\r\nX-Nonce: 000102030405060708090a0b0c0d0e0f\r\nX-Node: 12D3KooWfuzz\r\n\r\n",
            "ab".repeat(64),
            now_secs()
        )
        .into_bytes(),
        b"POST /leases HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n0\r\n\r\n".to_vec(),
    ];
    // Two pipelined requests on one connection.
    out.push([get("/health"), get("/node")].concat());
    named("http", out)
}

/// An SSH binary packet (no MAC, no encryption) with `payload`.
fn packet(payload: &[u8]) -> Vec<u8> {
    let mut pad = 8 - (payload.len() + 5) % 8;
    if pad < 4 {
        pad += 8;
    }
    let mut p = Vec::new();
    p.extend_from_slice(&((payload.len() + pad + 1) as u32).to_be_bytes());
    p.push(pad as u8);
    p.extend_from_slice(payload);
    p.extend(std::iter::repeat_n(0u8, pad));
    p
}

fn name_list(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn ssh() -> Seeds {
    let version = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n".to_vec();
    let mut kexinit = vec![20u8];
    kexinit.extend_from_slice(&[0x5a; 16]);
    for list in [
        "curve25519-sha256,curve25519-sha256@libssh.org,ext-info-c,kex-strict-c-v00@openssh.com",
        "ssh-ed25519",
        "chacha20-poly1305@openssh.com,aes256-gcm@openssh.com",
        "chacha20-poly1305@openssh.com,aes256-gcm@openssh.com",
        "hmac-sha2-256-etm@openssh.com",
        "hmac-sha2-256-etm@openssh.com",
        "none,zlib@openssh.com",
        "none,zlib@openssh.com",
        "",
        "",
    ] {
        name_list(&mut kexinit, list);
    }
    kexinit.push(0);
    kexinit.extend_from_slice(&[0; 4]);
    // SSH_MSG_KEX_ECDH_INIT with a 32-byte client key.
    let mut ecdh = vec![30u8];
    ecdh.extend_from_slice(&32u32.to_be_bytes());
    ecdh.extend_from_slice(&[9; 32]);
    named(
        "ssh",
        vec![
            version.clone(),
            [version.clone(), packet(&kexinit)].concat(),
            [version.clone(), packet(&kexinit), packet(&ecdh)].concat(),
            [
                b"banner line\r\n".to_vec(),
                version,
                packet(&[2, 0, 0, 0, 0]),
            ]
            .concat(),
        ],
    )
}
