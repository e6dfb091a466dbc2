//! A linearizability checker for histories of Redis-style string operations, for tests.
//!
//! # What it owns
//!
//! Only the *judgement* of a history: it never talks to a server and keeps no state
//! between calls. A consumer (the deterministic cluster simulator, a Jepsen-style run
//! against real processes) records every operation its clients issued as an [`Op`]
//! (which client, which key, what it asked, what it was told, when it asked, when it was
//! told) and hands the whole slice to [`check`] / [`check_with`]. What leaves is a
//! [`Report`]: one [`KeyReport`] per key with a [`KeyResult`], and for a key that is not
//! linearizable a [`Violation`] holding a short human-readable explanation plus the
//! history indices it talks about, so the consumer can print or replay them.
//!
//! Two cheap scans that need no search sit beside it: [`reads_never_written`] and
//! [`lost_writes`]. They find the two most common bugs (garbage reads, acknowledged writes
//! that vanished) directly, with exact, documented definitions, and they work even on
//! histories too large for the search.
//!
//! # Model
//!
//! Each key is an independent register holding `Option<Vec<u8>>` (`None` = the key does
//! not exist), initially `None`: **a history must start from an empty store**. Ops on
//! different keys never constrain each other (linearizability is compositional), so the
//! history is partitioned by key and each key is searched on its own.
//!
//! | [`Input`]                | Redis                    | [`Output`] when [`Outcome::Ok`] |
//! |--------------------------|--------------------------|----------------------------------|
//! | `Write(v)`               | `SET k v`                | `Done`                           |
//! | `Read`                   | `GET k`                  | `Value(Option<Vec<u8>>)`         |
//! | `Incr`                   | `INCR k`                 | `Int(new value)`                 |
//! | `Delete`                 | `DEL k`                  | `Done`                           |
//! | `Cas { expect, new }`    | WATCH/GET/MULTI/SET/EXEC | `Applied(bool)`                  |
//!
//! `INCR` follows Redis: a missing key counts as 0, the value must be a strict decimal
//! `i64` (Redis's `string2ll`: no `+`, no leading zeros, no `-0`, no spaces) and the
//! increment must not overflow. Values are compared as bytes, so `SET k 5` then `INCR k`
//! then `GET k` → `"6"` is linearizable. An `INCR` the server answered with an error
//! ("not an integer") must be recorded as [`Outcome::Failed`]: it did not happen.
//!
//! `Cas` → `Applied(false)` claims the value differed from `expect` at the op's
//! linearization point. A client whose `EXEC` was aborted by `WATCH` (someone else
//! touched the key) has *not* observed that, so it must record [`Outcome::Failed`]
//! (nothing was applied) rather than `Applied(false)`.
//!
//! # Outcomes and time
//!
//! Times are plain `u64` (simulated ticks or nanoseconds; only their order matters).
//! Real-time order is strict: A precedes B iff `A.complete < B.invoke`; ops whose
//! intervals merely touch (`A.complete == B.invoke`) are concurrent.
//!
//! - [`Outcome::Ok`]: the op took effect once, somewhere in `[invoke, complete]`, and its
//!   output must match the model.
//! - [`Outcome::Failed`]: the store promised the op was not applied; it is dropped.
//! - [`Outcome::Unknown`] (Jepsen's `:info`, e.g. a timeout): it may have taken effect at
//!   any moment after `invoke`, or never. Its completion is +infinity whatever `complete`
//!   says, and its output is unconstrained. An unknown `Read` constrains nothing and is
//!   dropped.
//!
//! # Algorithm
//!
//! Per key: Wing & Gong's search as improved by Lowe, with the memoization Porcupine
//! uses. The ops become a doubly linked list of call/return events sorted by time (calls
//! before returns at equal times, which is what makes touching intervals concurrent).
//! The search walks the list from the front: a call may be *linearized* (applied to the
//! model state and its events lifted out of the list) if the model accepts its output;
//! reaching a return event of an op not yet linearized means the current choices cannot
//! work, so it backtracks (an explicit stack, no recursion). A memo of configurations
//! already explored (set of linearized ops as a bitset, model state) prunes repeats,
//! which is what keeps realistic histories polynomial.
//!
//! Unknown ops never return, so they have a call event and no return event: each is a
//! candidate from its invocation on, and never forces a backtrack. Once every op with a
//! known outcome is placed, the unknown ops not placed are taken to have never happened;
//! that is the only point where an op may be skipped, as in Porcupine/Knossos. Two
//! things keep unknown ops from multiplying the work by 2^(their number):
//! - the memo treats a configuration as explored when the same known ops and state were
//!   reached with a *subset* of its unknown ops (fewer used is never worse);
//! - unknown blind writes (`Write`, `Delete`, `Cas`) whose value nothing could observe
//!   are dropped before the search (see `drop_unobserved_unknowns` for the exact rule
//!   and why it is sound). Typical of a Jepsen run: timed-out writes of unique values
//!   that no read saw. The rule is off for a key with any completed `Applied(false)` CAS.
//!
//! # Cost and limits
//!
//! The search is exponential in the worst case; in practice it is about
//! `ops × 2^(concurrency)`. Measured on simulated random histories (one key, release
//! build): 8 clients × 60 ops, 17k–34k steps; 12 clients × 100 ops, ~0.3M steps; 16
//! clients × 100 ops with every op overlapping ~15 others, 4–17M steps. Proving a
//! violation costs more than finding a linearization, and unknown ops that cannot be
//! dropped (observed values, counters, failing CAS) cost the most. Every key therefore has
//! a step budget ([`Options::step_budget`]); a key that runs out gets
//! [`KeyResult::Unknown`] instead of hanging the test. A step is one look at one event;
//! memory grows with the configurations memoized (about `ops / 8` bytes each).

