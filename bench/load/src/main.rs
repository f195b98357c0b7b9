//! `xe-load`: how many concurrent SSH sessions one xe gateway holds, what
//! each costs it in memory, and how it shares bandwidth between many busy
//! ones. Loopback only; bounded in count and time; stops only what it
//! started.
//!
//! ```text
//! xe-load (this process)                   xe node (gateway, own process: its RSS is measured)
//!   N russh clients ──SSH direct-tcpip──►  gateway ──/xe/tunnel/2.0.0──► P `xe-load provider`
//!                                                                         processes, VM backend = TCP echo
//! ```
//!
//! Phases: (1) for each size in `--tunnels`, open that many tunnels and
//! ping each (16 bytes naming the tunnel, echoed back), read the gateway's
//! RSS/PSS, ping all again, close; (2) `--transfers` sessions each send
//! `--transfer-mib` through the echo and check every byte back.
//!
//! The echo backend exists because one OpenSSH `sshd` per tunnel cannot
//! be held 10,000 times on two cores; the gateway does not know the
//! difference (it carries bytes, the end-to-end SSH is the client's).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use xe_store::{Lease, LeaseEvent, LeaseKey, LeaseState, Wallet, lease_key_path, now_secs};

mod child;
mod echo;
mod gateway;
mod provider;
mod tunnels;

use gateway::{GatewayProc, Memory};
use provider::ProviderProc;
use tunnels::{Errors, Login};

/// Tunnels one provider carries over its one connection to the gateway
/// (a connection carries 16,384 streams, but this sandbox caps open files
/// at 20,000 per process and a provider holds two sockets per tunnel).
const TUNNELS_PER_PROVIDER: usize = 8000;

#[derive(Parser, Debug)]
#[command(
    about = "Hold thousands of SSH tunnels through one xe gateway and measure it",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: Args,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// (internal) One provider node with the echo backend, until stdin closes.
    #[command(hide = true)]
    Provider(provider::ProviderArgs),
}

#[derive(clap::Args, Debug)]
struct Args {
    /// The xe binary that runs the gateway.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/release/xe"))]
    xe: PathBuf,
    /// Idle-tunnel rounds: how many tunnels to hold at once, in turn.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    tunnels: Vec<usize>,
    /// SSH handshakes in flight at once while opening.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Concurrent active transfers (0 = skip).
    #[arg(long, default_value_t = 100)]
    transfers: usize,
    /// MiB each active transfer sends (and reads back).
    #[arg(long, default_value_t = 32)]
    transfer_mib: u64,
    /// Provider nodes [default: one per 8000 tunnels].
    #[arg(long)]
    providers: Option<usize>,
    /// Give up on the whole run after this many seconds.
    #[arg(long, default_value_t = 1200)]
    budget: u64,
    /// Keep the working directory.
    #[arg(long)]
    keep: bool,
    /// Print one JSON object instead of the Markdown tables.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(Cmd::Provider(p)) = cli.cmd {
        return provider::serve(p).await;
    }
    let args = cli.run;
    let budget = Duration::from_secs(args.budget);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Leaving `run` early drops the child processes, which kills them.
    tokio::select! {
        r = tokio::time::timeout(budget, run(args)) => match r {
            Ok(r) => r,
            Err(_) => bail!("the run exceeded its --budget of {} s", budget.as_secs()),
        },
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        _ = term.recv() => bail!("terminated"),
    }
}

