//! Links between cluster nodes: binary frames, the authenticating handshake, and the
//! threads that carry the node's messages.
//!
//! The node (election and replication) sees none of this: it hands [`PeerNet::send`] a
//! destination id, a message kind and opaque payload bytes, and reads what the others
//! sent as [`Incoming`] values from one crossbeam channel. A node is known by the id it
//! proved in the handshake, never by the address it came from: operators put proxies and
//! NAT between machines, and our tests put TCP proxies between nodes.
//!
//! # Links
//!
//! Every ordered pair of nodes has its own TCP connection, used in one direction: node A
//! dials B (one thread per configured peer) and only writes to it; B's server hands the
//! connection, once it opened with `PEER HELLO`, to [`PeerNet::accept`], which proves
//! it and then only reads from it, delivering frames to the channel. So a message from A
//! to B travels on A's dialer and B's inbound link, and a reply on the pair's other
//! connection. That keeps each thread simple (one blocking direction) and lets each side
//! notice a dead link on its own: the dialer by a failed write (an idle dialer writes a
//! keepalive every heartbeat), the receiver by hearing nothing, not even a keepalive,
//! for the idle timeout (twice the failure timeout).
//!
//! The dialer reconnects with exponential backoff (50 ms doubling to 1 s, reset by a
//! successful handshake). Its queue is bounded in messages and bytes; when full, the
//! oldest message is dropped rather than blocking the node, whose protocol tolerates
//! loss (it retransmits from what the follower acknowledged). A message a link was
//! writing when it broke is lost too. Delivery is therefore at most once, in order per
//! link. The inbound channel is bounded and blocks the receiving thread when full, so a
//! slow node pushes back on the sender's TCP connection and then on its dropping queue,
//! never on memory.
//!
//! # Frames
//!
//! `len u32 | crc32 u32 | kind u8 | payload`, little endian; `len` counts the kind byte
//! and the payload (so it is never 0, and a zero-filled buffer is no frame), the CRC
//! covers the same bytes. [`MAX_FRAME`] (the log's largest entry plus 1 MiB) bounds
//! `len`; [`FrameDecoder`] checks it before it waits for the body, and grows its buffer
//! only with bytes that arrived, so a peer cannot make us hold more than one maximal
//! frame. During the handshake, before the other side has proved the secret, a frame
//! may declare at most [`MAX_HANDSHAKE_FRAME`] (checked the same way, from the header),
//! so a stranger cannot make us buffer a maximal one. A
//! frame that fails its CRC, or is empty or oversized, closes the link (the stream is no
//! longer trustworthy to resynchronise on). Kind [`KIND_LINK`] is the link's own
//! (handshake proof, welcome, refusal, keepalive); every other kind is the node's.
//!
//! # Handshake
//!
//! The dialer connects to the peer's *client* port, so a node needs one port only, and
//! opens with a RESP command that the server recognises (`server.rs`). Mutual
//! challenge–response with HMAC-SHA256 over the cluster secret, which never crosses the
//! wire:
//!
//! ```text
//! dialer D                                            acceptor A
//!   PEER HELLO 1 <D id> <A id> <D epoch> <nonce_D>  ->     (RESP command)
//!                  <- +PEER <A id> <A epoch> <nonce_A>     (or -ERR PEER refused: why)
//!   frame PROOF  HMAC(secret, "dialer", ids, epochs, nonce_D, nonce_A)  ->
//!                  <- frame WELCOME HMAC(secret, "acceptor", same fields)
//!                     (or frame REFUSE why: wrong secret, duplicate)
//! ```
//!
//! Each side proves the secret over a fresh nonce of the other's choosing, with both ids
//! and epochs bound in, so a proof cannot be replayed to another node, for another id,
//! or in another connection; the role label keeps A's proof from being reflected back
//! as D's. The acceptor proves itself only after the dialer did, so it gives no
//! unauthenticated caller a MAC to study. MACs are compared in constant time
//! (`hmac::Mac::verify_slice`). A redis-cli user who types `PEER` gets an error reply
//! and stays an ordinary client. What this does not give: secrecy or integrity of the
//! frames after the handshake against someone on the path (there is no encryption; use
//! a private network or a tunnel between machines).
//!
//! Refusals close the link with a logged warning that names the address and the
//! claimed id: wrong secret, an id that is not a member, our own id, a HELLO meant for
//! another id (a misconfigured `ID@host:port`), an id that already has a live inbound
//! link (two nodes started with one id), a frame that fails its CRC. Refusals before
//! the secret is proved can be caused by anyone who reaches the port, so they are
//! rate-limited in the log (one a second, with a count of those held back).
//!
//! The handshake and frame code is pure (bytes in, bytes and verdicts out); the threads,
//! sockets and clocks are in [`PeerNet`].

use crate::config::ClusterConfig;
use crate::ratelog::{RateLimit, suppressed_note};
use byteorder::{ByteOrder, LittleEndian};
use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError, bounded, select};
use hmac::{KeyInit, Mac};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------

/// Bytes before a frame's kind: `len u32 | crc32 u32`.
pub const HEADER_LEN: usize = 8;
/// The largest `len` (kind byte plus payload) a frame may declare: the log's largest
/// entry ([`crate::wal::MAX_ENTRY`], a little over 1 GiB) plus 1 MiB for the message
/// around it, so that any entry the log accepted can be replicated in one frame. The
/// node keeps an APPEND of several entries under it (a large entry goes alone), and
/// sends a snapshot in chunks. Only a peer that proved the secret gets to send one this
/// big; before that the handshake reads a few hundred bytes.
pub const MAX_FRAME: usize = crate::wal::MAX_ENTRY + (1 << 20);
const _: () = assert!(MAX_FRAME <= u32::MAX as usize);
/// The largest `len` a handshake frame (proof, welcome, refusal) may declare: a proof
/// or welcome is 34 bytes, a refusal a line of text. Frames from a side that has not
/// proved the secret are held to this, not to [`MAX_FRAME`].
pub const MAX_HANDSHAKE_FRAME: usize = 4096;
/// The largest payload [`PeerNet::send`] takes.
pub const MAX_PAYLOAD: usize = MAX_FRAME - 1;
/// The link's own frames (handshake, keepalive); the node uses every other kind.
pub const KIND_LINK: u8 = 0;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub payload: Vec<u8>,
}

/// A frame that cannot be read: the link is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// `len` 0: no kind byte (a zero-filled buffer reads as this).
    Empty,
    /// `len` over [`MAX_FRAME`].
    TooLarge(u32),
    /// The CRC does not match the bytes.
    BadCrc { expected: u32, actual: u32 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Empty => f.write_str("a frame of length 0 (garbage on the link)"),
            FrameError::TooLarge(n) => write!(
                f,
                "a frame of {n} bytes, over the limit of {MAX_FRAME} (garbage on the link)"
            ),
            FrameError::BadCrc { expected, actual } => write!(
                f,
                "a frame failed its CRC (header says {expected:#010x}, bytes give \
                 {actual:#010x})"
            ),
        }
    }
}

fn frame_crc(kind: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    h.finalize()
}

/// The header and kind byte of a frame carrying `payload` (at most [`MAX_PAYLOAD`]
/// bytes: the caller checks).
pub fn frame_header(kind: u8, payload: &[u8]) -> [u8; HEADER_LEN + 1] {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    let mut h = [0u8; HEADER_LEN + 1];
    LittleEndian::write_u32(&mut h[0..4], (payload.len() + 1) as u32);
    LittleEndian::write_u32(&mut h[4..8], frame_crc(kind, payload));
    h[8] = kind;
    h
}

/// Appends a whole frame to `out`. Panics if `payload` is over [`MAX_PAYLOAD`] (callers
/// check first: [`PeerNet::send`] refuses such a message).
pub fn encode_frame(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        payload.len() <= MAX_PAYLOAD,
        "frame payload over MAX_PAYLOAD"
    );
    out.extend_from_slice(&frame_header(kind, payload));
    out.extend_from_slice(payload);
}

