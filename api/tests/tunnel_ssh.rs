//! The HTTP-upgrade tunnel end to end: a provider node (sshd backend: a
//! real OpenSSH server per lease) and a separate API node, connected over
//! libp2p on loopback; a real `ssh` runs a command in the VM through the
//! API node's `POST /tunnel/{lease}/tcp`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use xe_api::auth::TunnelAuth;
use xe_api::client::ClientError;
use xe_api::{ApiConfig, ApiContext};
use xe_store::{DirectoryEntry, LeaseEvent, LeaseKey, LeaseState, Wallet, now_secs};

/// Read the peer's first line (the SSH identification string).
async fn banner(s: &mut (impl AsyncRead + Unpin)) -> String {
    let work = async {
        let mut got = Vec::new();
        let mut b = [0u8; 256];
        while !got.contains(&b'\n') {
            let n = s.read(&mut b).await.expect("read banner");
            assert!(n > 0, "tunnel closed before the SSH banner");
            got.extend_from_slice(&b[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    tokio::time::timeout(LIMIT, work)
        .await
        .expect("no SSH banner in time")
}

fn status_of(e: &ClientError) -> StatusCode {
    match e {
        ClientError::Status { status, .. } => *status,
        other => panic!("expected an HTTP status, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_runs_a_command_through_the_http_tunnel() {
    if !openssh_available("ssh_runs_a_command_through_the_http_tunnel") {
        return;
    }
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = start_node(&dir.path().join("provider"), true, vec![]).await;
    let boot = p.net.p2p_addrs().await.expect("provider addrs");
    let mut a = start_node(&dir.path().join("api"), false, boot).await;
    wait_peers(&a, 1).await;
    wait_directory(&a.store, &p.wallet.address()).await;

    let ctx = ApiContext::from_node(&a);
    let main = start_api(ctx.clone(), ApiConfig::default()).await;
    let strict = start_api(
        ctx.clone(),
        ApiConfig {
            require_fresh: true,
            ..ApiConfig::default()
        },
    )
    .await;
    let one = start_api(
        ctx.clone(),
        ApiConfig {
            max_tunnels: 1,
            ..ApiConfig::default()
        },
    )
    .await;
    let per_source = start_api(
        ctx.clone(),
        ApiConfig {
            max_tunnels_per_source: 1,
            ..ApiConfig::default()
        },
    )
    .await;
    let p_api = start_api(ApiContext::from_node(&p), ApiConfig::default()).await;

    // The consumer submits its lease to the API node; the provider hears
    // of it over gossip, starts an sshd and accepts.
    let consumer = Wallet::from_seed(rand::random());
    let key_path = dir.path().join("consumer.lease_key");
    let key = LeaseKey::load_or_create(&key_path).expect("lease key");
    let create = LeaseEvent::create(
        &consumer,
        terms(
            &consumer,
            p.wallet.address(),
            key.access_pub_key(),
            now_secs(),
            3600,
        ),
    );
    let lease = create.lease_hash();
    let submitted = main.client().submit(&create).await.expect("submit");
    assert_eq!(submitted.applied, "changed");
    wait_state(&a.store, &lease, LeaseState::Accepted).await;
    let view = main.client().lease(&lease).await.expect("lease");
    let host_key = view
        .vm_host_key
        .clone()
        .expect("accepted lease has a host key");
    let vm = p_api
        .client()
        .vm(&lease)
        .await
        .expect("GET /vms")
        .expect("VM known");
    assert_eq!(vm.status, "running");
    assert_eq!(vm.backend.as_deref(), Some("sshd"));
    assert_eq!(vm.host_key.as_deref(), Some(host_key.as_str()));
    let vms = get(p_api.addr, "/vms").await;
    assert_eq!(vms.json().as_array().expect("list").len(), 1);
    // Each connected peer says how it is reached; on loopback, directly.
    let node = get(p_api.addr, "/node").await.json();
    let peers = node["peers"].as_array().expect("peers");
    assert!(!peers.is_empty());
    assert!(
        peers
            .iter()
            .all(|p| p["path"] == "direct" && p["relayed"] == false),
        "{node}"
    );
    let m = get(p_api.addr, "/metrics").await.text();
    assert!(
        m.lines()
            .any(|l| l.starts_with("xe_peer_connected{") && l.contains("path=\"direct\"")),
        "{m}"
    );
    assert!(
        m.lines().any(|l| l.starts_with("xe_reachability{state=")),
        "{m}"
    );
    // Current nodes secure their connections with AES-GCM, never ChaCha20.
    let handshakes = |cipher: &str| -> u64 {
        let prefix = format!("xe_overlay_handshakes_total{{cipher=\"{cipher}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} sample in\n{m}"))
    };
    assert!(handshakes("aes-256-gcm") >= 1, "{m}");
    assert_eq!(handshakes("chacha20-poly1305"), 0, "{m}");

    // Real ssh through a local forwarder; host key pinned from the lease.
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, format!("{lease} {host_key}\n")).expect("known_hosts");
    let fwd = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind forwarder");
    let port = fwd.local_addr().expect("addr").port();
    let stop = CancellationToken::new();
    let forward = tokio::spawn(xe_api::client::forward(
        fwd,
        main.client(),
        lease,
        Arc::new(LeaseKey::load(&key_path).expect("key")),
        stop.clone(),
    ));
    let user = xe_vm::default_vm_user("sshd");
    for attempt in ["hi", "again"] {
        let mut cmd = Command::new(SSH);
        cmd.args(["-F", "/dev/null", "-p", &port.to_string(), "-i"])
            .arg(&key_path)
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "StrictHostKeyChecking=yes",
            ])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .arg("-o")
            .arg(format!("HostKeyAlias={lease}"))
            .arg(format!("{user}@127.0.0.1"))
            .arg(format!("echo {attempt}"))
            .kill_on_drop(true);
        let out = tokio::time::timeout(LIMIT, cmd.output())
            .await
            .expect("ssh finished in time")
            .expect("run ssh");
        assert!(
            out.status.success(),
            "ssh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{attempt}\n"));
    }
    assert!(main.handle.stats().tunnels_total() >= 2);
    let m = get(main.addr, "/metrics").await.text();
    let bytes = |dir: &str| -> u64 {
        let prefix = format!("xe_tunnel_bytes_total{{via=\"http\",direction=\"{dir}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{m}"))
    };
    assert!(
        bytes("client_to_vm") > 1000 && bytes("vm_to_client") > 1000,
        "{m}"
    );

    // A fresh signature opens a pipe straight to the VM's sshd.
    let node_id = main.client().peer_id().await.expect("the node's peer id");
    let mut t = main
        .client()
        .open_tunnel(
            &lease,
            TunnelAuth::fresh(&key, &lease, &node_id, now_secs()),
        )
        .await
        .expect("fresh tunnel");
    assert!(banner(&mut t).await.starts_with("SSH-2.0-OpenSSH"));
    drop(t);
    // A stale one is refused, though correctly signed.
    let e = main
        .client()
        .open_tunnel(
            &lease,
            TunnelAuth::fresh(&key, &lease, &node_id, now_secs() - 300),
        )
        .await
        .expect_err("stale timestamp");
    assert_eq!(status_of(&e), StatusCode::UNAUTHORIZED, "{e}");

    // Replay of a captured timeless signature: works where the seed's
    // scheme is allowed, refused under --http-tunnel-require-fresh.
    let captured = TunnelAuth::timeless(&key, &lease);
    let mut t = main
        .client()
        .open_tunnel(&lease, captured.clone())
        .await
        .expect("timeless form");
    assert!(banner(&mut t).await.starts_with("SSH-2.0-"));
    drop(t);
    let e = strict
        .client()
        .open_tunnel(&lease, captured)
        .await
        .expect_err("replay refused");
    assert_eq!(status_of(&e), StatusCode::UNAUTHORIZED, "{e}");
    assert!(
        e.to_string()
            .contains("requires the fresh X-Signature form"),
        "{e}"
    );
    let mut t = strict
        .client()
        .open_tunnel(
            &lease,
            TunnelAuth::fresh(&key, &lease, &node_id, now_secs()),
        )
        .await
        .expect("fresh form under require_fresh");
    assert!(banner(&mut t).await.starts_with("SSH-2.0-"));
    drop(t);

    // 503 while the only allowed tunnel is open.
    let mut held = one
        .client()
        .open_tunnel(
            &lease,
            TunnelAuth::fresh(&key, &lease, &node_id, now_secs()),
        )
        .await
        .expect("first tunnel");
    assert!(banner(&mut held).await.starts_with("SSH-2.0-"));
    let e = one
        .client()
        .open_tunnel(
            &lease,
            TunnelAuth::fresh(&key, &lease, &node_id, now_secs()),
        )
        .await
        .expect_err("over the limit");
    assert_eq!(status_of(&e), StatusCode::SERVICE_UNAVAILABLE, "{e}");
    drop(held);
    // 429 once one client holds its share, with room left in all.
    let mut held = per_source
        .client()
        .open_tunnel(
            &lease,
            TunnelAuth::fresh(&key, &lease, &node_id, now_secs()),
        )
        .await
        .expect("first tunnel of this client");
    assert!(banner(&mut held).await.starts_with("SSH-2.0-"));
    let e = per_source
        .client()
        .open_tunnel(
            &lease,
            TunnelAuth::fresh(&key, &lease, &node_id, now_secs()),
        )
        .await
        .expect_err("over this client's share");
    assert_eq!(status_of(&e), StatusCode::TOO_MANY_REQUESTS, "{e}");
    assert!(
        e.to_string().contains("already holds 1 HTTP tunnels"),
        "{e}"
    );
    drop(held);

    // 502 with the provider's own refusal: a lease whose provider account
    // the directory places on the provider node, which knows nothing of it.
    let stranger = Wallet::from_seed(rand::random());
    let entry = DirectoryEntry::sign(
        &stranger,
        p.net.peer_id().to_string(),
        p.net
            .p2p_addrs()
            .await
            .expect("addrs")
            .iter()
            .map(ToString::to_string)
            .collect(),
        now_secs(),
        600,
    );
    a.store.put_directory(&entry).expect("directory entry");
    let orphan = local_lease(
        &a.store,
        &consumer,
        &stranger,
        key.access_pub_key(),
        Some(now_secs()),
        3600,
    );
    let r = post_tunnel(
        main.addr,
        &orphan.to_hex(),
        &tunnel_headers(
            &TunnelAuth::timeless(&key, &orphan).signature.to_hex(),
            None,
            true,
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert!(r.error().contains("provider refused:"), "{}", r.error());

    // Settling closes an open tunnel (the provider tears it down) and
    // later requests get 410.
    let mut open = main
        .client()
        .open_tunnel(
            &lease,
            TunnelAuth::fresh(&key, &lease, &node_id, now_secs()),
        )
        .await
        .expect("tunnel before settle");
    assert!(banner(&mut open).await.starts_with("SSH-2.0-"));
    // The provider's own API reaches the VM in-process (a peer cannot
    // dial itself over the overlay).
    let p_client = p_api.client();
    let p_id = p_client.peer_id().await.expect("the provider's peer id");
    let mut local = p_client
        .open_tunnel(&lease, TunnelAuth::fresh(&key, &lease, &p_id, now_secs()))
        .await
        .expect("tunnel through the provider's own API");
    assert!(banner(&mut local).await.starts_with("SSH-2.0-"));
    let settled = main
        .client()
        .submit(&LeaseEvent::settle(&consumer, lease, now_secs()))
        .await
        .expect("settle");
    assert_eq!(settled.state, Some(LeaseState::Settled));
    for t in [&mut open, &mut local] {
        let closed = tokio::time::timeout(LIMIT, async {
            let mut b = [0u8; 1024];
            loop {
                match t.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a tunnel stayed open after settlement");
    }
    let e = main
        .client()
        .open_tunnel(
            &lease,
            TunnelAuth::fresh(&key, &lease, &node_id, now_secs()),
        )
        .await
        .expect_err("settled lease");
    assert_eq!(status_of(&e), StatusCode::GONE, "{e}");
    assert!(e.to_string().contains("settled"), "{e}");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), forward)
        .await
        .expect("forwarder stops")
        .expect("forwarder task");
    drop((main, strict, one, p_api));
    a.shutdown().await;
    p.shutdown().await;
}