// A test target uses some of this module, never all of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

/// What a client asked for. See the module docs for the Redis command of each.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// `SET key v`.
    Write(Vec<u8>),
    /// `GET key`.
    Read,
    /// `INCR key`.
    Incr,
    /// `DEL key`.
    Delete,
    /// Set `new` only if the current value equals `expect` (`None` = key missing).
    Cas {
        expect: Option<Vec<u8>>,
        new: Vec<u8>,
    },
}

/// What the store answered to a successful op. Must match the [`Input`]'s kind.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// `Write` and `Delete`: acknowledged.
    Done,
    /// `Read`: the value observed (`None` = key missing).
    Value(Option<Vec<u8>>),
    /// `Incr`: the value after the increment.
    Int(i64),
    /// `Cas`: whether `new` was stored.
    Applied(bool),
}

/// How an op ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Completed with this output.
    Ok(Output),
    /// Definitely not applied (an error reply the store guarantees had no effect).
    Failed,
    /// May or may not have taken effect, at any time after `invoke` (timeout, crash).
    Unknown,
}

/// One operation of a history.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Op {
    /// Who issued it; only used in explanations (a client's ops need not be sequential
    /// for the checker, real-time order comes from the times alone).
    pub client: u64,
    pub key: Vec<u8>,
    pub input: Input,
    pub output: Outcome,
    /// When the request was sent.
    pub invoke: u64,
    /// When the answer arrived; `None` when there was none. Must be `Some(t)` with
    /// `t >= invoke` for [`Outcome::Ok`]; ignored for `Unknown` (treated as +infinity)
    /// and `Failed`.
    pub complete: Option<u64>,
}

/// The value of each key at the end of a run (`None` = missing), for [`lost_writes`].
pub type FinalValues = HashMap<Vec<u8>, Option<Vec<u8>>>;

/// Knobs of [`check_with`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Search steps allowed per key before giving up with [`KeyResult::Unknown`]. A step
    /// is one look at one event; memory grows with the steps too (at most one memo entry
    /// of about `ops / 8` bytes per step).
    pub step_budget: u64,
}

impl Default for Options {
    /// 1,000,000 steps per key: about a second in a release build (a few in a debug
    /// one), and far more than a history of a few hundred ops per key with a handful of
    /// concurrent clients needs (hundreds to tens of thousands).
    fn default() -> Self {
        Options {
            step_budget: 1_000_000,
        }
    }
}

/// The verdict on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyResult {
    Linearizable,
    NotLinearizable(Violation),
    /// The search gave up (the string says why: the budget ran out).
    Unknown(String),
    /// The history of this key is malformed (an output that does not fit its input, an
    /// `Ok` op without completion time, a completion before the invocation); nothing was
    /// checked.
    Invalid(String),
}

/// Why a key is not linearizable. Indices are into the history given to [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The op that could not be placed: at the end of the longest linearization the
    /// search found, this op's return came before any way to linearize it.
    pub unplaced: usize,
    /// That longest linearization, in linearization order.
    pub prefix: Vec<usize>,
    /// Short, human-readable: the key, the unplaced op, the state the prefix leaves, the
    /// last ops of the prefix and the other ops that could have gone next but did not fit.
    pub explanation: String,
}

/// One key's result with some numbers for tuning the budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyReport {
    pub result: KeyResult,
    /// Ops searched (`Failed` ops and `Unknown` reads are not).
    pub ops: usize,
    /// Search steps used.
    pub steps: u64,
}

