//! Election rules: the Bully algorithm, made safe with epochs, majorities, pre-votes,
//! stickiness and a TAKEOVER hand-over. Part of [`Node`] (see
//! `node.rs` for the state and the epoch rules every message passes first).
//!
//! Every node has a unique priority, its id. The rules, in the order an election runs:
//!
//! 1. A follower that heard nothing from its leader for `failure_ticks` sends `Election`
//!    to every higher id but that leader (a node with no other higher id skips to step 3).
//! 2. A higher id that gets `Election` answers `Answer` (and, if it has no leader
//!    either, runs its own election). A node that hears `Answer` (or any refusal from a
//!    higher id) waits for a `Coordinator`; with none within `failure_ticks` it starts
//!    over.
//! 3. With no answer within `election_ticks`, the node is the highest alive: it asks
//!    everyone for a pre-vote. A node grants it unless it is sticky (it heard its leader
//!    within `failure_ticks`, or it leads) or it has a higher id itself (then it runs its
//!    own election); an `Election` from a lower id counts as its grant. Only with a majority of grants (itself included) does the candidate
//!    bump its epoch and save it with its vote for itself, then bid
//!    `Coordinator(epoch, last position)`. A node cut off from the others never gets
//!    those grants, so it never bumps its epoch and never deposes a healthy leader when it
//!    comes back.
//! 4. A node accepts at most one coordinator per epoch: it saves the epoch and its vote,
//!    then replies `Accept(its last position)`. A sticky node refuses (and keeps its
//!    epoch). With `Accept`s from a majority (itself included) the candidate leads;
//!    otherwise it gives up after `election_ticks` and retries after the failure timeout.
//!    What a new leader does before it serves is in `replication.rs`.
//! 5. TAKEOVER: a follower with a higher id than its leader first catches up (its
//!    acknowledged index reaches the leader's last index), then sends `Takeover`. The
//!    leader stops accepting writes and serving reads, keeps replicating until the
//!    candidate holds its last entry, waits out its lease, then sends `HandOver` to every
//!    follower and steps down. A follower that gets `HandOver` from its leader is no
//!    longer sticky, so it will accept the candidate's `Coordinator`; the candidate, on
//!    `HandOver`, starts its election at once. If the candidate does not catch up within
//!    the failure timeout, the leader cancels the hand-over and serves again.
//!
//! Two candidates can reach step 4 in one epoch (an `Answer` lost); each node accepts one
//! of them, so at most one gets a majority. A lower candidate that sees a higher one's
//! bid waits for it, so the next round goes to the higher id.

use crate::log::LogStore;
use crate::message::{Body, Pos};
use crate::node::{Candidate, Effect, Node, Phase, PlantedBug, RoleState};
use std::collections::BTreeMap;

impl Node {
    /// The election timers (followers and candidates).
    pub(crate) fn tick_election(&mut self, log: &dyn LogStore, fx: &mut Vec<Effect>) {
        let now = self.now;
        match &self.role {
            RoleState::Follower => {
                // A cluster of one has no one to wait for.
                if self.cfg.peers.is_empty() || now - self.heard_at >= self.cfg.failure_ticks {
                    self.start_election(log, fx);
                }
            }
            RoleState::Candidate(c) => {
                let elapsed = now - c.since;
                match c.phase {
                    Phase::Electing if elapsed >= self.cfg.election_ticks => {
                        self.start_prevote(log, fx)
                    }
                    Phase::Waiting if elapsed >= self.cfg.failure_ticks => {
                        self.start_election(log, fx)
                    }
                    Phase::Proposing if elapsed >= self.cfg.election_ticks && c.saw_higher => {
                        // A higher id bid too: let it have the next round.
                        if let RoleState::Candidate(c) = &mut self.role {
                            c.phase = Phase::Waiting;
                            c.since = now;
                        }
                    }
                    Phase::PreVote | Phase::Proposing if elapsed >= self.cfg.election_ticks => {
                        // No majority: retry after a failure timeout.
                        self.become_follower(None, fx);
                    }
                    _ => {}
                }
            }
            RoleState::Leader(_) => {}
        }
    }

    /// Rule 1: ask every higher id whether it is alive.
    pub(crate) fn start_election(&mut self, log: &dyn LogStore, fx: &mut Vec<Effect>) {
        // The leader whose silence started this election is not asked: waiting
        // `election_ticks` for an answer from a node we already timed out would only add
        // to every failover. If it is alive after all, it refuses our pre-vote (it leads).
        let lost = self.leader.take();
        let higher: Vec<u64> = self
            .cfg
            .peers
            .iter()
            .copied()
            .filter(|&p| p > self.cfg.id && Some(p) != lost)
            .collect();
        if higher.is_empty() {
            return self.start_prevote(log, fx);
        }
        self.role = RoleState::Candidate(Candidate {
            phase: Phase::Electing,
            since: self.now,
            grants: Vec::new(),
            accepts: BTreeMap::new(),
            saw_higher: false,
        });
        for p in higher {
            self.send(fx, p, Body::Election);
        }
    }

