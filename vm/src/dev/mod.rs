//! The `dev` backend — DEVELOPMENT ONLY: an SSH server embedded in the
//! provider process (russh) per lease, on a listener bound to
//! `127.0.0.1:0` before its port is reported (so no port race). It accepts
//! only the lease's key (publickey only, any user name) and gives a shell
//! or command **on the provider's own machine, as the user running the
//! node**, with or without a PTY. There is no isolation at all: it exists so
//! that `xe devnet` works on a machine without OpenSSH server.
//!
//! Per-lease state is only the host key, `{state_dir}/{lease hex}/host_key`,
//! kept so `recover` serves the same key after a restart.

mod session;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use russh::MethodKind;
use russh::keys::ssh_key::PrivateKey;
use russh::server::Config;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::local::LocalBackend;
use crate::local_user::LocalUser;
use crate::registry::Registry;
use crate::{ProvisionRequest, VmError, VmInfo, VmStatus, keys, private_dir};

/// Concurrent SSH connections per lease. A development shell needs a few;
/// the cap keeps a runaway client from exhausting the provider.
const MAX_CONNECTIONS: usize = 16;

/// Pause after a failed accept (EMFILE and the like) before trying again,
/// so the loop neither dies nor spins.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long teardown waits for sessions to wind down after cancelling.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Steady rejection delay per failed auth attempt. russh's 1 s default
/// stalls clients that offer several agent keys; a development server
/// needs no more than a token delay.
const AUTH_REJECTION_TIME: Duration = Duration::from_millis(200);

/// Keepalive interval; three unanswered keepalives close a dead session
/// (instead of an inactivity timeout that would cut idle shells).
const KEEPALIVE: Duration = Duration::from_secs(30);

const HOST_KEY: &str = "host_key";

/// One lease's embedded server.
pub(crate) struct DevServer {
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// The dev backend. See the module docs.
pub struct DevManager {
    state_dir: PathBuf,
    user: Arc<LocalUser>,
    registry: Registry<DevServer>,
}

impl DevManager {
    /// A dev manager keeping host keys under `state_dir` (created on first
    /// provision). Logs a loud warning: this backend gives shells on the host.
    pub fn new(state_dir: PathBuf) -> Self {
        let user = LocalUser::current();
        warn!(
            user = %user.name,
            "DEV VM BACKEND — DEVELOPMENT ONLY: every lease gets a shell on THIS machine as user {}, with no isolation. Never use it on a provider that serves others.",
            user.name
        );
        DevManager {
            state_dir,
            user: Arc::new(user),
            registry: Registry::new("dev"),
        }
    }
}

fn server_config(key: PrivateKey) -> Config {
    Config {
        methods: russh::MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: AUTH_REJECTION_TIME,
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![key],
        inactivity_timeout: None,
        keepalive_interval: Some(KEEPALIVE),
        keepalive_max: 3,
        nodelay: true,
        ..Config::default()
    }
}

/// Accept until cancelled; each connection (handshake included) runs in its
/// own task behind the connection cap.
async fn accept_loop(listener: TcpListener, config: Arc<Config>, ctx: session::Context) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            biased;
            () = ctx.cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    warn!(%peer, "refused: {MAX_CONNECTIONS} connections already open");
                    continue;
                };
                let config = config.clone();
                let conn = ctx.clone();
                ctx.tasks.spawn(
                    async move {
                        session::serve(config, stream, conn).await;
                        drop(permit);
                    }
                    .instrument(info_span!("conn", %peer)),
                );
            }
            Err(e) => {
                warn!(error = %e, "accept failed; retrying");
                tokio::select! {
                    () = ctx.cancel.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
    debug!("dev SSH listener closed");
}

/// Cancel a server's listener, sessions and processes and wait for them.
async fn stop(server: DevServer) {
    server.cancel.cancel();
    server.tasks.close();
    if tokio::time::timeout(STOP_TIMEOUT, server.tasks.wait())
        .await
        .is_err()
    {
        warn!("dev SSH server tasks did not stop in time");
    }
}

#[async_trait::async_trait]
impl LocalBackend for DevManager {
    type Runtime = DevServer;
    const NAME: &'static str = "dev";
    const RUNTIME: &'static str = "server";

    fn registry(&self) -> &Registry<DevServer> {
        &self.registry
    }

    fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    async fn start(
        &self,
        req: &ProvisionRequest,
        recovering: bool,
    ) -> Result<(VmInfo, DevServer), VmError> {
        keys::validate_access_key(&req.access_pub_key)?;
        let dir = self.lease_dir(&req.lease);
        let key_path = dir.join(HOST_KEY);
        if recovering && !key_path.exists() {
            return Err(VmError::Failed {
                what: "recovering the lease's dev server".into(),
                detail: format!(
                    "{} is gone; not starting with a new host key",
                    key_path.display()
                ),
            });
        }
        private_dir::create(&dir)?;
        let key = keys::load_or_create_host_key(&key_path)?;
        let host_key = keys::host_key_line(&key)?;
        // Bound before the port is reported: it accepts from this moment.
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(VmError::io("binding 127.0.0.1:0 for the dev SSH server"))?;
        let port = listener
            .local_addr()
            .map_err(VmError::io("reading the dev server's port"))?
            .port();
        let server = DevServer {
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        let ctx = session::Context {
            lease: req.lease,
            access_key: req.access_pub_key,
            user: self.user.clone(),
            cancel: server.cancel.clone(),
            tasks: server.tasks.clone(),
        };
        server.tasks.spawn(
            accept_loop(listener, Arc::new(server_config(key)), ctx)
                .instrument(info_span!("dev_ssh", lease = %req.lease.short(), port)),
        );
        info!(lease = %req.lease.short(), port, "dev SSH server running (development only)");
        let mut info = VmInfo::new(req.lease, "dev", VmStatus::Running);
        info.ssh_port = Some(port);
        info.host_key = Some(host_key);
        Ok((info, server))
    }

    async fn stop(&self, runtime: DevServer) {
        stop(runtime).await;
    }
}
