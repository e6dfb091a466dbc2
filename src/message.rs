//! The cluster protocol's messages and their binary encoding.
//!
//! Every message between two nodes is a [`Message`]: the sender's epoch (the fencing
//! token: a receiver refuses a request from a lower epoch) and a [`Body`]. The node
//! (`node.rs`, `bully.rs`, `replication.rs`) builds and consumes them; `peer.rs` ships
//! [`encode`]d messages as opaque frame payloads and hands [`decode`]d ones back, so the
//! codec is the one place bytes from a peer become protocol values.
//!
//! # Catalogue
//!
//! Election (Bully, made safe with epochs and majorities; see `bully.rs`):
//! - `Election`: "my leader is gone; is a higher id alive?" (to higher ids only).
//! - `Answer`: "I am higher and alive: wait for my `Coordinator`".
//! - `PreVote{last}` / `PreVoteReply{granted}`: "would you accept me at epoch + 1?",
//!   asked before the epoch is bumped, so a node cut off from the others cannot depose a
//!   healthy leader.
//! - `Coordinator{last}`: the candidate's bid for the epoch the message carries.
//! - `Accept{last}`: the bid is accepted (at most one per epoch, persisted first).
//! - `Refuse{leader}`: the request was refused (stale epoch, a live leader, or a vote
//!   already given); carries the refuser's epoch and the leader it follows, if any.
//! - `Takeover{last}` / `HandOver{successor}`: a returning higher id asks the leader for
//!   the lead; the leader, once it is caught up, tells every follower it stepped down.
//!
//! Log (see `replication.rs`):
//! - `Heartbeat{seq, commit, last}` and `Append{seq, prev, entries, commit}` from the
//!   leader; `seq` is the leader's tick when it sent them, echoed back for the lease.
//! - `AppendAck{seq, result}`: the follower's log matches and is durable through an
//!   index, or it does not match (with a hint where to retry), or it diverged below its
//!   commit index (async replication only: it needs a snapshot).
//! - `Pull{after}` / `PullReply{result}`: a leader-elect fetching the entries it misses
//!   from the most up-to-date node that accepted it.
//!
//! # Encoding
//!
//! Little-endian, no padding: `epoch u64 | tag u8 | body`. A position is `index u64 |
//! epoch u64`, an entry `index u64 | epoch u64 | len u32 | payload`, a list of entries
//! `count u32 | entry*`. [`decode`] never panics and never allocates more than the input
//! could hold: a count or length is checked against the bytes left before anything is
//! reserved, and trailing bytes are an error.

use crate::log::LogEntry;
use byteorder::{ByteOrder, LittleEndian};
use std::fmt;

/// A log position: an entry's index and the epoch it was written in. Ordered as Raft
/// compares logs: the later epoch is more up to date, then the longer log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Pos {
    pub index: u64,
    pub epoch: u64,
}

impl Pos {
    pub fn new(index: u64, epoch: u64) -> Pos {
        Pos { index, epoch }
    }
}

impl From<(u64, u64)> for Pos {
    fn from((index, epoch): (u64, u64)) -> Pos {
        Pos { index, epoch }
    }
}

impl PartialOrd for Pos {
    fn partial_cmp(&self, other: &Pos) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pos {
    fn cmp(&self, other: &Pos) -> std::cmp::Ordering {
        (self.epoch, self.index).cmp(&(other.epoch, other.index))
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.index, self.epoch)
    }
}

/// One message between two nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The sender's current epoch (for `Coordinator`, the epoch it bids for).
    pub epoch: u64,
    pub body: Body,
}

/// What a message says. See the module doc for the catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Election,
    Answer,
    PreVote {
        last: Pos,
    },
    PreVoteReply {
        granted: bool,
    },
    Coordinator {
        last: Pos,
    },
    Accept {
        last: Pos,
    },
    Refuse {
        leader: Option<u64>,
    },
    Heartbeat {
        seq: u64,
        commit: u64,
        /// The leader's last position: a follower that holds it knows its log equals the
        /// leader's through it (and, if its id is higher, may ask to take over).
        last: Pos,
    },
    Append {
        seq: u64,
        prev: Pos,
        entries: Vec<LogEntry>,
        commit: u64,
    },
    AppendAck {
        seq: u64,
        result: AckResult,
    },
    Pull {
        after: Pos,
    },
    PullReply {
        result: PullResult,
    },
    Takeover {
        last: Pos,
    },
    HandOver {
        successor: u64,
    },
}

