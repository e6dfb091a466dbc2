//! The HTTP listener (`--http-port`, src/http.rs) against real `kvstore` processes, with
//! a real HTTP client (ureq) and with curl: the REST interface (binary-safe keys and
//! values, TTL, databases, errors), auth with a bearer token, /status, /health, and in a
//! 3-node cluster the follower's 307 to the leader's HTTP address and the 503 when no
//! leader is known.
//!
//! Every server is started with `--http-port 0` and asked for the port it got with
//! `PEER HTTP` (what a follower asks its leader), so tests never race for ports.

mod common;

use common::cluster::{Cluster, ELECTION_DEADLINE};
use common::{Server, require_tool, wait_until};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);

/// An agent that returns every status as a response (no error for 4xx/5xx) and follows
/// `redirects` redirects.
fn agent(redirects: u32) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(redirects)
        .timeout_global(Some(TIMEOUT))
        .build()
        .into()
}

/// The HTTP port of the server on Redis port `port`, as it answers `PEER HTTP`.
fn http_port(port: u16) -> u16 {
    let mut c = common::redis_conn(port);
    let p: u16 = redis::cmd("PEER")
        .arg("HTTP")
        .query(&mut c)
        .expect("PEER HTTP");
    assert_ne!(p, 0, "the server on {port} has no HTTP port");
    p
}

struct Reply {
    status: u16,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let mut r = r.expect("an HTTP response");
    let headers = r
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    Reply {
        status: r.status().as_u16(),
        headers,
        body: r
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .expect("body"),
    }
}

/// A client for one node's HTTP port, optionally with a bearer token.
struct Http {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

impl Http {
    fn new(port: u16) -> Http {
        Http {
            base: format!("http://127.0.0.1:{port}"),
            agent: agent(0),
            token: None,
        }
    }