/// The verdict on a whole history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// True iff every key is [`KeyResult::Linearizable`]. A key left `Unknown` (budget)
    /// or `Invalid` makes it false without being a violation; see [`Report::violations`].
    pub linearizable: bool,
    pub keys: BTreeMap<Vec<u8>, KeyReport>,
}

impl Report {
    /// Keys proven not linearizable, with their violations.
    pub fn violations(&self) -> Vec<(&[u8], &Violation)> {
        self.keys
            .iter()
            .filter_map(|(k, r)| match &r.result {
                KeyResult::NotLinearizable(v) => Some((k.as_slice(), v)),
                _ => None,
            })
            .collect()
    }

    /// Keys whose search gave up or whose history was malformed.
    pub fn undecided(&self) -> Vec<(&[u8], &KeyResult)> {
        self.keys
            .iter()
            .filter(|(_, r)| matches!(r.result, KeyResult::Unknown(_) | KeyResult::Invalid(_)))
            .map(|(k, r)| (k.as_slice(), &r.result))
            .collect()
    }
}

impl fmt::Display for Report {
    /// One line per key that is not plainly linearizable (the explanation for a
    /// violation), or "linearizable (N keys)".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.linearizable {
            return write!(f, "linearizable ({} keys)", self.keys.len());
        }
        for (key, r) in &self.keys {
            match &r.result {
                KeyResult::Linearizable => {}
                KeyResult::NotLinearizable(v) => writeln!(f, "{}", v.explanation)?,
                KeyResult::Unknown(why) => writeln!(f, "key {}: unknown: {why}", show(key))?,
                KeyResult::Invalid(why) => writeln!(f, "key {}: invalid: {why}", show(key))?,
            }
        }
        Ok(())
    }
}

/// [`check_with`] with the default [`Options`].
pub fn check(history: &[Op]) -> Report {
    check_with(history, &Options::default())
}

/// Checks every key of `history` (see the module docs for the model and algorithm).
pub fn check_with(history: &[Op], options: &Options) -> Report {
    let mut by_key: BTreeMap<&[u8], Vec<usize>> = BTreeMap::new();
    for (i, op) in history.iter().enumerate() {
        by_key.entry(op.key.as_slice()).or_default().push(i);
    }
    let keys: BTreeMap<Vec<u8>, KeyReport> = by_key
        .into_iter()
        .map(|(key, idx)| (key.to_vec(), check_key(history, key, &idx, options)))
        .collect();
    let linearizable = keys.values().all(|r| r.result == KeyResult::Linearizable);
    Report { linearizable, keys }
}

/// Formats `history[i]` the way explanations do: `#i client c: SET "v" -> OK [10, 20]`.
pub fn describe_op(history: &[Op], i: usize) -> String {
    let op = &history[i];
    let input = match &op.input {
        Input::Write(v) => format!("SET {}", show(v)),
        Input::Read => "GET".to_string(),
        Input::Incr => "INCR".to_string(),
        Input::Delete => "DEL".to_string(),
        Input::Cas { expect, new } => format!("CAS {} -> {}", show_opt(expect), show(new)),
    };
    let output = match &op.output {
        Outcome::Ok(Output::Done) => "OK".to_string(),
        Outcome::Ok(Output::Value(v)) => show_opt(v),
        Outcome::Ok(Output::Int(n)) => n.to_string(),
        Outcome::Ok(Output::Applied(b)) => format!("applied={b}"),
        Outcome::Failed => "failed".to_string(),
        Outcome::Unknown => "unknown".to_string(),
    };
    let end = match (&op.output, op.complete) {
        (Outcome::Unknown, _) | (_, None) => "inf".to_string(),
        (_, Some(t)) => t.to_string(),
    };
    format!(
        "#{i} client {}: {input} -> {output} [{}, {end}]",
        op.client, op.invoke
    )
}

