//! The cluster driver: the thread, clock, sockets and files around the pure node.
//!
//! A cluster member runs one [`Node`] (`node.rs`: election and replication rules, no I/O)
//! and this driver, which feeds it and carries out what it says:
//!
//! - **In:** peer messages (decoded from the frames `peer.rs` delivers on a channel), a
//!   tick every [`TICK`] (crossbeam's `tick`), and client writes: the store's flusher
//!   proposes each group-commit batch through [`Replicator::propose`].
//! - **Out:** the node's effects, strictly in order and all of them before the node is
//!   called again: messages to peers (queued on their links, never blocking), the meta
//!   saved and fsync'd, entries appended (then `persisted` once they are as durable as
//!   `--fsync` asks), a divergent suffix truncated, commits applied by the store (which
//!   answers the waiting clients), leadership gained or lost.
//!
//! Every call into the node happens with the store's log locked and then the node
//! locked ([`Store::with_log`]), on whichever thread calls it (the node thread, or the
//! flusher for a proposal): so the node's view of the log is always what the effects
//! made it, and nobody appends between a decision and its execution.
//!
//! After each call the driver publishes the node's role, epoch, leader and lease to the
//! [`ClusterState`] that connection threads read to decide whether to serve.

use crate::cluster::{ClusterState, FollowerInfo, Redirect, Role, RoleInfo};
use crate::config::{ClusterConfig, Replication as ReplicationMode};
use crate::message;
use crate::node::{Effect, Node, NodeConfig, Replication, Role as NodeRole};
use crate::peer::{Incoming, PeerNet};
use crate::store::{MemberLog, Replicator, Store, StoreError};
use crossbeam_channel::{Receiver, select};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The node's clock unit: every timer is a whole number of ticks.
pub const TICK: Duration = Duration::from_millis(10);

/// The frame kind of a node message on a peer link (0 is the link's own).
pub const NODE_MESSAGE: u8 = 1;

/// A cluster member's driver. See the module doc.
pub struct Driver {
    store: Store,
    net: Arc<PeerNet>,
    node: Mutex<Node>,
    state: Arc<ClusterState>,
    /// Client address of every member, this node's own included.
    addrs: HashMap<u64, String>,
}

fn ticks(d: Duration) -> u64 {
    (d.as_millis() / TICK.as_millis()).max(1) as u64
}

/// The node's settings from the command line's.
pub fn node_config(cfg: &ClusterConfig) -> NodeConfig {
    let mut n = NodeConfig::new(cfg.id, cfg.peers.iter().map(|p| p.id).collect());
    n.heartbeat_ticks = ticks(cfg.heartbeat);
    n.failure_ticks = ticks(cfg.failure_timeout);
    n.lease_ticks = ticks(cfg.lease);
    // A candidate waits about two heartbeats for answers, accepts and pre-votes: a
    // live peer answers within one round trip, far less than a heartbeat.
    n.election_ticks = (2 * n.heartbeat_ticks).min(n.failure_ticks / 2).max(1);
    n.replication = match cfg.replication {
        ReplicationMode::Async => Replication::Async,
        ReplicationMode::Quorum => Replication::Quorum,
        ReplicationMode::All => Replication::All,
    };
    n
}

impl Driver {
    /// Restores the node from the store's log, makes the store propose through it, and
    /// starts the node thread. `own_addr` is this node's client address (for MOVED).
    pub fn start(
        store: Store,
        cfg: &ClusterConfig,
        own_addr: String,
        net: Arc<PeerNet>,
        incoming: Receiver<Incoming>,
        state: Arc<ClusterState>,
    ) -> Result<Arc<Driver>, String> {
        let node_cfg = node_config(cfg);
        node_cfg.validate()?;
        let node = store.with_log(|log| Node::new(node_cfg, log.log()));
        let mut addrs: HashMap<u64, String> =
            cfg.peers.iter().map(|p| (p.id, p.addr.clone())).collect();
        addrs.insert(cfg.id, own_addr);
        let driver = Arc::new(Driver {
            store: store.clone(),
            net,
            node: Mutex::new(node),
            state,
            addrs,
        });
        store.set_replicator(driver.clone());
        store.with_log(|log| driver.publish(&driver.node.lock(), log));
        let d = driver.clone();
        std::thread::Builder::new()
            .name("node".into())
            .spawn(move || d.run(incoming))
            .map_err(|e| format!("cannot start the node thread: {e}"))?;
        Ok(driver)
    }

    /// The node thread: messages and ticks until the peer links close.
    fn run(&self, incoming: Receiver<Incoming>) {
        let ticker = crossbeam_channel::tick(TICK);
        loop {
            select! {
                recv(incoming) -> m => match m {
                    Ok(m) if m.kind == NODE_MESSAGE => match message::decode(&m.payload) {
                        Ok(msg) => self.call(|node, log| node.step(log, m.from, msg)),
                        Err(e) => log::warn!("node {}: undecodable message dropped: {e}", m.from),
                    },
                    Ok(_) => {}
                    Err(_) => return,
                },
                recv(ticker) -> _ => self.call(|node, log| node.tick(log)),
            }
        }
    }

