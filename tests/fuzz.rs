//! Property-based fuzzing of every decoder that takes bytes from outside: "no panic, and no
//! allocation sized by an unchecked length field".
//!
//! What is fuzzed (arbitrary bytes, near-valid inputs, and inputs split into random chunks):
//! - the RESP/inline request parser (`protocol::RequestParser`), `protocol::split_inline`,
//!   `protocol::peek_keys` and the reply parser (`protocol::parse_value`), including huge,
//!   negative and nested declared lengths;
//! - the node message codec (`message::decode`), plus `decode(encode(m)) == m`;
//! - the peer link: `peer::FrameDecoder`, `peer::Hello::parse`, and the handshake steps that
//!   read the other side's bytes (`Dialing::on_challenge`, `Accepting::on_proof`,
//!   `Challenged::on_welcome`);
//! - the log's in-memory decoders (`wal::read_frame`, `wal::read_batch`, `wal::decode_entry`,
//!   `wal::decode_snapshot`) and the log entry payload (`db::Command::decode`, round trip too);
//! - the snapshot transfer between nodes (`snapshot_transfer::SnapMsg::decode`, round trip,
//!   and `Reassembly` fed damaged, dropped and repeated chunks);
//! - the HTTP listener's request heads (`http::head_end`, `http::parse_head`,
//!   `Head::content_length`, `http::route`) and its percent-decoding of keys (round trip);
//! - whole data directories: a real store's segment, snapshot or meta file damaged (bytes
//!   flipped, truncated, garbage) and then `Store::open`ed: Ok (torn tail repaired) or Err.
//!
//! cargo-fuzz needs nightly; proptest runs on stable inside `cargo test`. The in-memory
//! targets run 2,000 cases and the file targets 256 by default (the whole target takes well
//! under a minute in a debug build). For more, set `PROPTEST_CASES` (the file targets run an
//! eighth of it, at least 256):
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test --release --test fuzz
//! ```
//!
//! A failing case is not saved to disk: proptest prints the shrunk input; turn it into a
//! plain `#[test]` below (as the regressions at the end are).

use kvstore::db::{Command, Condition, Expiry, Op};
use kvstore::log::LogEntry;
use kvstore::message::{self, AckResult, Body, Message, Pos, PullResult};
use kvstore::peer::{self, Frame, FrameDecoder, HandshakeConfig, Hello};
use kvstore::protocol::{self, Limits, RequestParser};
use kvstore::snapshot_transfer::{Chunk, Reassembly, SnapMsg};
use kvstore::store::{Options, Store};
use kvstore::wal::{self, FsyncPolicy};
use proptest::collection::vec;
use proptest::prelude::*;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------

/// `PROPTEST_CASES` if set, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Config of the in-memory targets (fast).
fn mem_config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(2000),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Config of the targets that write and open data directories (slow).
fn file_config() -> ProptestConfig {
    ProptestConfig {
        cases: (cases(2048) / 8).max(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Arbitrary bytes, up to `max` long.
fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=max)
}

/// Bytes biased towards RESP's alphabet, so random inputs reach past the first byte.
fn resp_ish(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        3 => any::<u8>(),
        2 => prop::sample::select(b"*$+-:_#,(!=%~>|\r\n0123456789 \"'\\".to_vec()),
    ];
    vec(byte, 0..=max)
}

/// Cuts `data` at the (sorted, deduplicated) offsets `cuts` (taken modulo its length).
fn chunks<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    at.sort_unstable();
    at.dedup();
    let mut out = Vec::new();
    let mut prev = 0;
    for c in at {
        out.push(&data[prev..c]);
        prev = c;
    }
    out.push(&data[prev..]);
    out
}

/// A mutation of a byte string: what damage looks like.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR the byte at this offset (mod len) with a non-zero mask.
    Flip(usize, u8),
    /// Set the byte at this offset (mod len).
    Set(usize, u8),
    /// Insert bytes at this offset (mod len + 1).
    Insert(usize, Vec<u8>),
    /// Remove up to n bytes from this offset (mod len).
    Remove(usize, usize),
    /// Cut the string at this offset (mod len + 1).
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1..=255u8).prop_map(|(i, m)| Mutation::Flip(i, m)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<usize>(), bytes(8)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<usize>(), 1..16usize).prop_map(|(i, n)| Mutation::Remove(i, n)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(data: &mut Vec<u8>, muts: &[Mutation]) {
    for m in muts {
        let len = data.len();
        match m {
            Mutation::Flip(i, mask) if len > 0 => data[i % len] ^= mask,
            Mutation::Set(i, b) if len > 0 => data[i % len] = *b,
            Mutation::Insert(i, b) => {
                let at = i % (len + 1);
                data.splice(at..at, b.iter().copied());
            }
            Mutation::Remove(i, n) if len > 0 => {
                let at = i % len;
                let end = (at + n).min(len);
                data.drain(at..end);
            }
            Mutation::Truncate(i) => data.truncate(i % (len + 1)),
            _ => {}
        }
    }
}

/// Declared lengths that must be refused or waited for, never allocated.
fn huge_len() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("999999999999".to_string()),
        Just("9223372036854775807".to_string()),
        Just("9223372036854775808".to_string()),
        Just("18446744073709551615".to_string()),
        Just("99999999999999999999999".to_string()),
        Just("1099511627776".to_string()),
        Just("-9223372036854775808".to_string()),
        Just("-1".to_string()),
        Just("-2".to_string()),
        Just("-0".to_string()),
        Just("00".to_string()),
        Just("+5".to_string()),
        Just("".to_string()),
        (1u64 << 20..u64::MAX).prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
    ]
}

// ---------------------------------------------------------------------------------------
// 1. RESP request parser and reply parser
// ---------------------------------------------------------------------------------------

type Requests = Vec<Vec<Vec<u8>>>;

