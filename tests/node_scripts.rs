//! Golden-script tests of the cluster node (election and replication), as toydb tests its
//! Raft node: each script in `tests/scripts/node/` is a scenario (`cluster nodes=3`,
//! `tick`, `deliver`, `partition 1`, `crash 3`, `propose 3 foo`, `status`, …) followed by
//! the exact message trace and node states it must produce. Regenerate the expected
//! output after a deliberate change with `UPDATE_GOLDENFILES=1 cargo test --test
//! node_scripts`, and read the diff: it is the protocol's behaviour.
//!
//! The harness is a whole cluster in one thread: N [`Node`]s with [`MemLog`]s and one
//! FIFO inbox per node. It carries out every effect in order, as a driver must, and then
//! (unless the node is `stall`ed) syncs the log and calls `persisted()`. After every
//! command it checks the invariants: at most one leader per epoch, committed entries
//! never change (quorum and all modes), epochs never go back in saved meta, a node's
//! commit index never passes its durable log.
//!
//! Commands:
//! - `cluster nodes=N [heartbeat=T] [failure=T] [lease=T] [election=T]
//!   [replication=quorum|all|async]`: nodes 1..=N.
//! - `tick [IDS…] [n=K]`: ticks the nodes (all live ones by default) K times, round-robin.
//! - `run [IDS…] [n=K]`: K times: tick the nodes, then deliver until no message is left
//!   (a network that delivers within a tick).
//! - `deliver [IDS…] [from=ID]`: steps the messages queued for the nodes (one round).
//! - `stabilize [IDS…]`: delivers until no message is left.
//! - `drop [IDS…] [from=ID]`: loses the messages queued for the nodes.
//! - `reorder IDS…`, `duplicate IDS…`: reverses, or doubles, the messages queued for the
//!   nodes.
//! - `partition IDS…`: cuts the listed nodes off from the others (both ways); `heal`.
//! - `crash IDS…` (loses what was not synced), `restart IDS…` (with a working disk).
//! - `nosync IDS…`: their drivers report appends durable without syncing (`--fsync
//!   no`): a crash loses entries they acknowledged.
//! - `stall IDS…`: their logs stop syncing (appends stay volatile); `sync IDS…` syncs them
//!   and resumes.
//! - `propose ID VALUE`, `status [IDS…]`, `log [IDS…]`.
//! - `compact ID INDEX`: the node's log snapshots through INDEX (committed). A
//!   `SendSnapshot`/`FetchSnapshot` effect copies the snapshot between logs and then calls
//!   `snapshot_installed()` on the receiving node.

use kvstore::log::{LogEntry, LogStore, MemLog};
use kvstore::message::Message;
use kvstore::node::{Effect, Node, NodeConfig, Replication, Role};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::error::Error;
use std::fmt::Write as _;

type Res<T = ()> = Result<T, Box<dyn Error>>;

