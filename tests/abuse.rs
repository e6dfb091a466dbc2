//! Integration tests for what a hostile or careless client can do to a server's memory,
//! descriptors and password, each against a real `kvstore server` process:
//!
//! - input is capped: a huge request before AUTH is refused from its header, one of
//!   over 1 GiB after AUTH closes the connection at the cap
//!   (`--client-query-buffer-limit`), and so does a pipeline the server cannot answer
//!   because its client does not read; the server's RSS (read from
//!   `/proc/<pid>/status`) stays bounded and other clients are served throughout;
//! - `--max-clients` is fitted to the open-files limit, so the next client is told
//!   `-ERR max number of clients reached` instead of hanging;
//! - failed AUTH and HELLO … AUTH are counted in INFO and logged, rate-limited.
//!
//! No test asserts a duration: memory is sampled while streaming and compared with a
//! bound, and anything that must happen "soon" is polled with a deadline.

mod common;

use common::{DataDir, KVSTORE_BIN, Server, raw, redis_conn, resp, wait_until};
use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SOON: Duration = Duration::from_secs(10);
const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;
/// RSS the server may reach while one client streams more than the 1 GiB input cap:
/// the cap itself, a buffer for the argument being read, and the rest of the process.
/// Without a cap it passes this well before the client has sent 1.5 GiB.
const RSS_BOUND: u64 = 1600 * MIB as u64;
/// Bytes the kernel may still take from a client after the server has closed its socket
/// (socket buffers on loopback grow to a few MiB each way).
const SOCKET_SLACK: usize = 32 * MIB;

// ---------------------------------------------------------------------------------------
// Helpers

/// The server's resident memory, from `VmRSS` in /proc/<pid>/status.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"));
    kb * 1024
}

/// Reads one reply line (up to and including `\r\n`).
#[track_caller]
fn read_line(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        match s.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            Ok(_) => panic!(
                "connection closed after {:?}",
                String::from_utf8_lossy(&line)
            ),
            Err(e) => panic!(
                "no reply line (got {:?} so far): {e}",
                String::from_utf8_lossy(&line)
            ),
        }
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// Reads until the server closes the connection (end of input or a reset). Panics if
/// it is still open after the read timeout.
#[track_caller]
fn assert_closed(s: &mut TcpStream, what: &str) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return;
            }
            Err(e) => panic!("{what}: the connection should be closed, but reading gave {e}"),
        }
    }
}

/// An INFO field, read with a fresh connection (AUTH first when `password` is given).
#[track_caller]
fn info_field(port: u16, password: Option<&str>, section: &str, field: &str) -> String {
    let mut con = redis_conn(port);
    if let Some(pw) = password {
        let _: () = redis::cmd("AUTH").arg(pw).query(&mut con).expect("AUTH");
    }
    let text: String = redis::cmd("INFO")
        .arg(section)
        .query(&mut con)
        .expect("INFO");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {field} in INFO {section}:\n{text}"))
}

/// PING on a new connection is answered (the server still serves others).
#[track_caller]
fn assert_serves(port: u16, password: Option<&str>) {
    let mut con = redis_conn(port);
    if let Some(pw) = password {
        let _: () = redis::cmd("AUTH").arg(pw).query(&mut con).expect("AUTH");
    }
    let pong: String = redis::cmd("PING").query(&mut con).expect("PING");
    assert_eq!(pong, "PONG");
}

/// Writes `head`, then `body(i)` for i = 0, 1, … until `limit` bytes have been sent in
/// all or a write fails, calling `sample` after every 32 MiB. Returns the bytes sent and
/// the write error that stopped it, if any.
fn stream(
    s: &mut TcpStream,
    head: &[u8],
    limit: usize,
    mut body: impl FnMut(usize) -> Vec<u8>,
    mut sample: impl FnMut(usize),
) -> (usize, Option<io::Error>) {
    let mut sent = 0;
    let mut next_sample = 32 * MIB;
    let mut piece = head.to_vec();
    let mut i = 0;
    while sent < limit {
        if let Err(e) = s.write_all(&piece) {
            return (sent, Some(e));
        }
        sent += piece.len();
        if sent >= next_sample {
            sample(sent);
            next_sample += 32 * MIB;
        }
        piece = body(i);
        i += 1;
    }
    (sent, None)
}

// ---------------------------------------------------------------------------------------
// Item 7: input memory is capped

