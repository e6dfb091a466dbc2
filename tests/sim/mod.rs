//! A deterministic simulator of a whole kvstore cluster: the real node state machine
//! (`kvstore::node`, election and replication) on in-memory logs, in one thread, with a
//! simulated clock, network, disks and clients, driven by one seeded random number
//! generator. The same seed gives the same run, event for event.
//!
//! **What is simulated.** Time is an integer; each node ticks every `period` units (100
//! nominal, drifting per node within what the lease allows, or beyond it as a planted
//! bug). Messages take a random delay (so they reorder), and may be dropped or
//! duplicated; partitions cut directed links (both ways, one way, a minority, a bridge)
//! until healed. A node's appends stay volatile until its disk's fsync completes (a
//! random delay, long while the disk is slow); a crash loses them ([`MemLog::crash`]),
//! keeps the meta and the snapshot, and the node restarts later from its log. Logs are
//! compacted now and then, so lagging nodes get snapshots. Clients write unique values
//! and read on three keys through whichever node they believe leads, follow redirects,
//! and give up after a timeout (outcome unknown).
//!
//! **The driver here does what `src/driver.rs` does:** it carries out the node's
//! effects in order, calls `persisted` once an fsync covered the appended entries (before
//! it, as a planted bug), applies committed entries to the node's state machine and
//! answers the clients waiting for them, fails them as "unknown" on a step-down or a
//! truncation, and copies snapshots between logs.
//!
//! **Invariants**, checked as the events happen: at most one leader per epoch; the epoch
//! in a node's saved meta never goes back; a committed index never holds two different
//! entries (log matching of the committed prefix, quorum and all modes); a new leader's
//! log holds every committed entry; a node never commits what its log lacks; every node's
//! state machine equals the replay of the committed log up to its applied index
//! (checked every [`STATE_CHECK_EVERY`] steps and at the end). At the end of a run the
//! clients' history is checked for linearizability per key (`linearizability.rs`), and
//! for reads of values never written.

use crate::linearizability as lin;
use kvstore::log::{LogEntry, LogStore, MemLog};
use kvstore::message::Message;
use kvstore::node::{Effect, Node, NodeConfig, PlantedBug, Replication, Role};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::fmt::Write as _;

/// Time units per nominal tick.
pub const TICK: u64 = 100;
/// The state machines are compared with the committed log's replay this often.
pub const STATE_CHECK_EVERY: u64 = 256;
/// Keys the clients use (few, so that operations contend).
const KEYS: [&[u8]; 3] = [b"a", b"b", b"c"];
/// A client gives up on a write after this long (its outcome is then unknown).
const CLIENT_TIMEOUT: u64 = 12 * TICK;
/// Events kept for the trace printed with a violation.
const TRACE_LEN: usize = 60;

/// A bug planted on purpose, to show that the simulator catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// One of the node's own ([`PlantedBug`]).
    Node(PlantedBug),
    /// The driver tells the node its appends are durable before the fsync: a follower
    /// acknowledges what a crash then loses.
    AckBeforeFsync,
    /// The nodes' clocks drift apart beyond what the lease assumes (one runs at half
    /// speed, another at twice): a leader's lease outlives the followers' loyalty.
    ClockDrift,
}

/// SplitMix64: small, fast, and the same on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// True with probability `per_mille` / 1000.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// What one run found.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub steps: u64,
    pub faults: u64,
    pub ops: u64,
    pub acked_writes: u64,
    /// The first violation: (step, description).
    pub violation: Option<(u64, String)>,
    /// The last events before the violation (only when traced).
    pub trace: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Pending,
    Ok,
    Failed,
    Unknown,
}

/// One client operation, as the history checker sees it.
#[derive(Debug, Clone)]
struct HistOp {
    client: u64,
    key: Vec<u8>,
    /// `Some(v)`: a write of `v`; `None`: a read.
    write: Option<Vec<u8>>,
    /// What a read returned.
    read: Option<Vec<u8>>,
    invoke: u64,
    complete: u64,
    fate: Fate,
}

/// A write waiting for its node to commit it.
struct Waiter {
    index: u64,
    payload: Vec<u8>,
    op: usize,
    client: usize,
}

