//! The cluster node: one pure state machine per node, election and replication together.
//!
//! A [`Node`] owns no socket, thread, clock or file. Its driver feeds it peer messages
//! ([`Node::step`]), clock ticks ([`Node::tick`]; one tick is a fixed time unit the driver
//! chooses, e.g. 10 ms), client writes ([`Node::propose`]) and news that the local log is
//! durable ([`Node::persisted`], [`Node::snapshot_installed`]). Each call returns the
//! [`Effect`]s to carry out, **strictly in order, each finished before the next begins**,
//! and all of them before the next call into the node: the node reads the log (`&dyn
//! LogStore`) at the start of a call and trusts it to reflect every earlier effect.
//!
//! The rules live by name: this file holds the shared state, the epoch rules that every
//! message passes first, and the dispatch; `bully.rs` the election (Election/Answer,
//! pre-vote, Coordinator/Accept, stickiness, TAKEOVER hand-over); `replication.rs` the log
//! (Append/Heartbeat, commit by replication mode, the pull of a leader-elect, the lease).
//!
//! # Ordering: nothing is sent that depends on what is not yet durable
//! - `SaveMeta` comes before any `Send` that relies on it (an `Accept` after the vote is
//!   saved, a `Coordinator` after the new epoch is saved). `SaveMeta` is durable (fsync'd)
//!   when the driver finishes it.
//! - `Append` only writes. The driver makes it durable as `--fsync` asks and then calls
//!   [`Node::persisted`] (at once under `--fsync no`). A follower acknowledges entries only
//!   once they are durable, so its `AppendAck` for new entries is sent from `persisted()`;
//!   the leader counts its own copy only from `persisted()` too.
//! - `Truncate` is durable when done (the `LogStore` contract).
//!
//! # Epochs
//! Every message carries its sender's epoch. A request from a lower epoch is answered
//! with `Refuse` (which carries the newer epoch) and otherwise ignored; a reply from a
//! lower epoch is dropped. A higher epoch is adopted (saved before anything else is done)
//! when it comes from the leader of that epoch (`Heartbeat`, `Append`, `HandOver`), or
//! from anyone while this node is not *sticky*; a leader also adopts it (and steps down)
//! from a reply. A sticky node (a follower that heard its leader within the failure
//! timeout, or a leader) keeps its epoch, so a node that comes back from a partition
//! with a bumped epoch cannot depose a healthy leader. A `Coordinator` bid is judged by
//! its own rule (`bully.rs`).

use crate::log::{LogEntry, LogStore};
use crate::message::{Body, Message, Pos};
use crate::wal::Meta;
use std::collections::BTreeMap;
use std::fmt;

/// When a write counts as committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// On the leader's own durable copy. A failover loses the writes the new leader had
    /// not received: a client may have been told they were written (the loss window is
    /// what was acknowledged but not yet replicated, usually a few milliseconds' worth).
    Async,
    /// On a majority of the cluster, the leader's durable copy included. The default:
    /// no acknowledged write is lost while a majority survives.
    Quorum,
    /// On every member: no write is acknowledged while any node is down.
    All,
}

/// The node's settings. Timers are in ticks.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id, its Bully priority (unique, never 0).
    pub id: u64,
    /// The other members' ids.
    pub peers: Vec<u64>,
    /// The leader sends a heartbeat (or the entries a follower lacks) this often.
    pub heartbeat_ticks: u64,
    /// A follower that heard nothing from its leader this long starts an election; a
    /// leader that heard no majority this long steps down.
    pub failure_ticks: u64,
    /// The leader serves only while a majority acknowledged a message it sent less than
    /// this long ago. Must be shorter than `failure_ticks` by more than the clocks can
    /// drift apart over that time: followers refuse a new coordinator for
    /// `failure_ticks` after hearing the leader, counted from when they heard it.
    pub lease_ticks: u64,
    /// How long a candidate waits for `Answer`s, pre-votes and `Accept`s.
    pub election_ticks: u64,
    pub replication: Replication,
    /// Most payload bytes in one `Append` or `PullReply` (at least one entry is sent).
    pub max_append_bytes: usize,
    /// Test only: breaks one safety rule on purpose, so that the simulator
    /// (`tests/simulation.rs`) can show that it catches the violation. Always `None` in
    /// the product (the driver never sets it).
    pub planted_bug: Option<PlantedBug>,
}

