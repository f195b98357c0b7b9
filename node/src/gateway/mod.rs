//! The SSH gateway: a russh server where the username is a lease hash and
//! the key is the lease's access key, forwarding each session to the
//! lease's VM through a tunnel.
//!
//! ```text
//! ssh client ──SSH──► gateway ──TunnelDialer (libp2p /xe/tunnel/2.0.0)──► provider ──TCP──► VM sshd
//!     user = <64-hex lease hash>, key = lease AccessPubKey (ed25519)
//! ```
//!
//! # What a client gets
//! - **`direct-tcpip`** (`ssh -W`, `ssh -J`, `xe ssh`): the recommended
//!   path. Only the VM's SSH is a valid target (`vm:22`, or localhost,
//!   127.0.0.1, ::1, the lease hash, `xe-<8 hex>`, port 22); anything else
//!   is refused "administratively prohibited" with the accepted targets.
//!   The channel is accepted once the tunnel is up and carries the
//!   client's own SSH session to the VM's sshd, end to end.
//! - **`shell` without a PTY** (the gateway as a `ProxyCommand` without
//!   `-W`): the channel is joined to the tunnel byte for byte, as the seed
//!   does.
//! - **anything else with a forwarded agent** (`ssh -A` with a terminal, a
//!   command or a subsystem such as sftp, PTY or not): the gateway logs in
//!   to the VM itself, with the client's agent, after checking the VM's
//!   host key against the lease's accept, forwards the agent on into the
//!   VM, and joins the two sessions.
//! - **anything else without an agent** (plain `ssh LEASE@gw cmd`, scp,
//!   sftp): how to connect instead, on stderr, exit status 1.
//!
//! Everything else (x11, remote forwarding, streamlocal) is refused. A
//! refused login is told why in one line (`refusal.rs`).
//!
//! # Limits
//! At most [`GatewayConfig::max_connections`] connections (the accept loop
//! closes extra ones at once), [`GatewayConfig::max_channels_per_connection`]
//! channels each, [`GatewayConfig::max_auth_attempts`] authentication
//! attempts, and [`GatewayConfig::auth_grace`] to authenticate. When a lease
//! is settled, cancelled or expires, its connections are closed (within
//! 1 s: each connection waits on `Store::until_inactive`, which the
//! store's writes wake and which sleeps until the expiry time).
//!
//! # Layout
//! - this file: configuration, [`Gateway`], the accept loop.
//! - `conn.rs`: the russh handler; `lifecycle.rs`: the per-connection task.
//! - `channel.rs`: per-channel tasks (`direct-tcpip`, `session`).
//! - `join.rs`: a session run in the VM with the forwarded agent;
//!   `agent.rs`: that agent passed on into the VM.
//! - `refusal.rs`: what a refused user is told, and how it reaches them.
//! - `pump.rs`: channel ↔ tunnel copy with half-close; a cuttable stream.
//! - `auth.rs`: who may log in.
//! - [`hostkey`], [`stats`], [`tunnel`]: public parts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use russh::MethodKind;
use russh::keys::PrivateKey;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use xe_store::Store;

mod agent;
mod auth;
mod channel;
mod conn;
mod error;
pub mod hostkey;
mod join;
mod lifecycle;
mod pump;
mod refusal;
mod session;
mod startups;
pub mod stats;
pub mod tunnel;

pub use error::GatewayError;
pub use hostkey::{HOST_KEY_FILE, host_key_fingerprint, load_or_create_host_key};
pub use stats::{AuthFailure, ConnectionRefusal, GatewayStats, GatewayStatsSnapshot};
pub use tunnel::{TunnelDialError, TunnelDialer, VmStream};

/// The seed's `maxSSHConnections`: authenticated sessions.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100;
/// OpenSSH's `MaxStartups` default, `10:30:100`.
pub const DEFAULT_STARTUPS: Startups = Startups {
    start: 10,
    rate_percent: 30,
    full: 100,
};
/// OpenSSH's `PerSourceMaxStartups` is off by default; a gateway open to
/// strangers wants one: ten logins in flight from one address is plenty.
pub const DEFAULT_STARTUPS_PER_SOURCE: usize = 10;
/// New connections per source: a burst of 10, then 5 a second. A key
/// exchange costs the gateway far more than the client.
pub const DEFAULT_CONNECT_RATE: crate::limits::RateLimit = crate::limits::RateLimit {
    burst: 10,
    per_second: 5.0,
};
/// Grace for connections accepted while more than `start` are
/// unauthenticated: an honest client logs in within a second or two.
pub const DEFAULT_PRESSURE_GRACE: Duration = Duration::from_secs(10);

