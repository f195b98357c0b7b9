//! The API over real HTTP on loopback against one in-process node: every
//! route, every refusal status of the tunnel endpoint that does not need
//! a reachable VM, the body cap and the write rate limit.

mod common;

use std::net::SocketAddr;

use axum::http::{Method, StatusCode};
use common::*;
use xe_api::auth::{TunnelAuth, signing_message};
use xe_api::{ApiConfig, ApiContext, RateLimit};
use xe_store::{LeaseEvent, LeaseKey, LeaseState, Wallet, now_secs};

struct World {
    _dir: tempfile::TempDir,
    node: xe_node::Node,
    consumer: Wallet,
    provider: Wallet,
    key: LeaseKey,
}

async fn world() -> World {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_node(&dir.path().join("node"), false, vec![]).await;
    let key = LeaseKey::load_or_create(&dir.path().join("consumer.lease_key")).expect("lease key");
    World {
        node,
        consumer: Wallet::from_seed(rand::random()),
        provider: Wallet::from_seed(rand::random()),
        key,
        _dir: dir,
    }
}

#[tokio::test]
async fn read_routes_answer_json() {
    let mut w = world().await;
    let api = start_api(ApiContext::from_node(&w.node), ApiConfig::default()).await;
    let store = &w.node.store;
    let active = local_lease(
        store,
        &w.consumer,
        &w.provider,
        w.key.access_pub_key(),
        Some(now_secs()),
        3600,
    );
    let created = local_lease(
        store,
        &w.consumer,
        &w.provider,
        w.key.access_pub_key(),
        None,
        3600,
    );

    let r = get(api.addr, "/health").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["status"], "ok");

    let r = get(api.addr, "/node").await;
    assert_eq!(r.status, StatusCode::OK);
    let n = r.json();
    assert_eq!(n["peer_id"], w.node.net.peer_id().to_string());
    assert_eq!(n["address"], w.node.wallet.address().to_string());
    assert_eq!(n["ssh_port"], 0);
    assert_eq!(n["api_port"], api.addr.port());
    assert_eq!(n["version"], env!("CARGO_PKG_VERSION"));
    assert!(n["peers"].as_array().expect("peers").is_empty());
    assert_eq!(n["roles"], serde_json::json!(["replica", "api"]));
    let addrs = n["listen_addrs"].as_array().expect("listen_addrs");
    assert!(!addrs.is_empty());
    for a in addrs {
        assert!(
            a.as_str()
                .expect("str")
                .ends_with(&format!("/p2p/{}", w.node.net.peer_id())),
            "{a}"
        );
    }

    let r = get(api.addr, "/leases").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json().as_array().expect("list").len(), 2);
    let r = get(api.addr, "/leases?state=accepted").await;
    let list = r.json();
    assert_eq!(list.as_array().expect("list").len(), 1);
    let l = &list[0];
    assert_eq!(l["lease_hash"], active.to_hex());
    assert_eq!(l["state"], "accepted");
    assert_eq!(l["consumer"], w.consumer.address().to_string());
    assert_eq!(l["provider"], w.provider.address().to_string());
    assert_eq!(l["access_pub_key"], w.key.access_pub_key().to_string());
    assert_eq!(
        (
            l["vcpus"].as_u64(),
            l["memory_mb"].as_u64(),
            l["disk_gb"].as_u64()
        ),
        (Some(1), Some(512), Some(1))
    );
    assert_eq!(l["duration"], 3600);
    assert_eq!(l["vm_host_key"], UNUSED_VM_HOST_KEY);
    let r = get(
        api.addr,
        &format!("/leases?state=created&consumer={}", w.consumer.address()),
    )
    .await;
    assert_eq!(r.json()[0]["lease_hash"], created.to_hex());
    assert!(r.json()[0]["vm_host_key"].is_null());
    let r = get(
        api.addr,
        &format!("/leases?provider={}", w.node.wallet.address()),
    )
    .await;
    assert!(r.json().as_array().expect("list").is_empty());

    let r = get(api.addr, "/leases?state=running").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.error().contains("unknown lease state \"running\""),
        "{}",
        r.error()
    );
    let r = get(api.addr, "/leases?consumer=xyz").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.error().starts_with("consumer: account address"),
        "{}",
        r.error()
    );

    let r = get(api.addr, &format!("/leases/{active}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["state"], "accepted");
    let r = get(api.addr, &format!("/leases/{}", "ab".repeat(32))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error(), format!("unknown lease {}", "ab".repeat(32)));
    let r = get(api.addr, "/leases/12345").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.error(),
        "lease \"12345\": give the 64-hex lease hash or at least its first 8 hex digits"
    );
    let r = get(api.addr, "/leases/12345xyz").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.error(),
        "lease hash: invalid character 'x' at position 5 (expected 0-9, a-f)"
    );
    // The short form xe prints (and any longer prefix, any case) names the
    // lease when it is unique here.
    let full = active.to_string();
    for prefix in [&full[..8], &full[..13], &full.to_uppercase()[..20]] {
        let r = get(api.addr, &format!("/leases/{prefix}")).await;
        assert_eq!(r.status, StatusCode::OK, "{prefix}: {}", r.error());
        assert_eq!(r.json()["lease_hash"], full.as_str());
    }
    let r = get(api.addr, "/leases/00000000").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(
        r.error().starts_with("no lease here starts with 00000000"),
        "{}",
        r.error()
    );
    // A long poll whose state already differs from `since` answers at once.
    let r = get(api.addr, &format!("/leases/{active}?wait=30&since=created")).await;
    assert_eq!(r.json()["state"], "accepted");
    let r = get(api.addr, &format!("/leases/{active}?wait=soon")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let r = get(api.addr, "/providers").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json().as_array().expect("list").is_empty());

    let r = get(api.addr, "/vms").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.error().contains("not a provider"), "{}", r.error());
    let r = get(api.addr, &format!("/vms/{active}")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let r = get(api.addr, "/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error(), "no route GET /nope");
    let r = http(api.addr, Method::DELETE, "/leases", &[], None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);

    let r = get(api.addr, "/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.headers["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        r.headers
    );
    let m = r.text();
    for line in [
        "xe_leases{state=\"accepted\"} 1",
        "xe_leases{state=\"created\"} 1",
        "xe_leases{state=\"settled\"} 0",
        "xe_ssh_connections_active 0",
        "xe_ssh_connections_total 0",
        "xe_ssh_connections_refused_total{reason=\"connection_limit\"} 0",
        "xe_ssh_auth_failures_total{reason=\"wrong_key\"} 0",
        "xe_tunnels_active{via=\"http\"} 0",
        "xe_tunnel_bytes_total{via=\"http\",direction=\"client_to_vm\"} 0",
        "xe_replication_lag_seconds 0",
        "# TYPE xe_http_tunnel_refusals_total counter",
    ] {
        assert!(m.lines().any(|l| l == line), "metrics lack {line:?}:\n{m}");
    }
    w.node.shutdown().await;
}

#[tokio::test]
async fn post_leases_applies_or_names_the_failed_check() {
    let mut w = world().await;
    let api = start_api(ApiContext::from_node(&w.node), ApiConfig::default()).await;
    let ev = LeaseEvent::create(
        &w.consumer,
        terms(
            &w.consumer,
            w.provider.address(),
            w.key.access_pub_key(),
            now_secs(),
            3600,
        ),
    );
    let hash = ev.lease_hash();

    let r = post_json(api.addr, "/leases", &ev).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let j = r.json();
    assert_eq!(j["lease_hash"], hash.to_hex());
    assert_eq!(j["kind"], "create");
    assert_eq!(j["applied"], "changed");
    assert_eq!(j["state"], "created");
    assert_eq!(
        w.node
            .store
            .lease(&hash)
            .expect("read")
            .expect("stored")
            .state(),
        LeaseState::Created
    );

    let r = post_json(api.addr, "/leases", &ev).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["applied"], "duplicate");

    // A tampered signature: the check is named, nothing changes.
    let mut bad = serde_json::to_value(&ev).expect("json");
    bad["lease"]["vcpus"] = serde_json::json!(2);
    let r = post_json(api.addr, "/leases", &bad).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.error().contains("bad signature on create event"),
        "{}",
        r.error()
    );

    // Terms out of range.
    let mut t = terms(
        &w.consumer,
        w.provider.address(),
        w.key.access_pub_key(),
        now_secs(),
        3600,
    );
    t.vcpus = 0;
    let r = post_json(api.addr, "/leases", &LeaseEvent::create(&w.consumer, t)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("vcpus"), "{}", r.error());

    // A stranger may not cancel.
    let stranger = Wallet::from_seed(rand::random());
    let r = post_json(
        api.addr,
        "/leases",
        &LeaseEvent::cancel(&stranger, hash, now_secs()),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.error().contains("only the lease's consumer may sign it"),
        "{}",
        r.error()
    );

    // Not an event at all.
    let r = http(
        api.addr,
        Method::POST,
        "/leases",
        &[],
        Some(b"{\"kind\":\"launch\"}".to_vec()),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.error().starts_with("body is not a lease event"),
        "{}",
        r.error()
    );

    // Oversized body: refused before parsing, nothing stored.
    let before = w.node.store.event_count();
    let huge = vec![b' '; xe_api::DEFAULT_MAX_BODY_BYTES + 1];
    let r = http(
        api.addr,
        Method::POST,
        "/leases",
        &[("content-type", "application/json")],
        Some(huge),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.error().contains("16384 byte limit"), "{}", r.error());
    assert_eq!(w.node.store.event_count(), before);
    assert_eq!(api.handle.stats().bodies_too_large(), 1);

    // The consumer's cancel applies.
    let r = post_json(
        api.addr,
        "/leases",
        &LeaseEvent::cancel(&w.consumer, hash, now_secs()),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.json()["state"], "cancelled");
    w.node.shutdown().await;
}

