//! `xe tunnel --p2p --stdio LEASE`: the consumer joins the overlay itself.
//! A short-lived libp2p host in this process finds the lease's provider,
//! dials it the way a node does (TCP first, then QUIC, then relayed
//! circuits, with DCUtR upgrading a relayed connection where the NATs
//! allow), opens `/xe/tunnel/2.0.0` and carries standard input and output.
//! No gateway and no node of the consumer's own is in the path; OpenSSH
//! runs end to end with the VM's sshd, which authenticates the lease key.
//!
//! Identity: a fresh ed25519 key every run. The provider's tunnel handler
//! admits any peer (it checks the lease, the VM's sshd checks the key), so
//! a persistent identity would only let peers link one consumer's
//! sessions; the wallet's keys never touch libp2p.
//!
//! Where the provider is found, the first that applies:
//! 1. `--provider-peer`/`--provider-addr` (`xe ssh --p2p` passes them,
//!    having looked the lease up once for its host key): no lookup.
//! 2. `--bootstrap` (or `bootstrap` in ~/.xe/config.json): the overlay
//!    itself. The host reconciles the ledger with those peers and waits
//!    for the lease and its provider's directory entry, each checked by
//!    signature in an in-memory store as on any node.
//! 3. `--node`: that node's API names the lease's provider and the
//!    provider's addresses (trusting that node, as `xe ssh` does).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;
use tracing::info;
use xe_net::{ConnPath, Multiaddr, NetConfig, NetHandle, NetRoles, PeerId, TunnelError};
use xe_store::{AccountAddress, LeaseHash, Store};

/// How long the overlay lookup waits for the lease and the provider's
/// directory entry to arrive by sync.
const OVERLAY_LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Log target of the step timings (`-v`, or `RUST_LOG=xe::p2p=info`).
const STEPS: &str = "xe::p2p";

/// Flags for the overlay path, shared by `xe tunnel`, `xe ssh` and
/// `xe ssh-config`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct P2pArgs {
    /// Join the overlay in this process and reach the provider directly,
    /// with no gateway in the path.
    #[arg(long)]
    pub p2p: bool,
    /// With --p2p: an overlay peer to start from (`…/p2p/<peer id>`,
    /// repeatable); the lease and its provider are then found in the
    /// overlay and no node is asked [default: "bootstrap" in
    /// ~/.xe/config.json, unless --node is given].
    #[arg(long = "bootstrap", value_name = "MULTIADDR", requires = "p2p")]
    pub bootstrap: Vec<Multiaddr>,
    /// With --p2p: log each step and its time (lookup, dial, the tunnel's
    /// path) on standard error.
    #[arg(short, long, requires = "p2p")]
    pub verbose: bool,
    /// With --p2p: where the in-process host listens, comma-separated
    /// multiaddrs [default: every interface, TCP and QUIC, ports chosen by
    /// the kernel: what hole punching needs].
    #[arg(
        long,
        env = "XE_P2P_LISTEN",
        value_name = "MULTIADDR",
        value_delimiter = ','
    )]
    pub p2p_listen: Vec<Multiaddr>,
    /// The provider's peer id, when already known (skips the lookup).
    #[arg(long, value_name = "PEER_ID", requires = "p2p", hide = true)]
    pub provider_peer: Option<PeerId>,
    /// The provider's addresses, with --provider-peer.
    #[arg(
        long,
        value_name = "MULTIADDR",
        requires = "provider_peer",
        hide = true
    )]
    pub provider_addr: Vec<Multiaddr>,
}