/// Drives a parser as a connection does: append each chunk, take every whole request, drop
/// the bytes consumed, and after an incomplete parse drop what the parser releases. Checks
/// the parser's promises on the way. Returns the requests and the error, if any.
fn drive(limits: Limits, authenticated: bool, chunks: &[&[u8]]) -> (Requests, Option<String>) {
    let mut parser = RequestParser::new(limits);
    parser.set_authenticated(authenticated);
    let mut buf: Vec<u8> = Vec::new();
    let mut requests = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match parser.parse(&buf) {
                Ok(Some((args, consumed))) => {
                    assert!(!args.is_empty(), "a request with no arguments");
                    assert!(
                        consumed > 0 && consumed <= buf.len(),
                        "consumed {consumed} of {}",
                        buf.len()
                    );
                    buf.drain(..consumed);
                    requests.push(args);
                }
                Ok(None) => break,
                Err(e) => {
                    // The error must render (it is the reply sent before closing).
                    let msg = e.to_string();
                    assert!(!msg.is_empty());
                    return (requests, Some(msg));
                }
            }
        }
        let n = parser.release();
        assert!(n <= buf.len(), "released {n} of {}", buf.len());
        buf.drain(..n);
    }
    (requests, None)
}

/// Limits that let any declared length through the parser's own checks, so that only the
/// absence of length-sized allocations keeps a huge declaration from taking memory.
fn permissive() -> Limits {
    Limits {
        max_inline_len: 64 * 1024,
        max_bulk_len: usize::MAX,
        max_array_len: usize::MAX,
        max_query_buffer: usize::MAX,
    }
}

/// A valid RESP request for `args`.
fn resp_request(args: &[Vec<u8>]) -> Vec<u8> {
    let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
    let mut out = Vec::new();
    protocol::encode_command(&refs, &mut out);
    out
}

fn request_args() -> impl Strategy<Value = Vec<Vec<u8>>> {
    vec(bytes(12), 1..5)
}

proptest! {
    #![proptest_config(mem_config())]

    /// Arbitrary bytes, whole and in random chunks: the same requests, the same outcome.
    #[test]
    fn request_parser_arbitrary_bytes(
        data in prop_oneof![bytes(256), resp_ish(256)],
        cuts in vec(any::<usize>(), 0..8),
        authenticated in any::<bool>(),
    ) {
        let whole = drive(Limits::default(), authenticated, &[&data]);
        let split = drive(Limits::default(), authenticated, &chunks(&data, &cuts));
        prop_assert_eq!(&whole, &split);
        let _ = drive(permissive(), authenticated, &chunks(&data, &cuts));
        prop_assert!(protocol::peek_keys(&data).len() <= protocol::PEEK_KEYS);
        for line in data.split(|&b| b == b'\n') {
            let _ = protocol::split_inline(line);
        }
    }

    /// `peek_keys` (the key-table hint read straight off a connection's buffer): a
    /// pipeline of GETs, damaged or not, huge lengths included.
    #[test]
    fn peek_keys_near_valid(
        keys in vec(bytes(10), 0..40),
        muts in vec(mutation(), 0..3),
        len in huge_len(),
    ) {
        let mut data: Vec<u8> = keys
            .iter()
            .flat_map(|k| resp_request(&[b"GET".to_vec(), k.clone()]))
            .collect();
        if muts.is_empty() {
            let got = protocol::peek_keys(&data);
            let want: Vec<&[u8]> = keys.iter().take(protocol::PEEK_KEYS).map(Vec::as_slice).collect();
            prop_assert_eq!(got, want);
        }
        mutate(&mut data, &muts);
        let _ = protocol::peek_keys(&data);
        let mut huge = format!("*2\r\n$3\r\nGET\r\n${len}\r\nk\r\n").into_bytes();
        huge.extend_from_slice(&data);
        let _ = protocol::peek_keys(&huge);
    }

    /// Valid requests with damage, fed whole and in chunks.
    #[test]
    fn request_parser_near_valid(
        reqs in vec(request_args(), 1..4),
        muts in vec(mutation(), 0..4),
        cuts in vec(any::<usize>(), 0..8),
        authenticated in any::<bool>(),
    ) {
        let mut data: Vec<u8> = reqs.iter().flat_map(|r| resp_request(r)).collect();
        let undamaged = muts.is_empty();
        mutate(&mut data, &muts);
        let whole = drive(Limits::default(), authenticated, &[&data]);
        let split = drive(Limits::default(), authenticated, &chunks(&data, &cuts));
        prop_assert_eq!(&whole, &split);
        if undamaged && authenticated {
            prop_assert_eq!(whole, (reqs, None));
        }
    }

    /// Huge, negative and malformed declared lengths, with permissive and default limits:
    /// an error or a wait for more, quickly and without allocating the declared size.
    #[test]
    fn request_parser_huge_lengths(
        array_len in huge_len(),
        bulk_len in huge_len(),
        tail in resp_ish(64),
        cuts in vec(any::<usize>(), 0..4),
    ) {
        let start = Instant::now();
        let forms = [
            format!("*{array_len}\r\n").into_bytes(),
            format!("*2\r\n${bulk_len}\r\n").into_bytes(),
            format!("*{array_len}\r\n${bulk_len}\r\n").into_bytes(),
            format!("${bulk_len}\r\n").into_bytes(),
        ];
        for form in forms {
            let mut data = form;
            data.extend_from_slice(&tail);
            for limits in [Limits::default(), permissive()] {
                for auth in [true, false] {
                    drive(limits, auth, &[&data]);
                    drive(limits, auth, &chunks(&data, &cuts));
                }
            }
        }
        prop_assert!(start.elapsed() < Duration::from_secs(2), "slow: {:?}", start.elapsed());
    }

    /// The reply parser (what a client or proxy reads from a server): arbitrary and
    /// near-valid bytes, every prefix Ok(None) or the same answer.
    #[test]
    fn reply_parser_arbitrary_bytes(
        data in prop_oneof![bytes(256), resp_ish(256)],
    ) {
        if let Ok(Some((_, consumed))) = protocol::parse_value(&data) {
            prop_assert!(consumed > 0 && consumed <= data.len());
        }
    }

    #[test]
    fn reply_parser_huge_lengths(
        kind in prop::sample::select(b"*$%~>|=!".to_vec()),
        len in huge_len(),
        tail in resp_ish(64),
    ) {
        let start = Instant::now();
        let mut data = format!("{}{len}\r\n", kind as char).into_bytes();
        data.extend_from_slice(&tail);
        let _ = protocol::parse_value(&data);
        // Nested inside an aggregate too.
        let mut nested = b"*3\r\n:1\r\n".to_vec();
        nested.extend_from_slice(&data);
        let _ = protocol::parse_value(&nested);
        prop_assert!(start.elapsed() < Duration::from_secs(2));
    }
}

