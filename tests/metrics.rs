//! The numbers a server keeps about itself, as Redis tools read them: INFO
//! `commandstats` / `latencystats` and the election and fsync fields, `SLOWLOG`,
//! `LATENCY HISTOGRAM`, `CONFIG SET slowlog-*` and `CONFIG RESETSTAT`, on real
//! processes with the `redis` crate. (`GET /metrics`, the same numbers for
//! Prometheus, is tested in tests/http.rs.)

#![allow(dead_code)]

mod common;

use common::Server;
use common::cluster::Cluster;
use redis::Value;
use std::collections::HashMap;

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
