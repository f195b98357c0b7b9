//! One reconciliation session over a stream (`/xe/recon/2.0.0` between
//! hosts; any byte stream in tests): the [`recon`](super::recon) rounds,
//! then the transfers they found, pulled and pushed in pages.
//!
//! Frames are `length u32 ‖ tag u8 ‖ payload`:
//!
//! | tag | frame | sent by | payload |
//! |---|---|---|---|
//! | 1 | `Recon` | both | a reconciliation message |
//! | 2 | `GetIds` | initiator | ids, 32 bytes each |
//! | 3 | `GetRange` | initiator | lower key (40 bytes), upper bound (0, or 1 ‖ 40 bytes) |
//! | 4 | `Put` | initiator | events |
//! | 5 | `Events` | responder | next key (0, or 1 ‖ 40 bytes) ‖ events |
//! | 6 | `Ack` | responder | events applied, u32 |
//! | 7 | `Done` | initiator | — |
//! | 8 | `Error` | either | UTF-8 text |
//!
//! Events are `count u32 ‖ { length u16 ‖ the stored form }*` (the binary
//! form of `xe_store::codec`, 140–220 bytes an event against 450–600 as
//! JSON); the receiver checks every one like any other.
//!
//! The initiator learns the differences, so it both pulls what it lacks
//! and pushes what the responder lacks; the responder answers each frame
//! on its own and verifies every event it is given like any other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use xe_store::syncset::{Bound, SyncKey};
use xe_store::{Applied, EventId, LeaseEvent, Source, Store, StoreError, Verified, codec};

use super::recon::{self, DecodeError, Findings, Message, Role};

/// Largest frame accepted.
pub const MAX_FRAME: usize = 2 * 1024 * 1024;
/// Most reconciliation rounds in one session.
pub const MAX_ROUNDS: usize = 64;
/// Most frames a responder answers in one session (bounds a hostile peer;
/// 100k leases take ~500 pages).
pub const MAX_FRAMES: usize = 50_000;
/// Most events in one `Events` or `Put` frame.
pub const PAGE_EVENTS: usize = 1024;
/// Most bytes of events in one frame (their stored form).
pub const PAGE_BYTES: usize = 1024 * 1024;
/// Longest wait for one frame.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// Counters across all sessions of a host (both roles).
#[derive(Debug, Default)]
pub struct ReconStats {
    /// Sessions finished without error.
    pub sessions: AtomicU64,
    /// Sessions that failed.
    pub failed: AtomicU64,
    /// Frame bytes written (length prefixes included).
    pub bytes_sent: AtomicU64,
    /// Frame bytes read.
    pub bytes_received: AtomicU64,
    /// Events received and applied (new or pending).
    pub applied: AtomicU64,
}

/// What one session did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Reconciliation rounds (message pairs).
    pub rounds: usize,
    /// Frame bytes written.
    pub bytes_sent: u64,
    /// Frame bytes read.
    pub bytes_received: u64,
    /// Events received.
    pub received: usize,
    /// Events received that were new here (applied or pending).
    pub applied: usize,
    /// Events sent.
    pub sent: usize,
}