/// A follower's answer to `Append` or `Heartbeat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckResult {
    /// The follower's log equals the leader's through this index, durably.
    Match(u64),
    /// The previous entry did not match; retry from `hint + 1` or lower.
    Reject { hint: u64 },
    /// An entry at or below the follower's commit index conflicts with the leader's:
    /// only an async failover can cause it, and only a snapshot repairs it.
    Diverged { commit: u64 },
}

/// The answer to a leader-elect's `Pull`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullResult {
    /// Entries after `prev` (which matched), and the sender's last position.
    Entries {
        prev: Pos,
        entries: Vec<LogEntry>,
        last: Pos,
    },
    /// `after` did not match; retry from `hint` or lower.
    Reject { hint: u64 },
    /// `after` is below the sender's snapshot: fetch the snapshot first.
    Snapshot,
}

impl Body {
    /// A request expects an answer; a stale one is refused (`Refuse` tells the sender of
    /// the newer epoch). Replies from a stale epoch are dropped without an answer.
    pub fn is_request(&self) -> bool {
        matches!(
            self,
            Body::Election
                | Body::PreVote { .. }
                | Body::Coordinator { .. }
                | Body::Heartbeat { .. }
                | Body::Append { .. }
                | Body::Pull { .. }
                | Body::Takeover { .. }
                | Body::HandOver { .. }
        )
    }

    /// Sent only by the leader of the message's epoch.
    pub fn is_from_leader(&self) -> bool {
        matches!(
            self,
            Body::Heartbeat { .. } | Body::Append { .. } | Body::HandOver { .. }
        )
    }
}

impl fmt::Display for Message {
    /// The form the golden scripts show: `Append seq=3 prev=1@1 [2@1 3@1] commit=1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |entries: &[LogEntry]| {
            entries
                .iter()
                .map(|e| format!("{}@{}", e.index, e.epoch))
                .collect::<Vec<_>>()
                .join(" ")
        };
        match &self.body {
            Body::Election => write!(f, "Election"),
            Body::Answer => write!(f, "Answer"),
            Body::PreVote { last } => write!(f, "PreVote last={last}"),
            Body::PreVoteReply { granted } => write!(f, "PreVoteReply granted={granted}"),
            Body::Coordinator { last } => write!(f, "Coordinator last={last}"),
            Body::Accept { last } => write!(f, "Accept last={last}"),
            Body::Refuse { leader } => match leader {
                Some(l) => write!(f, "Refuse leader=n{l}"),
                None => write!(f, "Refuse leader=none"),
            },
            Body::Heartbeat { seq, commit, last } => {
                write!(f, "Heartbeat seq={seq} commit={commit} last={last}")
            }
            Body::Append {
                seq,
                prev,
                entries,
                commit,
            } => write!(
                f,
                "Append seq={seq} prev={prev} [{}] commit={commit}",
                list(entries)
            ),
            Body::AppendAck { seq, result } => match result {
                AckResult::Match(m) => write!(f, "AppendAck seq={seq} match={m}"),
                AckResult::Reject { hint } => write!(f, "AppendAck seq={seq} reject hint={hint}"),
                AckResult::Diverged { commit } => {
                    write!(f, "AppendAck seq={seq} diverged commit={commit}")
                }
            },
            Body::Pull { after } => write!(f, "Pull after={after}"),
            Body::PullReply { result } => match result {
                PullResult::Entries {
                    prev,
                    entries,
                    last,
                } => write!(f, "PullReply prev={prev} [{}] last={last}", list(entries)),
                PullResult::Reject { hint } => write!(f, "PullReply reject hint={hint}"),
                PullResult::Snapshot => write!(f, "PullReply snapshot"),
            },
            Body::Takeover { last } => write!(f, "Takeover last={last}"),
            Body::HandOver { successor } => write!(f, "HandOver successor=n{successor}"),
        }
    }
}

/// Why bytes are not a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad cluster message: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