#[test]
fn before_auth_a_huge_mset_is_refused_from_its_header() {
    let server = Server::start(&["--requirepass", "s3cret"]);
    let before = rss(server.pid());

    // One bulk of 100 MB (under --proto-max-bulk-len, so only the AUTH rule stops it).
    let mut s = raw(server.port);
    let head = b"*3\r\n$4\r\nMSET\r\n$1\r\nk\r\n$100000000\r\n";
    s.write_all(head).expect("send the header");
    s.write_all(&[b'x'; 4096]).expect("send 4 KiB of the value");
    assert_eq!(
        read_line(&mut s),
        "-ERR Protocol error: unauthenticated bulk length\r\n",
        "the reply to a 100 MB argument before AUTH"
    );
    assert_closed(&mut s, "after the unauthenticated bulk length error");

    // Streaming on regardless gets nowhere: the socket is gone, after at most what the
    // kernel buffered.
    let (sent, err) = stream(&mut s, b"", 256 * MIB, |_| vec![b'x'; MIB], |_| {});
    assert!(
        err.is_some(),
        "{sent} more bytes accepted after the refusal"
    );
    assert!(
        sent <= SOCKET_SLACK,
        "{sent} bytes accepted after the refusal"
    );

    // Many small arguments: refused from the array header (Redis 7: at most 10).
    let mut s = raw(server.port);
    s.write_all(b"*21\r\n$4\r\nMSET\r\n").expect("send");
    assert_eq!(
        read_line(&mut s),
        "-ERR Protocol error: unauthenticated multibulk length\r\n"
    );
    assert_closed(&mut s, "after the unauthenticated multibulk length error");

    // At the limits themselves a request is read, and answered as usual.
    let mut s = raw(server.port);
    let big = vec![b'v'; 16 * 1024];
    let ten: Vec<&[u8]> = [
        &b"MSET"[..],
        b"a",
        &big,
        b"b",
        &big,
        b"c",
        &big,
        b"d",
        &big,
        b"e",
    ]
    .into_iter()
    .collect();
    s.write_all(&resp(&ten)).expect("send");
    assert_eq!(read_line(&mut s), "-NOAUTH Authentication required.\r\n");
    s.write_all(&resp(&[b"AUTH", b"s3cret"])).expect("send");
    assert_eq!(read_line(&mut s), "+OK\r\n");

    let after = rss(server.pid());
    assert!(
        after < before + 64 * MIB as u64,
        "RSS grew from {before} to {after} bytes for refused requests"
    );
    assert_serves(server.port, Some("s3cret"));
}

#[test]
fn before_auth_a_client_that_does_not_read_is_closed_at_1mib_of_input() {
    // Every PING before AUTH gets -NOAUTH. A client that never reads them fills the
    // output until execution pauses (64 MiB); from then on its input is only buffered,
    // and before AUTH that is capped at 1 MiB, as in Redis 7.
    let server = Server::start(&["--requirepass", "s3cret", "--fsync", "no"]);
    let pid = server.pid();
    let mut s = raw(server.port);
    let pings = b"PING\r\n".repeat(64 * 1024);
    let (sent, err) = stream(
        &mut s,
        &pings,
        4 * GIB,
        |_| pings.clone(),
        |sent| {
            let now = rss(pid);
            assert!(
                now < 512 * MIB as u64,
                "server RSS {now} after {sent} bytes"
            );
        },
    );
    let err = err.unwrap_or_else(|| panic!("all {sent} bytes of unread PINGs accepted"));
    assert!(
        matches!(
            err.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
        ),
        "the server should have closed the connection; the write failed with {err}"
    );
    // 64 MiB of replies is about 2.6M PINGs, 16 MiB of input; then 1 MiB more at most.
    assert!(
        sent <= 64 * MIB + SOCKET_SLACK,
        "{sent} bytes accepted before AUTH"
    );
    wait_until(SOON, "the close to be logged", || {
        server.log().contains("(not authenticated)")
    });
    assert_serves(server.port, Some("s3cret"));
}

