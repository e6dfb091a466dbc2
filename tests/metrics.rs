//! The numbers a server keeps about itself, as Redis tools read them: INFO
//! `commandstats` / `latencystats` and the election and fsync fields, `SLOWLOG`,
//! `LATENCY HISTOGRAM`, `CONFIG SET slowlog-*` and `CONFIG RESETSTAT`, on real
//! processes with the `redis` crate; and `GET /metrics`, the same numbers for
//! Prometheus, scraped from a cluster's leader and follower over plain HTTP.

#![allow(dead_code)]

mod common;

use common::Server;
use common::cluster::Cluster;
use redis::Value;
use std::collections::HashMap;
use std::io::{Read, Write};

fn info(c: &mut redis::Connection, section: &str) -> HashMap<String, String> {
    let text: String = redis::cmd("INFO").arg(section).query(c).unwrap();
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim_end().to_string()))
        .collect()
}

fn field(line: &str, name: &str) -> u64 {
    line.split(',')
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.split('.').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

#[test]
fn commandstats_count_every_command_by_name() {
    let server = Server::start(&["--fsync", "no"]);
    let mut c = server.conn();
    for i in 0..5 {
        let _: () = redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg("v")
            .query(&mut c)
            .unwrap();
    }
    for i in 0..3 {
        let _: Option<String> = redis::cmd("GET")
            .arg(format!("k{i}"))
            .query(&mut c)
            .unwrap();
    }
    let stats = info(&mut c, "commandstats");
    assert_eq!(field(&stats["cmdstat_set"], "calls"), 5, "{stats:?}");
    assert_eq!(field(&stats["cmdstat_get"], "calls"), 3, "{stats:?}");
    assert!(
        !stats.contains_key("cmdstat_del"),
        "never called: {stats:?}"
    );
    let lat = info(&mut c, "latencystats");
    let p50 = field(&lat["latency_percentiles_usec_set"], "p50");
    let p99 = field(&lat["latency_percentiles_usec_set"], "p99");
    assert!(p50 > 0 && p50 <= p99, "{lat:?}");
    // As in Redis, plain INFO leaves the per-command sections out; `all` has them.
    let plain: String = redis::cmd("INFO").query(&mut c).unwrap();
    assert!(
        !plain.contains("cmdstat_") && plain.contains("# Keyspace"),
        "{plain}"
    );
    let all: String = redis::cmd("INFO").arg("all").query(&mut c).unwrap();
    assert!(all.contains("# Commandstats") && all.contains("cmdstat_set:calls="));
    assert!(all.contains("log_fsync_usec:") && all.contains("log_fsync_p99_usec:"));

    // LATENCY HISTOGRAM: Redis 7's shape, a map of command to calls and buckets.
    let h: Value = redis::cmd("LATENCY")
        .arg("HISTOGRAM")
        .arg("set")
        .query(&mut c)
        .unwrap();
    let text = format!("{h:?}");
    assert!(text.contains("set") && text.contains("calls") && text.contains("histogram_usec"));
    let Value::Array(top) = h else {
        panic!("RESP2 map as a flat array: {text}")
    };
    assert_eq!(top.len(), 2, "{text}");

    // CONFIG RESETSTAT forgets them.
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut c).unwrap();
    let stats = info(&mut c, "commandstats");
    assert!(!stats.contains_key("cmdstat_set"), "{stats:?}");
}

#[test]
fn slowlog_keeps_what_was_slower_than_the_threshold() {
    let server = Server::start(&["--fsync", "no"]);
    let mut c = server.conn();
    let got: HashMap<String, String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("slowlog-*")
        .query(&mut c)
        .unwrap();
    assert_eq!(got["slowlog-log-slower-than"], "10000");
    assert_eq!(got["slowlog-max-len"], "128");
    // Everything is slow at 0 µs.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg("0")
        .arg("slowlog-max-len")
        .arg("3")
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("tester")
        .query(&mut c)
        .unwrap();
    for i in 0..5 {
        let _: () = redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg("v")
            .query(&mut c)
            .unwrap();
    }
    let len: i64 = redis::cmd("SLOWLOG").arg("LEN").query(&mut c).unwrap();
    assert_eq!(len, 3, "max-len keeps the newest 3");
    let entries: Value = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(1)
        .query(&mut c)
        .unwrap();
    let Value::Array(entries) = entries else {
        panic!("{entries:?}")
    };
    assert_eq!(entries.len(), 1);
    let Value::Array(e) = &entries[0] else {
        panic!("{entries:?}")
    };
    // id, time, µs, [name, "... (N more arguments)"], client address, client name.
    assert_eq!(e.len(), 6, "{e:?}");
    let text = format!("{e:?}");
    assert!(text.contains("set") || text.contains("slowlog"), "{text}");
    assert!(text.contains("tester"), "{text}");
    let _: () = redis::cmd("SLOWLOG").arg("RESET").query(&mut c).unwrap();
    // RESET itself is logged after the reset, as in Redis.
    let len: i64 = redis::cmd("SLOWLOG").arg("LEN").query(&mut c).unwrap();
    assert!(len <= 1, "{len}");
    // Negative disables it.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg("-1")
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("SLOWLOG").arg("RESET").query(&mut c).unwrap();
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut c).unwrap();
    let len: i64 = redis::cmd("SLOWLOG").arg("LEN").query(&mut c).unwrap();
    assert_eq!(len, 0);
    // Bad values are refused and change nothing.
    let e = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-max-len")
        .arg("lots")
        .query::<()>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("CONFIG SET failed"), "{e}");
    let e = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query::<()>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("Unknown option"), "{e}");
    let e = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg("-2")
        .query::<()>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("count should be"), "{e}");
}