impl Args {
    /// The most tunnels open at once in any phase.
    fn most(&self) -> usize {
        self.tunnels
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .max(self.transfers)
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let most = args.most();
    if most == 0 {
        bail!("nothing to do: --tunnels and --transfers are all 0");
    }
    // One socket per tunnel here and in the gateway (which inherits the
    // raised limit).
    raise_fd_limit(most as u64 + 1024)?;
    let tmp = tempfile::Builder::new().prefix("xe-load-").tempdir()?;
    let dir = tmp.path().to_path_buf();
    eprintln!("workdir {}", dir.display());

    let gw = GatewayProc::start(&args.xe, &dir.join("gateway"), most + 256).await?;
    eprintln!(
        "gateway pid {} ssh {} api {}",
        gw.pid, gw.ssh_addr, gw.api_addr
    );
    let result = drive(&args, &dir, &gw).await;
    gw.stop().await;
    if args.keep {
        eprintln!("kept {}", tmp.keep().display());
    }
    result
}

/// Raise this process's open-file limit to `want`, or say why it cannot be.
pub(crate) fn raise_fd_limit(want: u64) -> anyhow::Result<()> {
    let got = rlimit::increase_nofile_limit(want).context("raising the open-file limit")?;
    if got < want {
        bail!(
            "open-file limit is {got}, {want} needed: raise the hard limit (ulimit -Hn) or lower --tunnels"
        );
    }
    Ok(())
}

async fn drive(args: &Args, dir: &std::path::Path, gw: &GatewayProc) -> anyhow::Result<()> {
    let most = args.most();
    let n_prov = args
        .providers
        .unwrap_or_else(|| most.div_ceil(TUNNELS_PER_PROVIDER))
        .max(1);
    let api = xe_api::client::ApiClient::new(gw.api_addr.to_string().parse()?);

    // A consumer wallet and lease key, one lease per provider.
    let wallet_path = dir.join("consumer.seed");
    let wallet = Wallet::load_or_create(&wallet_path)?;
    let lease_key = LeaseKey::load_or_create(&lease_key_path(&wallet_path))?;
    let key = Arc::new(
        russh::keys::load_secret_key(lease_key.path(), None).context("loading the lease key")?,
    );

    eprintln!("starting {n_prov} provider process(es) with the echo backend");
    let per_provider = most.div_ceil(n_prov) + 64;
    let mut providers = Vec::new();
    let mut logins = Vec::new();
    for i in 0..n_prov {
        let p = ProviderProc::start(
            &dir.join(format!("provider{i}")),
            &gw.p2p_addrs,
            per_provider,
        )
        .await?;
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&(i as u64).to_be_bytes());
        nonce[8..].copy_from_slice(&u64::from(std::process::id()).to_be_bytes());
        let create = LeaseEvent::create(
            &wallet,
            Lease {
                consumer: wallet.public_key(),
                provider: p.account,
                vcpus: 1,
                memory_mb: 512,
                disk_gb: 1,
                duration: 24 * 3600,
                access_pub_key: lease_key.access_pub_key(),
                created_at: now_secs(),
                nonce,
            },
        );
        let lease = create.lease_hash();
        api.submit(&create)
            .await
            .context("submitting a lease to the gateway")?;
        logins.push(Login {
            lease,
            key: key.clone(),
        });
        providers.push(p);
    }
    for (login, p) in logins.iter().zip(&providers) {
        wait_ready(&api, &login.lease, &p.account).await?;
    }
    eprintln!(
        "{} lease(s) accepted and visible at the gateway",
        logins.len()
    );

    let base = gw.memory()?;
    let mut report = Report::default();
    let mut next_id = 0u64;
    for &n in &args.tunnels {
        if n == 0 {
            continue;
        }
        eprintln!("opening {n} tunnels ({} at a time)", args.concurrency);
        let before = gw.memory()?;
        let t0 = Instant::now();
        let (mut held, open_errors) =
            tunnels::open_many(gw.ssh_addr, &logins, n, args.concurrency, next_id).await;
        next_id += n as u64;
        let open_secs = t0.elapsed().as_secs_f64();
        let holding = gw.memory()?;
        eprintln!("pinging all {} again", held.len());
        let ping_errors = tunnels::ping_all(&mut held, 1, args.concurrency.max(256)).await;
        let after_ping = gw.memory()?;
        let opened = held.len();
        tunnels::close_all(held, 256).await;
        wait_gateway_idle(&api).await;
        let closed = gw.memory()?;
        report.idle.push(IdleRow {
            n,
            opened,
            open_secs,
            before,
            holding,
            after_ping,
            closed,
            open_errors,
            ping_errors,
        });
    }

    if args.transfers > 0 {
        let bytes = args.transfer_mib << 20;
        eprintln!(
            "{} concurrent transfers of {} MiB each, echoed and checked",
            args.transfers, args.transfer_mib
        );
        let (ts, open_errors) = tunnels::open_many(
            gw.ssh_addr,
            &logins,
            args.transfers,
            args.concurrency,
            next_id,
        )
        .await;
        let t0 = Instant::now();
        let results =
            futures::future::join_all(ts.into_iter().map(|t| tunnels::transfer(t, bytes))).await;
        let wall = t0.elapsed().as_secs_f64();
        let mut errors = open_errors;
        let mut rates = Vec::new();
        for r in results {
            match r {
                Ok(t) => rates.push(t.bytes as f64 / t.secs),
                Err(e) => errors.add(e),
            }
        }
        rates.sort_by(f64::total_cmp);
        report.active = Some(ActiveRow {
            sessions: args.transfers,
            bytes,
            ok: rates.len(),
            wall,
            rates,
            errors,
        });
        wait_gateway_idle(&api).await;
    }
    if args.json {
        println!("{}", report.json(base, n_prov));
    } else {
        report.print(base, n_prov);
    }
    for p in providers {
        p.stop().await;
    }
    Ok(())
}