#[test]
fn after_auth_one_request_over_1gib_closes_the_connection_and_rss_stays_bounded() {
    let server = Server::start(&["--requirepass", "s3cret", "--fsync", "no"]);
    let pid = server.pid();
    // Connected before the flood, used after it.
    let mut bystander = redis_conn(server.port);
    let _: () = redis::cmd("AUTH")
        .arg("s3cret")
        .query(&mut bystander)
        .expect("AUTH");

    let mut s = raw(server.port);
    s.write_all(&resp(&[b"AUTH", b"s3cret"]))
        .expect("send AUTH");
    assert_eq!(read_line(&mut s), "+OK\r\n");

    // MSET k0 <64 MiB> k1 <64 MiB> … : 24 pairs, 1.5 GiB, never finished. Each argument
    // is under --proto-max-bulk-len; only the input cap can stop it.
    const VALUE: usize = 64 * MIB;
    const PAIRS: usize = 24;
    let value = vec![b'v'; VALUE];
    let head = format!("*{}\r\n$4\r\nMSET\r\n", 1 + 2 * PAIRS).into_bytes();
    let mut peak = 0;
    let (sent, err) = stream(
        &mut s,
        &head,
        PAIRS * (VALUE + 64),
        |i| {
            let mut piece = format!("$4\r\nk{:03}\r\n${VALUE}\r\n", i % 1000).into_bytes();
            piece.extend_from_slice(&value);
            piece.extend_from_slice(b"\r\n");
            piece
        },
        |sent| {
            let now = rss(pid);
            peak = peak.max(now);
            assert!(
                now < RSS_BOUND,
                "server RSS {now} bytes after {sent} bytes of one unfinished request \
                 (bound {RSS_BOUND}): the input cap does not hold"
            );
        },
    );
    let err = err.unwrap_or_else(|| {
        panic!("all {sent} bytes of a request over 1 GiB were accepted (peak RSS {peak})")
    });
    assert!(
        matches!(
            err.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
        ),
        "the server should have closed the connection; the write failed with {err}"
    );
    assert!(
        sent <= GIB + SOCKET_SLACK,
        "{sent} bytes accepted, over the 1 GiB cap"
    );
    assert!(
        sent >= GIB - 2 * VALUE,
        "closed early, after only {sent} bytes"
    );
    let now = rss(pid);
    assert!(now < RSS_BOUND, "server RSS {now} after the close");
    eprintln!("closed after {sent} bytes; peak RSS sampled {peak} bytes");

    // Logged and counted as Redis does, and the others are still served.
    wait_until(SOON, "the close to be logged", || {
        server
            .log()
            .contains("Closing client that reached max query buffer length")
    });
    assert_eq!(
        info_field(
            server.port,
            Some("s3cret"),
            "stats",
            "client_query_buffer_limit_disconnections"
        ),
        "1"
    );
    let pong: String = redis::cmd("PING").query(&mut bystander).expect("PING");
    assert_eq!(pong, "PONG");
    let _: () = redis::cmd("SET")
        .arg("after")
        .arg("flood")
        .query(&mut bystander)
        .expect("SET");
    assert_serves(server.port, Some("s3cret"));
}

#[test]
fn a_client_that_pipelines_without_reading_is_closed_at_the_input_cap() {
    // Replies to GETs of a 1 MiB value pile up unread: past 64 MiB of them the server
    // stops executing and only buffers input, and past the 1 GiB input cap it closes
    // the connection, rather than stop reading and leave the client blocked forever.
    let server = Server::start(&["--fsync", "no"]);
    let pid = server.pid();
    let mut con = server.conn();
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg(vec![b'v'; MIB])
        .query(&mut con)
        .expect("SET k");

    let mut s = raw(server.port);
    let gets = resp(&[b"GET", b"k"]).repeat(200);
    let echo = resp(&[b"ECHO", &vec![b'e'; MIB]]);
    let (sent, err) = stream(
        &mut s,
        &gets,
        2 * GIB,
        |_| echo.clone(),
        |sent| {
            let now = rss(pid);
            assert!(
                now < RSS_BOUND,
                "server RSS {now} bytes after {sent} bytes of unread pipeline"
            );
        },
    );
    let err = err.unwrap_or_else(|| panic!("all {sent} bytes of an unread pipeline accepted"));
    assert!(
        matches!(
            err.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
        ),
        "the server should have closed the connection at the input cap; the write failed \
         with {err} (a timeout means it stopped reading and left the client blocked)"
    );
    assert!(
        sent <= GIB + 64 * MIB + SOCKET_SLACK,
        "{sent} bytes accepted"
    );
    wait_until(SOON, "the close to be logged", || {
        server
            .log()
            .contains("Closing client that reached max query buffer length")
    });
    let pong: String = redis::cmd("PING").query(&mut con).expect("PING");
    assert_eq!(pong, "PONG");
}

// ---------------------------------------------------------------------------------------
// Item 9: max-clients fits the descriptor limit

/// A `kvstore server` started with RLIMIT_NOFILE set to `nofile` (soft and hard), which
/// the test harness cannot do; killed on drop.
struct LimitedServer {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
    _dir: DataDir,
}

