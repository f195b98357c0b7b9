//! The dev backend (embedded russh server) against the real OpenSSH client.

mod common;

use std::path::Path;

use common::*;
use xe_vm::dev::DevManager;
use xe_vm::{VmError, VmManager, VmStatus};

/// The dev server's listener lives in this test process, and a process
/// forked by a concurrent test holds a copy of every fd until it execs, so
/// "the port is free after teardown" would race with other tests' spawns.
/// These tests therefore run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Exec without PTY (stdout, stderr, stdin, exit status), exec with PTY,
/// a refused key, and teardown freeing the port — all with the real `ssh`.
#[tokio::test]
async fn exec_pty_and_refusal_with_real_ssh() {
    let _serial = ONE_AT_A_TIME.lock().await;
    if !openssh_available("exec_pty_and_refusal_with_real_ssh") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mgr = DevManager::new(tmp.path().join("dev"));
    let key = lease_key(tmp.path(), "lease");
    let other = lease_key(tmp.path(), "other");
    let lease = random_lease();
    let info = mgr
        .provision(&request(lease, key.access_pub_key()))
        .await
        .expect("provision");
    assert_eq!(
        (info.status, info.backend.as_str()),
        (VmStatus::Running, "dev")
    );
    let port = info.ssh_port.expect("port");
    let host_key = info.host_key.clone().expect("host key");
    let run = |k: &'static str,
               extra: &'static [&'static str],
               cmd: &'static str,
               input: Option<&'static [u8]>| {
        let path = if k == "lease" {
            key.path()
        } else {
            other.path()
        };
        let path = path.to_path_buf();
        let host_key = host_key.clone();
        // Any user name is accepted; the shell runs as the node's user.
        async move { ssh(&path, port, &host_key, "anyone", extra, cmd, input).await }
    };

    let out = run("lease", &[], "echo hi; echo oops >&2; exit 3", None).await;
    assert_eq!(out.code, Some(3), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "hi\n");
    assert!(out.stderr.contains("oops"), "{}", out.stderr);

    let out = run("lease", &[], "cat; echo done", Some(b"from stdin\n")).await;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "from stdin\ndone\n"),
        "{}",
        out.stderr
    );

    let out = run("lease", &["-tt"], "tty; exit 4", None).await;
    assert_eq!(out.code, Some(4), "stderr: {}", out.stderr);
    assert!(out.stdout.contains("/dev/pts/"), "{:?}", out.stdout);

    // No terminal size from a client without a tty: the PTY gets 24x80.
    let out = run("lease", &["-tt"], "stty size", None).await;
    assert_eq!(
        (out.code, out.stdout.trim()),
        (Some(0), "24 80"),
        "{}",
        out.stderr
    );

    // An interactive login shell on a PTY (shell request, no command).
    let out = run("lease", &["-tt"], "", Some(b"echo $((6*7)); exit 6\n")).await;
    assert_eq!(out.code, Some(6), "stderr: {}", out.stderr);
    assert!(out.stdout.contains("42"), "{:?}", out.stdout);

    // A shell request without PTY reads its commands from stdin.
    let out = run("lease", &[], "", Some(b"echo $((6*7))\n")).await;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "42\n"),
        "{}",
        out.stderr
    );

    let out = run("lease", &[], "tty", None).await;
    assert!(
        out.stdout.contains("not a tty"),
        "exec without -t has no PTY: {:?}",
        out.stdout
    );

    let out = run("other", &[], "echo hi", None).await;
    assert_eq!(out.code, Some(255), "{}", out.stderr);
    assert!(out.stderr.contains("Permission denied"), "{}", out.stderr);
    assert!(out.stdout.is_empty());

    mgr.teardown(&lease).await.expect("teardown");
    assert!(port_is_free(port), "listener still bound");
    assert!(matches!(
        mgr.dial_ssh(&lease).await,
        Err(VmError::NotFound(_))
    ));
    assert!(!tmp.path().join("dev").join(lease.to_hex()).exists());
}