/// A safety rule broken on purpose ([`NodeConfig::planted_bug`]). The fourth bug the
/// simulator plants, a follower acknowledging before its fsync, is the driver's (the
/// simulator calls `persisted` before syncing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// A new leader appends no no-op entry and commits entries of older epochs by
    /// counting their replicas (the scenario of Raft's figure 8).
    SkipNoop,
    /// A node accepts a second coordinator in an epoch in which it accepted another.
    TwoCoordinators,
    /// Nodes are never sticky: they grant pre-votes and accept coordinators while they
    /// still hear a live leader (whose lease then no longer protects its reads).
    NoStickiness,
}

impl NodeConfig {
    /// Defaults for a 10 ms tick: heartbeat 50 ms, lease 150 ms, failure 250 ms,
    /// election round 100 ms, quorum replication, 1 MiB appends.
    pub fn new(id: u64, peers: Vec<u64>) -> NodeConfig {
        NodeConfig {
            id,
            peers,
            heartbeat_ticks: 5,
            failure_ticks: 25,
            lease_ticks: 15,
            election_ticks: 10,
            replication: Replication::Quorum,
            max_append_bytes: 1 << 20,
            planted_bug: None,
        }
    }

    /// Checks what the safety rules rely on.
    pub fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("node id 0 is reserved (it means \"none\")".into());
        }
        let mut ids = self.peers.clone();
        ids.push(self.id);
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) || ids[0] == 0 {
            return Err("node ids must be unique and non-zero".into());
        }
        if self.heartbeat_ticks == 0 || self.election_ticks == 0 {
            return Err("heartbeat and election timers must be at least one tick".into());
        }
        if self.heartbeat_ticks >= self.lease_ticks || self.lease_ticks >= self.failure_ticks {
            return Err(format!(
                "timers must satisfy heartbeat < lease < failure timeout (got {} < {} < {})",
                self.heartbeat_ticks, self.lease_ticks, self.failure_ticks
            ));
        }
        Ok(())
    }
}

/// One thing for the driver to do. Carried out in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send `msg` to node `to` (best effort: the protocol survives loss).
    Send { to: u64, msg: Message },
    /// Persist the meta (fsync) before the next effect.
    SaveMeta(Meta),
    /// Write these entries at the log's end; call [`Node::persisted`] once durable.
    Append(Vec<LogEntry>),
    /// Drop every entry after `after` (durable when done).
    Truncate { after: u64 },
    /// Entries up to this index are committed: apply them (from the driver's own applied
    /// index on) and complete the clients waiting for them. The driver records the commit
    /// index in its meta when convenient: it is only a lower bound used at recovery.
    Commit(u64),
    /// This node now leads `epoch` and accepts proposals (which commit once the
    /// epoch's no-op does).
    BecomeLeader { epoch: u64 },
    /// This node stopped leading: fail every write still waiting with "outcome unknown".
    StepDown { epoch: u64, leader: Option<u64> },
    /// Send the newest snapshot to `to` (it is behind the log's start, or diverged); the
    /// receiving driver installs it and calls [`Node::snapshot_installed`].
    SendSnapshot { to: u64 },
    /// Fetch `from`'s newest snapshot, install it, then call [`Node::snapshot_installed`]
    /// (a leader-elect missing entries its best acceptor has compacted away, or whose
    /// committed entries conflict with it after an async failover).
    FetchSnapshot { from: u64 },
}

/// A proposal refused: the write was not appended and never will be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotLeader {
    /// The leader to redirect to, when known (`None`: no leader right now; retry).
    pub leader: Option<u64>,
}

impl fmt::Display for NotLeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.leader {
            Some(l) => write!(f, "not the leader (node {l} is)"),
            None => write!(f, "no leader serving right now"),
        }
    }
}

impl std::error::Error for NotLeader {}

/// The role as the outside sees it. A leader-elect still catching up reports
/// `Candidate`: it serves nothing yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    Candidate,
    Leader,
}

/// A snapshot of the node's state for INFO, ROLE and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub id: u64,
    pub role: Role,
    pub epoch: u64,
    /// This node when it leads; the leader it follows; `None` when there is none.
    pub leader: Option<u64>,
    pub commit: u64,
    /// The local log is durable through here.
    pub durable: u64,
    /// On a leader: each follower's id and acknowledged (durable, matching) index.
    pub followers: Vec<(u64, u64)>,
}