/// Why a session failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The stream failed.
    #[error("reconciliation stream: {0}")]
    Io(#[from] std::io::Error),
    /// No frame within [`FRAME_TIMEOUT`].
    #[error("reconciliation peer sent nothing for {0:?}")]
    Timeout(Duration),
    /// A frame over [`MAX_FRAME`].
    #[error("reconciliation frame of {0} bytes is over the {MAX_FRAME} limit")]
    FrameTooLarge(usize),
    /// A reconciliation message did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A frame was malformed or out of place.
    #[error("reconciliation frame: {0}")]
    Frame(String),
    /// More rounds or frames than allowed.
    #[error("reconciliation did not finish within {0}")]
    TooLong(&'static str),
    /// The peer reported an error.
    #[error("reconciliation peer failed: {0}")]
    Peer(String),
    /// Our store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

enum Frame {
    Recon(Vec<u8>),
    GetIds(Vec<EventId>),
    GetRange(SyncKey, Bound),
    Put(Vec<LeaseEvent>),
    Events(Option<SyncKey>, Vec<LeaseEvent>),
    Ack(u32),
    Done,
    Error(String),
}

fn put_bound(b: &mut Vec<u8>, k: Option<&SyncKey>) {
    match k {
        None => b.push(0),
        Some(k) => {
            b.push(1);
            b.extend_from_slice(&k.to_bytes());
        }
    }
}

fn take_bound(p: &[u8]) -> Result<(Option<SyncKey>, &[u8]), SessionError> {
    let bad = || SessionError::Frame("bad key".into());
    match p.first() {
        Some(0) => Ok((None, &p[1..])),
        Some(1) if p.len() >= 41 => Ok((
            Some(SyncKey::from_bytes(&p[1..41]).ok_or_else(bad)?),
            &p[41..],
        )),
        _ => Err(bad()),
    }
}

fn put_events(b: &mut Vec<u8>, evs: &[LeaseEvent]) {
    let n = u32::try_from(evs.len()).unwrap_or(u32::MAX);
    b.extend_from_slice(&n.to_be_bytes());
    for ev in evs.iter().take(n as usize) {
        let e = codec::encode_event(ev);
        // check_self bounds an event far below 64 KiB.
        let len = u16::try_from(e.len()).unwrap_or(u16::MAX);
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&e[..usize::from(len)]);
    }
}

fn take_events(p: &[u8]) -> Result<Vec<LeaseEvent>, SessionError> {
    let bad = |why: String| SessionError::Frame(format!("events: {why}"));
    let n = p.get(..4).ok_or_else(|| bad("no count".into()))?;
    let n = u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize;
    // Each event takes at least 2 + 100 bytes: a count beyond what the
    // frame can hold is refused before anything is allocated for it.
    if n > p.len() / 102 + 1 {
        return Err(bad(format!("{n} events cannot fit in {} bytes", p.len())));
    }
    let mut rest = &p[4..];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let len = rest
            .get(..2)
            .ok_or_else(|| bad(format!("event {i}: truncated")))?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let body = rest
            .get(2..2 + len)
            .ok_or_else(|| bad(format!("event {i}: truncated")))?;
        // The wire carries the binary form only (the decoder also reads
        // the JSON of old stores, which has no place here).
        if !matches!(body.first(), Some(1..=5)) {
            return Err(bad(format!("event {i}: not a binary event")));
        }
        out.push(codec::decode_event(body).map_err(|e| bad(format!("event {i}: {e}")))?);
        rest = &rest[2 + len..];
    }
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes after the last event", rest.len())));
    }
    Ok(out)
}