/// Cuts frames off a byte stream, however the bytes arrive. Pure: feed it with
/// [`FrameDecoder::extend`], take frames with [`FrameDecoder::next_frame`]. It holds
/// only bytes it was given, and checks a frame's declared length before waiting for its
/// body, so the most it ever holds is one maximal frame plus what arrived with it.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already decoded.
    start: usize,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Adds bytes read from the link.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 && self.start * 2 > self.buf.len() {
            // Keep the buffer from creeping: drop what was decoded once it is most of it.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that are not yet part of a returned frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The `len` the next frame declares, once its header has arrived (whether or not
    /// its body has): for a caller that holds some frames to a lower limit.
    pub fn announced(&self) -> Option<u32> {
        let rest = &self.buf[self.start..];
        (rest.len() >= HEADER_LEN).then(|| LittleEndian::read_u32(&rest[0..4]))
    }

    /// A refusal if the next frame declares more than [`MAX_HANDSHAKE_FRAME`].
    fn check_handshake_frame(&self) -> Result<(), Refusal> {
        match self.announced() {
            Some(len) if len as usize > MAX_HANDSHAKE_FRAME => Err(Refusal::Malformed(format!(
                "a handshake frame of {len} bytes, over the limit of {MAX_HANDSHAKE_FRAME}"
            ))),
            _ => Ok(()),
        }
    }

    /// The next whole frame; `Ok(None)` until enough bytes have arrived. After an error
    /// the stream cannot be trusted: close the link.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let rest = &self.buf[self.start..];
        if rest.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = LittleEndian::read_u32(&rest[0..4]);
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len as usize > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        let end = HEADER_LEN + len as usize;
        if rest.len() < end {
            return Ok(None);
        }
        let expected = LittleEndian::read_u32(&rest[4..8]);
        let kind = rest[HEADER_LEN];
        let payload = &rest[HEADER_LEN + 1..end];
        let actual = frame_crc(kind, payload);
        if actual != expected {
            return Err(FrameError::BadCrc { expected, actual });
        }
        let payload = if self.start == 0 && end == self.buf.len() && end > 1 << 20 {
            // A large frame that is all we hold: hand over the buffer itself rather
            // than hold the payload twice (a 1 GiB entry would briefly take 2 GiB).
            let mut buf = std::mem::take(&mut self.buf);
            buf.drain(..HEADER_LEN + 1);
            self.start = 0;
            buf
        } else {
            let p = payload.to_vec();
            self.start += end;
            p
        };
        Ok(Some(Frame { kind, payload }))
    }

    /// The undecoded bytes (what followed the handshake, for the next reader).
    pub fn into_rest(mut self) -> Vec<u8> {
        self.buf.drain(..self.start);
        self.buf
    }
}

// ---------------------------------------------------------------------------------------
// Handshake (pure)
// ---------------------------------------------------------------------------------------

/// Bytes of a handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;
/// The handshake version this code speaks (the first argument after `PEER HELLO`).
pub const PROTOCOL_VERSION: u64 = 1;
/// The longest challenge line a dialer waits for (it is about 100 bytes).
const MAX_CHALLENGE_LINE: usize = 512;

/// Sub-types of [`KIND_LINK`] frames (their payload's first byte).
const LINK_PROOF: u8 = 1;
const LINK_WELCOME: u8 = 2;
const LINK_REFUSE: u8 = 3;
const LINK_KEEPALIVE: u8 = 4;

pub type Nonce = [u8; NONCE_LEN];
type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Whether a request's command name is `PEER` (the handshake's opening).
pub fn is_peer_command(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"PEER")
}

/// The dialer's opening: `PEER HELLO <version> <from> <to> <epoch> <nonce-hex>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The dialer's id (claimed; proved later).
    pub from: u64,
    /// The id the dialer means to reach.
    pub to: u64,
    /// The dialer's epoch.
    pub epoch: u64,
    pub nonce: Nonce,
}

impl Hello {
    /// The RESP command the dialer sends.
    pub fn to_command(&self) -> Vec<u8> {
        let args: [Vec<u8>; 7] = [
            b"PEER".to_vec(),
            b"HELLO".to_vec(),
            PROTOCOL_VERSION.to_string().into_bytes(),
            self.from.to_string().into_bytes(),
            self.to.to_string().into_bytes(),
            self.epoch.to_string().into_bytes(),
            hex(&self.nonce).into_bytes(),
        ];
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(&a);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// Parses a `PEER …` request (all its arguments, the command name included). The
    /// error is the reply for a client that typed `PEER` by hand.
    pub fn parse(args: &[Vec<u8>]) -> Result<Hello, String> {
        const USE: &str = "ERR PEER opens a link between cluster nodes (PEER HELLO version from \
                           to epoch nonce); it is not a client command";
        if args.len() != 7 || !args[1].eq_ignore_ascii_case(b"HELLO") {
            return Err(USE.into());
        }
        let num = |a: &[u8]| -> Option<u64> {
            // Digits only: no sign, no blanks, at most u64.
            if a.is_empty() || a.len() > 20 || !a.iter().all(u8::is_ascii_digit) {
                return None;
            }
            std::str::from_utf8(a).ok()?.parse().ok()
        };
        let version = num(&args[2]).ok_or(USE)?;
        if version != PROTOCOL_VERSION {
            return Err(format!(
                "ERR PEER HELLO: handshake version {version} is not supported (this node \
                 speaks version {PROTOCOL_VERSION}): run the same kvstore version on every \
                 node"
            ));
        }
        let (Some(from), Some(to), Some(epoch), Some(nonce)) = (
            num(&args[3]),
            num(&args[4]),
            num(&args[5]),
            unhex::<NONCE_LEN>(&args[6]),
        ) else {
            return Err(USE.into());
        };
        Ok(Hello {
            from,
            to,
            epoch,
            nonce,
        })
    }
}

/// Why a handshake or a link was refused. `Display` is the reason that is logged (and,
/// where it helps the other side's operator, sent to it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The other side's MAC did not verify: it does not have our cluster secret.
    WrongSecret,
    /// The claimed id is not a member of the cluster.
    NotMember(u64),
    /// The dialer claims this node's own id.
    OwnId(u64),
    /// The dialer meant another node (`to`), or the node that answered is another one.
    WrongNode { expected: u64, actual: u64 },
    /// The proved id already has a live inbound link.
    Duplicate(u64),
    /// A frame on the link could not be read.
    Frame(FrameError),
    /// Bytes that are not the handshake.
    Malformed(String),
    /// The other side refused us; its reason.
    ByPeer(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::WrongSecret => {
                f.write_str("wrong cluster secret (every node needs the same --cluster-secret)")
            }
            Refusal::NotMember(id) => write!(f, "node id {id} is not a member of this cluster"),
            Refusal::OwnId(id) => write!(f, "it claims this node's own id {id}"),
            Refusal::WrongNode { expected, actual } => write!(
                f,
                "wrong node: expected id {expected}, this is id {actual} (check the \
                 ID@host:port peer entries)"
            ),
            Refusal::Duplicate(id) => write!(
                f,
                "duplicate id {id}: a link from node {id} is already live (are two nodes \
                 running with --id {id}?)"
            ),
            Refusal::Frame(e) => write!(f, "bad frame: {e}"),
            Refusal::Malformed(why) => write!(f, "not a peer handshake: {why}"),
            Refusal::ByPeer(why) => write!(f, "refused by the other side: {why}"),
        }
    }
}

/// What both sides of a handshake need to know: this node's id, the members, the secret.
#[derive(Clone)]
pub struct HandshakeConfig {
    pub id: u64,
    /// The other members' ids.
    pub members: Vec<u64>,
    pub secret: Vec<u8>,
}

impl fmt::Debug for HandshakeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandshakeConfig")
            .field("id", &self.id)
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

impl From<&ClusterConfig> for HandshakeConfig {
    fn from(c: &ClusterConfig) -> Self {
        HandshakeConfig {
            id: c.id,
            members: c.peers.iter().map(|p| p.id).collect(),
            secret: c.secret.clone(),
        }
    }
}

/// The fields both proofs cover.
#[derive(Debug, Clone, Copy)]
struct Transcript {
    dialer: u64,
    acceptor: u64,
    dialer_epoch: u64,
    acceptor_epoch: u64,
    dialer_nonce: Nonce,
    acceptor_nonce: Nonce,
}

impl Transcript {
    fn hmac(&self, secret: &[u8], role: &[u8]) -> HmacSha256 {
        // HMAC takes a key of any length; this cannot fail.
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(secret)
            .expect("HMAC accepts keys of any length");
        // Fixed-width fields after a fixed label: no two transcripts encode alike.
        m.update(b"kvstore peer v1 ");
        m.update(role);
        for n in [
            self.dialer,
            self.acceptor,
            self.dialer_epoch,
            self.acceptor_epoch,
        ] {
            m.update(&n.to_le_bytes());
        }
        m.update(&self.dialer_nonce);
        m.update(&self.acceptor_nonce);
        m
    }

    fn prove(&self, secret: &[u8], role: &[u8]) -> [u8; MAC_LEN] {
        self.hmac(secret, role).finalize().into_bytes().into()
    }

    /// Constant-time check of the other side's tag.
    fn verify(&self, secret: &[u8], role: &[u8], tag: &[u8]) -> Result<(), Refusal> {
        self.hmac(secret, role)
            .verify_slice(tag)
            .map_err(|_| Refusal::WrongSecret)
    }
}

const ROLE_DIALER: &[u8] = b"dialer";
const ROLE_ACCEPTOR: &[u8] = b"acceptor";

fn link_frame(sub: u8, body: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(1 + body.len());
    payload.push(sub);
    payload.extend_from_slice(body);
    let mut out = Vec::with_capacity(HEADER_LEN + 1 + payload.len());
    encode_frame(KIND_LINK, &payload, &mut out);
    out
}

/// The REFUSE frame an acceptor sends before closing a link after HELLO.
pub fn refuse_frame(r: &Refusal) -> Vec<u8> {
    link_frame(LINK_REFUSE, r.to_string().as_bytes())
}

/// The keepalive frame an idle dialer sends.
pub fn keepalive_frame() -> Vec<u8> {
    link_frame(LINK_KEEPALIVE, &[])
}