/// What a candidate is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Sent `Election` to the higher ids; waiting for an `Answer`.
    Electing,
    /// A higher id answered: waiting for its `Coordinator`.
    Waiting,
    /// Asking everyone whether they would accept us at epoch + 1.
    PreVote,
    /// Bid `Coordinator` at our (saved) epoch; counting `Accept`s.
    Proposing,
}

#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub phase: Phase,
    /// The tick the phase began.
    pub since: u64,
    /// Pre-vote grants, self included.
    pub grants: Vec<u64>,
    /// Accepts with each acceptor's last position, self included.
    pub accepts: BTreeMap<u64, Pos>,
    /// A higher id bid in our epoch: if our bid fails, wait for it rather than retry.
    pub saw_higher: bool,
}

/// The leader's view of one follower.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress {
    /// The next index to send.
    pub next: u64,
    /// Acknowledged: the follower's log equals ours and is durable through here.
    pub matched: u64,
    /// The newest `seq` (our tick at sending) it acknowledged: the lease's evidence.
    pub acked_seq: Option<u64>,
    /// When a snapshot was last requested for it (rate limit).
    pub snapshot_at: Option<u64>,
}

/// A leader-elect pulling missing entries from its best acceptor.
#[derive(Debug, Clone)]
pub(crate) struct Pulling {
    pub from: u64,
    /// The acceptor's last position: the log is up to date once it holds it.
    pub target: Pos,
    /// The tick of the last progress (the pull is abandoned after the failure timeout).
    pub progress_at: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Leader {
    /// The tick leadership began.
    pub since: u64,
    /// While `Some`, the leader-elect is catching up and serves nothing.
    pub pulling: Option<Pulling>,
    /// The index of this epoch's no-op (0 while pulling).
    pub noop_index: u64,
    pub progress: BTreeMap<u64, Progress>,
    /// A TAKEOVER in progress: (the higher id taking over, the tick it asked).
    pub handover: Option<(u64, u64)>,
}

#[derive(Debug, Clone)]
pub(crate) enum RoleState {
    Follower,
    Candidate(Candidate),
    Leader(Leader),
}

/// The pure node. See the module doc.
#[derive(Debug, Clone)]
pub struct Node {
    pub(crate) cfg: NodeConfig,
    pub(crate) epoch: u64,
    /// Whom we accepted as coordinator in `epoch` (0: none).
    pub(crate) voted_for: u64,
    pub(crate) commit: u64,
    /// The local log is durable through here (from `persisted()`).
    pub(crate) durable: u64,
    pub(crate) role: RoleState,
    /// Ticks since start: the leader's `seq`, and every timer's base.
    pub(crate) now: u64,
    /// The leader we follow in `epoch`.
    pub(crate) leader: Option<u64>,
    /// The tick we last heard our leader (or began waiting for one).
    pub(crate) heard_at: u64,
    /// Our log equals the current leader's through here (not necessarily durable).
    pub(crate) verified: u64,
    /// The highest `Match` we sent the current leader.
    pub(crate) acked: u64,
    /// The newest `seq` of the current leader's that an `AppendAck` of ours carried.
    pub(crate) acked_seq: u64,
    /// The current leader's newest `seq`, commit index and last index.
    pub(crate) leader_seq: u64,
    pub(crate) leader_commit: u64,
    pub(crate) leader_last: u64,
    /// When we last asked the leader to hand over (rate limit).
    pub(crate) takeover_at: Option<u64>,
    /// Our committed entries conflict with the leader's log (only async replication, or
    /// a disk that lost synced writes, gets here): the next installed snapshot replaces
    /// our state, and the commit index restarts from it.
    pub(crate) diverged: bool,
}

impl Node {
    /// A node restored from `log`: epoch, vote and commit index from its meta, as a
    /// follower with no leader. Call [`Node::tick`] from then on (a cluster of one elects
    /// itself on its first tick).
    pub fn new(cfg: NodeConfig, log: &dyn LogStore) -> Node {
        let meta = log.meta();
        let last = log.last().0;
        // A snapshot holds only committed entries, and the meta's commit index is saved
        // lazily, so it may lag the snapshot (after a crash of every node the simulator
        // saw meta 58 below a snapshot at 111, and the leader then sent an older
        // snapshot). A commit index past the log's end means acknowledged entries were
        // lost (the log's recovery reports that); never claim to have what the log lacks.
        let commit = meta.commit_index.max(log.snapshot().0).min(last);
        if commit < meta.commit_index {
            log::error!(
                "meta says committed through {} but the log ends at {last}",
                meta.commit_index
            );
        }
        Node {
            cfg,
            epoch: meta.epoch,
            voted_for: meta.voted_for,
            commit,
            durable: log.durable_index().min(last),
            role: RoleState::Follower,
            now: 0,
            leader: None,
            heard_at: 0,
            verified: commit,
            acked: 0,
            acked_seq: 0,
            leader_seq: 0,
            leader_commit: 0,
            leader_last: 0,
            takeover_at: None,
            diverged: false,
        }
    }