impl Frame {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Frame::Recon(m) => {
                b.push(1);
                b.extend_from_slice(m);
            }
            Frame::GetIds(ids) => {
                b.push(2);
                for id in ids {
                    b.extend_from_slice(&id.0);
                }
            }
            Frame::GetRange(lo, hi) => {
                b.push(3);
                b.extend_from_slice(&lo.to_bytes());
                put_bound(
                    &mut b,
                    match hi {
                        Bound::Key(k) => Some(k),
                        Bound::End => None,
                    },
                );
            }
            Frame::Put(evs) => {
                b.push(4);
                put_events(&mut b, evs);
            }
            Frame::Events(next, evs) => {
                b.push(5);
                put_bound(&mut b, next.as_ref());
                put_events(&mut b, evs);
            }
            Frame::Ack(n) => {
                b.push(6);
                b.extend_from_slice(&n.to_be_bytes());
            }
            Frame::Done => b.push(7),
            Frame::Error(m) => {
                b.push(8);
                b.extend_from_slice(m.as_bytes());
            }
        }
        b
    }

    fn decode(b: &[u8]) -> Result<Frame, SessionError> {
        let (tag, p) = b
            .split_first()
            .ok_or_else(|| SessionError::Frame("empty frame".into()))?;
        Ok(match tag {
            1 => Frame::Recon(p.to_vec()),
            2 if p.len() % 32 == 0 => Frame::GetIds(
                p.chunks_exact(32)
                    .map(|c| EventId::from_slice(c).expect("32 bytes"))
                    .collect(),
            ),
            3 if p.len() >= 40 => {
                let lo = SyncKey::from_bytes(&p[..40])
                    .ok_or_else(|| SessionError::Frame("bad key".into()))?;
                let (hi, _) = take_bound(&p[40..])?;
                Frame::GetRange(lo, hi.map_or(Bound::End, Bound::Key))
            }
            4 => Frame::Put(take_events(p)?),
            5 => {
                let (next, rest) = take_bound(p)?;
                Frame::Events(next, take_events(rest)?)
            }
            6 if p.len() == 4 => Frame::Ack(u32::from_be_bytes([p[0], p[1], p[2], p[3]])),
            7 => Frame::Done,
            8 => Frame::Error(String::from_utf8_lossy(p).into_owned()),
            t => {
                return Err(SessionError::Frame(format!(
                    "unknown or malformed frame tag {t}"
                )));
            }
        })
    }
}

struct Conn<'a, S> {
    io: &'a mut S,
    report: Report,
    stats: &'a ReconStats,
    /// The peer, whose share of our pending store its events take.
    source: Source,
    /// Events refused as over a pending share, tried again at the end of
    /// the session (see [`MAX_RETRY`]).
    retry: Vec<LeaseEvent>,
}

/// Most events a session keeps to try again at its end. A session moves
/// events in key order `(ts, id)`: an accept signed in the same second as
/// its create (or on a clock behind it) can come pages before it, and a
/// big join can have more such events waiting at once than the peer's
/// pending share. They are not lost: once the session's other pages are
/// in, their creates are too. Bounded, so a hostile peer cannot make us
/// hold more than this (≈ 2 MB) in memory.
pub const MAX_RETRY: usize = 8 * PAGE_EVENTS;

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Conn<'a, S> {
    fn new(io: &'a mut S, stats: &'a ReconStats, source: Source) -> Self {
        Conn {
            io,
            report: Report::default(),
            stats,
            source,
            retry: Vec::new(),
        }
    }

    async fn send(&mut self, f: &Frame) -> Result<(), SessionError> {
        let body = f.encode();
        let n = body.len() + 4;
        let len = u32::try_from(body.len()).map_err(|_| SessionError::FrameTooLarge(body.len()))?;
        self.io.write_all(&len.to_be_bytes()).await?;
        self.io.write_all(&body).await?;
        self.io.flush().await?;
        self.report.bytes_sent += n as u64;
        self.stats.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn recv(&mut self) -> Result<Frame, SessionError> {
        let read = async {
            let mut len = [0u8; 4];
            self.io.read_exact(&mut len).await?;
            let len = u32::from_be_bytes(len) as usize;
            if len > MAX_FRAME {
                return Err(SessionError::FrameTooLarge(len));
            }
            let mut body = vec![0u8; len];
            self.io.read_exact(&mut body).await?;
            Ok(body)
        };
        let body = tokio::time::timeout(FRAME_TIMEOUT, read)
            .await
            .map_err(|_| SessionError::Timeout(FRAME_TIMEOUT))??;
        let n = body.len() as u64 + 4;
        self.report.bytes_received += n;
        self.stats.bytes_received.fetch_add(n, Ordering::Relaxed);
        match Frame::decode(&body)? {
            Frame::Error(m) => Err(SessionError::Peer(m)),
            f => Ok(f),
        }
    }

    async fn apply(
        &mut self,
        store: &Store,
        events: Vec<LeaseEvent>,
    ) -> Result<usize, SessionError> {
        self.report.received += events.len();
        let store = store.clone();
        let source = self.source.clone();
        let evs = events.clone();
        let results = blocking(move || store.apply_events_from(&evs, &source)).await?;
        Ok(self.account(&events, &results))
    }

    /// Apply the events kept by [`MAX_RETRY`] once more (their creates
    /// came later in the session); what is still refused is dropped.
    async fn retry(&mut self, store: &Store) -> Result<(), SessionError> {
        let evs = std::mem::take(&mut self.retry);
        for chunk in evs.chunks(PAGE_EVENTS) {
            let (s, source, page) = (store.clone(), self.source.clone(), chunk.to_vec());
            let results = blocking(move || s.apply_events_from(&page, &source)).await?;
            self.account(&[], &results);
        }
        Ok(())
    }

    /// Count what a page did; keep events over a pending share for
    /// [`Conn::retry`] (`events`: the page, or empty for no keeping).
    fn account(&mut self, events: &[LeaseEvent], results: &[Result<Applied, StoreError>]) -> usize {
        for (ev, r) in events.iter().zip(results) {
            if matches!(r, Err(StoreError::PendingRefused(_))) && self.retry.len() < MAX_RETRY {
                self.retry.push(ev.clone());
            }
        }
        let applied = results
            .iter()
            .filter(|r| matches!(r, Ok(Applied::Changed(_)) | Ok(Applied::Pending)))
            .count();
        for r in results {
            if let Err(e) = r {
                tracing::debug!("reconciliation: event refused: {e}");
            }
        }
        self.report.applied += applied;
        self.stats
            .applied
            .fetch_add(applied as u64, Ordering::Relaxed);
        applied
    }
}