#[test]
fn request_parser_deep_nesting_and_fixed_huge_lengths() {
    let mut deep = Vec::new();
    for _ in 0..100_000 {
        deep.extend_from_slice(b"*1\r\n");
    }
    for limits in [Limits::default(), permissive()] {
        let (reqs, err) = drive(limits, true, &[&deep]);
        assert!(reqs.is_empty() && err.is_some(), "{err:?}");
    }
    // A declared length of 2^40 with limits that allow it: the parser waits, holding
    // nothing like 2^40 bytes.
    for input in [
        &b"*1099511627776\r\n"[..],
        b"*1\r\n$1099511627776\r\n",
        b"*1099511627776\r\n$1099511627776\r\nabc",
        b"*999999999999\r\n",
        b"*1\r\n$9223372036854775807\r\n",
    ] {
        let mut p = RequestParser::new(permissive());
        assert_eq!(p.parse(input), Ok(None), "{input:?}");
        assert!(p.buffered() < 1024);
        // Default limits refuse all of them.
        let (reqs, err) = drive(Limits::default(), true, &[input]);
        assert!(reqs.is_empty() && err.is_some(), "{input:?}: {err:?}");
    }
    // Negative lengths.
    assert!(drive(permissive(), true, &[b"*1\r\n$-1\r\n"]).1.is_some());
    assert_eq!(drive(permissive(), true, &[b"*-5\r\n"]), (vec![], None));
}

