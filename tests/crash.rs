//! Crash recovery: real `kvstore` processes killed with SIGKILL in the middle of writing,
//! and data directories damaged on purpose (torn tails at every offset, zero-filled tails,
//! a flipped byte in the middle of the log), then restarted or examined with
//! `kvstore check-log`.
//!
//! The rule every test checks is the one DESIGN.md states for the log: a write whose reply
//! said it succeeded is there after recovery, with its value; a write whose connection broke
//! before the reply is *unknown* and may or may not be there, but if it is, it is whole.
//! Damage in bytes written after the last completed fsync is a torn write (truncated with a
//! warning); damage in data an fsync covered, a missing part of the log, or a log shorter
//! than the commit index recorded in `meta` is corruption (refuse to start, name the file
//! and byte offset, point to `check-log`).
//!
//! What these tests do *not* simulate: a power cut. A SIGKILL leaves the kernel's page cache
//! alone, so everything the server had `write(2)`n reaches the disk eventually whatever
//! `--fsync` says. Torn and zero-filled tails, which a power cut can leave, are produced
//! here by editing the files directly.
//!
//! The on-disk format these tests read and damage (see `src/wal.rs`): the data dir holds
//! `wal-<first index, 20 digits>.log` segments and `snapshot-<index>.snap` files; a segment
//! is a 16-byte header and then batches `0xB8 | len u32 LE | crc32 u32 LE | body`, one per
//! group commit (with one client writing, one per SET).

mod common;

use common::rng::Rng;

use common::{DataDir, KVSTORE_BIN, POLL, Server, free_port};
use redis::Value;
use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// First byte of every batch (one group commit's records) in a segment.
const MAGIC: u8 = 0xB8;
/// Bytes before the first batch of a segment (magic, version, salt).
const SEGMENT_HEADER: usize = 16;
/// Magic, length, crc.
const FRAME_HEADER: usize = 9;
/// Client threads writing at once in the kill -9 tests.
const WRITERS: usize = 4;
/// How long the writers get to reach the point where the test kills the server.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);
/// How long `check-log` or a server that must refuse to start may run.
const EXIT_DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Files of a data directory

/// Files in `dir` named `<prefix>…<suffix>`, sorted by name (the indexes in the names are
/// zero-padded, so that is index order). `.tmp` files never match.
fn files_named(dir: &Path, prefix: &str, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .filter_map(|ent| {
            let ent = ent.unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
            let name = ent.file_name().to_string_lossy().into_owned();
            (name.starts_with(prefix) && name.ends_with(suffix)).then(|| ent.path())
        })
        .collect();
    out.sort();
    out
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    files_named(dir, "wal-", ".log")
}

