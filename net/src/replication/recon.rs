//! Range-based set reconciliation (RBSR), the approach described for
//! Negentropy: both sides hold a sorted set of `(timestamp, event id)`
//! keys ([`xe_store::SyncSet`]); a message is a run of contiguous ranges
//! over the key space, each given by its exclusive upper bound and a mode:
//!
//! - `Skip`: nothing to do here (agreed, or already resolved);
//! - `Fp`: "I hold `count` keys here with this fingerprint";
//! - `Ids`: "these are all the ids I hold here".
//!
//! The initiator opens with one `Fp` over the whole space. A receiver
//! compares each `Fp` with its own: equal ranges are skipped; a range where
//! one side holds nothing is resolved at once (the other side's whole range
//! is transferred, by range, not by id); a small range is answered with its
//! ids; a large one is split into [`BUCKETS`] sub-ranges with their own
//! fingerprints. Only the initiator turns id lists into findings (ids to
//! pull, ids to push), so the responder keeps no state between messages.
//!
//! Cost: equal sets exchange one fingerprint (≈ 25 bytes) and an empty
//! answer. Sets differing by `d` keys exchange O(d · log_B N) fingerprints
//! plus the ids of the differing leaves.
//!
//! # Wire form, version 1
//!
//! ```text
//! message = version u8 (1) ‖ range*            (trailing skips omitted)
//! range   = bound ‖ mode
//! bound   = 0x00                                end of the key space
//!         | 0x01 ‖ ts varint ‖ len u8 ‖ id[..len]   id zero-filled after len
//! mode    = 0x00                                skip
//!         | 0x01 ‖ count varint ‖ fp 16 bytes
//!         | 0x02 ‖ n varint ‖ n × id (32 bytes)
//! ```

use xe_store::EventId;
use xe_store::syncset::{Bound, Fingerprint, SyncKey, SyncSet};

/// Sub-ranges a differing range is split into.
pub const BUCKETS: usize = 16;
/// A differing range holding at most this many of our keys is sent as ids.
pub const ID_LIST_MAX: usize = 32;
/// A responder answers an id list with its own ids up to this many (the
/// initiator holds few there, so nearly all of them are differences).
pub const ID_REPLY_MAX: usize = 2048;
/// Soft limit on one message; past it, the rest is sent as one fingerprint
/// to be resolved in a later round.
pub const FRAME_LIMIT: usize = 128 * 1024;
/// Most ranges a message may carry (a decoder bound against hostile input).
pub const MAX_RANGES: usize = 64 * 1024;

const VERSION: u8 = 1;

/// What a range says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Nothing to do.
    Skip,
    /// The sender's count and fingerprint.
    Fp(Fingerprint),
    /// All the sender's ids.
    Ids(Vec<EventId>),
}

/// One range: from the previous range's upper bound (or the start) to
/// `upper`, exclusive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// Exclusive upper end.
    pub upper: Bound,
    /// What the sender says about it.
    pub mode: Mode,
}

/// A reconciliation message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// Contiguous ranges from [`SyncKey::MIN`].
    pub ranges: Vec<Range>,
}

/// Which side of a session we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opened the session; turns id lists into findings.
    Initiator,
    /// Answers; keeps no state.
    Responder,
}

/// Why a message did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Ended inside a field.
    #[error("reconciliation message truncated at byte {0}")]
    Truncated(usize),
    /// An unknown version.
    #[error("reconciliation message version {0}, expected {VERSION}")]
    Version(u8),
    /// An unknown tag byte.
    #[error("unknown {what} tag {tag:#04x} at byte {at}")]
    Tag {
        /// Bound or mode.
        what: &'static str,
        /// The byte.
        tag: u8,
        /// Offset.
        at: usize,
    },
    /// Bounds not strictly increasing, or a range after the end.
    #[error("range bounds out of order at range {0}")]
    Order(usize),
    /// Too many ranges or ids, or an id prefix over 32 bytes.
    #[error("reconciliation message too large: {0}")]
    TooLarge(&'static str),
}