    pub fn id(&self) -> u64 {
        self.cfg.id
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn commit_index(&self) -> u64 {
        self.commit
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// The role as reported outside.
    pub fn role(&self) -> Role {
        match &self.role {
            RoleState::Follower => Role::Follower,
            RoleState::Candidate(_) => Role::Candidate,
            RoleState::Leader(l) if l.pulling.is_some() => Role::Candidate,
            RoleState::Leader(_) => Role::Leader,
        }
    }

    /// The leader this node knows of (itself when it leads and serves).
    pub fn leader(&self) -> Option<u64> {
        match self.role() {
            Role::Leader => Some(self.cfg.id),
            Role::Candidate => None,
            Role::Follower => self.leader,
        }
    }

    pub fn status(&self) -> Status {
        let followers = match &self.role {
            RoleState::Leader(l) => l.progress.iter().map(|(&id, p)| (id, p.matched)).collect(),
            _ => Vec::new(),
        };
        Status {
            id: self.cfg.id,
            role: self.role(),
            epoch: self.epoch,
            leader: self.leader(),
            commit: self.commit,
            durable: self.durable,
            followers,
        }
    }

    /// The members, self included.
    pub(crate) fn cluster_size(&self) -> usize {
        self.cfg.peers.len() + 1
    }

    /// A majority of the cluster.
    pub(crate) fn quorum(&self) -> usize {
        self.cluster_size() / 2 + 1
    }

    pub(crate) fn meta(&self) -> Meta {
        Meta {
            epoch: self.epoch,
            voted_for: self.voted_for,
            commit_index: self.commit,
        }
    }

    pub(crate) fn send(&self, fx: &mut Vec<Effect>, to: u64, body: Body) {
        self.send_at(fx, to, self.epoch, body);
    }

    pub(crate) fn send_at(&self, fx: &mut Vec<Effect>, to: u64, epoch: u64, body: Body) {
        fx.push(Effect::Send {
            to,
            msg: Message { epoch, body },
        });
    }

    /// Sticky: a follower that heard its leader within the failure timeout (or started
    /// less than a failure timeout ago), or a leader. It refuses pre-votes and
    /// coordinators and keeps its epoch.
    pub(crate) fn sticky(&self) -> bool {
        if self.cfg.planted_bug == Some(PlantedBug::NoStickiness) {
            return false;
        }
        match &self.role {
            RoleState::Leader(l) => l.pulling.is_none(),
            RoleState::Candidate(_) => false,
            RoleState::Follower => {
                // A node that just started may have renewed a leader's lease before it
                // went down (what it heard is not saved): it stays loyal to whoever
                // leads for a failure timeout, as if it had heard it as it started.
                self.now < self.cfg.failure_ticks
                    || (self.leader.is_some() && self.now - self.heard_at < self.cfg.failure_ticks)
            }
        }
    }

    /// Saves a new epoch (and the vote in it) before anything acts on it.
    pub(crate) fn adopt_epoch(&mut self, epoch: u64, voted_for: u64, fx: &mut Vec<Effect>) {
        debug_assert!(epoch > self.epoch);
        self.epoch = epoch;
        self.voted_for = voted_for;
        // A new epoch may have a new log at its head: only the committed prefix is known
        // to match it.
        self.verified = self.commit;
        self.acked = 0;
        self.acked_seq = 0;
        self.leader_seq = 0;
        self.leader_commit = 0;
        self.leader_last = 0;
        fx.push(Effect::SaveMeta(self.meta()));
    }

    /// Becomes a follower of `leader` (or of none), stepping down if leading.
    pub(crate) fn become_follower(&mut self, leader: Option<u64>, fx: &mut Vec<Effect>) {
        if let RoleState::Leader(l) = &self.role {
            // A leader-elect that never announced itself has nothing to fail.
            if l.pulling.is_none() {
                fx.push(Effect::StepDown {
                    epoch: self.epoch,
                    leader,
                });
            }
        }
        self.role = RoleState::Follower;
        if self.leader != leader || leader.is_none() {
            // Only the committed prefix is known to match a new leader's log.
            self.verified = self.commit;
            self.acked = 0;
            self.leader_commit = 0;
            self.leader_last = 0;
            self.leader_seq = 0;
            self.acked_seq = 0;
        }
        self.leader = leader;
        self.heard_at = self.now;
    }

    /// Handles a message from peer `from`.
    pub fn step(&mut self, log: &dyn LogStore, from: u64, msg: Message) -> Vec<Effect> {
        let mut fx = Vec::new();
        if from == self.cfg.id || !self.cfg.peers.contains(&from) {
            log::warn!("dropping a message from unknown node {from}");
            return fx;
        }
        if msg.epoch < self.epoch {
            if msg.body.is_request() {
                let leader = self.leader();
                self.send(&mut fx, from, Body::Refuse { leader });
            }
            return fx;
        }
        if msg.epoch > self.epoch {
            self.on_higher_epoch(from, &msg, &mut fx);
        }
        let epoch = msg.epoch;
        match msg.body {
            Body::Election => self.on_election(from, log, &mut fx),
            Body::Answer => self.on_answer(from, epoch),
            Body::PreVote { .. } => self.on_prevote(from, log, &mut fx),
            Body::PreVoteReply { granted } => {
                self.on_prevote_reply(log, from, epoch, granted, &mut fx)
            }
            Body::Coordinator { .. } => self.on_coordinator(log, from, epoch, &mut fx),
            Body::Accept { last } => self.on_accept(log, from, epoch, last, &mut fx),
            Body::Refuse { .. } => self.on_refuse(from, epoch),
            Body::Takeover { .. } => self.on_takeover(log, from, epoch, &mut fx),
            Body::HandOver { successor } => self.on_handover(log, from, epoch, successor, &mut fx),
            Body::Heartbeat { seq, commit, last } => {
                self.on_heartbeat(log, from, epoch, seq, commit, last, &mut fx)
            }
            Body::Append {
                seq,
                prev,
                entries,
                commit,
            } => self.on_append(log, from, epoch, seq, prev, entries, commit, &mut fx),
            Body::AppendAck { seq, result } => {
                self.on_append_ack(log, from, epoch, seq, result, &mut fx)
            }
            Body::Pull { after } => self.on_pull(log, from, epoch, after, &mut fx),
            Body::PullReply { result } => self.on_pull_reply(log, from, epoch, result, &mut fx),
        }
        fx
    }

    /// The epoch rules for a message from a higher epoch (see the module doc).
    fn on_higher_epoch(&mut self, from: u64, msg: &Message, fx: &mut Vec<Effect>) {
        if matches!(msg.body, Body::Coordinator { .. }) {
            return; // judged by on_coordinator
        }
        let leading = matches!(self.role, RoleState::Leader(_));
        if msg.body.is_from_leader() {
            // Only a coordinator a majority accepted leads an epoch: follow it.
            let vote = if matches!(msg.body, Body::HandOver { .. }) {
                0
            } else {
                from
            };
            self.adopt_epoch(msg.epoch, vote, fx);
            let leader = (vote != 0).then_some(from);
            self.become_follower(leader, fx);
        } else if (leading && !msg.body.is_request()) || !self.sticky() {
            // A follower of ours moved on (a leader hears of it in a reply), or we have
            // no leader to be loyal to.
            self.adopt_epoch(msg.epoch, 0, fx);
            match &self.role {
                RoleState::Leader(_) => self.become_follower(None, fx),
                // A pre-vote or a bid made for an older epoch is void.
                RoleState::Candidate(c) if matches!(c.phase, Phase::PreVote | Phase::Proposing) => {
                    self.become_follower(None, fx)
                }
                RoleState::Follower => {
                    self.leader = None;
                }
                RoleState::Candidate(_) => {}
            }
        }
    }

    /// Advances the clock one tick.
    pub fn tick(&mut self, log: &dyn LogStore) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.now += 1;
        match &self.role {
            RoleState::Leader(_) => self.tick_leader(log, &mut fx),
            _ => self.tick_election(log, &mut fx),
        }
        fx
    }

    /// Appends a client write. On success the entry is at the returned index, and the
    /// effects carry it out (append, replicate); the write completes when a `Commit`
    /// reaches its index, or fails with "outcome unknown" on `StepDown`.
    pub fn propose(
        &mut self,
        log: &dyn LogStore,
        payload: Vec<u8>,
    ) -> Result<(u64, Vec<Effect>), NotLeader> {
        self.propose_entries(log, vec![payload])
    }

    /// Appends many client writes at once (a group commit's batch): one `Append` effect
    /// and one message per follower. Returns the index of the first; the others follow
    /// it in order.
    pub fn propose_batch(
        &mut self,
        log: &dyn LogStore,
        payloads: Vec<Vec<u8>>,
    ) -> Result<(u64, Vec<Effect>), NotLeader> {
        self.propose_entries(log, payloads)
    }

    /// The driver's log is durable through `index` (after an `Append`'s fsync, or at once
    /// under `--fsync no`).
    pub fn persisted(&mut self, log: &dyn LogStore, index: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.on_persisted(log, index, &mut fx);
        fx
    }

    /// The driver installed a snapshot at `index` into the log (after `SendSnapshot` from
    /// the leader, or `FetchSnapshot`) and reset its state machine to it: the state
    /// machine now reflects exactly the entries up to `index`, and later `Commit`s apply
    /// from `index + 1`. (Only after an async failover can that move the commit index
    /// back: this node had applied writes the cluster lost.)
    pub fn snapshot_installed(&mut self, log: &dyn LogStore, index: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.on_snapshot_installed(log, index, &mut fx);
        fx
    }

    /// When serving (leading, no-op committed, no hand-over): the tick whose message a
    /// majority acknowledged; the lease lasts `lease_ticks` from it. `None`: not serving.
    pub fn lease_start(&self) -> Option<u64> {
        self.lease_start_tick()
    }

    /// Whether a linearizable read may be served now: this node leads, its epoch's no-op
    /// is committed, no hand-over is under way and its lease holds.
    pub fn can_read(&self) -> bool {
        self.serving()
    }
}

impl fmt::Display for Node {
    /// `n3@2 leader`, `n1@2 follower(n3)`, `n2@1 candidate(electing)`: the node, its
    /// epoch and what it is doing (as the golden scripts and the logs show it).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}@{} ", self.cfg.id, self.epoch)?;
        match &self.role {
            RoleState::Follower => match self.leader {
                Some(l) => write!(f, "follower(n{l})"),
                None => write!(f, "follower()"),
            },
            RoleState::Candidate(c) => {
                let phase = match c.phase {
                    Phase::Electing => "electing",
                    Phase::Waiting => "waiting",
                    Phase::PreVote => "pre-vote",
                    Phase::Proposing => "proposing",
                };
                write!(f, "candidate({phase})")
            }
            RoleState::Leader(l) => match (&l.pulling, l.handover) {
                (Some(p), _) => write!(f, "leader-elect(pulling from n{})", p.from),
                (None, Some((to, _))) => write!(f, "leader(handing over to n{to})"),
                (None, None) => write!(f, "leader"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::MemLog;

    #[test]
    fn config_validation() {
        assert!(NodeConfig::new(1, vec![2, 3]).validate().is_ok());
        assert!(NodeConfig::new(0, vec![2]).validate().is_err());
        assert!(NodeConfig::new(1, vec![1]).validate().is_err());
        assert!(NodeConfig::new(1, vec![2, 2]).validate().is_err());
        let mut cfg = NodeConfig::new(1, vec![]);
        cfg.lease_ticks = cfg.failure_ticks;
        assert!(
            cfg.validate().is_err(),
            "the lease must be shorter than the failure timeout"
        );
        let mut cfg = NodeConfig::new(1, vec![]);
        cfg.heartbeat_ticks = 0;
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn quorum_sizes() {
        for (peers, quorum) in [(0, 1), (1, 2), (2, 2), (3, 3), (4, 3), (6, 4)] {
            let cfg = NodeConfig::new(100, (1..=peers).collect());
            let node = Node::new(cfg, &MemLog::new());
            assert_eq!(node.quorum(), quorum, "{peers} peers");
        }
    }

    #[test]
    fn restores_meta_and_never_claims_a_commit_past_the_log() {
        let mut log = MemLog::new();
        log.save_meta(Meta {
            epoch: 7,
            voted_for: 2,
            commit_index: 5,
        })
        .expect("meta");
        let node = Node::new(NodeConfig::new(1, vec![2, 3]), &log);
        assert_eq!(node.epoch(), 7);
        assert_eq!(node.voted_for, 2);
        assert_eq!(node.commit_index(), 0, "the log is empty");
        assert_eq!(node.role(), Role::Follower);
        assert_eq!(node.leader(), None);
    }

    #[test]
    fn the_commit_index_is_at_least_the_snapshot() {
        // The meta's commit index is saved lazily; a snapshot holds committed entries.
        let mut log = MemLog::new();
        log.save_meta(Meta {
            epoch: 3,
            voted_for: 0,
            commit_index: 58,
        })
        .expect("meta");
        log.install_snapshot(111, 3, b"state").expect("snapshot");
        let node = Node::new(NodeConfig::new(1, vec![2, 3]), &log);
        assert_eq!(node.commit_index(), 111);
    }

    #[test]
    fn unknown_senders_and_stale_requests() {
        let log = MemLog::new();
        let mut node = Node::new(NodeConfig::new(1, vec![2, 3]), &log);
        let msg = |epoch, body| Message { epoch, body };
        assert!(node.step(&log, 9, msg(0, Body::Election)).is_empty());
        assert!(node.step(&log, 1, msg(0, Body::Election)).is_empty());
        node.epoch = 3;
        // A stale request is refused with our epoch; a stale reply is dropped.
        let fx = node.step(
            &log,
            2,
            msg(
                2,
                Body::Heartbeat {
                    seq: 1,
                    commit: 0,
                    last: Pos::default(),
                },
            ),
        );
        assert_eq!(
            fx,
            vec![Effect::Send {
                to: 2,
                msg: msg(3, Body::Refuse { leader: None }),
            }]
        );
        assert!(
            node.step(
                &log,
                2,
                msg(
                    2,
                    Body::Accept {
                        last: Pos::default()
                    }
                )
            )
            .is_empty()
        );
    }

    #[test]
    fn a_node_that_just_started_stays_loyal_for_a_failure_timeout() {
        // It may have renewed a leader's lease just before it went down: granting a
        // pre-vote at once could elect a second leader while that lease still holds.
        let log = MemLog::new();
        let mut node = Node::new(NodeConfig::new(1, vec![2, 3]), &log);
        let prevote = |node: &mut Node| {
            node.step(
                &log,
                2,
                Message {
                    epoch: 0,
                    body: Body::PreVote {
                        last: Pos::default(),
                    },
                },
            )
        };
        let granted = |fx: &[Effect]| {
            fx.iter().any(|e| {
                matches!(
                    e,
                    Effect::Send {
                        msg: Message {
                            body: Body::PreVoteReply { granted: true },
                            ..
                        },
                        ..
                    }
                )
            })
        };
        assert!(!granted(&prevote(&mut node)));
        node.now = node.cfg.failure_ticks - 1;
        assert!(!granted(&prevote(&mut node)));
        node.now = node.cfg.failure_ticks;
        assert!(granted(&prevote(&mut node)));
    }

    #[test]
    fn accept_is_sent_only_after_the_vote_is_saved() {
        let log = MemLog::new();
        let mut node = Node::new(NodeConfig::new(1, vec![2, 3]), &log);
        // Past the loyalty of a node that just started.
        node.now = node.cfg.failure_ticks;
        let fx = node.step(
            &log,
            3,
            Message {
                epoch: 1,
                body: Body::Coordinator {
                    last: Pos::default(),
                },
            },
        );
        let save = fx
            .iter()
            .position(|e| matches!(e, Effect::SaveMeta(m) if m.voted_for == 3));
        let accept = fx.iter().position(|e| {
            matches!(
                e,
                Effect::Send {
                    msg: Message {
                        body: Body::Accept { .. },
                        ..
                    },
                    ..
                }
            )
        });
        assert!(
            save.is_some() && accept.is_some() && save < accept,
            "{fx:?}"
        );
        // A second coordinator in the same epoch is refused.
        let fx = node.step(
            &log,
            2,
            Message {
                epoch: 1,
                body: Body::Coordinator {
                    last: Pos::default(),
                },
            },
        );
        assert!(
            fx.iter().all(|e| !matches!(e, Effect::SaveMeta(_))),
            "no second vote: {fx:?}"
        );
        assert!(matches!(
            fx.last(),
            Some(Effect::Send {
                msg: Message {
                    body: Body::Refuse { .. },
                    ..
                },
                ..
            })
        ));
    }
}