/// Reads that returned a value nobody ever tried to write.
///
/// Reports the indices (ascending) of every `Read` with `Outcome::Ok(Value(Some(v)))`
/// such that no op on the same key, *whatever its outcome* (`Failed` and `Unknown`
/// count as tried), is `Write(v)` or `Cas { new: v, .. }`. Exempt: a `v` that is a
/// strict decimal integer when the key has at least one `Incr` op of any outcome (INCR
/// makes integers nobody wrote). Reads of a missing key (`None`) are never reported.
/// Any reported read is a violation of every consistency model, linearizability included.
pub fn reads_never_written(history: &[Op]) -> Vec<usize> {
    let mut tried: HashSet<(&[u8], &[u8])> = HashSet::new();
    let mut incremented: HashSet<&[u8]> = HashSet::new();
    for op in history {
        match &op.input {
            Input::Write(v) | Input::Cas { new: v, .. } => {
                tried.insert((&op.key, v));
            }
            Input::Incr => {
                incremented.insert(&op.key);
            }
            Input::Read | Input::Delete => {}
        }
    }
    history
        .iter()
        .enumerate()
        .filter(|(_, op)| match (&op.input, &op.output) {
            (Input::Read, Outcome::Ok(Output::Value(Some(v)))) => {
                let written = tried.contains(&(op.key.as_slice(), v.as_slice()));
                let incremented = parse_int(v).is_some() && incremented.contains(op.key.as_slice());
                !written && !incremented
            }
            _ => false,
        })
        .map(|(i, _)| i)
        .collect()
}

/// Acknowledged writes that should have survived but are gone.
///
/// Reports the indices (ascending) of every op `W` = `Write(v)` with `Outcome::Ok` on a
/// key `k` such that all of these hold:
/// 1. `final_values` has `k` (keys it lacks are not judged; `Some(None)` means "the key
///    was missing at the end") and its final value is not `Some(v)`;
/// 2. no `Read` with `Outcome::Ok` that could come after `W` (i.e. not completed before
///    `W` was invoked) returned `Some(v)`;
/// 3. nothing could have legitimately replaced `v`: no other op on `k` that could come
///    after `W` (not completed before `W` was invoked; `Unknown` ops never complete)
///    may have changed the value: a `Write`, `Delete` or `Incr` that is `Ok` or
///    `Unknown`, a `Cas` that is `Applied(true)` or `Unknown`. `Failed` ops and
///    `Applied(false)` CAS do not count. Unknown mutations count because they may have
///    taken effect after `W`, so `W` is then not *required* to survive.
///
/// With no concurrent or later mutation, `W` was the last write to `k`, so the final
/// value must be `v`: a reported write is a violation under any model that keeps
/// acknowledged writes (linearizable or not).
pub fn lost_writes(history: &[Op], final_values: &FinalValues) -> Vec<usize> {
    let could_follow = |w: &Op, other: &Op| -> bool {
        match (&other.output, other.complete) {
            (Outcome::Unknown, _) | (_, None) => true,
            (_, Some(c)) => c >= w.invoke,
        }
    };
    // Only ops on the write's own key can spoil it: group them once, so a history of
    // millions of ops on thousands of keys costs the sum of each key's ops squared, not
    // the whole history's.
    let mut by_key: HashMap<&[u8], Vec<usize>> = HashMap::new();
    for (i, op) in history.iter().enumerate() {
        by_key.entry(op.key.as_slice()).or_default().push(i);
    }
    let mut lost = Vec::new();
    for (i, w) in history.iter().enumerate() {
        let v = match (&w.input, &w.output) {
            (Input::Write(v), Outcome::Ok(_)) => v,
            _ => continue,
        };
        match final_values.get(&w.key) {
            None => continue,
            Some(Some(f)) if f == v => continue,
            Some(_) => {}
        }
        let spoiled = by_key[w.key.as_slice()].iter().any(|&j| {
            let o = &history[j];
            if j == i || !could_follow(w, o) {
                return false;
            }
            match (&o.input, &o.output) {
                (Input::Read, Outcome::Ok(Output::Value(Some(r)))) => r == v,
                (Input::Read, _) => false,
                (_, Outcome::Failed) => false,
                (Input::Cas { .. }, Outcome::Ok(Output::Applied(false))) => false,
                // Ok and Unknown mutations.
                _ => true,
            }
        });
        if !spoiled {
            lost.push(i);
        }
    }
    lost
}

// ---------------------------------------------------------------------------------------
// The search.

/// A model value, interned per key so the state is `Copy` and cheap to hash in the
/// cache. Strict integers are kept as numbers (their byte form is unique, so byte
/// equality is preserved) so that INCR can work on them without a table lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Val {
    Missing,
    Int(i64),
    Bytes(u32),
}

#[derive(Default)]
struct Interner {
    ids: HashMap<Vec<u8>, u32>,
    bytes: Vec<Vec<u8>>,
}

impl Interner {
    fn val(&mut self, v: &Option<Vec<u8>>) -> Val {
        match v {
            None => Val::Missing,
            Some(b) => self.bytes_val(b),
        }
    }

