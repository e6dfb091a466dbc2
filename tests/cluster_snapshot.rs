//! Snapshot transfer in a real three-node cluster (`kvstore server` processes on free
//! 127.0.0.1 ports, `tests/common/cluster.rs`).
//!
//! A follower is killed; the leader takes more writes and compacts past everything the
//! follower holds (small segments, and SAVE to be sure); the follower comes back, is
//! behind the leader's log start, and must catch up from the leader's snapshot: its
//! READONLY reads see every acknowledged write, and its own log starts at a snapshot at
//! or past the leader's. The same for a leader that is killed and comes back to a log
//! compacted by its successor. And a leader-elect whose best acceptor compacted past its
//! log: it fetches the acceptor's snapshot before it serves. Every wait polls with a
//! deadline.

mod common;

use common::cluster::{Cluster, ELECTION_DEADLINE};
use common::wait_until;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a restarted node may take to catch up (generous: the machine is shared).
const CATCH_UP: Duration = Duration::from_secs(60);

/// Small segments and a low compaction threshold, so that a few thousand writes make the
/// members compact several times.
const ARGS: &[&str] = &[
    "--fsync",
    "no",
    "--segment-size",
    "4096",
    "--compact-min-size",
    "16384",
    "--compact-percentage",
    "100",
];

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

/// Writes to whichever node leads: a SET refused or cut off by a change of leader (an
/// election, or the highest id taking over when it comes back) is sent again to the new
/// leader. A SET is idempotent, so sending it twice is harmless.
struct Writer {
    leader: u64,
    conn: redis::Connection,
}

impl Writer {
    fn new(c: &mut Cluster) -> Writer {
        let leader = c.wait_for_leader();
        Writer {
            leader,
            conn: c.conn(leader),
        }
    }

    #[track_caller]
    fn set(&mut self, c: &mut Cluster, k: &str, v: &str) {
        let end = Instant::now() + ELECTION_DEADLINE;
        loop {
            let r: redis::RedisResult<()> = redis::cmd("SET").arg(k).arg(v).query(&mut self.conn);
            match r {
                Ok(()) => return,
                Err(e) if Instant::now() > end => panic!("SET {k} never succeeded: {e}"),
                Err(_) => {
                    self.leader = c.wait_for_leader();
                    self.conn = c.conn(self.leader);
                }
            }
        }
    }
}

/// Waits until node `id` leads and every other running node follows it.
#[track_caller]
fn wait_for_leader_to_be(c: &mut Cluster, id: u64) {
    wait_until(ELECTION_DEADLINE, &format!("node {id} to lead"), || {
        c.role(id).is_some_and(|(r, _)| r == "master")
    });
    assert_eq!(c.wait_for_leader(), id);
}

/// SETs `n` keys (`key:0`..`key:399`, overwritten) to `prefix-i` padded, recording them.
fn write_keys(
    c: &mut Cluster,
    w: &mut Writer,
    n: usize,
    prefix: &str,
    expected: &mut BTreeMap<String, String>,
) {
    for i in 0..n {
        let (k, v) = (
            format!("key:{}", i % 400),
            format!("{prefix}-{i}-{}", "x".repeat(40)),
        );
        w.set(c, &k, &v);
        expected.insert(k, v);
    }
}

/// Waits until node `id`'s local copy (READONLY) holds `marker` (the last acknowledged
/// write), then checks that it holds every pair of `expected`.
#[track_caller]
fn check_caught_up(c: &Cluster, id: u64, marker: &str, expected: &BTreeMap<String, String>) {
    let mut r = c.conn(id);
    let () = redis::cmd("READONLY").query(&mut r).expect("READONLY");
    wait_until(CATCH_UP, &format!("node {id} to catch up"), || {
        redis::cmd("GET")
            .arg("marker")
            .query::<Option<String>>(&mut r)
            .is_ok_and(|v| v.as_deref() == Some(marker))
    });
    for (k, v) in expected {
        let got: Option<String> = redis::cmd("GET").arg(k).query(&mut r).expect("GET");
        assert_eq!(got.as_deref(), Some(v.as_str()), "{k} on node {id}");
    }
}

#[track_caller]
fn assert_installed_a_snapshot(c: &Cluster, id: u64) {
    let log = c.node(id).log();
    assert!(
        log.contains("installed a snapshot at index"),
        "node {id} caught up without a snapshot? its log:\n{log}"
    );
}

