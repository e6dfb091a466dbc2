//! Key expiry against a real server: deadlines, TTL replies, active expiry, and deadlines
//! that survive kill -9 unchanged (the log stores absolute times).

mod common;

use common::{DataDir, Server, wait_until};
use std::time::Duration;

fn int(c: &mut redis::Connection, args: &[&str]) -> i64 {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(c)
        .unwrap_or_else(|e| panic!("{args:?} failed: {e}"))
}

fn get(c: &mut redis::Connection, k: &str) -> Option<String> {
    redis::cmd("GET").arg(k).query(c).expect("GET")
}

#[test]
fn ttl_family_replies_like_redis() {
    let server = Server::start(&["--fsync", "no"]);
    let mut c = server.conn();
    assert_eq!(int(&mut c, &["TTL", "missing"]), -2);
    assert_eq!(int(&mut c, &["PTTL", "missing"]), -2);
    assert_eq!(int(&mut c, &["EXPIRETIME", "missing"]), -2);
    let _: () = redis::cmd("SET")
        .arg("p")
        .arg("v")
        .query(&mut c)
        .expect("SET");
    assert_eq!(int(&mut c, &["TTL", "p"]), -1);
    assert_eq!(int(&mut c, &["PEXPIRETIME", "p"]), -1);
    assert_eq!(int(&mut c, &["EXPIRE", "p", "100"]), 1);
    let ttl = int(&mut c, &["TTL", "p"]);
    assert!((90..=100).contains(&ttl), "TTL {ttl}");
    let pttl = int(&mut c, &["PTTL", "p"]);
    assert!((90_000..=100_000).contains(&pttl), "PTTL {pttl}");
    let at = int(&mut c, &["PEXPIRETIME", "p"]);
    assert_eq!(
        int(&mut c, &["EXPIRETIME", "p"]),
        (at + 500) / 1000,
        "rounded as Redis does"
    );
    // Conditions.
    assert_eq!(int(&mut c, &["EXPIRE", "p", "50", "NX"]), 0);
    assert_eq!(int(&mut c, &["EXPIRE", "p", "50", "GT"]), 0);
    assert_eq!(int(&mut c, &["EXPIRE", "p", "50", "LT"]), 1);
    assert_eq!(int(&mut c, &["EXPIRE", "missing", "50"]), 0);
    assert_eq!(int(&mut c, &["PERSIST", "p"]), 1);
    assert_eq!(int(&mut c, &["PERSIST", "p"]), 0);
    assert_eq!(int(&mut c, &["TTL", "p"]), -1);
    // Errors.
    let err = redis::cmd("EXPIRE")
        .arg("p")
        .arg("10")
        .arg("NX")
        .arg("XX")
        .query::<i64>(&mut c)
        .expect_err("NX with XX");
    assert!(
        err.to_string()
            .contains("NX and XX, GT or LT options at the same time are not compatible"),
        "{err}"
    );
    let err = redis::cmd("EXPIRE")
        .arg("p")
        .arg("soon")
        .query::<i64>(&mut c)
        .expect_err("not an integer");
    assert!(err.to_string().contains("not an integer"), "{err}");
    // A deadline in the past deletes at once.
    assert_eq!(int(&mut c, &["EXPIRE", "p", "-1"]), 1);
    assert_eq!(get(&mut c, "p"), None);
}

#[test]
fn expired_keys_vanish_and_are_reclaimed_actively() {
    let server = Server::start(&["--fsync", "no"]);
    let mut c = server.conn();
    for i in 0..50 {
        let _: () = redis::cmd("SET")
            .arg(format!("short{i}"))
            .arg("v")
            .arg("PX")
            .arg(30)
            .query(&mut c)
            .expect("SET PX");
    }
    let _: () = redis::cmd("SET")
        .arg("stays")
        .arg("v")
        .query(&mut c)
        .expect("SET");
    // Never returned once the deadline passed...
    wait_until(Duration::from_secs(10), "short keys to expire", || {
        get(&mut c, "short0").is_none()
    });
    // ...and deleted from memory by the active expirer without anyone reading them.
    wait_until(
        Duration::from_secs(10),
        "DBSIZE to drop to 1 (active expiry)",
        || int(&mut c, &["DBSIZE"]) == 1,
    );
    let info: String = redis::cmd("INFO").arg("stats").query(&mut c).expect("INFO");
    assert!(info.contains("expired_keys:50"), "{info}");
}

#[test]
fn deadlines_survive_kill9_unchanged() {
    let dir = DataDir::new();
    let mut server = Server::start_in(&dir, &["--fsync", "always"]);
    let mut c = server.conn();
    let _: () = redis::cmd("SET")
        .arg("a")
        .arg("1")
        .arg("EX")
        .arg(1000)
        .query(&mut c)
        .expect("SET EX");
    let _: () = redis::cmd("SET")
        .arg("b")
        .arg("2")
        .query(&mut c)
        .expect("SET");
    assert_eq!(int(&mut c, &["PEXPIRE", "b", "500000"]), 1);
    let _: () = redis::cmd("SET")
        .arg("c")
        .arg("3")
        .arg("EX")
        .arg(1000)
        .query(&mut c)
        .expect("SET EX");
    assert_eq!(int(&mut c, &["PERSIST", "c"]), 1);
    let _: () = redis::cmd("SET")
        .arg("gone")
        .arg("x")
        .arg("PX")
        .arg(20)
        .query(&mut c)
        .expect("SET PX");
    let a_at = int(&mut c, &["PEXPIRETIME", "a"]);
    let b_at = int(&mut c, &["PEXPIRETIME", "b"]);
    wait_until(Duration::from_secs(10), "'gone' to expire", || {
        get(&mut c, "gone").is_none()
    });
    drop(c);
    server.kill9();
    server.restart();
    let mut c = server.conn();
    assert_eq!(
        int(&mut c, &["PEXPIRETIME", "a"]),
        a_at,
        "deadline of a moved"
    );
    assert_eq!(
        int(&mut c, &["PEXPIRETIME", "b"]),
        b_at,
        "deadline of b moved"
    );
    assert_eq!(
        int(&mut c, &["TTL", "c"]),
        -1,
        "PERSIST was undone by replay"
    );
    assert_eq!(get(&mut c, "gone"), None, "an expired key came back");
    assert_eq!(get(&mut c, "a").as_deref(), Some("1"));
}
