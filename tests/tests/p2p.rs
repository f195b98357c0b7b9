//! `xe ssh --p2p`: the consumer's own process joins the overlay and opens
//! `/xe/tunnel/2.0.0` to the provider itself, with the real OpenSSH client
//! end to end to the lease's `sshd`. The gateway node still runs (it is
//! the others' bootstrap peer) but its SSH port is never used: every
//! command here is given a gateway address that refuses connections.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::three_nodes::{Net, random_file, sha256_file};
use common::*;

/// A gateway address nobody listens on: a session that needed a gateway
/// would fail.
const NO_GATEWAY: &str = "127.0.0.1:1";

/// A node URL nobody answers at: a lookup that needed a node would fail.
const NO_NODE: &str = "http://127.0.0.1:1";

/// The in-process host listens on loopback only (its default is every
/// interface); ssh hands the variable on to the ProxyCommand.
const LISTEN: (&str, &str) = (
    "XE_P2P_LISTEN",
    "/ip4/127.0.0.1/tcp/0,/ip4/127.0.0.1/udp/0/quic-v1",
);

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

impl Net {
    fn url(&self, node: &NodeProc) -> String {
        format!("http://{}", node.field("api_addr"))
    }

    /// `xe ARGS…` with no config file, no gateway, no agent, and a default
    /// node that refuses connections: whatever must ask a node names one.
    fn xe_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(xe_bin());
        c.args(args)
            .env("XE_CONFIG", self.path("no-config.json"))
            .env("XE_GATEWAY", NO_GATEWAY)
            .env(LISTEN.0, LISTEN.1)
            .env("XE_NODE", NO_NODE)
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null());
        c
    }

    /// `xe ssh --p2p … LEASE -- REMOTE…` with `how` choosing the lookup.
    fn xe_ssh_p2p(&self, how: &[&str], known_hosts: &Path, remote: &[&str]) -> Output {
        let mut args = vec![
            "ssh",
            "--p2p",
            "--wallet",
            self.wallet.to_str().expect("utf8"),
        ];
        args.extend(how);
        args.extend([
            "--known-hosts",
            known_hosts.to_str().expect("utf8"),
            &self.lease,
        ]);
        args.push("--");
        args.extend(remote);
        self.xe_cmd(&args).output().expect("xe ssh --p2p")
    }

    /// `xe SUB --p2p --node NODE --wallet … --known-hosts KH EXTRA… LEASE`.
    fn p2p_target(&self, sub: &str, node: &str, kh: &Path, extra: &[&str]) -> Output {
        let mut args = vec![
            sub,
            "--p2p",
            "--node",
            node,
            "--wallet",
            self.wallet.to_str().expect("utf8"),
            "--known-hosts",
            kh.to_str().expect("utf8"),
        ];
        args.extend(extra);
        args.push(&self.lease);
        self.xe_cmd(&args).output().expect(sub)
    }

    /// `xe tunnel --p2p --stdio ARGS…` with nothing on stdin.
    fn p2p_tunnel(&self, args: &[&str]) -> Output {
        let mut all = vec!["tunnel", "--p2p", "--stdio"];
        all.extend(args);
        self.xe_cmd(&all).output().expect("xe tunnel --p2p")
    }

    /// The provider's peer id and the address the others dial it on.
    fn provider_at(&self) -> (String, String) {
        let addr = self.provider.bootstrap_args()[1].clone();
        let peer = addr.rsplit('/').next().expect("peer").to_string();
        (peer, addr)
    }
}