/// The reply to a refused HELLO (a RESP error, so a person typing it sees why).
pub fn refuse_reply(r: &Refusal) -> Vec<u8> {
    format!("-ERR PEER refused: {r}\r\n").into_bytes()
}

/// The acceptor's half, between its challenge and the dialer's proof.
#[derive(Debug, Clone)]
pub struct Accepting {
    t: Transcript,
}

impl HandshakeConfig {
    /// The acceptor's answer to a HELLO: the challenge line to send, or a refusal (send
    /// [`refuse_reply`], close). `epoch` is ours, `nonce` fresh from the OS.
    pub fn accept_hello(
        &self,
        hello: &Hello,
        epoch: u64,
        nonce: Nonce,
    ) -> Result<(Accepting, Vec<u8>), Refusal> {
        if hello.to != self.id {
            return Err(Refusal::WrongNode {
                expected: hello.to,
                actual: self.id,
            });
        }
        if hello.from == self.id {
            return Err(Refusal::OwnId(hello.from));
        }
        if !self.members.contains(&hello.from) {
            return Err(Refusal::NotMember(hello.from));
        }
        let t = Transcript {
            dialer: hello.from,
            acceptor: self.id,
            dialer_epoch: hello.epoch,
            acceptor_epoch: epoch,
            dialer_nonce: hello.nonce,
            acceptor_nonce: nonce,
        };
        let line = format!("+PEER {} {} {}\r\n", self.id, epoch, hex(&nonce)).into_bytes();
        Ok((Accepting { t }, line))
    }

    /// The dialer's opening to peer `to`: the state to keep and the bytes to send.
    pub fn dial(&self, to: u64, epoch: u64, nonce: Nonce) -> (Dialing, Vec<u8>) {
        let hello = Hello {
            from: self.id,
            to,
            epoch,
            nonce,
        };
        let bytes = hello.to_command();
        (Dialing { hello }, bytes)
    }
}

impl Accepting {
    /// The dialer's id (claimed until [`Accepting::on_proof`] succeeds).
    pub fn dialer(&self) -> u64 {
        self.t.dialer
    }

    /// The dialer's epoch, as it said in HELLO.
    pub fn dialer_epoch(&self) -> u64 {
        self.t.dialer_epoch
    }

    /// Checks the dialer's first frame, its proof. `live(id)`: whether `id` already has
    /// a live inbound link (call it under the lock that registers the new one). Ok: the
    /// WELCOME frame to send, the link is the dialer's. Err: send [`refuse_frame`], close.
    pub fn on_proof(
        &self,
        cfg: &HandshakeConfig,
        frame: &Frame,
        live: impl FnOnce(u64) -> bool,
    ) -> Result<Vec<u8>, Refusal> {
        let tag = match (frame.kind, frame.payload.split_first()) {
            (KIND_LINK, Some((&LINK_PROOF, tag))) => tag,
            _ => {
                return Err(Refusal::Malformed(
                    "the first frame is not the handshake proof".into(),
                ));
            }
        };
        self.t.verify(&cfg.secret, ROLE_DIALER, tag)?;
        // Only a node that proved the secret can be a duplicate: a stranger claiming a
        // connected id is just a wrong secret.
        if live(self.t.dialer) {
            return Err(Refusal::Duplicate(self.t.dialer));
        }
        Ok(link_frame(
            LINK_WELCOME,
            &self.t.prove(&cfg.secret, ROLE_ACCEPTOR),
        ))
    }
}

/// The dialer's half of the handshake.
#[derive(Debug, Clone)]
pub struct Dialing {
    hello: Hello,
}

/// What the dialer learned from the challenge.
#[derive(Debug, Clone)]
pub struct Challenged {
    t: Transcript,
}

impl Challenged {
    /// The acceptor's epoch, as it said in its challenge.
    pub fn peer_epoch(&self) -> u64 {
        self.t.acceptor_epoch
    }
}

impl Dialing {
    /// Reads the acceptor's challenge line from the start of `buf`. `Ok(None)`: not all
    /// here yet. `Ok(Some(..))`: the PROOF frame to send, the bytes of `buf` used, and
    /// the state for [`Challenged::on_welcome`].
    #[allow(clippy::type_complexity)]
    pub fn on_challenge(
        &self,
        cfg: &HandshakeConfig,
        buf: &[u8],
    ) -> Result<Option<(Challenged, Vec<u8>, usize)>, Refusal> {
        let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
            if buf.len() > MAX_CHALLENGE_LINE {
                return Err(Refusal::Malformed("the challenge line is too long".into()));
            }
            return Ok(None);
        };
        if end > MAX_CHALLENGE_LINE {
            return Err(Refusal::Malformed("the challenge line is too long".into()));
        }
        let line = String::from_utf8_lossy(&buf[..end]);
        if let Some(why) = line.strip_prefix("-ERR PEER refused: ") {
            return Err(Refusal::ByPeer(why.to_string()));
        }
        if let Some(err) = line.strip_prefix('-') {
            // Not a kvstore that speaks this handshake (or one without a cluster).
            return Err(Refusal::ByPeer(err.to_string()));
        }
        let bad = || Refusal::Malformed(format!("unexpected reply to PEER HELLO: {line:.80}"));
        let mut words = line.strip_prefix("+PEER ").ok_or_else(bad)?.split(' ');
        let mut num = || -> Result<u64, Refusal> {
            words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)
        };
        let (id, epoch) = (num()?, num()?);
        let nonce = words
            .next()
            .and_then(|w| unhex::<NONCE_LEN>(w.as_bytes()))
            .ok_or_else(bad)?;
        if words.next().is_some() {
            return Err(bad());
        }
        if id != self.hello.to {
            return Err(Refusal::WrongNode {
                expected: self.hello.to,
                actual: id,
            });
        }
        let t = Transcript {
            dialer: self.hello.from,
            acceptor: id,
            dialer_epoch: self.hello.epoch,
            acceptor_epoch: epoch,
            dialer_nonce: self.hello.nonce,
            acceptor_nonce: nonce,
        };
        let proof = link_frame(LINK_PROOF, &t.prove(&cfg.secret, ROLE_DIALER));
        Ok(Some((Challenged { t }, proof, end + 2)))
    }
}

impl Challenged {
    /// Checks the acceptor's answer to our proof: WELCOME with its own proof, or REFUSE.
    pub fn on_welcome(&self, cfg: &HandshakeConfig, frame: &Frame) -> Result<(), Refusal> {
        match (frame.kind, frame.payload.split_first()) {
            (KIND_LINK, Some((&LINK_WELCOME, tag))) => {
                self.t.verify(&cfg.secret, ROLE_ACCEPTOR, tag)
            }
            (KIND_LINK, Some((&LINK_REFUSE, why))) => Err(Refusal::ByPeer(
                String::from_utf8_lossy(&why[..why.len().min(512)]).into_owned(),
            )),
            _ => Err(Refusal::Malformed(
                "expected the handshake's welcome".into(),
            )),
        }
    }
}

/// What a received frame is to the inbound link.
#[derive(Debug, PartialEq, Eq)]
enum Received {
    /// The node's message.
    Message(Frame),
    /// A keepalive: nothing to deliver.
    Keepalive,
}

/// Sorts a frame received on an established link.
fn classify(frame: Frame) -> Result<Received, Refusal> {
    if frame.kind != KIND_LINK {
        return Ok(Received::Message(frame));
    }
    match frame.payload.as_slice() {
        [LINK_KEEPALIVE] => Ok(Received::Keepalive),
        _ => Err(Refusal::Malformed(
            "an unexpected link frame after the handshake".into(),
        )),
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// A fresh nonce from the OS (getrandom(2); std has no public API for it).
fn random_nonce() -> io::Result<Nonce> {
    let mut n = [0u8; NONCE_LEN];
    let mut got = 0;
    while got < n.len() {
        // SAFETY: writes at most the remaining length into our own buffer.
        let r = unsafe { libc::getrandom(n[got..].as_mut_ptr().cast(), n.len() - got, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        got += r as usize;
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------
// Links (threads and sockets)
// ---------------------------------------------------------------------------------------

/// Why a cluster member refuses a `PEER HELLO` before its peer links are attached
/// (`server.rs`): a dialer treats this refusal as it treats a closed port, a peer still
/// starting, not as a mistake to warn about at once.
pub const PEER_STARTING: &str = "this node is still starting: its peer links are not up yet";
/// How long after its start a dialer that never connected yet logs a failure to
/// connect at debug level only (its peer may be starting too); past it, or once the
/// link was up, the first such failure is a warning.
pub const STARTUP_GRACE: Duration = Duration::from_secs(5);
/// First wait before redialing a peer; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait between two dials of one peer.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long each step of a handshake (and a connect) may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Messages one peer's outbound queue holds; past it the oldest is dropped.
pub const QUEUE_MESSAGES: usize = 4096;
/// Payload bytes one peer's outbound queue holds; past it the oldest are dropped.
pub const QUEUE_BYTES: usize = 256 << 20;
/// Messages received and not yet taken by the node; past it receiving threads wait.
pub const INCOMING_MESSAGES: usize = 4096;
const READ_CHUNK: usize = 64 * 1024;
/// A dialer writes what it has queued in batches of about this size before flushing.
const WRITE_BATCH: usize = 1 << 20;

/// A message from a peer, as the node receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The id the sender proved.
    pub from: u64,
    pub kind: u8,
    pub payload: Vec<u8>,
}

/// Why [`PeerNet::send`] refused a message (nothing was queued).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    UnknownPeer(u64),
    /// [`KIND_LINK`] is the link's own.
    ReservedKind,
    TooLarge(usize),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::UnknownPeer(id) => write!(f, "no peer with id {id}"),
            SendError::ReservedKind => write!(f, "message kind {KIND_LINK} is reserved"),
            SendError::TooLarge(n) => write!(
                f,
                "a message of {n} bytes is over the peer frame limit of {MAX_PAYLOAD}"
            ),
        }
    }
}

impl std::error::Error for SendError {}

/// One direction of a link, as [`PeerNet::status`] reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStatus {
    pub connected: bool,
    /// When it last connected or disconnected.
    pub since: Option<Instant>,
    /// The remote socket address of the current (or last) connection.
    pub remote: Option<String>,
    /// Why it last closed, failed to connect or was refused (cleared when it connects).
    pub last_error: Option<String>,
}

/// One peer's links, for INFO and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub id: u64,
    /// The address we dial it at.
    pub addr: String,
    /// Our dialer's connection to it (our messages to it).
    pub outbound: LinkStatus,
    /// Its connection to us (its messages to us).
    pub inbound: LinkStatus,
    /// The epoch it reported in its last handshake.
    pub epoch: Option<u64>,
    /// Messages waiting in its outbound queue.
    pub queued: usize,
    /// Messages dropped from its full queue since start.
    pub dropped: u64,
}