const ELECTION: u8 = 1;
const ANSWER: u8 = 2;
const PREVOTE: u8 = 3;
const PREVOTE_REPLY: u8 = 4;
const COORDINATOR: u8 = 5;
const ACCEPT: u8 = 6;
const REFUSE: u8 = 7;
const HEARTBEAT: u8 = 8;
const APPEND: u8 = 9;
const APPEND_ACK: u8 = 10;
const PULL: u8 = 11;
const PULL_REPLY: u8 = 12;
const TAKEOVER: u8 = 13;
const HANDOVER: u8 = 14;

/// The smallest encoded entry (an empty payload): what a count is checked against.
const MIN_ENTRY: usize = 8 + 8 + 4;

/// Encodes `msg` (see the module doc for the layout).
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    put_u64(&mut out, msg.epoch);
    match &msg.body {
        Body::Election => out.push(ELECTION),
        Body::Answer => out.push(ANSWER),
        Body::PreVote { last } => {
            out.push(PREVOTE);
            put_pos(&mut out, *last);
        }
        Body::PreVoteReply { granted } => {
            out.push(PREVOTE_REPLY);
            out.push(u8::from(*granted));
        }
        Body::Coordinator { last } => {
            out.push(COORDINATOR);
            put_pos(&mut out, *last);
        }
        Body::Accept { last } => {
            out.push(ACCEPT);
            put_pos(&mut out, *last);
        }
        Body::Refuse { leader } => {
            out.push(REFUSE);
            // Node ids are never 0, so 0 stands for "no leader".
            put_u64(&mut out, leader.unwrap_or(0));
        }
        Body::Heartbeat { seq, commit, last } => {
            out.push(HEARTBEAT);
            put_u64(&mut out, *seq);
            put_u64(&mut out, *commit);
            put_pos(&mut out, *last);
        }
        Body::Append {
            seq,
            prev,
            entries,
            commit,
        } => {
            out.push(APPEND);
            put_u64(&mut out, *seq);
            put_pos(&mut out, *prev);
            put_u64(&mut out, *commit);
            put_entries(&mut out, entries);
        }
        Body::AppendAck { seq, result } => {
            out.push(APPEND_ACK);
            put_u64(&mut out, *seq);
            let (kind, value) = match result {
                AckResult::Match(m) => (0, *m),
                AckResult::Reject { hint } => (1, *hint),
                AckResult::Diverged { commit } => (2, *commit),
            };
            out.push(kind);
            put_u64(&mut out, value);
        }
        Body::Pull { after } => {
            out.push(PULL);
            put_pos(&mut out, *after);
        }
        Body::PullReply { result } => {
            out.push(PULL_REPLY);
            match result {
                PullResult::Entries {
                    prev,
                    entries,
                    last,
                } => {
                    out.push(0);
                    put_pos(&mut out, *prev);
                    put_pos(&mut out, *last);
                    put_entries(&mut out, entries);
                }
                PullResult::Reject { hint } => {
                    out.push(1);
                    put_u64(&mut out, *hint);
                }
                PullResult::Snapshot => out.push(2),
            }
        }
        Body::Takeover { last } => {
            out.push(TAKEOVER);
            put_pos(&mut out, *last);
        }
        Body::HandOver { successor } => {
            out.push(HANDOVER);
            put_u64(&mut out, *successor);
        }
    }
    out
}

