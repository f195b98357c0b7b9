//! `GET /metrics`: Prometheus text exposition (format 0.0.4), written by
//! hand from the node's counters. Every family is always present (zeros
//! included), so dashboards and alerts do not depend on what has happened.

use std::fmt::Write;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use xe_store::LeaseState;

use crate::App;
use crate::error::HttpError;
use crate::stats::TUNNEL_REFUSAL_STATUSES;

/// The exposition's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                // Label values here are fixed identifiers; escape anyway.
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

pub(crate) async fn metrics(State(app): State<App>) -> Result<Response, HttpError> {
    let mut o = Out(String::with_capacity(8192));
    let g = app
        .ctx
        .gateway_stats
        .as_ref()
        .map(|s| s.snapshot())
        .unwrap_or_default();

    // ---- SSH gateway
    o.one(
        "xe_ssh_connections_active",
        "gauge",
        "SSH gateway connections open now (0 when the gateway is off).",
        g.connections_active,
    );
    o.one(
        "xe_ssh_connections_total",
        "counter",
        "SSH gateway connections accepted since start.",
        g.connections_total,
    );
    o.family(
        "xe_ssh_connections_refused_total",
        "counter",
        "SSH gateway connections closed unserved, by reason.",
    );
    for (reason, n) in &g.refused {
        o.sample(
            "xe_ssh_connections_refused_total",
            &[("reason", reason.as_str())],
            *n,
        );
    }
    if g.refused.is_empty() {
        for r in xe_node::gateway::ConnectionRefusal::ALL {
            o.sample(
                "xe_ssh_connections_refused_total",
                &[("reason", r.as_str())],
                0,
            );
        }
    }
    o.one(
        "xe_ssh_auth_successes_total",
        "counter",
        "SSH gateway authentications that succeeded.",
        g.auth_successes,
    );
    o.family(
        "xe_ssh_auth_failures_total",
        "counter",
        "SSH gateway authentication attempts rejected, by reason.",
    );
    for (reason, n) in &g.auth_failures {
        o.sample(
            "xe_ssh_auth_failures_total",
            &[("reason", reason.as_str())],
            *n,
        );
    }
    if g.auth_failures.is_empty() {
        for r in xe_node::gateway::AuthFailure::ALL {
            o.sample("xe_ssh_auth_failures_total", &[("reason", r.as_str())], 0);
        }
    }
    o.one(
        "xe_ssh_tunnel_failures_total",
        "counter",
        "SSH gateway tunnel opens that failed (provider unreachable or refusing).",
        g.tunnel_failures,
    );
    o.one(
        "xe_ssh_connections_paced_total",
        "counter",
        "SSH connections whose key exchange waited for their source's connection rate.",
        g.paced,
    );

    // ---- tunnels
    o.family(
        "xe_tunnels_active",
        "gauge",
        "Tunnels open now: via=ssh (gateway sessions), http (this API's upgrade tunnels), served (provider side, /xe/tunnel/2.0.0 streams into VMs).",
    );
    o.sample("xe_tunnels_active", &[("via", "ssh")], g.tunnels_active);
    o.sample(
        "xe_tunnels_active",
        &[("via", "http")],
        app.stats.tunnels_active(),
    );
    o.sample(
        "xe_tunnels_active",
        &[("via", "served")],
        app.ctx.net.registry().active() as u64,
    );
    o.family(
        "xe_tunnel_bytes_total",
        "counter",
        "Payload bytes relayed, by path and direction.",
    );
    for (via, c2v, v2c) in [
        ("ssh", g.bytes_client_to_vm, g.bytes_vm_to_client),
        (
            "http",
            app.stats.bytes_client_to_vm(),
            app.stats.bytes_vm_to_client(),
        ),
    ] {
        o.sample(
            "xe_tunnel_bytes_total",
            &[("via", via), ("direction", "client_to_vm")],
            c2v,
        );
        o.sample(
            "xe_tunnel_bytes_total",
            &[("via", via), ("direction", "vm_to_client")],
            v2c,
        );
    }
    o.one(
        "xe_http_tunnels_total",
        "counter",
        "HTTP upgrade tunnels opened since start.",
        app.stats.tunnels_total(),
    );
    o.family(
        "xe_http_tunnel_refusals_total",
        "counter",
        "HTTP tunnel requests refused, by status code.",
    );
    for s in TUNNEL_REFUSAL_STATUSES {
        o.sample(
            "xe_http_tunnel_refusals_total",
            &[("status", &s.to_string())],
            app.stats.tunnel_refusals(s),
        );
    }
    o.one(
        "xe_http_rate_limited_total",
        "counter",
        "Write requests refused with 429.",
        app.stats.rate_limited(),
    );
    o.one(
        "xe_http_body_too_large_total",
        "counter",
        "Requests refused with 413.",
        app.stats.bodies_too_large(),
    );
    o.one(
        "xe_http_body_timeout_total",
        "counter",
        "Requests whose body did not arrive in time (408).",
        app.stats.bodies_too_slow(),
    );
    o.one(
        "xe_http_connections_refused_total",
        "counter",
        "Connections refused by the per-source or global cap.",
        app.stats.connections_refused(),
    );
    o.one(
        "xe_http_connections_open",
        "gauge",
        "HTTP connections open now (upgraded tunnels excluded).",
        app.conns.open() as u64,
    );

    // ---- ledger
    // One record at a time: a scrape's memory does not grow with the
    // ledger (its time does, ≈ 3 µs a lease).
    let store = app.ctx.store.clone();
    let now = xe_store::now_secs();
    let counts = tokio::task::spawn_blocking(move || {
        let mut counts = [0u64; LeaseState::ALL.len()];
        store.for_each_lease(|r| {
            let st = r.state_at(now);
            if let Some(i) = LeaseState::ALL.iter().position(|s| *s == st) {
                counts[i] += 1;
            }
            Ok(())
        })?;
        Ok::<_, xe_store::StoreError>(counts)
    })
    .await
    .map_err(|e| HttpError::internal(format!("store task failed: {e}")))??;
    o.family(
        "xe_leases",
        "gauge",
        "Leases in this node's ledger copy, by state.",
    );
    for (st, n) in LeaseState::ALL.iter().zip(counts) {
        o.sample("xe_leases", &[("state", st.as_str())], n);
    }
    let ns = app.ctx.net.stats();
    o.one(
        "xe_replication_lag_seconds",
        "gauge",
        "Seconds between the last replicated lease event's own timestamp and its arrival here.",
        ns.last_replication_lag_secs
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    o.one(
        "xe_replication_events_applied_total",
        "counter",
        "Lease events applied from the network (gossip or sync).",
        ns.events_applied.load(std::sync::atomic::Ordering::Relaxed),
    );
    o.one(
        "xe_replication_invalid_messages_total",
        "counter",
        "Gossip messages rejected by validation.",
        ns.invalid_messages
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    o.family(
        "xe_overlay_handshakes_total",
        "counter",
        "libp2p connections secured since start, by cipher (aes-256-gcm: /xe/noise-aesgcm; chacha20-poly1305: standard /noise).",
    );
    for (cipher, n) in [
        ("aes-256-gcm", &ns.handshakes.aes_gcm),
        ("chacha20-poly1305", &ns.handshakes.chacha20),
    ] {
        o.sample(
            "xe_overlay_handshakes_total",
            &[("cipher", cipher)],
            n.load(std::sync::atomic::Ordering::Relaxed),
        );
    }
    o.one(
        "xe_peers_connected",
        "gauge",
        "libp2p peers connected now.",
        *app.ctx.net.peer_count().borrow() as u64,
    );
    let peers = app.ctx.net.peers().await.unwrap_or_default();
    o.family(
        "xe_peer_connected",
        "gauge",
        "1 per connected peer, labelled with how it is reached (direct, relayed, direct+relayed).",
    );
    for p in &peers {
        o.sample(
            "xe_peer_connected",
            &[("peer", &p.peer_id), ("path", &p.path().to_string())],
            1,
        );
    }
    o.family(
        "xe_reachability",
        "gauge",
        "1 for what AutoNAT concluded about this node (public, private, unknown).",
    );
    o.sample(
        "xe_reachability",
        &[("state", &app.ctx.net.reachability().to_string())],
        1,
    );

    // ---- provider
    if let Some(p) = &app.ctx.provider {
        let vms = p.vm().list().await;
        o.family("xe_vms", "gauge", "VMs on this provider, by status.");
        for st in ["provisioning", "running", "stopped", "error"] {
            let n = vms.iter().filter(|v| v.status.to_string() == st).count() as u64;
            o.sample("xe_vms", &[("status", st)], n);
        }
    }

    let mut resp = o.0.into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    Ok(resp)
}