/// Until the gateway knows the lease as accepted and knows where its
/// provider is (the directory entry it dials by).
async fn wait_ready(
    api: &xe_api::client::ApiClient,
    lease: &xe_store::LeaseHash,
    provider: &xe_store::AccountAddress,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let view = api
            .lease_wait(lease, LeaseState::Created, Duration::from_secs(5))
            .await;
        let known = api
            .providers()
            .await
            .map(|ps| ps.iter().any(|p| &p.address == provider))
            .unwrap_or(false);
        if matches!(&view, Ok(v) if v.state == LeaseState::Accepted) && known {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "lease {lease} was not accepted and visible at the gateway within 90 s: {view:?}"
            );
        }
        // lease_wait answers at once once accepted; this paces the
        // directory poll only.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Until the gateway reports no open SSH connections (bounded: 60 s), so
/// the next phase's memory reading starts from a quiet gateway.
async fn wait_gateway_idle(api: &xe_api::client::ApiClient) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let active = api.metrics().await.ok().and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("xe_ssh_connections_active "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        if active == Some(0.0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("warning: the gateway still reports open connections after 60 s");
}

#[derive(Default)]
struct Report {
    idle: Vec<IdleRow>,
    active: Option<ActiveRow>,
}

struct IdleRow {
    n: usize,
    opened: usize,
    open_secs: f64,
    before: Memory,
    holding: Memory,
    after_ping: Memory,
    closed: Memory,
    open_errors: Errors,
    ping_errors: Errors,
}

struct ActiveRow {
    sessions: usize,
    bytes: u64,
    ok: usize,
    wall: f64,
    rates: Vec<f64>,
    errors: Errors,
}

impl Report {
    fn json(&self, base: Memory, providers: usize) -> serde_json::Value {
        let errors = |e: &Errors| serde_json::json!(e.0);
        serde_json::json!({
            "providers": providers,
            "gateway_rest_rss_kib": base.rss_kib,
            "idle": self.idle.iter().map(|r| serde_json::json!({
                "tunnels": r.n,
                "opened": r.opened,
                "open_secs": r.open_secs,
                "rss_before_kib": r.before.rss_kib,
                "rss_holding_kib": r.holding.rss_kib.max(r.after_ping.rss_kib),
                "pss_holding_kib": r.holding.pss_kib.max(r.after_ping.pss_kib),
                "rss_after_close_kib": r.closed.rss_kib,
                "open_errors": errors(&r.open_errors),
                "ping_errors": errors(&r.ping_errors),
            })).collect::<Vec<_>>(),
            "active": self.active.as_ref().map(|a| serde_json::json!({
                "sessions": a.sessions,
                "bytes_each": a.bytes,
                "ok": a.ok,
                "wall_secs": a.wall,
                "rates": a.rates,
                "errors": errors(&a.errors),
            })),
        })
    }

    fn print(&self, base: Memory, providers: usize) {
        println!(
            "gateway at rest: RSS {} KiB, PSS {} KiB; {providers} provider node(s), echo backend",
            base.rss_kib, base.pss_kib
        );
        println!();
        println!(
            "| tunnels | opened | errors | open time | tunnels/s | gateway RSS held | RSS per tunnel | PSS per tunnel | RSS after close |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for r in &self.idle {
            let per = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / r.opened.max(1) as f64;
            let held = r.holding.rss_kib.max(r.after_ping.rss_kib);
            println!(
                "| {} | {} | {} | {:.1} s | {:.0} | {:.1} MiB | {:.1} KiB | {:.1} KiB | {:.1} MiB |",
                r.n,
                r.opened,
                r.open_errors.total() + r.ping_errors.total(),
                r.open_secs,
                r.opened as f64 / r.open_secs,
                held as f64 / 1024.0,
                per(held, r.before.rss_kib),
                per(
                    r.holding.pss_kib.max(r.after_ping.pss_kib),
                    r.before.pss_kib
                ),
                r.closed.rss_kib as f64 / 1024.0,
            );
        }
        for r in &self.idle {
            for (e, k) in r.open_errors.0.iter().chain(&r.ping_errors.0) {
                println!("- {} tunnels: {k} × {e}", r.n);
            }
        }
        if let Some(a) = &self.active {
            println!();
            let mb = |x: f64| x / 1e6;
            let agg = (a.ok as u64 * a.bytes) as f64 / a.wall;
            let med = a.rates.get(a.rates.len() / 2).copied().unwrap_or(f64::NAN);
            println!(
                "| active sessions | checked ok | MiB each way each | wall | aggregate MB/s each way | slowest MB/s | median MB/s | fastest MB/s | errors |"
            );
            println!("|---|---|---|---|---|---|---|---|---|");
            println!(
                "| {} | {} | {} | {:.1} s | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
                a.sessions,
                a.ok,
                a.bytes >> 20,
                a.wall,
                mb(agg),
                mb(a.rates.first().copied().unwrap_or(f64::NAN)),
                mb(med),
                mb(a.rates.last().copied().unwrap_or(f64::NAN)),
                a.errors.total(),
            );
            for (e, k) in &a.errors.0 {
                println!("- transfers: {k} × {e}");
            }
        }
    }
}