fn snapshots(dir: &Path) -> Vec<PathBuf> {
    files_named(dir, "snapshot-", ".snap")
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

/// The index in a `snapshot-<index>.snap` name.
fn snapshot_index(path: &Path) -> u64 {
    let name = file_name(path);
    name.strip_prefix("snapshot-")
        .and_then(|s| s.strip_suffix(".snap"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a snapshot name: {name}"))
}

/// The highest snapshot index in `dir`, 0 if there is none.
fn newest_snapshot_index(dir: &Path) -> u64 {
    snapshots(dir).last().map_or(0, |p| snapshot_index(p))
}

/// The segment appended to last.
fn newest_segment(dir: &Path) -> PathBuf {
    segments(dir)
        .pop()
        .unwrap_or_else(|| panic!("no wal-*.log segment in {}", dir.display()))
}

/// Total bytes of the files in `dir` (a file removed while we look counts as 0).
fn dir_size(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .filter_map(|ent| ent.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Copies every file of `src` into `dst` (a data directory is flat).
fn copy_dir(src: &Path, dst: &Path) {
    for ent in fs::read_dir(src).unwrap_or_else(|e| panic!("read_dir {}: {e}", src.display())) {
        let ent = ent.unwrap_or_else(|e| panic!("read_dir {}: {e}", src.display()));
        let to = dst.join(ent.file_name());
        fs::copy(ent.path(), &to)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", ent.path().display(), to.display()));
    }
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len()
}

fn truncate(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("truncate {} to {len}: {e}", path.display()));
}

fn append(path: &Path, bytes: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

/// A frame of a segment: where it starts and its whole length (header included).
#[derive(Debug, Clone, Copy)]
struct FrameAt {
    start: usize,
    len: usize,
}

impl FrameAt {
    fn payload<'a>(&self, seg: &'a [u8]) -> &'a [u8] {
        &seg[self.start + FRAME_HEADER..self.start + self.len]
    }
}

/// Splits a whole (undamaged) segment into its frames. Only the framing is read (magic and
/// length); the CRC and the payload are the server's business.
fn frames(seg: &[u8]) -> Vec<FrameAt> {
    assert!(
        seg.len() >= SEGMENT_HEADER,
        "segment shorter than its header"
    );
    let mut out = Vec::new();
    let mut pos = SEGMENT_HEADER;
    while pos < seg.len() {
        assert_eq!(seg[pos], MAGIC, "no frame magic at byte {pos}");
        assert!(
            pos + FRAME_HEADER <= seg.len(),
            "frame header at {pos} cut short"
        );
        let len = u32::from_le_bytes(seg[pos + 1..pos + 5].try_into().expect("4 bytes")) as usize;
        let end = pos + FRAME_HEADER + len;
        assert!(end <= seg.len(), "frame at {pos} runs past the end");
        out.push(FrameAt {
            start: pos,
            len: FRAME_HEADER + len,
        });
        pos = end;
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------
// Processes

/// A `kvstore` command without the developer's `KVSTORE_*` variables (as the harness does).
fn kvstore_cmd() -> Command {
    let mut cmd = Command::new(KVSTORE_BIN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("KVSTORE_") {
            cmd.env_remove(&key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// How a process that ran to its end ended.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

static RUNS: AtomicUsize = AtomicUsize::new(0);

/// Runs `cmd` until it exits, its output in files under `scratch`. Panics (after SIGKILL) if
/// it is still running after `deadline`, or as soon as `watch` reports a problem.
fn run_to_exit(
    mut cmd: Command,
    scratch: &Path,
    deadline: Duration,
    mut watch: impl FnMut() -> Option<String>,
) -> Finished {
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    let out_path = scratch.join(format!("run-{n}.stdout"));
    let err_path = scratch.join(format!("run-{n}.stderr"));
    let out = File::create(&out_path).expect("create stdout file");
    let err = File::create(&err_path).expect("create stderr file");
    cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err));
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = |p: &Path| String::from_utf8_lossy(&read(p)).into_owned();
    let end = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        let problem = watch().or_else(|| {
            (Instant::now() >= end).then(|| format!("still running after {deadline:?}"))
        });
        if let Some(problem) = problem {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?}: {problem}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                text(&out_path),
                text(&err_path)
            );
        }
        thread::sleep(POLL);
    };
    Finished {
        status,
        stdout: text(&out_path),
        stderr: text(&err_path),
    }
}

/// `kvstore check-log DIR [--repair]`.
fn check_log(dir: &DataDir, repair: bool) -> Finished {
    let mut cmd = kvstore_cmd();
    cmd.arg("check-log").arg(dir.path());
    if repair {
        cmd.arg("--repair");
    }
    run_to_exit(cmd, dir.root(), EXIT_DEADLINE, || None)
}

/// The exit code of `check-log` (panics on death by signal).
fn code(f: &Finished) -> i32 {
    f.status
        .code()
        .unwrap_or_else(|| panic!("check-log killed by a signal: {}", f.status))
}

/// Whether something on `port` answers `PING` with `+PONG`.
fn answers_ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// Starts a server that must refuse to start: waits (with a deadline) for it to exit,
/// failing if it ever answers `PING`.
fn start_expecting_refusal(dir: &DataDir, args: &[&str]) -> Finished {
    let port = free_port();
    let mut cmd = kvstore_cmd();
    cmd.arg("server")
        .arg(port.to_string())
        .arg("--data-dir")
        .arg(dir.path())
        .args(args);
    run_to_exit(cmd, dir.root(), EXIT_DEADLINE, || {
        answers_ping(port).then(|| format!("answered PING on port {port}"))
    })
}

/// SIGTERM and a clean exit.
#[track_caller]
fn terminate_ok(server: &mut Server) {
    let status = server.terminate();
    let hint = if status.signal().is_some() {
        " (the signal killed it: the graceful shutdown, with its final fsync, never ran)"
    } else {
        ""
    };
    assert!(
        status.success(),
        "kvstore exited with {status} after SIGTERM{hint}\n{}",
        server.log()
    );
}

// ---------------------------------------------------------------------------------------
// Client helpers

#[track_caller]
fn set(conn: &mut redis::Connection, key: &str, value: &str) {
    let reply: Value = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query(conn)
        .unwrap_or_else(|e| panic!("SET {key}: {e}"));
    assert_eq!(reply, Value::Okay, "reply to SET {key}");
}

/// `MGET` in chunks.
#[track_caller]
fn mget(conn: &mut redis::Connection, keys: &[String]) -> Vec<Option<String>> {
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(512) {
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(chunk)
            .query(conn)
            .unwrap_or_else(|e| panic!("MGET of {} keys: {e}", chunk.len()));
        assert_eq!(values.len(), chunk.len(), "MGET reply length");
        out.extend(values);
    }
    out
}

#[track_caller]
fn dbsize(conn: &mut redis::Connection) -> u64 {
    redis::cmd("DBSIZE")
        .query(conn)
        .unwrap_or_else(|e| panic!("DBSIZE: {e}"))
}

/// Whether an error means the connection broke (the server died): the write's outcome is
/// unknown. Anything else (an error reply, a reply of the wrong type) from a server that is
/// alive is a failure of the test.
fn is_broken_connection(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped()
}

/// Writes `k01 = v01` … `kNN = vNN` one SET at a time (one log record each).
fn write_small_keys(server: &Server, n: usize) -> Vec<(String, String)> {
    let mut conn = server.conn();
    let pairs: Vec<(String, String)> = (1..=n)
        .map(|i| (format!("k{i:02}"), format!("v{i:02}")))
        .collect();
    for (k, v) in &pairs {
        set(&mut conn, k, v);
    }
    pairs
}

/// Asserts that the first `present` pairs have their values and the rest are missing.
#[track_caller]
fn assert_prefix_present(server: &Server, pairs: &[(String, String)], present: usize, what: &str) {
    let mut conn = server.conn();
    let keys: Vec<String> = pairs.iter().map(|(k, _)| k.clone()).collect();
    let got = mget(&mut conn, &keys);
    for (i, ((k, v), g)) in pairs.iter().zip(&got).enumerate() {
        if i < present {
            assert_eq!(g.as_deref(), Some(v.as_str()), "{what}: key {k}");
        } else {
            assert_eq!(g.as_deref(), None, "{what}: key {k} should be gone");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Deterministic choices

/// Polls `f` (every millisecond: the writers move fast) until it is true or `deadline`
/// passes; returns whether it became true. Never panics, so the caller can kill the server
/// and join its writers before failing.
fn wait_for(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return f();
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Joins a writer, passing its panic on.
fn join<T>(h: thread::ScopedJoinHandle<'_, T>) -> T {
    h.join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

// ---------------------------------------------------------------------------------------
// 1, 2: acknowledged writes survive kill -9, cycle after cycle

/// What one writer thread saw in one cycle.
#[derive(Default)]
struct WriterLog {
    /// SETs answered `+OK`, in order.
    acked_sets: Vec<(String, String)>,
    /// The SET in flight when the connection broke, if it was a SET.
    unknown_set: Option<(String, String)>,
    acked_incrs: i64,
    /// The reply to the last acknowledged INCR.
    last_incr_reply: Option<i64>,
    /// INCRs in flight when the connection broke (0 or 1).
    unknown_incrs: i64,
    /// Errors other than a broken connection: always a failure.
    reply_errors: Vec<String>,
}

fn cycle_value(cycle: u64, t: usize, i: u64) -> String {
    // ~220 bytes, so the 64 KiB segments of test 1 roll over every few hundred writes.
    format!("value-c{cycle}-t{t}-{i}-{:-<200}", "")
}

/// Writes `SET c<cycle>-t<t>-<i>` and `INCR counter-t<t>` alternately as fast as the server
/// answers, until the connection breaks (the test kills the server).
fn write_until_broken(
    mut conn: redis::Connection,
    cycle: u64,
    t: usize,
    acks: &AtomicUsize,
) -> WriterLog {
    let mut log = WriterLog::default();
    let counter = format!("counter-t{t}");
    let mut i = 0u64;
    loop {
        let key = format!("c{cycle}-t{t}-{i}");
        let value = cycle_value(cycle, t, i);
        match redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .query::<Value>(&mut conn)
        {
            Ok(Value::Okay) => {
                log.acked_sets.push((key, value));
                acks.fetch_add(1, Ordering::SeqCst);
            }
            other => {
                match other {
                    Err(e) if is_broken_connection(&e) => {}
                    other => log.reply_errors.push(format!("SET {key}: {other:?}")),
                }
                log.unknown_set = Some((key, value));
                return log;
            }
        }
        match redis::cmd("INCR").arg(&counter).query::<i64>(&mut conn) {
            Ok(n) => {
                log.acked_incrs += 1;
                log.last_incr_reply = Some(n);
                acks.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                if !is_broken_connection(&e) {
                    log.reply_errors.push(format!("INCR {counter}: {e}"));
                }
                log.unknown_incrs += 1;
                return log;
            }
        }
        i += 1;
    }
}

struct KillCycles {
    fsync: &'static str,
    cycles: u64,
    /// The server is killed after 1..=this many acknowledged writes in a cycle.
    max_acks_before_kill: u64,
    extra_args: &'static [&'static str],
    /// Require that segments rolled over and a compaction ran during the run.
    require_rollover_and_compaction: bool,
}

/// Runs `cfg.cycles` cycles of: 4 writers, SIGKILL mid-stream after a few acknowledged
/// writes, restart on the same data dir and port, verify every acknowledged write. At the
/// end, verifies the whole key space once more (every key of every cycle, exactly).
fn kill9_cycles(cfg: &KillCycles) {
    let started = Instant::now();
    let dir = DataDir::new();
    let mut args = vec!["--fsync", cfg.fsync];
    args.extend_from_slice(cfg.extra_args);
    let mut server = Server::start_in(&dir, &args);

    // Every key ever written, as recovery resolved it (acknowledged: Some(value); unknown:
    // whatever the first restart after it showed, which must then never change).
    let mut expected: HashMap<String, Option<String>> = HashMap::new();
    // Each writer's counter as last observed after a restart.
    let mut counters = [0i64; WRITERS];
    let mut acked_sets_verified = 0usize;
    let mut unknown_sets_present = 0usize;
    let mut torn_tails = 0usize;
    let mut killed_mid_file = 0usize;
    let mut segments_seen = BTreeSet::new();
    let mut snapshots_seen = BTreeSet::new();

    for cycle in 0..cfg.cycles {
        let target = 1 + Rng::new(cycle).below(cfg.max_acks_before_kill) as usize;
        let acks = AtomicUsize::new(0);
        // Connect before any writer starts, so every writer is writing when the kill comes.
        let conns: Vec<redis::Connection> = (0..WRITERS).map(|_| server.conn()).collect();
        let (reached, alive_at_kill, logs) = thread::scope(|s| {
            let acks = &acks;
            let handles: Vec<_> = conns
                .into_iter()
                .enumerate()
                .map(|(t, conn)| s.spawn(move || write_until_broken(conn, cycle, t, acks)))
                .collect();
            let reached = wait_for(WRITE_DEADLINE, || {
                acks.load(Ordering::SeqCst) >= target || handles.iter().all(|h| h.is_finished())
            });
            let alive = handles.iter().filter(|h| !h.is_finished()).count();
            server.kill9();
            let logs: Vec<WriterLog> = handles.into_iter().map(join).collect();
            (
                reached && acks.load(Ordering::SeqCst) >= target,
                alive,
                logs,
            )
        });
        let reply_errors: Vec<&String> = logs.iter().flat_map(|l| &l.reply_errors).collect();
        assert!(
            reply_errors.is_empty(),
            "cycle {cycle}: the server answered writes with errors: {reply_errors:?}\n{}",
            server.log()
        );
        assert!(
            reached,
            "cycle {cycle}: the writers did not get {target} writes acknowledged within \
             {WRITE_DEADLINE:?} (got {})\n{}",
            acks.load(Ordering::SeqCst),
            server.log()
        );
        assert!(
            alive_at_kill > 0,
            "cycle {cycle}: every writer had stopped before the kill\n{}",
            server.log()
        );

        // check-log agrees with what startup will do: a torn tail at most, never corruption.
        let check = check_log(&dir, false);
        match code(&check) {
            0 => {}
            1 => torn_tails += 1,
            c => panic!(
                "cycle {cycle}: check-log after kill -9 exited {c}:\n{}",
                check.output()
            ),
        }
        segments_seen.extend(segments(dir.path()).iter().map(|p| file_name(p)));
        snapshots_seen.extend(snapshots(dir.path()).iter().map(|p| file_name(p)));
        // A new segment or snapshot half written when the kill came (startup removes it).
        if !files_named(dir.path(), "", ".tmp").is_empty() {
            killed_mid_file += 1;
        }

        server.restart();
        let mut conn = server.conn();

        // Every acknowledged SET is there, with its value; an unknown one is whole or absent.
        let mut keys: Vec<String> = Vec::new();
        for log in &logs {
            keys.extend(log.acked_sets.iter().map(|(k, _)| k.clone()));
            keys.extend(log.unknown_set.iter().map(|(k, _)| k.clone()));
        }
        let got = mget(&mut conn, &keys);
        let mut got = got.into_iter();
        for (t, log) in logs.iter().enumerate() {
            for (k, v) in &log.acked_sets {
                let g = got.next().expect("one MGET value per key");
                assert_eq!(
                    g.as_deref(),
                    Some(v.as_str()),
                    "cycle {cycle} (kill after {target} acks), writer {t}: acknowledged \
                     SET {k} lost or changed by kill -9 and recovery"
                );
                expected.insert(k.clone(), g);
                acked_sets_verified += 1;
            }
            if let Some((k, v)) = &log.unknown_set {
                let g = got.next().expect("one MGET value per key");
                if let Some(g) = &g {
                    assert_eq!(
                        g, v,
                        "cycle {cycle}: unknown SET {k} recovered with a wrong value"
                    );
                    unknown_sets_present += 1;
                }
                expected.insert(k.clone(), g);
            }
        }

        // Each counter counts every acknowledged INCR, and at most the one in flight more.
        for (t, log) in logs.iter().enumerate() {
            let key = format!("counter-t{t}");
            let value: Option<i64> = redis::cmd("GET")
                .arg(&key)
                .query(&mut conn)
                .unwrap_or_else(|e| panic!("GET {key}: {e}"));
            let value = value.unwrap_or(0);
            let lo = counters[t] + log.acked_incrs;
            let hi = lo + log.unknown_incrs;
            assert!(
                (lo..=hi).contains(&value),
                "cycle {cycle}: {key} is {value} after recovery; {} before this cycle, {} \
                 acknowledged INCRs and {} unknown since, so it must be in {lo}..={hi}",
                counters[t],
                log.acked_incrs,
                log.unknown_incrs
            );
            if let Some(last) = log.last_incr_reply {
                assert_eq!(last, lo, "cycle {cycle}: the INCR replies on {key} skipped");
            }
            counters[t] = value;
        }
    }

    // Once more, every key of every cycle, exactly as first recovered (nothing a later crash,
    // roll-over or compaction dropped or resurrected), and nothing else.
    let mut conn = server.conn();
    let keys: Vec<String> = expected.keys().cloned().collect();
    let got = mget(&mut conn, &keys);
    for (k, g) in keys.iter().zip(&got) {
        assert_eq!(g, &expected[k], "key {k} changed after a later crash");
    }
    for (t, want) in counters.iter().enumerate() {
        let got: Option<i64> = redis::cmd("GET")
            .arg(format!("counter-t{t}"))
            .query(&mut conn)
            .expect("GET counter");
        assert_eq!(
            got.unwrap_or(0),
            *want,
            "counter-t{t} changed after a later crash"
        );
    }
    let present = expected.values().filter(|v| v.is_some()).count()
        + counters.iter().filter(|&&c| c != 0).count();
    assert_eq!(dbsize(&mut conn) as usize, present, "DBSIZE");
    snapshots_seen.extend(snapshots(dir.path()).iter().map(|p| file_name(p)));
    terminate_ok(&mut server);

    if cfg.require_rollover_and_compaction {
        assert!(
            segments_seen.len() >= 2,
            "no segment rollover happened: {segments_seen:?}"
        );
        assert!(
            !snapshots_seen.is_empty(),
            "no compaction happened (no snapshot file was ever seen)"
        );
    }
    println!(
        "kill -9 cycles (--fsync {}): {} cycles in {:.1?}; {acked_sets_verified} acknowledged \
         SETs and {} INCRs verified after their crash, {} keys verified again at the end; \
         {unknown_sets_present} in-flight SETs survived; {torn_tails} torn tails; \
         {killed_mid_file} kills left a .tmp file; {} segment files and {} snapshots seen",
        cfg.fsync,
        cfg.cycles,
        started.elapsed(),
        counters.iter().sum::<i64>(),
        keys.len(),
        segments_seen.len(),
        snapshots_seen.len(),
    );
}

#[test]
fn acknowledged_writes_survive_kill9_cycles() {
    kill9_cycles(&KillCycles {
        fsync: "always",
        cycles: 100,
        max_acks_before_kill: 200,
        extra_args: &["--segment-size", "65536", "--compact-min-size", "262144"],
        require_rollover_and_compaction: true,
    });
}

// kill -9 keeps the page cache: whatever the server wrote survives even when it never
// fsync'd. So with everysec and no, nothing acknowledged may be lost either. These tests do
// not simulate a power cut (which may lose the last second under everysec, more under no).

#[test]
fn acknowledged_writes_survive_kill9_with_fsync_everysec() {
    kill9_cycles(&KillCycles {
        fsync: "everysec",
        cycles: 10,
        max_acks_before_kill: 200,
        extra_args: &["--segment-size", "65536", "--compact-min-size", "262144"],
        require_rollover_and_compaction: false,
    });
}

#[test]
fn acknowledged_writes_survive_kill9_with_fsync_no() {
    kill9_cycles(&KillCycles {
        fsync: "no",
        cycles: 10,
        max_acks_before_kill: 200,
        extra_args: &["--segment-size", "65536", "--compact-min-size", "262144"],
        require_rollover_and_compaction: false,
    });
}

// ---------------------------------------------------------------------------------------
// 3-6: damaged logs

/// A data dir holding `k01..kNN` written with `--fsync always` by a server that then exited
/// cleanly; returns the pairs, the newest segment and its last frame (the SET of kNN).
fn pristine_small_keys(dir: &DataDir, n: usize) -> (Vec<(String, String)>, PathBuf, FrameAt) {
    let mut server = Server::start_in(dir, &["--fsync", "always"]);
    let pairs = write_small_keys(&server, n);
    terminate_ok(&mut server);
    // These tests damage the last record as a crash while writing it would: such a
    // record was never recorded as committed. The clean shutdown recorded it in `meta`,
    // so remove that (a log shorter than `meta` says is refused, as it should be).
    fs::remove_file(dir.path().join("meta")).expect("the shutdown recorded the commit index");
    let seg = newest_segment(dir.path());
    let bytes = read(&seg);
    let all = frames(&bytes);
    let last = *all.last().expect("the newest segment holds records");
    let (k, v) = &pairs[n - 1];
    assert!(
        contains(last.payload(&bytes), k.as_bytes())
            && contains(last.payload(&bytes), v.as_bytes()),
        "the last record of {} is not the SET of {k} (did startup or shutdown log something?)",
        seg.display()
    );
    assert_eq!(
        last.start + last.len,
        bytes.len(),
        "segment ends after its last frame"
    );
    (pairs, seg, last)
}

/// Process-level version of the unit test in wal.rs: the last record cut at every offset,
/// from nothing of it left to all but its last byte, then a real server started on it.
#[test]
fn torn_tail_at_every_offset_recovers_earlier_records() {
    let pristine = DataDir::new();
    let (pairs, seg, last) = pristine_small_keys(&pristine, 20);
    let seg_name = file_name(&seg);
    let args = ["--fsync", "always"];
    println!(
        "torn tail: last record of {seg_name} is bytes {}..{}; one restart per cut",
        last.start,
        last.start + last.len
    );
    for cut in last.start..last.start + last.len {
        let what = format!("last record [{}, +{}) cut at {cut}", last.start, last.len);
        let dir = DataDir::new();
        copy_dir(pristine.path(), dir.path());
        let copy = dir.path().join(&seg_name);
        truncate(&copy, cut as u64);
        let torn = cut > last.start;

        // check-log sees what startup will see, and changes nothing.
        let check = check_log(&dir, false);
        assert_eq!(
            code(&check),
            if torn { 1 } else { 0 },
            "{what}: check-log\n{}",
            check.output()
        );
        assert_eq!(
            file_len(&copy),
            cut as u64,
            "{what}: check-log changed the file"
        );

        let mut server = Server::start_in(&dir, &args);
        assert_prefix_present(&server, &pairs, 19, &what);
        assert_eq!(
            server.log().contains("torn"),
            torn,
            "{what}: the server log should mention a torn write iff bytes of the record \
             remain\n{}",
            server.log()
        );
        assert_eq!(
            file_len(&copy),
            last.start as u64,
            "{what}: the torn record was not truncated away"
        );
        // The repaired log takes new writes and stays clean.
        let mut conn = server.conn();
        set(&mut conn, "k20", "again");
        drop(conn);
        terminate_ok(&mut server);
        let check = check_log(&dir, false);
        assert_eq!(
            code(&check),
            0,
            "{what}: after re-append\n{}",
            check.output()
        );
        assert!(check.stdout.contains("OK"), "{what}: {}", check.output());
    }
}

#[test]
fn zero_filled_tail_is_treated_as_torn() {
    let dir = DataDir::new();
    let (pairs, seg, _) = pristine_small_keys(&dir, 20);
    let len = file_len(&seg);
    append(&seg, &[0u8; 4096]);

    let check = check_log(&dir, false);
    assert_eq!(
        code(&check),
        1,
        "check-log on a zero-filled tail\n{}",
        check.output()
    );
    assert!(check.stdout.contains("torn"), "{}", check.output());

    let server = Server::start_in(&dir, &["--fsync", "always"]);
    assert_prefix_present(&server, &pairs, 20, "zero-filled tail");
    assert!(server.log().contains("torn"), "{}", server.log());
    assert_eq!(file_len(&seg), len, "the zeros were not truncated away");
}

#[test]
fn flipped_byte_mid_log_refuses_start_with_offset() {
    let dir = DataDir::new();
    let mut server = Server::start_in(&dir, &["--fsync", "always"]);
    write_small_keys(&server, 10);
    terminate_ok(&mut server);
    drop(server);

    let seg = newest_segment(dir.path());
    let mut bytes = read(&seg);
    let all = frames(&bytes);
    assert!(all.len() >= 10, "expected 10 records, found {}", all.len());
    let third = all[2];
    assert!(
        contains(third.payload(&bytes), b"k03"),
        "the 3rd record is not the SET of k03"
    );
    bytes[third.start + FRAME_HEADER + (third.len - FRAME_HEADER) / 2] ^= 0x20;
    fs::write(&seg, &bytes).unwrap_or_else(|e| panic!("write {}: {e}", seg.display()));
    let name = file_name(&seg);
    let offset = format!("byte offset {}", third.start);

    let run = start_expecting_refusal(&dir, &["--fsync", "always"]);
    assert!(
        !run.status.success(),
        "the server exited with {}",
        run.status
    );
    for needle in [name.as_str(), offset.as_str(), "check-log"] {
        assert!(
            run.stderr.contains(needle),
            "the refusal should mention {needle:?}; stderr:\n{}",
            run.stderr
        );
    }
    assert_eq!(read(&seg), bytes, "the refused start changed the segment");

    for repair in [false, true] {
        let check = check_log(&dir, repair);
        assert_eq!(
            code(&check),
            2,
            "check-log (repair: {repair})\n{}",
            check.output()
        );
        assert!(
            check.output().contains(&offset),
            "check-log should print {offset:?}:\n{}",
            check.output()
        );
        assert_eq!(
            read(&seg),
            bytes,
            "check-log (repair: {repair}) changed the segment"
        );
    }
}

#[test]
fn check_log_reports_and_repairs_torn_tail() {
    let dir = DataDir::new();
    let (pairs, seg, last) = pristine_small_keys(&dir, 10);
    let cut = (last.start + last.len / 2) as u64;
    truncate(&seg, cut);

    let check = check_log(&dir, false);
    assert_eq!(
        code(&check),
        1,
        "check-log on a torn tail\n{}",
        check.output()
    );
    assert!(check.stdout.contains("torn"), "{}", check.output());
    assert_eq!(
        file_len(&seg),
        cut,
        "check-log without --repair changed the file"
    );

    let repair = check_log(&dir, true);
    assert_eq!(code(&repair), 0, "check-log --repair\n{}", repair.output());
    assert!(repair.stdout.contains("repaired"), "{}", repair.output());
    assert_eq!(
        file_len(&seg),
        last.start as u64,
        "--repair did not truncate the torn record"
    );

    let again = check_log(&dir, false);
    assert_eq!(
        code(&again),
        0,
        "check-log after --repair\n{}",
        again.output()
    );
    assert!(again.stdout.contains("OK"), "{}", again.output());

    let server = Server::start_in(&dir, &["--fsync", "always"]);
    assert_prefix_present(&server, &pairs, 9, "after check-log --repair");
    assert!(
        !server.log().contains("torn"),
        "nothing torn should be left for the server\n{}",
        server.log()
    );
}

// ---------------------------------------------------------------------------------------
// 7, 8: compaction

#[test]
fn compaction_keeps_data_dir_proportional() {
    const KEYS: usize = 100;
    const ROUNDS: usize = 200;
    const BOUND: u64 = 256 * 1024;
    let dir = DataDir::new();
    let args = [
        "--fsync",
        "always",
        "--segment-size",
        "16384",
        "--compact-min-size",
        "65536",
    ];
    let mut server = Server::start_in(&dir, &args);
    let mut conn = server.conn();
    let value = |round: usize, k: usize| format!("round{round:03}-key{k:03}-{:-<80}", "");
    let keys: Vec<String> = (0..KEYS).map(|k| format!("key{k:03}")).collect();
    // One pipelined batch per round: the server commits it as one group.
    let write_round = |conn: &mut redis::Connection, round: usize| -> u64 {
        let mut pipe = redis::pipe();
        let mut bytes = 0;
        for (k, key) in keys.iter().enumerate() {
            let v = value(round, k);
            bytes += (key.len() + v.len()) as u64;
            pipe.cmd("SET").arg(key).arg(v);
        }
        let replies: Vec<Value> = pipe
            .query(conn)
            .unwrap_or_else(|e| panic!("round {round}: pipelined SETs: {e}"));
        assert!(
            replies.len() == KEYS && replies.iter().all(|r| *r == Value::Okay),
            "round {round}: replies {replies:?}"
        );
        bytes
    };
    let written: u64 = (0..ROUNDS).map(|round| write_round(&mut conn, round)).sum();
    assert!(
        written > 4 * BOUND,
        "the test writes too little to mean anything"
    );

    let mut last_size = 0;
    common::wait_until(
        Duration::from_secs(30),
        "a snapshot and a data dir below 256 KiB",
        || {
            last_size = dir_size(dir.path());
            !snapshots(dir.path()).is_empty() && last_size < BOUND
        },
    );
    println!(
        "compaction: {written} bytes of keys and values written, data dir now {last_size} \
         bytes ({} segments, {} snapshots)",
        segments(dir.path()).len(),
        snapshots(dir.path()).len()
    );

    // One more round on top of the compacted log: the segment after the snapshot must
    // keep it too.
    write_round(&mut conn, ROUNDS);
    drop(conn);
    terminate_ok(&mut server);
    // A clean stop waits for a running compaction: one snapshot remains, no temp files.
    let names: Vec<String> = fs::read_dir(dir.path())
        .expect("read data dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(
        snapshots(dir.path()).len(),
        1,
        "after a clean stop: {names:?}"
    );
    assert!(
        !names.iter().any(|n| n.ends_with(".tmp")),
        "after a clean stop: {names:?}"
    );
    server.restart();
    let mut conn = server.conn();
    let got = mget(&mut conn, &keys);
    for (k, g) in got.iter().enumerate() {
        assert_eq!(
            g.as_deref(),
            Some(value(ROUNDS, k).as_str()),
            "key{k:03} after restart"
        );
    }
    assert_eq!(dbsize(&mut conn), KEYS as u64, "DBSIZE after restart");
    assert!(dir_size(dir.path()) < BOUND, "data dir grew on restart");
}

/// One write of the mixed workload.
#[derive(Debug, Clone)]
enum MixOp {
    Set(String, String),
    Del(String),
    IncrBy(String, i64),
    MSet(Vec<(String, String)>),
}

/// Keys of one writer of the mixed workload.
const MIX_KEYS: usize = 12;

fn mix_key(t: usize, j: usize) -> String {
    format!("mix-t{t}-k{j}")
}

fn mix_counter(t: usize) -> String {
    format!("mix-t{t}-n")
}

/// Every key a writer owns.
fn mix_keys(t: usize) -> Vec<String> {
    (0..MIX_KEYS)
        .map(|j| mix_key(t, j))
        .chain(std::iter::once(mix_counter(t)))
        .collect()
}

type Model = HashMap<String, Option<String>>;

impl MixOp {
    fn random(rng: &mut Rng, t: usize, seq: u64) -> MixOp {
        let key = |rng: &mut Rng| mix_key(t, rng.below(MIX_KEYS as u64) as usize);
        let value = |tag: &str| format!("{tag}-t{t}-{seq}-{:-<60}", "");
        match rng.below(20) {
            0..=9 => MixOp::Set(key(rng), value("set")),
            10..=12 => MixOp::Del(key(rng)),
            13..=16 => MixOp::IncrBy(mix_counter(t), rng.below(1000) as i64 - 300),
            _ => {
                // Two different keys.
                let a = rng.below(MIX_KEYS as u64) as usize;
                let b = (a + 1 + rng.below(MIX_KEYS as u64 - 1) as usize) % MIX_KEYS;
                MixOp::MSet(vec![
                    (mix_key(t, a), value("mset-a")),
                    (mix_key(t, b), value("mset-b")),
                ])
            }
        }
    }

    /// The keys it writes and their values afterwards, given the model before it.
    fn effect(&self, model: &Model) -> Vec<(String, Option<String>)> {
        match self {
            MixOp::Set(k, v) => vec![(k.clone(), Some(v.clone()))],
            MixOp::Del(k) => vec![(k.clone(), None)],
            MixOp::IncrBy(k, d) => {
                let cur: i64 = model[k]
                    .as_deref()
                    .map_or(0, |s| s.parse().expect("integer"));
                vec![(k.clone(), Some((cur + d).to_string()))]
            }
            MixOp::MSet(pairs) => pairs
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone())))
                .collect(),
        }
    }

    /// Sends it; Ok(true) if the reply is what the model predicts, Err on a broken
    /// connection or an error reply.
    fn send(&self, conn: &mut redis::Connection, model: &Model) -> Result<bool, redis::RedisError> {
        Ok(match self {
            MixOp::Set(k, v) => {
                redis::cmd("SET").arg(k).arg(v).query::<Value>(conn)? == Value::Okay
            }
            MixOp::Del(k) => {
                redis::cmd("DEL").arg(k).query::<i64>(conn)? == i64::from(model[k].is_some())
            }
            MixOp::IncrBy(k, d) => {
                let want = self.effect(model)[0].1.clone();
                Some(
                    redis::cmd("INCRBY")
                        .arg(k)
                        .arg(*d)
                        .query::<i64>(conn)?
                        .to_string(),
                ) == want
            }
            MixOp::MSet(pairs) => {
                let mut cmd = redis::cmd("MSET");
                for (k, v) in pairs {
                    cmd.arg(k).arg(v);
                }
                cmd.query::<Value>(conn)? == Value::Okay
            }
        })
    }
}

/// What one writer of the mixed workload saw.
struct MixLog {
    /// Its keys after every acknowledged write.
    model: Model,
    /// The write in flight when the connection broke.
    unknown: Option<MixOp>,
    problems: Vec<String>,
}

fn mix_writer(
    mut conn: redis::Connection,
    mut model: Model,
    round: u64,
    t: usize,
    acks: &AtomicUsize,
) -> MixLog {
    let mut rng = Rng::new(round * 1000 + t as u64);
    let mut problems = Vec::new();
    for seq in 0.. {
        let op = MixOp::random(&mut rng, t, seq);
        match op.send(&mut conn, &model) {
            Ok(ok) => {
                if !ok {
                    problems.push(format!("reply to {op:?} disagrees with the model"));
                }
                for (k, v) in op.effect(&model) {
                    model.insert(k, v);
                }
                acks.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                if !is_broken_connection(&e) {
                    problems.push(format!("{op:?}: {e}"));
                }
                return MixLog {
                    model,
                    unknown: Some(op),
                    problems,
                };
            }
        }
    }
    unreachable!("a writer only stops on a broken connection")
}

/// Checks every writer's keys against its model (the write in flight at the crash applied
/// whole or not at all) and returns the models as recovered.
fn verify_mix(server: &Server, logs: Vec<MixLog>, when: &str) -> Vec<Model> {
    let mut conn = server.conn();
    let mut models = Vec::new();
    for (t, log) in logs.into_iter().enumerate() {
        let keys = mix_keys(t);
        let got: Model = keys.iter().cloned().zip(mget(&mut conn, &keys)).collect();
        let after: Model = log
            .unknown
            .as_ref()
            .map(|op| op.effect(&log.model).into_iter().collect())
            .unwrap_or_default();
        let untouched = keys.iter().filter(|k| !after.contains_key(*k));
        for k in untouched {
            assert_eq!(got[k], log.model[k], "{when}: writer {t}, key {k}");
        }
        if !after.is_empty() {
            let applied = after.iter().all(|(k, v)| got[k] == *v);
            let not_applied = after.keys().all(|k| got[k] == log.model[k]);
            assert!(
                applied || not_applied,
                "{when}: writer {t}: the write in flight, {:?}, was applied in part: {:?}",
                log.unknown,
                after.keys().map(|k| (k, &got[k])).collect::<Vec<_>>()
            );
        }
        models.push(got);
    }
    models
}

#[test]
fn everything_survives_restart_after_compaction_and_kill9() {
    const ROUNDS: u64 = 6;
    let dir = DataDir::new();
    let args = [
        "--fsync",
        "always",
        "--segment-size",
        "16384",
        "--compact-min-size",
        "65536",
    ];
    let mut server = Server::start_in(&dir, &args);
    let mut models: Vec<Model> = (0..WRITERS)
        .map(|t| mix_keys(t).into_iter().map(|k| (k, None)).collect())
        .collect();
    let mut total_acks = 0;
    for round in 0..ROUNDS {
        let snap_before = newest_snapshot_index(dir.path());
        let extra = 1 + Rng::new(round + 7777).below(300) as usize;
        let acks = AtomicUsize::new(0);
        let conns: Vec<redis::Connection> = (0..WRITERS).map(|_| server.conn()).collect();
        let (compacted, reached, logs) = thread::scope(|s| {
            let acks = &acks;
            let handles: Vec<_> = conns
                .into_iter()
                .zip(models.drain(..))
                .enumerate()
                .map(|(t, (conn, model))| s.spawn(move || mix_writer(conn, model, round, t, acks)))
                .collect();
            let all_done =
                |hs: &[thread::ScopedJoinHandle<'_, MixLog>]| hs.iter().all(|h| h.is_finished());
            // Write until a compaction has completed in this round, then some more, then
            // kill mid-stream (perhaps during the next compaction).
            let compacted = wait_for(WRITE_DEADLINE, || {
                newest_snapshot_index(dir.path()) > snap_before || all_done(&handles)
            }) && newest_snapshot_index(dir.path()) > snap_before;
            let target = acks.load(Ordering::SeqCst) + extra;
            let reached = compacted
                && wait_for(WRITE_DEADLINE, || {
                    acks.load(Ordering::SeqCst) >= target || all_done(&handles)
                })
                && !all_done(&handles);
            server.kill9();
            let logs: Vec<MixLog> = handles.into_iter().map(join).collect();
            (compacted, reached, logs)
        });
        total_acks += acks.load(Ordering::SeqCst);
        let problems: Vec<&String> = logs.iter().flat_map(|l| &l.problems).collect();
        assert!(
            problems.is_empty(),
            "round {round}: {problems:?}\n{}",
            server.log()
        );
        assert!(
            compacted,
            "round {round}: no new snapshot within {WRITE_DEADLINE:?} of writing\n{}",
            server.log()
        );
        assert!(
            reached,
            "round {round}: writers stopped before the kill\n{}",
            server.log()
        );
        let check = check_log(&dir, false);
        assert!(
            matches!(code(&check), 0 | 1),
            "round {round}: check-log after kill -9\n{}",
            check.output()
        );
        server.restart();
        models = verify_mix(&server, logs, &format!("round {round} after kill -9"));
    }

    // A clean stop and start changes nothing.
    terminate_ok(&mut server);
    let check = check_log(&dir, false);
    assert_eq!(
        code(&check),
        0,
        "check-log after a clean stop\n{}",
        check.output()
    );
    server.restart();
    let logs = models
        .into_iter()
        .map(|model| MixLog {
            model,
            unknown: None,
            problems: Vec::new(),
        })
        .collect();
    verify_mix(&server, logs, "after a clean restart");
    println!(
        "mixed workload: {ROUNDS} rounds of compaction then kill -9, {total_acks} acknowledged \
         writes; newest snapshot at index {}",
        newest_snapshot_index(dir.path())
    );
}

// ---------------------------------------------------------------------------------------
// One process per data directory

/// A second server, or the repl, on a directory a running server has open is refused
/// with the holder's pid, and nothing it could have written is lost; `check-log` still
/// reads the live directory, `--repair` (which writes) is refused.
#[test]
fn a_data_directory_is_opened_by_one_process_at_a_time() {
    let dir = DataDir::new();
    let mut server = Server::start_in(&dir, &["--fsync", "always"]);
    let pairs = write_small_keys(&server, 5);
    let pid = format!("pid {}", server.pid());

    let second = start_expecting_refusal(&dir, &["--fsync", "always"]);
    assert!(!second.status.success(), "second server: {}", second.status);
    for needle in ["in use by another kvstore process", pid.as_str()] {
        assert!(
            second.stderr.contains(needle),
            "the refusal should mention {needle:?}; stderr:\n{}",
            second.stderr
        );
    }
    assert!(
        second.stderr.contains(&dir.path().display().to_string()),
        "the refusal should name the directory:\n{}",
        second.stderr
    );

    let mut repl = kvstore_cmd();
    repl.arg("repl").arg("--data-dir").arg(dir.path());
    let repl = run_to_exit(repl, dir.root(), EXIT_DEADLINE, || None);
    assert!(!repl.status.success(), "repl: {}", repl.output());
    assert!(repl.output().contains(&pid), "repl: {}", repl.output());

    let check = check_log(&dir, false);
    assert_eq!(
        code(&check),
        0,
        "check-log on a live dir\n{}",
        check.output()
    );
    let repair = check_log(&dir, true);
    assert_ne!(
        code(&repair),
        0,
        "--repair on a live dir\n{}",
        repair.output()
    );
    assert!(repair.output().contains(&pid), "{}", repair.output());

    // The first server never noticed, and everything it acknowledged survives.
    let mut conn = server.conn();
    set(&mut conn, "after", "1");
    drop(conn);
    server.kill9();
    let server = Server::start_in(&dir, &["--fsync", "always"]);
    assert_prefix_present(&server, &pairs, 5, "after the refused openers");
}

/// The end of the log removed or cut short is refused, not replayed short: the segment
/// after a snapshot missing, or the last segment cut to its header below the commit index
/// recorded at shutdown.
#[test]
fn a_missing_end_of_the_log_is_refused() {
    // Cut to its header after a clean shutdown.
    let dir = DataDir::new();
    let mut server = Server::start_in(&dir, &["--fsync", "always"]);
    write_small_keys(&server, 10);
    terminate_ok(&mut server);
    let seg = newest_segment(dir.path());
    truncate(&seg, SEGMENT_HEADER as u64);
    let run = start_expecting_refusal(&dir, &["--fsync", "always"]);
    assert!(
        run.stderr.contains("was committed"),
        "a log cut to its header:\n{}",
        run.stderr
    );
    assert_eq!(code(&check_log(&dir, false)), 2);

    // After a compaction, the newest segment deleted.
    let dir = DataDir::new();
    let args = [
        "--fsync",
        "always",
        "--compact-min-size",
        "1",
        "--compact-percentage",
        "1",
    ];
    let mut server = Server::start_in(&dir, &args);
    write_small_keys(&server, 50);
    assert!(
        wait_for(WRITE_DEADLINE, || !snapshots(dir.path()).is_empty()),
        "no compaction happened"
    );
    terminate_ok(&mut server);
    let snap = newest_snapshot_index(dir.path());
    let after = dir.path().join(format!("wal-{:020}.log", snap + 1));
    assert!(after.exists(), "{} missing", after.display());
    fs::remove_file(&after).unwrap();
    let run = start_expecting_refusal(&dir, &args);
    assert!(
        run.stderr.contains("is missing") || run.stderr.contains("was committed"),
        "the newest segment deleted:\n{}",
        run.stderr
    );
}