struct Outbound {
    tx: Sender<(u8, Vec<u8>)>,
    /// The queue's other end, also held here so that `send` can drop the oldest.
    rx: Receiver<(u8, Vec<u8>)>,
    queued_bytes: AtomicUsize,
    dropped: AtomicU64,
}

struct Inbound {
    token: u64,
    /// A handle on the socket, to close it at shutdown.
    stream: TcpStream,
}

type EpochFn = Box<dyn Fn() -> u64 + Send + Sync>;

struct Inner {
    hs: HandshakeConfig,
    epoch: EpochFn,
    heartbeat: Duration,
    /// An inbound link that receives nothing for this long is closed.
    idle_timeout: Duration,
    addrs: HashMap<u64, String>,
    outbound: HashMap<u64, Outbound>,
    status: Mutex<HashMap<u64, PeerStatus>>,
    inbound: Mutex<HashMap<u64, Inbound>>,
    /// The dialers' current sockets, to close them at shutdown.
    dialed: Mutex<HashMap<u64, TcpStream>>,
    next_token: AtomicU64,
    incoming: Sender<Incoming>,
    stopping: AtomicBool,
    /// Dropped at shutdown: every thread waiting on it wakes.
    stop_tx: Mutex<Option<Sender<()>>>,
    stop_rx: Receiver<()>,
    /// Refusals before the secret is proved (anyone can cause them).
    unauth_log: RateLimit,
}

/// The peer links of one node: a dialer thread per configured peer, and the inbound
/// links that the server hands over. Cheap to share (`Arc` it); [`PeerNet::shutdown`]
/// (or dropping the last handle) stops the dialers and closes every link.
pub struct PeerNet {
    inner: Arc<Inner>,
}

impl fmt::Debug for PeerNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerNet")
            .field("id", &self.inner.hs.id)
            .finish_non_exhaustive()
    }
}