/// OpenSSH's `MaxStartups start:rate:full`: beyond `start` unauthenticated
/// connections, refuse new ones with probability `rate_percent` %, rising
/// linearly to 100 % at `full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Startups {
    /// Unauthenticated connections before any is refused.
    pub start: usize,
    /// Refusal probability at `start`, in percent.
    pub rate_percent: u8,
    /// Unauthenticated connections at which every new one is refused.
    pub full: usize,
}

impl std::fmt::Display for Startups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.start, self.rate_percent, self.full)
    }
}

impl std::str::FromStr for Startups {
    type Err = String;
    fn from_str(v: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{v:?}: expected START:RATE:FULL like 10:30:100 (1 <= START <= FULL, RATE 0-100)"
            )
        };
        let parts: Vec<&str> = v.split(':').collect();
        let [start, rate, full] = parts.as_slice() else {
            return Err(bad());
        };
        let st = Startups {
            start: start.parse().map_err(|_| bad())?,
            rate_percent: rate.parse().map_err(|_| bad())?,
            full: full.parse().map_err(|_| bad())?,
        };
        if st.start == 0 || st.start > st.full || st.rate_percent > 100 {
            return Err(bad());
        }
        Ok(st)
    }
}
/// OpenSSH's `MaxSessions` default.
pub const DEFAULT_MAX_CHANNELS_PER_CONNECTION: usize = 10;
/// Time a connection gets to authenticate (OpenSSH's `LoginGraceTime` is
/// 120 s; a gateway holding slots for strangers wants less).
pub const DEFAULT_AUTH_GRACE: Duration = Duration::from_secs(30);
/// OpenSSH's `MaxAuthTries`. russh counts the client's initial `none`
/// probe as one.
pub const DEFAULT_MAX_AUTH_ATTEMPTS: usize = 6;
/// Pause after each rejected attempt (except the initial `none` probe,
/// answered at once). Publickey rejections reveal nothing a timing attack
/// could use (lease hashes are public, the check is a lookup), so this only
/// slows guessing loops; small enough that a client offering several agent
/// keys before the right one is not made to wait noticeably.
pub const DEFAULT_AUTH_REJECTION_TIME: Duration = Duration::from_millis(100);
/// Bound on opening a tunnel: the seed's 30 s tunnel handshake deadline.
pub const DEFAULT_TUNNEL_OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Keepalive interval; three unanswered keepalives close the connection.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// The account the gateway logs in as on the VM (PTY + agent sessions).
pub const DEFAULT_VM_USER: &str = "root";

/// Bounds for retrying after `accept()` errors such as EMFILE.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The host key file, `{dataDir}/ssh_host_key`: created on first run,
    /// reused afterwards.
    pub host_key_path: PathBuf,
    /// Most concurrent authenticated sessions.
    pub max_connections: usize,
    /// Unauthenticated connections, all sources (see [`Startups`]).
    pub startups: Startups,
    /// Unauthenticated connections one source may hold.
    pub startups_per_source: usize,
    /// New connections per source (token bucket): beyond it, a connection
    /// waits for its key exchange.
    pub connect_rate: crate::limits::RateLimit,
    /// Grace for connections accepted under pressure (see [`Startups`]).
    pub pressure_grace: Duration,
    /// Most open channels per connection.
    pub max_channels_per_connection: usize,
    /// Time to authenticate before the connection is dropped.
    pub auth_grace: Duration,
    /// Most authentication attempts per connection.
    pub max_auth_attempts: usize,
    /// Pause after each rejected authentication attempt.
    pub auth_rejection_time: Duration,
    /// Bound on [`TunnelDialer::open`].
    pub tunnel_open_timeout: Duration,
    /// SSH keepalive interval towards clients.
    pub keepalive_interval: Duration,
    /// User the gateway logs in as on the VM for PTY + agent sessions.
    pub vm_user: String,
}