#[test]
fn reply_parser_deep_nesting() {
    for open in [&b"*1\r\n"[..], b"%1\r\n", b"~1\r\n", b">1\r\n", b"|1\r\n"] {
        let mut deep = Vec::new();
        for _ in 0..100_000 {
            deep.extend_from_slice(open);
        }
        assert!(protocol::parse_value(&deep).is_err(), "{open:?}");
        deep.extend_from_slice(b":1\r\n");
        assert!(protocol::parse_value(&deep).is_err(), "{open:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 2. Node message codec
// ---------------------------------------------------------------------------------------

fn pos() -> impl Strategy<Value = Pos> {
    (any::<u64>(), any::<u64>()).prop_map(|(i, e)| Pos::new(i, e))
}

/// Entries after `prev` with consecutive indexes (what the codec accepts). `prev` is kept
/// far enough from u64::MAX for the entries to fit.
fn entries_after() -> impl Strategy<Value = (Pos, Vec<LogEntry>)> {
    (
        prop_oneof![0..1000u64, any::<u64>().prop_map(|i| i / 2)],
        any::<u64>(),
        vec((any::<u64>(), bytes(24)), 0..5),
    )
        .prop_map(|(index, epoch, es)| {
            let entries = es
                .into_iter()
                .enumerate()
                .map(|(k, (epoch, payload))| LogEntry {
                    index: index + 1 + k as u64,
                    epoch,
                    payload,
                })
                .collect();
            (Pos::new(index, epoch), entries)
        })
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        Just(Body::Election),
        Just(Body::Answer),
        pos().prop_map(|last| Body::PreVote { last }),
        any::<bool>().prop_map(|granted| Body::PreVoteReply { granted }),
        pos().prop_map(|last| Body::Coordinator { last }),
        pos().prop_map(|last| Body::Accept { last }),
        prop::option::of(1..u64::MAX).prop_map(|leader| Body::Refuse { leader }),
        (any::<u64>(), any::<u64>(), pos()).prop_map(|(seq, commit, last)| Body::Heartbeat {
            seq,
            commit,
            last
        }),
        (any::<u64>(), entries_after(), any::<u64>()).prop_map(|(seq, (prev, entries), commit)| {
            Body::Append {
                seq,
                prev,
                entries,
                commit,
            }
        }),
        (any::<u64>(), 0..3u8, any::<u64>()).prop_map(|(seq, k, v)| Body::AppendAck {
            seq,
            result: match k {
                0 => AckResult::Match(v),
                1 => AckResult::Reject { hint: v },
                _ => AckResult::Diverged { commit: v },
            },
        }),
        pos().prop_map(|after| Body::Pull { after }),
        (entries_after(), pos()).prop_map(|((prev, entries), last)| Body::PullReply {
            result: PullResult::Entries {
                prev,
                entries,
                last,
            },
        }),
        any::<u64>().prop_map(|hint| Body::PullReply {
            result: PullResult::Reject { hint },
        }),
        Just(Body::PullReply {
            result: PullResult::Snapshot,
        }),
        pos().prop_map(|last| Body::Takeover { last }),
        any::<u64>().prop_map(|successor| Body::HandOver { successor }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    (any::<u64>(), body()).prop_map(|(epoch, body)| Message { epoch, body })
}

proptest! {
    #![proptest_config(mem_config())]

    #[test]
    fn message_decode_arbitrary_bytes(data in bytes(300)) {
        let _ = message::decode(&data);
    }

    #[test]
    fn message_round_trip(m in message()) {
        let bytes = message::encode(&m);
        prop_assert_eq!(message::decode(&bytes), Ok(m));
    }

    /// A valid message with damage: Ok or Err, never a panic. A count field set to a huge
    /// value is among the mutations (the `Set` of a high byte).
    #[test]
    fn message_decode_near_valid(m in message(), muts in vec(mutation(), 1..4)) {
        let mut bytes = message::encode(&m);
        mutate(&mut bytes, &muts);
        if let Ok(d) = message::decode(&bytes) {
            // Whatever decodes must encode back to the same bytes (the format has no slack).
            prop_assert_eq!(message::encode(&d), bytes);
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3. Peer frames and handshake
// ---------------------------------------------------------------------------------------

/// Feeds `chunks` to a frame decoder, taking frames as they complete. Returns the frames
/// and the error, if any.
fn decode_frames(chunks: &[&[u8]]) -> (Vec<Frame>, Option<peer::FrameError>) {
    let mut d = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    for chunk in chunks {
        d.extend(chunk);
        fed += chunk.len();
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    let _ = e.to_string();
                    return (frames, Some(e));
                }
            }
        }
        assert!(d.buffered() <= fed);
    }
    (frames, None)
}

fn cfg(id: u64, members: Vec<u64>) -> HandshakeConfig {
    HandshakeConfig {
        id,
        members,
        secret: b"fuzz secret".to_vec(),
    }
}

proptest! {
    #![proptest_config(mem_config())]

    #[test]
    fn frame_decoder_arbitrary_bytes(
        data in bytes(300),
        cuts in vec(any::<usize>(), 0..8),
    ) {
        let whole = decode_frames(&[&data]);
        let split = decode_frames(&chunks(&data, &cuts));
        prop_assert_eq!(whole, split);
    }

    /// Valid frames, damaged, whole and chunked: the same frames and outcome either way;
    /// undamaged, the frames come back. A huge declared length waits (or is refused) without
    /// allocating it.
    #[test]
    fn frame_decoder_near_valid(
        frames in vec((any::<u8>(), bytes(40)), 1..4),
        muts in vec(mutation(), 0..3),
        cuts in vec(any::<usize>(), 0..8),
    ) {
        let mut data = Vec::new();
        for (kind, payload) in &frames {
            peer::encode_frame(*kind, payload, &mut data);
        }
        let undamaged = muts.is_empty();
        mutate(&mut data, &muts);
        let whole = decode_frames(&[&data]);
        let split = decode_frames(&chunks(&data, &cuts));
        prop_assert_eq!(&whole, &split);
        if undamaged {
            let want: Vec<Frame> = frames
                .into_iter()
                .map(|(kind, payload)| Frame { kind, payload })
                .collect();
            prop_assert_eq!(whole, (want, None));
        }
    }

    #[test]
    fn frame_decoder_huge_lengths(len in any::<u32>(), rest in bytes(64)) {
        let mut data = len.to_le_bytes().to_vec();
        data.extend_from_slice(&rest);
        let start = Instant::now();
        let (frames, _) = decode_frames(&[&data]);
        prop_assert!(frames.len() <= 1);
        prop_assert!(start.elapsed() < Duration::from_secs(1));
    }

    /// `PEER HELLO …` as the request parser hands it over: arbitrary arguments, and valid
    /// ones with damage.
    #[test]
    fn hello_parse(
        args in vec(resp_ish(40), 0..9),
        from in any::<u64>(), to in any::<u64>(), epoch in any::<u64>(),
        nonce in any::<[u8; 32]>(),
        muts in vec(mutation(), 0..3),
        which in any::<usize>(),
    ) {
        let _ = Hello::parse(&args);
        let hello = Hello { from, to, epoch, nonce };
        let bytes = hello.to_command();
        let mut p = RequestParser::new(Limits::default());
        let (parsed, _) = p.parse(&bytes).unwrap().unwrap();
        prop_assert_eq!(Hello::parse(&parsed), Ok(hello));
        let mut damaged = parsed.clone();
        let i = which % damaged.len();
        mutate(&mut damaged[i], &muts);
        let _ = Hello::parse(&damaged);
    }

    /// The dialer reading the acceptor's challenge line (arbitrary and near-valid, whole
    /// and by prefixes), and both sides reading the other's proof frame.
    #[test]
    fn handshake_steps(
        line in prop_oneof![bytes(200), resp_ish(200)],
        muts in vec(mutation(), 0..3),
        epoch in any::<u64>(),
        nonce in any::<[u8; 32]>(),
        frame_kind in prop_oneof![Just(0u8), any::<u8>()],
        frame_payload in prop_oneof![
            bytes(48),
            (0..6u8, bytes(40)).prop_map(|(s, b)| { let mut v = vec![s]; v.extend(b); v }),
        ],
    ) {
        let dialer = cfg(1, vec![2, 3]);
        let acceptor = cfg(2, vec![1, 3]);
        let (dialing, hello_bytes) = dialer.dial(2, 5, [7; 32]);
        for prefix in 0..=line.len() {
            let _ = dialing.on_challenge(&dialer, &line[..prefix]);
        }
        let mut p = RequestParser::new(Limits::default());
        let (args, _) = p.parse(&hello_bytes).unwrap().unwrap();
        let hello = Hello::parse(&args).unwrap();
        let (accepting, challenge) = acceptor.accept_hello(&hello, epoch, nonce).unwrap();
        let mut damaged = challenge.clone();
        mutate(&mut damaged, &muts);
        let _ = dialing.on_challenge(&dialer, &damaged);
        let (challenged, proof, used) = dialing.on_challenge(&dialer, &challenge).unwrap().unwrap();
        prop_assert_eq!(used, challenge.len());
        let frame = Frame { kind: frame_kind, payload: frame_payload };
        let _ = accepting.on_proof(&acceptor, &frame, |_| false);
        let _ = challenged.on_welcome(&dialer, &frame);
        // The real proof, damaged as bytes on the link.
        let mut proof = proof;
        mutate(&mut proof, &muts);
        let (frames, _) = decode_frames(&[&proof]);
        for f in frames {
            let _ = accepting.on_proof(&acceptor, &f, |_| false);
            let _ = challenged.on_welcome(&dialer, &f);
        }
    }
}

// ---------------------------------------------------------------------------------------
// 4-6. The log's decoders in memory, and db::Command
// ---------------------------------------------------------------------------------------

fn small_limits() -> wal::Limits {
    wal::Limits {
        max_entry: 1 << 20,
        max_batch: 4 << 20,
    }
}

fn op(top: bool) -> BoxedStrategy<Op> {
    let expiry = prop_oneof![
        Just(Expiry::Never),
        any::<u64>().prop_map(Expiry::At),
        Just(Expiry::Keep)
    ];
    let condition = prop_oneof![
        Just(Condition::Always),
        Just(Condition::IfMissing),
        Just(Condition::IfExists)
    ];
    let leaf = prop_oneof![
        Just(Op::Noop),
        (bytes(8), bytes(8), expiry, condition, any::<bool>()).prop_map(
            |(key, value, expiry, condition, get)| Op::Set {
                key,
                value,
                expiry,
                condition,
                get
            }
        ),
        vec(bytes(8), 0..4).prop_map(|keys| Op::Del { keys }),
        (vec((bytes(6), bytes(6)), 0..4), any::<bool>()).prop_map(|(pairs, only)| Op::MSet {
            pairs,
            only_if_none_exist: only
        }),
        (bytes(8), any::<i64>()).prop_map(|(key, delta)| Op::IncrBy { key, delta }),
        vec(bytes(8), 1..4).prop_map(|args| Op::Cmd { args }),
    ];
    if top {
        prop_oneof![
            4 => leaf,
            1 => vec((any::<u32>(), op(false)), 0..4).prop_map(|ops| Op::Multi { ops }),
        ]
        .boxed()
    } else {
        leaf.boxed()
    }
}

fn command() -> impl Strategy<Value = Command> {
    (any::<u64>(), any::<u32>(), op(true)).prop_map(|(ts_ms, db, op)| Command { ts_ms, db, op })
}

/// A valid snapshot image of `keys` (db, key, value, deadline).
type SnapKey = (u32, Vec<u8>, Vec<u8>, Option<u64>);
/// A key as `wal::encode_snapshot` takes it: (key, value, deadline).
type SnapRef<'a> = (&'a [u8], &'a [u8], Option<u64>);

fn snapshot_image(index: u64, epoch: u64, keys: &[SnapKey]) -> Vec<u8> {
    let mut dbs: Vec<u32> = keys.iter().map(|k| k.0).collect();
    dbs.sort_unstable();
    dbs.dedup();
    let per_db: Vec<Vec<SnapRef<'_>>> = dbs
        .iter()
        .map(|d| {
            keys.iter()
                .filter(|k| k.0 == *d)
                .map(|k| (k.1.as_slice(), k.2.as_slice(), k.3))
                .collect()
        })
        .collect();
    let databases = dbs
        .iter()
        .zip(per_db.iter())
        .map(|(d, ks)| (*d, ks.iter().copied()))
        .collect();
    wal::encode_snapshot(index, epoch, databases)
}

fn snap_keys() -> impl Strategy<Value = Vec<SnapKey>> {
    vec(
        (0..3u32, bytes(8), bytes(8), prop::option::of(1..u64::MAX)),
        0..6,
    )
}

proptest! {
    #![proptest_config(mem_config())]

    #[test]
    fn command_decode_arbitrary_bytes(data in bytes(200)) {
        let _ = Command::decode(&data);
    }

    #[test]
    fn command_round_trip_and_damage(c in command(), muts in vec(mutation(), 0..4)) {
        let mut out = Vec::new();
        c.encode(&mut out);
        prop_assert_eq!(Command::decode(&out), Ok(c));
        mutate(&mut out, &muts);
        let _ = Command::decode(&out);
    }

    #[test]
    fn wal_frame_batch_entry_arbitrary_bytes(
        data in bytes(300),
        salt in prop_oneof![Just(0u64), any::<u64>()],
    ) {
        let _ = wal::read_frame(&data);
        let _ = wal::read_batch(&data, salt, small_limits());
        let _ = wal::read_batch(&data, salt, wal::Limits { max_entry: usize::MAX, max_batch: usize::MAX });
        let _ = wal::decode_entry(&data);
    }

    /// Snapshot images: arbitrary, and valid ones damaged (a damaged image is refused
    /// whole: every change breaks a CRC or the framing).
    #[test]
    fn snapshot_decode(
        garbage in bytes(300),
        index in any::<u64>(), epoch in any::<u64>(),
        keys in snap_keys(),
        muts in vec(mutation(), 0..4),
    ) {
        let path = Path::new("snapshot-fuzz.snap");
        let _ = wal::decode_snapshot(path, &garbage);
        let mut image = snapshot_image(index, epoch, &keys);
        let snap = wal::decode_snapshot(path, &image).expect("a valid image decodes");
        prop_assert_eq!((snap.index, snap.epoch, snap.items.len()), (index, epoch, keys.len()));
        let undamaged = image.clone();
        mutate(&mut image, &muts);
        let r = wal::decode_snapshot(path, &image);
        if image != undamaged {
            prop_assert!(r.is_err(), "damaged image accepted: {:?}", muts);
        }
    }
}

// ---------------------------------------------------------------------------------------
// 4-5. Whole data directories, damaged, then opened
// ---------------------------------------------------------------------------------------

fn options() -> Options {
    Options {
        fsync: FsyncPolicy::No,
        active_expiry: false,
        ..Options::default()
    }
}

/// The files of a real store's data directory, built once: a snapshot (after a
/// compaction), a segment with writes after it, and the meta file.
struct Template {
    files: Vec<(String, Vec<u8>)>,
}

fn template() -> &'static Template {
    static T: OnceLock<Template> = OnceLock::new();
    T.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        {
            // fsync=always, the default: batches record how far the log was synced,
            // which is what tells damage inside the log from a torn tail.
            let opts = Options {
                fsync: FsyncPolicy::Always,
                ..options()
            };
            let store = Store::open(dir.path(), opts).unwrap();
            for i in 0..20 {
                store
                    .set(format!("k{i}").as_bytes(), format!("value {i}").as_bytes())
                    .unwrap();
            }
            store.compact_now(true).unwrap();
            for i in 0..20 {
                store
                    .set(format!("after{i}").as_bytes(), &vec![b'x'; i * 3])
                    .unwrap();
            }
        }
        if !dir.path().join(wal::META_FILE).exists() {
            // A store of one writes none; a cluster node does. Start from the default.
            wal::write_meta(dir.path(), &wal::Meta::default()).unwrap();
        }
        let mut files = Vec::new();
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            if name == wal::LOCK_FILE || !e.file_type().unwrap().is_file() {
                continue;
            }
            files.push((name, std::fs::read(e.path()).unwrap()));
        }
        files.sort();
        for kind in ["wal-", "snapshot-"] {
            assert!(
                files.iter().any(|(n, _)| n.starts_with(kind)),
                "template has no {kind} file: {:?}",
                files.iter().map(|f| &f.0).collect::<Vec<_>>()
            );
        }
        Template { files }
    })
}

