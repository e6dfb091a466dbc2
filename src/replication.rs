//! Log rules: how a leader-elect makes its log the most up to date, how the leader
//! replicates and commits, how followers accept entries, and the leader lease. Part of
//! [`Node`] (see `node.rs` for the state and the epoch rules, and
//! `bully.rs` for how a node comes to lead).
//!
//! # Becoming leader (DESIGN.md rule 4)
//! A candidate with a majority of `Accept`s is a leader-elect. Each `Accept` carried the
//! acceptor's last position; the one with the highest (last epoch, last index) holds
//! every committed entry (a committed entry is on a majority, which this majority
//! meets, and commit counts only entries of the leader's own epoch, so the most up-to-date
//! log of any majority has it). If that is not us, we `Pull` the entries we lack from it,
//! walking back from where our logs might agree, truncating our divergent suffix
//! (never below our commit index). Then we append one no-op entry in our epoch, announce
//! `BecomeLeader`, and replicate. Until the no-op commits we serve nothing: writes are
//! refused (`NotLeader`, the client retries) and reads wait.
//!
//! # Replication
//! The leader sends each follower `Append(prev, entries, commit)` from that follower's
//! `next` index; a proposal goes out to the followers before the leader's own `Append`
//! effect, so their fsyncs overlap its own. A follower refuses an `Append` whose `prev` it does not hold (the leader
//! walks back with the hint), truncates a conflicting suffix, appends the rest, and
//! acknowledges `Match(i)` only once its log is durable through `i` (acks for new entries
//! leave from `persisted()`; an `Append` is also answered at once with what is already
//! durable if no ack went for a heartbeat's worth of ticks, so that the leader's lease
//! never waits for a follower's fsync). Every `heartbeat_ticks` the leader sends a `Heartbeat` to a
//! follower that has everything, and resends from `matched + 1` to one that lags, so lost
//! messages are repaired by the next heartbeat. A follower behind the log's snapshot gets
//! `SendSnapshot`.
//!
//! # Commit (by `--replication`)
//! `quorum`: the highest index that a majority holds, the leader's own durable copy
//! among them (so a commit index is never past the local durable log, on any node);
//! `all`: the highest every member holds; `async`: the leader's own durable copy. In every
//! mode an index commits only once it reaches this epoch's no-op: entries of older epochs
//! commit with it, never by counting their replicas (Raft §5.4.2). Followers commit up
//! to the leader's commit index, but never past what they verified and made durable.
//!
//! # Lease (rule 6)
//! Each message the leader sends carries `seq` (its tick); acks echo it. The leader
//! serves (writes and linearizable reads) only while the `seq` that a majority has
//! acknowledged, itself included, is less than `lease_ticks` old. A follower that heard
//! the leader refuses any other coordinator for `failure_ticks` (> `lease_ticks`) after
//! it heard it, so while the lease holds no other leader can have been elected. A leader
//! that has heard no majority for `failure_ticks` steps down.

use crate::log::{LogEntry, LogStore, Meta};
use crate::message::{AckResult, Body, Pos, PullResult};
use crate::node::Node;
use crate::node::{
    Effect, Leader, NotLeader, PlantedBug, Progress, Pulling, Replication, RoleState,
};
use std::collections::BTreeMap;

impl Node {
    // -----------------------------------------------------------------------------------
    // Becoming leader

    /// A majority accepted us: make our log the most up to date of theirs, then serve.
    pub(crate) fn become_leader_elect(
        &mut self,
        log: &dyn LogStore,
        accepts: &BTreeMap<u64, Pos>,
        fx: &mut Vec<Effect>,
    ) {
        let mine = Pos::from(log.last());
        let (best, target) = accepts
            .iter()
            .map(|(&id, &pos)| (id, pos))
            .max_by(|a, b| {
                a.1.cmp(&b.1)
                    .then((a.0 == self.cfg.id).cmp(&(b.0 == self.cfg.id)))
            })
            .unwrap_or((self.cfg.id, mine));
        let progress = self
            .cfg
            .peers
            .iter()
            .map(|&p| {
                let pr = Progress {
                    next: mine.index + 1,
                    ..Progress::default()
                };
                (p, pr)
            })
            .collect();
        self.leader = None;
        self.role = RoleState::Leader(Leader {
            since: self.now,
            pulling: None,
            noop_index: 0,
            progress,
            handover: None,
        });
        if best == self.cfg.id || target <= mine {
            return self.finish_pull(mine, fx);
        }
        log::info!(
            "leader-elect of epoch {}: pulling up to {target} from node {best}",
            self.epoch
        );
        if let RoleState::Leader(l) = &mut self.role {
            l.pulling = Some(Pulling {
                from: best,
                target,
                progress_at: self.now,
            });
        }
        let after = Self::pull_point(log, mine.index.min(target.index));
        self.send(fx, best, Body::Pull { after });
    }

