//! Snapshot transfer in a real three-node cluster (`kvstore server` processes on free
//! 127.0.0.1 ports, `tests/common/cluster.rs`).
//!
//! A follower is killed; the leader takes more writes and compacts past everything the
//! follower holds (small segments, and SAVE to be sure); the follower comes back, is
//! behind the leader's log start, and must catch up from the leader's snapshot: its
//! READONLY reads see every acknowledged write, and its own log starts at a snapshot at
//! or past the leader's. Every wait polls with a deadline.

mod common;

use common::cluster::Cluster;
use common::wait_until;
use std::path::Path;
use std::time::Duration;

/// How long a restarted follower may take to catch up (generous: the machine is shared).
const CATCH_UP: Duration = Duration::from_secs(60);

/// The indexes of the snapshot files in a data directory, and the first index of each
/// log segment.
fn log_files(dir: &Path) -> (Vec<u64>, Vec<u64>) {
    let mut snaps = Vec::new();
    let mut segs = Vec::new();
    for ent in std::fs::read_dir(dir).expect("read the data dir") {
        let name = ent.expect("dir entry").file_name();
        let name = name.to_string_lossy();
        if let Some(i) = name
            .strip_prefix("snapshot-")
            .and_then(|n| n.strip_suffix(".snap"))
        {
            snaps.push(i.parse().expect("snapshot index"));
        } else if let Some(i) = name
            .strip_prefix("wal-")
            .and_then(|n| n.strip_suffix(".log"))
        {
            segs.push(i.parse().expect("segment index"));
        }
    }
    snaps.sort();
    segs.sort();
    (snaps, segs)
}

#[test]
fn a_follower_behind_the_compacted_log_catches_up_from_the_snapshot() {
    let mut c = Cluster::start(
        3,
        &[
            "--fsync",
            "no",
            "--segment-size",
            "4096",
            "--compact-min-size",
            "16384",
            "--compact-percentage",
            "100",
        ],
    );
    let leader = c.wait_for_leader();
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    let mut expected = std::collections::BTreeMap::new();
    let mut w = c.conn(leader);
    for i in 0..50 {
        let (k, v) = (format!("key:{i}"), format!("first-{i}"));
        let () = redis::cmd("SET")
            .arg(&k)
            .arg(&v)
            .query(&mut w)
            .expect("SET with every node up");
        expected.insert(k, v);
    }
    c.kill9(follower);
    // Enough overwrites that the log is many segments and several times the live data:
    // the leader compacts on its own; SAVE makes sure it has compacted at the end.
    for i in 0..3000 {
        let (k, v) = (
            format!("key:{}", i % 400),
            format!("second-{i}-{}", "x".repeat(40)),
        );
        let () = redis::cmd("SET")
            .arg(&k)
            .arg(&v)
            .query(&mut w)
            .expect("SET with a majority up");
        expected.insert(k, v);
    }
    let () = redis::cmd("SAVE")
        .query(&mut w)
        .expect("SAVE on the leader");
    // The last acknowledged write: once the follower has it, it has every one.
    let () = redis::cmd("SET")
        .arg("marker")
        .arg("last")
        .query(&mut w)
        .expect("SET after SAVE");
    let leader_dir = c.node(leader).data_dir().path().to_path_buf();
    let (snaps, segs) = log_files(&leader_dir);
    let leader_snap = *snaps.last().expect("the leader has a snapshot after SAVE");
    assert!(
        segs.first().is_some_and(|&s| s > 100),
        "the leader's log no longer holds what the follower has: segments {segs:?}"
    );
    c.restart(follower);
    let mut r = c.conn(follower);
    let () = redis::cmd("READONLY")
        .query(&mut r)
        .expect("READONLY on the follower");
    wait_until(CATCH_UP, "the follower to catch up", || {
        redis::cmd("GET")
            .arg("marker")
            .query::<Option<String>>(&mut r)
            .is_ok_and(|v| v.as_deref() == Some("last"))
    });
    // Everything acknowledged is there (GETs on the follower's local copy: it has
    // caught up to the last write, so every earlier one is in).
    for (k, v) in &expected {
        let got: Option<String> = redis::cmd("GET").arg(k).query(&mut r).expect("GET");
        assert_eq!(got.as_deref(), Some(v.as_str()), "{k} on the follower");
    }
    // Its log starts at the snapshot it was sent (or a later one of its own).
    let (snaps, segs) = log_files(c.node(follower).data_dir().path());
    let snap = *snaps
        .last()
        .expect("the follower holds the snapshot it installed");
    assert!(
        snap >= leader_snap,
        "follower's snapshot {snap} older than the leader's {leader_snap}"
    );
    assert!(
        segs.first().is_some_and(|&s| s > 100),
        "the follower's log still starts before the snapshot: {segs:?}"
    );
    let log = c.node(follower).log();
    assert!(
        log.contains("installed a snapshot at index"),
        "the follower caught up without a snapshot? its log:\n{log}"
    );
    // It goes on following: a new write reaches it.
    let () = redis::cmd("SET")
        .arg("after")
        .arg("snapshot")
        .query(&mut w)
        .expect("SET after the catch-up");
    wait_until(
        CATCH_UP,
        "the follower to see a write after the snapshot",
        || {
            redis::cmd("GET")
                .arg("after")
                .query::<Option<String>>(&mut r)
                .is_ok_and(|v| v.as_deref() == Some("snapshot"))
        },
    );
}