/// A page being written in a blocking thread.
type Writing = tokio::task::JoinHandle<Result<Vec<Result<Applied, StoreError>>, StoreError>>;

async fn written(w: Writing) -> Result<Vec<Result<Applied, StoreError>>, SessionError> {
    w.await
        .map_err(|e| SessionError::Frame(format!("store task failed: {e}")))?
        .map_err(SessionError::Store)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, SessionError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SessionError::Frame(format!("store task failed: {e}")))?
        .map_err(SessionError::Store)
}

/// Load events for `keys` (in order), up to [`PAGE_EVENTS`] and
/// [`PAGE_BYTES`]; returns them and the first key not taken. A key whose
/// event is gone (compacted meanwhile) is skipped.
fn page(store: &Store, keys: &[SyncKey]) -> Result<(Vec<LeaseEvent>, Option<SyncKey>), StoreError> {
    let ids: Vec<EventId> = keys.iter().take(PAGE_EVENTS).map(|k| k.id).collect();
    let (evs, used) = store.events_by_ids(&ids, PAGE_BYTES)?;
    Ok((evs, keys.get(used).copied()))
}

/// Run a session as the initiator: reconcile, pull what we lack, push what
/// the peer lacks.
pub async fn initiate<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    store: &Store,
    stats: &ReconStats,
) -> Result<Report, SessionError> {
    initiate_with(io, store, stats, Source::Local).await
}

/// [`initiate`] with a peer whose events take `source`'s share of our
/// pending store.
pub async fn initiate_with<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    store: &Store,
    stats: &ReconStats,
    source: Source,
) -> Result<Report, SessionError> {
    let mut c = Conn::new(io, stats, source);
    let r = run_initiator(&mut c, store).await;
    finish(&mut c, r).await
}

async fn finish<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Conn<'_, S>,
    r: Result<(), SessionError>,
) -> Result<Report, SessionError> {
    match r {
        Ok(()) => {
            c.stats.sessions.fetch_add(1, Ordering::Relaxed);
            Ok(std::mem::take(&mut c.report))
        }
        Err(e) => {
            c.stats.failed.fetch_add(1, Ordering::Relaxed);
            if !matches!(e, SessionError::Io(_) | SessionError::Peer(_)) {
                let _ = c.send(&Frame::Error(e.to_string())).await;
            }
            Err(e)
        }
    }
}