impl LimitedServer {
    fn start(nofile: u64) -> LimitedServer {
        let dir = DataDir::new();
        let log = dir.root().join("limited.log");
        let out = std::fs::File::create(&log).expect("create log");
        let err = out.try_clone().expect("clone log");
        let port = common::free_port();
        let mut cmd = Command::new(KVSTORE_BIN);
        cmd.arg("server")
            .arg(port.to_string())
            .arg("--data-dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("KVSTORE_") {
                cmd.env_remove(&key);
            }
        }
        // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: nofile as libc::rlim_t,
                    rlim_max: nofile as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start kvstore with a low RLIMIT_NOFILE");
        let mut server = LimitedServer {
            child,
            port,
            log,
            _dir: dir,
        };
        wait_until(SOON, "the server to answer PING", || {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("kvstore exited ({status}):\n{}", server.log());
            }
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            s.write_all(b"PING\r\n").is_ok() && {
                let mut buf = [0u8; 7];
                s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
            }
        });
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for LimitedServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}--- end ---", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn max_clients_is_lowered_to_fit_the_open_files_limit() {
    // 48 descriptors: 32 kept for the server itself, one per client, so 16 clients.
    let server = LimitedServer::start(48);
    let port = server.port;
    let log = server.log();
    assert!(
        log.contains("maxclients has been reduced to 16"),
        "no log line about the lowered maxclients:\n{log}"
    );

    let mut first = redis_conn(port);
    let config: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxclients")
        .query(&mut first)
        .expect("CONFIG GET");
    assert_eq!(config, ["maxclients", "16"]);
    wait_until(SOON, "only this connection to be counted", || {
        let text: String = redis::cmd("INFO")
            .arg("clients")
            .query(&mut first)
            .expect("INFO");
        text.contains("maxclients:16") && text.contains("connected_clients:1\r")
    });

    // 15 more fit …
    let mut clients = Vec::new();
    for i in 2..=16 {
        let mut s = raw(port);
        s.write_all(b"PING\r\n").expect("send PING");
        assert_eq!(read_line(&mut s), "+PONG\r\n", "client {i}");
        clients.push(s);
    }
    // … and every one after them is told why, then closed; none hangs.
    for i in 17..=40 {
        let mut s = raw(port);
        assert_eq!(
            read_line(&mut s),
            "-ERR max number of clients reached\r\n",
            "client {i}"
        );
        assert_closed(&mut s, "a refused client");
    }
    // Freeing a slot lets the next one in.
    drop(clients.pop());
    wait_until(SOON, "a freed slot to be usable", || {
        let mut s = raw(port);
        s.write_all(b"PING\r\n").expect("send PING");
        read_line(&mut s) == "+PONG\r\n"
    });
    let pong: String = redis::cmd("PING").query(&mut first).expect("PING");
    assert_eq!(pong, "PONG");
}

// ---------------------------------------------------------------------------------------
// Item 10: AUTH failures are counted and logged

#[test]
fn failed_auth_is_counted_in_info_and_logged_rate_limited() {
    let server = Server::start(&["--requirepass", "s3cret"]);
    let started = std::time::Instant::now();
    let mut s = raw(server.port);
    const WRONG: usize = 200;
    for i in 0..WRONG {
        // Wrong by one byte, by length, and empty: all the same answer.
        let guess: &[u8] = match i % 3 {
            0 => b"s3creT",
            1 => b"s3cret-and-more",
            _ => b"",
        };
        s.write_all(&resp(&[b"AUTH", guess])).expect("send AUTH");
        assert_eq!(
            read_line(&mut s),
            "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
        );
    }
    // HELLO … AUTH goes through the same check.
    s.write_all(&resp(&[b"HELLO", b"3", b"AUTH", b"default", b"nope"]))
        .expect("send HELLO");
    assert_eq!(
        read_line(&mut s),
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    s.write_all(&resp(&[b"AUTH", b"default", b"s3cret"]))
        .expect("send AUTH");
    assert_eq!(read_line(&mut s), "+OK\r\n");
    let elapsed = started.elapsed();

    assert_eq!(
        info_field(
            server.port,
            Some("s3cret"),
            "stats",
            "acl_access_denied_auth"
        ),
        (WRONG + 1).to_string()
    );
    // Logged with the client's address, at most about once a second.
    let log = server.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("authentication failed"))
        .count();
    assert!(lines >= 1, "no failed AUTH in the log:\n{log}");
    assert!(
        lines as u64 <= elapsed.as_secs() + 2,
        "{lines} log lines for {} failures in {elapsed:?}: not rate-limited",
        WRONG + 1
    );
    assert!(log.contains("addr=127.0.0.1:"), "{log}");
}
