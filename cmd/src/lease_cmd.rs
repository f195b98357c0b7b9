//! `xe lease …` and `xe providers`: clients of a node's HTTP API.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use xe_api::client::{ApiClient, DEFAULT_NODE_URL, NodeUrl};
use xe_api::types::{LeaseView, SubmitResult};
use xe_store::{
    AccountAddress, Lease, LeaseEvent, LeaseHash, LeaseKey, LeaseState, Wallet, now_secs,
};

use crate::paths::WalletArg;
use crate::when;

/// Which node's API to talk to.
#[derive(Args, Debug, Clone)]
pub struct NodeUrlArg {
    /// The node's HTTP API (`xe node --api-port`) [default: "node" in
    /// ~/.xe/config.json, else http://127.0.0.1:8080].
    #[arg(long = "node", env = "XE_NODE", value_name = "URL")]
    pub node: Option<String>,
}

impl NodeUrlArg {
    /// The URL: flag or `XE_NODE`, then the config file, then the default.
    pub fn url(&self) -> anyhow::Result<String> {
        Ok(match &self.node {
            Some(n) => n.clone(),
            None => crate::paths::Config::load()?
                .node
                .unwrap_or_else(|| DEFAULT_NODE_URL.to_string()),
        })
    }

    /// A client of that node.
    pub fn client(&self) -> anyhow::Result<ApiClient> {
        let url: NodeUrl = self.url()?.parse()?;
        Ok(ApiClient::new(url))
    }
}

/// `xe lease create` flags.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The provider's account address (64 hex; see `xe providers`).
    #[arg(long, value_name = "ADDR")]
    pub provider: String,
    /// Virtual CPUs (1-256).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Memory in MiB (128-1048576).
    #[arg(long, default_value_t = 1024)]
    pub memory_mb: u32,
    /// Disk in GiB (1-65536).
    #[arg(long, default_value_t = 10)]
    pub disk_gb: u32,
    /// Lease length in seconds, counted from acceptance (60-31622400: a
    /// minute to 366 days). The provider must accept within a day of
    /// creation or the offer lapses.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub duration: u64,
    /// Wait until the provider accepts (or reports why not).
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up (exit status 1) after this many seconds; 0
    /// waits without a limit.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub timeout: u64,
    #[command(flatten)]
    pub node: NodeUrlArg,
    #[command(flatten)]
    pub wallet: WalletArg,
}

#[derive(Subcommand, Debug)]
pub enum LeaseCmd {
    /// Sign a lease for a provider with your wallet and submit it; prints
    /// the lease hash alone on the last line of stdout.
    Create(CreateArgs),
    /// Show one lease.
    Show {
        /// The lease hash.
        lease: String,
        /// Print the JSON the API returns.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        node: NodeUrlArg,
    },
    /// List leases the node knows (newest first).
    List {
        /// Only leases in this state (created, accepted, settled, cancelled, expired).
        #[arg(long)]
        state: Option<String>,
        /// Only leases this wallet created.
        #[arg(long)]
        mine: bool,
        /// Print the JSON the API returns.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        node: NodeUrlArg,
        #[command(flatten)]
        wallet: WalletArg,
    },
    /// End an accepted lease (consumer or provider); the VM is torn down.
    Settle {
        /// The lease hash.
        lease: String,
        #[command(flatten)]
        node: NodeUrlArg,
        #[command(flatten)]
        wallet: WalletArg,
    },
    /// Withdraw a lease the provider has not accepted yet (consumer only).
    Cancel {
        /// The lease hash.
        lease: String,
        #[command(flatten)]
        node: NodeUrlArg,
        #[command(flatten)]
        wallet: WalletArg,
    },
}

/// `xe providers` flags.
#[derive(Args, Debug)]
pub struct ProvidersArgs {
    /// Print the JSON the API returns.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub node: NodeUrlArg,
}

fn load_wallet(w: &WalletArg) -> anyhow::Result<Wallet> {
    let path = w.path();
    Wallet::load(&path).with_context(|| {
        format!(
            "loading the wallet {} (create one with `xe wallet create --wallet {}`)",
            path.display(),
            path.display()
        )
    })
}