    fn of(server: &Server) -> Http {
        Http::new(http_port(server.port))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get(&self, path: &str) -> Reply {
        let mut req = self.agent.get(self.url(path));
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        reply(req.call())
    }

    fn put(&self, path: &str, body: &[u8]) -> Reply {
        let mut req = self.agent.put(self.url(path));
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        reply(req.send(body))
    }

    fn delete(&self, path: &str) -> Reply {
        let mut req = self.agent.delete(self.url(path));
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        reply(req.call())
    }
}

fn all_bytes() -> Vec<u8> {
    (0..=255u8).chain((0..=255u8).rev()).collect()
}

#[test]
fn rest_values_and_keys_are_binary_safe() {
    let s = Server::start(&["--http-port", "0"]);
    let h = Http::of(&s);
    let mut redis = s.conn();
    let value = all_bytes();
    for (path, key) in [
        ("a%00b", &b"a\0b"[..]),
        ("x%2Fy", b"x/y"),
        ("%E2%82%AC-%FF", b"\xe2\x82\xac-\xff"),
        ("plain/with/slashes", b"plain/with/slashes"),
    ] {
        let p = format!("/v1/kv/{path}");
        let r = h.put(&p, &value);
        assert_eq!(r.status, 204, "PUT {p}: {}", r.text());
        let r = h.get(&p);
        assert_eq!(r.status, 200, "GET {p}");
        assert_eq!(r.header("content-type"), Some("application/octet-stream"));
        assert_eq!(r.body, value, "GET {p}");
        // The same key, by the Redis protocol.
        let got: Vec<u8> = redis::cmd("GET").arg(key).query(&mut redis).expect("GET");
        assert_eq!(got, value, "{key:?}");
        assert_eq!(h.delete(&p).status, 204, "DELETE {p}");
        assert_eq!(h.get(&p).status, 404);
        assert_eq!(h.delete(&p).status, 404);
    }
    // An empty value is a value.
    assert_eq!(h.put("/v1/kv/empty", b"").status, 204);
    let r = h.get("/v1/kv/empty");
    assert_eq!((r.status, r.body.len()), (200, 0));
    // Written by Redis, read over HTTP.
    let _: () = redis::cmd("SET")
        .arg(b"r\x01")
        .arg(b"\x00v")
        .query(&mut redis)
        .expect("SET");
    assert_eq!(h.get("/v1/kv/r%01").body, b"\x00v");
}

#[test]
fn rest_errors_are_clear() {
    let s = Server::start(&["--http-port", "0", "--proto-max-bulk-len", "1000"]);
    let h = Http::of(&s);
    let r = h.get("/nope");
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(h.get("/v1/kv/").status, 400);
    assert_eq!(h.get("/v1/kv/%zz").status, 400);
    assert_eq!(h.get("/v1/kv/k?bogus=1").status, 400);
    let r = reply(h.agent.post(h.url("/v1/kv/k")).send(&b"v"[..]));
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD, PUT, DELETE"));
    let r = reply(h.agent.post(h.url("/status")).send(&b""[..]));
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
    // Bodies: at the limit, over it.
    assert_eq!(h.put("/v1/kv/k", &[7u8; 1000]).status, 204);
    let r = h.put("/v1/kv/k", &[7u8; 1001]);
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("proto-max-bulk-len"), "{}", r.text());
    assert_eq!(h.get("/v1/kv/k").body, vec![7u8; 1000]);
    // A large body the client sends anyway (no `Expect: 100-continue`): still a clean
    // 413, not a reset connection (the server drains a little before it closes).
    let r = h.put("/v1/kv/k", &vec![7u8; 3 << 20]);
    assert_eq!(r.status, 413, "{}", r.text());
    // A huge declared length is refused before a byte is read, and nothing is
    // allocated for it: the server goes on.
    let port = http_port(s.port);
    let mut raw = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    raw.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    raw.write_all(
        b"PUT /v1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551615\r\n\r\n",
    )
    .expect("send");
    let mut answer = String::new();
    raw.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    // Chunked bodies: 411. A head over the limit: 431. Garbage: 400.
    for (req, want) in [
        (
            "PUT /v1/kv/k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
                .to_string(),
            "HTTP/1.1 411 ",
        ),
        (
            format!("GET /v1/kv/k HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000)),
            "HTTP/1.1 431 ",
        ),
        (
            format!("GET /{} HTTP/1.1\r\n", "a".repeat(20_000)),
            "HTTP/1.1 414 ",
        ),
        ("hello\r\n\r\n".to_string(), "HTTP/1.1 400 "),
    ] {
        let mut raw = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        raw.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        raw.write_all(req.as_bytes()).expect("send");
        let mut answer = String::new();
        let _ = raw.read_to_string(&mut answer);
        assert!(answer.starts_with(want), "{want}: {answer}");
    }
    // Keep-alive: two requests on one connection, then the server is still fine.
    let mut raw = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    raw.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    raw.write_all(
        b"GET /health HTTP/1.1\r\n\r\nGET /v1/kv/k HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .expect("send");
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
    assert_eq!(h.get("/health").status, 200);
}

#[test]
fn rest_ttl_and_databases() {
    let s = Server::start(&["--http-port", "0", "--databases", "4"]);
    let h = Http::of(&s);
    let mut redis = s.conn();
    assert_eq!(h.put("/v1/kv/t?ttl=100", b"v").status, 204);
    let ttl: i64 = redis::cmd("TTL").arg("t").query(&mut redis).expect("TTL");
    assert!((99..=100).contains(&ttl), "TTL {ttl}");
    // A PUT without ttl clears it, as SET does.
    assert_eq!(h.put("/v1/kv/t", b"v").status, 204);
    let ttl: i64 = redis::cmd("TTL").arg("t").query(&mut redis).expect("TTL");
    assert_eq!(ttl, -1);
    for bad in ["0", "-5", "abc", "1.5", ""] {
        let r = h.put(&format!("/v1/kv/t?ttl={bad}"), b"v");
        assert_eq!(r.status, 400, "ttl={bad}: {}", r.text());
    }
    assert_eq!(h.get("/v1/kv/t?ttl=5").status, 400);
    assert_eq!(h.put("/v1/kv/d?db=3", b"in three").status, 204);
    assert_eq!(h.get("/v1/kv/d").status, 404);
    assert_eq!(h.get("/v1/kv/d?db=3").body, b"in three");
    let _: () = redis::cmd("SELECT")
        .arg(3)
        .query(&mut redis)
        .expect("SELECT");
    let got: Vec<u8> = redis::cmd("GET").arg("d").query(&mut redis).expect("GET");
    assert_eq!(got, b"in three");
    let r = h.get("/v1/kv/d?db=4");
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(h.delete("/v1/kv/d?db=3").status, 204);
}

#[test]
fn auth_with_a_bearer_token() {
    let s = Server::start(&["--http-port", "0", "--requirepass", "s3cret"]);
    // PEER HTTP needs no AUTH (a follower asks it of its leader, as PEER ID): the port
    // is no secret, everything behind it asks for the password.
    let mut h = Http::new({
        let mut raw = common::raw(s.port);
        raw.write_all(b"*2\r\n$4\r\nPEER\r\n$4\r\nHTTP\r\n")
            .expect("send");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(raw), &mut line).expect("read");
        line.trim_end()
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("PEER HTTP answered {line:?}"))
    });
    for path in ["/v1/kv/k", "/status", "/metrics"] {
        let r = h.get(path);
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"kvstore\"")
        );
    }
    assert_eq!(h.put("/v1/kv/k", b"v").status, 401);
    // /health needs no password (probes and load balancers).
    assert_eq!(h.get("/health").status, 200);
    h.token = Some("wrong".into());
    assert_eq!(h.get("/v1/kv/k").status, 401);
    h.token = Some("s3cret".into());
    assert_eq!(h.put("/v1/kv/k", b"v").status, 204);
    assert_eq!(h.get("/v1/kv/k").body, b"v");
    assert_eq!(h.get("/status").status, 200);
    assert_eq!(h.get("/metrics").status, 200);
    // Failures count where failed AUTHs do.
    let mut c = redis::Client::open(format!("redis://:s3cret@127.0.0.1:{}/", s.port))
        .expect("client")
        .get_connection_with_timeout(TIMEOUT)
        .expect("connect");
    let info: String = redis::cmd("INFO").arg("stats").query(&mut c).expect("INFO");
    let denied: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("acl_access_denied_auth:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("acl_access_denied_auth in INFO");
    assert!(denied >= 5, "{denied}");
}

