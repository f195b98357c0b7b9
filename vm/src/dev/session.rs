//! One SSH connection of the dev backend: authentication against the lease
//! key, and session channels bridged to local processes.
//!
//! Every session channel gets its own task that owns the `Channel` and
//! drains it (russh forwards each request and data packet into a bounded
//! per-channel queue, and a full queue stalls the whole connection). The
//! handler only answers requests; the task starts the process on the first
//! `exec` or `shell` and feeds it stdin, EOF and window changes. Output goes
//! back through `make_writer`, which respects the SSH window, and the exit
//! status follows on the same queue, so it can never overtake the output.

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use russh::server::{
    Auth, ChannelOpenHandle, Config, Handler, Msg, PublicKeyOffer, Session, VerifiedPublicKey,
};
use russh::{
    Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Disconnect, MethodKind,
    MethodSet,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};
use xe_store::{AccessPubKey, LeaseHash};

use crate::local_user::LocalUser;

/// A client must send its SSH identification within this time; the
/// handshake runs in the connection's task, never in the accept loop.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// After a PTY's shell exits, how long to keep reading output still in the
/// terminal. The kernel hangs up the terminal when its session leader
/// exits, so this only bounds a background job that kept it open.
const PTY_DRAIN: Duration = Duration::from_secs(1);

/// Exit status reported when the command could not be started (as shells do
/// for "command not found").
const SPAWN_FAILED: u32 = 127;

/// What every connection of one lease shares.
#[derive(Clone)]
pub(crate) struct Context {
    pub(crate) lease: LeaseHash,
    pub(crate) access_key: AccessPubKey,
    pub(crate) user: Arc<LocalUser>,
    pub(crate) cancel: CancellationToken,
    pub(crate) tasks: TaskTracker,
}

/// Run one connection until it ends or the lease's server is cancelled.
pub(crate) async fn serve(config: Arc<Config>, stream: TcpStream, ctx: Context) {
    let cancel = ctx.cancel.clone();
    let conn = Conn {
        ctx,
        started: HashSet::new(),
    };
    let running = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        russh::server::run_stream(config, stream, conn),
    )
    .await
    {
        Ok(Ok(running)) => running,
        Ok(Err(e)) => {
            debug!(error = %e, "SSH handshake failed");
            return;
        }
        Err(_) => {
            debug!("client sent no SSH identification in time");
            return;
        }
    };
    let handle = running.handle();
    tokio::select! {
        r = running => if let Err(e) = r {
            debug!(error = %e, "SSH session ended with an error");
        },
        () = cancel.cancelled() => {
            let _ = handle
                .disconnect(Disconnect::ByApplication, "the lease's VM was torn down".into(), "en".into())
                .await;
        }
    }
}

struct Conn {
    ctx: Context,
    /// Channels that already run a command; a second exec/shell is refused.
    started: HashSet<ChannelId>,
}

impl Conn {
    fn is_lease_key(&self, key: &russh::keys::ssh_key::PublicKey) -> bool {
        key.key_data()
            .ed25519()
            .is_some_and(|k| k.0 == self.ctx.access_key.0)
    }

    fn only_publickey() -> Auth {
        Auth::Reject {
            proceed_with_methods: Some(MethodSet::from(&[MethodKind::PublicKey][..])),
            partial_success: false,
        }
    }

    fn start(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), russh::Error> {
        if self.started.insert(channel) {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }
}

impl Handler for Conn {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Self::only_publickey())
    }

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.is_lease_key(offer.public_key) {
            Auth::Accept
        } else {
            Self::only_publickey()
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.is_lease_key(key.public_key) {
            info!(lease = %self.ctx.lease.short(), user, "dev SSH login with the lease key");
            Ok(Auth::Accept)
        } else {
            Ok(Self::only_publickey())
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        let user = self.ctx.user.clone();
        let cancel = self.ctx.cancel.child_token();
        // Cancelling drops the task, and with it the child (kill_on_drop).
        self.ctx
            .tasks
            .spawn(cancel.run_until_cancelled_owned(run_channel(channel, user)));
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _cols: u32,
        _rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The channel task reads the request itself; only a PTY asked for
        // before the command can be honoured.
        if self.started.contains(&channel) {
            session.channel_failure(channel)
        } else {
            session.channel_success(channel)
        }
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, session)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, session)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        _cols: u32,
        _rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The environment is the node's choice (see `command`), as with
        // sshd's default AcceptEnv.
        session.channel_failure(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single: bool,
        _protocol: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // russh answers for us from the returned value.
        Ok(false)
    }
}

/// Terminal parameters from a `pty-req`.
struct PtyParams {
    term: String,
    size: pty_process::Size,
}

fn size(cols: u32, rows: u32) -> pty_process::Size {
    let clamp = |v: u32, default: u16| {
        if v == 0 {
            default
        } else {
            u16::try_from(v).unwrap_or(u16::MAX)
        }
    };
    pty_process::Size::new(clamp(rows, 24), clamp(cols, 80))
}

/// Drive one session channel: collect a PTY request, start the command on
/// exec/shell, then report its exit status and close.
async fn run_channel(mut channel: Channel<Msg>, user: Arc<LocalUser>) {
    let mut pty: Option<PtyParams> = None;
    let command = loop {
        match channel.wait().await {
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            }) => {
                pty = Some(PtyParams {
                    term,
                    size: size(col_width, row_height),
                })
            }
            Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            }) => {
                if let Some(p) = pty.as_mut() {
                    p.size = size(col_width, row_height);
                }
            }
            Some(ChannelMsg::Exec { command, .. }) => break Some(command),
            Some(ChannelMsg::RequestShell { .. }) => break None,
            Some(ChannelMsg::Close) | None => return,
            // Data before a command, env, signals: nothing to feed yet.
            Some(_) => {}
        }
    };
    let (rx, tx) = channel.split();
    let status = match pty {
        Some(p) => run_pty(command, p, rx, &tx, &user).await,
        None => run_pipes(command, rx, &tx, &user).await,
    };
    // `None`: the client closed the channel or left; nobody to tell.
    if let Some(code) = status {
        let _ = tx.exit_status(code).await;
        let _ = tx.eof().await;
        let _ = tx.close().await;
    }
}