    /// Rule 3: ask everyone whether they would accept us at epoch + 1.
    fn start_prevote(&mut self, log: &dyn LogStore, fx: &mut Vec<Effect>) {
        self.leader = None;
        self.role = RoleState::Candidate(Candidate {
            phase: Phase::PreVote,
            since: self.now,
            grants: vec![self.cfg.id],
            accepts: BTreeMap::new(),
            saw_higher: false,
        });
        if self.quorum() <= 1 {
            return self.bid(log, fx);
        }
        let last = Pos::from(log.last());
        for &p in &self.cfg.peers {
            self.send(fx, p, Body::PreVote { last });
        }
    }

    /// Rule 3, with a majority of pre-votes: bump, save, then bid.
    fn bid(&mut self, log: &dyn LogStore, fx: &mut Vec<Effect>) {
        let epoch = self.epoch + 1;
        self.adopt_epoch(epoch, self.cfg.id, fx);
        let last = Pos::from(log.last());
        let mut accepts = BTreeMap::new();
        accepts.insert(self.cfg.id, last);
        self.role = RoleState::Candidate(Candidate {
            phase: Phase::Proposing,
            since: self.now,
            grants: Vec::new(),
            accepts: accepts.clone(),
            saw_higher: false,
        });
        if accepts.len() >= self.quorum() {
            return self.become_leader_elect(log, &accepts, fx);
        }
        for &p in &self.cfg.peers {
            self.send(fx, p, Body::Coordinator { last });
        }
    }

    /// Rule 2: a lower id asks whether we are alive.
    pub(crate) fn on_election(&mut self, from: u64, log: &dyn LogStore, fx: &mut Vec<Effect>) {
        if from > self.cfg.id {
            return; // Election goes to higher ids only
        }
        self.send(fx, from, Body::Answer);
        if matches!(&self.role, RoleState::Candidate(c) if c.phase == Phase::PreVote) {
            // A lower id that lost its leader too says what its pre-vote would: it is
            // not sticky and not higher. Count it, rather than wait for its reply to a
            // pre-vote it may have refused a moment before its own timer fired.
            return self.on_prevote_reply(log, from, self.epoch, true, fx);
        }
        // Run our own election if we have no leader and are not already waiting for a
        // coordinator we accepted.
        let awaiting = self.voted_for != 0
            && self.voted_for != self.cfg.id
            && self.now - self.heard_at < self.cfg.failure_ticks;
        if matches!(self.role, RoleState::Follower) && self.leader.is_none() && !awaiting {
            self.start_election(log, fx);
        }
    }

    /// Rule 2: a higher id is alive; wait for its bid.
    pub(crate) fn on_answer(&mut self, from: u64, epoch: u64) {
        if epoch != self.epoch || from < self.cfg.id {
            return;
        }
        self.wait_for_higher(true);
    }

    /// A refusal from a higher id proves it alive, like an `Answer`.
    pub(crate) fn on_refuse(&mut self, from: u64, epoch: u64) {
        if epoch != self.epoch || from < self.cfg.id {
            return;
        }
        self.wait_for_higher(false);
    }

    fn wait_for_higher(&mut self, in_prevote_too: bool) {
        let now = self.now;
        if let RoleState::Candidate(c) = &mut self.role {
            let waits = match c.phase {
                Phase::Electing => true,
                Phase::PreVote => in_prevote_too,
                _ => false,
            };
            if waits {
                c.phase = Phase::Waiting;
                c.since = now;
            }
        }
    }

    /// Rule 3: would we accept `from` at its epoch + 1?
    pub(crate) fn on_prevote(&mut self, from: u64, log: &dyn LogStore, fx: &mut Vec<Effect>) {
        let sticky = self.sticky();
        let higher = self.cfg.id > from;
        let granted = !sticky && !higher;
        self.send(fx, from, Body::PreVoteReply { granted });
        if !sticky && higher && matches!(self.role, RoleState::Follower) {
            // Bully: a higher id that is alive runs the election itself.
            self.start_election(log, fx);
        }
    }

    pub(crate) fn on_prevote_reply(
        &mut self,
        log: &dyn LogStore,
        from: u64,
        epoch: u64,
        granted: bool,
        fx: &mut Vec<Effect>,
    ) {
        if epoch != self.epoch || !granted {
            return;
        }
        let quorum = self.quorum();
        let RoleState::Candidate(c) = &mut self.role else {
            return;
        };
        if c.phase != Phase::PreVote {
            return;
        }
        if !c.grants.contains(&from) {
            c.grants.push(from);
        }
        if c.grants.len() >= quorum {
            self.bid(log, fx);
        }
    }