async fn run_initiator<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Conn<'_, S>,
    store: &Store,
) -> Result<(), SessionError> {
    let mut findings = Findings::default();
    let mut msg = store.with_sync_set(recon::initial);
    while !msg.is_done() {
        c.report.rounds += 1;
        if c.report.rounds > MAX_ROUNDS {
            return Err(SessionError::TooLong("the round limit"));
        }
        c.send(&Frame::Recon(recon::encode(&msg))).await?;
        let reply = match c.recv().await? {
            Frame::Recon(b) => recon::decode(&b)?,
            _ => {
                return Err(SessionError::Frame(
                    "expected a reconciliation message".into(),
                ));
            }
        };
        let s = store.clone();
        let (next, f) = blocking(move || {
            let mut f = findings;
            let next = s.with_sync_set(|set| recon::process(set, &reply, Role::Initiator, &mut f));
            Ok((next, f))
        })
        .await?;
        msg = next;
        findings = f;
    }
    pull(c, store, &findings).await?;
    c.retry(store).await?;
    push(c, store, &findings).await?;
    c.send(&Frame::Done).await
}

async fn pull<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Conn<'_, S>,
    store: &Store,
    f: &Findings,
) -> Result<(), SessionError> {
    for chunk in f.need.chunks(PAGE_EVENTS) {
        c.send(&Frame::GetIds(chunk.to_vec())).await?;
        match c.recv().await? {
            Frame::Events(_, evs) => c.apply(store, evs).await?,
            _ => return Err(SessionError::Frame("expected events".into())),
        };
    }
    // A range moves as a pipeline: while page N is written (one thread,
    // under the store's lock), page N+1 is verified (two threads) and page
    // N+2 is read by the responder. Pages are still written in order.
    let mut writing: Option<(Writing, Vec<LeaseEvent>)> = None;
    for (lo, hi) in &f.need_ranges {
        let mut cur = *lo;
        c.send(&Frame::GetRange(cur, *hi)).await?;
        for _ in 0..MAX_FRAMES {
            let (next, evs) = match c.recv().await? {
                Frame::Events(next, evs) => (next, evs),
                _ => return Err(SessionError::Frame("expected events".into())),
            };
            match next {
                // The responder's cursor must move forward and stay in range.
                Some(k) if k > cur && Bound::Key(k) < *hi => {
                    cur = k;
                    c.send(&Frame::GetRange(cur, *hi)).await?;
                }
                Some(_) => return Err(SessionError::Frame("range cursor did not advance".into())),
                None => {}
            }
            c.report.received += evs.len();
            let page = evs.clone();
            let verified = tokio::task::spawn_blocking(move || Verified::check(evs))
                .await
                .map_err(|e| SessionError::Frame(format!("verify task failed: {e}")))?;
            if let Some((w, evs)) = writing.take() {
                let results = written(w).await?;
                c.account(&evs, &results);
            }
            let s = store.clone();
            let source = c.source.clone();
            let w = tokio::task::spawn_blocking(move || s.apply_verified_from(verified, &source));
            writing = Some((w, page));
            if next.is_none() {
                break;
            }
        }
    }
    if let Some((w, evs)) = writing {
        let results = written(w).await?;
        c.account(&evs, &results);
    }
    Ok(())
}