    /// Our position at `index`, or the snapshot's when `index` is compacted.
    fn pull_point(log: &dyn LogStore, index: u64) -> Pos {
        match log.epoch_at(index) {
            Ok(Some(epoch)) => Pos::new(index, epoch),
            _ => Pos::from(log.snapshot()),
        }
    }

    /// Our log is the most up to date of the majority: append the no-op and lead.
    fn finish_pull(&mut self, last: Pos, fx: &mut Vec<Effect>) {
        let (epoch, now, commit) = (self.epoch, self.now, self.commit);
        let noop = LogEntry {
            index: last.index + 1,
            epoch,
            payload: Vec::new(),
        };
        if self.cfg.planted_bug == Some(PlantedBug::SkipNoop) {
            // Planted bug: lead at once, with no entry of our own epoch to commit first.
            let RoleState::Leader(l) = &mut self.role else {
                return;
            };
            l.pulling = None;
            l.noop_index = 0;
            fx.push(Effect::BecomeLeader { epoch });
            for p in l.progress.values_mut() {
                p.next = last.index + 1;
            }
            return;
        }
        let RoleState::Leader(l) = &mut self.role else {
            return;
        };
        l.pulling = None;
        l.noop_index = noop.index;
        fx.push(Effect::Append(vec![noop.clone()]));
        fx.push(Effect::BecomeLeader { epoch });
        for (&to, p) in l.progress.iter_mut() {
            p.next = noop.index + 1;
            fx.push(Effect::Send {
                to,
                msg: crate::message::Message {
                    epoch,
                    body: Body::Append {
                        seq: now,
                        prev: last,
                        entries: vec![noop.clone()],
                        commit,
                    },
                },
            });
        }
        log::info!("node {} leads epoch {epoch}", self.cfg.id);
    }

    /// A best acceptor serves our `Pull`.
    pub(crate) fn on_pull(
        &mut self,
        log: &dyn LogStore,
        from: u64,
        epoch: u64,
        after: Pos,
        fx: &mut Vec<Effect>,
    ) {
        if epoch != self.epoch || self.voted_for != from {
            return;
        }
        // The coordinator we accepted is alive: give it time to finish.
        self.heard_at = self.now;
        let snap = log.snapshot().0;
        let last = Pos::from(log.last());
        let result = if after.index < snap {
            PullResult::Snapshot
        } else if after.index > last.index {
            PullResult::Reject { hint: last.index }
        } else {
            match log.epoch_at(after.index) {
                Ok(Some(e)) if e == after.epoch => {
                    let entries = if after.index < last.index {
                        match log.read(after.index + 1, self.cfg.max_append_bytes) {
                            Ok(entries) => entries,
                            Err(e) => {
                                log::error!("cannot read the log for a pull: {e}");
                                return;
                            }
                        }
                    } else {
                        Vec::new()
                    };
                    PullResult::Entries {
                        prev: after,
                        entries,
                        last,
                    }
                }
                Ok(_) => PullResult::Reject {
                    hint: after.index.saturating_sub(1),
                },
                Err(e) => {
                    log::error!("cannot read the log for a pull: {e}");
                    return;
                }
            }
        };
        self.send(fx, from, Body::PullReply { result });
    }

