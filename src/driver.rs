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
//!   answers the waiting clients), leadership gained or lost. The messages already
//!   waiting when the node thread wakes are stepped together and the entries they bring
//!   fsync'd once, after the last of them ([`Driver::step_all`]): a follower's group
//!   commit.
//!
//! Every call into the node happens with the store's log locked and then the node
//! locked ([`Store::with_log`]), on whichever thread calls it (the node thread, or the
//! flusher for a proposal): so the node's view of the log is always what the effects
//! made it, and nobody appends between a decision and its execution.
//!
//! **Snapshots** (the node's `SendSnapshot` and `FetchSnapshot`) travel as frames of
//! kind [`SNAPSHOT_MESSAGE`] (`snapshot_transfer.rs`). The sender of a snapshot is a
//! thread per transfer, at most one per peer: it finds the newest snapshot file (taking
//! one first if none covers what the peer lacks) and streams it a chunk per ack. The
//! receiver reassembles on the node thread into a temp file and, once whole and checked,
//! installs it with the log locked ([`MemberLog::install_snapshot`]) and tells the node
//! ([`Node::snapshot_installed`]). A transfer whose link drops, whose sender stops being
//! the leader, or that outlives the epoch it began in is abandoned (temp file removed);
//! the node asks again.
//!
//! After each call the driver publishes the node's role, epoch, leader and lease to the
//! [`ClusterState`] that connection threads read to decide whether to serve.

use crate::cluster::{ClusterState, FollowerInfo, Redirect, Role, RoleInfo};
use crate::config::{ClusterConfig, Replication as ReplicationMode};
use crate::message;
use crate::node::{Effect, Node, NodeConfig, Replication, Role as NodeRole};
use crate::peer::{Incoming, PeerNet};
use crate::snapshot_transfer::{Chunk, Reassembly, SNAPSHOT_MESSAGE, SnapMsg, send_file};
use crate::store::{MemberLog, Replicator, Store, StoreError};
use crossbeam_channel::{Receiver, Sender, select};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The node's clock unit: every timer is a whole number of ticks.
pub const TICK: Duration = Duration::from_millis(10);

/// The frame kind of a node message on a peer link (0 is the link's own).
pub const NODE_MESSAGE: u8 = 1;

/// At most this many waiting node messages are stepped under one lock and one fsync, so
/// that ticks and proposals are not held off for long.
const MAX_STEP_BATCH: usize = 64;

/// A cluster member's driver. See the module doc.
pub struct Driver {
    store: Store,
    net: Arc<PeerNet>,
    node: Mutex<Node>,
    state: Arc<ClusterState>,
    /// Client address of every member, this node's own included.
    addrs: HashMap<u64, String>,
    /// When each recent tick was given to the node (its number, the instant), so that a
    /// lease counted in ticks becomes a wall-clock deadline.
    ticks: Mutex<VecDeque<(u64, Instant)>>,
    /// The lease, as the node's settings say it.
    lease: Duration,
    /// Snapshot transfers under way.
    transfers: Transfers,
    /// A transfer with no progress for this long is given up (either side).
    stall: Duration,
}

/// The snapshot transfers of a driver (module doc, "Snapshots").
#[derive(Default)]
struct Transfers {
    /// The sender threads running, by the peer each sends to, with the channel on which
    /// the node thread forwards that peer's acks. A thread removes its own entry.
    sending: Arc<Mutex<HashMap<u64, Sender<SnapMsg>>>>,
    /// The snapshot being received (touched on the node thread only).
    receiving: Mutex<Option<Receiving>>,
    /// The peer this node asked for its snapshot (`FetchSnapshot`), and in which epoch:
    /// only its chunks are taken while this node does not follow it.
    fetching: Mutex<Option<(u64, u64)>>,
    /// By peer: the newest snapshot index it gave up (refused) since its last transfer
    /// that completed. The next one sent to it must be newer: a node whose committed
    /// entries diverged (async replication) holds a snapshot of its own at the leader's
    /// index and refuses it, and sending it again and again would never repair the
    /// node (found by tests/nemesis.rs in async mode: a node asked for and refused the
    /// same snapshot every 150 ms, for good).
    refused: Arc<Mutex<HashMap<u64, u64>>>,
    /// Peers that acknowledged a chunk of the transfer now running to them: an `Abort`
    /// after that gave up a transfer under way (a link drop, an epoch change), which
    /// the same snapshot may finish later; only one before it is a refusal.
    started: Mutex<std::collections::HashSet<u64>>,
}