impl GatewayConfig {
    /// Defaults, with the host key in `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        GatewayConfig {
            host_key_path: data_dir.join(HOST_KEY_FILE),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            startups: DEFAULT_STARTUPS,
            startups_per_source: DEFAULT_STARTUPS_PER_SOURCE,
            connect_rate: DEFAULT_CONNECT_RATE,
            pressure_grace: DEFAULT_PRESSURE_GRACE,
            max_channels_per_connection: DEFAULT_MAX_CHANNELS_PER_CONNECTION,
            auth_grace: DEFAULT_AUTH_GRACE,
            max_auth_attempts: DEFAULT_MAX_AUTH_ATTEMPTS,
            auth_rejection_time: DEFAULT_AUTH_REJECTION_TIME,
            tunnel_open_timeout: DEFAULT_TUNNEL_OPEN_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            vm_user: DEFAULT_VM_USER.to_string(),
        }
    }

    /// Check the values make sense.
    pub fn validate(&self) -> Result<(), GatewayError> {
        let bad = |what: &str| Err(GatewayError::Config(what.to_string()));
        if self.max_connections == 0 {
            return bad("max_connections must be at least 1");
        }
        if self.startups.start == 0 || self.startups.start > self.startups.full {
            return bad("startups: need 1 <= start <= full");
        }
        if self.startups_per_source == 0 {
            return bad("startups_per_source must be at least 1");
        }
        if self.pressure_grace.is_zero() {
            return bad("pressure_grace must be more than zero");
        }
        if self.max_channels_per_connection == 0 {
            return bad("max_channels_per_connection must be at least 1");
        }
        if self.max_auth_attempts == 0 {
            return bad("max_auth_attempts must be at least 1");
        }
        if self.auth_grace.is_zero() {
            return bad("auth_grace must be more than zero");
        }
        if self.tunnel_open_timeout.is_zero() {
            return bad("tunnel_open_timeout must be more than zero");
        }
        if self.keepalive_interval.is_zero() {
            return bad("keepalive_interval must be more than zero");
        }
        if self.vm_user.is_empty() {
            return bad("vm_user must not be empty");
        }
        Ok(())
    }
}

/// State shared by the accept loop, connections and channels.
pub(crate) struct Shared {
    pub(crate) config: GatewayConfig,
    pub(crate) russh: Arc<russh::server::Config>,
    pub(crate) store: Store,
    pub(crate) dialer: Arc<dyn TunnelDialer>,
    pub(crate) stats: Arc<GatewayStats>,
    /// Authenticated sessions (one permit each, taken at authentication).
    pub(crate) sessions: Arc<Semaphore>,
    /// Connections that have not authenticated yet.
    pub(crate) startups: startups::StartupGate,
    /// Every task the gateway spawns (connections, channels, the watcher).
    pub(crate) tracker: TaskTracker,
    pub(crate) next_conn: AtomicU64,
}

/// A configured gateway, ready to [`run`](Gateway::run) on a listener.
pub struct Gateway {
    shared: Arc<Shared>,
    fingerprint: String,
    public_key: String,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("fingerprint", &self.fingerprint)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Validate `config` and load (or create) the host key.
    pub fn new(
        config: GatewayConfig,
        store: Store,
        dialer: Arc<dyn TunnelDialer>,
        stats: Arc<GatewayStats>,
    ) -> Result<Self, GatewayError> {
        config.validate()?;
        let key = load_or_create_host_key(&config.host_key_path)?;
        let fingerprint = host_key_fingerprint(&key);
        let public_key = key
            .public_key()
            .to_openssh()
            .map_err(|e| GatewayError::HostKey {
                path: config.host_key_path.clone(),
                detail: e.to_string(),
            })?;
        let russh = russh_config(&config, key);
        let sessions = Arc::new(Semaphore::new(config.max_connections));
        let startups = startups::StartupGate::new(&config);
        Ok(Gateway {
            shared: Arc::new(Shared {
                config,
                russh: Arc::new(russh),
                store,
                dialer,
                stats,
                sessions,
                startups,
                tracker: TaskTracker::new(),
                next_conn: AtomicU64::new(1),
            }),
            fingerprint,
            public_key,
        })
    }