    /// The leader-elect takes what its best acceptor sent.
    pub(crate) fn on_pull_reply(
        &mut self,
        log: &dyn LogStore,
        from: u64,
        epoch: u64,
        result: PullResult,
        fx: &mut Vec<Effect>,
    ) {
        let now = self.now;
        let RoleState::Leader(l) = &mut self.role else {
            return;
        };
        let Some(pulling) = &mut l.pulling else {
            return;
        };
        if epoch != self.epoch || from != pulling.from {
            return;
        }
        pulling.progress_at = now;
        let target = pulling.target;
        match result {
            PullResult::Snapshot => fx.push(Effect::FetchSnapshot { from }),
            PullResult::Reject { hint } => {
                let after = Self::pull_point(log, hint.min(log.last().0));
                self.send(fx, from, Body::Pull { after });
            }
            PullResult::Entries { prev, entries, .. } => {
                if !matches!(log.epoch_at(prev.index), Ok(Some(e)) if e == prev.epoch) {
                    return; // a stale reply: an answer to the current pull will come
                }
                let Some(new_last) = self.take_entries(log, prev, entries, fx) else {
                    if self.diverged {
                        // Our committed prefix conflicts with the best log (writes lost
                        // in an async failover): take the acceptor's state, then go on.
                        fx.push(Effect::FetchSnapshot { from });
                        return;
                    }
                    return self.become_follower(None, fx);
                };
                if new_last.index >= target.index {
                    self.finish_pull(new_last, fx);
                } else {
                    self.send(fx, from, Body::Pull { after: new_last });
                }
            }
        }
    }

    /// Writes `entries` (which follow `prev`, known to match) into our log: skips what we
    /// have, truncates a conflicting suffix, appends the rest. Returns the position of
    /// the last entry, or `None` if a conflict reaches our commit index.
    fn take_entries(
        &mut self,
        log: &dyn LogStore,
        prev: Pos,
        entries: Vec<LogEntry>,
        fx: &mut Vec<Effect>,
    ) -> Option<Pos> {
        let end = entries
            .last()
            .map(|e| Pos::new(e.index, e.epoch))
            .unwrap_or(prev);
        let mut first_new = entries.len();
        let mut conflict = None;
        for (k, e) in entries.iter().enumerate() {
            match log.epoch_at(e.index) {
                Ok(Some(ep)) if ep == e.epoch => continue,
                Ok(Some(_)) => {
                    conflict = Some(e.index);
                    first_new = k;
                    break;
                }
                Ok(None) => {
                    first_new = k;
                    break;
                }
                Err(err) => {
                    log::error!("cannot read the log: {err}");
                    return None;
                }
            }
        }
        if let Some(at) = conflict {
            if at <= self.commit {
                // Possible only when acknowledged writes were lost: async replication,
                // or a disk that lost synced data. Only a snapshot repairs it.
                log::error!(
                    "entry {at} conflicts with the leader's log but is committed here \
                     (commit {}): this node's state must be replaced by a snapshot",
                    self.commit
                );
                self.diverged = true;
                return None;
            }
            fx.push(Effect::Truncate { after: at - 1 });
            self.durable = self.durable.min(at - 1);
        }
        if first_new < entries.len() {
            let mut entries = entries;
            fx.push(Effect::Append(entries.split_off(first_new)));
        }
        Some(end)
    }

    // -----------------------------------------------------------------------------------
    // Leader

    /// The leader's timers: pull timeout, hand-over, majority check, heartbeats.
    pub(crate) fn tick_leader(&mut self, log: &dyn LogStore, fx: &mut Vec<Effect>) {
        let now = self.now;
        let RoleState::Leader(l) = &self.role else {
            return;
        };
        if let Some(p) = &l.pulling {
            let idle = now - p.progress_at;
            if idle >= self.cfg.failure_ticks {
                log::warn!("leader-elect: node {} stopped answering pulls", p.from);
                self.become_follower(None, fx);
            } else if idle > 0 && idle.is_multiple_of(self.cfg.heartbeat_ticks) {
                // The pull or its reply may have been lost: ask again from where we are.
                let (from, target) = (p.from, p.target);
                let after = Self::pull_point(log, log.last().0.min(target.index));
                self.send(fx, from, Body::Pull { after });
            }
            return;
        }
        let since = l.since;
        if self.check_handover(log, fx) {
            return;
        }
        if self.majority_age() >= self.cfg.failure_ticks {
            log::warn!(
                "node {} heard no majority for the failure timeout: stepping down",
                self.cfg.id
            );
            return self.become_follower(None, fx);
        }
        if (now - since).is_multiple_of(self.cfg.heartbeat_ticks) {
            self.broadcast(log, fx);
        }
    }