/// Writes the template to a fresh directory with `damage` applied to the files whose name
/// starts with `prefix` (the `which`-th of them, mod their number), then opens it.
fn open_damaged(
    prefix: &str,
    which: usize,
    damage: impl FnOnce(&mut Vec<u8>),
) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let t = template();
    let matching: Vec<usize> = (0..t.files.len())
        .filter(|&i| t.files[i].0.starts_with(prefix))
        .collect();
    let target = matching[which % matching.len()];
    let mut damage = Some(damage);
    for (i, (name, data)) in t.files.iter().enumerate() {
        let mut data = data.clone();
        if i == target {
            (damage.take().unwrap())(&mut data);
        }
        std::fs::write(dir.path().join(name), &data).unwrap();
    }
    open_dir(dir.path())
}

fn open_dir(dir: &Path) -> Result<(), String> {
    match Store::open(dir, options()) {
        Ok(store) => {
            // Whatever opened must serve reads and take a write.
            let _ = store.get(b"k1");
            store
                .set(b"fuzz", b"ok")
                .map_err(|e| format!("write after open: {e}"))?;
            Ok(())
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty());
            Err(msg)
        }
    }
}

proptest! {
    #![proptest_config(file_config())]

    #[test]
    fn store_open_damaged_segment(which in any::<usize>(), muts in vec(mutation(), 1..4)) {
        let _ = open_damaged("wal-", which, |d| mutate(d, &muts));
    }

    #[test]
    fn store_open_garbage_segment(which in any::<usize>(), garbage in prop_oneof![bytes(200), resp_ish(200)], keep in any::<usize>()) {
        let _ = open_damaged("wal-", which, |d| {
            // Garbage in place of the file, or after a valid prefix of it.
            let k = keep % (d.len() + 1);
            d.truncate(k);
            d.extend_from_slice(&garbage);
        });
    }

    #[test]
    fn store_open_damaged_snapshot(muts in vec(mutation(), 1..4)) {
        let r = open_damaged("snapshot-", 0, |d| mutate(d, &muts));
        let _ = r;
    }

    #[test]
    fn store_open_garbage_snapshot(garbage in bytes(200), keep in any::<usize>()) {
        let _ = open_damaged("snapshot-", 0, |d| {
            let k = keep % (d.len() + 1);
            d.truncate(k);
            d.extend_from_slice(&garbage);
        });
    }

    #[test]
    fn store_open_damaged_meta(muts in vec(mutation(), 1..4)) {
        let _ = open_damaged(wal::META_FILE, 0, |d| mutate(d, &muts));
    }

    /// A hand-made snapshot (valid, or damaged) in place of the template's (same index,
    /// so the template's segment follows it).
    #[test]
    fn store_open_handmade_snapshot(
        keys in snap_keys(),
        muts in vec(mutation(), 0..3),
    ) {
        let mut image = snapshot_image(template_snapshot_index(), 1, &keys);
        mutate(&mut image, &muts);
        let _ = open_damaged("snapshot-", 0, |d| *d = image);
    }
}

