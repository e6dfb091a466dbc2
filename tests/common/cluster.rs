//! A cluster of real `kvstore` processes for the integration tests, with a [`Proxy`]
//! in front of every peer address so a test can partition nodes for real.
//!
//! Node `i` (ids 1..=n; the highest id has the highest Bully priority) listens on its own
//! free port; for every other node `j` it is told the address of the proxy `i → j`,
//! written `ID@127.0.0.1:PORT` because the proxy's port is not `j`'s own. Cutting proxy
//! `i → j` stops what `i` sends `j` (and the replies on those connections); cutting both
//! directions of every pair across two groups is a partition. Clients talk to nodes
//! directly, never through a proxy.
//!
//! Every wait polls with a deadline ([`wait_until`]); nothing sleeps and hopes.

use super::proxy::Proxy;
use super::{DataDir, Server, free_port, redis_conn, wait_until};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// The cluster secret the tests use.
pub const SECRET: &str = "integration-test-secret";
/// How long an election may take in a test (generous: the machine is shared).
pub const ELECTION_DEADLINE: Duration = Duration::from_secs(20);

pub struct Cluster {
    /// Node `id` is `nodes[id - 1]`; `None` while it is stopped for good.
    nodes: Vec<Server>,
    ports: Vec<u16>,
    /// `proxies[(from, to)]`: the proxy `from` dials to reach `to`.
    proxies: HashMap<(u64, u64), Proxy>,
    dirs: Vec<DataDir>,
    extra: Vec<String>,
}