impl P2pArgs {
    /// The peers to find the lease through in the overlay, or none to ask
    /// a node: `--bootstrap`; else nothing when `--node`/`XE_NODE` was
    /// given (an explicit node wins over the config file); else the config
    /// file's `bootstrap`. Each must name its peer.
    pub fn overlay_bootstrap(
        &self,
        node: &crate::lease_cmd::NodeUrlArg,
    ) -> anyhow::Result<Vec<Multiaddr>> {
        let list = if !self.bootstrap.is_empty() {
            self.bootstrap.clone()
        } else if node.node.is_some() {
            Vec::new()
        } else {
            crate::paths::Config::load()?.bootstrap
        };
        for b in &list {
            crate::paths::require_peer_id(
                b,
                format_args!("bootstrap address {b}"),
                crate::node_cmd::BOOTSTRAP_HINT,
            )?;
        }
        Ok(list)
    }
}

/// Where the provider is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderAt {
    /// The provider's peer id.
    pub peer: PeerId,
    /// Its announced addresses (direct and relayed).
    pub addrs: Vec<Multiaddr>,
}

impl ProviderAt {
    /// From `account`'s directory entry, however it was obtained (a node's
    /// API, this host's own store).
    fn from_entry(
        account: &AccountAddress,
        peer_id: &str,
        addrs: &[String],
    ) -> anyhow::Result<Self> {
        Ok(ProviderAt {
            peer: peer_id
                .parse()
                .with_context(|| format!("provider {account} announced an invalid peer id"))?,
            addrs: addrs.iter().filter_map(|a| a.parse().ok()).collect(),
        })
    }
}

/// Where `--node`'s directory says `provider` (of `lease`) is.
pub async fn provider_from_node(
    client: &xe_api::client::ApiClient,
    lease: &LeaseHash,
    provider: &AccountAddress,
) -> anyhow::Result<ProviderAt> {
    let providers = client.providers().await?;
    let entry = providers
        .into_iter()
        .find(|p| p.address == *provider)
        .with_context(|| {
            format!(
                "provider {} of lease {} is not in the directory of the node at {} \
                 (not announced, or its entry expired): is the provider's node running?",
                provider.short(),
                lease.short(),
                client.url()
            )
        })?;
    ProviderAt::from_entry(provider, &entry.peer_id, &entry.addrs)
}

/// `typed` as a whole lease hash: only a node resolves a prefix.
fn full_hash(typed: &str) -> anyhow::Result<LeaseHash> {
    typed.parse().map_err(|e| {
        anyhow::anyhow!(
            "{e}: without --node the full 64-hex lease hash is needed (`xe lease list --mine`)"
        )
    })
}

/// A host of our own for one tunnel: ephemeral identity, no announce, no
/// provider role; it listens on every interface (ports chosen by the
/// kernel) so DCUtR can punch a hole, and the ledger lives in memory.
pub struct ConsumerHost {
    pub net: NetHandle,
    pub store: Store,
    cancel: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl ConsumerHost {
    /// `bootstrap` empty: the provider is already known, so the host does
    /// not replicate (see `NetConfig::replicate`); else it must, to find
    /// the lease in the overlay.
    pub async fn start(
        listen: &[Multiaddr],
        bootstrap: Vec<Multiaddr>,
    ) -> anyhow::Result<ConsumerHost> {
        let t = Instant::now();
        let store = Store::temporary().context("creating the in-memory ledger")?;
        let listen = if listen.is_empty() {
            NetConfig::every_interface()
        } else {
            listen.to_vec()
        };
        let cfg = NetConfig {
            listen,
            replicate: !bootstrap.is_empty(),
            bootstrap,
            compact: false,
            ..NetConfig::default()
        };
        let cancel = CancellationToken::new();
        let net = xe_net::start(NetRoles::ephemeral(), cfg, store.clone(), cancel.clone())
            .await
            .context("starting the in-process p2p host")?;
        info!(target: STEPS, peer = %net.handle.peer_id(), ms = t.elapsed().as_millis(), "p2p host started (ephemeral identity)");
        Ok(ConsumerHost {
            net: net.handle,
            store,
            cancel,
            tasks: net.tasks,
        })
    }

    /// Stop the host and wait (bounded) for its tasks.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
    }