/// shutdown closes the listener; recover on a new manager serves the same
/// host key and the pinned-key login works again.
#[tokio::test]
async fn recover_after_shutdown_keeps_the_host_key() {
    let _serial = ONE_AT_A_TIME.lock().await;
    if !openssh_available("recover_after_shutdown_keeps_the_host_key") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("dev");
    let key = lease_key(tmp.path(), "lease");
    let lease = random_lease();
    let req = request(lease, key.access_pub_key());
    let first = DevManager::new(state.clone());
    let before = first.provision(&req).await.expect("provision");
    first.shutdown().await;
    assert!(port_is_free(before.ssh_port.expect("port")));
    assert_eq!(
        first.get(&lease).await.map(|i| i.status),
        Some(VmStatus::Stopped)
    );

    let second = DevManager::new(state.clone());
    let infos = second
        .recover(std::slice::from_ref(&req))
        .await
        .expect("recover");
    assert_eq!(infos[0].status, VmStatus::Running);
    assert_eq!(infos[0].host_key, before.host_key);
    let out = ssh(
        key.path(),
        infos[0].ssh_port.expect("port"),
        before.host_key.as_deref().expect("key"),
        "u",
        &[],
        "echo back",
        None,
    )
    .await;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "back\n"),
        "{}",
        out.stderr
    );
    second.teardown(&lease).await.expect("teardown");
    assert!(!Path::new(&state).join(lease.to_hex()).exists());
}

#[tokio::test]
async fn invalid_key_is_refused() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let mgr = DevManager::new(tmp.path().join("dev"));
    let lease = random_lease();
    let e = mgr
        .provision(&request(lease, invalid_point_key()))
        .await
        .expect_err("invalid key");
    assert!(matches!(e, VmError::InvalidKey), "{e}");
    assert_eq!(mgr.get(&lease).await, None);
}

struct TrustingClient;

impl russh::client::Handler for TrustingClient {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // Loopback to a server this test just started.
        Ok(true)
    }
}

/// A window-change resizes the PTY before later input is read: the shell
/// waits for a line, then prints the terminal size. (The OpenSSH client
/// only sends window-change on SIGWINCH, so this uses a russh client.)
#[tokio::test]
async fn window_change_resizes_the_pty() {
    let _serial = ONE_AT_A_TIME.lock().await;
    use std::sync::Arc;

    use russh::ChannelMsg;
    use russh::keys::PrivateKeyWithHashAlg;

    let tmp = tempfile::tempdir().expect("tempdir");
    let mgr = DevManager::new(tmp.path().join("dev"));
    let key = lease_key(tmp.path(), "lease");
    let lease = random_lease();
    let info = mgr
        .provision(&request(lease, key.access_pub_key()))
        .await
        .expect("provision");
    let port = info.ssh_port.expect("port");

    let config = Arc::new(russh::client::Config::default());
    let mut session = russh::client::connect(config, ("127.0.0.1", port), TrustingClient)
        .await
        .expect("connect");
    let auth = session
        .authenticate_publickey(
            "u",
            PrivateKeyWithHashAlg::new(Arc::new(key.private_key().clone()), None),
        )
        .await
        .expect("auth");
    assert!(auth.success());
    let mut ch = session.channel_open_session().await.expect("channel");
    ch.request_pty(true, "xterm", 80, 24, 0, 0, &[])
        .await
        .expect("pty");
    ch.exec(true, "stty -echo; read line; stty size")
        .await
        .expect("exec");
    ch.window_change(132, 43, 0, 0)
        .await
        .expect("window change");
    ch.data(&b"go\n"[..]).await.expect("data");

    let mut out = Vec::new();
    let mut code = None;
    let collect = async {
        while let Some(msg) = ch.wait().await {
            match msg {
                ChannelMsg::Data { data } => out.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => code = Some(exit_status),
                ChannelMsg::Close => break,
                _ => {}
            }
        }
    };
    tokio::time::timeout(SSH_TIMEOUT, collect)
        .await
        .expect("session ends in time");
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("43 132"), "{text:?}");
    assert_eq!(code, Some(0));
    mgr.teardown(&lease).await.expect("teardown");
}