#[test]
fn status_and_health_of_a_single_node() {
    let s = Server::start(&["--http-port", "0"]);
    let h = Http::of(&s);
    assert_eq!(h.put("/v1/kv/a", b"1").status, 204);
    let r = h.get("/health");
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    let r = h.get("/status");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
    assert_eq!(j["id"], u64::from(s.port));
    assert_eq!(j["role"], "leader");
    assert_eq!(j["leader"]["id"], u64::from(s.port));
    assert_eq!(j["serving"], true);
    assert_eq!(j["peers"], serde_json::json!([]));
    assert!(j["last_index"].as_u64().expect("last_index") >= 1);
    assert_eq!(j["commit"], j["last_index"]);
    assert!(
        j["version"].is_string() && j["uptime_seconds"].is_u64(),
        "{j}"
    );
    let r = h.get("/metrics");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    // The REST PUT above counts as the SET it ran.
    assert!(
        r.text().contains("kvstore_commands_total{cmd=\"set\"} 1\n"),
        "{}",
        r.text()
    );
    // HEAD: the headers, no body.
    let r = reply(h.agent.head(h.url("/status")).call());
    assert_eq!((r.status, r.body.len()), (200, 0));
    // INFO says where the HTTP listener is.
    let mut c = common::redis_conn(s.port);
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut c)
        .expect("INFO");
    assert!(
        info.contains(&format!("\r\nhttp_port:{}\r\n", http_port(s.port))),
        "{info}"
    );
}

#[test]
fn curl_puts_and_gets_binary_bodies() {
    let curl = require_tool("curl", "apt-get install curl");
    let s = Server::start(&["--http-port", "0"]);
    let base = format!("http://127.0.0.1:{}", http_port(s.port));
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.bin");
    let output = dir.path().join("out.bin");
    // Large enough that curl sends `Expect: 100-continue` (over 1 MiB).
    let value: Vec<u8> = all_bytes().repeat(5000);
    std::fs::write(&input, &value).expect("write");
    let run = |args: &[&str]| {
        let out = Command::new(&curl).args(args).output().expect("run curl");
        assert!(out.status.success(), "curl {args:?}: {out:?}");
        out.stdout
    };
    let url = format!("{base}/v1/kv/curl%00key");
    run(&[
        "-sS",
        "-f",
        "-X",
        "PUT",
        "--data-binary",
        &format!("@{}", input.display()),
        &url,
    ]);
    run(&["-sS", "-f", "-o", &output.display().to_string(), &url]);
    assert_eq!(std::fs::read(&output).expect("read"), value);
    let code = run(&[
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{base}/nope"),
    ]);
    assert_eq!(code, b"404");
}

/// The HTTP port of cluster node `id`.
fn node_http(c: &Cluster, id: u64) -> Http {
    Http::new(http_port(c.port(id)))
}