#[derive(goldenscript::Command)]
enum Command {
    Cluster {
        #[arg(key)]
        nodes: u64,
        #[arg(key)]
        heartbeat: Option<u64>,
        #[arg(key)]
        failure: Option<u64>,
        #[arg(key)]
        lease: Option<u64>,
        #[arg(key)]
        election: Option<u64>,
        #[arg(key)]
        replication: Option<String>,
    },
    Tick {
        #[arg(key)]
        n: Option<u64>,
        #[arg(optional)]
        ids: Vec<u64>,
    },
    Run {
        #[arg(key)]
        n: Option<u64>,
        #[arg(optional)]
        ids: Vec<u64>,
    },
    Deliver {
        #[arg(key)]
        from: Option<u64>,
        #[arg(optional)]
        ids: Vec<u64>,
    },
    Stabilize(#[arg(optional)] Vec<u64>),
    Drop {
        #[arg(key)]
        from: Option<u64>,
        #[arg(optional)]
        ids: Vec<u64>,
    },
    Reorder(Vec<u64>),
    Duplicate(Vec<u64>),
    Partition(Vec<u64>),
    Heal,
    Crash(Vec<u64>),
    Restart(Vec<u64>),
    Stall(Vec<u64>),
    Nosync(Vec<u64>),
    Sync(Vec<u64>),
    Propose(u64, String),
    Compact(u64, u64),
    Status(#[arg(optional)] Vec<u64>),
    Log(#[arg(optional)] Vec<u64>),
}

#[derive(Default)]
struct Runner {
    cfgs: BTreeMap<u64, NodeConfig>,
    /// `None`: crashed.
    nodes: BTreeMap<u64, Option<Node>>,
    logs: BTreeMap<u64, MemLog>,
    inbox: BTreeMap<u64, VecDeque<(u64, Message)>>,
    /// Directed links that drop everything.
    cut: BTreeSet<(u64, u64)>,
    stalled: BTreeSet<u64>,
    /// Nodes that report writes durable without syncing (`--fsync no`).
    nosync: BTreeSet<u64>,
    /// Invariants: the leader of each epoch; every committed entry; what each node has
    /// applied; the last epoch each node saved.
    leaders: BTreeMap<u64, u64>,
    committed: BTreeMap<u64, (u64, Vec<u8>)>,
    applied: BTreeMap<u64, u64>,
    saved_epoch: BTreeMap<u64, u64>,
    check_commits: bool,
    /// Snapshots copied into a node's log whose node must still be told.
    installed: Vec<(u64, u64)>,
}

impl goldenscript::Runner for Runner {
    type Command = Command;

    fn run(&mut self, command: &Command, _: &goldenscript::Context) -> Res<String> {
        self.exec(command)
    }
}

impl Runner {
    fn exec(&mut self, command: &Command) -> Res<String> {
        let mut out = String::new();
        match command {
            Command::Cluster {
                nodes,
                heartbeat,
                failure,
                lease,
                election,
                replication,
            } => {
                let replication = match replication.as_deref() {
                    None | Some("quorum") => Replication::Quorum,
                    Some("all") => Replication::All,
                    Some("async") => Replication::Async,
                    Some(other) => return Err(format!("unknown replication {other}").into()),
                };
                self.check_commits = replication != Replication::Async;
                for id in 1..=*nodes {
                    let peers = (1..=*nodes).filter(|&p| p != id).collect();
                    let mut cfg = NodeConfig::new(id, peers);
                    cfg.heartbeat_ticks = heartbeat.unwrap_or(2);
                    cfg.lease_ticks = lease.unwrap_or(4);
                    cfg.failure_ticks = failure.unwrap_or(6);
                    cfg.election_ticks = election.unwrap_or(2);
                    cfg.replication = replication;
                    cfg.validate()?;
                    let log = MemLog::new();
                    self.nodes.insert(id, Some(Node::new(cfg.clone(), &log)));
                    self.cfgs.insert(id, cfg);
                    self.logs.insert(id, log);
                    self.inbox.insert(id, VecDeque::new());
                    self.applied.insert(id, 0);
                }
                self.status(&self.all(), &mut out)?;
            }
            Command::Tick { n, ids } => {
                let ids = self.ids_or_live(ids)?;
                for _ in 0..n.unwrap_or(1) {
                    for &id in &ids {
                        self.call(id, &mut out, |node, log| Ok(node.tick(log)))?;
                    }
                }
            }
            Command::Run { n, ids } => {
                let ids = self.ids_or_live(ids)?;
                for _ in 0..n.unwrap_or(1) {
                    for &id in &ids {
                        if self.nodes[&id].is_some() {
                            self.call(id, &mut out, |node, log| Ok(node.tick(log)))?;
                        }
                    }
                    self.stabilize(&mut out)?;
                }
            }
            Command::Deliver { from, ids } => {
                let ids = self.ids_or_live(ids)?;
                self.deliver(&ids, *from, &mut out)?;
            }
            Command::Stabilize(ids) => {
                let ids = self.ids_or_live(ids)?;
                self.stabilize_ids(&ids, &mut out)?;
            }
            Command::Drop { from, ids } => {
                let ids = self.ids_or_live(ids)?;
                for id in ids {
                    let q = self.inbox.entry(id).or_default();
                    q.retain(|(f, _)| from.is_some_and(|from| *f != from));
                }
            }
            Command::Reorder(ids) => {
                self.validate(ids)?;
                for id in ids {
                    let q = self.inbox.entry(*id).or_default();
                    q.make_contiguous().reverse();
                }
            }
            Command::Duplicate(ids) => {
                self.validate(ids)?;
                for id in ids {
                    let q = self.inbox.entry(*id).or_default();
                    let copy: Vec<_> = q.iter().cloned().collect();
                    q.extend(copy);
                }
            }
            Command::Partition(ids) => {
                self.validate(ids)?;
                let side: BTreeSet<u64> = ids.iter().copied().collect();
                for &a in &self.all() {
                    for &b in &self.all() {
                        if side.contains(&a) != side.contains(&b) {
                            self.cut.insert((a, b));
                        }
                    }
                }
                let rest: Vec<String> = self
                    .all()
                    .into_iter()
                    .filter(|id| !side.contains(id))
                    .map(|id| format!("n{id}"))
                    .collect();
                let side: Vec<String> = side.iter().map(|id| format!("n{id}")).collect();
                writeln!(out, "{} ⇹ {}", side.join(" "), rest.join(" "))?;
            }
            Command::Heal => {
                self.cut.clear();
                writeln!(out, "fully connected")?;
            }
            Command::Crash(ids) => {
                self.validate(ids)?;
                for &id in ids {
                    self.nodes.insert(id, None);
                    self.logs.get_mut(&id).ok_or("no log")?.crash();
                    self.inbox.entry(id).or_default().clear();
                    let log = &self.logs[&id];
                    let (index, epoch) = log.last();
                    writeln!(out, "n{id} crashed: log kept through {index}@{epoch}")?;
                }
            }
            Command::Restart(ids) => {
                self.validate(ids)?;
                for &id in ids {
                    let log = &self.logs[&id];
                    let node = Node::new(self.cfgs[&id].clone(), log);
                    self.applied.insert(id, node.commit_index());
                    self.nodes.insert(id, Some(node));
                    self.inbox.entry(id).or_default().clear();
                    self.stalled.remove(&id);
                }
                self.status(ids, &mut out)?;
            }
            Command::Stall(ids) => {
                self.validate(ids)?;
                self.stalled.extend(ids);
            }
            Command::Nosync(ids) => {
                self.validate(ids)?;
                self.nosync.extend(ids);
            }
            Command::Sync(ids) => {
                self.validate(ids)?;
                for &id in ids {
                    self.stalled.remove(&id);
                    self.call(id, &mut out, |_, _| Ok(Vec::new()))?;
                }
            }
            Command::Propose(id, value) => {
                let payload = value.as_bytes().to_vec();
                let mut result = None;
                self.call(*id, &mut out, |node, log| {
                    match node.propose(log, payload) {
                        Ok((index, fx)) => {
                            result = Some(format!("proposed at {index}"));
                            Ok(fx)
                        }
                        Err(e) => {
                            result = Some(format!("refused: {e}"));
                            Ok(Vec::new())
                        }
                    }
                })?;
                writeln!(out, "n{id} propose {value}: {}", result.unwrap_or_default())?;
            }
            Command::Compact(id, index) => {
                let node = self.nodes[id].as_ref().ok_or("node is down")?;
                if *index > node.commit_index() {
                    return Err(format!("n{id} has not committed {index}").into());
                }
                let log = self.logs.get_mut(id).ok_or("no log")?;
                let epoch = log.epoch_at(*index)?.ok_or("no such entry")?;
                log.install_snapshot(*index, epoch, format!("state@{index}").as_bytes())?;
                writeln!(out, "n{id} compacted through {index}@{epoch}")?;
            }
            Command::Status(ids) => {
                let ids = self.ids_or_all(ids)?;
                self.status(&ids, &mut out)?;
            }
            Command::Log(ids) => {
                let ids = self.ids_or_all(ids)?;
                for id in ids {
                    let log = &self.logs[&id];
                    let entries: Vec<String> = log.entries().iter().map(fmt_entry).collect();
                    writeln!(
                        out,
                        "n{id} log durable={} [{}]",
                        log.durable_index(),
                        entries.join(", ")
                    )?;
                }
            }
        }
        self.check_invariants()?;
        Ok(out)
    }
}

fn fmt_entry(e: &LogEntry) -> String {
    if e.payload.is_empty() {
        format!("{}@{} noop", e.index, e.epoch)
    } else {
        format!(
            "{}@{} {}",
            e.index,
            e.epoch,
            String::from_utf8_lossy(&e.payload)
        )
    }
}

impl Runner {
    fn all(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    fn validate(&self, ids: &[u64]) -> Res {
        for id in ids {
            if !self.nodes.contains_key(id) {
                return Err(format!("unknown node {id}").into());
            }
        }
        Ok(())
    }

    fn ids_or_all(&self, ids: &[u64]) -> Res<Vec<u64>> {
        self.validate(ids)?;
        Ok(if ids.is_empty() {
            self.all()
        } else {
            ids.to_vec()
        })
    }

    fn ids_or_live(&self, ids: &[u64]) -> Res<Vec<u64>> {
        let ids = self.ids_or_all(ids)?;
        Ok(ids
            .into_iter()
            .filter(|id| self.nodes[id].is_some())
            .collect())
    }

    fn stabilize(&mut self, out: &mut String) -> Res {
        let ids = self.ids_or_live(&[])?;
        self.stabilize_ids(&ids, out)
    }

    /// Delivers until no message is left for `ids`.
    fn stabilize_ids(&mut self, ids: &[u64], out: &mut String) -> Res {
        let mut rounds = 0;
        while self.deliver(ids, None, out)? > 0 {
            rounds += 1;
            if rounds > 1000 {
                return Err("no stable state after 1000 rounds".into());
            }
        }
        Ok(())
    }

    /// One round: each node steps what was queued for it before the round began.
    fn deliver(&mut self, ids: &[u64], from: Option<u64>, out: &mut String) -> Res<usize> {
        let mut count = 0;
        for &id in ids {
            let queue = std::mem::take(self.inbox.entry(id).or_default());
            let (now, later): (Vec<_>, Vec<_>) = queue
                .into_iter()
                .partition(|(f, _)| from.is_none_or(|from| *f == from));
            self.inbox.insert(id, later.into_iter().collect());
            for (f, msg) in now {
                if self.nodes[&id].is_none() {
                    continue;
                }
                count += 1;
                self.call(id, out, |node, log| Ok(node.step(log, f, msg)))?;
            }
        }
        Ok(count)
    }

    /// Runs one call into node `id` and carries out its effects as a driver does.
    fn call(
        &mut self,
        id: u64,
        out: &mut String,
        f: impl FnOnce(&mut Node, &dyn LogStore) -> Res<Vec<Effect>>,
    ) -> Res {
        self.call_boxed(id, out, Box::new(f))
    }

    /// Not generic, so a call may recurse (snapshot installs) without monomorphizing
    /// forever.
    #[allow(clippy::type_complexity)]
    fn call_boxed(
        &mut self,
        id: u64,
        out: &mut String,
        f: Box<dyn FnOnce(&mut Node, &dyn LogStore) -> Res<Vec<Effect>> + '_>,
    ) -> Res {
        let Some(mut node) = self.nodes.get_mut(&id).and_then(Option::take) else {
            return Err(format!("n{id} is down").into());
        };
        let before = node.to_string();
        let result = f(&mut node, &self.logs[&id]);
        let result = result.and_then(|fx| {
            let after = node.to_string();
            if after != before {
                writeln!(out, "{before} ⇨ {after}")?;
            }
            self.apply(&mut node, fx, out)?;
            // The driver syncs at once (unless stalled) and reports it.
            while !self.stalled.contains(&id) {
                let log = self.logs.get_mut(&id).ok_or("no log")?;
                if log.durable_index() >= log.last().0 && node.status().durable >= log.last().0 {
                    break;
                }
                let durable = if self.nosync.contains(&id) {
                    log.last().0
                } else {
                    log.sync()?;
                    log.durable_index()
                };
                if node.status().durable >= durable {
                    break;
                }
                let fx = node.persisted(&self.logs[&id], durable);
                self.apply(&mut node, fx, out)?;
            }
            Ok(())
        });
        self.nodes.insert(id, Some(node));
        result?;
        // Tell the nodes whose logs got a snapshot (the driver's install finished).
        while let Some((to, index)) = self.installed.pop() {
            // The state machine is the snapshot now (after an async failover that can
            // be behind what this node had applied).
            self.applied.insert(to, index);
            self.call_boxed(
                to,
                out,
                Box::new(move |node, log| Ok(node.snapshot_installed(log, index))),
            )?;
        }
        Ok(())
    }

    /// Copies `from`'s snapshot into `to`'s log, as the drivers' snapshot transfer would.
    fn transfer_snapshot(&mut self, from: u64, to: u64, out: &mut String) -> Res {
        if self.cut.contains(&(from, to)) || self.nodes.get(&to).is_none_or(Option::is_none) {
            writeln!(out, "  (snapshot transfer n{from} → n{to} failed)")?;
            return Ok(());
        }
        let src = &self.logs[&from];
        let (index, epoch) = src.snapshot();
        let data = src.snapshot_data().to_vec();
        self.logs
            .get_mut(&to)
            .ok_or("no log")?
            .install_snapshot(index, epoch, &data)?;
        writeln!(out, "n{to} installed snapshot {index}@{epoch} from n{from}")?;
        self.installed.push((to, index));
        Ok(())
    }

    fn apply(&mut self, node: &mut Node, fx: Vec<Effect>, out: &mut String) -> Res {
        let id = node.id();
        let label = format!("n{id}@{}", node.epoch());
        for effect in fx {
            let log = self.logs.get_mut(&id).ok_or("no log")?;
            match effect {
                Effect::Send { to, msg } => {
                    let note = if self.cut.contains(&(id, to)) {
                        " ✂"
                    } else if self.nodes.get(&to).is_none_or(Option::is_none) {
                        " (down)"
                    } else {
                        self.inbox
                            .entry(to)
                            .or_default()
                            .push_back((id, msg.clone()));
                        ""
                    };
                    writeln!(out, "n{id}@{} → n{to} {msg}{note}", msg.epoch)?;
                }
                Effect::SaveMeta(meta) => {
                    let last = self.saved_epoch.get(&id).copied().unwrap_or(0);
                    if meta.epoch < last {
                        return Err(format!("n{id} saved epoch {} after {last}", meta.epoch).into());
                    }
                    self.saved_epoch.insert(id, meta.epoch);
                    log.save_meta(meta)?;
                    let voted = match meta.voted_for {
                        0 => "none".to_string(),
                        v => format!("n{v}"),
                    };
                    writeln!(
                        out,
                        "{label} save epoch={} voted={voted} commit={}",
                        meta.epoch, meta.commit_index
                    )?;
                }
                Effect::Append(entries) => {
                    log.append(&entries)?;
                    for e in &entries {
                        writeln!(out, "{label} append {}", fmt_entry(e))?;
                    }
                }
                Effect::Truncate { after } => {
                    log.truncate_after(after)?;
                    writeln!(out, "{label} truncate after {after}")?;
                }
                Effect::Commit(index) => {
                    writeln!(out, "{label} commit {index}")?;
                    self.record_commit(id, index)?;
                }
                Effect::BecomeLeader { epoch } => {
                    writeln!(out, "{label} become leader of epoch {epoch}")?;
                }
                Effect::StepDown { epoch, leader } => {
                    let leader = leader.map_or("none".to_string(), |l| format!("n{l}"));
                    writeln!(
                        out,
                        "{label} step down from epoch {epoch} (leader {leader})"
                    )?;
                }
                Effect::SendSnapshot { to } => {
                    writeln!(out, "{label} send snapshot to n{to}")?;
                    self.transfer_snapshot(id, to, out)?;
                }
                Effect::FetchSnapshot { from } => {
                    writeln!(out, "{label} fetch snapshot from n{from}")?;
                    let cut = self.cut.contains(&(id, from));
                    if cut || self.nodes.get(&from).is_none_or(Option::is_none) {
                        writeln!(out, "  (snapshot transfer n{from} → n{id} failed)")?;
                    } else {
                        let src = &self.logs[&from];
                        let (index, epoch) = src.snapshot();
                        let data = src.snapshot_data().to_vec();
                        self.logs
                            .get_mut(&id)
                            .ok_or("no log")?
                            .install_snapshot(index, epoch, &data)?;
                        writeln!(out, "n{id} installed snapshot {index}@{epoch} from n{from}")?;
                        self.installed.push((id, index));
                    }
                }
            }
        }
        Ok(())
    }

    /// Committed entries never change: every node that commits an index commits the
    /// same entry there.
    fn record_commit(&mut self, id: u64, index: u64) -> Res {
        let from = self.applied.get(&id).copied().unwrap_or(0) + 1;
        let log = &self.logs[&id];
        for i in from..=index {
            let Some(e) = log.read(i, 0)?.into_iter().next() else {
                return Err(format!("n{id} committed {i} which its log lacks").into());
            };
            if !self.check_commits {
                continue;
            }
            let seen = (e.epoch, e.payload.clone());
            match self.committed.get(&i) {
                Some(prev) if *prev != seen => {
                    return Err(format!(
                        "n{id} committed {} at {i}, but {}@{} was committed there",
                        fmt_entry(&e),
                        i,
                        prev.0
                    )
                    .into());
                }
                Some(_) => {}
                None => {
                    self.committed.insert(i, seen);
                }
            }
        }
        self.applied.insert(id, index.max(from - 1));
        Ok(())
    }

    fn check_invariants(&mut self) -> Res {
        for (&id, node) in &self.nodes {
            let Some(node) = node else { continue };
            if node.status().role == Role::Leader {
                match self.leaders.get(&node.epoch()) {
                    Some(&other) if other != id => {
                        return Err(format!(
                            "two leaders in epoch {}: n{other} and n{id}",
                            node.epoch()
                        )
                        .into());
                    }
                    _ => {
                        self.leaders.insert(node.epoch(), id);
                    }
                }
            }
            // What a node calls committed is durable in its own log (its meta may record
            // it, and recovery refuses a log that ends before that).
            let log = &self.logs[&id];
            if !self.nosync.contains(&id) && node.commit_index() > log.durable_index() {
                return Err(format!(
                    "n{id} committed {} but its log is durable only through {}",
                    node.commit_index(),
                    log.durable_index()
                )
                .into());
            }
            // A node's committed prefix stays what was committed.
            if self.check_commits {
                let log = &self.logs[&id];
                let start = log.snapshot().0 + 1;
                for i in start..=node.commit_index().min(log.last().0) {
                    let e = log.read(i, 0)?.into_iter().next().ok_or("missing entry")?;
                    if let Some(c) = self.committed.get(&i)
                        && *c != (e.epoch, e.payload.clone())
                    {
                        return Err(format!("n{id}'s committed entry {i} changed").into());
                    }
                }
            }
        }
        Ok(())
    }

    fn status(&self, ids: &[u64], out: &mut String) -> Res {
        for id in ids {
            let log = &self.logs[id];
            let (index, epoch) = log.last();
            let Some(node) = &self.nodes[id] else {
                writeln!(out, "n{id} down, log last={index}@{epoch}")?;
                continue;
            };
            let st = node.status();
            write!(
                out,
                "{node} last={index}@{epoch} commit={} durable={}",
                st.commit, st.durable
            )?;
            if st.role == Role::Leader {
                let m: Vec<String> = st
                    .followers
                    .iter()
                    .map(|(f, m)| format!("n{f}:{m}"))
                    .collect();
                let read = if node.can_read() { "yes" } else { "no" };
                write!(out, " serving={read} match={{{}}}", m.join(" "))?;
            }
            writeln!(out)?;
        }
        Ok(())
    }
}

macro_rules! scripts {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/node/", stringify!($name));
                goldenscript::run(&mut Runner::default(), path).expect("goldenscript failed");
            }
        )*
    };
}

scripts!(
    single_node,
    election_highest_wins,
    election_answer_waits,
    election_majority_required,
    stale_epoch_refused,
    leader_cut_off_loses_lease,
    partition_rejoin_no_depose,
    two_candidates_one_epoch,
    takeover_returning_higher_id,
    divergent_suffix_truncated,
    old_epoch_commits_with_noop,
    leader_pulls_missing_entries,
    snapshot_catch_up,
    snapshot_catch_up_after_heartbeats,
    replication_modes,
    replication_async,
    crash_all_keeps_committed,
    fsync_no_follower_lost_entries,
    async_failover_loses_writes,
);

/// Random schedules on five nodes (seeded, so a failure reproduces): ticks, deliveries,
/// lost messages, partitions, crashes that lose unsynced entries, stalled disks and
/// proposals. The harness checks the invariants after every step; at the end the
/// cluster is healed and must elect a leader whose log holds every committed entry.
#[test]
fn random_schedules_keep_the_invariants() {
    for seed in 1..=100u64 {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut rand = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut r = Runner::default();
        let run =
            |r: &mut Runner, c: Command| r.exec(&c).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        // Odd seeds run three nodes, even seeds five; one seed in four replicates to all,
        // one in four is async (its commits may be lost by design, so only the other
        // invariants and the final election are checked).
        let nodes = if seed % 2 == 1 { 3 } else { 5 };
        let cluster = Command::Cluster {
            nodes,
            heartbeat: None,
            failure: None,
            lease: None,
            election: None,
            replication: match seed % 4 {
                0 => Some("all".to_string()),
                3 => Some("async".to_string()),
                _ => None,
            },
        };
        run(&mut r, cluster);
        let mut proposals = 0;
        for _ in 0..1500 {
            let id = rand(nodes) + 1;
            let alive = r.nodes[&id].is_some();
            let cmd = match rand(100) {
                0..=29 => Command::Tick {
                    n: None,
                    ids: vec![],
                },
                30..=59 => Command::Deliver {
                    from: None,
                    ids: vec![],
                },
                60..=65 => Command::Deliver {
                    from: None,
                    ids: vec![id],
                },
                66 => Command::Reorder(vec![id]),
                67 => Command::Duplicate(vec![id]),
                68..=69 => Command::Drop {
                    from: Some(rand(nodes) + 1),
                    ids: vec![id],
                },
                70 => Command::Partition(vec![id, rand(nodes) + 1]),
                71..=73 => Command::Heal,
                74 if alive && r.nodes.values().filter(|n| n.is_none()).count() < 1 => {
                    Command::Crash(vec![id])
                }
                75..=78 if !alive => Command::Restart(vec![id]),
                79 if alive => Command::Stall(vec![id]),
                80..=82 if alive => Command::Sync(vec![id]),
                83..=99 if alive => {
                    proposals += 1;
                    Command::Propose(id, format!("v{proposals}"))
                }
                _ => continue,
            };
            run(&mut r, cmd);
        }
        // Heal everything and let the cluster settle.
        run(&mut r, Command::Heal);
        let down: Vec<u64> = r
            .nodes
            .iter()
            .filter(|(_, n)| n.is_none())
            .map(|(&id, _)| id)
            .collect();
        if !down.is_empty() {
            run(&mut r, Command::Restart(down));
        }
        let stalled: Vec<u64> = r.stalled.iter().copied().collect();
        if !stalled.is_empty() {
            run(&mut r, Command::Sync(stalled));
        }
        run(&mut r, Command::Stabilize(vec![]));
        run(
            &mut r,
            Command::Run {
                n: Some(60),
                ids: vec![],
            },
        );
        let leaders: Vec<&Node> = r
            .nodes
            .values()
            .flatten()
            .filter(|n| n.status().role == Role::Leader)
            .collect();
        assert_eq!(leaders.len(), 1, "seed {seed}: one leader after healing");
        let leader = leaders[0];
        assert!(leader.can_read(), "seed {seed}: the leader serves");
        let log = &r.logs[&leader.id()];
        for (&index, (epoch, payload)) in &r.committed {
            if index <= log.snapshot().0 {
                continue;
            }
            let e = log.read(index, 0).expect("read").into_iter().next();
            assert_eq!(
                e.map(|e| (e.epoch, e.payload)),
                Some((*epoch, payload.clone())),
                "seed {seed}: committed entry {index} is in the leader's log"
            );
        }
    }
}
