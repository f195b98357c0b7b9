//! NAT traversal with real network namespaces, real `xe node` processes and
//! real OpenSSH (see `common/netns.rs` for the topology):
//!
//! - the relay node (SSH gateway + relay server) sits on the "internet";
//! - the provider sits behind a MASQUERADE router with no inbound
//!   forwarding and no port mapping, bootstrapped to the relay only;
//! - the consumer's gateway node sits behind another such router.
//!
//! Neither site can open a connection to the other, so the only way from
//! the gateway to the provider is a relay circuit — and with the relay
//! switched off, the provider is unreachable from that gateway.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::netns::{self, Topology, in_netns, output_within, plain};
use common::*;
use sha2::{Digest, Sha256};

/// Bytes moved over the relayed path, each direction.
const BIG: usize = 100 << 20;

fn start_relay(t: &Topology, data: &Path, relay_server: bool) -> NodeProc {
    // One listener per link (not 0.0.0.0), so the ready line lists both
    // addresses: a wildcard listener reports interface addresses one by
    // one, possibly after the ready line.
    let to_p = format!("/ip4/{}/tcp/0", netns::PUB_TO_P);
    let to_g = format!("/ip4/{}/tcp/0", netns::PUB_TO_G);
    let mut args = vec![
        "--p2p-listen",
        &to_p,
        "--p2p-listen",
        &to_g,
        "--ssh-listen",
        "127.0.0.1:0",
    ];
    if !relay_server {
        args.push("--no-relay-server");
    }
    NodeProc::start_in(&t.public, data, &args)
}

/// The relay's p2p address on the link facing `ip`'s side.
fn addr_facing(node: &NodeProc, ip: &str) -> String {
    node.ready["p2p_addrs"]
        .as_array()
        .expect("p2p_addrs")
        .iter()
        .filter_map(|a| a.as_str())
        .find(|a| a.starts_with(&format!("/ip4/{ip}/")))
        .unwrap_or_else(|| panic!("no p2p address on {ip}: {}", node.ready))
        .to_string()
}

fn start_provider(t: &Topology, data: &Path, bootstrap: &str) -> NodeProc {
    NodeProc::start_in(
        &t.p,
        data,
        &[
            "--p2p-listen",
            "/ip4/0.0.0.0/tcp/0",
            "--provide",
            "--vm-backend",
            "sshd",
            "--bootstrap",
            bootstrap,
        ],
    )
}

fn start_gateway(t: &Topology, data: &Path, bootstrap: &str) -> NodeProc {
    NodeProc::start_in(
        &t.g,
        data,
        &[
            "--p2p-listen",
            "/ip4/0.0.0.0/tcp/0",
            "--ssh-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            // A gateway behind NAT is of no use as a relay.
            "--no-relay-server",
            "--bootstrap",
            bootstrap,
        ],
    )
}

struct Consumer {
    wallet: PathBuf,
    known_hosts: PathBuf,
}

impl Consumer {
    fn new(dir: &Path) -> Consumer {
        let wallet = dir.join("consumer.seed");
        let out = std::process::Command::new(xe_bin())
            .args(["wallet", "create", "--wallet"])
            .arg(&wallet)
            .output()
            .expect("xe wallet create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Consumer {
            wallet,
            known_hosts: dir.join("known_hosts"),
        }
    }