    /// A heartbeat round: entries to whoever lags, a heartbeat to the rest.
    ///
    /// A follower behind the log's snapshot gets no entries (`send_append` pushes the
    /// snapshot instead), so it gets a heartbeat too: without one, a node that restarted
    /// meanwhile never hears that we lead, and refuses the snapshot's chunks from a node
    /// that is not its leader. It answers with a reject (it lacks our last entry), which
    /// changes nothing here: `send_append` again, the snapshot push rate-limited.
    fn broadcast(&mut self, log: &dyn LogStore, fx: &mut Vec<Effect>) {
        let last = Pos::from(log.last());
        let snap = log.snapshot().0;
        let (epoch, now, commit) = (self.epoch, self.now, self.commit);
        let RoleState::Leader(l) = &mut self.role else {
            return;
        };
        let mut lagging = Vec::new();
        for (&to, p) in l.progress.iter_mut() {
            if p.matched < last.index {
                // Resend what was not acknowledged: repairs lost messages.
                p.next = p.matched + 1;
                lagging.push(to);
            }
            if p.matched >= last.index || p.matched < snap {
                fx.push(Effect::Send {
                    to,
                    msg: crate::message::Message {
                        epoch,
                        body: Body::Heartbeat {
                            seq: now,
                            commit,
                            last,
                        },
                    },
                });
            }
        }
        for to in lagging {
            self.send_append(log, to, fx);
        }
    }

    /// Sends `to` the entries from its `next` index (or asks for a snapshot).
    pub(crate) fn send_append(&mut self, log: &dyn LogStore, to: u64, fx: &mut Vec<Effect>) {
        let (epoch, now, commit) = (self.epoch, self.now, self.commit);
        let (snap, last) = (log.snapshot().0, log.last().0);
        let (failure, max_bytes) = (self.cfg.failure_ticks, self.cfg.max_append_bytes);
        let RoleState::Leader(l) = &mut self.role else {
            return;
        };
        let Some(p) = l.progress.get_mut(&to) else {
            return;
        };
        let next = p.next.clamp(p.matched + 1, last + 1);
        let prev_epoch = match log.epoch_at(next - 1) {
            Ok(Some(e)) if next > snap => e,
            Ok(_) => {
                // Behind the log's start: only the snapshot can bring it up.
                if p.snapshot_at.is_none_or(|at| now - at >= failure) {
                    p.snapshot_at = Some(now);
                    fx.push(Effect::SendSnapshot { to });
                }
                return;
            }
            Err(e) => {
                log::error!("cannot read the log to replicate: {e}");
                return;
            }
        };
        let entries = if next <= last {
            match log.read(next, max_bytes) {
                Ok(entries) => entries,
                Err(e) => {
                    log::error!("cannot read the log to replicate: {e}");
                    return;
                }
            }
        } else {
            Vec::new()
        };
        p.next = entries.last().map_or(next, |e| e.index + 1);
        fx.push(Effect::Send {
            to,
            msg: crate::message::Message {
                epoch,
                body: Body::Append {
                    seq: now,
                    prev: Pos::new(next - 1, prev_epoch),
                    entries,
                    commit,
                },
            },
        });
    }

    /// Client writes: append them and send them to every follower that is caught up.
    pub(crate) fn propose_entries(
        &mut self,
        log: &dyn LogStore,
        payloads: Vec<Vec<u8>>,
    ) -> Result<(u64, Vec<Effect>), NotLeader> {
        if !self.serving() {
            let leader = match self.role {
                RoleState::Follower => self.leader,
                _ => None,
            };
            return Err(NotLeader { leader });
        }
        let (epoch, now, commit) = (self.epoch, self.now, self.commit);
        let last = Pos::from(log.last());
        let first = last.index + 1;
        if payloads.is_empty() {
            return Ok((first, Vec::new()));
        }
        let entries: Vec<LogEntry> = (first..)
            .zip(payloads)
            .map(|(index, payload)| LogEntry {
                index,
                epoch,
                payload,
            })
            .collect();
        let end = first + entries.len() as u64;
        // The followers get the entries before this node writes them: their fsyncs run
        // while ours does, not after it. Safe because the leader counts itself towards a
        // commit only once `persisted` says its own copy is durable (Raft §10.2.1).
        let mut fx = Vec::new();
        if let RoleState::Leader(l) = &mut self.role {
            for (&to, p) in l.progress.iter_mut() {
                // A follower that lags gets them with the rest at the next heartbeat.
                if p.next == first {
                    p.next = end;
                    fx.push(Effect::Send {
                        to,
                        msg: crate::message::Message {
                            epoch,
                            body: Body::Append {
                                seq: now,
                                prev: last,
                                entries: entries.clone(),
                                commit,
                            },
                        },
                    });
                }
            }
        }
        fx.push(Effect::Append(entries));
        Ok((first, fx))
    }