/// The index of the template's snapshot (from its name).
fn template_snapshot_index() -> u64 {
    let name = &template()
        .files
        .iter()
        .find(|f| f.0.starts_with("snapshot-"))
        .unwrap()
        .0;
    name["snapshot-".len()..name.len() - ".snap".len()]
        .parse()
        .unwrap()
}

/// The template itself opens, and the snapshot-only and segment-only variants do.
#[test]
fn store_open_template_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in &template().files {
        std::fs::write(dir.path().join(name), data).unwrap();
    }
    open_dir(dir.path()).unwrap();
    let store = Store::open(dir.path(), options()).unwrap();
    assert_eq!(store.get(b"k3").as_deref(), Some(&b"value 3"[..]));
    assert_eq!(store.get(b"after2").as_deref(), Some(&b"xxxxxx"[..]));
}

// ---------------------------------------------------------------------------------------
// Hand-made snapshots with lying counts
// ---------------------------------------------------------------------------------------

/// A snapshot frame (magic, length, CRC of length and payload, payload), as `wal.rs`
/// writes them.
fn snap_frame(out: &mut Vec<u8>, payload: &[u8]) {
    let len = (payload.len() as u32).to_le_bytes();
    let mut h = crc32fast::Hasher::new();
    h.update(&len);
    h.update(payload);
    out.push(wal::MAGIC);
    out.extend_from_slice(&len);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

/// A well-formed snapshot of one key whose `D` frame claims `db_count` keys.
fn snapshot_claiming(index: u64, db_count: u64) -> Vec<u8> {
    let valid = snapshot_image(index, 1, &[]);
    let mut out = valid[..8].to_vec();
    let mut m = vec![b'M'];
    m.extend_from_slice(&index.to_le_bytes());
    m.extend_from_slice(&1u64.to_le_bytes());
    m.extend_from_slice(&1u64.to_le_bytes());
    snap_frame(&mut out, &m);
    let mut d = vec![b'D'];
    d.extend_from_slice(&0u32.to_le_bytes());
    d.extend_from_slice(&db_count.to_le_bytes());
    snap_frame(&mut out, &d);
    let mut k = vec![b'K'];
    k.extend_from_slice(&0u64.to_le_bytes());
    for field in [&b"key"[..], b"value"] {
        k.extend_from_slice(&(field.len() as u32).to_le_bytes());
        k.extend_from_slice(field);
    }
    snap_frame(&mut out, &k);
    let mut e = vec![b'E'];
    e.extend_from_slice(&1u64.to_le_bytes());
    snap_frame(&mut out, &e);
    out
}

/// Found by this fuzzing, fixed in `wal.rs`: a snapshot's `D` frame claims how many keys
/// its database holds, and recovery reserved that many hash buckets (capped only at
/// 2^28), unchecked against the file's size: this ~120-byte, well-formed (CRC-valid)
/// snapshot of one key whose `D` frame says `u64::MAX` made `Store::open` allocate about
/// 2 GiB. The decoder now hands on no more than the rest of the image could hold.
#[test]
fn snapshot_with_a_huge_database_count_sizes_nothing_by_it() {
    let image = snapshot_claiming(7, u64::MAX);
    let mut counts = Vec::new();
    wal::decode_snapshot_with(Path::new("x"), &image, |part| {
        if let wal::SnapshotPart::Database { count, .. } = part {
            counts.push(count);
        }
    })
    .unwrap();
    assert_eq!(counts.len(), 1);
    assert!(
        counts[0] <= image.len() as u64 / 8,
        "a {}-byte image passed on a key count of {}",
        image.len(),
        counts[0]
    );
    // And the store opens from it, with its one key.
    let image = snapshot_claiming(template_snapshot_index(), u64::MAX);
    open_damaged("snapshot-", 0, |d| *d = image).unwrap();
}

// ---------------------------------------------------------------------------------------
// Snapshot transfer between nodes (snapshot_transfer.rs): messages and reassembly
// ---------------------------------------------------------------------------------------

fn snap_msg() -> impl Strategy<Value = SnapMsg> {
    prop_oneof![
        Just(SnapMsg::Request),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            prop::option::of(any::<u32>()),
            bytes(64)
        )
            .prop_map(
                |(index, epoch, offset, total, crc, bytes)| SnapMsg::Chunk(Chunk {
                    index,
                    epoch,
                    offset,
                    total,
                    crc,
                    bytes
                })
            ),
        (any::<u64>(), any::<u64>()).prop_map(|(index, next)| SnapMsg::Ack { index, next }),
        any::<u64>().prop_map(|index| SnapMsg::Abort { index }),
    ]
}