async fn push<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Conn<'_, S>,
    store: &Store,
    f: &Findings,
) -> Result<(), SessionError> {
    let mut keys: Vec<SyncKey> = Vec::new();
    store.with_sync_set(|set| {
        for (lo, hi) in &f.have_ranges {
            keys.extend(set.keys(lo, hi, usize::MAX));
        }
    });
    // Ids found by list have no key at hand; any key order works for them
    // (the timestamp only orders pages).
    let by_id = f.have.iter().map(|id| SyncKey { ts: 0, id: *id });
    let mut keys: Vec<SyncKey> = by_id.chain(keys).collect();
    // Two pages in flight: the responder verifies and writes one while we
    // read the next from our store (a fresh node that a full node pushes
    // to joins as fast as one that pulls).
    let mut unacked = 0usize;
    while !keys.is_empty() {
        let s = store.clone();
        // `page` looks at no more than a page of keys; copying only those
        // keeps a big push linear.
        let batch = keys[..keys.len().min(PAGE_EVENTS + 1)].to_vec();
        let (evs, next) = blocking(move || page(&s, &batch)).await?;
        let taken = next
            .and_then(|n| keys.iter().position(|k| *k == n))
            .unwrap_or(keys.len());
        keys.drain(..taken.max(1));
        if evs.is_empty() {
            continue;
        }
        if unacked == PUTS_IN_FLIGHT {
            recv_ack(c).await?;
            unacked -= 1;
        }
        c.report.sent += evs.len();
        c.send(&Frame::Put(evs)).await?;
        unacked += 1;
    }
    for _ in 0..unacked {
        recv_ack(c).await?;
    }
    Ok(())
}

/// Pages pushed before the first is acknowledged.
const PUTS_IN_FLIGHT: usize = 2;

async fn recv_ack<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Conn<'_, S>,
) -> Result<(), SessionError> {
    match c.recv().await? {
        Frame::Ack(_) => Ok(()),
        _ => Err(SessionError::Frame("expected an ack".into())),
    }
}

/// Answer one session as the responder, until `Done` or the stream ends.
pub async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    store: &Store,
    stats: &ReconStats,
) -> Result<Report, SessionError> {
    respond_with(io, store, stats, Source::Local).await
}

/// [`respond`] to a peer whose events take `source`'s share of our
/// pending store.
pub async fn respond_with<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    store: &Store,
    stats: &ReconStats,
    source: Source,
) -> Result<Report, SessionError> {
    let mut c = Conn::new(io, stats, source);
    let r = run_responder(&mut c, store).await;
    finish(&mut c, r).await
}

async fn run_responder<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Conn<'_, S>,
    store: &Store,
) -> Result<(), SessionError> {
    for _ in 0..MAX_FRAMES {
        let s = store.clone();
        match c.recv().await? {
            Frame::Recon(b) => {
                c.report.rounds += 1;
                let msg: Message = recon::decode(&b)?;
                let reply = blocking(move || {
                    Ok(s.with_sync_set(|set| {
                        recon::process(set, &msg, Role::Responder, &mut Findings::default())
                    }))
                })
                .await?;
                c.send(&Frame::Recon(recon::encode(&reply))).await?;
            }
            Frame::GetIds(ids) => {
                let ids: Vec<EventId> = ids.into_iter().take(PAGE_EVENTS).collect();
                let (evs, _) = blocking(move || s.events_by_ids(&ids, PAGE_BYTES)).await?;
                c.report.sent += evs.len();
                c.send(&Frame::Events(None, evs)).await?;
            }
            Frame::GetRange(lo, hi) => {
                let (evs, next) = blocking(move || {
                    let keys = s.with_sync_set(|set| set.keys(&lo, &hi, PAGE_EVENTS + 1));
                    page(&s, &keys)
                })
                .await?;
                c.report.sent += evs.len();
                c.send(&Frame::Events(next, evs)).await?;
            }
            Frame::Put(evs) => {
                if evs.len() > PAGE_EVENTS {
                    return Err(SessionError::Frame("too many events in one put".into()));
                }
                let n = c.apply(store, evs).await?;
                c.send(&Frame::Ack(n as u32)).await?;
            }
            Frame::Done => return c.retry(store).await,
            Frame::Events(..) | Frame::Ack(_) | Frame::Error(_) => {
                return Err(SessionError::Frame(
                    "a responder does not take that frame".into(),
                ));
            }
        }
    }
    Err(SessionError::TooLong("the frame limit"))
}

#[cfg(test)]
mod tests;