/// What the initiator learned: what to fetch and what to send.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Findings {
    /// Ids the peer holds and we lack.
    pub need: Vec<EventId>,
    /// Ids we hold and the peer lacks.
    pub have: Vec<EventId>,
    /// Ranges where we hold nothing and the peer holds something.
    pub need_ranges: Vec<(SyncKey, Bound)>,
    /// Ranges where the peer holds nothing and we hold something.
    pub have_ranges: Vec<(SyncKey, Bound)>,
}

impl Message {
    /// Whether nothing is left to do (only skips).
    pub fn is_done(&self) -> bool {
        self.ranges.iter().all(|r| r.mode == Mode::Skip)
    }
}

/// The opening message: one fingerprint over everything.
pub fn initial(set: &SyncSet) -> Message {
    Message {
        ranges: vec![Range {
            upper: Bound::End,
            mode: Mode::Fp(set.fingerprint(&SyncKey::MIN, &Bound::End)),
        }],
    }
}

/// Builds a reply, merging neighbouring skips and watching its size.
struct Out {
    ranges: Vec<Range>,
    size: usize,
}

impl Out {
    fn push(&mut self, upper: Bound, mode: Mode) {
        if mode == Mode::Skip
            && let Some(last) = self.ranges.last_mut()
            && last.mode == Mode::Skip
        {
            last.upper = upper;
            return;
        }
        self.size += 44
            + match &mode {
                Mode::Skip => 0,
                Mode::Fp(_) => 26,
                Mode::Ids(ids) => 5 + 32 * ids.len(),
            };
        self.ranges.push(Range { upper, mode });
    }

    fn split_or_list(&mut self, set: &SyncSet, lo: &SyncKey, hi: &Bound) {
        if set.count_upto(lo, hi, ID_LIST_MAX + 1) <= ID_LIST_MAX {
            let ids = set.keys(lo, hi, ID_LIST_MAX).iter().map(|k| k.id).collect();
            self.push(*hi, Mode::Ids(ids));
        } else {
            for (upper, fp) in set.split(lo, hi, BUCKETS) {
                self.push(upper, Mode::Fp(fp));
            }
        }
    }
}

/// Answer `msg` from `set`. As the initiator, differences found are added
/// to `findings`; a returned message that [`Message::is_done`] ends the
/// session.
pub fn process(set: &SyncSet, msg: &Message, role: Role, findings: &mut Findings) -> Message {
    let mut out = Out {
        ranges: Vec::new(),
        size: 1,
    };
    let mut lo = SyncKey::MIN;
    for r in &msg.ranges {
        if out.size > FRAME_LIMIT {
            // The rest in one piece, to be taken up in the next round.
            out.push(Bound::End, Mode::Fp(set.fingerprint(&lo, &Bound::End)));
            return trim(out.ranges);
        }
        let hi = r.upper;
        match &r.mode {
            Mode::Skip => out.push(hi, Mode::Skip),
            Mode::Fp(theirs) => {
                let mine = set.fingerprint(&lo, &hi);
                if mine == *theirs {
                    out.push(hi, Mode::Skip);
                } else if mine.count == 0 || theirs.count == 0 {
                    // One side holds nothing here: the whole range moves.
                    // The initiator records which way; the responder states
                    // its own count so the initiator can tell.
                    match role {
                        Role::Initiator => {
                            if mine.count == 0 {
                                findings.need_ranges.push((lo, hi));
                            } else {
                                findings.have_ranges.push((lo, hi));
                            }
                            out.push(hi, Mode::Skip);
                        }
                        Role::Responder => out.push(hi, Mode::Fp(mine)),
                    }
                } else {
                    out.split_or_list(set, &lo, &hi);
                }
            }
            Mode::Ids(theirs) => match role {
                Role::Initiator => {
                    let mine: Vec<EventId> = set
                        .keys(&lo, &hi, usize::MAX)
                        .iter()
                        .map(|k| k.id)
                        .collect();
                    let their_set: std::collections::HashSet<&EventId> = theirs.iter().collect();
                    let my_set: std::collections::HashSet<&EventId> = mine.iter().collect();
                    findings
                        .need
                        .extend(theirs.iter().filter(|id| !my_set.contains(id)));
                    findings
                        .have
                        .extend(mine.iter().filter(|id| !their_set.contains(id)));
                    out.push(hi, Mode::Skip);
                }
                Role::Responder => {
                    if set.count_upto(&lo, &hi, ID_REPLY_MAX + 1) <= ID_REPLY_MAX {
                        let ids = set
                            .keys(&lo, &hi, ID_REPLY_MAX)
                            .iter()
                            .map(|k| k.id)
                            .collect();
                        out.push(hi, Mode::Ids(ids));
                    } else {
                        for (upper, fp) in set.split(&lo, &hi, BUCKETS) {
                            out.push(upper, Mode::Fp(fp));
                        }
                    }
                }
            },
        }
        if let Bound::Key(k) = hi {
            lo = k;
        }
    }
    trim(out.ranges)
}

