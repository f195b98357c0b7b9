//! The client side: many SSH connections to the gateway in one process, one
//! `direct-tcpip` channel each, and the byte checks that prove nothing was
//! lost, reordered or crossed between tunnels.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use xe_store::LeaseHash;

/// Bound on opening one tunnel (TCP, SSH handshake, auth, channel).
const OPEN_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on one ping round trip.
const PING_TIMEOUT: Duration = Duration::from_secs(60);

/// Who the load tool logs in as: one lease and its access key.
#[derive(Clone)]
pub struct Login {
    pub lease: LeaseHash,
    pub key: Arc<PrivateKey>,
}

struct Client;

impl client::Handler for Client {
    type Error = russh::Error;

    // The gateway is the one this tool started; its key is not the subject.
    async fn check_server_key(
        &mut self,
        _key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

pub struct Tunnel {
    pub id: u64,
    handle: client::Handle<Client>,
    stream: russh::ChannelStream<client::Msg>,
}

fn client_config() -> Arc<client::Config> {
    Arc::new(client::Config {
        nodelay: true,
        // The load tool never goes idle long enough for keepalives to matter.
        keepalive_interval: None,
        ..Default::default()
    })
}

async fn open_one(
    cfg: Arc<client::Config>,
    gateway: SocketAddr,
    login: &Login,
    id: u64,
) -> Result<Tunnel, String> {
    let tcp = TcpStream::connect(gateway)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut handle = client::connect_stream(cfg, tcp, Client)
        .await
        .map_err(|e| format!("ssh handshake: {e}"))?;
    let auth = handle
        .authenticate_publickey(
            login.lease.to_string(),
            PrivateKeyWithHashAlg::new(login.key.clone(), None),
        )
        .await
        .map_err(|e| format!("auth: {e}"))?;
    if !auth.success() {
        return Err("auth: refused".into());
    }
    let ch = handle
        .channel_open_direct_tcpip("vm", 22, "127.0.0.1", 0)
        .await
        .map_err(|e| format!("direct-tcpip: {e}"))?;
    let mut t = Tunnel {
        id,
        handle,
        stream: ch.into_stream(),
    };
    t.ping(0).await?;
    Ok(t)
}

impl Tunnel {
    /// Send 16 bytes naming this tunnel and round, expect them back: the
    /// tunnel is alive and connected to its own echo, no one else's.
    pub async fn ping(&mut self, round: u64) -> Result<(), String> {
        let mut msg = [0u8; 16];
        msg[..8].copy_from_slice(&self.id.to_be_bytes());
        msg[8..].copy_from_slice(&round.to_be_bytes());
        let rt = async {
            self.stream.write_all(&msg).await?;
            self.stream.flush().await?;
            let mut back = [0u8; 16];
            self.stream.read_exact(&mut back).await?;
            std::io::Result::Ok(back)
        };
        match tokio::time::timeout(PING_TIMEOUT, rt).await {
            Err(_) => Err("ping: no echo within 60 s".into()),
            Ok(Err(e)) => Err(format!("ping: {e}")),
            Ok(Ok(back)) if back != msg => {
                Err("ping: echo came back wrong (crossed tunnels?)".into())
            }
            Ok(Ok(_)) => Ok(()),
        }
    }

    pub async fn close(self) {
        drop(self.stream);
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "")
            .await;
    }
}

/// Errors, counted by message.
#[derive(Default, Debug)]
pub struct Errors(pub BTreeMap<String, usize>);

impl Errors {
    pub fn add(&mut self, e: String) {
        *self.0.entry(e).or_default() += 1;
    }
    pub fn total(&self) -> usize {
        self.0.values().sum()
    }
}

/// Progress on stderr every 2 s while `done` grows towards `total`.
fn progress(
    what: &'static str,
    done: Arc<AtomicUsize>,
    total: usize,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let t0 = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.tick().await;
        loop {
            tick.tick().await;
            let n = done.load(Ordering::Relaxed);
            eprintln!(
                "  {what}: {n}/{total} ({:.0} s)",
                t0.elapsed().as_secs_f64()
            );
        }
    })
}

