//! `xe ssh` and `xe ssh-config`: plain OpenSSH through the gateway, the
//! way the seed describes — `ProxyCommand="ssh -W %h:%p LEASE@GATEWAY"` —
//! so the consumer's SSH runs end to end with the VM's sshd. With `--http`
//! the ProxyCommand is `xe tunnel --stdio` instead: the node's HTTP
//! tunnel, for networks that let only HTTP through. With `--p2p` it is
//! `xe tunnel --p2p --stdio`: this machine's own overlay peer, no gateway.
//!
//! This file turns flags into an [`SshTarget`] (looking the lease up);
//! what ssh is then told is in `ssh_target.rs`, the pins in
//! `known_hosts.rs`.
//!
//! Host keys stay strictly checked without prompts: the VM's host key that
//! the provider signed into the lease's accept is pinned in an xe-owned
//! known_hosts under `HostKeyAlias=LEASE`, so a man in the middle is
//! detected and one lease's key never clashes with another's.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::Args;
use xe_store::{LeaseHash, LeaseKey, lease_key_path};

use crate::known_hosts::{has_pin, pin_host_key};
use crate::paths::WalletArg;
use crate::ssh_target::{SshTarget, Via, shell_quote, split_host_port};

/// Flags shared by `xe ssh` and `xe ssh-config`.
#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// The lease hash (64 hex), or a unique prefix of at least 8 hex digits
    /// (the --node resolves it).
    pub lease: String,
    /// SSH gateway HOST:PORT [default: "gateway" in ~/.xe/config.json, else
    /// the --node's own SSH gateway].
    #[arg(long, env = "XE_GATEWAY", value_name = "HOST:PORT")]
    pub gateway: Option<String>,
    /// Go through the --node's HTTP tunnel (`xe tunnel --stdio`) instead of
    /// an SSH gateway: only the node's HTTP port needs to be reachable
    /// (--gateway is then not used).
    #[arg(long, conflicts_with = "p2p")]
    pub http: bool,
    #[command(flatten)]
    pub p2p: crate::p2p_tunnel::P2pArgs,
    /// User on the VM.
    #[arg(long, default_value = "root")]
    pub user: String,
    /// known_hosts file that pins VM host keys [default: ~/.xe/known_hosts].
    #[arg(long, value_name = "PATH")]
    pub known_hosts: Option<PathBuf>,
    /// The lease's VM host key (`ssh-ed25519 AAAA…`) to pin [default: read
    /// from the lease's signed accept through --node].
    #[arg(long, value_name = "KEY")]
    pub host_key: Option<String>,
    #[command(flatten)]
    pub node: crate::lease_cmd::NodeUrlArg,
    #[command(flatten)]
    pub wallet: WalletArg,
}

/// Ask the node's API.
fn ask_node<T>(
    node: &crate::lease_cmd::NodeUrlArg,
    what: &str,
    f: impl AsyncFnOnce(xe_api::client::ApiClient) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let url = node.url()?;
    let client = node.client()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(f(client)).map_err(|e| {
        // Only a node that could not be asked gets the --node hint; one
        // that answered has said what is wrong.
        if unreachable(&e) {
            e.context(format!(
                "{what} from the xe node at {url} (pass --node URL of a node with --api-port, or give it directly)"
            ))
        } else {
            e
        }
    })
}

/// The node could not be asked at all (as opposed to answering "no").
fn unreachable(e: &anyhow::Error) -> bool {
    use xe_api::client::ClientError as C;
    matches!(
        e.downcast_ref::<C>(),
        Some(C::Connect { .. } | C::Timeout(_) | C::Tls { .. } | C::Http { .. })
    )
}

impl TargetArgs {
    /// The gateway's `host:port`: the flag, the config file, else the
    /// --node's own SSH gateway.
    fn gateway(&self) -> anyhow::Result<String> {
        let gateway = match (self.gateway.clone(), crate::paths::Config::load()?.gateway) {
            (Some(g), _) | (None, Some(g)) => g,
            (None, None) => {
                let url = self.node.url()?;
                let host = url
                    .trim_start_matches("http://")
                    .rsplit_once(':')
                    .map(|(h, _)| h.to_string())
                    .unwrap_or_else(|| "127.0.0.1".into());
                let port = ask_node(&self.node, "reading the SSH gateway port", async |c| {
                    Ok(c.node().await?.ssh_port)
                })?;
                if port == 0 {
                    bail!(
                        "the node at {url} runs no SSH gateway; pass --gateway HOST:PORT or set XE_GATEWAY"
                    );
                }
                format!("{host}:{port}")
            }
        };
        split_host_port(&gateway)?;
        Ok(gateway)
    }