    fn bytes_val(&mut self, b: &[u8]) -> Val {
        if let Some(n) = parse_int(b) {
            return Val::Int(n);
        }
        if let Some(&id) = self.ids.get(b) {
            return Val::Bytes(id);
        }
        let id = self.bytes.len() as u32;
        self.ids.insert(b.to_vec(), id);
        self.bytes.push(b.to_vec());
        Val::Bytes(id)
    }

    fn show(&self, v: Val) -> String {
        match v {
            Val::Missing => "(missing)".to_string(),
            Val::Int(n) => format!("\"{n}\""),
            Val::Bytes(id) => show(&self.bytes[id as usize]),
        }
    }
}

/// One op of a key, compiled against the model. `None` outputs are unknown outcomes.
#[derive(Clone, Copy, Debug)]
enum Step {
    Write(Val),
    Read(Val),
    Incr(Option<i64>),
    Delete,
    Cas {
        expect: Val,
        new: Val,
        applied: Option<bool>,
    },
}

/// The model's transition: the state after `step`, or `None` if `step` (with its
/// recorded output) cannot happen in `state`.
fn apply(state: Val, step: Step) -> Option<Val> {
    match step {
        Step::Write(v) => Some(v),
        Step::Delete => Some(Val::Missing),
        Step::Read(v) => (state == v).then_some(state),
        Step::Incr(out) => {
            let current = match state {
                Val::Missing => 0,
                Val::Int(n) => n,
                // Redis answers an error: a completed INCR here was recorded wrongly
                // (should be Failed), an unknown one did not happen.
                Val::Bytes(_) => return None,
            };
            let next = current.checked_add(1)?;
            match out {
                Some(o) if o != next => None,
                _ => Some(Val::Int(next)),
            }
        }
        Step::Cas {
            expect,
            new,
            applied,
        } => {
            let matches = state == expect;
            match applied {
                Some(true) => matches.then_some(new),
                Some(false) => (!matches).then_some(state),
                // Unconstrained: it did whatever the state made it do.
                None => Some(if matches { new } else { state }),
            }
        }
    }
}

/// Compiles `history[i]`: `Ok(None)` when it is dropped (Failed, unknown read),
/// `Err` when malformed.
fn compile(history: &[Op], i: usize, interner: &mut Interner) -> Result<Option<Step>, String> {
    let op = &history[i];
    let out = match &op.output {
        Outcome::Failed => return Ok(None),
        Outcome::Unknown => None,
        Outcome::Ok(out) => {
            match op.complete {
                None => {
                    return Err(format!(
                        "{}: Ok without a completion time",
                        describe_op(history, i)
                    ));
                }
                Some(c) if c < op.invoke => {
                    return Err(format!(
                        "{}: completes before it is invoked",
                        describe_op(history, i)
                    ));
                }
                Some(_) => {}
            }
            Some(out)
        }
    };
    let mismatch = || {
        Err(format!(
            "{}: output does not fit the input",
            describe_op(history, i)
        ))
    };
    let step = match (&op.input, out) {
        (Input::Write(v), None | Some(Output::Done)) => Step::Write(interner.bytes_val(v)),
        (Input::Delete, None | Some(Output::Done)) => Step::Delete,
        (Input::Read, None) => return Ok(None),
        (Input::Read, Some(Output::Value(v))) => Step::Read(interner.val(v)),
        (Input::Incr, None) => Step::Incr(None),
        (Input::Incr, Some(Output::Int(n))) => Step::Incr(Some(*n)),
        (Input::Cas { expect, new }, None | Some(Output::Applied(_))) => Step::Cas {
            expect: interner.val(expect),
            new: interner.bytes_val(new),
            applied: match out {
                Some(Output::Applied(b)) => Some(*b),
                _ => None,
            },
        },
        _ => return mismatch(),
    };
    Ok(Some(step))
}

/// An op as the search sees it.
struct KOp {
    /// Index into the caller's history.
    index: usize,
    step: Step,
    unknown: bool,
}

/// One event of the doubly linked list the search walks.
#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    time: u64,
    /// For a call: the list slot of its return (`NIL` for an unknown op).
    ret: usize,
}

const NIL: usize = usize::MAX;

/// The event list: slot 0 is a head sentinel, events live in slots `1..`. Lifting an
/// op unlinks its call and return; unlifting relinks them (in the reverse order, the
/// dancing-links trick), which is all backtracking needs.
struct EventList {
    events: Vec<Event>,
    next: Vec<usize>,
    prev: Vec<usize>,
}

