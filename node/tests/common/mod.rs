//! Fixtures for the gateway tests: a real `sshd` standing in for the VM, a
//! ledger with leases in every state, the gateway on a loopback listener,
//! a real `ssh-agent`, and OpenSSH client command lines.
//!
//! Every process started here is a child with `kill_on_drop`, so a test
//! that ends (or fails) stops exactly the processes it started.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdout, Command};
use tokio_util::sync::CancellationToken;
use xe_node::gateway::{
    Gateway, GatewayConfig, GatewayError, GatewayStats, TunnelDialError, TunnelDialer, VmStream,
};
use xe_store::{
    AccessPubKey, LeaseEvent, LeaseHash, LeaseKey, LeaseRecord, Store, Wallet, now_secs,
};

#[allow(unused_imports)] // each test binary uses a different subset
pub use xe_testkit::{SSHD, init_tracing, openssh_available};

/// Generous bound for one OpenSSH command in a test.
pub const CMD_LIMIT: Duration = Duration::from_secs(60);

/// Run a command to completion within `limit`, killing it on timeout.
pub async fn run(cmd: &mut Command, limit: Duration) -> std::process::Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("spawn command");
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => out.expect("wait for command"),
        Err(_) => panic!("command did not finish within {limit:?}: {cmd:?}"),
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Read lines from `stdout` until one equals `want` (bounded).
pub async fn wait_line(stdout: &mut BufReader<ChildStdout>, want: &str, limit: Duration) {
    let fut = async {
        let mut line = String::new();
        loop {
            line.clear();
            let n = stdout
                .read_line(&mut line)
                .await
                .expect("read child stdout");
            assert!(n > 0, "child stdout ended before the line {want:?}");
            if line.trim_end() == want {
                return;
            }
        }
    };
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("no line {want:?} within {limit:?}"));
}

/// Wait for a child to exit (bounded); `None` if it did not.
pub async fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    tokio::time::timeout(limit, child.wait())
        .await
        .ok()
        .map(|r| r.expect("wait for child"))
}

// ---------------------------------------------------------------- ledger

/// A store with a consumer and a provider, minting leases.
pub struct Ledger {
    pub store: Store,
    pub consumer: Wallet,
    pub provider: Wallet,
}

impl Ledger {
    pub fn new() -> Self {
        Ledger {
            store: Store::temporary().expect("temporary store"),
            consumer: Wallet::from_seed(rand::random()),
            provider: Wallet::from_seed(rand::random()),
        }
    }

    /// A lease for `access`, accepted at `accepted_at` (if given) with
    /// `vm_host_key`, lasting `duration` seconds.
    pub fn lease(
        &self,
        access: AccessPubKey,
        accepted_at: Option<u64>,
        duration: u64,
        vm_host_key: &str,
    ) -> LeaseHash {
        xe_testkit::apply_lease(
            &self.store,
            &self.consumer,
            &self.provider,
            access,
            accepted_at,
            duration,
            vm_host_key,
        )
    }

    /// An active one-hour lease.
    pub fn active(&self, access: AccessPubKey, vm_host_key: &str) -> LeaseHash {
        self.lease(access, Some(now_secs()), 3600, vm_host_key)
    }

    pub fn settle(&self, hash: LeaseHash) {
        self.store
            .apply_event(&LeaseEvent::settle(&self.consumer, hash, now_secs()))
            .expect("apply settle");
    }

    pub fn cancel(&self, hash: LeaseHash) {
        self.store
            .apply_event(&LeaseEvent::cancel(&self.consumer, hash, now_secs()))
            .expect("apply cancel");
    }

    pub fn decline(&self, hash: LeaseHash, reason: &str) {
        self.store
            .apply_event(&LeaseEvent::decline(
                &self.provider,
                hash,
                now_secs(),
                reason,
            ))
            .expect("apply decline");
    }