    /// Wait until the overlay has delivered `lease` and its provider's
    /// directory entry into this host's store; the record comes back too.
    pub async fn find_in_overlay(
        &self,
        lease: &LeaseHash,
    ) -> anyhow::Result<(ProviderAt, xe_store::LeaseRecord)> {
        let t = Instant::now();
        let deadline = tokio::time::Instant::now() + OVERLAY_LOOKUP_TIMEOUT;
        let mut leases = self.store.subscribe();
        let mut directory = self.store.subscribe_directory();
        let mut peers = self.net.peer_count();
        loop {
            let found = match self.store.lease(lease)? {
                Some(rec) => self
                    .store
                    .peer_for_account(&rec.lease.provider)?
                    .map(|entry| (rec, entry)),
                None => None,
            };
            if let Some((rec, entry)) = found {
                info!(target: STEPS, ms = t.elapsed().as_millis(), "lease and provider found in the overlay");
                let at = ProviderAt::from_entry(&rec.lease.provider, &entry.peer_id, &entry.addrs)?;
                return Ok((at, rec));
            }
            tokio::select! {
                _ = leases.recv() => {}
                _ = directory.recv() => {}
                r = peers.changed() => if r.is_err() { bail!("the p2p host stopped") },
                _ = tokio::time::sleep_until(deadline) => {
                    let connected = *peers.borrow();
                    let known = self.store.lease(lease)?.is_some();
                    bail!(
                        "lease {} {} after {} s ({} overlay peer(s) connected): check the lease hash \
                         and the --bootstrap addresses, or pass --node URL to look it up through a node",
                        lease.short(),
                        if known { "is known but its provider has no directory entry" }
                        else { "did not arrive from the overlay" },
                        OVERLAY_LOOKUP_TIMEOUT.as_secs(),
                        connected,
                    );
                }
            }
        }
    }

    /// Dial the provider and open the tunnel; refusals carry the
    /// provider's message.
    pub async fn open(
        &self,
        at: ProviderAt,
        lease: &LeaseHash,
    ) -> anyhow::Result<xe_net::TunnelStream> {
        let t = Instant::now();
        let peer = at.peer;
        match self.net.open_tunnel(peer, at.addrs, lease).await {
            Ok(s) => {
                info!(target: STEPS, %peer, path = %s.path(), ms = t.elapsed().as_millis(), "tunnel open");
                Ok(s)
            }
            Err(TunnelError::Refused(m)) => bail!("the provider refused the tunnel: {m}"),
            Err(e @ (TunnelError::DialFailed { .. } | TunnelError::PeerNotFound(_))) => bail!(
                "cannot reach the provider of lease {} ({e}); is its node running? \
                 (`xe providers` shows when it last announced itself)",
                lease.short()
            ),
            Err(e) => Err(e.into()),
        }
    }

    /// Log the tunnel's path whenever it changes (a relayed connection
    /// that DCUtR upgrades to a direct one).
    pub fn watch_path(&self, peer: PeerId, mut last: ConnPath) {
        let net = self.net.clone();
        let mut changes = net.connection_changes();
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            while cancel
                .run_until_cancelled(changes.changed())
                .await
                .is_some_and(|r| r.is_ok())
            {
                let Ok(now) = net.path_to(peer).await else {
                    return;
                };
                if now != last {
                    info!(target: STEPS, %peer, from = %last, to = %now, "tunnel path changed");
                    last = now;
                }
            }
        });
    }
}