impl PeerNet {
    /// Starts a dialer thread per peer of `cfg`. `epoch` tells the node's current epoch
    /// (sent in handshakes). Messages from peers arrive on the returned receiver.
    pub fn start(
        cfg: &ClusterConfig,
        epoch: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> io::Result<(PeerNet, Receiver<Incoming>)> {
        if cfg.secret.is_empty() && !cfg.peers.is_empty() {
            log::warn!(
                "no --cluster-secret: any host that reaches the client port can join this \
                 cluster as a peer. Give every node the same --cluster-secret-file."
            );
        }
        let (incoming, rx) = bounded(INCOMING_MESSAGES);
        let (stop_tx, stop_rx) = bounded(0);
        let mut outbound = HashMap::new();
        let mut status = HashMap::new();
        for p in &cfg.peers {
            let (tx, rx) = bounded(QUEUE_MESSAGES);
            outbound.insert(
                p.id,
                Outbound {
                    tx,
                    rx,
                    queued_bytes: AtomicUsize::new(0),
                    dropped: AtomicU64::new(0),
                },
            );
            status.insert(
                p.id,
                PeerStatus {
                    id: p.id,
                    addr: p.addr.clone(),
                    outbound: LinkStatus::default(),
                    inbound: LinkStatus::default(),
                    epoch: None,
                    queued: 0,
                    dropped: 0,
                },
            );
        }
        let inner = Arc::new(Inner {
            hs: HandshakeConfig::from(cfg),
            epoch: Box::new(epoch),
            heartbeat: cfg.heartbeat,
            idle_timeout: cfg.failure_timeout.max(cfg.heartbeat * 3) * 2,
            addrs: cfg.peers.iter().map(|p| (p.id, p.addr.clone())).collect(),
            outbound,
            status: Mutex::new(status),
            inbound: Mutex::new(HashMap::new()),
            dialed: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
            incoming,
            stopping: AtomicBool::new(false),
            stop_tx: Mutex::new(Some(stop_tx)),
            stop_rx,
            unauth_log: RateLimit::new(Duration::from_secs(1)),
        });
        for p in &cfg.peers {
            let dialer = inner.clone();
            let id = p.id;
            let spawned = thread::Builder::new()
                .name(format!("peer-out-{id}"))
                .spawn(move || dialer.run_dialer(id));
            if let Err(e) = spawned {
                PeerNet { inner }.shutdown();
                return Err(e);
            }
        }
        Ok((PeerNet { inner }, rx))
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.inner.hs.id
    }

    /// Whether our link to peer `id` is up (it proved itself, and our messages go out).
    pub fn is_connected(&self, id: u64) -> bool {
        self.inner
            .status
            .lock()
            .get(&id)
            .is_some_and(|s| s.outbound.connected)
    }

    /// Queues a message for peer `to`. Never blocks: a full queue drops its oldest
    /// message. Ok does not mean delivered (links break; see the module doc).
    pub fn send(&self, to: u64, kind: u8, payload: Vec<u8>) -> Result<(), SendError> {
        if kind == KIND_LINK {
            return Err(SendError::ReservedKind);
        }
        if payload.len() > MAX_PAYLOAD {
            return Err(SendError::TooLarge(payload.len()));
        }
        let ob = self
            .inner
            .outbound
            .get(&to)
            .ok_or(SendError::UnknownPeer(to))?;
        let drop_oldest = || {
            if let Ok((_, old)) = ob.rx.try_recv() {
                ob.queued_bytes.fetch_sub(old.len(), Ordering::Relaxed);
                ob.dropped.fetch_add(1, Ordering::Relaxed);
            }
        };
        let len = payload.len();
        ob.queued_bytes.fetch_add(len, Ordering::Relaxed);
        let mut msg = (kind, payload);
        loop {
            match ob.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) => {
                    msg = m;
                    drop_oldest();
                }
                // The receiving end lives in `ob` itself: never disconnected.
                Err(TrySendError::Disconnected(_)) => return Ok(()),
            }
        }
        while ob.queued_bytes.load(Ordering::Relaxed) > QUEUE_BYTES && ob.rx.len() > 1 {
            drop_oldest();
        }
        Ok(())
    }

    /// Every peer's links.
    pub fn status(&self) -> Vec<PeerStatus> {
        let mut v: Vec<PeerStatus> = self.inner.status.lock().values().cloned().collect();
        for s in &mut v {
            if let Some(ob) = self.inner.outbound.get(&s.id) {
                s.queued = ob.rx.len();
                s.dropped = ob.dropped.load(Ordering::Relaxed);
            }
        }
        v.sort_by_key(|s| s.id);
        v
    }

    /// Takes over a client connection that opened with `PEER HELLO` (`server.rs`
    /// calls this on the connection's thread, with the bytes that followed the
    /// request). Finishes the handshake and, if the dialer proves itself, receives its
    /// messages until the link closes; returns then. Refusals are logged here.
    /// `on_up` runs once the dialer has proved the secret and the link is registered,
    /// before its first message is read (the server moves the connection out of its
    /// client slot there).
    pub fn accept(&self, stream: TcpStream, hello: Hello, leftover: &[u8], on_up: impl FnOnce()) {
        self.inner.accept(stream, hello, leftover, on_up);
    }

    /// Stops the dialers and closes every link (idempotent).
    pub fn shutdown(&self) {
        let inner = &self.inner;
        if inner.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        inner.stop_tx.lock().take();
        for s in inner.dialed.lock().values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        for l in inner.inbound.lock().values() {
            let _ = l.stream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for PeerNet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Why a dialed link ended or never came up.
enum DialError {
    Io(String),
    Refused(Refusal),
}

impl Inner {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn set_status(&self, id: u64, f: impl FnOnce(&mut PeerStatus)) {
        if let Some(s) = self.status.lock().get_mut(&id) {
            f(s);
        }
    }

    /// The dialer thread of peer `id`: connect, prove, send, and again after a break.
    fn run_dialer(self: Arc<Self>, id: u64) {
        let addr = self.addrs.get(&id).cloned().unwrap_or_default();
        let mut backoff = MIN_BACKOFF;
        // The last error logged at warn level: the same one again goes to debug, so a
        // peer that is down for an hour logs one line, not one a second.
        let mut last_logged: Option<String> = None;
        // Nodes started together (`kvstore cluster`, a cluster's machines booting) find
        // each other's ports closed for a moment: not worth a warning unless it lasts.
        let started = Instant::now();
        let mut ever_up = false;
        while !self.stopping() {
            match self.dial(id, &addr) {
                Ok(stream) => {
                    backoff = MIN_BACKOFF;
                    ever_up = true;
                    if last_logged.take().is_some() {
                        log::info!("peer link to node {id} at {addr} is up again");
                    } else {
                        log::info!("peer link to node {id} at {addr} is up");
                    }
                    let why = self.pump(id, &stream);
                    let _ = stream.shutdown(Shutdown::Both);
                    self.dialed.lock().remove(&id);
                    self.set_status(id, |s| {
                        s.outbound.connected = false;
                        s.outbound.since = Some(Instant::now());
                        s.outbound.last_error = Some(why.clone());
                    });
                    if self.stopping() {
                        break;
                    }
                    log::info!("peer link to node {id} at {addr} broke: {why}; reconnecting");
                }
                Err(e) => {
                    // A refusal by the other side (wrong secret, duplicate id) is a
                    // mistake to report at once; failing to connect may be a peer still
                    // starting.
                    let unreachable = match &e {
                        DialError::Io(_) => true,
                        DialError::Refused(Refusal::ByPeer(why)) => why.contains(PEER_STARTING),
                        DialError::Refused(_) => false,
                    };
                    let msg = match e {
                        DialError::Io(m) => m,
                        DialError::Refused(r) => r.to_string(),
                    };
                    self.set_status(id, |s| s.outbound.last_error = Some(msg.clone()));
                    if self.stopping() {
                        break;
                    }
                    if unreachable && !ever_up && started.elapsed() < STARTUP_GRACE {
                        log::debug!("peer link to node {id} at {addr} not up yet: {msg}");
                    } else if last_logged.as_deref() != Some(msg.as_str()) {
                        log::warn!(
                            "peer link to node {id} at {addr} failed: {msg} (retrying; further \
                             failures like this one are logged at debug level)"
                        );
                        last_logged = Some(msg);
                    } else {
                        log::debug!("peer link to node {id} at {addr} failed: {msg}");
                    }
                }
            }
            // Wait out the backoff, waking at once on shutdown.
            if self.stop_rx.recv_timeout(backoff).is_err() && self.stopping() {
                break;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        log::debug!("peer dialer for node {id} stopped");
    }

    /// Connects to peer `id` and runs the dialer's side of the handshake.
    fn dial(&self, id: u64, addr: &str) -> Result<TcpStream, DialError> {
        let io = |what: &str, e: io::Error| DialError::Io(format!("{what}: {e}"));
        // Every address the name resolves to, in turn ("localhost" may give ::1 first
        // while the node listens on 127.0.0.1 only).
        let mut last = DialError::Io("the address resolves to nothing".into());
        let mut connected = None;
        for target in addr
            .to_socket_addrs()
            .map_err(|e| io("cannot resolve the address", e))?
        {
            match TcpStream::connect_timeout(&target, HANDSHAKE_TIMEOUT) {
                Ok(s) => {
                    connected = Some(s);
                    break;
                }
                Err(e) => last = io("cannot connect", e),
            }
        }
        let stream = connected.ok_or(last)?;
        if let Ok(s) = stream.try_clone() {
            self.dialed.lock().insert(id, s);
        }
        // Shutdown may have swept `dialed` just before the insert.
        if self.stopping() {
            let _ = stream.shutdown(Shutdown::Both);
            return Err(DialError::Io("shutting down".into()));
        }
        let r = self.dial_handshake(id, &stream);
        if r.is_err() {
            let _ = stream.shutdown(Shutdown::Both);
            self.dialed.lock().remove(&id);
        }
        r.map(|()| stream)
    }

    fn dial_handshake(&self, id: u64, stream: &TcpStream) -> Result<(), DialError> {
        let io = |e: io::Error| DialError::Io(format!("handshake: {e}"));
        let eof = || DialError::Io("handshake: the connection closed".into());
        stream.set_nodelay(true).map_err(io)?;
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(io)?;
        stream
            .set_write_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(io)?;
        let mut s = stream;
        let nonce = random_nonce().map_err(io)?;
        let (dialing, hello) = self.hs.dial(id, (self.epoch)(), nonce);
        s.write_all(&hello).map_err(io)?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let (challenged, proof, used) = loop {
            if let Some(c) = dialing
                .on_challenge(&self.hs, &buf)
                .map_err(DialError::Refused)?
            {
                break c;
            }
            match s.read(&mut chunk).map_err(io)? {
                0 => return Err(eof()),
                n => buf.extend_from_slice(&chunk[..n]),
            }
        };
        s.write_all(&proof).map_err(io)?;
        let mut dec = FrameDecoder::new();
        dec.extend(&buf[used..]);
        let frame = loop {
            if let Some(f) = dec
                .next_frame()
                .map_err(|e| DialError::Refused(Refusal::Frame(e)))?
            {
                break f;
            }
            dec.check_handshake_frame().map_err(DialError::Refused)?;
            match s.read(&mut chunk).map_err(io)? {
                0 => return Err(eof()),
                n => dec.extend(&chunk[..n]),
            }
        };
        challenged
            .on_welcome(&self.hs, &frame)
            .map_err(DialError::Refused)?;
        // From here on we only write. A write that makes no progress for the idle
        // timeout means the peer is gone (or stopped): reconnect.
        stream.set_read_timeout(None).map_err(io)?;
        stream
            .set_write_timeout(Some(self.idle_timeout))
            .map_err(io)?;
        let remote = stream.peer_addr().map(|a| a.to_string()).ok();
        self.set_status(id, |st| {
            st.outbound = LinkStatus {
                connected: true,
                since: Some(Instant::now()),
                remote,
                last_error: None,
            };
            st.epoch = Some(challenged.peer_epoch());
        });
        Ok(())
    }

    /// Sends queued messages to a connected peer (a keepalive when idle) until a write
    /// fails or shutdown. Returns why it stopped.
    fn pump(&self, id: u64, stream: &TcpStream) -> String {
        let Some(ob) = self.outbound.get(&id) else {
            return "no queue".into();
        };
        let mut w = BufWriter::with_capacity(64 * 1024, stream);
        let write = |w: &mut BufWriter<&TcpStream>, kind: u8, payload: &[u8]| {
            w.write_all(&frame_header(kind, payload))?;
            w.write_all(payload)
        };
        loop {
            let r: io::Result<()> = select! {
                recv(ob.rx) -> m => {
                    let Ok((kind, payload)) = m else { return "queue closed".into() };
                    ob.queued_bytes.fetch_sub(payload.len(), Ordering::Relaxed);
                    let mut r = write(&mut w, kind, &payload);
                    // Whatever else is queued goes in the same flush.
                    let mut batch = payload.len();
                    while r.is_ok() && batch < WRITE_BATCH {
                        let Ok((kind, payload)) = ob.rx.try_recv() else { break };
                        ob.queued_bytes.fetch_sub(payload.len(), Ordering::Relaxed);
                        batch += payload.len();
                        r = write(&mut w, kind, &payload);
                    }
                    r.and_then(|()| w.flush())
                },
                recv(self.stop_rx) -> _ => return "shutting down".into(),
                default(self.heartbeat) => {
                    w.write_all(&keepalive_frame()).and_then(|()| w.flush())
                },
            };
            if let Err(e) = r {
                return format!("write failed: {e}");
            }
        }
    }

    /// The acceptor's side: handshake, then receive until the link closes.
    fn accept(&self, stream: TcpStream, hello: Hello, leftover: &[u8], on_up: impl FnOnce()) {
        let addr = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let claimed = hello.from;
        let refused = |r: &Refusal, authenticated: bool| {
            let line = format!("peer link from {addr} (claims id {claimed}) refused: {r}");
            if authenticated {
                log::warn!("{line}");
            } else if let Some(n) = self.unauth_log.check(Instant::now()) {
                log::warn!("{line}{}", suppressed_note(n));
            }
        };
        if self.stopping() {
            return;
        }
        let mut s = &stream;
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
        let _ = stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
        let nonce = match random_nonce() {
            Ok(n) => n,
            Err(e) => {
                log::error!("peer link from {addr}: no random nonce: {e}");
                return;
            }
        };
        let accepting = match self.hs.accept_hello(&hello, (self.epoch)(), nonce) {
            Ok((a, line)) => {
                if s.write_all(&line).is_err() {
                    return;
                }
                a
            }
            Err(r) => {
                let _ = s.write_all(&refuse_reply(&r));
                refused(&r, false);
                return;
            }
        };
        let mut dec = FrameDecoder::new();
        dec.extend(leftover);
        let mut chunk = vec![0u8; READ_CHUNK];
        let proof = loop {
            match dec.next_frame() {
                Ok(Some(f)) => break f,
                Ok(None) => {
                    if let Err(r) = dec.check_handshake_frame() {
                        refused(&r, false);
                        return;
                    }
                }
                Err(e) => {
                    refused(&Refusal::Frame(e), false);
                    return;
                }
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => {
                    log::debug!(
                        "peer link from {addr} (claims id {claimed}) closed during the \
                         handshake"
                    );
                    return;
                }
                Ok(n) => dec.extend(&chunk[..n]),
            }
        };
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let handle = match stream.try_clone() {
            Ok(h) => h,
            Err(e) => {
                log::error!("peer link from {addr}: cannot keep a handle on its socket: {e}");
                return;
            }
        };
        let verdict = {
            // Checked and registered under one lock: of two links proving one id at
            // once, exactly one wins.
            let mut inbound = self.inbound.lock();
            let r = accepting.on_proof(&self.hs, &proof, |id| inbound.contains_key(&id));
            if r.is_ok() {
                inbound.insert(
                    claimed,
                    Inbound {
                        token,
                        stream: handle,
                    },
                );
            }
            r
        };
        let welcome = match verdict {
            Ok(w) => w,
            Err(r) => {
                let _ = s.write_all(&refuse_frame(&r));
                // A duplicate proved the secret: always worth a line. Anything else
                // (a wrong secret, a first frame that is no proof) anyone can send.
                refused(&r, matches!(r, Refusal::Duplicate(_)));
                return;
            }
        };
        // Shutdown may have swept `inbound` before our insert.
        if self.stopping() || s.write_all(&welcome).is_err() {
            self.end_inbound(claimed, token, "closed during the handshake");
            return;
        }
        log::info!("peer link from node {claimed} at {addr} is up");
        on_up();
        self.set_status(claimed, |st| {
            st.inbound = LinkStatus {
                connected: true,
                since: Some(Instant::now()),
                remote: Some(addr.clone()),
                last_error: None,
            };
            st.epoch = Some(accepting.dialer_epoch());
        });
        let why = self.receive(claimed, &stream, dec, &mut chunk);
        let _ = stream.shutdown(Shutdown::Both);
        if self.stopping() {
            log::debug!("peer link from node {claimed} at {addr} closed: {why}");
        } else {
            log::info!("peer link from node {claimed} at {addr} closed: {why}");
        }
        self.end_inbound(claimed, token, &why);
    }

    fn end_inbound(&self, id: u64, token: u64, why: &str) {
        let mut inbound = self.inbound.lock();
        if inbound.get(&id).is_some_and(|l| l.token == token) {
            inbound.remove(&id);
            self.set_status(id, |st| {
                st.inbound.connected = false;
                st.inbound.since = Some(Instant::now());
                st.inbound.last_error = Some(why.to_string());
            });
        }
    }

    /// Hands a message to the node, waiting while its channel is full (which stops this
    /// link's reading: backpressure on the sender). False if the node is gone or we
    /// are shutting down.
    fn deliver(&self, mut msg: Incoming) -> bool {
        loop {
            match self.incoming.send_timeout(msg, self.heartbeat) {
                Ok(()) => return true,
                Err(SendTimeoutError::Timeout(m)) if !self.stopping() => msg = m,
                Err(_) => return false,
            }
        }
    }

    /// Reads frames from a proved peer and delivers them, until the link closes.
    fn receive(
        &self,
        from: u64,
        stream: &TcpStream,
        mut dec: FrameDecoder,
        chunk: &mut [u8],
    ) -> String {
        let _ = stream.set_read_timeout(Some(self.idle_timeout));
        let mut s = stream;
        loop {
            loop {
                let frame = match dec.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        let r = Refusal::Frame(e);
                        log::warn!("peer link from node {from} closed: {r}");
                        return r.to_string();
                    }
                };
                match classify(frame) {
                    Ok(Received::Keepalive) => {}
                    Ok(Received::Message(f)) => {
                        let msg = Incoming {
                            from,
                            kind: f.kind,
                            payload: f.payload,
                        };
                        if !self.deliver(msg) {
                            return "the node no longer receives".into();
                        }
                    }
                    Err(r) => {
                        log::warn!("peer link from node {from} closed: {r}");
                        return r.to_string();
                    }
                }
            }
            match s.read(chunk) {
                Ok(0) => return "the peer closed it".into(),
                Ok(n) => dec.extend(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return format!("nothing received for {} ms", self.idle_timeout.as_millis());
                }
                Err(e) => return format!("read failed: {e}"),
            }
        }
    }
}

/// The file in the data directory that remembers the ids learned by [`learn_ids`]
/// (`host:port id` per line), so a restarted node needs no peer up to rejoin.
pub const LEARNED_IDS_FILE: &str = "peer-ids";

/// Fills in the ids of peers given as plain `host:port` by a node that has its own
/// `--id` ([`crate::config::UNKNOWN_ID`]): from `dir`'s [`LEARNED_IDS_FILE`], else by
/// asking each such peer (`PEER ID` on its client port, retried until it answers; the
/// answer is only a hint: the handshake proves the id on every link). Learned ids are
/// saved. Errors name a peer whose id clashes with ours or another's.
pub fn learn_ids(cfg: &mut ClusterConfig, dir: &std::path::Path) -> Result<(), String> {
    use crate::config::UNKNOWN_ID;
    let path = dir.join(LEARNED_IDS_FILE);
    let saved: HashMap<String, u64> = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (addr, id) = l.split_once(' ')?;
            Some((addr.to_string(), id.trim().parse().ok()?))
        })
        .collect();
    let mut learned = false;
    for p in cfg.peers.iter_mut().filter(|p| p.id == UNKNOWN_ID) {
        if let Some(&id) = saved.get(&p.addr) {
            p.id = id;
            continue;
        }
        let mut backoff = MIN_BACKOFF;
        p.id = loop {
            match ask_id(&p.addr) {
                Ok(id) if id != UNKNOWN_ID => break id,
                Ok(_) => log::warn!("peer {} answered id 0", p.addr),
                Err(e) => log::info!("waiting to learn the id of peer {}: {e}", p.addr),
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        };
        log::info!("peer {} is node {}", p.addr, p.id);
        learned = true;
    }
    for (i, p) in cfg.peers.iter().enumerate() {
        if p.id == cfg.id {
            return Err(format!("peer {} has this node's own id {}", p.addr, p.id));
        }
        if let Some(q) = cfg.peers[..i].iter().find(|q| q.id == p.id) {
            return Err(format!(
                "peers {} and {} have the same id {}",
                q.addr, p.addr, p.id
            ));
        }
    }
    if learned {
        let text: String = cfg
            .peers
            .iter()
            .map(|p| format!("{} {}\n", p.addr, p.id))
            .collect();
        let tmp = dir.join(format!("{LEARNED_IDS_FILE}.tmp"));
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("cannot save {}: {e}", path.display()))?;
    }
    Ok(())
}

