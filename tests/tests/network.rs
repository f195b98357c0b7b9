//! The whole system as separate processes: a gateway, a provider (`sshd`
//! backend: a real OpenSSH server per lease) and a consumer node, each its
//! own `xe node` with its own data dir. A lease is created on the consumer
//! node, accepted by the provider, and used through the gateway by every
//! access path a user has — with the real OpenSSH client.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::three_nodes::{Net, random_file, sha256_file};
use common::*;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

#[test]
fn every_access_path_reaches_the_vm() {
    if !openssh_available("every_access_path_reaches_the_vm") {
        return;
    }
    let n = Net::start();
    let port = n.gw_port();

    // 1. ProxyCommand -W (the seed's recommended path).
    assert_eq!(ok(&n.ssh_w("echo via-w"), "ssh -W"), "via-w\n");

    // 2. ssh -J, configured as a user would.
    let cfg = n.path("ssh_config");
    std::fs::write(
        &cfg,
        format!(
            "Host gw\n  HostName 127.0.0.1\n  Port {port}\n  User {lease}\n  IdentityFile {key}\n  IdentitiesOnly yes\n  \
             StrictHostKeyChecking accept-new\n  UserKnownHostsFile {gwkh}\n  BatchMode yes\n\
             Host vm\n  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n  HostKeyAlias {lease}\n  \
             UserKnownHostsFile {kh}\n  StrictHostKeyChecking yes\n  BatchMode yes\n",
            lease = n.lease,
            key = n.key.display(),
            gwkh = n.path("gw_known_hosts").display(),
            kh = n.path("known_hosts").display(),
        ),
    )
    .expect("config");
    let out = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .args(["-J", "gw", "vm", "echo via-j"])
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .expect("ssh -J");
    assert_eq!(ok(&out, "ssh -J"), "via-j\n");

    // 3. xe ssh, told only which node to ask: it reads the gateway's SSH
    // port and the lease's VM host key (from the signed accept) through the
    // node's API, pins the key in its own known_hosts, and runs OpenSSH.
    let xe_kh = n.path("xe_known_hosts");
    let out = Command::new(xe_bin())
        .args([
            "ssh",
            "--wallet",
            n.wallet.to_str().expect("utf8"),
            "--node",
        ])
        .arg(format!("http://{}", n.gw.field("api_addr")))
        .args(["--known-hosts", xe_kh.to_str().expect("utf8")])
        .arg(&n.lease)
        .args(["--", "echo", "via-xe-ssh"])
        .env("XE_CONFIG", n.path("no-config.json"))
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .output()
        .expect("xe ssh");
    assert_eq!(ok(&out, "xe ssh"), "via-xe-ssh\n");
    // The VM's key is pinned under the lease alias (the gateway's own key
    // is recorded beside it by the inner ssh, under its address).
    let pin = format!(
        "{} {}",
        n.lease,
        n.vm_host_key
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let kh = std::fs::read_to_string(&xe_kh).expect("pinned");
    assert!(kh.lines().any(|l| l == pin), "{kh}");

    // 4. The gateway's session channel used as a ProxyCommand, without -W.
    let mut opts = n.proxy_opts(port);
    opts[3] = format!(
        "ProxyCommand=ssh -F /dev/null -T -p {port} -i {key} -o IdentitiesOnly=yes -o BatchMode=yes \
         -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={gwkh} {lease}@127.0.0.1",
        key = n.key.display(),
        gwkh = n.path("gw_known_hosts").display(),
        lease = n.lease
    );
    let out = Command::new("ssh")
        .args(&opts)
        .args(["root@vm", "echo via-session"])
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .output()
        .expect("ssh");
    assert_eq!(ok(&out, "session as ProxyCommand"), "via-session\n");

    // 5. ssh -A: the gateway logs into the VM with the forwarded agent.
    let sock = n.path("agent.sock");
    let mut agent = Command::new("ssh-agent")
        .args(["-D", "-a"])
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh-agent");
    let mut line = String::new();
    BufReader::new(agent.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("agent line");
    assert!(line.starts_with("SSH_AUTH_SOCK="), "{line}");
    ok(
        &Command::new("ssh-add")
            .arg(&n.key)
            .env("SSH_AUTH_SOCK", &sock)
            .output()
            .expect("ssh-add"),
        "ssh-add",
    );
    let out = Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-A",
            "-tt",
            "-p",
            &port.to_string(),
            "-o",
            "BatchMode=yes",
        ])
        .args(["-o", "StrictHostKeyChecking=accept-new", "-o"])
        .arg(format!(
            "UserKnownHostsFile={}",
            n.path("gw_known_hosts").display()
        ))
        .arg(format!("{}@127.0.0.1", n.lease))
        .arg("echo via-agent; exit 5")
        .env("SSH_AUTH_SOCK", &sock)
        .stdin(Stdio::null())
        .output()
        .expect("ssh -A");
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        text(&out.stdout).contains("via-agent"),
        "stdout {} stderr {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(5), "exit status from the VM");

    // 6. The HTTP-upgrade tunnel via `xe tunnel`, then plain ssh to the local port.
    let mut tunnel = Command::new(xe_bin())
        .args([
            "tunnel",
            "--wallet",
            n.wallet.to_str().expect("utf8"),
            "--node",
        ])
        .arg(format!("http://{}", n.gw.field("api_addr")))
        .args(["--listen", "127.0.0.1:0"])
        .args([
            "--known-hosts",
            n.path("xe_known_hosts").to_str().expect("utf8"),
        ])
        .arg(&n.lease)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("xe tunnel");
    let mut out = BufReader::new(tunnel.stdout.take().expect("stdout"));
    let mut tport = None;
    for _ in 0..20 {
        let mut l = String::new();
        if out.read_line(&mut l).expect("read") == 0 {
            break;
        }
        if let Some(rest) = l.split("127.0.0.1:").nth(1) {
            tport = rest
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|p| p.parse::<u16>().ok());
            if tport.is_some() {
                break;
            }
        }
    }
    let tport = tport.expect("xe tunnel printed its port");
    let out = Command::new("ssh")
        .args(["-F", "/dev/null", "-p", &tport.to_string(), "-i"])
        .arg(&n.key)
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            &format!("HostKeyAlias={}", n.lease),
        ])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            n.path("known_hosts").display()
        ))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "root@127.0.0.1",
            "echo via-http-tunnel",
        ])
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .output()
        .expect("ssh via xe tunnel");
    let _ = Command::new("kill")
        .args(["-TERM", &tunnel.id().to_string()])
        .status();
    let _ = tunnel.wait();
    assert_eq!(ok(&out, "ssh through xe tunnel"), "via-http-tunnel\n");

    // 7. `xe tunnel --stdio` as the ProxyCommand, as `xe ssh --http` runs
    // it. The gateway setting points nowhere: only the node's HTTP port is
    // used.
    let xe_ssh_http = |extra: &[&str]| {
        Command::new(xe_bin())
            .args([
                "ssh",
                "--http",
                "--wallet",
                n.wallet.to_str().expect("utf8"),
            ])
            .arg("--node")
            .arg(format!("http://{}", n.gw.field("api_addr")))
            .args(["--known-hosts", xe_kh.to_str().expect("utf8")])
            .arg(&n.lease)
            .args(extra)
            .env("XE_CONFIG", n.path("no-config.json"))
            .env("XE_GATEWAY", "127.0.0.1:1")
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .expect("xe ssh --http")
    };
    let printed = ok(&xe_ssh_http(&["--print"]), "xe ssh --http --print");
    assert!(printed.contains("tunnel --stdio"), "{printed}");
    assert!(!printed.contains(" -W "), "{printed}");
    let out = xe_ssh_http(&["--", "echo", "via-http-stdio"]);
    assert_eq!(ok(&out, "xe ssh --http"), "via-http-stdio\n");

    // The VM side ending first reaches the ProxyCommand's reader as EOF
    // while its stdin is still open (a half-close, as a socket would give):
    // sshd drops a client that does not speak SSH.
    let stdio_tunnel = |wallet: &Path| {
        let mut c = Command::new(xe_bin());
        c.args(["tunnel", "--stdio", "--wallet"])
            .arg(wallet)
            .arg("--node")
            .arg(format!("http://{}", n.gw.field("api_addr")))
            .arg(&n.lease);
        c
    };
    let mut raw = stdio_tunnel(&n.wallet)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("xe tunnel --stdio");
    let mut raw_in = raw.stdin.take().expect("stdin");
    raw_in.write_all(b"not ssh\r\n").expect("write");
    let mut raw_out = raw.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let r = raw_out.read_to_end(&mut got);
        let _ = tx.send((r.is_ok(), got));
    });
    let (read_ok, got) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("EOF on the ProxyCommand's stdout while its stdin is still open");
    assert!(read_ok);
    assert!(got.starts_with(b"SSH-2.0-"), "{:?}", text(&got));
    drop(raw_in);
    let (status, _) = wait_exit(raw, Duration::from_secs(30));
    assert!(
        status.code().is_some(),
        "xe tunnel --stdio exits on its own"
    );

    // A wallet whose key is not the lease's: the node refuses, and the
    // ProxyCommand says so on stderr, writes nothing on stdout and fails.
    let other = n.path("other.seed");
    ok(
        &xe(&[
            "wallet",
            "create",
            "--wallet",
            other.to_str().expect("utf8"),
        ]),
        "wallet create",
    );
    let out = stdio_tunnel(&other)
        .stdin(Stdio::null())
        .output()
        .expect("xe tunnel --stdio");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(out.stdout.is_empty(), "stdout: {:?}", text(&out.stdout));
    assert!(err.contains("did not open the tunnel"), "{err}");
    assert!(err.contains(&n.lease[..8]), "{err}");
}