/// The user's shell with `-c COMMAND`, or as a login shell; a small clean
/// environment (as sshd builds one) rather than the node's.
fn command(user: &LocalUser, cmd: Option<Vec<u8>>, term: Option<&str>) -> tokio::process::Command {
    let shell = if user.shell.as_os_str().is_empty() {
        std::path::PathBuf::from("/bin/sh")
    } else {
        user.shell.clone()
    };
    let mut c = tokio::process::Command::new(&shell);
    match cmd {
        Some(cmd) => {
            c.arg("-c").arg(OsString::from_vec(cmd));
        }
        None => {
            // A leading '-' in argv[0] asks any shell for a login shell.
            let base = shell
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "sh".into());
            c.arg0(format!("-{base}"));
        }
    }
    c.env_clear()
        .env("HOME", &user.home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .env("SHELL", &shell)
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        );
    if let Some(lang) = std::env::var_os("LANG") {
        c.env("LANG", lang);
    }
    if let Some(term) = term {
        c.env("TERM", term);
    }
    let dir = if user.home.is_dir() {
        user.home.clone()
    } else {
        "/".into()
    };
    c.current_dir(dir).kill_on_drop(true);
    c
}

fn exit_code(status: std::io::Result<ExitStatus>) -> u32 {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => u32::try_from(code).unwrap_or(255),
            // Killed by a signal: the shell convention 128 + signal.
            (None, Some(sig)) => 128 + u32::try_from(sig).unwrap_or(0),
            (None, None) => 255,
        },
        Err(_) => 255,
    }
}

/// Copy until EOF or error (a PTY reports EIO once the terminal hung up).
async fn pump(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.flush().await;
}

async fn report_spawn_error(tx: &ChannelWriteHalf<Msg>, e: impl std::fmt::Display) -> Option<u32> {
    let msg = format!("xe dev: cannot start the shell: {e}\r\n");
    let _ = tx.extended_data_bytes(1, msg.into_bytes()).await;
    Some(SPAWN_FAILED)
}

/// A command without PTY: stdin/stdout/stderr as pipes, stderr as SSH
/// extended data. Like sshd, waits for stdout and stderr to close.
async fn run_pipes(
    cmd: Option<Vec<u8>>,
    mut rx: ChannelReadHalf,
    tx: &ChannelWriteHalf<Msg>,
    user: &LocalUser,
) -> Option<u32> {
    let mut child = match command(user, cmd, None)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return report_spawn_error(tx, e).await,
    };
    let mut stdin = child.stdin.take();
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return report_spawn_error(tx, "no pipes").await;
    };
    let (out_w, err_w) = (tx.make_writer(), tx.make_writer_ext(Some(1)));
    let run = async {
        tokio::join!(pump(stdout, out_w), pump(stderr, err_w));
        exit_code(child.wait().await)
    };
    // Returns only when the client closed the channel or the connection.
    let input = async {
        while let Some(msg) = rx.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    if let Some(w) = stdin.as_mut()
                        && w.write_all(&data).await.is_err()
                    {
                        stdin = None;
                    }
                }
                // Dropping stdin closes the pipe: the command sees EOF.
                ChannelMsg::Eof => stdin = None,
                ChannelMsg::Close => break,
                _ => {}
            }
        }
    };
    tokio::select! {
        code = run => Some(code),
        () = input => None,
    }
}

/// A command or shell on a fresh PTY; window changes resize it.
async fn run_pty(
    cmd: Option<Vec<u8>>,
    params: PtyParams,
    mut rx: ChannelReadHalf,
    tx: &ChannelWriteHalf<Msg>,
    user: &LocalUser,
) -> Option<u32> {
    let (pty, pts) = match pty_process::open() {
        Ok(p) => p,
        Err(e) => return report_spawn_error(tx, e).await,
    };
    if let Err(e) = pty.resize(params.size) {
        return report_spawn_error(tx, e).await;
    }
    let mut child =
        match pty_process::Command::from(command(user, cmd, Some(&params.term))).spawn(pts) {
            Ok(c) => c,
            Err(e) => return report_spawn_error(tx, e).await,
        };
    let (pty_r, mut pty_w) = pty.into_split();
    let run = async {
        let output = pump(pty_r, tx.make_writer());
        tokio::pin!(output);
        let mut output_done = false;
        let status = tokio::select! {
            s = child.wait() => s,
            () = &mut output => {
                output_done = true;
                child.wait().await
            }
        };
        // Output written just before the exit may still be in the terminal.
        if !output_done {
            let _ = tokio::time::timeout(PTY_DRAIN, &mut output).await;
        }
        exit_code(status)
    };
    let input = async {
        while let Some(msg) = rx.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    let _ = pty_w.write_all(&data).await;
                }
                ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    ..
                } => {
                    let _ = pty_w.resize(size(col_width, row_height));
                }
                // A terminal has no half-close; the shell ends on its own
                // (OpenSSH behaves the same with a PTY).
                ChannelMsg::Eof => {}
                ChannelMsg::Close => break,
                _ => {}
            }
        }
    };
    tokio::select! {
        code = run => Some(code),
        () = input => None,
    }
}