/// What a damaged or hostile sender may change in a chunk.
#[derive(Debug, Clone)]
enum ChunkDamage {
    Offset(u64),
    Total(u64),
    Index(u64),
    Crc(Option<u32>),
    Bytes(Vec<Mutation>),
    Drop,
    Repeat,
}

fn chunk_damage() -> impl Strategy<Value = (usize, ChunkDamage)> {
    let d = prop_oneof![
        prop_oneof![any::<u64>(), 0..300u64].prop_map(ChunkDamage::Offset),
        prop_oneof![any::<u64>(), 0..300u64].prop_map(ChunkDamage::Total),
        any::<u64>().prop_map(ChunkDamage::Index),
        prop::option::of(any::<u32>()).prop_map(ChunkDamage::Crc),
        vec(mutation(), 1..3).prop_map(ChunkDamage::Bytes),
        Just(ChunkDamage::Drop),
        Just(ChunkDamage::Repeat),
    ];
    (any::<usize>(), d)
}

proptest! {
    #![proptest_config(mem_config())]

    #[test]
    fn snap_msg_decode(data in bytes(120), m in snap_msg(), muts in vec(mutation(), 0..3)) {
        let _ = SnapMsg::decode(&data);
        let mut enc = m.encode();
        prop_assert_eq!(SnapMsg::decode(&enc), Ok(m));
        mutate(&mut enc, &muts);
        let _ = SnapMsg::decode(&enc);
    }
}