/// A lease as typed: the 64-hex hash, or (the node resolves it) a unique
/// prefix of at least 8 hex digits, like the short form xe prints.
pub(crate) fn lease_arg(s: &str) -> anyhow::Result<String> {
    let s = s.trim().to_ascii_lowercase();
    if s.len() == 64 {
        s.parse::<LeaseHash>().map_err(|e| anyhow::anyhow!("{e}"))?;
        return Ok(s);
    }
    if (8..64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(s);
    }
    bail!("lease {s:?}: expected the 64-hex lease hash or at least its first 8 hex digits")
}

pub async fn run(cmd: LeaseCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        LeaseCmd::Create(args) => create(args).await,
        LeaseCmd::Show { lease, json, node } => {
            let v = node.client()?.lease_by_prefix(&lease_arg(&lease)?).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_lease(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
        LeaseCmd::List {
            state,
            mine,
            json,
            node,
            wallet,
        } => {
            let state = state
                .map(|s| {
                    s.parse::<LeaseState>()
                        .map_err(|e| anyhow::anyhow!("--state: {e}"))
                })
                .transpose()?;
            let consumer = if mine {
                Some(load_wallet(&wallet)?.address())
            } else {
                None
            };
            let leases = node.client()?.leases(state, consumer).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&leases)?);
            } else {
                print_lease_table(&leases);
            }
            Ok(ExitCode::SUCCESS)
        }
        LeaseCmd::Settle {
            lease,
            node,
            wallet,
        } => end_lease(&lease, &node, &wallet, End::Settle).await,
        LeaseCmd::Cancel {
            lease,
            node,
            wallet,
        } => end_lease(&lease, &node, &wallet, End::Cancel).await,
    }
}

fn report_submit(r: &SubmitResult) {
    let state = r
        .state
        .map_or_else(|| "unknown yet".to_string(), |s| s.to_string());
    eprintln!(
        "{} {}: {} (lease state: {state})",
        r.kind, r.lease_hash, r.applied
    );
}

async fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let provider: AccountAddress = args
        .provider
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("--provider: {e}"))?;
    let wallet = load_wallet(&args.wallet)?;
    let key = LeaseKey::load_or_create(&wallet.lease_key_path())
        .with_context(|| format!("the lease key of {}", wallet.path().display()))?;
    let lease = Lease {
        consumer: wallet.public_key(),
        provider,
        vcpus: args.vcpus,
        memory_mb: args.memory_mb,
        disk_gb: args.disk_gb,
        duration: args.duration,
        access_pub_key: key.access_pub_key(),
        created_at: now_secs(),
        nonce: rand::random(),
    };
    // Refuse bad terms here, with the same message the node would give.
    lease.check_terms().map_err(|e| anyhow::anyhow!("{e}"))?;
    let event = LeaseEvent::create(&wallet, lease);
    let hash = event.lease_hash();
    let client = args.node.client()?;
    let r = client
        .submit(&event)
        .await
        .context("submitting the lease")?;
    eprintln!(
        "lease {hash} submitted to {} ({}); access key {}",
        client.url(),
        r.applied,
        key.path().display()
    );
    let outcome = if args.wait {
        warn_if_unknown_provider(&client, &provider).await;
        let limit = (args.timeout > 0).then(|| Duration::from_secs(args.timeout));
        wait_accepted(&client, &hash, limit).await
    } else {
        Ok(())
    };
    // The hash goes to stdout even when waiting failed, so a script can
    // still show or cancel the lease.
    println!("{hash}");
    outcome?;
    Ok(ExitCode::SUCCESS)
}

/// Longest single long poll: the provider's own node also reports the VM's
/// progress (not a ledger change) between polls.
const POLL: Duration = Duration::from_secs(2);

/// How often `--wait` repeats a status that has not changed.
const PROGRESS: Duration = Duration::from_secs(15);