    pub fn record(&self, hash: &LeaseHash) -> LeaseRecord {
        self.store.lease(hash).expect("read").expect("lease exists")
    }
}

#[allow(unused_imports)] // each test binary uses a different subset
pub use xe_testkit::UNUSED_VM_HOST_KEY;

// ---------------------------------------------------------------- dialers

/// Tunnels are TCP connections to a local sshd.
pub struct TcpDialer(pub SocketAddr);

#[async_trait::async_trait]
impl TunnelDialer for TcpDialer {
    async fn open(&self, _lease: &LeaseRecord) -> Result<VmStream, TunnelDialError> {
        TcpStream::connect(self.0)
            .await
            .map(|s| Box::new(s) as VmStream)
            .map_err(|e| TunnelDialError::new(format!("vm sshd at {}: {e}", self.0)))
    }
}

/// Every tunnel is refused with this reason.
pub struct FailingDialer(pub &'static str);

#[async_trait::async_trait]
impl TunnelDialer for FailingDialer {
    async fn open(&self, _lease: &LeaseRecord) -> Result<VmStream, TunnelDialError> {
        Err(TunnelDialError::new(self.0))
    }
}

// ---------------------------------------------------------------- sshd

/// A real OpenSSH server playing the leased VM.
pub struct Vm {
    pub addr: SocketAddr,
    /// `ssh-ed25519 AAAA…`: what the provider publishes in the accept.
    pub host_key_line: String,
    _child: Child,
}

async fn keygen(args: &[&str]) {
    let out = run(Command::new("ssh-keygen").args(args), CMD_LIMIT).await;
    assert!(
        out.status.success(),
        "ssh-keygen {args:?}: {}",
        text(&out.stderr)
    );
}

/// Generate an OpenSSH key pair at `path` (`ed25519` or `rsa`).
pub async fn ssh_keygen(path: &Path, kind: &str) {
    let p = path.to_str().expect("utf-8 path");
    if kind == "rsa" {
        keygen(&["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", p]).await;
    } else {
        keygen(&["-q", "-t", kind, "-N", "", "-f", p]).await;
    }
}

impl Vm {
    /// Start `sshd -D -e` on a free loopback port accepting `authorized`
    /// (an `authorized_keys` line) for root. Ready when sshd reports that
    /// it listens; a lost race for the port is retried with another one.
    pub async fn start(dir: &Path, authorized: &str) -> Vm {
        // sshd refuses to start without its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let dir = dir.join("vm");
        std::fs::create_dir_all(&dir).expect("vm dir");
        let host_key = dir.join("host_ed25519");
        ssh_keygen(&host_key, "ed25519").await;
        let host_key_line = std::fs::read_to_string(dir.join("host_ed25519.pub"))
            .expect("read vm host key")
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let auth_keys = dir.join("authorized_keys");
        std::fs::write(&auth_keys, format!("{authorized}\n")).expect("authorized_keys");
        let config = dir.join("sshd_config");

        for attempt in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("probe a free port")
                .port();
            std::fs::write(
                &config,
                format!(
                    "ListenAddress 127.0.0.1:{port}\n\
                     HostKey {host}\n\
                     AuthorizedKeysFile {keys}\n\
                     PasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n\
                     UsePAM no\n\
                     PidFile none\n\
                     StrictModes no\n\
                     PermitRootLogin prohibit-password\n\
                     AcceptEnv XE_*\n\
                     Subsystem sftp internal-sftp\n\
                     LogLevel INFO\n",
                    host = host_key.display(),
                    keys = auth_keys.display(),
                ),
            )
            .expect("sshd_config");
            let mut child = Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn sshd");
            let mut lines = BufReader::new(child.stderr.take().expect("sshd stderr")).lines();
            let ready = format!("Server listening on 127.0.0.1 port {port}.");
            let outcome = tokio::time::timeout(Duration::from_secs(20), async {
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("[vm sshd] {line}");
                    if line.trim() == ready {
                        return true;
                    }
                }
                false
            })
            .await;
            match outcome {
                Ok(true) => {
                    // Keep draining its log so sshd never blocks on stderr.
                    tokio::spawn(async move {
                        while let Ok(Some(line)) = lines.next_line().await {
                            eprintln!("[vm sshd] {line}");
                        }
                    });
                    return Vm {
                        addr: SocketAddr::from(([127, 0, 0, 1], port)),
                        host_key_line,
                        _child: child,
                    };
                }
                Ok(false) => {
                    let status = child.wait().await.expect("sshd exit status");
                    eprintln!(
                        "sshd did not start on port {port} (attempt {attempt}, {status}); retrying on another port"
                    );
                }
                Err(_) => panic!("sshd did not report listening within 20 s"),
            }
        }
        panic!("sshd failed to start 10 times");
    }
}