#[tokio::test]
async fn writes_are_rate_limited_per_client() {
    let mut w = world().await;
    let config = ApiConfig {
        // Two writes, then (practically) never again within the test.
        write_rate: RateLimit {
            burst: 2,
            per_second: 0.01,
        },
        ..ApiConfig::default()
    };
    let api = start_api(ApiContext::from_node(&w.node), config).await;
    for _ in 0..2 {
        let ev = LeaseEvent::create(
            &w.consumer,
            terms(
                &w.consumer,
                w.provider.address(),
                w.key.access_pub_key(),
                now_secs(),
                3600,
            ),
        );
        assert_eq!(
            post_json(api.addr, "/leases", &ev).await.status,
            StatusCode::CREATED
        );
    }
    let ev = LeaseEvent::create(
        &w.consumer,
        terms(
            &w.consumer,
            w.provider.address(),
            w.key.access_pub_key(),
            now_secs(),
            3600,
        ),
    );
    let r = post_json(api.addr, "/leases", &ev).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("Retry-After is whole seconds");
    assert!((90..=100).contains(&retry), "Retry-After {retry}");
    assert!(
        r.error().contains("too many write requests"),
        "{}",
        r.error()
    );
    assert!(
        w.node
            .store
            .lease(&ev.lease_hash())
            .expect("read")
            .is_none()
    );
    // Tunnel opens are writes too.
    let r = post_tunnel(
        api.addr,
        &"ab".repeat(32),
        &tunnel_headers("00", None, true),
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    // Reads are not limited.
    assert_eq!(get(api.addr, "/leases").await.status, StatusCode::OK);
    assert_eq!(api.handle.stats().rate_limited(), 2);
    w.node.shutdown().await;
}

#[tokio::test]
async fn tunnel_refusals_have_their_status_codes() {
    let mut w = world().await;
    let ctx = ApiContext::from_node(&w.node);
    let api = start_api(ctx.clone(), ApiConfig::default()).await;
    let store = &w.node.store;
    let now = now_secs();
    let access = w.key.access_pub_key();
    let active = local_lease(store, &w.consumer, &w.provider, access, Some(now), 3600);
    let created = local_lease(store, &w.consumer, &w.provider, access, None, 3600);
    let expired = local_lease(
        store,
        &w.consumer,
        &w.provider,
        access,
        Some(now - 7200),
        60,
    );
    let settled = local_lease(store, &w.consumer, &w.provider, access, Some(now), 3600);
    store
        .apply_event(&LeaseEvent::settle(&w.consumer, settled, now))
        .expect("settle");

    let sig = |h: &xe_store::LeaseHash| TunnelAuth::timeless(&w.key, h).signature.to_hex();
    let me = w.node.net.peer_id().to_string();
    // A fresh signature for this node at `ts`: (X-Signature, its headers).
    let fresh = |h: &xe_store::LeaseHash, ts: u64| {
        let a = TunnelAuth::fresh(&w.key, h, &me, ts);
        (a.signature.to_hex(), fresh_headers(&a))
    };
    let expect = |r: Resp, status: u16, contains: &str| {
        assert_eq!(r.status.as_u16(), status, "{}", r.text());
        assert!(
            r.error().contains(contains),
            "{status}: {:?} lacks {contains:?}",
            r.error()
        );
    };

    // 426 first, on its own: its answer also names the upgrade to ask for.
    let r = post_tunnel(
        api.addr,
        &active.to_hex(),
        &tunnel_headers(&sig(&active), None, false),
    )
    .await;
    assert_eq!(r.headers["upgrade"], "xe-tunnel");
    expect(r, 426, "Upgrade: xe-tunnel");

    // 503: a server allowing no tunnels at all refuses before dialling.
    let none = start_api(
        ctx.clone(),
        ApiConfig {
            max_tunnels: 0,
            ..ApiConfig::default()
        },
    )
    .await;
    // --http-tunnel-require-fresh: the timeless form is refused with 401
    // (the same signature gets as far as 502 on the default server).
    let strict = start_api(
        ctx,
        ApiConfig {
            require_fresh: true,
            ..ApiConfig::default()
        },
    )
    .await;

    let timeless = |h: &xe_store::LeaseHash| tunnel_headers(&sig(h), None, true);
    let signed_fresh = |ts: u64| {
        let (sg, h) = fresh(&active, ts);
        tunnel_headers(&sg, Some(&h), true)
    };
    let other = LeaseKey::load_or_create(&w._dir.path().join("other.lease_key")).expect("key");
    let (_, fh) = fresh(&active, now);
    let mut old_form = timeless(&active);
    old_form.push(("x-timestamp", now.to_string()));
    let elsewhere = TunnelAuth::fresh(
        &w.key,
        &active,
        "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA",
        now,
    );
    let mut wrong_upgrade = tunnel_headers(&sig(&active), None, false);
    wrong_upgrade.push(("connection", "Upgrade".into()));
    wrong_upgrade.push(("upgrade", "websocket".into()));
    let once = signed_fresh(now);
    let bad_ts = Some(("yesterday".into(), "00".repeat(16), me.clone()));
    let upgrade_only = vec![
        ("connection", "Upgrade".to_string()),
        ("upgrade", "xe-tunnel".to_string()),
    ];
    let a = active.to_hex();
    type Headers = Vec<(&'static str, String)>;
    // (case, server, lease, headers, status, what the error says). Run in
    // order: the replay row must follow the row that used `once` first.
    #[rustfmt::skip]
    let cases: Vec<(&str, SocketAddr, String, Headers, u16, &str)> = vec![
        ("malformed lease hash", api.addr, "not-a-hash".into(), timeless(&active), 400,
            "lease hash: invalid character 'n' at position 0"),
        ("malformed signature", api.addr, a.clone(), tunnel_headers("abcd", None, true), 400,
            "X-Signature: signature: expected 128 hex characters, got 4"),
        ("malformed timestamp", api.addr, a.clone(), tunnel_headers(&sig(&active), bad_ts.as_ref(), true), 400,
            "X-Timestamp: expected unix seconds"),
        ("no signature", api.addr, a.clone(), upgrade_only, 401, "missing X-Signature"),
        ("unknown lease", api.addr, "cd".repeat(32), timeless(&active), 404, "unknown lease"),
        ("signed by another key", api.addr, a.clone(),
            tunnel_headers(&TunnelAuth::timeless(&other, &active).signature.to_hex(), None, true),
            403, "does not verify"),
        ("signature over other bytes", api.addr, a.clone(), tunnel_headers(&sig(&created), None, true),
            403, "does not verify"),
        ("timeless signature with the fresh headers", api.addr, a.clone(),
            tunnel_headers(&sig(&active), Some(&fh), true), 403, "X-Timestamp u64 big-endian"),
        ("the older fresh form, X-Timestamp alone", api.addr, a.clone(), old_form, 401,
            "needs all of X-Timestamp"),
        ("signed for another node", api.addr, a.clone(),
            tunnel_headers(&elsewhere.signature.to_hex(), Some(&fresh_headers(&elsewhere)), true),
            401, "opens a tunnel only at the node it was signed for"),
        ("stale timestamp", api.addr, a.clone(), signed_fresh(now - 120), 401,
            "s old by this node's clock (allowed ±60 s)"),
        ("future timestamp", api.addr, a.clone(), signed_fresh(now + 120), 401, "in the future"),
        ("created lease", api.addr, created.to_hex(), timeless(&created), 410, "created"),
        ("expired lease", api.addr, expired.to_hex(), timeless(&expired), 410, "expired"),
        ("settled lease", api.addr, settled.to_hex(), timeless(&settled), 410, "settled"),
        ("upgrade to another protocol", api.addr, a.clone(), wrong_upgrade, 426, "Upgrade: xe-tunnel"),
        // Everything checks out but the provider is nowhere to be found.
        ("provider not in the directory", api.addr, a.clone(), timeless(&active), 502,
            "is not in the directory"),
        // A fresh signature within the window gets as far (502, not 401)…
        ("fresh signature, first use", api.addr, a.clone(), once.clone(), 502,
            "tunnel to the provider failed"),
        // …once: the same headers again are a replay, refused before any dial.
        ("fresh signature, replayed", api.addr, a.clone(), once, 401, "already used at this node"),
        ("server allowing no tunnels", none.addr, a.clone(), timeless(&active), 503,
            "at its limit of 0 HTTP tunnels"),
        ("timeless form where fresh is required", strict.addr, a.clone(), timeless(&active), 401,
            "requires the fresh X-Signature form"),
    ];
    for (case, addr, lease, headers, status, contains) in cases {
        let r = post_tunnel(addr, &lease, &headers).await;
        assert_eq!(r.status.as_u16(), status, "{case}: {}", r.text());
        assert!(
            r.error().contains(contains),
            "{case}: {status}: {:?} lacks {contains:?}",
            r.error()
        );
    }
    assert_eq!(
        get(strict.addr, "/node").await.json()["http_tunnel_require_fresh"],
        true
    );

    // Signed message layout, as documented.
    assert_eq!(signing_message(&active, None), active.as_bytes().to_vec());

    let m = get(api.addr, "/metrics").await.text();
    for (status, n) in [
        (400, 3),
        // missing, stale, future, X-Timestamp alone, another node's, a replay
        (401, 6),
        (403, 3),
        (404, 1),
        (410, 3),
        (426, 2),
        (502, 2),
    ] {
        let line = format!("xe_http_tunnel_refusals_total{{status=\"{status}\"}} {n}");
        assert!(m.lines().any(|l| l == line), "metrics lack {line:?}:\n{m}");
    }
    w.node.shutdown().await;
}