#[test]
fn a_leader_counts_the_election_it_won() {
    let mut cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_for_leader();
    let mut c = cluster.conn(leader);
    let repl = info(&mut c, "replication");
    assert!(
        repl["elections_won"].parse::<u64>().unwrap() >= 1,
        "{repl:?}"
    );
    assert!(
        repl["elections_started"].parse::<u64>().unwrap() >= 1,
        "{repl:?}"
    );
}

/// `GET /metrics` from the HTTP listener of the node on Redis port `port` (its HTTP port
/// asked with `PEER HTTP`), with HTTP/1.0 so the body ends when the connection does.
fn scrape(port: u16) -> String {
    let mut c = common::redis_conn(port);
    let http: u16 = redis::cmd("PEER").arg("HTTP").query(&mut c).unwrap();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
    s.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{head}"
    );
    body.to_string()
}

/// The samples of an exposition, `series -> value`, checking each line's shape and that
/// every sample's family was declared with `# TYPE` first.
fn samples(text: &str) -> HashMap<String, f64> {
    let mut families = Vec::new();
    let mut out = HashMap::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            families.push(t.split(' ').next().unwrap().to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            families.iter().any(|f| name == f
                || [
                    format!("{f}_bucket"),
                    format!("{f}_sum"),
                    format!("{f}_count")
                ]
                .contains(&name.to_string())),
            "sample before its # TYPE: {line}"
        );
        out.insert(
            series.to_string(),
            value.parse().unwrap_or_else(|_| panic!("{line}")),
        );
    }
    out
}

#[test]
fn prometheus_sees_roles_lag_commands_and_fsyncs() {
    let mut cluster = Cluster::start(3, &["--http-port", "0"]);
    let leader = cluster.wait_for_leader();
    let mut c = cluster.conn(leader);
    for i in 0..20 {
        let _: () = redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg("v")
            .query(&mut c)
            .unwrap();
    }
    let m = samples(&scrape(cluster.port(leader)));
    assert_eq!(m["kvstore_role{role=\"leader\"}"], 1.0);
    assert_eq!(m["kvstore_serving"], 1.0);
    assert!(m["kvstore_elections_won_total"] >= 1.0);
    assert_eq!(m["kvstore_commands_total{cmd=\"set\"}"], 20.0);
    assert_eq!(
        m["kvstore_command_duration_seconds_count{cmd=\"set\"}"],
        20.0
    );
    assert_eq!(
        m["kvstore_command_duration_seconds_bucket{cmd=\"set\",le=\"+Inf\"}"],
        20.0
    );
    assert!(m["kvstore_log_fsync_duration_seconds_count"] >= 1.0);
    assert!(m["kvstore_log_bytes"] > 0.0);
    assert_eq!(m["kvstore_keys{db=\"0\"}"], 20.0);
    // One lag line per follower, by id (and address: here a test proxy's).
    let lags: Vec<&String> = m
        .keys()
        .filter(|k| k.starts_with("kvstore_follower_lag_entries{"))
        .collect();
    assert_eq!(lags.len(), 2, "{lags:?}");
    for id in (1..=3).filter(|&i| i != leader) {
        let port = cluster.port(id);
        assert!(
            lags.iter()
                .any(|k| k.contains(&format!("follower=\"{id}\""))),
            "{lags:?}"
        );
        // A follower knows its role and its leader.
        let f = samples(&scrape(port));
        assert_eq!(f["kvstore_role{role=\"follower\"}"], 1.0);
        assert_eq!(f["kvstore_leader_id"], leader as f64);
        assert_eq!(f["kvstore_serving"], 0.0);
    }
}