impl EventList {
    /// The call events of all ops and the return events of the ops with a known outcome
    /// (an unknown op never returns), sorted by time, calls before returns at equal times
    /// (touching intervals are concurrent).
    fn new(ops: &[KOp], history: &[Op]) -> EventList {
        let mut raw: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
        for (k, op) in ops.iter().enumerate() {
            let h = &history[op.index];
            raw.push((h.invoke, false, k));
            if !op.unknown {
                raw.push((h.complete.expect("validated"), true, k));
            }
        }
        // (time, is_return, op): returns sort after calls at the same time.
        raw.sort_unstable();
        let mut events = vec![Event {
            op: NIL,
            is_call: false,
            time: 0,
            ret: NIL,
        }];
        let mut ret_slot = vec![NIL; ops.len()];
        for &(time, is_return, k) in &raw {
            if is_return {
                ret_slot[k] = events.len();
            }
            events.push(Event {
                op: k,
                is_call: !is_return,
                time,
                ret: NIL,
            });
        }
        for e in events.iter_mut().skip(1) {
            if e.is_call {
                e.ret = ret_slot[e.op];
            }
        }
        let n = events.len();
        let next = (0..n)
            .map(|i| if i + 1 < n { i + 1 } else { NIL })
            .collect();
        let prev = (0..n).map(|i| if i == 0 { NIL } else { i - 1 }).collect();
        EventList { events, next, prev }
    }

    fn unlink(&mut self, s: usize) {
        let (p, n) = (self.prev[s], self.next[s]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, s: usize) {
        let (p, n) = (self.prev[s], self.next[s]);
        self.next[p] = s;
        if n != NIL {
            self.prev[n] = s;
        }
    }

    fn lift(&mut self, call: usize) {
        self.unlink(call);
        if self.events[call].ret != NIL {
            self.unlink(self.events[call].ret);
        }
    }

    fn unlift(&mut self, call: usize) {
        if self.events[call].ret != NIL {
            self.relink(self.events[call].ret);
        }
        self.relink(call);
    }
}

fn is_subset(a: &[u64], b: &[u64]) -> bool {
    a.iter().zip(b).all(|(x, y)| x & !y == 0)
}

/// The ops linearized so far: known ops by op number, unknown ops by their rank among
/// the unknown ones (the two halves of a memo entry), plus a Zobrist hash of the known
/// set so a memo lookup needs no allocation.
struct Linearized {
    known: Vec<u64>,
    used: Vec<u64>,
    hash: u64,
    /// Rank of each unknown op, `NIL` for known ops.
    rank: Vec<usize>,
}

impl Linearized {
    fn new(ops: &[KOp]) -> Linearized {
        let mut rank = vec![NIL; ops.len()];
        let mut unknowns = 0;
        for (k, op) in ops.iter().enumerate() {
            if op.unknown {
                rank[k] = unknowns;
                unknowns += 1;
            }
        }
        Linearized {
            known: vec![0; ops.len().div_ceil(64)],
            used: vec![0; unknowns.div_ceil(64)],
            hash: 0,
            rank,
        }
    }

    /// Adds op `k` if absent, removes it if present.
    fn flip(&mut self, k: usize) {
        let (bits, i) = match self.rank[k] {
            NIL => {
                self.hash ^= zobrist(k);
                (&mut self.known, k)
            }
            r => (&mut self.used, r),
        };
        bits[i / 64] ^= 1 << (i % 64);
    }