    /// `xe lease create --wait` against `node`'s API, inside `netns`;
    /// returns the lease hash and the VM host key from the accept.
    fn lease(&self, netns: &str, node: &NodeProc, provider: &str) -> (String, String) {
        let url = format!("http://{}", node.field("api_addr"));
        let wallet = self.wallet.to_str().expect("utf-8 path");
        let out = output_within(
            in_netns(
                netns,
                &xe_bin(),
                &[
                    "lease",
                    "create",
                    "--provider",
                    provider,
                    "--node",
                    &url,
                    "--wallet",
                    wallet,
                    "--wait",
                    "--timeout",
                    "120",
                ],
            ),
            None,
            Duration::from_secs(150),
        );
        assert!(
            out.status.success(),
            "lease create: {}\nprovider/gateway log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            node.log_text()
        );
        let lease = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("lease hash line")
            .trim()
            .to_string();
        let out = output_within(
            in_netns(
                netns,
                &xe_bin(),
                &["lease", "show", &lease, "--json", "--node", &url],
            ),
            None,
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("lease json");
        let host_key = v["vm_host_key"]
            .as_str()
            .expect("accepted lease has a host key");
        (lease, host_key.to_string())
    }

    /// `xe ssh` (real OpenSSH, ProxyCommand -W through `gateway`) inside
    /// `netns`, running `cmd` in the VM.
    fn ssh(
        &self,
        netns: &str,
        gateway: &NodeProc,
        lease: &str,
        host_key: &str,
        cmd: &str,
        stdin: Option<&Path>,
    ) -> std::process::Output {
        let gw = gateway.field("ssh_addr");
        let wallet = self.wallet.to_str().expect("utf-8 path");
        let kh = self.known_hosts.to_str().expect("utf-8 path");
        output_within(
            in_netns(
                netns,
                &xe_bin(),
                &[
                    "ssh",
                    "--gateway",
                    &gw,
                    "--wallet",
                    wallet,
                    "--known-hosts",
                    kh,
                    "--host-key",
                    host_key,
                    "--user",
                    "root",
                    lease,
                    "--",
                    cmd,
                ],
            ),
            stdin,
            Duration::from_secs(240),
        )
    }
}

/// Wait until the provider's NAT event reports private reachability and,
/// if `relayed`, at least one relay address.
fn wait_private(p: &NodeProc, relayed: bool) -> serde_json::Value {
    p.wait_event(
        if relayed {
            "nat: private with a relay address"
        } else {
            "nat: private"
        },
        Duration::from_secs(90),
        |v| {
            v["event"] == "nat"
                && v["reachability"] == "private"
                && (!relayed || v["relay_addrs"].as_array().is_some_and(|a| !a.is_empty()))
        },
    )
}

/// A 100 MiB file of pseudo-random bytes and its sha256.
fn big_file(dir: &Path) -> (PathBuf, String) {
    let path = dir.join("big.bin");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    let mut h = Sha256::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..BIG / block.len() {
        for chunk in block.chunks_mut(8) {
            // xorshift64: incompressible enough that nothing on the path
            // can shortcut it.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        h.update(&block);
        f.write_all(&block).expect("write");
    }
    f.flush().expect("flush");
    (path, hex::encode(h.finalize()))
}

#[test]
fn nat_provider_is_reached_through_the_relay_with_real_ssh() {
    const TEST: &str = "nat_provider_is_reached_through_the_relay_with_real_ssh";
    if !openssh_available(TEST) || !netns::available(TEST) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // Declared first, dropped last: nodes stop before the namespaces go.
    let t = Topology::create();
    let relay = start_relay(&t, &dir.path().join("relay"), true);
    let provider = start_provider(
        &t,
        &dir.path().join("p"),
        &addr_facing(&relay, netns::PUB_TO_P),
    );

    // No --behind-nat: AutoNAT finds out (the relay's dial-back to the
    // router's address is refused), then the provider reserves a slot on
    // its bootstrap relay and announces the circuit address.
    let nat = wait_private(&provider, true);
    let relay_id = relay.field("peer_id");
    let addrs: Vec<&str> = nat["relay_addrs"]
        .as_array()
        .expect("relay_addrs")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        addrs
            .iter()
            .all(|a| a.contains(&format!("/p2p/{relay_id}/p2p-circuit"))),
        "{addrs:?}"
    );

    let gateway = start_gateway(
        &t,
        &dir.path().join("g"),
        &addr_facing(&relay, netns::PUB_TO_G),
    );
    let consumer = Consumer::new(dir.path());
    let (lease, host_key) = consumer.lease(&t.g, &gateway, &provider.field("account"));

    // Real ssh in the gateway's site reaches the VM (sshd in the
    // provider's namespace: it sees the provider's private address).
    let out = consumer.ssh(
        &t.g,
        &gateway,
        &lease,
        &host_key,
        "echo hello from the vm; ip -o -4 addr show dev eth0",
        None,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("hello from the vm\n"),
        "ssh failed: {}\n{stdout}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gateway.log_text()
    );
    assert!(
        stdout.contains(&format!("inet {}/", netns::HOST_P)),
        "the session runs on the provider's host: {stdout}"
    );

    // 100 MiB up and 100 MiB down over the relayed path, byte-exact.
    let (big, digest) = big_file(dir.path());
    let t0 = std::time::Instant::now();
    let up = consumer.ssh(&t.g, &gateway, &lease, &host_key, "sha256sum", Some(&big));
    let up_time = t0.elapsed();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&up.stdout)
            .split_whitespace()
            .next(),
        Some(digest.as_str()),
        "upload is byte-exact"
    );
    let t0 = std::time::Instant::now();
    let down = consumer.ssh(
        &t.g,
        &gateway,
        &lease,
        &host_key,
        &format!("cat {}", big.display()),
        None,
    );
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let down_time = t0.elapsed();
    eprintln!(
        "100 MiB over the relayed path with real ssh: up {up_time:.2?}, down {down_time:.2?} (debug build, whole ssh session)"
    );
    assert_eq!(down.stdout.len(), BIG);
    assert_eq!(
        hex::encode(Sha256::digest(&down.stdout)),
        digest,
        "download is byte-exact"
    );

    // Every tunnel went over the relay: the gateway says so per tunnel,
    // and the symmetric NATs defeated hole punching.
    let glog = plain(&gateway.log_text());
    let opened = glog.matches("tunnel opened").count();
    assert_eq!(opened, 3, "three ssh sessions, three tunnels:\n{glog}");
    assert_eq!(
        glog.matches("path=relayed").count(),
        opened,
        "every tunnel relayed:\n{glog}"
    );
    let plog = plain(&provider.log_text());
    assert!(!plog.contains("hole punch succeeded") && !glog.contains("hole punch succeeded"));
    // The gateway dials every circuit address the directory lists at once
    // (one per relay address), so several circuits open and the losers
    // close; the one that won carried all three sessions and is still up.
    let rlog = plain(&relay.log_text());
    let opened = rlog.matches("relay: circuit opened").count();
    let closed = rlog.matches("relay: circuit closed").count();
    assert!(
        opened > closed,
        "a circuit is still open ({opened} opened, {closed} closed):\n{rlog}"
    );

    // `xe ssh --p2p` from behind the other NAT, with only the relay as its
    // bootstrap peer: no gateway and no node is asked; the consumer's own
    // host finds the lease in the overlay and reaches the provider through
    // the relay, and -v says the tunnel is relayed.
    let wallet = consumer.wallet.to_str().expect("utf-8 path");
    let boot = addr_facing(&relay, netns::PUB_TO_G);
    let kh = dir.path().join("p2p_known_hosts");
    let out = output_within(
        in_netns(
            &t.g,
            &xe_bin(),
            &[
                "ssh",
                "--p2p",
                "-v",
                "--bootstrap",
                &boot,
                "--wallet",
                wallet,
                "--known-hosts",
                kh.to_str().expect("utf-8 path"),
                &lease,
                "--",
                "echo via-p2p",
            ],
        ),
        None,
        Duration::from_secs(120),
    );
    let log = plain(&String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == "via-p2p\n",
        "xe ssh --p2p through the relay: {log}"
    );
    assert!(
        log.contains("tunnel open") && log.contains("path=relayed"),
        "{log}"
    );
    eprintln!("xe ssh --p2p -v behind NAT said:\n{log}");
}