    /// A follower's answer to an `Append` or a `Heartbeat`.
    pub(crate) fn on_append_ack(
        &mut self,
        log: &dyn LogStore,
        from: u64,
        epoch: u64,
        seq: u64,
        result: AckResult,
        fx: &mut Vec<Effect>,
    ) {
        let (now, last) = (self.now, log.last().0);
        let failure = self.cfg.failure_ticks;
        let RoleState::Leader(l) = &mut self.role else {
            return;
        };
        if epoch != self.epoch || l.pulling.is_some() {
            return;
        }
        let Some(p) = l.progress.get_mut(&from) else {
            return;
        };
        if seq <= now {
            p.acked_seq = Some(p.acked_seq.map_or(seq, |s| s.max(seq)));
        }
        match result {
            AckResult::Match(m) => {
                let m = m.min(last);
                p.matched = p.matched.max(m);
                p.next = p.next.max(m + 1);
                self.maybe_commit(fx);
            }
            AckResult::Reject { hint } => {
                if hint < p.matched {
                    // It lacks an entry it acknowledged: it lost unsynced writes (`--fsync
                    // no`) or this reject is stale. Either way, resend from its hint;
                    // the commit index never moves back.
                    log::warn!("node {from} no longer holds index {}: resending", p.matched);
                    p.matched = hint;
                }
                p.next = (hint + 1).clamp(p.matched + 1, last + 1);
                self.send_append(log, from, fx);
            }
            AckResult::Diverged { commit } => {
                log::warn!(
                    "node {from} diverged below its commit index {commit}: sending a snapshot"
                );
                if p.snapshot_at.is_none_or(|at| now - at >= failure) {
                    p.snapshot_at = Some(now);
                    fx.push(Effect::SendSnapshot { to: from });
                }
            }
        }
    }

    /// Advances the commit index as the replication mode says (own epoch only).
    fn maybe_commit(&mut self, fx: &mut Vec<Effect>) {
        let quorum = self.quorum();
        let RoleState::Leader(l) = &self.role else {
            return;
        };
        if l.pulling.is_some() {
            return;
        }
        let mut held: Vec<u64> = l.progress.values().map(|p| p.matched).collect();
        held.push(self.durable);
        let index = match self.cfg.replication {
            Replication::Async => self.durable,
            Replication::All => held.iter().copied().min().unwrap_or(0),
            // The leader's own durable copy is one of the majority: a commit index is
            // then never past the leader's durable log (its meta may record it).
            Replication::Quorum => {
                held.sort_unstable_by(|a, b| b.cmp(a));
                let majority = held.get(quorum - 1).copied().unwrap_or(0);
                majority.min(self.durable)
            }
        };
        // Entries of older epochs commit only with this epoch's no-op (Raft §5.4.2).
        // (Under the planted bug `SkipNoop`, `noop_index` is 0: anything counts.)
        if index > self.commit && index >= l.noop_index {
            self.commit = index;
            fx.push(Effect::Commit(index));
        }
    }

    /// The tick of the newest message a majority acknowledged (self counts as now).
    /// Followers that never answered count as `missing`.
    fn majority_seq(&self, missing: Option<u64>) -> Option<u64> {
        let RoleState::Leader(l) = &self.role else {
            return None;
        };
        let mut seqs: Vec<u64> = l
            .progress
            .values()
            .filter_map(|p| p.acked_seq.or(missing))
            .collect();
        seqs.push(self.now);
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        seqs.get(self.quorum() - 1).copied()
    }

    /// How long ago a majority last heard us (from the start of leadership at most).
    fn majority_age(&self) -> u64 {
        let since = match &self.role {
            RoleState::Leader(l) => l.since,
            _ => return 0,
        };
        self.majority_seq(Some(since))
            .map_or(u64::MAX, |s| self.now.saturating_sub(s))
    }

    /// Whether the lease holds: a majority acknowledged a message sent less than
    /// `lease_ticks` ago.
    pub(crate) fn lease_holds(&self) -> bool {
        self.majority_seq(None)
            .is_some_and(|s| self.now - s < self.cfg.lease_ticks)
    }