fn trim(mut ranges: Vec<Range>) -> Message {
    while ranges.last().is_some_and(|r| r.mode == Mode::Skip) {
        ranges.pop();
    }
    Message { ranges }
}

fn put_varint(b: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            b.push(byte);
            return;
        }
        b.push(byte | 0x80);
    }
}

/// The wire form (see the module docs).
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut b = vec![VERSION];
    for r in &msg.ranges {
        match r.upper {
            Bound::End => b.push(0),
            Bound::Key(k) => {
                b.push(1);
                put_varint(&mut b, k.ts);
                let len = 32 - k.id.0.iter().rev().take_while(|x| **x == 0).count();
                b.push(len as u8);
                b.extend_from_slice(&k.id.0[..len]);
            }
        }
        match &r.mode {
            Mode::Skip => b.push(0),
            Mode::Fp(fp) => {
                b.push(1);
                put_varint(&mut b, fp.count);
                b.extend_from_slice(&fp.hash);
            }
            Mode::Ids(ids) => {
                b.push(2);
                put_varint(&mut b, ids.len() as u64);
                for id in ids {
                    b.extend_from_slice(&id.0);
                }
            }
        }
    }
    b
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.b.len());
        let end = end.ok_or(DecodeError::Truncated(self.at))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::TooLarge("varint over 64 bits"))
    }
}

/// Parse the wire form, checking bounds increase and sizes are sane.
pub fn decode(b: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { b, at: 0 };
    let v = r.byte()?;
    if v != VERSION {
        return Err(DecodeError::Version(v));
    }
    let mut ranges = Vec::new();
    let mut prev = SyncKey::MIN;
    let mut ended = false;
    while r.at < b.len() {
        if ranges.len() >= MAX_RANGES {
            return Err(DecodeError::TooLarge("too many ranges"));
        }
        if ended {
            return Err(DecodeError::Order(ranges.len()));
        }
        let at = r.at;
        let upper = match r.byte()? {
            0 => {
                ended = true;
                Bound::End
            }
            1 => {
                let ts = r.varint()?;
                let len = usize::from(r.byte()?);
                if len > 32 {
                    return Err(DecodeError::TooLarge("id prefix over 32 bytes"));
                }
                let mut id = [0u8; 32];
                id[..len].copy_from_slice(r.take(len)?);
                let k = SyncKey {
                    ts,
                    id: EventId(id),
                };
                if k <= prev && !(ranges.is_empty() && k == prev) {
                    return Err(DecodeError::Order(ranges.len()));
                }
                prev = k;
                Bound::Key(k)
            }
            tag => {
                return Err(DecodeError::Tag {
                    what: "bound",
                    tag,
                    at,
                });
            }
        };
        let at = r.at;
        let mode = match r.byte()? {
            0 => Mode::Skip,
            1 => {
                let count = r.varint()?;
                let mut hash = [0u8; 16];
                hash.copy_from_slice(r.take(16)?);
                Mode::Fp(Fingerprint { count, hash })
            }
            2 => {
                let n = r.varint()?;
                if n > (b.len() / 32) as u64 {
                    return Err(DecodeError::TooLarge("more ids than bytes"));
                }
                let mut ids = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let mut id = [0u8; 32];
                    id.copy_from_slice(r.take(32)?);
                    ids.push(EventId(id));
                }
                Mode::Ids(ids)
            }
            tag => {
                return Err(DecodeError::Tag {
                    what: "mode",
                    tag,
                    at,
                });
            }
        };
        ranges.push(Range { upper, mode });
    }
    Ok(Message { ranges })
}

#[cfg(test)]
mod tests;