struct Receiving {
    from: u64,
    asm: Reassembly,
    /// The node's epoch when the transfer began: it is abandoned when that changes.
    node_epoch: u64,
    /// Pushed by our leader (`SendSnapshot`), rather than fetched: abandoned when the
    /// node follows another.
    pushed: bool,
    last_chunk: Instant,
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
        let node_lease_ticks = node_cfg.lease_ticks;
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
            ticks: Mutex::new(VecDeque::new()),
            lease: TICK * node_lease_ticks as u32,
            transfers: Transfers::default(),
            // Generous: a chunk is acknowledged within a round trip, but the machine may
            // be busy; a stalled transfer only delays the next attempt by this much.
            stall: (cfg.failure_timeout * 4).max(Duration::from_secs(2)),
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
                    Ok(m) if m.kind == NODE_MESSAGE => {
                        // Every node message already waiting is stepped in one go, with
                        // one fsync for all the entries they bring (group commit on a
                        // follower: it keeps up with a leader that sends an `Append`
                        // per batch while the last one is still being synced).
                        let mut batch = vec![m];
                        let mut other = None;
                        while batch.len() < MAX_STEP_BATCH {
                            match incoming.try_recv() {
                                Ok(m) if m.kind == NODE_MESSAGE => batch.push(m),
                                Ok(m) => {
                                    other = Some(m);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        self.step_all(batch);
                        if let Some(m) = other {
                            self.on_other(m);
                        }
                    }
                    Ok(m) => self.on_other(m),
                    Err(_) => return,
                },
                recv(ticker) -> _ => {
                    self.call(|node, log| {
                        // Recorded as the tick is given: messages of tick t are sent at
                        // or after this instant, so a lease counted from it ends no
                        // later than the real one.
                        let mut t = self.ticks.lock();
                        let n = t.back().map_or(1, |&(n, _)| n + 1);
                        t.push_back((n, Instant::now()));
                        let keep = 4 * self.lease.as_millis() / TICK.as_millis() + 16;
                        while t.len() as u128 > keep {
                            t.pop_front();
                        }
                        drop(t);
                        node.tick(log)
                    });
                    self.state.note_tick();
                    self.check_receiving();
                }
            }
        }
    }

    /// One call into the node, with the log and the node locked, and its effects.
    fn call(&self, f: impl FnOnce(&mut Node, &dyn crate::log::LogStore) -> Vec<Effect>) {
        self.store.with_log(|log| {
            let mut node = self.node.lock();
            let fx = f(&mut node, log.log());
            if let Err(e) = self.execute(&mut node, log, fx) {
                log::error!("cluster node: {e}");
            }
            self.publish(&node, log);
        });
    }

    /// A frame that is not a node message: a snapshot transfer's, or one of a kind this
    /// version does not know (ignored).
    fn on_other(&self, m: Incoming) {
        if m.kind == SNAPSHOT_MESSAGE {
            match SnapMsg::decode(&m.payload) {
                Ok(msg) => self.on_snapshot_message(m.from, msg),
                Err(e) => log::warn!("node {}: bad snapshot message dropped: {e}", m.from),
            }
        }
    }

    /// Steps the node through `batch` (node messages, in arrival order) with the log and
    /// the node locked once. Entries they bring are written as each message asks but
    /// fsync'd once, after the last: only then does the node hear that they are durable
    /// (and acknowledge them), so nothing is acknowledged before its fsync.
    fn step_all(&self, batch: Vec<Incoming>) {
        self.store.with_log(|log| {
            let mut node = self.node.lock();
            let mut result = Ok(());
            for m in batch {
                match message::decode(&m.payload) {
                    Ok(msg) => {
                        let fx = node.step(log.log(), m.from, msg);
                        result = self.execute_with(&mut node, log, fx, false);
                        if result.is_err() {
                            break;
                        }
                    }
                    Err(e) => log::warn!("node {}: undecodable message dropped: {e}", m.from),
                }
            }
            if result.is_ok() {
                result = log.sync().and_then(|index| {
                    let fx = node.persisted(log.log(), index);
                    self.execute(&mut node, log, fx)
                });
            }
            if let Err(e) = result {
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
        self.execute_with(node, log, fx, true)
    }

    /// [`Driver::execute`]; with `sync` false, appended entries are not fsync'd (under
    /// `--fsync always`) and the node hears only what was already durable: the caller
    /// syncs and calls `persisted` afterwards.
    fn execute_with(
        &self,
        node: &mut Node,
        log: &mut MemberLog<'_>,
        fx: Vec<Effect>,
        sync: bool,
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
                    Effect::Append(entries) if sync => persisted = Some(log.append(&entries)?),
                    Effect::Append(entries) => persisted = Some(log.append_unsynced(&entries)?),
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
                    Effect::SendSnapshot { to } => self.start_sending(to, log.log().snapshot().0),
                    Effect::FetchSnapshot { from } => {
                        let epoch = node.status().epoch;
                        let asked = self.transfers.fetching.lock().replace((from, epoch));
                        let receiving = self
                            .transfers
                            .receiving
                            .lock()
                            .as_ref()
                            .is_some_and(|r| r.from == from);
                        // Asked already in this epoch and under way: the transfer goes on.
                        if asked != Some((from, epoch)) || !receiving {
                            log::info!("asking node {from} for its snapshot");
                            self.send_snap(from, SnapMsg::Request);
                        }
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
            // The lease as a wall-clock deadline (from when the message a majority
            // acknowledged was sent), so connection threads stop serving at that
            // instant even if the node thread is late, and keep serving while it holds
            // even if the node thread is busy (waiting for the log during a long fsync).
            lease_until: if serving {
                self.lease_deadline(node)
            } else {
                None
            },
            handing_over: false,
        });
    }

    // -----------------------------------------------------------------------------------
    // Snapshot transfer (module doc, "Snapshots")

    fn send_snap(&self, to: u64, msg: SnapMsg) {
        // Best effort, as node messages: a lost one stalls the transfer, which is retried.
        let _ = self.net.send(to, SNAPSHOT_MESSAGE, msg.encode());
    }

    /// Starts a sender thread for `to`, unless one runs: the node asks again (rate
    /// limited) while a transfer is under way. `log_start` is this log's snapshot index:
    /// what `to` lacks is at or below it, so the snapshot sent must reach it.
    fn start_sending(&self, to: u64, log_start: u64) {
        if !self.net.is_connected(to) {
            // Chunks would wait in the link's queue and reach it stale when it comes
            // back; the node asks again by then.
            return;
        }
        let mut sending = self.transfers.sending.lock();
        if sending.contains_key(&to) {
            return;
        }
        let (tx, rx) = crossbeam_channel::bounded(64);
        sending.insert(to, tx);
        drop(sending);
        let (store, net, stall) = (self.store.clone(), self.net.clone(), self.stall);
        let map = self.transfers.sending.clone();
        let refused = self.transfers.refused.clone();
        self.transfers.started.lock().remove(&to);
        // Past what it refused last: when no snapshot is that new, the sender takes one.
        let log_start = match refused.lock().get(&to) {
            Some(&index) => log_start.max(index + 1),
            None => log_start,
        };
        let spawned = std::thread::Builder::new()
            .name(format!("snapshot-to-{to}"))
            .spawn(move || {
                match send_snapshot(&store, &net, to, log_start, &rx, stall) {
                    Ok(index) => {
                        log::info!("sent node {to} the snapshot at index {index}");
                        refused.lock().remove(&to);
                    }
                    Err(e) => log::warn!("snapshot transfer to node {to} given up: {e}"),
                }
                map.lock().remove(&to);
            });
        if let Err(e) = spawned {
            log::error!("cannot start a snapshot sender: {e}");
            self.transfers.sending.lock().remove(&to);
        }
    }

    /// A snapshot transfer message from `from` (on the node thread).
    fn on_snapshot_message(&self, from: u64, msg: SnapMsg) {
        match msg {
            SnapMsg::Request => {
                let log_start = self.store.with_log(|log| log.log().snapshot().0);
                log::info!("node {from} asks for this node's snapshot");
                self.start_sending(from, log_start);
            }
            SnapMsg::Ack { .. } | SnapMsg::Abort { .. } => {
                match &msg {
                    SnapMsg::Ack { .. } => {
                        self.transfers.started.lock().insert(from);
                    }
                    SnapMsg::Abort { index } if !self.transfers.started.lock().contains(&from) => {
                        let mut refused = self.transfers.refused.lock();
                        let newest = refused.entry(from).or_insert(*index);
                        *newest = (*newest).max(*index);
                    }
                    _ => {}
                }
                if let Some(tx) = self.transfers.sending.lock().get(&from) {
                    let _ = tx.try_send(msg);
                }
            }
            SnapMsg::Chunk(c) => self.on_chunk(from, c),
        }
    }

    /// A chunk from `from`: starts, continues or completes the transfer; a complete one is
    /// installed.
    fn on_chunk(&self, from: u64, c: Chunk) {
        let index = c.index;
        // Node and log state first: the transfer's lock is never held while taking them.
        let (epoch, leader, role, diverged) = {
            let node = self.node.lock();
            let st = node.status();
            (st.epoch, st.leader, st.role, node.diverged)
        };
        let pushed = leader == Some(from) && role == NodeRole::Follower;
        let fetched = *self.transfers.fetching.lock() == Some((from, epoch));
        let start = if c.offset == 0 {
            let (snap, applied) = self
                .store
                .with_log(|log| (log.log().snapshot().0, log.applied_index()));
            if !pushed && !fetched {
                Err(format!(
                    "node {from} is not this node's leader and was not asked"
                ))
            } else if index <= snap || (index < applied && !diverged) {
                // Only a diverged node goes back: the others already have this state.
                Err(format!(
                    "this node has the state at {} already",
                    if index <= snap { snap } else { applied }
                ))
            } else {
                Ok(())
            }
        } else {
            Ok(())
        };
        let mut rx = self.transfers.receiving.lock();
        if c.offset == 0
            && rx
                .as_ref()
                .is_some_and(|r| r.from == from && r.asm.index > index)
        {
            // The start of an older transfer from the same sender, delivered late: the
            // newer one goes on.
            return;
        }
        let result = match start {
            Err(why) => Err(why),
            Ok(()) if c.offset == 0 => {
                // A new transfer replaces any earlier one (its temp file goes first: the
                // new one reuses the name).
                *rx = None;
                Reassembly::start(self.store.dir(), c)
                    .map(|(asm, done)| {
                        log::info!(
                            "receiving the snapshot at index {} from node {from}",
                            asm.index
                        );
                        *rx = Some(Receiving {
                            from,
                            asm,
                            node_epoch: epoch,
                            pushed,
                            last_chunk: Instant::now(),
                        });
                        done
                    })
                    .map_err(|e| e.to_string())
            }
            Ok(()) => match rx.as_mut() {
                Some(r) if r.from == from && r.asm.index == index => {
                    r.last_chunk = Instant::now();
                    r.asm.push(c).map_err(|e| e.to_string())
                }
                // A chunk of a transfer given up (or never started here).
                _ => Err("no such transfer under way here".to_string()),
            },
        };
        match result {
            Ok(None) => {
                let next = rx.as_ref().map_or(0, |r| r.asm.received());
                drop(rx);
                self.send_snap(from, SnapMsg::Ack { index, next });
            }
            Ok(Some(data)) => {
                let r = rx.take();
                drop(rx);
                let (snap_epoch, node_epoch) = r
                    .as_ref()
                    .map_or((0, epoch), |r| (r.asm.epoch, r.node_epoch));
                // Dropping the reassembly removes the temp file: the bytes are in `data`.
                drop(r);
                self.send_snap(
                    from,
                    SnapMsg::Ack {
                        index,
                        next: data.len() as u64,
                    },
                );
                self.install(from, index, snap_epoch, node_epoch, &data);
            }
            Err(why) => {
                if rx.as_ref().is_some_and(|r| r.from == from) {
                    *rx = None;
                }
                drop(rx);
                log::warn!("snapshot at index {index} from node {from} refused: {why}");
                self.send_snap(from, SnapMsg::Abort { index });
            }
        }
    }

    /// Installs a received snapshot with the log locked, then tells the node and carries
    /// out what it says. Skipped if the node moved to another epoch meanwhile.
    fn install(&self, from: u64, index: u64, epoch: u64, node_epoch: u64, data: &[u8]) {
        self.store.with_log(|log| {
            let mut node = self.node.lock();
            if node.status().epoch != node_epoch {
                log::warn!("snapshot from node {from} not installed: the epoch changed");
                return;
            }
            match log.install_snapshot(index, epoch, data) {
                Ok(()) => {
                    let fx = node.snapshot_installed(log.log(), index);
                    if let Err(e) = self.execute(&mut node, log, fx) {
                        log::error!("cluster node: {e}");
                    }
                }
                Err(e) => log::error!("cannot install the snapshot from node {from}: {e}"),
            }
            self.publish(&node, log);
        });
        let mut fetching = self.transfers.fetching.lock();
        if fetching.is_some_and(|(f, _)| f == from) {
            *fetching = None;
        }
    }

    /// On each tick: gives up a transfer being received whose epoch passed, whose sender
    /// no longer leads (a pushed one), whose link dropped or that stalled.
    fn check_receiving(&self) {
        if self.transfers.receiving.lock().is_none() {
            return;
        }
        let (epoch, leader) = {
            let st = self.node.lock().status();
            (st.epoch, st.leader)
        };
        let mut rx = self.transfers.receiving.lock();
        let Some(r) = rx.as_ref() else { return };
        let why = if epoch != r.node_epoch {
            "the epoch changed"
        } else if r.pushed && leader != Some(r.from) {
            "its sender no longer leads"
        } else if !self.net.is_connected(r.from) {
            "the link dropped"
        } else if r.last_chunk.elapsed() > self.stall {
            "it stalled"
        } else {
            return;
        };
        let (from, index) = (r.from, r.asm.index);
        *rx = None;
        drop(rx);
        log::warn!("snapshot transfer from node {from} given up: {why}");
        self.send_snap(from, SnapMsg::Abort { index });
    }

    /// Until when the node's lease lets it serve, in wall-clock time.
    fn lease_deadline(&self, node: &Node) -> Option<Instant> {
        let start = node.lease_start()?;
        let t = self.ticks.lock();
        let &(_, at) = t.iter().find(|&&(n, _)| n == start)?;
        Some(at + self.lease)
    }

    fn redirect(&self, leader: Option<u64>) -> Redirect {
        match leader.and_then(|l| self.addrs.get(&l)) {
            Some(addr) => Redirect::Moved(addr.clone()),
            None => Redirect::NoLeader,
        }
    }
}

/// A sender thread's work: finds the newest snapshot that covers `log_start` (taking
/// one first if there is none), then streams it to `to`. Returns its index.
fn send_snapshot(
    store: &Store,
    net: &PeerNet,
    to: u64,
    log_start: u64,
    replies: &Receiver<SnapMsg>,
    stall: Duration,
) -> Result<u64, String> {
    let covers = |s: &(u64, u64, std::path::PathBuf)| s.0 >= log_start.max(1);
    // A later compaction may remove the file between listing and opening: look again.
    for _ in 0..3 {
        let mut found = store.newest_snapshot().map_err(|e| e.to_string())?;
        if !found.as_ref().is_some_and(covers) {
            let applied = store.read_all(|db| db.applied_index());
            if applied < log_start {
                // Not even a new one would (the peer refused one this new): wait for
                // more writes rather than compact for nothing.
                return Err(format!(
                    "no snapshot reaches index {log_start} yet (applied through {applied})"
                ));
            }
            // None covers what the peer lacks: take one now (on this thread; the node
            // goes on). If one is running already, wait for it and look again.
            if !store.compact_now(true).map_err(|e| e.to_string())? {
                store.wait_for_compaction();
                continue;
            }
            found = store.newest_snapshot().map_err(|e| e.to_string())?;
        }
        let Some((index, epoch, path)) = found.filter(covers) else {
            continue;
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
        };
        log::info!("sending node {to} the snapshot at index {index}");
        send_file(net, to, (index, epoch, &path, file), replies, stall)
            .map_err(|e| e.to_string())?;
        return Ok(index);
    }
    Err("no snapshot covers what it lacks".into())
}

impl Replicator for Driver {
    fn propose(&self, log: &mut MemberLog<'_>, payloads: Vec<Vec<u8>>) -> Result<u64, StoreError> {
        let mut node = self.node.lock();
        match node.propose_batch(log.log(), payloads) {
            Err(not) => Err(StoreError::Redirect(self.redirect(not.leader).reply())),
            Ok((first, fx)) => {
                let r = self.execute_with(&mut node, log, fx, false);
                self.publish(&node, log);
                r.map(|()| first)
            }
        }
    }

    fn persisted(&self, log: &mut MemberLog<'_>) {
        let mut node = self.node.lock();
        let fx = node.persisted(log.log(), log.persisted_index());
        if let Err(e) = self.execute(&mut node, log, fx) {
            log::error!("cluster node: {e}");
        }
        self.publish(&node, log);
    }
}