#[test]
fn xe_ssh_p2p_reaches_the_vm_with_no_gateway_in_the_path() {
    if !openssh_available("xe_ssh_p2p_reaches_the_vm_with_no_gateway_in_the_path") {
        return;
    }
    let n = Net::start();
    let consumer = n.url(&n.consumer);
    let by_node = ["--node", consumer.as_str()];

    // Through a node's lookup: a command's output and exit status, with
    // the VM's host key pinned from the lease's signed accept.
    let kh = n.path("xe_known_hosts");
    let out = n.xe_ssh_p2p(&by_node, &kh, &["echo via-p2p; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "via-p2p\n");
    let pinned = std::fs::read_to_string(&kh).expect("known_hosts written");
    assert!(
        pinned.contains(&format!("{} {}", n.lease, n.vm_host_key)),
        "{pinned}"
    );
    // What it runs: the overlay ProxyCommand, already told the provider.
    let print = n.p2p_target("ssh", &consumer, &kh, &["--print"]);
    let printed = ok(&print, "xe ssh --p2p --print");
    assert!(printed.contains("tunnel --p2p --stdio"), "{printed}");
    assert!(printed.contains("--provider-peer"), "{printed}");
    assert!(!printed.contains(" -W "), "{printed}");

    // The overlay alone: no node is asked (XE_NODE points nowhere).
    let gw_boot = n.gw.bootstrap_args();
    let overlay = ["--bootstrap", gw_boot[1].as_str(), "-v"];
    let out = n.xe_ssh_p2p(&overlay, &kh, &["echo via-overlay"]);
    assert_eq!(
        ok(&out, "xe ssh --p2p --bootstrap"),
        "via-overlay\n",
        "stderr: {}",
        stderr(&out)
    );
    // -v reports each step and the path the tunnel took.
    let log = stderr(&out);
    eprintln!("xe ssh --p2p -v said:\n{log}");
    assert!(log.contains("tunnel open"), "{log}");
    assert!(log.contains("path=direct"), "{log}");

    // A pin that does not match the VM is refused, not replaced.
    let wrong = n.path("wrong_known_hosts");
    std::fs::write(
        &wrong,
        format!(
            "{} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n",
            n.lease
        ),
    )
    .expect("write");
    let out = n.xe_ssh_p2p(&by_node, &wrong, &["echo must-not-run"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(
        stderr(&out).contains("Host key verification failed"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn scp_50_mib_both_ways_through_the_ssh_config_p2p_block() {
    if !openssh_available("scp_50_mib_both_ways_through_the_ssh_config_p2p_block") {
        return;
    }
    let n = Net::start();
    let consumer = n.url(&n.consumer);
    let kh = n.path("xe_known_hosts");
    // A config block looks the provider up in its ProxyCommand, each time.
    let block = ok(
        &n.p2p_target("ssh-config", &consumer, &kh, &["--alias", "leased"]),
        "xe ssh-config --p2p",
    );
    assert!(block.contains("tunnel --p2p --stdio"), "{block}");
    assert!(!block.contains("--provider-peer"), "{block}");
    let cfg = n.path("ssh_config");
    std::fs::write(&cfg, block).expect("write config");

    let src = n.path("src.bin");
    random_file(&src, 50 << 20, 0x9E37_79B9_7F4A_7C15);
    let remote = format!("/tmp/xe-p2p-{}.bin", std::process::id());
    let scp = |from: &str, to: &str| {
        Command::new("scp")
            .args(["-q", "-O", "-F"])
            .arg(&cfg)
            .args(["-o", "BatchMode=yes", from, to])
            .env("XE_CONFIG", n.path("no-config.json"))
            .env("XE_GATEWAY", NO_GATEWAY)
            .env(LISTEN.0, LISTEN.1)
            .env_remove("SSH_AUTH_SOCK")
            .output()
            .expect("scp")
    };
    ok(
        &scp(src.to_str().expect("utf8"), &format!("leased:{remote}")),
        "scp in",
    );
    let back = n.path("back.bin");
    ok(
        &scp(&format!("leased:{remote}"), back.to_str().expect("utf8")),
        "scp out",
    );
    assert_eq!(sha256_file(&back), sha256_file(&src));
}

#[test]
fn p2p_refusals_say_why_and_exit_non_zero() {
    if !openssh_available("p2p_refusals_say_why_and_exit_non_zero") {
        return;
    }
    let mut n = Net::start();
    let consumer = n.url(&n.consumer);
    let (peer, addr) = n.provider_at();
    // Straight to the provider, as `xe ssh --p2p` runs it.
    let direct = |n: &Net, lease: &str| {
        n.p2p_tunnel(&["--provider-peer", &peer, "--provider-addr", &addr, lease])
    };
    let unknown = "ab".repeat(32);

    // Unknown to the node that is asked.
    let out = n.p2p_tunnel(&["--node", &consumer, &unknown]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("404") || stderr(&out).contains("not known"),
        "{}",
        stderr(&out)
    );

    // Unknown to the provider, which says so itself.
    let out = direct(&n, &unknown);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("the provider refused the tunnel: unknown lease"),
        "{e}"
    );

    // Settled: once the provider has the settle, it refuses the lease.
    ok(
        &n.xe_cmd(&[
            "lease",
            "settle",
            "--wallet",
            n.wallet.to_str().expect("utf8"),
            "--node",
            &consumer,
            &n.lease,
        ])
        .output()
        .expect("settle"),
        "settle",
    );
    let provider_api = n.provider.field("api_addr");
    let mut settled = false;
    for _ in 0..3 {
        let (_, body) = http_get(
            &provider_api,
            &format!("/leases/{}?wait=20&since=accepted", n.lease),
        );
        if body["state"] == "settled" {
            settled = true;
            break;
        }
    }
    assert!(settled, "the provider saw the settle");
    let out = direct(&n, &n.lease);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("the provider refused the tunnel: lease is settled"),
        "{e}"
    );

    // Provider down: a clear line, not a hang.
    n.provider.stop();
    let out = direct(&n, &n.lease);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("cannot reach the provider of lease"), "{e}");
}