/// `xe tunnel --p2p --stdio LEASE`.
pub async fn run_stdio(
    typed: &str,
    p2p: &P2pArgs,
    node: &crate::lease_cmd::NodeUrlArg,
    signals: crate::node_cmd::ShutdownSignal,
) -> anyhow::Result<std::process::ExitCode> {
    let total = Instant::now();
    let bootstrap = p2p.overlay_bootstrap(node)?;
    let (lease, host, at) = if let Some(peer) = p2p.provider_peer {
        let lease = full_hash(typed)?;
        let host = ConsumerHost::start(&p2p.p2p_listen, Vec::new()).await?;
        let addrs = p2p.provider_addr.clone();
        (lease, host, ProviderAt { peer, addrs })
    } else if !bootstrap.is_empty() {
        let lease = full_hash(typed)?;
        let host = ConsumerHost::start(&p2p.p2p_listen, bootstrap).await?;
        let (at, _) = host.find_in_overlay(&lease).await?;
        (lease, host, at)
    } else {
        // The host starts while the node is asked: neither waits on the
        // other.
        let client = node.client()?;
        let lookup = async {
            let t = Instant::now();
            let view = client.lease_by_prefix(typed).await?;
            let lease = view.lease_hash;
            let at = provider_from_node(&client, &lease, &view.provider)
                .await
                .with_context(|| {
                    format!("looking up lease {} at {}", lease.short(), client.url())
                })?;
            info!(target: STEPS, ms = t.elapsed().as_millis(), node = %client.url(), "provider looked up");
            anyhow::Ok((lease, at))
        };
        let (found, host) = tokio::join!(lookup, ConsumerHost::start(&p2p.p2p_listen, Vec::new()));
        let host = host?;
        let (lease, at) = match found {
            Ok(f) => f,
            Err(e) => {
                host.stop().await;
                return Err(e);
            }
        };
        (lease, host, at)
    };
    let peer = at.peer;
    let mut tunnel = match host.open(at, &lease).await {
        Ok(t) => t,
        Err(e) => {
            host.stop().await;
            return Err(e);
        }
    };
    info!(target: STEPS, ms = total.elapsed().as_millis(), "connected; carrying stdin/stdout");
    host.watch_path(peer, tunnel.path());
    let mut stdio = crate::stdio::stdio().context("standard input and output")?;
    let cancel = signals.into_token();
    // The tunnels' own copy loop (buffers that grow to 256 KiB under bulk
    // data), as `xe tunnel --stdio` uses.
    let carried = match xe_net::tunnel::pipe(&mut stdio, &mut tunnel, &cancel).await {
        Err(_) if cancel.is_cancelled() => Ok(()),
        r => r.map(drop),
    };
    drop(tunnel);
    host.stop().await;
    match carried {
        Ok(()) => Ok(std::process::ExitCode::SUCCESS),
        Err(e) => Err(anyhow::anyhow!("the tunnel to the VM broke: {e}")),
    }
}

/// What `xe ssh --p2p` learns before it starts ssh: the lease, the VM host
/// key to pin (from the lease's signed accept), and, when asked for, where
/// its provider is (so the ProxyCommand dials at once).
pub struct SshLookup {
    pub lease: LeaseHash,
    pub vm_host_key: Option<String>,
    pub provider: Option<ProviderAt>,
}

/// [`SshLookup`] from the overlay alone (`--bootstrap`): the lease record
/// is checked by signature in this host's own store, then by
/// [`crate::lease_check::admits`] like a node's view.
pub fn lookup_in_overlay(
    typed: &str,
    key: &xe_store::LeaseKey,
    p2p: &P2pArgs,
    bootstrap: Vec<Multiaddr>,
    want_provider: bool,
) -> anyhow::Result<SshLookup> {
    let lease = full_hash(typed)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let host = ConsumerHost::start(&p2p.p2p_listen, bootstrap).await?;
        let found = host.find_in_overlay(&lease).await;
        host.stop().await;
        let (at, rec) = found?;
        let view = xe_api::types::LeaseView::from_record(&rec, xe_store::now_secs());
        let view = crate::lease_check::admits(view, key)?;
        Ok(SshLookup {
            lease,
            vm_host_key: view.vm_host_key,
            provider: want_provider.then_some(at),
        })
    })
}