    /// `want_provider`: look the provider up now for `--p2p` (true when
    /// ssh runs at once; a config block must not hold addresses).
    fn target(&self, want_provider: bool) -> anyhow::Result<SshTarget> {
        let typed = crate::lease_cmd::lease_arg(&self.lease)?;
        let wallet = self.wallet.path();
        let key = LeaseKey::load(&lease_key_path(&wallet))
            .with_context(|| format!("the lease key of wallet {}", wallet.display()))?;
        let known_hosts = self
            .known_hosts
            .clone()
            .unwrap_or_else(crate::paths::default_known_hosts);
        let bootstrap = if self.p2p.p2p {
            self.p2p.overlay_bootstrap(&self.node)?
        } else {
            Vec::new()
        };
        if !bootstrap.is_empty() {
            // The overlay alone: no node is asked anything.
            let found = crate::p2p_tunnel::lookup_in_overlay(
                &typed,
                &key,
                &self.p2p,
                bootstrap.clone(),
                want_provider,
            )?;
            let via = Via::P2p {
                xe: std::env::current_exe().context("locating the xe binary")?,
                node: None,
                bootstrap,
                provider: found.provider,
                verbose: self.p2p.verbose,
            };
            return self.finish(found.lease, found.vm_host_key, via, key, known_hosts);
        }
        // The node resolves a prefix and says whether the lease lets this
        // key in now, before ssh turns any refusal into "Permission denied".
        let checked = ask_node(&self.node, "checking the lease", async |c| {
            crate::lease_check::usable_lease(&c, &typed, &key).await
        });
        // The provider's account comes with the node's view; without it
        // (the node is down) a --p2p ProxyCommand looks it up itself.
        let (lease, vm_host_key, provider) = match checked {
            Ok(v) => (v.lease_hash, v.vm_host_key, Some(v.provider)),
            // Everything ssh needs is at hand: a node that is down must not
            // keep the consumer from a VM the gateway would let them into.
            Err(e)
                if unreachable(&e)
                    && typed.len() == 64
                    && (self.host_key.is_some()
                        || typed.parse().is_ok_and(|l| has_pin(&known_hosts, &l))) =>
            {
                eprintln!(
                    "xe: could not check lease {} with the node ({}); trying anyway",
                    &typed[..8],
                    crate::error_text(&e)
                );
                (
                    typed.parse().with_context(|| format!("lease {typed:?}"))?,
                    None,
                    None,
                )
            }
            Err(e) => return Err(e),
        };
        let via = if self.p2p.p2p {
            let provider = match provider.filter(|_| want_provider) {
                Some(account) => Some(ask_node(
                    &self.node,
                    "looking up the provider",
                    async |c| crate::p2p_tunnel::provider_from_node(&c, &lease, &account).await,
                )?),
                None => None,
            };
            Via::P2p {
                xe: std::env::current_exe().context("locating the xe binary")?,
                node: Some(self.node.url()?),
                bootstrap: Vec::new(),
                provider,
                verbose: self.p2p.verbose,
            }
        } else if self.http {
            Via::Http {
                xe: std::env::current_exe().context("locating the xe binary")?,
                node: self.node.url()?,
                // A config block runs from wherever ssh is started.
                wallet: std::path::absolute(&wallet).context("making the wallet path absolute")?,
            }
        } else {
            Via::Gateway(self.gateway()?)
        };
        self.finish(lease, vm_host_key, via, key, known_hosts)
    }

    /// Pin the VM's host key (given, or the lease's) and assemble the target.
    fn finish(
        &self,
        lease: LeaseHash,
        vm_host_key: Option<String>,
        via: Via,
        key: LeaseKey,
        known_hosts: PathBuf,
    ) -> anyhow::Result<SshTarget> {
        if let Some(hk) = &self.host_key {
            pin_host_key(&known_hosts, &lease, hk)?;
        }
        if !has_pin(&known_hosts, &lease) {
            let hk = vm_host_key
                .with_context(|| format!("lease {} has no VM host key published", lease.short()))?;
            pin_host_key(&known_hosts, &lease, &hk)?;
        }
        Ok(SshTarget {
            lease,
            via,
            key: key.path().to_path_buf(),
            known_hosts,
            user: self.user.clone(),
        })
    }
}

/// `xe ssh`.
#[derive(Args, Debug)]
pub struct SshArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Print the ssh command instead of running it.
    #[arg(long)]
    pub print: bool,
    /// Arguments passed to ssh after the destination (a command, or flags).
    #[arg(last = true)]
    pub ssh_args: Vec<String>,
}

/// `xe ssh-config`.
#[derive(Args, Debug)]
pub struct SshConfigArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Host alias for the block [default: xe-<first 8 hex of the lease>].
    #[arg(long)]
    pub alias: Option<String>,
}

pub fn run_ssh(args: SshArgs) -> anyhow::Result<ExitCode> {
    let t = args.target.target(true)?;
    let argv = t.ssh_args(&args.ssh_args)?;
    if args.print {
        let quoted: Vec<String> = argv.iter().map(|a| shell_quote(Path::new(a))).collect();
        println!("ssh {}", quoted.join(" "));
        return Ok(ExitCode::SUCCESS);
    }
    let status = Command::new("ssh")
        .args(&argv)
        .status()
        .context("running ssh (is the OpenSSH client installed?)")?;
    Ok(ExitCode::from(
        status.code().unwrap_or(255).clamp(0, 255) as u8
    ))
}

pub fn run_config(args: SshConfigArgs) -> anyhow::Result<ExitCode> {
    let t = args.target.target(false)?;
    let alias = args
        .alias
        .unwrap_or_else(|| format!("xe-{}", t.lease.short()));
    print!("{}", t.config_block(&alias)?);
    Ok(ExitCode::SUCCESS)
}