struct SimNode {
    id: u64,
    node: Option<Node>,
    log: MemLog,
    cfg: NodeConfig,
    /// Time units per tick (its clock's rate).
    period: u64,
    next_tick: u64,
    /// When the fsync under way completes.
    sync_at: Option<u64>,
    /// Longest fsync (long while the disk is slow).
    disk_delay: u64,
    restart_at: Option<u64>,
    /// The state machine: key -> value, with the index applied through.
    sm: BTreeMap<Vec<u8>, Vec<u8>>,
    applied: u64,
    saved_epoch: u64,
    waiters: Vec<Waiter>,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: u64,
    seq: u64,
    from: u64,
    to: u64,
    idx: usize,
}

struct Client {
    /// The node it believes leads (0: none known).
    target: u64,
    next_at: u64,
    /// The operation it waits for, and when it gives up.
    waiting: Option<(usize, u64)>,
    writes: u64,
    /// How many of its operations are writes, per mille.
    write_per_mille: u64,
}

/// One seeded run.
pub struct Sim {
    rng: Rng,
    bug: Option<Bug>,
    replication: Replication,
    now: u64,
    step: u64,
    nodes: Vec<SimNode>,
    net: BinaryHeap<Reverse<InFlight>>,
    messages: HashMap<usize, Message>,
    next_msg: usize,
    seq: u64,
    /// Directed links that drop everything.
    cut: Vec<(u64, u64)>,
    heal_at: Option<u64>,
    drop_per_mille: u64,
    dup_per_mille: u64,
    max_delay: u64,
    next_fault: u64,
    clients: Vec<Client>,
    history: Vec<HistOp>,
    /// Invariant state: the leader of each epoch; every committed entry by index.
    leaders: HashMap<u64, u64>,
    committed: Vec<Option<(u64, Vec<u8>)>>,
    out: Outcome,
    trace: Option<VecDeque<String>>,
}

fn key_value(payload: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = payload.iter().position(|&b| b == b'=')?;
    Some((&payload[..i], &payload[i + 1..]))
}

fn encode_sm(sm: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in sm {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    out
}

fn decode_sm(mut data: &[u8]) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut sm = BTreeMap::new();
    let take = |d: &mut &[u8]| -> Option<Vec<u8>> {
        let n = u32::from_le_bytes(d.get(..4)?.try_into().ok()?) as usize;
        let v = d.get(4..4 + n)?.to_vec();
        *d = &d[4 + n..];
        Some(v)
    };
    while !data.is_empty() {
        let (Some(k), Some(v)) = (take(&mut data), take(&mut data)) else {
            break;
        };
        sm.insert(k, v);
    }
    sm
}

fn entry_at(log: &MemLog, index: u64) -> Option<&LogEntry> {
    let first = log.snapshot().0 + 1;
    if index < first {
        return None;
    }
    log.entries().get((index - first) as usize)
}

impl Sim {
    /// A cluster of 3, 5 or 7 nodes with settings drawn from `seed`.
    pub fn new(seed: u64, bug: Option<Bug>) -> Sim {
        let mut rng = Rng::new(seed);
        let n = [3u64, 3, 3, 5, 5, 7][rng.below(6) as usize];
        let replication = if rng.chance(150) {
            Replication::All
        } else {
            Replication::Quorum
        };
        let ids: Vec<u64> = (1..=n).collect();
        let nodes = ids
            .iter()
            .map(|&id| {
                let mut cfg =
                    NodeConfig::new(id, ids.iter().copied().filter(|&p| p != id).collect());
                cfg.replication = replication;
                cfg.max_append_bytes = 64;
                if let Some(Bug::Node(b)) = bug {
                    cfg.planted_bug = Some(b);
                }
                // Within the bound the lease assumes (lease 15 ticks, failure timeout 25:
                // 15 x 1.1 < 25 x 0.9 with room for message delays), or, planted, far
                // beyond it.
                let period = match bug {
                    Some(Bug::ClockDrift) => [TICK / 2, TICK, 2 * TICK][rng.below(3) as usize],
                    _ => rng.range(TICK * 9 / 10, TICK * 11 / 10),
                };
                let log = MemLog::new();
                let node = Node::new(cfg.clone(), &log);
                SimNode {
                    id,
                    node: Some(node),
                    log,
                    cfg,
                    period,
                    next_tick: rng.below(period),
                    sync_at: None,
                    disk_delay: rng.range(TICK / 10, 2 * TICK),
                    restart_at: None,
                    sm: BTreeMap::new(),
                    applied: 0,
                    saved_epoch: 0,
                    waiters: Vec::new(),
                }
            })
            .collect();
        let clients = (0..rng.range(3, 6))
            .map(|_| Client {
                target: 0,
                next_at: rng.range(0, 30 * TICK),
                waiting: None,
                writes: 0,
                write_per_mille: rng.range(200, 800),
            })
            .collect();
        let next_fault = rng.range(20 * TICK, 60 * TICK);
        Sim {
            rng,
            bug,
            replication,
            now: 0,
            step: 0,
            nodes,
            net: BinaryHeap::new(),
            messages: HashMap::new(),
            next_msg: 0,
            seq: 0,
            cut: Vec::new(),
            heal_at: None,
            drop_per_mille: 0,
            dup_per_mille: 0,
            max_delay: TICK / 5,
            next_fault,
            clients,
            history: Vec::new(),
            leaders: HashMap::new(),
            committed: Vec::new(),
            out: Outcome::default(),
            trace: None,
        }
    }

