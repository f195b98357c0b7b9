//! Benchmark: the ledger at scale. For each size N (leases; each created
//! and accepted, every other one settled: ≈ 2.5 events per lease):
//!
//! 1. write the ledger into node A's sled store in pages (events/s, disk);
//! 2. a fresh node B joins A over real libp2p on loopback (time, bytes,
//!    CPU of the whole process: both nodes run in it);
//! 3. one reconciliation session between the now-equal nodes;
//! 4. B goes offline, A gets 1,000 new events, B comes back and catches up.
//!
//! Run: `cargo bench -p xe-net --bench ledger -- 1000,10000,100000`
//! (release build). Bounded: every wait has a deadline (`JOIN_DEADLINE`).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;
use xe_net::replication::RECON_PROTOCOL;
use xe_net::replication::session::{self, ReconStats};
use xe_net::{Multiaddr, NetConfig, NetHandle, NetRoles};
use xe_store::{AccessPubKey, Lease, LeaseEvent, Store, Wallet, now_secs};

const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOZkcJ0O9Yl3MY5Wa7sObHRBuqoN2Ig0tGuo6dU2dQmD vm";
const JOIN_DEADLINE: Duration = Duration::from_secs(900);
const NEW_LEASES: u32 = 400;

/// `n` leases from nonce `first`, created over 3,000 s from `t0`.
fn ledger(first: u32, n: u32, t0: u64) -> Vec<LeaseEvent> {
    let consumer = Wallet::from_seed([1; 32]);
    let provider = Wallet::from_seed([2; 32]);
    let access = AccessPubKey(Wallet::from_seed([3; 32]).public_key().0);
    let mut out = Vec::with_capacity(n as usize * 5 / 2);
    for i in 0..n {
        let mut nonce = [0u8; 16];
        nonce[..4].copy_from_slice(&(first + i).to_be_bytes());
        let created_at = t0 + u64::from(i) * 3000 / u64::from(n.max(1));
        let lease = Lease {
            consumer: consumer.public_key(),
            provider: provider.address(),
            vcpus: 1,
            memory_mb: 512,
            disk_gb: 1,
            duration: 86_400,
            access_pub_key: access,
            created_at,
            nonce,
        };
        let create = LeaseEvent::create(&consumer, lease);
        let h = create.lease_hash();
        out.push(create);
        out.push(LeaseEvent::accept(
            &provider,
            h,
            created_at + 1,
            HOST_KEY.into(),
        ));
        if i % 2 == 0 {
            out.push(LeaseEvent::settle(&consumer, h, created_at + 2));
        }
    }
    out
}

/// User + system CPU seconds of this process so far.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat(5), counted from after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

fn rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn du(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            total += if md.is_dir() { du(&e.path()) } else { md.len() };
        }
    }
    total
}