#[test]
fn a_follower_behind_the_compacted_log_catches_up_from_the_snapshot() {
    let mut c = Cluster::start(3, ARGS);
    // Node 3, the highest id, leads once the election settles; node 1 never takes over.
    wait_for_leader_to_be(&mut c, 3);
    let mut w = Writer::new(&mut c);
    let mut expected = BTreeMap::new();
    write_keys(&mut c, &mut w, 50, "first", &mut expected);
    c.kill9(1);
    // Enough overwrites that the log is many segments and several times the live data:
    // the leader compacts on its own; SAVE makes sure it has compacted at the end.
    write_keys(&mut c, &mut w, 3000, "second", &mut expected);
    let () = redis::cmd("SAVE")
        .query(&mut c.conn(3))
        .expect("SAVE on the leader");
    // The last acknowledged write: once the follower has it, it has every one.
    w.set(&mut c, "marker", "one");
    let (snaps, segs) = log_files(c.node(3).data_dir().path());
    let leader_snap = *snaps.last().expect("the leader has a snapshot after SAVE");
    assert!(
        segs.first().is_some_and(|&s| s > 100),
        "the leader's log no longer holds what the follower has: segments {segs:?}"
    );
    c.restart(1);
    check_caught_up(&c, 1, "one", &expected);
    assert_installed_a_snapshot(&c, 1);
    // Its log starts at the snapshot it was sent (or a later one of its own).
    let (snaps, segs) = log_files(c.node(1).data_dir().path());
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
    // It goes on following: a new write reaches it.
    w.set(&mut c, "marker", "two");
    check_caught_up(&c, 1, "two", &expected);
}

#[test]
fn a_killed_leader_comes_back_to_a_compacted_log() {
    let mut c = Cluster::start(3, ARGS);
    wait_for_leader_to_be(&mut c, 3);
    let mut w = Writer::new(&mut c);
    let mut expected = BTreeMap::new();
    write_keys(&mut c, &mut w, 50, "first", &mut expected);
    c.kill9(3);
    wait_for_leader_to_be(&mut c, 2);
    write_keys(&mut c, &mut w, 3000, "second", &mut expected);
    let () = redis::cmd("SAVE")
        .query(&mut c.conn(2))
        .expect("SAVE on the new leader");
    w.set(&mut c, "marker", "one");
    // Node 3 comes back behind node 2's log start (and may take over once caught up).
    c.restart(3);
    check_caught_up(&c, 3, "one", &expected);
    assert_installed_a_snapshot(&c, 3);
    // Whoever leads now, the cluster takes writes and every node gets them.
    w.set(&mut c, "marker", "two");
    for id in 1..=3 {
        check_caught_up(&c, id, "two", &expected);
    }
}

/// Node 3 (the highest id, so the one the Bully election prefers) leads and is killed;
/// node 2 leads nodes 1 and 2 through many writes, both compact; node 2 is killed and
/// node 3 restarted: with node 1 it elects itself, and its best acceptor (node 1) holds
/// nothing it lacks one by one any more, so it fetches node 1's snapshot.
#[test]
fn a_leader_elect_fetches_the_snapshot_of_its_best_acceptor() {
    let mut c = Cluster::start(3, ARGS);
    wait_for_leader_to_be(&mut c, 3);
    let mut w = Writer::new(&mut c);
    let mut expected = BTreeMap::new();
    write_keys(&mut c, &mut w, 50, "first", &mut expected);
    c.kill9(3);
    wait_for_leader_to_be(&mut c, 2);
    write_keys(&mut c, &mut w, 3000, "second", &mut expected);
    w.set(&mut c, "marker", "one");
    // Node 1 has it all (quorum: the marker's ack needed it) and compacts it.
    check_caught_up(&c, 1, "one", &expected);
    let () = redis::cmd("SAVE")
        .query(&mut c.conn(1))
        .expect("SAVE on node 1");
    let (snaps, _) = log_files(c.node(1).data_dir().path());
    assert!(
        snaps.last().is_some_and(|&s| s > 1000),
        "node 1 compacted: {snaps:?}"
    );
    c.kill9(2);
    c.restart(3);
    wait_for_leader_to_be(&mut c, 3);
    let log = c.node(3).log();
    assert!(
        log.contains("asking node 1 for its snapshot"),
        "node 3 did not fetch node 1's snapshot? its log:\n{log}"
    );
    assert_installed_a_snapshot(&c, 3);
    w.set(&mut c, "marker", "two");
    check_caught_up(&c, 3, "two", &expected);
    c.restart(2);
    check_caught_up(&c, 2, "two", &expected);
}