/// `PEER ID` on `addr`'s client port: the id it says it has.
fn ask_id(addr: &str) -> io::Result<u64> {
    use std::io::{BufRead, BufReader};
    let sa = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other("the address resolves to nothing"))?;
    let mut s = TcpStream::connect_timeout(&sa, HANDSHAKE_TIMEOUT)?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    s.write_all(b"*2\r\n$4\r\nPEER\r\n$2\r\nID\r\n")?;
    let mut line = String::new();
    BufReader::new(s.take(64)).read_line(&mut line)?;
    line.trim_end()
        .strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::other(format!("unexpected answer {line:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_frame(kind, payload, &mut v);
        v
    }

    #[test]
    fn frame_layout_is_little_endian_len_crc_kind_payload() {
        let f = frame(7, b"abc");
        assert_eq!(&f[0..4], &4u32.to_le_bytes());
        assert_eq!(
            &f[4..8],
            &crc32fast::hash(&[7, b'a', b'b', b'c']).to_le_bytes()
        );
        assert_eq!(f[8], 7);
        assert_eq!(&f[9..], b"abc");
    }

    #[test]
    fn frames_decode_at_every_truncation_point() {
        let mut stream = frame(1, b"hello");
        stream.extend(frame(2, b""));
        stream.extend(frame(255, &[0u8; 300]));
        let want = vec![
            Frame {
                kind: 1,
                payload: b"hello".to_vec(),
            },
            Frame {
                kind: 2,
                payload: vec![],
            },
            Frame {
                kind: 255,
                payload: vec![0; 300],
            },
        ];
        // Cut the stream in two at every byte: the frames come out whole and in order,
        // and nothing before the cut is returned until it is complete.
        for cut in 0..=stream.len() {
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            d.extend(&stream[..cut]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            let complete = [14usize, 23, 23 + 9 + 300]
                .iter()
                .filter(|&&end| end <= cut)
                .count();
            assert_eq!(got.len(), complete, "cut at {cut}");
            d.extend(&stream[cut..]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            assert_eq!(got, want, "cut at {cut}");
            assert_eq!(d.buffered(), 0);
        }
        // And a byte at a time.
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &stream {
            d.extend(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, want);
    }

    #[test]
    fn bad_frames_are_errors() {
        // A flipped bit anywhere after the length fails the CRC.
        let good = frame(3, b"payload");
        for i in 4..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            let mut d = FrameDecoder::new();
            d.extend(&bad);
            assert!(
                matches!(d.next_frame(), Err(FrameError::BadCrc { .. })),
                "byte {i}"
            );
        }
        // Zeros (what a torn or zero-filled buffer holds) are not a frame.
        let mut d = FrameDecoder::new();
        d.extend(&[0u8; 16]);
        assert_eq!(d.next_frame(), Err(FrameError::Empty));
        // A huge declared length is refused from the header alone, before any body.
        let mut d = FrameDecoder::new();
        let mut h = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        h.extend([0u8; 4]);
        d.extend(&h);
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge(MAX_FRAME as u32 + 1))
        );
        let mut d = FrameDecoder::new();
        d.extend(&u32::MAX.to_le_bytes());
        d.extend(&[0u8; 4]);
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge(u32::MAX)));
        assert!(
            FrameError::BadCrc {
                expected: 1,
                actual: 2
            }
            .to_string()
            .contains("CRC")
        );
    }

    #[test]
    fn a_handshake_frame_is_held_to_its_own_limit_from_the_header() {
        // Every handshake frame fits.
        for f in [
            refuse_frame(&Refusal::Malformed("x".repeat(200))),
            keepalive_frame(),
            link_frame(LINK_PROOF, &[0u8; MAC_LEN]),
        ] {
            let mut d = FrameDecoder::new();
            d.extend(&f[..HEADER_LEN]);
            assert_eq!(d.check_handshake_frame(), Ok(()));
        }
        // Nothing is known before the header is whole.
        let mut d = FrameDecoder::new();
        d.extend(&(700u32 << 20).to_le_bytes());
        assert_eq!(d.announced(), None);
        assert_eq!(d.check_handshake_frame(), Ok(()));
        // A declared length a node frame may have, but no handshake frame, is refused
        // before its body arrives.
        d.extend(&[0u8; 4]);
        assert_eq!(d.announced(), Some(700 << 20));
        assert_eq!(d.next_frame(), Ok(None));
        assert!(matches!(
            d.check_handshake_frame(),
            Err(Refusal::Malformed(m)) if m.contains("734003200 bytes")
        ));
    }

    #[test]
    fn the_largest_frame_is_awaited_and_a_large_one_handed_over_whole() {
        // A header declaring exactly MAX_FRAME is waited for (not refused), and nothing
        // is allocated for it up front.
        let mut d = FrameDecoder::new();
        let mut h = (MAX_FRAME as u32).to_le_bytes().to_vec();
        h.extend([0u8; 5]);
        d.extend(&h);
        assert_eq!(d.next_frame(), Ok(None));
        assert!(d.buf.capacity() < 1024);
        // A frame over 1 MiB that is all the buffer holds comes out without a copy,
        // and the decoder goes on with the next one.
        let big: Vec<u8> = (0..(3 << 20)).map(|i| i as u8).collect();
        let mut d = FrameDecoder::new();
        d.extend(&frame(4, &big));
        assert_eq!(
            d.next_frame(),
            Ok(Some(Frame {
                kind: 4,
                payload: big.clone()
            }))
        );
        assert_eq!(d.buffered(), 0);
        d.extend(&frame(5, b"next"));
        assert_eq!(d.next_frame().unwrap().unwrap().payload, b"next");
        // Followed by more bytes: copied out, the rest kept.
        let mut two = frame(4, &big);
        two.extend(frame(6, b"x"));
        let mut d = FrameDecoder::new();
        d.extend(&two);
        assert_eq!(d.next_frame().unwrap().unwrap().payload, big);
        assert_eq!(d.next_frame().unwrap().unwrap().kind, 6);
    }

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        let n: Nonce = std::array::from_fn(|i| (i * 37) as u8);
        assert_eq!(unhex::<NONCE_LEN>(hex(&n).as_bytes()), Some(n));
        assert_eq!(
            unhex::<NONCE_LEN>(hex(&n).to_uppercase().as_bytes()),
            Some(n)
        );
        assert_eq!(unhex::<2>(b"zz00"), None);
        assert_eq!(unhex::<2>(b"000"), None);
        assert_eq!(unhex::<2>(b"+0000"), None);
        assert_ne!(random_nonce().unwrap(), random_nonce().unwrap());
    }

    fn args(cmd: &[u8]) -> Vec<Vec<u8>> {
        // Decode our own RESP array (bulk strings only).
        let mut p = crate::protocol::RequestParser::new(crate::protocol::Limits::default());
        let (args, used) = p.parse(cmd).unwrap().unwrap();
        assert_eq!(used, cmd.len());
        args
    }

    fn cfg(id: u64, members: &[u64], secret: &str) -> HandshakeConfig {
        HandshakeConfig {
            id,
            members: members.to_vec(),
            secret: secret.as_bytes().to_vec(),
        }
    }

    const ND: Nonce = [1; NONCE_LEN];
    const NA: Nonce = [2; NONCE_LEN];

    #[test]
    fn hello_is_a_resp_command_the_server_parses() {
        let h = Hello {
            from: 3,
            to: 1,
            epoch: 42,
            nonce: ND,
        };
        let a = args(&h.to_command());
        assert!(is_peer_command(&a[0]));
        assert_eq!(a[1], b"HELLO");
        assert_eq!(a[2], b"1");
        assert_eq!(Hello::parse(&a), Ok(h));
        // Typed by hand: a clean error, no hand-over.
        let by_hand = |line: &str| -> Vec<Vec<u8>> {
            line.split(' ').map(|w| w.as_bytes().to_vec()).collect()
        };
        for line in [
            "PEER",
            "peer hello",
            "PEER HELLO 1 3 1 42",
            "PEER HELLO 1 3 1 42 abc",
            "PEER HELLO 1 x 1 42 0101",
            "PEER HELLO 1 -3 1 42 0101010101010101010101010101010101010101010101010101010101010101",
            "PEER HELLO 1 99999999999999999999999 1 42 0101010101010101010101010101010101010101010101010101010101010101",
            "PEER WHO 1 3 1 42 0101010101010101010101010101010101010101010101010101010101010101",
        ] {
            let e = Hello::parse(&by_hand(line)).unwrap_err();
            assert!(e.starts_with("ERR PEER opens a link"), "{line}: {e}");
        }
        let e = Hello::parse(&by_hand(
            "PEER HELLO 2 3 1 42 0101010101010101010101010101010101010101010101010101010101010101",
        ))
        .unwrap_err();
        assert!(e.contains("version 2 is not supported"), "{e}");
    }

    /// Runs a whole handshake between `d` (dialing `to`) and `a`; `live` is the
    /// acceptor's set of ids with a live inbound link. Returns each side's verdict.
    fn handshake(
        d: &HandshakeConfig,
        a: &HandshakeConfig,
        to: u64,
        live: &[u64],
    ) -> (Result<(), Refusal>, Result<(), Refusal>) {
        let (dialing, hello_bytes) = d.dial(to, 5, ND);
        let hello = Hello::parse(&args(&hello_bytes)).unwrap();
        let (accepting, line) = match a.accept_hello(&hello, 9, NA) {
            Ok(x) => x,
            Err(r) => {
                // The dialer reads the refusal as the reply.
                let seen = dialing.on_challenge(d, &refuse_reply(&r)).map(|_| ());
                return (seen, Err(r));
            }
        };
        // The line arrives in pieces: nothing until its end.
        assert!(dialing.on_challenge(d, &line[..10]).unwrap().is_none());
        let (challenged, proof, used) = dialing.on_challenge(d, &line).unwrap().unwrap();
        assert_eq!(used, line.len());
        assert_eq!(challenged.peer_epoch(), 9);
        let mut dec = FrameDecoder::new();
        dec.extend(&proof);
        let proof = dec.next_frame().unwrap().unwrap();
        assert_eq!(accepting.dialer_epoch(), 5);
        let answer = match accepting.on_proof(a, &proof, |id| live.contains(&id)) {
            Ok(w) => w,
            Err(r) => refuse_frame(&r),
        };
        let acceptor = accepting
            .on_proof(a, &proof, |id| live.contains(&id))
            .map(|_| ());
        let mut dec = FrameDecoder::new();
        dec.extend(&answer);
        let answer = dec.next_frame().unwrap().unwrap();
        (challenged.on_welcome(d, &answer), acceptor)
    }

    #[test]
    fn the_same_secret_proves_both_sides() {
        let (d, a) = (cfg(3, &[1, 2], "s"), cfg(1, &[2, 3], "s"));
        assert_eq!(handshake(&d, &a, 1, &[2]), (Ok(()), Ok(())));
    }

    #[test]
    fn a_wrong_secret_is_refused_by_the_acceptor() {
        let (d, a) = (cfg(3, &[1], "guess"), cfg(1, &[3], "s"));
        let (dialer, acceptor) = handshake(&d, &a, 1, &[]);
        assert_eq!(acceptor, Err(Refusal::WrongSecret));
        // The dialer learns why from the REFUSE frame.
        let Err(Refusal::ByPeer(why)) = dialer else {
            panic!("{dialer:?}")
        };
        assert!(why.starts_with("wrong cluster secret"), "{why}");
        // An empty secret is a secret like any other: it does not match one.
        let d = cfg(3, &[1], "");
        assert_eq!(handshake(&d, &a, 1, &[]).1, Err(Refusal::WrongSecret));
    }

    #[test]
    fn an_acceptor_without_the_secret_is_caught_by_the_dialer() {
        // An impostor acceptor that does not know the secret cannot make a WELCOME.
        let d = cfg(3, &[1], "s");
        let impostor = cfg(1, &[3], "other");
        let (dialing, _) = d.dial(1, 5, ND);
        let line = format!("+PEER 1 9 {}\r\n", hex(&NA));
        let (challenged, _, _) = dialing.on_challenge(&d, line.as_bytes()).unwrap().unwrap();
        let t = Transcript {
            dialer: 3,
            acceptor: 1,
            dialer_epoch: 5,
            acceptor_epoch: 9,
            dialer_nonce: ND,
            acceptor_nonce: NA,
        };
        let forged = Frame {
            kind: KIND_LINK,
            payload: [
                &[LINK_WELCOME][..],
                &t.prove(&impostor.secret, ROLE_ACCEPTOR),
            ]
            .concat(),
        };
        assert_eq!(
            challenged.on_welcome(&d, &forged),
            Err(Refusal::WrongSecret)
        );
        // Nor reflect the dialer's own proof back at it.
        let reflected = Frame {
            kind: KIND_LINK,
            payload: [&[LINK_WELCOME][..], &t.prove(&d.secret, ROLE_DIALER)].concat(),
        };
        assert_eq!(
            challenged.on_welcome(&d, &reflected),
            Err(Refusal::WrongSecret)
        );
        // The right one passes.
        let real = Frame {
            kind: KIND_LINK,
            payload: [&[LINK_WELCOME][..], &t.prove(&d.secret, ROLE_ACCEPTOR)].concat(),
        };
        assert_eq!(challenged.on_welcome(&d, &real), Ok(()));
    }

    #[test]
    fn a_proof_is_bound_to_the_ids_epochs_and_nonces() {
        let a = cfg(1, &[2, 3], "s");
        let hello = Hello {
            from: 3,
            to: 1,
            epoch: 5,
            nonce: ND,
        };
        let (accepting, _) = a.accept_hello(&hello, 9, NA).unwrap();
        let base = Transcript {
            dialer: 3,
            acceptor: 1,
            dialer_epoch: 5,
            acceptor_epoch: 9,
            dialer_nonce: ND,
            acceptor_nonce: NA,
        };
        let proof = |t: Transcript| Frame {
            kind: KIND_LINK,
            payload: [&[LINK_PROOF][..], &t.prove(b"s", ROLE_DIALER)].concat(),
        };
        assert!(accepting.on_proof(&a, &proof(base), |_| false).is_ok());
        // Change any one field and the proof no longer verifies.
        for t in [
            Transcript { dialer: 2, ..base },
            Transcript {
                acceptor: 2,
                ..base
            },
            Transcript {
                dialer_epoch: 6,
                ..base
            },
            Transcript {
                acceptor_epoch: 8,
                ..base
            },
            Transcript {
                dialer_nonce: NA,
                ..base
            },
            Transcript {
                acceptor_nonce: ND,
                ..base
            },
        ] {
            assert_eq!(
                accepting.on_proof(&a, &proof(t), |_| false),
                Err(Refusal::WrongSecret),
                "{t:?}"
            );
        }
        // A truncated or missing tag, or a frame of another kind, is no proof.
        let mut short = proof(base);
        short.payload.pop();
        assert_eq!(
            accepting.on_proof(&a, &short, |_| false),
            Err(Refusal::WrongSecret)
        );
        for f in [
            Frame {
                kind: 9,
                payload: proof(base).payload,
            },
            Frame {
                kind: KIND_LINK,
                payload: vec![],
            },
            Frame {
                kind: KIND_LINK,
                payload: vec![LINK_KEEPALIVE],
            },
        ] {
            assert!(matches!(
                accepting.on_proof(&a, &f, |_| false),
                Err(Refusal::Malformed(_))
            ));
        }
    }

    #[test]
    fn unknown_own_and_misdirected_ids_are_refused_at_hello() {
        let a = cfg(1, &[2, 3], "s");
        // Not a member.
        let (d, r) = handshake(&cfg(7, &[1], "s"), &a, 1, &[]);
        assert_eq!(r, Err(Refusal::NotMember(7)));
        assert_eq!(d, Err(Refusal::ByPeer(Refusal::NotMember(7).to_string())));
        // Our own id.
        let (_, r) = handshake(&cfg(1, &[1], "s"), &a, 1, &[]);
        assert_eq!(r, Err(Refusal::OwnId(1)));
        // Meant for node 2 (a misconfigured ID@host:port).
        let (_, r) = handshake(&cfg(3, &[2], "s"), &a, 2, &[]);
        assert_eq!(
            r,
            Err(Refusal::WrongNode {
                expected: 2,
                actual: 1
            })
        );
        // And a dialer that reaches another node than it meant says so itself.
        let (dialing, _) = cfg(3, &[2], "s").dial(2, 0, ND);
        let line = format!("+PEER 1 0 {}\r\n", hex(&NA));
        assert_eq!(
            dialing
                .on_challenge(&cfg(3, &[2], "s"), line.as_bytes())
                .unwrap_err(),
            Refusal::WrongNode {
                expected: 2,
                actual: 1
            }
        );
    }

    #[test]
    fn a_duplicate_is_refused_only_after_it_proved_the_secret() {
        let a = cfg(1, &[2, 3], "s");
        let (d, r) = handshake(&cfg(3, &[1], "s"), &a, 1, &[3]);
        assert_eq!(r, Err(Refusal::Duplicate(3)));
        let Err(Refusal::ByPeer(why)) = d else {
            panic!("{d:?}")
        };
        assert!(why.starts_with("duplicate id 3"), "{why}");
        // Without the secret, the claim of a live id is just a wrong secret.
        let (_, r) = handshake(&cfg(3, &[1], "x"), &a, 1, &[3]);
        assert_eq!(r, Err(Refusal::WrongSecret));
    }

    #[test]
    fn a_corrupt_proof_frame_fails_its_crc() {
        let a = cfg(1, &[3], "s");
        let d = cfg(3, &[1], "s");
        let (dialing, hello) = d.dial(1, 0, ND);
        let (_, line) = a
            .accept_hello(&Hello::parse(&args(&hello)).unwrap(), 0, NA)
            .unwrap();
        let (_, mut proof, _) = dialing.on_challenge(&d, &line).unwrap().unwrap();
        let last = proof.len() - 1;
        proof[last] ^= 1;
        let mut dec = FrameDecoder::new();
        dec.extend(&proof);
        let e = dec.next_frame().unwrap_err();
        assert!(matches!(e, FrameError::BadCrc { .. }));
        assert!(Refusal::Frame(e).to_string().contains("failed its CRC"));
    }

    #[test]
    fn challenge_lines_that_are_not_one() {
        let d = cfg(3, &[1], "s");
        let (dialing, _) = d.dial(1, 0, ND);
        let nonce = hex(&NA);
        for line in [
            "+OK\r\n".to_string(),
            format!("+PEER 1 x {nonce}\r\n"),
            "+PEER 1 0 abcd\r\n".to_string(),
            format!("+PEER 1 0 {nonce} extra\r\n"),
            ":1\r\n".to_string(),
        ] {
            assert!(
                matches!(
                    dialing.on_challenge(&d, line.as_bytes()),
                    Err(Refusal::Malformed(_))
                ),
                "{line}"
            );
        }
        // A server that does not know PEER (or has no cluster) answers an error.
        assert_eq!(
            dialing
                .on_challenge(&d, b"-ERR unknown command 'PEER'\r\n")
                .unwrap_err(),
            Refusal::ByPeer("ERR unknown command 'PEER'".into())
        );
        // No end of line within the limit: not a challenge.
        let long = vec![b'+'; MAX_CHALLENGE_LINE + 1];
        assert!(matches!(
            dialing.on_challenge(&d, &long),
            Err(Refusal::Malformed(_))
        ));
    }

    #[test]
    fn received_frames_are_messages_or_keepalives() {
        let f = |kind, payload: &[u8]| Frame {
            kind,
            payload: payload.to_vec(),
        };
        assert_eq!(classify(f(5, b"x")), Ok(Received::Message(f(5, b"x"))));
        assert_eq!(
            classify(f(KIND_LINK, &[LINK_KEEPALIVE])),
            Ok(Received::Keepalive)
        );
        assert!(classify(f(KIND_LINK, &[LINK_PROOF, 1])).is_err());
        let mut dec = FrameDecoder::new();
        dec.extend(&keepalive_frame());
        assert_eq!(
            classify(dec.next_frame().unwrap().unwrap()),
            Ok(Received::Keepalive)
        );
    }
}