struct Host {
    net: NetHandle,
    cancel: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

async fn host(store: &Store, key: libp2p::identity::Keypair, boot: Vec<Multiaddr>) -> Host {
    let mut cfg = NetConfig::default();
    let roles = NetRoles::new(key);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
    cfg.bootstrap = boot;
    // Only the sessions this bench starts or that connecting starts.
    cfg.resync_interval = Duration::from_secs(3600);
    let cancel = CancellationToken::new();
    let net = xe_net::start(roles, cfg, store.clone(), cancel.clone())
        .await
        .expect("start");
    Host {
        net: net.handle,
        cancel,
        tasks: net.tasks,
    }
}

impl Host {
    async fn stop(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn wait_count(store: &Store, n: usize) -> bool {
    let deadline = Instant::now() + JOIN_DEADLINE;
    while store.event_count() < n {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

fn recon_bytes(s: &ReconStats) -> u64 {
    s.bytes_sent.load(Ordering::Relaxed) + s.bytes_received.load(Ordering::Relaxed)
}

fn mb(b: u64) -> String {
    if b < 10_000 {
        format!("{b} B")
    } else {
        format!("{:.2} MB", b as f64 / 1e6)
    }
}

async fn run(n: u32) {
    let t = Instant::now();
    // History ends ten minutes ago; what B misses while away is newer.
    let events = ledger(0, n, now_secs() - 4200);
    let total = events.len();
    let gen_s = t.elapsed().as_secs_f64();

    let dir_a = tempfile::tempdir().expect("tmp");
    let a_store = Store::open(dir_a.path()).expect("a");
    let t = Instant::now();
    for page in events.chunks(1024) {
        for r in a_store.apply_events(page).expect("apply") {
            r.expect("valid event");
        }
    }
    let write_s = t.elapsed().as_secs_f64();
    a_store.flush().expect("flush");
    let disk_a = du(dir_a.path());

    let a = host(
        &a_store,
        libp2p::identity::Keypair::generate_ed25519(),
        vec![],
    )
    .await;
    let a_addrs = a.net.p2p_addrs().await.expect("addrs");
    let dir_b = tempfile::tempdir().expect("tmp");
    let b_store = Store::open(dir_b.path()).expect("b");
    let b_key = libp2p::identity::Keypair::generate_ed25519();
    // The end with the smaller peer id starts the session on connect: it
    // decides whether B pulls the ledger or A pushes it.
    let direction = if b_key.public().to_peer_id() < a.net.peer_id() {
        "B pulls"
    } else {
        "A pushes"
    };

    // Join.
    let (cpu0, t) = (cpu_secs(), Instant::now());
    let b = host(&b_store, b_key.clone(), a_addrs.clone()).await;
    let joined = wait_count(&b_store, total).await;
    let join_s = t.elapsed().as_secs_f64();
    let join_cpu = cpu_secs() - cpu0;
    let join_bytes = recon_bytes(&b.net.stats().recon);

    // One session between equal nodes.
    let (cpu0, t) = (cpu_secs(), Instant::now());
    let mut control = b.net.control();
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        control.open_stream(a.net.peer_id(), RECON_PROTOCOL),
    )
    .await
    .expect("open in time")
    .expect("stream");
    let eq = session::initiate(&mut stream.compat(), &b_store, &ReconStats::default())
        .await
        .expect("equal session");
    let eq_ms = t.elapsed().as_secs_f64() * 1000.0;
    let eq_cpu_ms = (cpu_secs() - cpu0) * 1000.0;

    // Offline catch-up.
    b.stop().await;
    let new = ledger(10_000_000, NEW_LEASES, now_secs() - 600);
    a_store.apply_events(&new).expect("new");
    let (cpu0, t) = (cpu_secs(), Instant::now());
    let b = host(&b_store, b_key, a_addrs).await;
    let caught = wait_count(&b_store, total + new.len()).await;
    let catch_s = t.elapsed().as_secs_f64();
    let catch_cpu = cpu_secs() - cpu0;
    let catch_bytes = recon_bytes(&b.net.stats().recon);
    // What the new events themselves take on the wire (length + stored form).
    let new_wire: usize = new
        .iter()
        .map(|e| 2 + xe_store::codec::encode_event(e).len())
        .sum();
    b_store.flush().expect("flush");
    let disk_b = du(dir_b.path());
    let rss = rss_mib();
    b.stop().await;
    a.stop().await;
    // Listing: one page from the index, then (for comparison) every record.
    let (r0, t) = (rss_mib(), Instant::now());
    let (page, _) = a_store
        .leases_newest_first(None, 1000, |_| true)
        .expect("page");
    let page_ms = t.elapsed().as_secs_f64() * 1000.0;
    let r1 = rss_mib();
    let t = Instant::now();
    let all = a_store.leases().expect("all");
    let all_ms = t.elapsed().as_secs_f64() * 1000.0;
    let r2 = rss_mib();
    eprintln!(
        "listing {n} leases: first page of {} in {page_ms:.1} ms, RSS +{:.1} MiB; all {} in {all_ms:.0} ms, RSS +{:.1} MiB more",
        page.len(),
        r1 - r0,
        all.len(),
        r2 - r1
    );
    drop(all);

    println!(
        "| {n} | {total} | {gen_s:.1} s | {write_s:.1} s ({:.0}/s) | {} ({:.0} B/event) | {} | {join_s:.1} s, {}, {join_cpu:.1} s CPU, {direction}{} | {} B, {} round, {eq_ms:.1} ms, {eq_cpu_ms:.0} ms CPU | {} events: {catch_s:.2} s, {} (the events themselves: {}), {catch_cpu:.2} s CPU{} | {rss:.0} MiB |",
        total as f64 / write_s,
        mb(disk_a),
        disk_a as f64 / total as f64,
        mb(disk_b),
        mb(join_bytes),
        if joined { "" } else { " **NOT DONE**" },
        eq.bytes_sent + eq.bytes_received,
        eq.rounds,
        new.len(),
        mb(catch_bytes),
        mb(new_wire as u64),
        if caught { "" } else { " **NOT DONE**" },
    );
}

#[tokio::main]
async fn main() {
    let sizes: Vec<u32> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .flat_map(|a| {
            a.split(',')
                .filter_map(|s| s.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1000, 10_000]
    } else {
        sizes
    };
    println!(
        "| leases | events | sign | write A (one flush per 1,024) | A on disk | B on disk after join | fresh join: time, bytes, process CPU | equal nodes: one session | offline catch-up | process RSS at end |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        run(n).await;
    }
}