    /// The host key's `SHA256:…` fingerprint.
    pub fn host_key_fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The host public key, `ssh-ed25519 AAAA… comment` (a known_hosts
    /// line without the host part).
    pub fn host_public_key(&self) -> &str {
        &self.public_key
    }

    /// Serve `listener` until `shutdown` is cancelled; then stop accepting,
    /// close every connection and return once every task the gateway
    /// started has ended.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), GatewayError> {
        let shared = self.shared;
        let local = listener.local_addr().map_err(GatewayError::Listener)?;
        info!(%local, fingerprint = %self.fingerprint, "SSH gateway listening");

        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            let accepted = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    match shared.startups.admit(peer.ip(), rand::random::<f64>()) {
                        Ok(startup) => {
                            shared.tracker.spawn(lifecycle::serve(
                                shared.clone(),
                                tcp,
                                peer,
                                startup,
                                shutdown.clone(),
                            ));
                        }
                        Err(refusal) => {
                            // As OpenSSH does: close before the version
                            // exchange; nothing spent on a key exchange.
                            shared.stats.record_refusal(refusal);
                            debug!(
                                %peer,
                                reason = refusal.as_str(),
                                unauthenticated = shared.startups.open(),
                                "new SSH connection refused before the key exchange"
                            );
                            drop(tcp);
                        }
                    }
                }
                Err(e) if is_per_connection(&e) => {
                    shared.stats.record_accept_error();
                    info!(error = %e, "a connection failed while being accepted");
                }
                Err(e) => {
                    // EMFILE, ENOBUFS…: wait for resources, never give up.
                    shared.stats.record_accept_error();
                    warn!(error = %e, retry_in = ?backoff, "accept failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
        drop(listener);
        info!("SSH gateway stopping: closing connections");
        shared.tracker.close();
        shared.tracker.wait().await;
        info!("SSH gateway stopped");
        Ok(())
    }
}

/// Accept errors that concern one connection, not the listener.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    )
}

fn russh_config(config: &GatewayConfig, key: PrivateKey) -> russh::server::Config {
    russh::server::Config {
        server_id: russh::SshId::Standard(
            format!("SSH-2.0-xe-gateway_{}", env!("CARGO_PKG_VERSION")).into(),
        ),
        methods: russh::MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: config.auth_rejection_time,
        // OpenSSH opens with a `none` probe; answer it at once.
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![key],
        max_auth_attempts: config.max_auth_attempts,
        // Dead clients are found by keepalives; a live idle session (a
        // shell left open) is not cut. The grace time bounds the rest.
        inactivity_timeout: None,
        keepalive_interval: Some(config.keepalive_interval),
        keepalive_max: 3,
        nodelay: true,
        preferred: gateway_algorithms(),
        ..Default::default()
    }
}

/// The algorithms the gateway offers, set explicitly so a russh upgrade
/// never widens them silently. ssh-audit flagged russh's defaults: the
/// encrypt-and-MAC `hmac-sha2-*` (only the `-etm` forms stay),
/// `diffie-hellman-group14-sha256` (and the other finite-field groups) and
/// pre-auth `zlib` (only the delayed `zlib@openssh.com` stays). The
/// client's order decides among what is left.
fn gateway_algorithms() -> russh::Preferred {
    use std::borrow::Cow::Borrowed;
    russh::Preferred {
        kex: Borrowed(GATEWAY_KEX),
        key: Borrowed(GATEWAY_KEY_ALGORITHMS),
        host_key_certificates: Borrowed(&[]),
        cipher: Borrowed(GATEWAY_CIPHERS),
        mac: Borrowed(&[russh::mac::HMAC_SHA256_ETM, russh::mac::HMAC_SHA512_ETM]),
        compression: Borrowed(&[russh::compression::NONE, russh::compression::ZLIB_LEGACY]),
    }
}

/// The host key russh offers is filtered to the keys it has (one ed25519
/// key), so clients see `ssh-ed25519` only. The list also becomes the
/// `server-sig-algs` extension, which tells clients which *user* keys are
/// worth offering: OpenSSH silently skips an RSA key not listed there, and
/// the user would get a bare "Permission denied" instead of being told that
/// a lease takes only its ed25519 key (see `refusal.rs`).
const GATEWAY_KEY_ALGORITHMS: &[russh::keys::Algorithm] = {
    use russh::keys::{Algorithm, EcdsaCurve, HashAlg};
    &[
        Algorithm::Ed25519,
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP256,
        },
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP384,
        },
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP521,
        },
        Algorithm::Rsa {
            hash: Some(HashAlg::Sha512),
        },
        Algorithm::Rsa {
            hash: Some(HashAlg::Sha256),
        },
    ]
};

/// Post-quantum hybrid first (OpenSSH 9.9+), then X25519. The last two are
/// not algorithms but markers russh must see in this list to advertise
/// `ext-info-s` (server-sig-algs) and strict KEX (the Terrapin fix).
const GATEWAY_KEX: &[russh::kex::Name] = &[
    russh::kex::MLKEM768X25519_SHA256,
    russh::kex::CURVE25519,
    russh::kex::CURVE25519_PRE_RFC_8731,
    russh::kex::EXTENSION_SUPPORT_AS_SERVER,
    russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
];

/// AEAD first; aes128-gcm costs a third less CPU than aes256-gcm.
/// AES-192 and every CBC mode are left out.
const GATEWAY_CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_GCM,
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_128_CTR,
];
