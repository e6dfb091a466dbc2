//! `dist/backup.sh` on a live server: while a writer keeps writing and small segments
//! and compaction thresholds make the server roll segments and compact under the copy,
//! the backup must start as a server holding every write acknowledged before the backup
//! began.

#![allow(dead_code)]

mod common;

use common::{DataDir, KVSTORE_BIN, Server};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[test]
fn a_hot_backup_holds_every_write_acknowledged_before_it() {
    let server = Server::start(&[
        "--segment-size",
        "16384",
        "--compact-min-size",
        "32768",
        "--compact-percentage",
        "10",
    ]);
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, port) = (acked.clone(), stop.clone(), server.port);
        std::thread::spawn(move || {
            let mut c = common::redis_conn(port);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Overwrites a few hundred keys, so compaction has garbage to drop.
                let _: () = redis::cmd("SET")
                    .arg(format!("k{}", i % 300))
                    .arg(format!("v{i}"))
                    .query(&mut c)
                    .expect("SET");
                let _: () = redis::cmd("SET")
                    .arg("last")
                    .arg(i)
                    .query(&mut c)
                    .expect("SET");
                acked.store(i, Ordering::SeqCst);
                i += 1;
            }
        })
    };
    common::wait_until(common::START_DEADLINE, "a few thousand writes", || {
        acked.load(Ordering::SeqCst) > 3000
    });
    let before = acked.load(Ordering::SeqCst);
    let out_dir = DataDir::new();
    let dest = out_dir.root().join("backup");
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/backup.sh"))
        .arg(server.data_dir().path())
        .arg(&dest)
        .env("KVSTORE_BIN", KVSTORE_BIN)
        .output()
        .expect("run dist/backup.sh");
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    assert!(
        out.status.success(),
        "backup.sh failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let info: String = redis::cmd("INFO")
        .arg("persistence")
        .query(&mut server.conn())
        .unwrap();
    assert!(
        !info.contains("log_compactions:0\r"),
        "the server never compacted, so the test proved less than it should: {info}"
    );

    // The copy starts, as a server of its own, with at least what was acknowledged.
    std::fs::remove_dir(out_dir.path()).unwrap();
    std::fs::rename(&dest, out_dir.path()).unwrap();
    let restored = Server::start_in(&out_dir, &[]);
    let mut c = restored.conn();
    let last: u64 = redis::cmd("GET").arg("last").query(&mut c).unwrap();
    assert!(
        last >= before,
        "backup has writes up to {last}, {before} were acknowledged"
    );
    // The copy is a prefix of the writes: each key holds the last value written to it
    // up to `last`, or the one write after it (`SET k` goes before `SET last`).
    for k in 0..300u64 {
        let newest = (0..=last).rev().find(|i| i % 300 == k).unwrap();
        let v: String = redis::cmd("GET")
            .arg(format!("k{k}"))
            .query(&mut c)
            .unwrap();
        let next = last + 1;
        assert!(
            v == format!("v{newest}") || (next % 300 == k && v == format!("v{next}")),
            "key k{k}: {v}, expected v{newest} (last = {last})"
        );
    }
}

#[test]
fn backup_refuses_to_overwrite() {
    let dir = DataDir::new();
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/backup.sh"))
        .arg(dir.root())
        .arg(dir.root())
        .env("KVSTORE_BIN", KVSTORE_BIN)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
}