#[test]
fn scp_50_mib_in_and_out_byte_exact() {
    if !openssh_available("scp_50_mib_in_and_out_byte_exact") {
        return;
    }
    let n = Net::start();
    let src = n.path("src.bin");
    random_file(&src, 50 << 20, 0x2545F4914F6CDD1D);
    let remote = format!(
        "/tmp/xe-e2e-{}-{}.bin",
        std::process::id(),
        n.lease.get(..8).expect("hash")
    );
    // Through the gateway (-W), then through the HTTP tunnel on stdio.
    for (way, opts) in [
        ("gateway -W", n.proxy_opts(n.gw_port())),
        ("xe tunnel --stdio", n.http_proxy_opts()),
    ] {
        let scp = |from: &str, to: &str| {
            Command::new("scp")
                .args(["-q", "-O"])
                .args(&opts)
                .args([from, to])
                .env_remove("SSH_AUTH_SOCK")
                .output()
                .expect("scp")
        };
        ok(
            &scp(src.to_str().expect("utf8"), &format!("root@vm:{remote}")),
            &format!("scp in via {way}"),
        );
        let back = n.path("back.bin");
        let _ = std::fs::remove_file(&back);
        ok(
            &scp(&format!("root@vm:{remote}"), back.to_str().expect("utf8")),
            &format!("scp out via {way}"),
        );
        let _ = n.ssh_w(&format!("rm -f {remote}"));
        assert_eq!(sha256_file(&back), sha256_file(&src), "via {way}");
    }
}