    /// One call into the node, with the log and the node locked, and its effects.
    fn call(
        &self,
        f: impl FnOnce(&mut Node, &dyn crate::log::LogStore) -> Vec<Effect>,
    ) {
        self.store.with_log(|log| {
            let mut node = self.node.lock();
            let fx = f(&mut node, log.log());
            if let Err(e) = self.execute(&mut node, log, fx) {
                log::error!("cluster node: {e}");
            }
            self.publish(&node, log);
        });
    }

    /// Carries out `fx` in order; then, if entries were appended, tells the node how far
    /// the log is durable and carries out what that brings, and so on.
    fn execute(
        &self,
        node: &mut Node,
        log: &mut MemberLog<'_>,
        fx: Vec<Effect>,
    ) -> Result<(), StoreError> {
        let mut fx: VecDeque<Effect> = fx.into();
        loop {
            let mut persisted = None;
            while let Some(effect) = fx.pop_front() {
                match effect {
                    Effect::Send { to, msg } => {
                        // Best effort: the protocol resends what is lost.
                        let _ = self.net.send(to, NODE_MESSAGE, message::encode(&msg));
                    }
                    Effect::SaveMeta(meta) => log.save_meta(meta)?,
                    Effect::Append(entries) => persisted = Some(log.append(&entries)?),
                    Effect::Truncate { after } => log.truncate_after(after)?,
                    Effect::Commit(index) => log.commit_to(index),
                    Effect::BecomeLeader { epoch } => {
                        log::info!("leading epoch {epoch}");
                        self.store.set_expiring(true);
                    }
                    Effect::StepDown { epoch, leader } => {
                        match leader {
                            Some(l) => log::info!("stepped down in epoch {epoch}: node {l} leads"),
                            None => log::info!("stepped down in epoch {epoch}"),
                        }
                        self.store.set_expiring(false);
                        log.fail_waiting("this node stopped leading before it was committed");
                    }
                    Effect::SendSnapshot { to } => {
                        log::warn!(
                            "node {to} needs a snapshot to catch up; snapshot transfer is not \
                             implemented yet"
                        );
                    }
                    Effect::FetchSnapshot { from } => {
                        log::warn!(
                            "this node needs node {from}'s snapshot; snapshot transfer is not \
                             implemented yet"
                        );
                    }
                }
            }
            match persisted {
                Some(index) => fx.extend(node.persisted(log.log(), index)),
                None => return Ok(()),
            }
        }
    }

    /// Publishes the node's state for the connection threads.
    fn publish(&self, node: &Node, log: &MemberLog<'_>) {
        let st = node.status();
        let last_index = log.log().last().0;
        let serving = node.can_read();
        let role = match st.role {
            NodeRole::Leader => Role::Leader,
            NodeRole::Follower => Role::Follower,
            NodeRole::Candidate => Role::Candidate,
        };
        let followers = st
            .followers
            .iter()
            .map(|&(id, acked)| FollowerInfo {
                id,
                addr: self.addrs.get(&id).cloned().unwrap_or_default(),
                connected: self.net.is_connected(id),
                acked,
                lag: last_index.saturating_sub(acked),
            })
            .collect();
        self.state.publish(RoleInfo {
            node_id: st.id,
            role,
            epoch: st.epoch,
            leader: st.leader,
            leader_addr: st.leader.and_then(|l| self.addrs.get(&l).cloned()),
            leader_link_up: st.leader.is_some_and(|l| self.net.is_connected(l)),
            commit: st.commit,
            last_index,
            followers,
            // The node checks its lease on each tick: what it says now holds until the
            // next one (the lease is shorter than the failure timeout by more than that).
            lease_until: serving.then(|| Instant::now() + TICK),
            handing_over: false,
        });
    }

    fn redirect(&self, leader: Option<u64>) -> Redirect {
        match leader.and_then(|l| self.addrs.get(&l)) {
            Some(addr) => Redirect::Moved(addr.clone()),
            None => Redirect::NoLeader,
        }
    }
}

impl Replicator for Driver {
    fn propose(
        &self,
        log: &mut MemberLog<'_>,
        payloads: Vec<Vec<u8>>,
    ) -> Result<u64, StoreError> {
        let mut node = self.node.lock();
        match node.propose_batch(log.log(), payloads) {
            Err(not) => Err(StoreError::Redirect(self.redirect(not.leader).reply())),
            Ok((first, fx)) => {
                let r = self.execute(&mut node, log, fx);
                self.publish(&node, log);
                r.map(|()| first)
            }
        }
    }
}