/// Open `n` tunnels, `concurrency` handshakes at a time, round-robin over
/// `logins`. Returns those that opened and the errors of those that did not.
pub async fn open_many(
    gateway: SocketAddr,
    logins: &[Login],
    n: usize,
    concurrency: usize,
    first_id: u64,
) -> (Vec<Tunnel>, Errors) {
    let cfg = client_config();
    let done = Arc::new(AtomicUsize::new(0));
    let ticker = progress("opened", done.clone(), n);
    let results: Vec<Result<Tunnel, String>> = futures::stream::iter(0..n)
        .map(|i| {
            let cfg = cfg.clone();
            let login = logins[i % logins.len()].clone();
            let done = done.clone();
            async move {
                let id = first_id + i as u64;
                let r = tokio::time::timeout(OPEN_TIMEOUT, open_one(cfg, gateway, &login, id))
                    .await
                    .unwrap_or_else(|_| Err("open: timed out after 120 s".into()));
                done.fetch_add(1, Ordering::Relaxed);
                r
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    ticker.abort();
    let mut errors = Errors::default();
    let mut tunnels = Vec::with_capacity(n);
    for r in results {
        match r {
            Ok(t) => tunnels.push(t),
            Err(e) => errors.add(e),
        }
    }
    (tunnels, errors)
}

/// One more ping on every tunnel, `concurrency` at a time.
pub async fn ping_all(tunnels: &mut [Tunnel], round: u64, concurrency: usize) -> Errors {
    let results: Vec<Result<(), String>> = futures::stream::iter(tunnels.iter_mut())
        .map(|t| t.ping(round))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut errors = Errors::default();
    for e in results.into_iter().filter_map(Result::err) {
        errors.add(e);
    }
    errors
}

pub async fn close_all(tunnels: Vec<Tunnel>, concurrency: usize) {
    futures::stream::iter(tunnels)
        .map(Tunnel::close)
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
}

/// The bytes a session sends: a per-session random block, repeated, with
/// the session id and the block number stamped at the front of each
/// block, so a lost, duplicated, reordered or foreign chunk cannot match.
struct Pattern {
    base: Vec<u8>,
    id: u64,
}

const BLOCK: usize = 32 * 1024;

impl Pattern {
    fn new(id: u64) -> Self {
        use rand::{RngCore, SeedableRng};
        let mut base = vec![0u8; BLOCK];
        rand::rngs::StdRng::seed_from_u64(id).fill_bytes(&mut base);
        Pattern { base, id }
    }

    /// Bytes `[pos, pos + out.len())` of the stream.
    fn fill(&self, mut pos: u64, out: &mut [u8]) {
        let mut off = 0;
        while off < out.len() {
            let block = pos / BLOCK as u64;
            let in_block = (pos % BLOCK as u64) as usize;
            let take = (BLOCK - in_block).min(out.len() - off);
            let mut header = [0u8; 16];
            header[..8].copy_from_slice(&self.id.to_be_bytes());
            header[8..].copy_from_slice(&block.to_be_bytes());
            for (k, b) in out[off..off + take].iter_mut().enumerate() {
                let i = in_block + k;
                *b = if i < 16 { header[i] } else { self.base[i] };
            }
            off += take;
            pos += take as u64;
        }
    }
}

/// What one active transfer measured.
pub struct Transfer {
    pub bytes: u64,
    pub secs: f64,
}

/// Most bytes a session has sent but not yet had back, like the window of
/// an SSH channel (OpenSSH's is 2 MiB). Through xe the far end is always
/// an sshd, whose peer never has more than a window in flight; an echo fed
/// without such a bound would model a peer no SSH client is. (The gateway
/// relies on this: russh grants window as packets arrive, so a far end that
/// stopped reading while its own writes were blocked could wedge the
/// connection; see BENCHMARKS.md.)
pub const WINDOW: u64 = 2 << 20;

/// Send `bytes` through the tunnel and read them back from the echo,
/// checking every byte; half-close at the end and expect EOF after exactly
/// `bytes`.
pub async fn transfer(t: Tunnel, bytes: u64) -> Result<Transfer, String> {
    let id = t.id;
    let pattern = Arc::new(Pattern::new(id));
    let (mut rd, mut wr) = tokio::io::split(t.stream);
    let (echoed_tx, mut echoed) = tokio::sync::watch::channel(0u64);
    let t0 = Instant::now();
    let p = pattern.clone();
    let writer = async move {
        let mut buf = vec![0u8; BLOCK];
        let mut pos = 0u64;
        while pos < bytes {
            while pos - *echoed.borrow_and_update() >= WINDOW {
                if echoed.changed().await.is_err() {
                    return Err("receiver ended early".to_string());
                }
            }
            let n = (bytes - pos).min(BLOCK as u64) as usize;
            p.fill(pos, &mut buf[..n]);
            wr.write_all(&buf[..n])
                .await
                .map_err(|e| format!("send: {e}"))?;
            pos += n as u64;
        }
        wr.shutdown().await.map_err(|e| format!("send EOF: {e}"))?;
        Ok::<_, String>(wr)
    };
    let reader = async move {
        let mut buf = vec![0u8; BLOCK];
        let mut want = vec![0u8; BLOCK];
        let mut pos = 0u64;
        loop {
            let n = rd
                .read(&mut buf)
                .await
                .map_err(|e| format!("receive: {e}"))?;
            if n == 0 {
                break;
            }
            if pos + n as u64 > bytes {
                return Err(format!("echo returned more than the {bytes} bytes sent"));
            }
            pattern.fill(pos, &mut want[..n]);
            if buf[..n] != want[..n] {
                let at = buf[..n]
                    .iter()
                    .zip(&want[..n])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(format!(
                    "byte {} differs from what was sent",
                    pos + at as u64
                ));
            }
            pos += n as u64;
            echoed_tx.send_replace(pos);
        }
        if pos != bytes {
            return Err(format!("EOF after {pos} of {bytes} bytes"));
        }
        Ok(())
    };
    let (w, r) = tokio::join!(writer, reader);
    let secs = t0.elapsed().as_secs_f64();
    w?;
    r?;
    let _ = t
        .handle
        .disconnect(russh::Disconnect::ByApplication, "", "")
        .await;
    Ok(Transfer { bytes, secs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_position_dependent_and_split_invariant() {
        let p = Pattern::new(7);
        let mut whole = vec![0u8; 3 * BLOCK + 100];
        p.fill(0, &mut whole);
        let mut parts = vec![0u8; whole.len()];
        let (a, b) = parts.split_at_mut(BLOCK + 5);
        p.fill(0, a);
        p.fill((BLOCK + 5) as u64, b);
        assert_eq!(whole, parts);
        // Two blocks differ (block number stamped) and so do two sessions.
        assert_ne!(whole[..BLOCK], whole[BLOCK..2 * BLOCK]);
        let mut other = vec![0u8; BLOCK];
        Pattern::new(8).fill(0, &mut other);
        assert_ne!(whole[..BLOCK], other[..]);
    }
}