// ---------------------------------------------------------------- agent

/// A real `ssh-agent`, on a socket in the test's directory.
pub struct Agent {
    pub sock: PathBuf,
    _child: Child,
}

impl Agent {
    pub async fn start(dir: &Path) -> Agent {
        let sock = dir.join("agent.sock");
        let mut child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn ssh-agent");
        // `ssh-agent -D` prints its SSH_AUTH_SOCK line once it listens.
        let mut out = BufReader::new(child.stdout.take().expect("agent stdout"));
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(20), out.read_line(&mut line))
            .await
            .expect("ssh-agent announces itself within 20 s")
            .expect("read ssh-agent stdout");
        assert!(
            line.starts_with("SSH_AUTH_SOCK="),
            "unexpected ssh-agent output {line:?}"
        );
        Agent {
            sock,
            _child: child,
        }
    }

    pub async fn add(&self, key: &Path) {
        let out = run(
            Command::new("ssh-add")
                .arg(key)
                .env("SSH_AUTH_SOCK", &self.sock),
            CMD_LIMIT,
        )
        .await;
        assert!(out.status.success(), "ssh-add: {}", text(&out.stderr));
    }
}

// ---------------------------------------------------------------- gateway

/// A running gateway on a loopback listener.
pub struct Gw {
    pub addr: SocketAddr,
    pub stats: Arc<GatewayStats>,
    pub fingerprint: String,
    pub public_key: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), GatewayError>>,
}

pub async fn start_gateway(
    data_dir: &Path,
    store: Store,
    dialer: Arc<dyn TunnelDialer>,
    tweak: impl FnOnce(&mut GatewayConfig),
) -> Gw {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind gateway");
    let addr = listener.local_addr().expect("gateway addr");
    let mut config = GatewayConfig::new(data_dir);
    tweak(&mut config);
    let stats = Arc::new(GatewayStats::new());
    let gw = Gateway::new(config, store, dialer, stats.clone()).expect("gateway");
    let fingerprint = gw.host_key_fingerprint().to_string();
    let public_key = gw.host_public_key().to_string();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(gw.run(listener, shutdown.clone()));
    Gw {
        addr,
        stats,
        fingerprint,
        public_key,
        shutdown,
        task,
    }
}

impl Gw {
    /// Cancel and wait (bounded) for `run` to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let res = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("gateway stops within 10 s after cancellation")
            .expect("gateway task did not panic");
        res.expect("gateway run returned Ok");
    }
}

// ---------------------------------------------------------------- ssh

/// One test's world: temp dir, ledger, lease key, optional VM, gateway and
/// known_hosts files for both.
pub struct Scene {
    pub dir: tempfile::TempDir,
    pub ledger: Ledger,
    pub key: LeaseKey,
    pub vm: Option<Vm>,
    pub gw: Gw,
    /// An active lease for `key`.
    pub lease: LeaseHash,
    pub gw_known_hosts: PathBuf,
    pub vm_known_hosts: PathBuf,
}