#[test]
fn cluster_followers_redirect_to_the_leader_and_503_without_one() {
    let curl = require_tool("curl", "apt-get install curl");
    let mut c = Cluster::start(3, &["--http-port", "0"]);
    let leader = c.wait_for_leader();
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    let lh = node_http(&c, leader);
    let fh = node_http(&c, follower);
    let leader_http = http_port(c.port(leader));
    // Every node is healthy once the followers hear the leader.
    for id in 1..=3 {
        let h = node_http(&c, id);
        wait_until(ELECTION_DEADLINE, &format!("node {id} healthy"), || {
            h.get("/health").status == 200
        });
    }
    // A write through a follower: 307 to the leader's HTTP port, same path and query.
    let r = fh.put("/v1/kv/k%00?ttl=100", b"via follower");
    assert_eq!(r.status, 307, "{}", r.text());
    let location = r.header("location").expect("Location").to_string();
    assert_eq!(
        location,
        format!("http://127.0.0.1:{leader_http}/v1/kv/k%00?ttl=100")
    );
    let r = reply(agent(0).put(&location).send(&b"via follower"[..]));
    assert_eq!(r.status, 204, "{}", r.text());
    // A read through a follower: ureq follows the 307.
    let r = reply(agent(5).get(fh.url("/v1/kv/k%00")).call());
    assert_eq!((r.status, r.body.as_slice()), (200, &b"via follower"[..]));
    assert_eq!(fh.get("/v1/kv/k%00").status, 307);
    assert_eq!(fh.delete("/v1/kv/nothing").status, 307);
    // curl -L through a follower, for a PUT (307 keeps the method and body) and a GET.
    let url = fh.url("/v1/kv/curl");
    let out = Command::new(&curl)
        .args([
            "-sS",
            "-f",
            "-L",
            "-X",
            "PUT",
            "--data-binary",
            "by curl",
            &url,
        ])
        .output()
        .expect("curl");
    assert!(out.status.success(), "{out:?}");
    let out = Command::new(&curl)
        .args(["-sS", "-f", "-L", &url])
        .output()
        .expect("curl");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"by curl");
    assert_eq!(lh.get("/v1/kv/curl").body, b"by curl");
    // /status: the leader lists its peers, a follower names its leader.
    let j: serde_json::Value = serde_json::from_slice(&lh.get("/status").body).expect("JSON");
    assert_eq!(j["role"], "leader");
    assert_eq!(j["id"], leader);
    assert_eq!(j["serving"], true);
    let peers = j["peers"].as_array().expect("peers");
    assert_eq!(peers.len(), 2, "{j}");
    for p in peers {
        assert!(
            p["id"].is_u64() && p["addr"].is_string() && p["lag"].is_u64(),
            "{p}"
        );
        assert!(p["connected"].is_boolean() && p["acked"].is_u64(), "{p}");
    }
    let j: serde_json::Value = serde_json::from_slice(&fh.get("/status").body).expect("JSON");
    assert_eq!(j["role"], "follower");
    assert_eq!(j["leader"]["id"], leader);
    assert_eq!(j["serving"], false);
    // Two of three gone: no leader can be elected; the last node answers 503.
    let last = follower;
    for id in (1..=3).filter(|&i| i != last) {
        c.kill9(id);
    }
    wait_until(ELECTION_DEADLINE, "the last node unhealthy", || {
        fh.get("/health").status == 503
    });
    wait_until(ELECTION_DEADLINE, "a 503 for a write", || {
        let r = fh.put("/v1/kv/k", b"v");
        r.status == 503 && r.header("retry-after") == Some("1")
    });
    let r = fh.get("/v1/kv/k");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
}

#[test]
fn connections_are_capped_and_shutdown_closes_them() {
    let mut s = Server::start(&["--http-port", "0"]);
    let port = http_port(s.port);
    // Idle keep-alive connections up to the cap; the next one is told to come back.
    let idle: Vec<TcpStream> = (0..kvstore::http::MAX_CONNECTIONS)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    let mut over = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    over.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut answer = String::new();
    let _ = over.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("Retry-After: 1"), "{answer}");
    // SIGTERM with all of them open: the server still exits cleanly, and promptly.
    let status = s.terminate();
    assert!(status.success(), "{status}");
    for mut c in idle {
        c.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    }
}

/// One `GET /health` with keep-alive asked for, on a fresh connection: the response
/// head.
fn keep_alive_head(port: u16) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && c.read(&mut byte).expect("read") == 1 {
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[test]
fn keep_alive_ends_when_connections_pile_up() {
    let s = Server::start(&["--http-port", "0"]);
    let port = http_port(s.port);
    let head = keep_alive_head(port);
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(!head.contains("Connection: close"), "{head}");
    // Enough idle connections to pass the keep-alive limit (yet under the cap): a
    // response now closes its connection, so idle ones cannot take every slot.
    let _idle: Vec<TcpStream> = (0..kvstore::http::KEEP_ALIVE_MAX)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    wait_until(TIMEOUT, "a response that closes its connection", || {
        let head = keep_alive_head(port);
        head.starts_with("HTTP/1.1 200 ") && head.contains("Connection: close")
    });
}

#[test]
fn the_http_port_must_differ_from_the_redis_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = common::free_port().to_string();
    let out = Command::new(common::KVSTORE_BIN)
        .args(["server", &port, "--http-port", &port, "--data-dir"])
        .arg(dir.path().join("d"))
        .output()
        .expect("run kvstore");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--http-port must differ"), "{err}");
}
