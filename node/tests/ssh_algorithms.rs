//! What the gateway and the `sshd` backend's per-lease sshd negotiate: the
//! algorithms ssh-audit flagged are refused, probed with the real OpenSSH
//! client one at a time; OpenSSH's defaults still work against both.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{Backend, CMD_LIMIT, Scene, run, text};
use tokio::process::Command;
use xe_store::{LeaseHash, LeaseKey};
use xe_testkit::require_openssh;
use xe_vm::sshd::{SshdConfig, SshdManager};
use xe_vm::{ProvisionRequest, VmManager, default_vm_user};

/// `(ssh options, what OpenSSH says when nothing matches)`. A MAC is only
/// negotiated with a non-AEAD cipher, so those probes pin aes128-ctr.
const WEAK: &[(&str, &str)] = &[
    (
        "KexAlgorithms=diffie-hellman-group14-sha256",
        "no matching key exchange method found",
    ),
    (
        "KexAlgorithms=ecdh-sha2-nistp256",
        "no matching key exchange method found",
    ),
    (
        "Ciphers=aes128-ctr MACs=hmac-sha2-256",
        "no matching MAC found",
    ),
    (
        "Ciphers=aes128-ctr MACs=hmac-sha2-512",
        "no matching MAC found",
    ),
    ("Ciphers=aes128-ctr MACs=hmac-sha1", "no matching MAC found"),
    (
        "Ciphers=aes128-ctr MACs=umac-64@openssh.com",
        "no matching MAC found",
    ),
    ("Ciphers=aes128-cbc", "no matching cipher found"),
    (
        "HostKeyAlgorithms=rsa-sha2-512,ecdsa-sha2-nistp256",
        "no matching host key type found",
    ),
    ("Ciphers=aes192-ctr", "no matching cipher found"),
];

/// `ssh` to `127.0.0.1:port` as `user` with `key`, host key pinned.
fn ssh(port: u16, known_hosts: &Path, key: &Path, user: &str, extra: &[&str]) -> Command {
    let mut c = Command::new("ssh");
    c.args(Scene::base_opts(false))
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-p")
        .arg(port.to_string())
        .arg("-i")
        .arg(key);
    for o in extra {
        c.args(["-o", o]);
    }
    c.arg(format!("{user}@127.0.0.1"));
    c.env_remove("SSH_AUTH_SOCK");
    c
}

/// Every weak choice (`weak(option)`) fails with OpenSSH's "no matching …"
/// for exactly that kind; OpenSSH's defaults and `Compression=yes` (which
/// can only get the delayed `zlib@openssh.com`) succeed: `ok(options)`
/// must print "ok".
async fn probe(name: &str, weak: impl Fn(&[&str]) -> Command, ok: impl Fn(&[&str]) -> Command) {
    for (opts, want) in WEAK {
        let opts: Vec<&str> = opts.split_whitespace().collect();
        let opt = opts.join(" ");
        let out = run(&mut weak(&opts), CMD_LIMIT).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(255), "{name} {opt}: {stderr:?}");
        assert!(stderr.contains(want), "{name} {opt}: {stderr:?}");
    }
    for extra in [&[][..], &["Compression=yes"][..]] {
        let out = run(&mut ok(extra), CMD_LIMIT).await;
        assert!(
            out.status.success(),
            "{name} {extra:?}: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout), "ok\n", "{name} {extra:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_refuses_weak_algorithms() {
    require_openssh!("gateway_refuses_weak_algorithms");
    let s = Scene::new(Backend::Sshd, |_| {}).await;
    let lease = s.lease.to_string();
    probe(
        "gateway",
        |opts| {
            let mut c = ssh(
                s.gw.addr.port(),
                &s.gw_known_hosts,
                s.key.path(),
                &lease,
                opts,
            );
            c.arg("true");
            c
        },
        // The option on the gateway hop; success is the whole path.
        |extra| {
            let opts: Vec<String> = extra.iter().map(|o| format!("-o {o}")).collect();
            s.vm_ssh(
                &s.proxy_command(&format!("{} -W %h:%p", opts.join(" "))),
                "echo ok",
            )
        },
    )
    .await;
    // Pre-auth `zlib` cannot be asked for alone with OpenSSH (Compression=yes
    // offers both); a russh client that offers only `zlib` must fail.
    let config = russh::client::Config {
        preferred: russh::Preferred {
            compression: std::borrow::Cow::Borrowed(&[russh::compression::ZLIB]),
            ..Default::default()
        },
        ..Default::default()
    };
    let tcp = tokio::net::TcpStream::connect(s.gw.addr)
        .await
        .expect("connect");
    let res = russh::client::connect_stream(Arc::new(config), tcp, AnyHost).await;
    let err = res.err().expect("a zlib-only client must be refused");
    assert!(matches!(err, russh::Error::NoCommonAlgo { .. }), "{err:?}");
    s.gw.stop().await;
}

struct AnyHost;

impl russh::client::Handler for AnyHost {
    type Error = russh::Error;
    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_backend_refuses_weak_algorithms() {
    require_openssh!("sshd_backend_refuses_weak_algorithms");
    let tmp = tempfile::tempdir().expect("tempdir");
    let mgr = SshdManager::new(SshdConfig {
        state_dir: tmp.path().join("state"),
        sshd_path: None,
    })
    .expect("sshd manager");
    let key = LeaseKey::load_or_create(&tmp.path().join("k.lease_key")).expect("key");
    let lease = LeaseHash(rand::random());
    let info = mgr
        .provision(&ProvisionRequest {
            lease,
            vcpus: 1,
            memory_mb: 512,
            disk_gb: 1,
            access_pub_key: key.access_pub_key(),
        })
        .await
        .expect("provision");
    let port = info.ssh_port.expect("port");
    let kh = tmp.path().join("known_hosts");
    std::fs::write(
        &kh,
        format!(
            "[127.0.0.1]:{port} {}\n",
            info.host_key.as_deref().expect("host key")
        ),
    )
    .expect("known_hosts");
    let user = default_vm_user("sshd");
    let cmd = |extra: &[&str], line: &str| {
        let mut c = ssh(port, &kh, key.path(), &user, extra);
        c.arg(line);
        c
    };
    probe(
        "sshd backend",
        |opts| cmd(opts, "true"),
        |extra| cmd(extra, "echo ok"),
    )
    .await;
    mgr.teardown(&lease).await.expect("teardown");
}
