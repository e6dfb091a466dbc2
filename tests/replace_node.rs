//! Replacing a dead node as the README says: a new process with the same id and
//! address and an empty data directory catches up from the leader and then counts
//! towards the majority, so the cluster survives losing another node afterwards with
//! every acknowledged write.

#![allow(dead_code)]

mod common;

use common::cluster::Cluster;
use common::cluster::ELECTION_DEADLINE;
use common::wait_until;

fn set(c: &mut redis::Connection, k: &str, v: &str) {
    let _: () = redis::cmd("SET").arg(k).arg(v).query(c).expect("SET");
}

#[test]
fn a_node_replaced_with_an_empty_directory_catches_up_and_counts_again() {
    // Small compaction thresholds: the leader compacts, so the newcomer needs its
    // snapshot, not just the log.
    let mut cluster = Cluster::start(
        3,
        &[
            "--segment-size",
            "8192",
            "--compact-min-size",
            "16384",
            "--compact-percentage",
            "10",
        ],
    );
    let leader = cluster.wait_for_leader();
    let mut c = cluster.conn(leader);
    for i in 0..300 {
        set(&mut c, &format!("k{}", i % 50), &format!("before{i}"));
    }
    let replaced = (1..=3).find(|&i| i != leader).expect("a follower");
    let other = (1..=3)
        .find(|&i| i != leader && i != replaced)
        .expect("another");

    // The machine dies with its disk: kill it and empty its data directory.
    cluster.kill9(replaced);
    let dir = cluster.node(replaced).data_dir().path().to_path_buf();
    for entry in std::fs::read_dir(&dir).expect("data dir") {
        let p = entry.expect("entry").path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p).expect("remove");
        } else {
            std::fs::remove_file(&p).expect("remove");
        }
    }
    for i in 0..300 {
        set(&mut c, &format!("k{}", i % 50), &format!("while-down{i}"));
    }
    // Its replacement: same id, same address, nothing on disk.
    cluster.restart(replaced);
    let leader_last = || {
        cluster
            .replication(leader)
            .and_then(|f| f.get("last_index")?.parse::<u64>().ok())
    };
    let target = leader_last().expect("leader's last index");
    wait_until(ELECTION_DEADLINE * 3, "the replacement to catch up", || {
        cluster
            .replication(replaced)
            .and_then(|f| f.get("commit_index")?.parse::<u64>().ok())
            .is_some_and(|i| i >= target)
    });

    // Now lose the other follower: the leader and the replacement are the majority.
    cluster.kill9(other);
    let leader = cluster.wait_for_leader_among(&[leader, replaced]);
    let mut c = cluster.conn(leader);
    set(&mut c, "after", "yes");
    for k in 0..50 {
        let v: String = redis::cmd("GET")
            .arg(format!("k{k}"))
            .query(&mut c)
            .unwrap();
        let newest = (0..300).rev().find(|i| i % 50 == k).unwrap();
        assert_eq!(v, format!("while-down{newest}"), "k{k}");
    }
    // And the replacement holds the same data itself.
    let mut r = cluster.conn(replaced);
    let _: () = redis::cmd("READONLY").query(&mut r).unwrap();
    wait_until(
        ELECTION_DEADLINE,
        "the replacement to apply 'after'",
        || {
            redis::cmd("GET")
                .arg("after")
                .query::<Option<String>>(&mut r)
                .ok()
                .flatten()
                .is_some()
        },
    );
}