/// Wait (bounded) for a child to exit, on the exit event.
fn wait_exit(mut child: Child, limit: Duration) -> (std::process::ExitStatus, Duration) {
    let t = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(limit) {
        Ok(st) => (st.expect("wait"), t.elapsed()),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("process {pid} still running after {limit:?}");
        }
    }
}

/// The lease's VM is torn down: the provider reports no VM for it and no
/// process runs from the lease's sshd directory. There is no event to await
/// in another process, so this polls, bounded to 10 s.
fn assert_vm_torn_down(n: &Net) {
    let api = n.provider.field("api_addr");
    let lease_dir = format!("vms/sshd/{}", n.lease);
    for _ in 0..200 {
        let (status, _) = http_get(&api, &format!("/vms/{}", n.lease));
        let ps = Command::new("ps")
            .args(["-eo", "args"])
            .output()
            .expect("ps");
        let running = text(&ps.stdout).lines().any(|l| l.contains(&lease_dir));
        if status == 404 && !running {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "VM of lease {} still present 10 s after the lease ended",
        n.lease
    );
}

#[test]
fn settling_kills_open_sessions_and_refuses_new_ones() {
    if !openssh_available("settling_kills_open_sessions_and_refuses_new_ones") {
        return;
    }
    let n = Net::start();
    // A session that prints a marker and then waits for a long time.
    let session = n.long_session();
    let url = format!("http://{}", n.consumer.field("api_addr"));
    ok(
        &xe(&[
            "lease",
            "settle",
            "--wallet",
            n.wallet.to_str().expect("utf8"),
            "--node",
            &url,
            &n.lease,
        ]),
        "settle",
    );
    // The promise is 1 s; the bound here only keeps a broken build from hanging.
    let (_, took) = wait_exit(session, Duration::from_secs(20));
    eprintln!("session closed {took:?} after the settle was submitted");
    let out = n.ssh_w("echo should-not-run");
    assert!(!out.status.success());
    assert!(!text(&out.stdout).contains("should-not-run"));
    // The gateway logged why it refused.
    let log = n.gw.log_text();
    assert!(
        log.contains("settled"),
        "gateway log names the reason:\n{log}"
    );
    assert_vm_torn_down(&n);
}

/// Expiry (accepted_at + duration, the shortest a lease may be: 60 s) ends
/// open sessions, refuses new ones and tears the VM down, like a settle.
#[test]
fn expiry_kills_open_sessions_and_tears_the_vm_down() {
    if !openssh_available("expiry_kills_open_sessions_and_tears_the_vm_down") {
        return;
    }
    let n = Net::start_with_duration(60);
    let session = n.long_session();
    let (_, took) = wait_exit(session, Duration::from_secs(120));
    eprintln!("session closed {took:?} after it started (lease of 60 s)");
    let out = n.ssh_w("echo should-not-run");
    assert!(!out.status.success());
    assert!(
        n.gw.log_text().contains("expired"),
        "gateway log names the reason"
    );
    assert_vm_torn_down(&n);
}

#[test]
fn restarts_and_a_second_gateway_serve_the_same_lease() {
    if !openssh_available("restarts_and_a_second_gateway_serve_the_same_lease") {
        return;
    }
    let mut n = Net::start();
    assert_eq!(ok(&n.ssh_w("echo before"), "before restart"), "before\n");

    // Gateway restart: same data dir, so same host key (the strict
    // known_hosts entry the ProxyCommand recorded keeps working) and peer id.
    let gw_dir = n.gw.data.clone();
    let peer = n.gw.field("peer_id");
    assert_eq!(n.gw.stop().code(), Some(0));
    let gwkh_before = std::fs::read_to_string(n.path("gw_known_hosts")).expect("gw known_hosts");
    n.gw = NodeProc::start(
        &gw_dir,
        &["--ssh-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"],
    );
    assert_eq!(n.gw.field("peer_id"), peer);
    // The gateway has no bootstrap peers: a new tunnel dials the provider
    // at the addresses of its directory entry, kept in the gateway's store.
    let mut opts = n.proxy_opts(n.gw_port());
    opts[3] = opts[3].replace(
        "StrictHostKeyChecking=accept-new",
        "StrictHostKeyChecking=yes",
    );
    let out = Command::new("ssh")
        .args(&opts)
        .args(["root@vm", "echo after-gw-restart"])
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .output()
        .expect("ssh");
    assert_eq!(
        ok(&out, "after gateway restart (strict gateway host key)"),
        "after-gw-restart\n"
    );
    let gwkh_line = gwkh_before.lines().next().expect("entry");
    assert!(gwkh_line.contains("ssh-ed25519"), "{gwkh_line}");

    // Provider restart: the lease's VM (its per-lease sshd) comes back.
    let p_dir = n.provider.data.clone();
    assert_eq!(n.provider.stop().code(), Some(0));
    // Meanwhile the provider is offline: both ways in say so, once, in
    // words (not "stdio forwarding failed" alone, not libp2p's dial dump).
    let short = n.provider.field("account")[..8].to_string();
    let down = [
        ("gateway", n.ssh_w("echo while-down")),
        (
            "http",
            Command::new("ssh")
                .args(n.http_proxy_opts())
                .args(["root@vm", "echo while-down"])
                .env_remove("SSH_AUTH_SOCK")
                .stdin(Stdio::null())
                .output()
                .expect("ssh"),
        ),
    ];
    for (way, out) in down {
        assert!(!out.status.success(), "{way}: reached a stopped provider");
        let err = text(&out.stderr);
        let said = format!("provider {short} is unreachable");
        assert_eq!(err.matches(&said).count(), 1, "{way}: {err}");
        assert!(err.contains("(last announced: "), "{way}: {err}");
        assert!(err.is_ascii(), "{way}: {err}");
        assert!(err.len() < 700, "{way}: {} bytes:\n{err}", err.len());
    }
    let boot = n.gw.bootstrap_args();
    let mut pargs: Vec<&str> = vec!["--provide", "--vm-backend", "sshd"];
    pargs.extend(boot.iter().map(String::as_str));
    n.provider = NodeProc::start(&p_dir, &pargs);
    assert_eq!(
        ok(
            &n.ssh_w("echo after-provider-restart"),
            "after provider restart"
        ),
        "after-provider-restart\n"
    );

    // A second gateway, started later and bootstrapped to the first, learns
    // the lease and the provider's current addresses by sync and serves it.
    let boot = n.gw.bootstrap_args();
    let mut gargs: Vec<&str> = vec!["--ssh-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"];
    gargs.extend(boot.iter().map(String::as_str));
    let gw2 = NodeProc::start(&n.path("gw2"), &gargs);
    let (status, body) = http_get(
        &gw2.field("api_addr"),
        &format!("/leases/{}?wait=30&since=created", n.lease),
    );
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("accepted")),
        "{body}"
    );
    let port2: u16 = gw2
        .field("ssh_addr")
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let out = Command::new("ssh")
        .args(n.proxy_opts_for(port2, "xe-gateway-2"))
        .args(["root@vm", "echo via-gw2"])
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .output()
        .expect("ssh");
    assert_eq!(ok(&out, "second gateway"), "via-gw2\n");
}