/// Decodes one message; any damage (short, unknown tag, a count the bytes cannot hold,
/// trailing bytes) is an error, never a panic.
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf };
    let epoch = r.u64()?;
    let body = match r.u8()? {
        ELECTION => Body::Election,
        ANSWER => Body::Answer,
        PREVOTE => Body::PreVote { last: r.pos()? },
        PREVOTE_REPLY => Body::PreVoteReply {
            granted: match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(DecodeError("pre-vote reply is neither yes nor no")),
            },
        },
        COORDINATOR => Body::Coordinator { last: r.pos()? },
        ACCEPT => Body::Accept { last: r.pos()? },
        REFUSE => Body::Refuse {
            leader: Some(r.u64()?).filter(|&l| l != 0),
        },
        HEARTBEAT => Body::Heartbeat {
            seq: r.u64()?,
            commit: r.u64()?,
            last: r.pos()?,
        },
        APPEND => {
            let seq = r.u64()?;
            let prev = r.pos()?;
            let commit = r.u64()?;
            let entries = r.entries(prev.index)?;
            Body::Append {
                seq,
                prev,
                entries,
                commit,
            }
        }
        APPEND_ACK => {
            let seq = r.u64()?;
            let kind = r.u8()?;
            let value = r.u64()?;
            let result = match kind {
                0 => AckResult::Match(value),
                1 => AckResult::Reject { hint: value },
                2 => AckResult::Diverged { commit: value },
                _ => return Err(DecodeError("unknown append ack kind")),
            };
            Body::AppendAck { seq, result }
        }
        PULL => Body::Pull { after: r.pos()? },
        PULL_REPLY => {
            let result = match r.u8()? {
                0 => {
                    let prev = r.pos()?;
                    let last = r.pos()?;
                    let entries = r.entries(prev.index)?;
                    PullResult::Entries {
                        prev,
                        entries,
                        last,
                    }
                }
                1 => PullResult::Reject { hint: r.u64()? },
                2 => PullResult::Snapshot,
                _ => return Err(DecodeError("unknown pull reply kind")),
            };
            Body::PullReply { result }
        }
        TAKEOVER => Body::Takeover { last: r.pos()? },
        HANDOVER => Body::HandOver {
            successor: r.u64()?,
        },
        _ => return Err(DecodeError("unknown message tag")),
    };
    if !r.buf.is_empty() {
        return Err(DecodeError("trailing bytes after the message"));
    }
    Ok(Message { epoch, body })
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    let mut b = [0u8; 8];
    LittleEndian::write_u64(&mut b, v);
    out.extend_from_slice(&b);
}

fn put_pos(out: &mut Vec<u8>, p: Pos) {
    put_u64(out, p.index);
    put_u64(out, p.epoch);
}