    fn has(&self, k: usize) -> bool {
        let (bits, i) = match self.rank[k] {
            NIL => (&self.known, k),
            r => (&self.used, r),
        };
        bits[i / 64] & (1 << (i % 64)) != 0
    }
}

/// SplitMix64 of the op number: a fixed random-looking 64-bit tag per op.
fn zobrist(k: usize) -> u64 {
    let mut z = (k as u64)
        .wrapping_add(1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The memo of configurations already explored (all of which failed, or the search
/// would have stopped). A configuration is (known ops linearized, state, unknown ops
/// used). Having used *fewer* unknown ops is never worse (an unused unknown op may still
/// be used or skipped), so a configuration is pruned when one with the same known set and
/// state and a subset of its unknown ops was seen: with no unknown ops this is exactly
/// Porcupine's cache; with them it keeps the search from exploring configurations that
/// differ only by extra unknown ops.
#[derive(Default)]
struct Memo {
    /// (hash of the known set, state) -> the known sets with that hash.
    seen: HashMap<(u64, Val), Vec<MemoEntry>>,
}

struct MemoEntry {
    known: Box<[u64]>,
    /// The minimal sets of unknown ops used seen with `known` (no one a subset of another).
    useds: Vec<Box<[u64]>>,
}

impl Memo {
    /// Records the configuration; false if it (or a better one) was seen already.
    fn visit(&mut self, lin: &Linearized, state: Val) -> bool {
        let bucket = self.seen.entry((lin.hash, state)).or_default();
        let Some(MemoEntry { useds, .. }) = bucket.iter_mut().find(|e| *e.known == *lin.known)
        else {
            bucket.push(MemoEntry {
                known: lin.known.clone().into(),
                useds: vec![lin.used.clone().into()],
            });
            return true;
        };
        if useds.iter().any(|u| is_subset(u, &lin.used)) {
            return false;
        }
        useds.retain(|u| !is_subset(&lin.used, u));
        useds.push(lin.used.clone().into());
        true
    }
}

/// Removes the unknown blind writes nothing could have observed: an unknown `Write(v)`,
/// `Delete` (v = missing) or `Cas { new: v }` such that no completed read returned `v`,
/// no CAS (any outcome) expects `v`, `v` is not something INCR could build on (an
/// integer or missing) while the key has an INCR, and the key has no completed
/// `Applied(false)` CAS.
///
/// Why this is sound: take any linearization that places such an op `U`, and delete `U`
/// and the unknown no-ops between it and the next op that changes the value (`M`). Only
/// the ops between `U` and `M` now see the value before `U` instead of `v`: none of them
/// is a read (it would have returned `v`), a failing CAS (none exist) or a CAS/INCR that
/// needs `v`; and `M` itself is a blind write or a CAS/INCR that would need `v`, which
/// the conditions exclude. So a linearization without `U` exists whenever one with it
/// does, and dropping `U` loses nothing. It matters for speed: every unknown op stays a
/// candidate for the rest of the history, and proving a violation means trying them all.
fn drop_unobserved_unknowns(ops: &mut Vec<KOp>) {
    let mut observed: HashSet<Val> = HashSet::new();
    let mut has_incr = false;
    let mut has_failing_cas = false;
    for op in ops.iter() {
        match op.step {
            Step::Read(v) => {
                observed.insert(v);
            }
            Step::Cas {
                expect, applied, ..
            } => {
                observed.insert(expect);
                has_failing_cas |= applied == Some(false);
            }
            Step::Incr(_) => has_incr = true,
            Step::Write(_) | Step::Delete => {}
        }
    }
    if has_failing_cas {
        return;
    }
    let invisible = |v: Val| {
        let incr_builds_on_it = has_incr && matches!(v, Val::Int(_) | Val::Missing);
        !observed.contains(&v) && !incr_builds_on_it
    };
    ops.retain(|op| {
        !op.unknown
            || match op.step {
                Step::Write(v) | Step::Cas { new: v, .. } => !invisible(v),
                Step::Delete => !invisible(Val::Missing),
                Step::Read(_) | Step::Incr(_) => true,
            }
    });
}

fn check_key(history: &[Op], key: &[u8], indices: &[usize], options: &Options) -> KeyReport {
    let mut interner = Interner::default();
    let mut ops = Vec::new();
    for &i in indices {
        match compile(history, i, &mut interner) {
            Err(why) => {
                return KeyReport {
                    result: KeyResult::Invalid(why),
                    ops: 0,
                    steps: 0,
                };
            }
            Ok(None) => {}
            Ok(Some(step)) => ops.push(KOp {
                index: i,
                step,
                unknown: history[i].output == Outcome::Unknown,
            }),
        }
    }
    drop_unobserved_unknowns(&mut ops);
    let n = ops.len();
    let mut list = EventList::new(&ops, history);
    let mut lin = Linearized::new(&ops);
    let mut known_left = ops.iter().filter(|op| !op.unknown).count();
    let mut memo = Memo::default();
    // (call slot, state before it) of every op linearized so far, in order.
    let mut stack: Vec<(usize, Val)> = Vec::new();
    let mut state = Val::Missing;
    let mut steps = 0u64;
    // For the explanation: the longest linearization seen, the state it leaves, and the
    // first op whose return blocked it.
    let mut best: Vec<usize> = Vec::new();
    let mut best_state = Val::Missing;
    let mut stuck: Option<usize> = None;

    let mut slot = list.next[0];
    let result = loop {
        if known_left == 0 {
            // Every op with a known outcome is placed; the unknown ones not placed never
            // happened (the only point where an op may be skipped).
            break KeyResult::Linearizable;
        }
        if steps >= options.step_budget {
            break KeyResult::Unknown(format!(
                "step budget of {} exhausted after placing at most {} of {} ops",
                options.step_budget,
                best.len(),
                n
            ));
        }
        steps += 1;
        // Known ops are left, so their returns are in the list: the walk meets one
        // before the end.
        let ev = list.events[slot];
        if ev.is_call {
            let k = ev.op;
            if let Some(new_state) = apply(state, ops[k].step) {
                lin.flip(k);
                if memo.visit(&lin, new_state) {
                    stack.push((slot, state));
                    state = new_state;
                    list.lift(slot);
                    if !ops[k].unknown {
                        known_left -= 1;
                    }
                    if stack.len() > best.len() {
                        best = stack.iter().map(|&(s, _)| list.events[s].op).collect();
                        best_state = state;
                        stuck = None;
                    }
                    slot = list.next[0];
                    continue;
                }
                lin.flip(k);
            }
            slot = list.next[slot];
        } else {
            // A return of an op not linearized: nothing placed next can precede it.
            if stack.len() == best.len() && stuck.is_none() {
                stuck = Some(ev.op);
            }
            let Some((call, before)) = stack.pop() else {
                break not_linearizable(
                    history, key, &ops, &list, &best, best_state, stuck, &interner,
                );
            };
            let k = list.events[call].op;
            debug_assert!(lin.has(k));
            lin.flip(k);
            if !ops[k].unknown {
                known_left += 1;
            }
            state = before;
            list.unlift(call);
            slot = list.next[call];
        }
    };
    KeyReport {
        result,
        ops: n,
        steps,
    }
}

/// Builds the violation for a key whose search failed.
#[allow(clippy::too_many_arguments)]
fn not_linearizable(
    history: &[Op],
    key: &[u8],
    ops: &[KOp],
    list: &EventList,
    best: &[usize],
    best_state: Val,
    stuck: Option<usize>,
    interner: &Interner,
) -> KeyResult {
    // The walk at the deepest prefix always ends at a return, so `stuck` is set; the
    // fallback (the earliest return) only guards against a broken invariant.
    let stuck = stuck.unwrap_or_else(|| {
        list.events
            .iter()
            .skip(1)
            .find(|e| !e.is_call)
            .map_or(0, |e| e.op)
    });
    let placed: HashSet<usize> = best.iter().copied().collect();
    // Other candidates at that point: ops not placed whose call precedes the stuck op's
    // return in time order (they could have gone next and did not fit either).
    let stuck_ret = list
        .events
        .iter()
        .position(|e| !e.is_call && e.op == stuck)
        .expect("every op has a return");
    let mut candidates = Vec::new();
    for e in &list.events[1..stuck_ret] {
        if e.is_call && e.op != stuck && !placed.contains(&e.op) {
            candidates.push(ops[e.op].index);
        }
    }
    const SHOWN: usize = 6;
    let mut text = format!(
        "key {}: not linearizable: {} cannot be placed; the longest linearization found places {} of {} ops and leaves the value {}",
        show(key),
        describe_op(history, ops[stuck].index),
        best.len(),
        ops.len(),
        interner.show(best_state),
    );
    if !best.is_empty() {
        let from = best.len().saturating_sub(SHOWN);
        text.push_str(if from > 0 {
            "; it ends with: "
        } else {
            "; it is: "
        });
        let last: Vec<String> = best[from..]
            .iter()
            .map(|&k| describe_op(history, ops[k].index))
            .collect();
        text.push_str(&last.join(", "));
    }
    if !candidates.is_empty() {
        text.push_str("; concurrent ops that did not fit next either: ");
        let shown: Vec<String> = candidates
            .iter()
            .take(SHOWN)
            .map(|&i| describe_op(history, i))
            .collect();
        text.push_str(&shown.join(", "));
        if candidates.len() > SHOWN {
            text.push_str(&format!(" and {} more", candidates.len() - SHOWN));
        }
    }
    KeyResult::NotLinearizable(Violation {
        unplaced: ops[stuck].index,
        prefix: best.iter().map(|&k| ops[k].index).collect(),
        explanation: text,
    })
}

// ---------------------------------------------------------------------------------------
// Small helpers.

/// Redis's `string2ll`: a strict decimal `i64`. No sign but `-`, no leading zeros, no
/// `-0`, no spaces, no overflow.
fn parse_int(s: &[u8]) -> Option<i64> {
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, s),
    };
    if !matches!(digits.first(), Some(b'1'..=b'9')) || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 19 digits fit; let the parse catch overflow of those.
    if digits.len() > 19 {
        return None;
    }
    let magnitude: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    if negative {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    }
}

fn show(b: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(b))
}

fn show_opt(v: &Option<Vec<u8>>) -> String {
    match v {
        None => "(missing)".to_string(),
        Some(b) => show(b),
    }
}