    /// Records the last events, to print with a violation.
    pub fn traced(mut self) -> Sim {
        self.trace = Some(VecDeque::new());
        self
    }

    fn note(&mut self, what: impl FnOnce() -> String) {
        if let Some(t) = &mut self.trace {
            if t.len() == TRACE_LEN {
                t.pop_front();
            }
            t.push_back(format!("{:>7} {}", self.now, what()));
        }
    }

    fn violate(&mut self, what: String) {
        if self.out.violation.is_none() {
            self.note(|| format!("VIOLATION: {what}"));
            self.out.violation = Some((self.step, what));
        }
    }

    fn idx(&self, id: u64) -> usize {
        (id - 1) as usize
    }

    /// Runs `steps` events, then lets the cluster settle and checks the history.
    pub fn run(mut self, steps: u64) -> Outcome {
        while self.step < steps && self.out.violation.is_none() {
            self.step += 1;
            self.next_event(true);
            if self.step.is_multiple_of(STATE_CHECK_EVERY) {
                self.check_state_machines();
            }
        }
        if self.out.violation.is_none() {
            // Heal everything and let the clients' last writes finish or time out.
            self.cut.clear();
            self.drop_per_mille = 0;
            self.dup_per_mille = 0;
            let end = self.now + CLIENT_TIMEOUT + 10 * TICK;
            while self.now < end && self.out.violation.is_none() {
                self.step += 1;
                self.next_event(false);
            }
            for c in 0..self.clients.len() {
                if let Some((op, _)) = self.clients[c].waiting.take() {
                    self.finish(op, Fate::Unknown, None);
                }
            }
            self.check_state_machines();
        }
        if self.out.violation.is_none() {
            self.check_history();
        }
        self.out.steps = self.step;
        self.out.ops = self.history.len() as u64;
        self.out.acked_writes = self
            .history
            .iter()
            .filter(|o| o.write.is_some() && o.fate == Fate::Ok)
            .count() as u64;
        if let Some(t) = self.trace.take() {
            self.out.trace = t.into();
        }
        self.out
    }

    /// Processes the earliest event (faults only while `faults`).
    fn next_event(&mut self, faults: bool) {
        #[derive(Clone, Copy)]
        enum Ev {
            Tick(usize),
            Sync(usize),
            Restart(usize),
            Deliver,
            Client(usize),
            Fault,
            Heal,
        }
        let mut best = (u64::MAX, Ev::Fault);
        let mut consider = |at: u64, ev: Ev| {
            if at < best.0 {
                best = (at, ev);
            }
        };
        for (i, n) in self.nodes.iter().enumerate() {
            if n.node.is_some() {
                consider(n.next_tick, Ev::Tick(i));
                if let Some(at) = n.sync_at {
                    consider(at, Ev::Sync(i));
                }
            } else if let Some(at) = n.restart_at {
                consider(at, Ev::Restart(i));
            }
        }
        if let Some(Reverse(m)) = self.net.peek() {
            consider(m.at, Ev::Deliver);
        }
        for (i, c) in self.clients.iter().enumerate() {
            consider(
                c.waiting
                    .map_or(c.next_at, |(_, deadline)| deadline.min(c.next_at)),
                Ev::Client(i),
            );
        }
        if faults {
            consider(self.next_fault, Ev::Fault);
            if let Some(at) = self.heal_at {
                consider(at, Ev::Heal);
            }
        }
        self.now = self.now.max(best.0);
        match best.1 {
            Ev::Tick(i) => {
                self.nodes[i].next_tick += self.nodes[i].period;
                self.call(i, |node, log| node.tick(log));
            }
            Ev::Sync(i) => self.sync(i),
            Ev::Restart(i) => self.restart(i),
            Ev::Deliver => self.deliver(),
            Ev::Client(i) => self.client(i),
            Ev::Fault => self.fault(),
            Ev::Heal => {
                self.cut.clear();
                self.heal_at = None;
                self.note(|| "heal".into());
            }
        }
    }