    /// Rule 4: a bid for `epoch`.
    pub(crate) fn on_coordinator(
        &mut self,
        log: &dyn LogStore,
        from: u64,
        epoch: u64,
        fx: &mut Vec<Effect>,
    ) {
        if self.sticky() {
            // Loyal to a live leader: refuse, and keep our epoch.
            let leader = self.leader();
            return self.send(fx, from, Body::Refuse { leader });
        }
        let two_coordinators = self.cfg.planted_bug == Some(PlantedBug::TwoCoordinators);
        if epoch == self.epoch && self.voted_for != 0 && self.voted_for != from && !two_coordinators
        {
            // One coordinator per epoch.
            self.send(fx, from, Body::Refuse { leader: None });
            if from > self.cfg.id
                && let RoleState::Candidate(c) = &mut self.role
            {
                // A higher candidate is alive. Our own bid still counts (a majority can
                // only accept one of us), but if it fails the next round is the higher's.
                c.saw_higher = true;
            }
            return;
        }
        if epoch > self.epoch {
            self.adopt_epoch(epoch, from, fx);
        } else if self.voted_for == 0 || (two_coordinators && self.voted_for != from) {
            self.voted_for = from;
            fx.push(Effect::SaveMeta(self.meta()));
        }
        // Saved before the Accept leaves (the effects run in order).
        self.become_follower(None, fx);
        let last = Pos::from(log.last());
        self.send(fx, from, Body::Accept { last });
    }

    /// Rule 4: count an `Accept`.
    pub(crate) fn on_accept(
        &mut self,
        log: &dyn LogStore,
        from: u64,
        epoch: u64,
        last: Pos,
        fx: &mut Vec<Effect>,
    ) {
        if epoch != self.epoch {
            return;
        }
        let quorum = self.quorum();
        let RoleState::Candidate(c) = &mut self.role else {
            return;
        };
        if c.phase != Phase::Proposing {
            return;
        }
        c.accepts.insert(from, last);
        if c.accepts.len() >= quorum {
            let accepts = c.accepts.clone();
            self.become_leader_elect(log, &accepts, fx);
        }
    }

    /// Rule 5, follower side: once caught up with a lower leader, ask it to hand over.
    pub(crate) fn maybe_takeover(&mut self, fx: &mut Vec<Effect>) {
        let Some(leader) = self.leader else { return };
        if leader > self.cfg.id || !matches!(self.role, RoleState::Follower) {
            return;
        }
        let acked = self.acked_index();
        if acked < self.leader_last {
            return; // catch up first
        }
        if let Some(at) = self.takeover_at
            && self.now - at < self.cfg.failure_ticks
        {
            return;
        }
        self.takeover_at = Some(self.now);
        let last = Pos::new(acked, self.epoch);
        self.send(fx, leader, Body::Takeover { last });
    }

    /// Rule 5, leader side: a higher id asks for the lead.
    pub(crate) fn on_takeover(
        &mut self,
        log: &dyn LogStore,
        from: u64,
        epoch: u64,
        fx: &mut Vec<Effect>,
    ) {
        if epoch != self.epoch || from < self.cfg.id {
            return;
        }
        let now = self.now;
        let RoleState::Leader(l) = &mut self.role else {
            return;
        };
        if l.pulling.is_some() || l.handover.is_some() {
            return;
        }
        log::info!(
            "node {from} takes over from node {}: handing over",
            self.cfg.id
        );
        l.handover = Some((from, now));
        self.send_append(log, from, fx);
    }

    /// Rule 5, leader side, every tick while handing over. Returns whether it stepped
    /// down.
    pub(crate) fn check_handover(&mut self, log: &dyn LogStore, fx: &mut Vec<Effect>) -> bool {
        let now = self.now;
        let last = log.last().0;
        let RoleState::Leader(l) = &mut self.role else {
            return false;
        };
        let Some((to, since)) = l.handover else {
            return false;
        };
        let caught_up = l.progress.get(&to).is_some_and(|p| p.matched >= last);
        if caught_up && now - since >= self.cfg.lease_ticks {
            for &p in &self.cfg.peers {
                self.send(fx, p, Body::HandOver { successor: to });
            }
            self.become_follower(None, fx);
            return true;
        }
        if now - since >= self.cfg.failure_ticks {
            log::warn!("node {to} did not catch up in time: hand-over cancelled");
            l.handover = None;
        }
        false
    }

    /// Rule 5, follower side: our leader stepped down for `successor`.
    pub(crate) fn on_handover(
        &mut self,
        log: &dyn LogStore,
        from: u64,
        epoch: u64,
        successor: u64,
        fx: &mut Vec<Effect>,
    ) {
        if epoch != self.epoch || !matches!(self.role, RoleState::Follower) {
            return;
        }
        if self.leader == Some(from) {
            self.leader = None;
            self.heard_at = self.now;
        }
        if successor == self.cfg.id && self.leader.is_none() {
            self.start_election(log, fx);
        }
    }
}