    /// When serving: the tick at which the message a majority acknowledged was sent (the
    /// lease runs `lease_ticks` from then). The driver turns it into a wall-clock
    /// deadline, so the serving check does not depend on the node thread's next call.
    pub(crate) fn lease_start_tick(&self) -> Option<u64> {
        match &self.role {
            RoleState::Leader(l)
                if l.pulling.is_none() && l.handover.is_none() && self.commit >= l.noop_index =>
            {
                self.majority_seq(None)
            }
            _ => None,
        }
    }

    /// Writes accepted and linearizable reads served: see `Node::can_read`.
    pub(crate) fn serving(&self) -> bool {
        match &self.role {
            RoleState::Leader(l) => {
                l.pulling.is_none()
                    && l.handover.is_none()
                    && self.commit >= l.noop_index
                    && self.lease_holds()
            }
            _ => false,
        }
    }

    // -----------------------------------------------------------------------------------
    // Follower

    /// Our log equals the leader's, durably, through here.
    pub(crate) fn acked_index(&self) -> u64 {
        self.verified.min(self.durable)
    }

    /// Accepts `from` as the leader of our epoch (after the epoch rules).
    fn follow(&mut self, from: u64, fx: &mut Vec<Effect>) -> bool {
        match &self.role {
            RoleState::Leader(_) => {
                // Two leaders in one epoch: impossible while every node accepts at most
                // one coordinator per epoch. Refuse to make it worse.
                log::error!(
                    "node {from} claims to lead epoch {} that this node leads",
                    self.epoch
                );
                false
            }
            RoleState::Follower if self.leader == Some(from) => {
                self.heard_at = self.now;
                true
            }
            _ => {
                self.become_follower(Some(from), fx);
                true
            }
        }
    }