impl Cluster {
    /// Starts `n` nodes (ids 1..=n) with `extra` arguments each, and returns once each
    /// answers PING (not necessarily once a leader is elected: see
    /// [`Cluster::wait_for_leader`]).
    #[track_caller]
    pub fn start(n: u64, extra: &[&str]) -> Cluster {
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut proxies = HashMap::new();
        for from in 1..=n {
            for to in 1..=n {
                if from != to {
                    let target = SocketAddr::from(([127, 0, 0, 1], ports[(to - 1) as usize]));
                    proxies.insert((from, to), Proxy::start(target));
                }
            }
        }
        let dirs: Vec<DataDir> = (0..n).map(|_| DataDir::new()).collect();
        let mut c = Cluster {
            nodes: Vec::new(),
            ports,
            proxies,
            dirs,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for id in 1..=n {
            let args = c.args(id);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let port = c.ports[(id - 1) as usize];
            c.nodes
                .push(Server::start_with(&c.dirs[(id - 1) as usize], port, &args));
        }
        c
    }

    /// The command-line arguments of node `id` (after `server PORT --data-dir DIR`).
    pub fn args(&self, id: u64) -> Vec<String> {
        let n = self.ports.len() as u64;
        let peers: Vec<String> = (1..=n)
            .filter(|&j| j != id)
            .map(|j| format!("{j}@127.0.0.1:{}", self.proxies[&(id, j)].port()))
            .collect();
        let mut args = vec![
            peers.join(","),
            "--id".to_string(),
            id.to_string(),
            "--cluster-secret".to_string(),
            SECRET.to_string(),
        ];
        args.extend(self.extra.iter().cloned());
        args
    }

    pub fn size(&self) -> u64 {
        self.nodes.len() as u64
    }

    pub fn node(&self, id: u64) -> &Server {
        &self.nodes[(id - 1) as usize]
    }

    pub fn node_mut(&mut self, id: u64) -> &mut Server {
        &mut self.nodes[(id - 1) as usize]
    }

    pub fn port(&self, id: u64) -> u16 {
        self.ports[(id - 1) as usize]
    }

    /// A client connection to node `id` (direct, no proxy).
    pub fn conn(&self, id: u64) -> redis::Connection {
        redis_conn(self.port(id))
    }

    /// `INFO replication` of node `id` as fields, or None if it does not answer.
    pub fn replication(&self, id: u64) -> Option<HashMap<String, String>> {
        let mut c = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port(id)))
            .ok()?
            .get_connection_with_timeout(Duration::from_secs(2))
            .ok()?;
        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
        let info: String = redis::cmd("INFO").arg("replication").query(&mut c).ok()?;
        Some(
            info.lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect(),
        )
    }

    /// (role, epoch) of node `id`, read together from one INFO.
    pub fn role(&self, id: u64) -> Option<(String, u64)> {
        let f = self.replication(id)?;
        Some((f.get("role")?.clone(), f.get("epoch")?.parse().ok()?))
    }

    /// The ids of running nodes that say they lead, with their epochs.
    pub fn leaders(&mut self) -> Vec<(u64, u64)> {
        let running: Vec<u64> = (1..=self.size())
            .filter(|&id| self.node_mut(id).is_running())
            .collect();
        running
            .into_iter()
            .filter_map(|id| match self.role(id)? {
                (role, epoch) if role == "master" => Some((id, epoch)),
                _ => None,
            })
            .collect()
    }

    /// Waits until exactly one of the nodes in `among` leads and every other node of
    /// `among` names it as leader; returns its id.
    #[track_caller]
    pub fn wait_for_leader_among(&mut self, among: &[u64]) -> u64 {
        let mut found = 0;
        wait_until(
            ELECTION_DEADLINE,
            "one leader that the others follow",
            || {
                let leaders: Vec<u64> = among
                    .iter()
                    .copied()
                    .filter(|&id| self.role(id).is_some_and(|(r, _)| r == "master"))
                    .collect();
                let [leader] = leaders[..] else {
                    return false;
                };
                let follows = among.iter().filter(|&&id| id != leader).all(|&id| {
                    self.replication(id)
                        .and_then(|f| f.get("leader_id").cloned())
                        .is_some_and(|l| l == leader.to_string())
                });
                found = leader;
                follows
            },
        );
        found
    }

    /// [`Cluster::wait_for_leader_among`] every running node.
    #[track_caller]
    pub fn wait_for_leader(&mut self) -> u64 {
        let running: Vec<u64> = (1..=self.size())
            .filter(|&id| self.node_mut(id).is_running())
            .collect();
        self.wait_for_leader_among(&running)
    }

    pub fn kill9(&mut self, id: u64) {
        self.node_mut(id).kill9();
    }

    #[track_caller]
    pub fn restart(&mut self, id: u64) {
        self.node_mut(id).restart();
    }

    pub fn pause(&mut self, id: u64) {
        self.node_mut(id).pause();
    }

    pub fn resume(&mut self, id: u64) {
        self.node_mut(id).resume();
    }

    /// Cuts every link between nodes of different groups, both ways. Nodes in no
    /// group keep their links.
    pub fn partition(&self, groups: &[&[u64]]) {
        for (gi, a) in groups.iter().enumerate() {
            for (gj, b) in groups.iter().enumerate() {
                if gi == gj {
                    continue;
                }
                for &from in a.iter() {
                    for &to in b.iter() {
                        self.proxies[&(from, to)].cut();
                    }
                }
            }
        }
    }

    /// Cuts node `id` off from every other node.
    pub fn isolate(&self, id: u64) {
        let others: Vec<u64> = (1..=self.size()).filter(|&j| j != id).collect();
        self.partition(&[&[id], &others]);
    }

    /// What `from` sends `to` is lost from now on (the other way still flows).
    pub fn cut_one_way(&self, from: u64, to: u64) {
        self.proxies[&(from, to)].blackhole(true, false);
        self.proxies[&(to, from)].blackhole(false, true);
    }

    /// Every link forwards again.
    pub fn heal(&self) {
        for p in self.proxies.values() {
            p.heal();
        }
    }

    /// The proxy `from` dials to reach `to`.
    pub fn proxy(&self, from: u64, to: u64) -> &Proxy {
        &self.proxies[&(from, to)]
    }
}