pub enum Backend {
    /// A real sshd; tunnels are TCP connections to it.
    Sshd,
    /// No VM; every tunnel is refused with this reason.
    Failing(&'static str),
}

impl Scene {
    pub async fn new(backend: Backend, tweak: impl FnOnce(&mut GatewayConfig)) -> Scene {
        init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let key =
            LeaseKey::load_or_create(&dir.path().join("wallet.lease_key")).expect("lease key");
        let ledger = Ledger::new();
        let (vm, dialer): (Option<Vm>, Arc<dyn TunnelDialer>) = match backend {
            Backend::Sshd => {
                let vm = Vm::start(dir.path(), &key.openssh_public()).await;
                let dialer = Arc::new(TcpDialer(vm.addr));
                (Some(vm), dialer)
            }
            Backend::Failing(reason) => (None, Arc::new(FailingDialer(reason))),
        };
        let host_key = vm.as_ref().map(|v| v.host_key_line.clone());
        let lease = ledger.active(
            key.access_pub_key(),
            host_key.as_deref().unwrap_or(UNUSED_VM_HOST_KEY),
        );
        let gw = start_gateway(
            &dir.path().join("data"),
            ledger.store.clone(),
            dialer,
            tweak,
        )
        .await;
        let gw_known_hosts = dir.path().join("gw_known_hosts");
        std::fs::write(
            &gw_known_hosts,
            format!("[127.0.0.1]:{} {}\n", gw.addr.port(), gw.public_key),
        )
        .expect("gw known_hosts");
        let vm_known_hosts = dir.path().join("vm_known_hosts");
        std::fs::write(
            &vm_known_hosts,
            format!("vm {}\n", host_key.as_deref().unwrap_or(UNUSED_VM_HOST_KEY)),
        )
        .expect("vm known_hosts");
        Scene {
            dir,
            ledger,
            key,
            vm,
            gw,
            lease,
            gw_known_hosts,
            vm_known_hosts,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Options every client uses: no config files, no prompts, strict host
    /// keys, only the keys named on the command line.
    pub fn base_opts(agent: bool) -> Vec<String> {
        let mut v: Vec<String> = [
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=20",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !agent {
            v.extend(["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none"].map(String::from));
        }
        v
    }

    /// `ssh … -p PORT -i KEY USER@127.0.0.1` (to the gateway itself).
    pub fn gw_ssh(&self, user: &str, key: &Path) -> Command {
        let mut c = Command::new("ssh");
        c.args(Self::base_opts(false))
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.gw_known_hosts.display()
            ))
            .arg("-p")
            .arg(self.gw.addr.port().to_string())
            .arg("-i")
            .arg(key)
            .arg(format!("{user}@127.0.0.1"));
        c.env_remove("SSH_AUTH_SOCK");
        c
    }

    /// The inner half of `xe ssh`: `ssh … -W %h:%p LEASE@127.0.0.1`, as a
    /// ProxyCommand string. `extra` goes before the destination (e.g.
    /// `-T` instead of `-W`).
    pub fn proxy_command(&self, forward: &str) -> String {
        format!(
            "ssh {} -o UserKnownHostsFile={} -p {} -i {} {forward} {}@127.0.0.1",
            Self::base_opts(false).join(" "),
            self.gw_known_hosts.display(),
            self.gw.addr.port(),
            self.key.path().display(),
            self.lease
        )
    }

    /// `ssh -o ProxyCommand=… -i KEY root@vm COMMAND`: end to end with the
    /// VM's sshd, its host key checked against the published one.
    pub fn vm_ssh(&self, proxy_command: &str, command: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(Self::base_opts(false))
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.vm_known_hosts.display()
            ))
            .arg("-o")
            .arg(format!("ProxyCommand={proxy_command}"))
            .arg("-i")
            .arg(self.key.path())
            .arg("root@vm")
            .arg(command);
        c.env_remove("SSH_AUTH_SOCK");
        c
    }
}