/// A provider no node has announced is most likely a typo, or offline:
/// say so before a wait that would otherwise only time out.
async fn warn_if_unknown_provider(client: &ApiClient, provider: &AccountAddress) {
    match client.providers().await {
        Ok(ps) if !ps.iter().any(|p| &p.address == provider) => eprintln!(
            "warning: provider {} is not in the directory of the node at {} (no provider node with that              address has announced itself): check the address with `xe providers`; waiting anyway",
            provider.short(),
            client.url()
        ),
        Ok(ps) => {
            if let Some(p) = ps.iter().find(|p| &p.address == provider)
                && !p.connected
            {
                eprintln!(
                    "note: provider {} is known but not connected to the node at {} right now",
                    provider.short(),
                    client.url()
                );
            }
        }
        Err(e) => eprintln!("warning: could not read the node's provider directory: {e}"),
    }
}

async fn wait_accepted(
    client: &ApiClient,
    hash: &LeaseHash,
    limit: Option<Duration>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    match limit {
        Some(t) => eprintln!(
            "waiting up to {} for the provider to accept…",
            when::span(t.as_secs())
        ),
        None => eprintln!("waiting for the provider to accept (no time limit)…"),
    }
    let short = hash.short();
    let mut last_vm: Option<String> = None;
    let mut last_print = Instant::now();
    loop {
        let left = limit.map(|t| t.saturating_sub(start.elapsed()));
        if left.is_some_and(|l| l.is_zero()) {
            bail!(
                "lease {short} was not accepted within {} s; it is still open (created): the provider may be \
                 offline or busy. `xe lease show {short}` to check, `xe lease cancel {short}` to withdraw it",
                limit.map_or(0, |t| t.as_secs())
            );
        }
        let poll = left
            .map_or(POLL, |l| l.min(POLL))
            .max(Duration::from_secs(1));
        let v = client.lease_wait(hash, LeaseState::Created, poll).await?;
        match v.state {
            LeaseState::Accepted => {
                eprintln!(
                    "accepted after {} s; expires {}; VM host key: {}",
                    start.elapsed().as_secs(),
                    time(v.expires_at, now_secs()),
                    v.vm_host_key.as_deref().unwrap_or("?")
                );
                return Ok(());
            }
            LeaseState::Created => {}
            LeaseState::Declined => bail!(
                "the provider declined lease {short}: {}. The lease is closed (nothing to cancel); \
                 create a new one with fewer resources, or with another provider (`xe providers`)",
                v.decline_reason.as_deref().unwrap_or("no reason given")
            ),
            LeaseState::Cancelled => bail!("lease {short} was cancelled while waiting"),
            s => bail!("lease {short} is {s}; it will not be accepted"),
        }
        // On the provider's own node, the VM's progress.
        if let Some(vm) = client.vm(hash).await? {
            let line = match &vm.error {
                Some(e) => format!("{}: {e}", vm.status),
                None => vm.status.clone(),
            };
            // A real VM's boot takes up to minutes: repeat an unchanged
            // status now and then so the wait visibly goes on.
            if last_vm.as_deref() != Some(line.as_str()) || last_print.elapsed() >= PROGRESS {
                eprintln!("provider VM: {line} ({} s)", start.elapsed().as_secs());
                last_vm = Some(line);
                last_print = Instant::now();
            }
        } else if last_print.elapsed() >= PROGRESS || last_vm.is_none() {
            eprintln!("state: created ({} s)", start.elapsed().as_secs());
            last_vm = Some(String::new());
            last_print = Instant::now();
        }
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_string(), ToString::to_string)
}

/// A unix time as ISO 8601 + relative, or `-`.
fn time(ts: Option<u64>, now: u64) -> String {
    ts.map_or_else(|| "-".to_string(), |t| when::at(t, now))
}