proptest! {
    #![proptest_config(file_config())]

    /// A snapshot sent in chunks, some of them damaged, dropped or repeated: the receiver
    /// gives up or returns exactly the file, never panics.
    #[test]
    fn snapshot_reassembly(
        file in vec(any::<u8>(), 1..200),
        cuts in vec(any::<usize>(), 0..6),
        damage in vec(chunk_damage(), 0..3),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let crc = crc32fast::hash(&file);
        let parts = chunks(&file, &cuts);
        let mut msgs: Vec<Chunk> = Vec::new();
        let mut offset = 0u64;
        for (i, p) in parts.iter().enumerate() {
            if p.is_empty() && i + 1 != parts.len() {
                continue;
            }
            offset += p.len() as u64;
            msgs.push(Chunk {
                index: 9,
                epoch: 2,
                offset: offset - p.len() as u64,
                total: file.len() as u64,
                crc: (offset == file.len() as u64).then_some(crc),
                bytes: p.to_vec(),
            });
        }
        let undamaged = damage.is_empty();
        for (at, d) in &damage {
            let i = at % msgs.len();
            match d {
                ChunkDamage::Offset(o) => msgs[i].offset = *o,
                ChunkDamage::Total(t) => msgs[i].total = *t,
                ChunkDamage::Index(x) => msgs[i].index = *x,
                ChunkDamage::Crc(c) => msgs[i].crc = *c,
                ChunkDamage::Bytes(m) => mutate(&mut msgs[i].bytes, m),
                ChunkDamage::Drop => {
                    msgs.remove(i);
                    if msgs.is_empty() {
                        return Ok(());
                    }
                }
                ChunkDamage::Repeat => {
                    let c = msgs[i].clone();
                    msgs.insert(i, c);
                }
            }
        }
        // Through the wire format too.
        let msgs: Vec<Chunk> = msgs
            .into_iter()
            .map(|c| match SnapMsg::decode(&SnapMsg::Chunk(c).encode()) {
                Ok(SnapMsg::Chunk(c)) => c,
                other => panic!("{other:?}"),
            })
            .collect();
        let mut it = msgs.into_iter();
        let mut got = None;
        match Reassembly::start(dir.path(), it.next().unwrap()) {
            Err(e) => prop_assert!(!undamaged, "{}", e),
            Ok((mut r, done)) => {
                got = done;
                for c in it {
                    if got.is_some() {
                        break;
                    }
                    match r.push(c) {
                        Ok(d) => got = d,
                        Err(e) => {
                            prop_assert!(!undamaged, "{}", e);
                            break;
                        }
                    }
                }
            }
        }
        if let Some(data) = &got {
            prop_assert_eq!(data, &file);
        }
        if undamaged {
            prop_assert!(got.is_some());
        }
    }
}

// ---- The HTTP listener's request head, path and query (`src/http.rs`) ----

/// Near-valid HTTP request heads: a request line of likely and unlikely pieces, then
/// header lines (Content-Length values included, huge ones too), then the blank line
/// (or not).
fn http_ish() -> impl Strategy<Value = Vec<u8>> {
    let method = prop::sample::select(vec!["GET", "PUT", "DELETE", "HEAD", "POST", "get", ""]);
    let path = prop_oneof![
        Just("/v1/kv/".to_string()),
        Just("/status".to_string()),
        Just("/metrics".to_string()),
        Just("/health?x".to_string()),
        Just("*".to_string()),
        vec(prop::sample::select(b"/v1kv%0aF2G?&=tldb ".to_vec()), 0..24)
            .prop_map(|b| format!("/v1/kv/{}", String::from_utf8_lossy(&b))),
    ];
    let version = prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/1.1 x", ""]);
    let header = prop_oneof![
        huge_len().prop_map(|n| format!("Content-Length: {n}")),
        Just("Content-Length: 5".to_string()),
        Just("Transfer-Encoding: chunked".to_string()),
        Just("Connection: close, keep-alive".to_string()),
        Just("Authorization: Bearer x".to_string()),
        Just("no colon".to_string()),
        Just(": empty name".to_string()),
        vec(any::<u8>(), 0..16).prop_map(|b| format!("X: {}", String::from_utf8_lossy(&b))),
    ];
    (
        method,
        path,
        version,
        vec(header, 0..6),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(m, p, v, hs, crlf, end)| {
            let nl = if crlf { "\r\n" } else { "\n" };
            let mut s = format!("{m} {p} {v}{nl}");
            for h in hs {
                s.push_str(&h);
                s.push_str(nl);
            }
            if end {
                s.push_str(nl);
            }
            s.into_bytes()
        })
}

/// Percent-encodes every byte (the strictest form a client may send).
fn percent_encode(key: &[u8]) -> String {
    key.iter().map(|b| format!("%{b:02X}")).collect()
}

proptest! {
    #![proptest_config(mem_config())]

    /// A head from the network, found, parsed and routed: no panic, and whatever is
    /// accepted is within the limits the rest of the listener relies on.
    #[test]
    fn http_heads_arbitrary_and_near_valid(data in prop_oneof![bytes(300), http_ish()]) {
        use kvstore::http;
        let Some(end) = http::head_end(&data) else { return Ok(()) };
        prop_assert!(end <= data.len());
        let Ok(head) = http::parse_head(&data[..end]) else { return Ok(()) };
        prop_assert!(head.headers.len() <= http::MAX_HEADERS);
        prop_assert!(!head.method.is_empty() && head.target.starts_with('/'));
        let _ = head.keep_alive();
        if let Ok(Some(n)) = head.content_length() {
            prop_assert!(head.header("transfer-encoding").is_none(), "{}", n);
        }
        if let Ok(http::Route::Kv { key, db, ttl, .. }) = http::route(&head.method, &head.target, 16) {
            prop_assert!(!key.is_empty() && db < 16);
            prop_assert!(ttl.is_none_or(|t| t > 0));
        }
    }

    /// Any key, percent-encoded, routes back to itself: the REST interface is binary-safe.
    #[test]
    fn http_keys_round_trip(key in vec(any::<u8>(), 1..64), plain in any::<bool>()) {
        use kvstore::http;
        let encoded = if plain && key.iter().all(|b| b.is_ascii_alphanumeric()) {
            String::from_utf8(key.clone()).unwrap_or_default()
        } else {
            percent_encode(&key)
        };
        prop_assert_eq!(http::percent_decode(encoded.as_bytes()), Some(key.clone()));
        let r = http::route("PUT", &format!("/v1/kv/{encoded}?ttl=7&db=3"), 16);
        prop_assert_eq!(
            r,
            Ok(http::Route::Kv { method: http::KvMethod::Put, key, db: 3, ttl: Some(7) })
        );
    }
}