#[test]
fn without_the_relay_the_nat_provider_is_unreachable() {
    const TEST: &str = "without_the_relay_the_nat_provider_is_unreachable";
    if !openssh_available(TEST) || !netns::available(TEST) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Topology::create();
    // Same network, same gateway flags; only the relay server is off.
    let relay = start_relay(&t, &dir.path().join("relay"), false);
    let provider = start_provider(
        &t,
        &dir.path().join("p"),
        &addr_facing(&relay, netns::PUB_TO_P),
    );
    let nat = wait_private(&provider, false);
    assert_eq!(nat["relay_addrs"], serde_json::json!([]), "{nat}");

    let gateway = start_gateway(
        &t,
        &dir.path().join("g"),
        &addr_facing(&relay, netns::PUB_TO_G),
    );
    let consumer = Consumer::new(dir.path());
    // The lease itself replicates (the provider is connected out to the
    // relay node) and the provider accepts it…
    let (lease, host_key) = consumer.lease(&t.g, &gateway, &provider.field("account"));
    // …but the gateway has no way to open a connection to it.
    let out = consumer.ssh(&t.g, &gateway, &lease, &host_key, "echo unreachable?", None);
    assert!(
        !out.status.success(),
        "ssh must fail without a relay: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let glog = plain(&gateway.log_text());
    assert!(!glog.contains("tunnel opened"), "{glog}");
    let provider_short = &provider.field("account")[..8];
    let said = format!("provider {provider_short} is unreachable");
    assert!(
        glog.contains(&said),
        "the gateway reports the failed dial:\n{glog}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&said),
        "and so does the user's ssh: {stderr}"
    );
    let plog = plain(&provider.log_text());
    assert!(!plog.contains("reserving a slot on relay"), "{plog}");

    // Control: the provider is alive and the lease valid — the relay
    // node's own gateway, which the provider dialled out to, reaches the
    // VM over that (direct) connection.
    let out = consumer.ssh(
        &t.public,
        &relay,
        &lease,
        &host_key,
        "echo via the relay node",
        None,
    );
    assert!(
        out.status.success(),
        "{}\nrelay log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        relay.log_text()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "via the relay node\n");
    assert!(plain(&relay.log_text()).contains("path=direct"));
}
