//! `xe node` as a process with a `--bootstrap` that cannot work: it still
//! prints its ready line once listening, `GET /ready` answers 503 naming
//! the address and the cause, and after 10 s the log warns, naming both;
//! a node bootstrapped to a running one answers 200.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Bound on each poll loop below.
const LIMIT: Duration = Duration::from_secs(40);
/// Pause between polls of a child process we can only observe from outside.
const POLL: Duration = Duration::from_millis(100);

/// GET `path` on `api` until `pred` holds (bounded by [`LIMIT`]).
fn get_until(
    api: &str,
    path: &str,
    pred: impl Fn(u16, &serde_json::Value) -> bool,
) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let (status, body) = http_get(api, path);
        if pred(status, &body) {
            return (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} never matched within {LIMIT:?}; last: {status} {body}"
        );
        std::thread::sleep(POLL);
    }
}

#[test]
fn dead_bootstrap_is_503_then_warned_about_and_a_live_one_is_200() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    // A real node's peer id, at a port where nothing listens.
    let gw = NodeProc::start(&dir.path().join("gw"), &["--api-listen", "127.0.0.1:0"]);
    let stranger = gw.field("peer_id");
    let dead = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{stranger}");
    let node = NodeProc::start(
        &dir.path().join("a"),
        &["--api-listen", "127.0.0.1:0", "--bootstrap", &dead],
    );
    let api = node.field("api_addr");
    let (status, body) = get_until(&api, "/ready", |_, b| {
        b["bootstrap"][0]["last_error"].is_string()
    });
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body["reason"],
        format!("no bootstrap peer connected: {dead}: connection refused (nothing listens there?)")
    );
    let (status, health) = http_get(&api, "/health");
    assert_eq!(status, 200, "liveness stays ok: {health}");

    // The start-up warning, 10 s after start, names the address and cause.
    let deadline = Instant::now() + LIMIT;
    let warning = format!(
        "{dead}: connection refused (nothing listens there?) — 10 s after start; still retrying"
    );
    while !node.log_text().contains(&warning) {
        assert!(
            Instant::now() < deadline,
            "no start-up warning {warning:?} in:\n{}",
            node.log_text()
        );
        std::thread::sleep(POLL);
    }
    // Each redial (every 5 s) fails the same way: logged as a warning once.
    let warned = node
        .log_text()
        .matches(&format!("bootstrap {dead} failed: connection refused"))
        .count();
    assert_eq!(
        warned,
        1,
        "one warning per distinct failure:\n{}",
        node.log_text()
    );

    let boot = gw.bootstrap_args();
    let mut args = vec!["--api-listen", "127.0.0.1:0"];
    args.extend(boot.iter().map(String::as_str));
    let live = NodeProc::start(&dir.path().join("b"), &args);
    let (_, body) = get_until(&live.field("api_addr"), "/ready", |s, _| s == 200);
    assert_eq!(body["ready"], true);
    assert_eq!(body["bootstrap"][0]["connected"], true);
}