    // ------------------------------------------------------------------------------
    // The driver

    /// Calls the node `i` and carries out its effects (and those they bring).
    fn call(&mut self, i: usize, f: impl FnOnce(&mut Node, &dyn LogStore) -> Vec<Effect>) {
        let Some(mut node) = self.nodes[i].node.take() else {
            return;
        };
        let fx = f(&mut node, &self.nodes[i].log);
        self.execute(i, &mut node, fx);
        self.nodes[i].node = Some(node);
    }

    fn execute(&mut self, i: usize, node: &mut Node, fx: Vec<Effect>) {
        let mut queue: VecDeque<Effect> = fx.into();
        let id = self.nodes[i].id;
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Send { to, msg } => self.send(id, to, msg),
                Effect::SaveMeta(meta) => {
                    let n = &mut self.nodes[i];
                    if meta.epoch < n.saved_epoch {
                        let what =
                            format!("n{id} saved epoch {} after {}", meta.epoch, n.saved_epoch);
                        self.violate(what);
                    }
                    let n = &mut self.nodes[i];
                    n.saved_epoch = meta.epoch;
                    let _ = n.log.save_meta(meta);
                }
                Effect::Append(entries) => {
                    let n = &mut self.nodes[i];
                    if let Err(e) = n.log.append(&entries) {
                        self.violate(format!("n{id} append refused: {e}"));
                        continue;
                    }
                    if self.bug == Some(Bug::AckBeforeFsync) {
                        let last = n.log.last().0;
                        queue.extend(node.persisted(&n.log, last));
                    }
                    let n = &mut self.nodes[i];
                    if n.sync_at.is_none() {
                        n.sync_at = Some(self.now + self.rng.range(1, n.disk_delay));
                    }
                }
                Effect::Truncate { after } => {
                    let n = &mut self.nodes[i];
                    if let Err(e) = n.log.truncate_after(after) {
                        self.violate(format!("n{id} truncate refused: {e}"));
                        continue;
                    }
                    let gone: Vec<Waiter> = self.nodes[i]
                        .waiters
                        .extract_if(.., |w| w.index > after)
                        .collect();
                    for w in gone {
                        self.resolve(w, Fate::Unknown);
                    }
                }
                Effect::Commit(index) => self.commit(i, index),
                Effect::BecomeLeader { epoch } => {
                    self.note(|| format!("n{id} leads epoch {epoch}"));
                    if let Some(&other) = self.leaders.get(&epoch)
                        && other != id
                    {
                        self.violate(format!("two leaders in epoch {epoch}: n{other} and n{id}"));
                    }
                    self.leaders.insert(epoch, id);
                    self.check_leader_log(i);
                }
                Effect::StepDown { epoch, .. } => {
                    self.note(|| format!("n{id} steps down from epoch {epoch}"));
                    for w in std::mem::take(&mut self.nodes[i].waiters) {
                        self.resolve(w, Fate::Unknown);
                    }
                }
                Effect::SendSnapshot { to } => {
                    let t = self.idx(to);
                    self.transfer_snapshot(i, t);
                }
                Effect::FetchSnapshot { from } => {
                    let f = self.idx(from);
                    if self.nodes[f].node.is_some()
                        && let Some(fx) = self.install_from(f, i, node)
                    {
                        queue.extend(fx);
                    }
                }
            }
        }
    }

    fn send(&mut self, from: u64, to: u64, msg: Message) {
        if self.cut.contains(&(from, to)) || self.rng.chance(self.drop_per_mille) {
            return;
        }
        let copies = if self.rng.chance(self.dup_per_mille) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.rng.chance(20) {
                self.rng.range(1, 5 * TICK) // a long tail: reordering
            } else {
                self.rng.range(1, self.max_delay)
            };
            self.seq += 1;
            let idx = self.next_msg;
            self.next_msg += 1;
            self.messages.insert(idx, msg.clone());
            self.net.push(Reverse(InFlight {
                at: self.now + delay,
                seq: self.seq,
                from,
                to,
                idx,
            }));
        }
    }

    fn deliver(&mut self) {
        let Some(Reverse(m)) = self.net.pop() else {
            return;
        };
        let Some(msg) = self.messages.remove(&m.idx) else {
            return;
        };
        let t = self.idx(m.to);
        if self.cut.contains(&(m.from, m.to)) || self.nodes[t].node.is_none() {
            return;
        }
        self.note(|| format!("n{} -> n{} {msg}", m.from, m.to));
        let from = m.from;
        self.call(t, move |node, log| node.step(log, from, msg));
    }

    fn sync(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.sync_at = None;
        let _ = n.log.sync();
        let durable = n.log.durable_index();
        self.call(i, |node, log| node.persisted(log, durable));
    }

    /// Applies entries up to `index` to node `i`'s state machine, and answers its clients.
    fn commit(&mut self, i: usize, index: u64) {
        let id = self.nodes[i].id;
        let from = self.nodes[i].applied + 1;
        for at in from..=index {
            let Some(e) = entry_at(&self.nodes[i].log, at) else {
                self.violate(format!("n{id} committed {at}, which its log lacks"));
                return;
            };
            let seen = (e.epoch, e.payload.clone());
            if self.replication != Replication::Async {
                if self.committed.len() < at as usize {
                    self.committed.resize(at as usize, None);
                }
                match &self.committed[at as usize - 1] {
                    Some(prev) if *prev != seen => {
                        let what = format!(
                            "index {at} committed as {:?}@{} on n{id}, but as {:?}@{} before",
                            String::from_utf8_lossy(&seen.1),
                            seen.0,
                            String::from_utf8_lossy(&prev.1),
                            prev.0
                        );
                        self.violate(what);
                        return;
                    }
                    Some(_) => {}
                    None => self.committed[at as usize - 1] = Some(seen.clone()),
                }
            }
            let n = &mut self.nodes[i];
            if let Some((k, v)) = key_value(&seen.1) {
                n.sm.insert(k.to_vec(), v.to_vec());
            }
            n.applied = at;
        }
        let done: Vec<Waiter> = self.nodes[i]
            .waiters
            .extract_if(.., |w| w.index <= index)
            .collect();
        for w in done {
            let same =
                entry_at(&self.nodes[i].log, w.index).is_some_and(|e| e.payload == w.payload);
            self.resolve(w, if same { Fate::Ok } else { Fate::Unknown });
        }
    }

    /// A new leader's log holds every committed entry.
    fn check_leader_log(&mut self, i: usize) {
        if self.replication == Replication::Async {
            return;
        }
        let n = &self.nodes[i];
        let snap = n.log.snapshot().0;
        let mut bad = None;
        for (at, c) in self.committed.iter().enumerate() {
            let at = at as u64 + 1;
            if at <= snap {
                continue;
            }
            let Some((epoch, payload)) = c else { continue };
            match entry_at(&n.log, at) {
                Some(e) if e.epoch == *epoch && e.payload == *payload => {}
                _ => {
                    bad = Some(at);
                    break;
                }
            }
        }
        if let Some(at) = bad {
            let id = n.id;
            self.violate(format!("n{id} leads without committed entry {at}"));
        }
    }

    /// Copies `from`'s snapshot to `to` (a leader's `SendSnapshot`; `from` is the node
    /// whose effects are being carried out, so it is up).
    fn transfer_snapshot(&mut self, from: usize, to: usize) {
        let (fid, tid) = (self.nodes[from].id, self.nodes[to].id);
        if self.cut.contains(&(fid, tid)) || self.nodes[to].node.is_none() {
            return;
        }
        let Some(mut node) = self.nodes[to].node.take() else {
            return;
        };
        if let Some(fx) = self.install_from(from, to, &mut node) {
            self.execute(to, &mut node, fx);
        }
        self.nodes[to].node = Some(node);
    }

    /// Installs `from`'s snapshot into `to`'s log and state machine (the caller checked
    /// that `from` is up); the node's reply.
    fn install_from(&mut self, from: usize, to: usize, node: &mut Node) -> Option<Vec<Effect>> {
        let (fid, tid) = (self.nodes[from].id, self.nodes[to].id);
        if self.cut.contains(&(fid, tid)) {
            return None;
        }
        let (index, epoch) = self.nodes[from].log.snapshot();
        let data = self.nodes[from].log.snapshot_data().to_vec();
        if index == 0 {
            return None;
        }
        if index <= self.nodes[to].log.snapshot().0 {
            // Not newer than its own: the log refuses it, as the real one does (the
            // driver logs it and the leader tries again later); not a safety matter.
            self.note(|| format!("n{tid} refuses n{fid}'s older snapshot at {index}"));
            return None;
        }
        if let Err(e) = self.nodes[to].log.install_snapshot(index, epoch, &data) {
            self.violate(format!("n{tid} refused n{fid}'s snapshot at {index}: {e}"));
            return None;
        }
        self.note(|| format!("n{tid} installs n{fid}'s snapshot at {index}"));
        let n = &mut self.nodes[to];
        n.sm = decode_sm(&data);
        n.applied = index;
        Some(node.snapshot_installed(&n.log, index))
    }

    fn restart(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.restart_at = None;
        let node = Node::new(n.cfg.clone(), &n.log);
        // Recovery applies the snapshot and then what the log knows is committed.
        n.sm = decode_sm(n.log.snapshot_data());
        n.applied = n.log.snapshot().0;
        n.next_tick = self.now + self.rng.below(n.period);
        let commit = node.commit_index();
        let id = n.id;
        self.note(|| format!("n{id} restarts (commit {commit})"));
        self.nodes[i].node = Some(node);
        self.commit(i, commit);
    }

    fn crash(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if n.node.take().is_none() {
            return;
        }
        n.log.crash();
        n.sync_at = None;
        // Often a quick bounce (a process restarted by systemd), otherwise a longer outage.
        n.restart_at = Some(if self.rng.chance(400) {
            self.now + self.rng.range(1, 3 * TICK)
        } else {
            self.now + self.rng.range(3 * TICK, 40 * TICK)
        });
        let id = n.id;
        self.note(|| format!("n{id} crashes"));
        for w in std::mem::take(&mut self.nodes[i].waiters) {
            self.resolve(w, Fate::Unknown);
        }
    }

    // ------------------------------------------------------------------------------
    // Faults

    fn fault(&mut self) {
        self.next_fault = self.now + self.rng.range(3 * TICK, 40 * TICK);
        self.out.faults += 1;
        let n = self.nodes.len() as u64;
        let ids: Vec<u64> = (1..=n).collect();
        match self.rng.below(12) {
            0 | 1 => {
                // Crash the leader (if one is known) or any node.
                let leader = self
                    .nodes
                    .iter()
                    .position(|x| x.node.as_ref().is_some_and(|nd| nd.role() == Role::Leader));
                let i = match leader {
                    Some(i) if self.rng.chance(600) => i,
                    _ => self.rng.below(n) as usize,
                };
                self.crash(i);
            }
            2 => {
                // Every node at once, now and then.
                if self.rng.chance(300) {
                    for i in 0..self.nodes.len() {
                        self.crash(i);
                    }
                } else {
                    let i = self.rng.below(n) as usize;
                    self.crash(i);
                }
            }
            3 | 4 => {
                // A two-way partition: a random minority (or the leader) cut off.
                self.cut.clear();
                let mut side: Vec<u64> = ids
                    .iter()
                    .copied()
                    .filter(|_| self.rng.chance(400))
                    .collect();
                if side.is_empty() {
                    side.push(self.rng.range(1, n));
                }
                for &a in &side {
                    for &b in &ids {
                        if !side.contains(&b) {
                            self.cut.push((a, b));
                            self.cut.push((b, a));
                        }
                    }
                }
                self.heal_at = Some(self.now + self.rng.range(10 * TICK, 80 * TICK));
                self.note(|| format!("partition {side:?} | rest"));
            }
            5 => {
                // One-way cuts: some directed links only.
                self.cut.clear();
                for &a in &ids {
                    for &b in &ids {
                        if a != b && self.rng.chance(250) {
                            self.cut.push((a, b));
                        }
                    }
                }
                self.heal_at = Some(self.now + self.rng.range(10 * TICK, 80 * TICK));
                let cut = self.cut.clone();
                self.note(|| format!("one-way cuts {cut:?}"));
            }
            6 => {
                // A bridge: two halves that only one node hears both of.
                self.cut.clear();
                if n >= 3 {
                    let bridge = self.rng.range(1, n);
                    let others: Vec<u64> = ids.iter().copied().filter(|&x| x != bridge).collect();
                    let half = others.len() / 2;
                    for &a in &others[..half] {
                        for &b in &others[half..] {
                            self.cut.push((a, b));
                            self.cut.push((b, a));
                        }
                    }
                    self.heal_at = Some(self.now + self.rng.range(10 * TICK, 80 * TICK));
                    self.note(|| format!("bridge through n{bridge}"));
                }
            }
            7 => {
                self.drop_per_mille = [0, 20, 100, 300][self.rng.below(4) as usize];
                self.dup_per_mille = [0, 20, 100][self.rng.below(3) as usize];
                self.max_delay = [TICK / 10, TICK / 5, TICK, 3 * TICK][self.rng.below(4) as usize];
            }
            8 => {
                // A slow disk, or a fast one again.
                let i = self.rng.below(n) as usize;
                self.nodes[i].disk_delay = if self.rng.chance(500) {
                    self.rng.range(TICK, 20 * TICK)
                } else {
                    self.rng.range(1, TICK / 2)
                };
            }
            9 => {
                // Compact a node's log at what it applied (a snapshot of its state).
                let i = self.rng.below(n) as usize;
                let nd = &mut self.nodes[i];
                let at = nd.applied;
                if nd.node.is_some()
                    && at > nd.log.snapshot().0
                    && at <= nd.log.last().0
                    && let Some(epoch) = entry_at(&nd.log, at).map(|e| e.epoch)
                {
                    let data = encode_sm(&nd.sm);
                    let _ = nd.log.install_snapshot(at, epoch, &data);
                    let id = nd.id;
                    self.note(|| format!("n{id} compacts through {at}"));
                }
            }
            _ => {
                self.cut.clear();
                self.heal_at = None;
            }
        }
    }

    // ------------------------------------------------------------------------------
    // Clients

    fn client(&mut self, c: usize) {
        if let Some((op, deadline)) = self.clients[c].waiting
            && self.now >= deadline
        {
            // Gave up: the write may still commit.
            self.clients[c].waiting = None;
            for n in &mut self.nodes {
                n.waiters.retain(|w| w.op != op);
            }
            self.finish(op, Fate::Unknown, None);
            self.clients[c].target = 0;
            self.clients[c].next_at = self.now + self.rng.range(1, 5 * TICK);
            return;
        }
        if self.clients[c].waiting.is_some() {
            self.clients[c].next_at = u64::MAX;
            return;
        }
        let n = self.nodes.len() as u64;
        // Now and then a client tries any node (a stale routing table, a load balancer):
        // it finds a new leader sooner, and reads from an old one for longer.
        if self.clients[c].target == 0 || self.rng.chance(150) {
            self.clients[c].target = self.rng.range(1, n);
        }
        let target = self.clients[c].target;
        let t = self.idx(target);
        let key = KEYS[self.rng.below(KEYS.len() as u64) as usize].to_vec();
        let write = self.rng.chance(self.clients[c].write_per_mille);
        let op = self.history.len();
        let value = write.then(|| {
            self.clients[c].writes += 1;
            format!("{c}.{}", self.clients[c].writes).into_bytes()
        });
        self.history.push(HistOp {
            client: c as u64,
            key: key.clone(),
            write: value.clone(),
            read: None,
            invoke: self.now,
            complete: self.now,
            fate: Fate::Pending,
        });
        self.clients[c].next_at = self.now + self.rng.range(1, 3 * TICK);
        let Some(node) = self.nodes[t].node.as_mut() else {
            // Connection refused: nothing happened.
            self.finish(op, Fate::Failed, None);
            self.clients[c].target = 0;
            return;
        };
        match value {
            None => {
                if node.can_read() {
                    let v = self.nodes[t].sm.get(&key).cloned();
                    self.finish(op, Fate::Ok, v);
                } else {
                    let leader = node.leader().filter(|&l| l != target).unwrap_or(0);
                    self.finish(op, Fate::Failed, None);
                    self.clients[c].target = leader;
                }
            }
            Some(v) => {
                let mut payload = key.clone();
                payload.push(b'=');
                payload.extend_from_slice(&v);
                let Some(mut node) = self.nodes[t].node.take() else {
                    return;
                };
                match node.propose_batch(&self.nodes[t].log, vec![payload.clone()]) {
                    Err(not) => {
                        self.nodes[t].node = Some(node);
                        self.finish(op, Fate::Failed, None);
                        self.clients[c].target = not.leader.unwrap_or(0);
                    }
                    Ok((index, fx)) => {
                        self.nodes[t].waiters.push(Waiter {
                            index,
                            payload,
                            op,
                            client: c,
                        });
                        self.clients[c].waiting = Some((op, self.now + CLIENT_TIMEOUT));
                        self.note(|| format!("client {c} writes at n{target} index {index}"));
                        self.execute(t, &mut node, fx);
                        self.nodes[t].node = Some(node);
                    }
                }
            }
        }
    }

    fn resolve(&mut self, w: Waiter, fate: Fate) {
        if self.clients[w.client]
            .waiting
            .is_some_and(|(op, _)| op == w.op)
        {
            self.clients[w.client].waiting = None;
            self.clients[w.client].next_at = self.now + self.rng.range(1, 3 * TICK);
            if fate != Fate::Ok {
                self.clients[w.client].target = 0;
            }
            self.finish(w.op, fate, None);
        }
    }

    fn finish(&mut self, op: usize, fate: Fate, read: Option<Vec<u8>>) {
        let h = &mut self.history[op];
        if h.fate != Fate::Pending {
            return;
        }
        h.fate = fate;
        h.complete = self.now;
        h.read = read;
    }

    // ------------------------------------------------------------------------------
    // End-of-run and periodic checks

    /// Every node's state machine is the replay of the committed log up to its applied
    /// index.
    fn check_state_machines(&mut self) {
        if self.replication == Replication::Async {
            return;
        }
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            if n.node.is_none() {
                continue;
            }
            let mut replay: BTreeMap<&[u8], &[u8]> = BTreeMap::new();
            let mut missing = None;
            for at in 1..=n.applied {
                match self.committed.get(at as usize - 1) {
                    Some(Some((_, p))) => {
                        if let Some((k, v)) = key_value(p) {
                            replay.insert(k, v);
                        }
                    }
                    _ => {
                        missing = Some(at);
                        break;
                    }
                }
            }
            let same = missing.is_none()
                && replay.len() == n.sm.len()
                && n.sm
                    .iter()
                    .all(|(k, v)| replay.get(k.as_slice()) == Some(&v.as_slice()));
            if !same {
                let (id, applied) = (n.id, n.applied);
                let why = match missing {
                    Some(at) => format!("n{id} applied index {at}, which was never committed"),
                    None => format!(
                        "n{id}'s state differs from the replay of the committed log through {applied}"
                    ),
                };
                self.violate(why);
                return;
            }
        }
    }

    fn check_history(&mut self) {
        let ops: Vec<lin::Op> = self
            .history
            .iter()
            .filter(|h| h.fate != Fate::Pending)
            .map(|h| lin::Op {
                client: h.client,
                key: h.key.clone(),
                input: match &h.write {
                    Some(v) => lin::Input::Write(v.clone()),
                    None => lin::Input::Read,
                },
                output: match h.fate {
                    Fate::Ok => lin::Outcome::Ok(match &h.write {
                        Some(_) => lin::Output::Done,
                        None => lin::Output::Value(h.read.clone()),
                    }),
                    Fate::Failed => lin::Outcome::Failed,
                    _ => lin::Outcome::Unknown,
                },
                invoke: h.invoke,
                complete: match h.fate {
                    Fate::Unknown => None,
                    _ => Some(h.complete),
                },
            })
            .collect();
        if let Some(&i) = lin::reads_never_written(&ops).first() {
            let what = lin::describe_op(&ops, i);
            self.violate(format!("a read returned a value never written: {what}"));
            return;
        }
        let report = lin::check(&ops);
        if !report.linearizable {
            self.violate(format!("client history: {report}"));
        }
    }
}

/// Runs `seed` (traced when `trace`) for its drawn number of steps.
pub fn run_seed(seed: u64, bug: Option<Bug>, trace: bool) -> Outcome {
    let steps = Rng::new(seed.wrapping_mul(31).wrapping_add(7)).range(1500, 3500);
    let sim = Sim::new(seed, bug);
    let sim = if trace { sim.traced() } else { sim };
    sim.run(steps)
}

/// A violation as a user reads it: seed, step, what, and the last events.
pub fn report(seed: u64, bug: Option<Bug>, out: &Outcome) -> String {
    let mut s = String::new();
    if let Some((step, what)) = &out.violation {
        let _ = writeln!(
            s,
            "seed {seed} (bug planted: {bug:?}) violated an invariant at step {step}: {what}"
        );
        let _ = writeln!(
            s,
            "replay it: SIM_SEED={seed} cargo test --release --test simulation replay -- --nocapture"
        );
        let _ = writeln!(s, "last events (time, event):");
        for line in &out.trace {
            let _ = writeln!(s, "  {line}");
        }
    }
    s
}