    /// Commits up to the leader's commit index, within what we verified and made durable.
    fn follower_commit(&mut self, fx: &mut Vec<Effect>) {
        let index = self.leader_commit.min(self.acked_index());
        if index > self.commit {
            self.commit = index;
            fx.push(Effect::Commit(index));
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_heartbeat(
        &mut self,
        log: &dyn LogStore,
        from: u64,
        epoch: u64,
        seq: u64,
        commit: u64,
        last: Pos,
        fx: &mut Vec<Effect>,
    ) {
        if epoch != self.epoch || !self.follow(from, fx) {
            return;
        }
        self.leader_seq = self.leader_seq.max(seq);
        self.leader_commit = self.leader_commit.max(commit);
        self.leader_last = last.index;
        // Holding the leader's last entry means holding everything before it too (two
        // logs with the same entry at an index agree up to it).
        let holds = matches!(log.epoch_at(last.index), Ok(Some(e)) if e == last.epoch);
        if holds {
            self.verified = self.verified.max(last.index);
        }
        self.follower_commit(fx);
        let result = if holds || last.index <= log.snapshot().0 {
            let acked = self.acked_index();
            self.acked = self.acked.max(acked);
            AckResult::Match(acked)
        } else {
            // A heartbeat goes only to a follower that acknowledged the leader's last
            // entry: lacking it, we lost it (unsynced writes under `--fsync no`).
            AckResult::Reject {
                hint: log.last().0.min(last.index - 1),
            }
        };
        self.acked_seq = self.acked_seq.max(seq);
        self.send(fx, from, Body::AppendAck { seq, result });
        self.maybe_takeover(fx);
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_append(
        &mut self,
        log: &dyn LogStore,
        from: u64,
        epoch: u64,
        seq: u64,
        prev: Pos,
        mut entries: Vec<LogEntry>,
        commit: u64,
        fx: &mut Vec<Effect>,
    ) {
        if epoch != self.epoch || !self.follow(from, fx) {
            return;
        }
        self.leader_seq = self.leader_seq.max(seq);
        self.leader_commit = self.leader_commit.max(commit);
        let reply = |node: &Node, fx: &mut Vec<Effect>, result| {
            node.send(fx, from, Body::AppendAck { seq, result });
        };
        let snap = Pos::from(log.snapshot());
        let mut prev = prev;
        if prev.index < snap.index {
            // Entries up to the snapshot are committed here and so equal the leader's.
            entries.retain(|e| e.index > snap.index);
            prev = snap;
        }
        let last = log.last().0;
        if prev.index > last {
            return reply(self, fx, AckResult::Reject { hint: last });
        }
        match log.epoch_at(prev.index) {
            Ok(Some(e)) if e == prev.epoch => {}
            Ok(_) if prev.index <= self.commit => {
                self.diverged = true;
                let commit = self.commit;
                return reply(self, fx, AckResult::Diverged { commit });
            }
            Ok(_) => {
                let hint = prev.index.saturating_sub(1);
                return reply(self, fx, AckResult::Reject { hint });
            }
            Err(e) => {
                log::error!("cannot read the log: {e}");
                return;
            }
        }
        let end = prev.index + entries.len() as u64;
        let truncates = entries
            .iter()
            .any(|e| matches!(log.epoch_at(e.index), Ok(Some(ep)) if ep != e.epoch));
        if self.take_entries(log, prev, entries, fx).is_none() {
            let commit = self.commit;
            return reply(self, fx, AckResult::Diverged { commit });
        }
        self.verified = if truncates {
            end
        } else {
            self.verified.max(end)
        };
        self.follower_commit(fx);
        let acked = self.acked_index();
        if acked >= end {
            self.acked = self.acked.max(acked);
        } else if seq < self.acked_seq + self.cfg.heartbeat_ticks {
            // The ack for the new entries leaves from persisted(), once they are durable.
            return;
        }
        // Answered at once when the entries are durable; otherwise too if no ack has
        // gone for a heartbeat's worth of the leader's ticks: the ack renews its lease
        // (we heard it at `seq`, and so refuse other coordinators for a failure timeout),
        // which must not wait for a slow fsync. It claims only what is durable.
        self.acked_seq = self.acked_seq.max(seq);
        reply(self, fx, AckResult::Match(acked));
    }

    /// The log is durable through `index`.
    pub(crate) fn on_persisted(&mut self, log: &dyn LogStore, index: u64, fx: &mut Vec<Effect>) {
        self.durable = self.durable.max(index.min(log.last().0));
        match &self.role {
            RoleState::Leader(_) => self.maybe_commit(fx),
            RoleState::Follower => self.ack_durable(fx),
            RoleState::Candidate(_) => {}
        }
    }

    /// Tells the leader what became durable since the last ack, then commits.
    fn ack_durable(&mut self, fx: &mut Vec<Effect>) {
        let Some(leader) = self.leader else { return };
        let acked = self.acked_index();
        if acked > self.acked {
            self.acked = acked;
            let seq = self.leader_seq;
            self.acked_seq = self.acked_seq.max(seq);
            self.send(
                fx,
                leader,
                Body::AppendAck {
                    seq,
                    result: AckResult::Match(acked),
                },
            );
        }
        self.follower_commit(fx);
    }

    /// The driver installed a snapshot at `index`.
    pub(crate) fn on_snapshot_installed(
        &mut self,
        log: &dyn LogStore,
        index: u64,
        fx: &mut Vec<Effect>,
    ) {
        self.durable = self.durable.max(index);
        let now = self.now;
        let reset = std::mem::take(&mut self.diverged);
        if reset {
            // What this node had committed past the snapshot is lost (async failover):
            // its commit index restarts from the snapshot, and says so durably before
            // the log is cut back below the old one.
            self.commit = index;
            self.verified = index;
            fx.push(Effect::SaveMeta(Meta {
                epoch: self.epoch,
                voted_for: self.voted_for,
                commit_index: index,
            }));
        }
        match &mut self.role {
            RoleState::Leader(l) => {
                let Some(p) = &mut l.pulling else { return };
                p.progress_at = now;
                let from = p.from;
                let after = Pos::from(log.last());
                self.commit = self.commit.max(index);
                self.send(fx, from, Body::Pull { after });
            }
            RoleState::Follower => {
                // The snapshot is the leader's committed state: the state machine is there.
                self.verified = self.verified.max(index);
                self.commit = self.commit.max(index);
                // Tell the leader where we are now, even if that is behind our last ack,
                // so that it sends what follows the snapshot at once.
                if let Some(leader) = self.leader {
                    let acked = self.acked_index();
                    self.acked = acked;
                    let seq = self.leader_seq;
                    self.send(
                        fx,
                        leader,
                        Body::AppendAck {
                            seq,
                            result: AckResult::Match(acked),
                        },
                    );
                }
                self.follower_commit(fx);
            }
            RoleState::Candidate(_) => {
                self.commit = self.commit.max(index);
            }
        }
    }
}