fn put_entries(out: &mut Vec<u8>, entries: &[LogEntry]) {
    let mut b = [0u8; 4];
    // The sender bounds a batch by bytes (far below 4 GiB), so the count and each
    // length fit in u32; saturating keeps a bug from wrapping into a valid-looking frame.
    LittleEndian::write_u32(&mut b, u32::try_from(entries.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(&b);
    for e in entries {
        put_u64(out, e.index);
        put_u64(out, e.epoch);
        LittleEndian::write_u32(&mut b, u32::try_from(e.payload.len()).unwrap_or(u32::MAX));
        out.extend_from_slice(&b);
        out.extend_from_slice(&e.payload);
    }
}

/// A cursor over untrusted bytes: every read checks what is left.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError("message cut short"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(LittleEndian::read_u32(self.take(4)?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(LittleEndian::read_u64(self.take(8)?))
    }

    fn pos(&mut self) -> Result<Pos, DecodeError> {
        Ok(Pos {
            index: self.u64()?,
            epoch: self.u64()?,
        })
    }

    /// Entries that must follow `prev` with consecutive indexes (a receiver relies on
    /// it, so the codec checks it once for every caller).
    fn entries(&mut self, prev: u64) -> Result<Vec<LogEntry>, DecodeError> {
        let count = self.u32()? as usize;
        if count > self.buf.len() / MIN_ENTRY {
            return Err(DecodeError("entry count larger than the message"));
        }
        let mut entries = Vec::with_capacity(count);
        let mut expect = prev;
        for _ in 0..count {
            let index = self.u64()?;
            let epoch = self.u64()?;
            let len = self.u32()? as usize;
            let payload = self.take(len)?.to_vec();
            expect = expect
                .checked_add(1)
                .ok_or(DecodeError("entry index overflows"))?;
            if index != expect {
                return Err(DecodeError("entry indexes are not consecutive"));
            }
            entries.push(LogEntry {
                index,
                epoch,
                payload,
            });
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, epoch: u64, payload: &[u8]) -> LogEntry {
        LogEntry {
            index,
            epoch,
            payload: payload.to_vec(),
        }
    }

    fn samples() -> Vec<Message> {
        let p = Pos::new(7, 3);
        let bodies = vec![
            Body::Election,
            Body::Answer,
            Body::PreVote { last: p },
            Body::PreVoteReply { granted: true },
            Body::PreVoteReply { granted: false },
            Body::Coordinator { last: p },
            Body::Accept { last: p },
            Body::Refuse { leader: Some(3) },
            Body::Refuse { leader: None },
            Body::Heartbeat {
                seq: 9,
                commit: 5,
                last: p,
            },
            Body::Append {
                seq: 10,
                prev: p,
                entries: vec![entry(8, 3, b"set a 1"), entry(9, 4, b"")],
                commit: 6,
            },
            Body::Append {
                seq: 11,
                prev: p,
                entries: vec![],
                commit: 6,
            },
            Body::AppendAck {
                seq: 10,
                result: AckResult::Match(9),
            },
            Body::AppendAck {
                seq: 10,
                result: AckResult::Reject { hint: 4 },
            },
            Body::AppendAck {
                seq: 10,
                result: AckResult::Diverged { commit: 4 },
            },
            Body::Pull { after: p },
            Body::PullReply {
                result: PullResult::Entries {
                    prev: p,
                    entries: vec![entry(8, 3, b"x")],
                    last: Pos::new(8, 3),
                },
            },
            Body::PullReply {
                result: PullResult::Reject { hint: 2 },
            },
            Body::PullReply {
                result: PullResult::Snapshot,
            },
            Body::Takeover { last: p },
            Body::HandOver { successor: 5 },
        ];
        bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| Message {
                epoch: 100 + i as u64,
                body,
            })
            .collect()
    }

    #[test]
    fn every_message_round_trips() {
        for msg in samples() {
            let bytes = encode(&msg);
            assert_eq!(decode(&bytes), Ok(msg.clone()), "{msg}");
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for msg in samples() {
            let bytes = encode(&msg);
            for cut in 0..bytes.len() {
                assert!(decode(&bytes[..cut]).is_err(), "{msg} cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(
                decode(&longer),
                Err(DecodeError("trailing bytes after the message"))
            );
        }
    }

    #[test]
    fn huge_counts_and_lengths_are_refused_before_allocating() {
        // An Append that claims 4 billion entries in a few bytes.
        let mut b = Vec::new();
        put_u64(&mut b, 1);
        b.push(APPEND);
        put_u64(&mut b, 1);
        put_pos(&mut b, Pos::new(0, 0));
        put_u64(&mut b, 0);
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode(&b),
            Err(DecodeError("entry count larger than the message"))
        );
        // One entry whose payload claims 4 GiB.
        let mut b2 = b[..b.len() - 4].to_vec();
        b2.extend_from_slice(&1u32.to_le_bytes());
        put_u64(&mut b2, 1);
        put_u64(&mut b2, 1);
        b2.extend_from_slice(&u32::MAX.to_le_bytes());
        b2.extend_from_slice(&[0; 16]);
        assert_eq!(decode(&b2), Err(DecodeError("message cut short")));
    }

    #[test]
    fn entries_must_follow_prev() {
        let msg = Message {
            epoch: 1,
            body: Body::Append {
                seq: 1,
                prev: Pos::new(3, 1),
                entries: vec![entry(5, 1, b"")],
                commit: 0,
            },
        };
        assert_eq!(
            decode(&encode(&msg)),
            Err(DecodeError("entry indexes are not consecutive"))
        );
    }

    #[test]
    fn garbage_never_panics() {
        // A deterministic pseudo-random stream (xorshift): no clock, no seed from outside.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if len > 8 {
                // Aim at valid tags often, so the bodies' decoders are exercised too.
                bytes[8] = (next() % 16) as u8;
            }
            let _ = decode(&bytes);
        }
        // Mutating valid messages byte by byte.
        for msg in samples() {
            let bytes = encode(&msg);
            for i in 0..bytes.len() {
                let mut m = bytes.clone();
                m[i] ^= 0xFF;
                let _ = decode(&m);
            }
        }
    }

    #[test]
    fn positions_compare_by_epoch_then_index() {
        assert!(Pos::new(9, 1) < Pos::new(1, 2));
        assert!(Pos::new(1, 2) < Pos::new(2, 2));
    }
}