fn print_lease(v: &LeaseView) {
    let now = now_secs();
    println!("lease:          {}", v.lease_hash);
    println!("state:          {}", v.state);
    println!("consumer:       {}", v.consumer);
    println!("provider:       {}", v.provider);
    println!("access key:     {}", v.access_pub_key);
    println!(
        "resources:      {} vCPU, {} MiB memory, {} GiB disk, for {} ({} s)",
        v.vcpus,
        v.memory_mb,
        v.disk_gb,
        when::span(v.duration),
        v.duration
    );
    println!("created at:     {}", time(Some(v.created_at), now));
    println!("accepted at:    {}", time(v.accepted_at, now));
    println!("expires at:     {}", time(v.expires_at, now));
    println!("vm host key:    {}", opt(&v.vm_host_key));
    if v.settled_at.is_some() {
        println!(
            "settled at:     {} by {}",
            time(v.settled_at, now),
            opt(&v.settled_by)
        );
    }
    if v.cancelled_at.is_some() {
        println!("cancelled at:   {}", time(v.cancelled_at, now));
    }
}

fn print_lease_table(leases: &[LeaseView]) {
    let now = now_secs();
    println!(
        "{:<64}  {:<9}  {:<8}  {:>4}  {:>7}  {:>5}  EXPIRES",
        "LEASE", "STATE", "PROVIDER", "VCPU", "MEM_MB", "DISK"
    );
    for v in leases {
        println!(
            "{:<64}  {:<9}  {:<8}  {:>4}  {:>7}  {:>5}  {}",
            v.lease_hash,
            v.state,
            v.provider.short(),
            v.vcpus,
            v.memory_mb,
            v.disk_gb,
            time(v.expires_at, now)
        );
    }
}

pub async fn run_providers(args: ProvidersArgs) -> anyhow::Result<ExitCode> {
    let ps = args.node.client()?.providers().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&ps)?);
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_secs();
    println!(
        "{:<64}  {:<52}  {:<9}  {:>10}  ADDRS",
        "ADDRESS", "PEER_ID", "CONNECTED", "ENTRY_ENDS"
    );
    for p in ps {
        println!(
            "{:<64}  {:<52}  {:<9}  {:>10}  {}",
            p.address,
            p.peer_id,
            if p.connected { "yes" } else { "no" },
            when::relative(p.expires_at, now),
            p.addrs.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Sign a settle or cancel with the wallet and submit it to the node.
/// How a lease is ended from the CLI.
#[derive(Clone, Copy)]
enum End {
    Settle,
    Cancel,
}

/// Settle or cancel, after checking with the node that the lease exists
/// and is in a state the event can end: an event for an unknown lease
/// would only wait, pending, for a lease that may never come, and the
/// command would have reported success.
async fn end_lease(
    lease: &str,
    node: &NodeUrlArg,
    wallet: &WalletArg,
    end: End,
) -> anyhow::Result<ExitCode> {
    let lease = lease_arg(lease)?;
    let w = load_wallet(wallet)?;
    let client = node.client()?;
    let verb = match end {
        End::Settle => "settle",
        End::Cancel => "cancel",
    };
    let view = match client.lease_by_prefix(&lease).await {
        Ok(v) => v,
        Err(xe_api::client::ClientError::Status { status, .. }) if status.as_u16() == 404 => {
            anyhow::bail!(
                "lease {} is not known to the node at {}: nothing was sent. Check the hash (`xe lease list`), or wait until the node has the lease if it was created elsewhere moments ago",
                &lease[..8],
                client.url()
            );
        }
        Err(e) => return Err(e).context(format!("looking up lease {}", &lease[..8])),
    };
    let hash = view.lease_hash;
    let refusal = match (end, view.state) {
        (_, st) if st.is_final() => Some(format!("it is already {st}; nothing to {verb}")),
        (End::Settle, LeaseState::Created) => {
            Some("it is not accepted yet: withdraw it with `xe lease cancel` instead".to_string())
        }
        (End::Cancel, LeaseState::Accepted) => {
            Some("it is already accepted: end it with `xe lease settle` instead".to_string())
        }
        _ => None,
    };
    if let Some(why) = refusal {
        anyhow::bail!("cannot {verb} lease {}: {why}", hash.short());
    }
    let r = client
        .submit(&match end {
            End::Settle => LeaseEvent::settle(&w, hash, now_secs()),
            End::Cancel => LeaseEvent::cancel(&w, hash, now_secs()),
        })
        .await
        .context(format!("{verb} lease {}", hash.short()))?;
    report_submit(&r);
    Ok(ExitCode::SUCCESS)
}
