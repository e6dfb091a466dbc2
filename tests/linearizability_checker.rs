//! Tests of the linearizability checker (tests/linearizability) on hand-made histories
//! and on random histories produced by simulating a real register. No servers, no
//! sleeps, no timing: every history is data.

mod linearizability;

use linearizability::{
    FinalValues, Input, KeyResult, Op, Options, Outcome, Output, check, check_with, describe_op,
    lost_writes, reads_never_written,
};
use std::collections::HashMap;

// ---------------------------------------------------------------------------------------
// Builders: times are (invoke, complete); values are &str for readability.

fn op(client: u64, key: &str, input: Input, output: Output, t: (u64, u64)) -> Op {
    Op {
        client,
        key: key.as_bytes().to_vec(),
        input,
        output: Outcome::Ok(output),
        invoke: t.0,
        complete: Some(t.1),
    }
}

fn set(client: u64, key: &str, v: &str, t: (u64, u64)) -> Op {
    op(client, key, Input::Write(v.into()), Output::Done, t)
}

fn get(client: u64, key: &str, v: Option<&str>, t: (u64, u64)) -> Op {
    op(
        client,
        key,
        Input::Read,
        Output::Value(v.map(Into::into)),
        t,
    )
}

fn incr(client: u64, key: &str, n: i64, t: (u64, u64)) -> Op {
    op(client, key, Input::Incr, Output::Int(n), t)
}

fn del(client: u64, key: &str, t: (u64, u64)) -> Op {
    op(client, key, Input::Delete, Output::Done, t)
}

fn cas(
    client: u64,
    key: &str,
    expect: Option<&str>,
    new: &str,
    applied: bool,
    t: (u64, u64),
) -> Op {
    let input = Input::Cas {
        expect: expect.map(Into::into),
        new: new.into(),
    };
    op(client, key, input, Output::Applied(applied), t)
}

/// The same op, but the client never learnt its outcome.
fn unknown(mut op: Op) -> Op {
    op.output = Outcome::Unknown;
    op.complete = None;
    op
}

/// The same op, but the store answered an error that guarantees it was not applied.
fn failed(mut op: Op) -> Op {
    op.output = Outcome::Failed;
    op
}

#[track_caller]
fn assert_linearizable(history: &[Op]) {
    let report = check(history);
    assert!(report.linearizable, "expected linearizable:\n{report}");
}

/// Asserts that `history` is not linearizable, only on `key`, and returns the explanation.
#[track_caller]
fn assert_violation(history: &[Op], key: &str) -> String {
    let report = check(history);
    assert!(!report.linearizable, "expected a violation on {key:?}");
    let violations = report.violations();
    assert_eq!(violations.len(), 1, "{report}");
    assert_eq!(violations[0].0, key.as_bytes(), "{report}");
    assert!(report.undecided().is_empty(), "{report}");
    let explanation = violations[0].1.explanation.clone();
    assert!(
        explanation.contains(&format!("key {key:?}")),
        "{explanation}"
    );
    explanation
}

// ---------------------------------------------------------------------------------------
// Registers.

#[test]
fn empty_history_is_linearizable() {
    let report = check(&[]);
    assert!(report.linearizable);
    assert!(report.keys.is_empty());
}

#[test]
fn sequential_write_then_read() {
    assert_linearizable(&[
        get(1, "k", None, (0, 1)),
        set(1, "k", "a", (2, 3)),
        get(1, "k", Some("a"), (4, 5)),
        set(2, "k", "b", (6, 7)),
        get(1, "k", Some("b"), (8, 9)),
        del(2, "k", (10, 11)),
        get(1, "k", None, (12, 13)),
    ]);
    // Reading the deleted value after the DEL completed is not.
    let history = [
        set(1, "k", "a", (0, 1)),
        del(2, "k", (2, 3)),
        get(1, "k", Some("a"), (4, 5)),
    ];
    let why = assert_violation(&history, "k");
    assert!(why.contains(&describe_op(&history, 2)), "{why}");
}

#[test]
fn a_read_concurrent_with_a_write_sees_either_value() {
    for seen in [None, Some("a")] {
        assert_linearizable(&[set(1, "k", "a", (0, 10)), get(2, "k", seen, (2, 3))]);
    }
}

#[test]
fn concurrent_writes_reads_see_either_order() {
    let writes = || vec![set(1, "k", "a", (0, 10)), set(2, "k", "b", (1, 11))];
    for (first, second) in [("a", "b"), ("b", "a")] {
        // After both writes: any one winner, seen consistently.
        let mut h = writes();
        h.push(get(3, "k", Some(second), (12, 13)));
        h.push(get(4, "k", Some(second), (14, 15)));
        assert_linearizable(&h);
        // During the writes: first one value, then the other.
        let mut h = writes();
        h.push(get(3, "k", Some(first), (2, 3)));
        h.push(get(3, "k", Some(second), (4, 5)));
        assert_linearizable(&h);
        // But after both completed the value cannot flip back.
        let mut h = writes();
        h.push(get(3, "k", Some(first), (12, 13)));
        h.push(get(4, "k", Some(second), (14, 15)));
        assert_violation(&h, "k");
    }
}

#[test]
fn stale_read_after_an_acknowledged_write_is_not_linearizable() {
    let history = [
        set(1, "k", "a", (0, 1)),
        set(1, "k", "b", (2, 3)),
        get(2, "k", Some("a"), (4, 5)),
    ];
    let why = assert_violation(&history, "k");
    let report = check(&history);
    let (_, v) = report.violations()[0];
    assert_eq!(
        v.unplaced, 2,
        "the stale read is the op that cannot be placed: {why}"
    );
    assert_eq!(v.prefix, vec![0, 1]);
    assert!(
        why.contains("\"b\""),
        "the explanation gives the value left: {why}"
    );
}

#[test]
fn touching_intervals_are_concurrent() {
    // The read is invoked at the very tick the write completes: either order is fine.
    assert_linearizable(&[set(1, "k", "a", (0, 5)), get(2, "k", None, (5, 6))]);
    // One tick later it must see the write.
    assert_violation(&[set(1, "k", "a", (0, 5)), get(2, "k", None, (6, 7))], "k");
}

#[test]
fn read_of_a_value_never_written() {
    let history = [set(1, "k", "a", (0, 1)), get(2, "k", Some("zzz"), (0, 5))];
    let why = assert_violation(&history, "k");
    assert!(why.contains("\"zzz\""), "{why}");
    assert_eq!(reads_never_written(&history), vec![1]);
}

#[test]
fn unknown_write_observed_or_not_is_linearizable() {
    let base = || vec![set(1, "k", "a", (0, 1)), unknown(set(2, "k", "b", (2, 3)))];
    // Observed long after its invocation: it took effect some time after the invoke.
    let mut h = base();
    h.push(get(3, "k", Some("b"), (100, 101)));
    assert_linearizable(&h);
    // Never observed: it may never have happened.
    let mut h = base();
    h.push(get(3, "k", Some("a"), (100, 101)));
    h.push(get(3, "k", Some("a"), (102, 103)));
    assert_linearizable(&h);
    // Observed late, after reads of the old value: it took effect late.
    let mut h = base();
    h.push(get(3, "k", Some("a"), (10, 11)));
    h.push(get(3, "k", Some("b"), (100, 101)));
    assert_linearizable(&h);
    // But not before it was invoked.
    let h = [
        set(1, "k", "a", (0, 1)),
        get(3, "k", Some("b"), (2, 3)),
        unknown(set(2, "k", "b", (4, 5))),
    ];
    assert_violation(&h, "k");
}

#[test]
fn unknown_write_observed_then_unobserved_is_not_linearizable() {
    let history = [
        set(1, "k", "a", (0, 1)),
        unknown(set(2, "k", "b", (2, 3))),
        get(3, "k", Some("b"), (4, 5)),
        get(3, "k", Some("a"), (6, 7)),
    ];
    let why = assert_violation(&history, "k");
    assert!(why.contains(&describe_op(&history, 3)), "{why}");
}

#[test]
fn failed_write_observed_is_not_linearizable() {
    let history = [
        set(1, "k", "a", (0, 1)),
        failed(set(2, "k", "b", (2, 3))),
        get(3, "k", Some("b"), (4, 5)),
    ];
    assert_violation(&history, "k");
    // The cheap scan counts a failed write as "tried": it is not a garbage read.
    assert!(reads_never_written(&history).is_empty());
    // Without the read, the failed write is simply dropped.
    assert_linearizable(&history[..2]);
}

#[test]
fn incr_sequences() {
    // Gaps from an unknown increment are fine, whichever way it went.
    assert_linearizable(&[
        incr(1, "n", 1, (0, 1)),
        unknown(incr(2, "n", 0, (2, 3))),
        incr(1, "n", 3, (4, 5)),
        get(1, "n", Some("3"), (6, 7)),
    ]);
    assert_linearizable(&[
        incr(1, "n", 1, (0, 1)),
        unknown(incr(2, "n", 0, (2, 3))),
        incr(1, "n", 2, (4, 5)),
    ]);
    // Two acknowledged increments cannot both return 1.
    let dup = [incr(1, "n", 1, (0, 10)), incr(2, "n", 1, (0, 10))];
    assert_violation(&dup, "n");
    // A gap without an unknown op to explain it is not fine either.
    assert_violation(&[incr(1, "n", 1, (0, 1)), incr(1, "n", 3, (2, 3))], "n");
    // INCR works on written integers, and its result reads back as bytes.
    assert_linearizable(&[
        set(1, "n", "41", (0, 1)),
        incr(1, "n", 42, (2, 3)),
        get(2, "n", Some("42"), (4, 5)),
        cas(2, "n", Some("42"), "x", true, (6, 7)),
        failed(incr(1, "n", 0, (8, 9))),
        get(2, "n", Some("x"), (10, 11)),
    ]);
    // A completed INCR on a non-integer (should have been an error) is not.
    assert_violation(&[set(1, "n", "x", (0, 1)), incr(1, "n", 1, (2, 3))], "n");
    // Redis's strict integers: "007" is not one.
    assert_violation(&[set(1, "n", "007", (0, 1)), incr(1, "n", 8, (2, 3))], "n");
    // INCR results are exempt from the never-written scan.
    assert!(
        reads_never_written(&[incr(1, "n", 1, (0, 1)), get(1, "n", Some("1"), (2, 3))]).is_empty()
    );
}

#[test]
fn cas_semantics() {
    assert_linearizable(&[
        cas(1, "k", None, "a", true, (0, 1)),
        cas(2, "k", None, "b", false, (2, 3)),
        cas(1, "k", Some("a"), "b", true, (4, 5)),
        cas(2, "k", Some("a"), "c", false, (6, 7)),
        get(3, "k", Some("b"), (8, 9)),
    ]);
    // Two concurrent CAS from the same value: only one may win.
    assert_linearizable(&[
        set(1, "k", "a", (0, 1)),
        cas(1, "k", Some("a"), "b", true, (2, 10)),
        cas(2, "k", Some("a"), "c", false, (2, 10)),
    ]);
    assert_violation(
        &[
            set(1, "k", "a", (0, 1)),
            cas(1, "k", Some("a"), "b", true, (2, 10)),
            cas(2, "k", Some("a"), "c", true, (2, 10)),
            get(3, "k", Some("c"), (11, 12)),
        ],
        "k",
    );
    // Failing while the value equals `expect` is not allowed...
    assert_violation(
        &[
            set(1, "k", "a", (0, 1)),
            cas(1, "k", Some("a"), "b", false, (2, 3)),
        ],
        "k",
    );
    // ...nor succeeding while it differs.
    assert_violation(
        &[
            set(1, "k", "a", (0, 1)),
            cas(1, "k", Some("z"), "b", true, (2, 3)),
        ],
        "k",
    );
    // An unknown CAS may or may not have applied.
    for seen in ["a", "b"] {
        assert_linearizable(&[
            set(1, "k", "a", (0, 1)),
            unknown(cas(1, "k", Some("a"), "b", true, (2, 3))),
            get(2, "k", Some(seen), (10, 11)),
        ]);
    }
}

#[test]
fn only_the_bad_key_is_reported() {
    let history = [
        set(1, "good", "a", (0, 1)),
        set(1, "bad", "a", (0, 1)),
        set(2, "bad", "b", (2, 3)),
        get(2, "good", Some("a"), (4, 5)),
        get(3, "bad", Some("a"), (4, 5)),
        incr(3, "counter", 1, (6, 7)),
    ];
    let why = assert_violation(&history, "bad");
    assert!(why.contains(&describe_op(&history, 4)), "{why}");
    let report = check(&history);
    assert_eq!(report.keys.len(), 3);
    assert_eq!(
        report.keys[b"good".as_slice()].result,
        KeyResult::Linearizable
    );
    assert_eq!(
        report.keys[b"counter".as_slice()].result,
        KeyResult::Linearizable
    );
    assert!(report.to_string().contains("key \"bad\""), "{report}");
    assert!(!report.to_string().contains("good"), "{report}");
}

#[test]
fn budget_exhaustion_is_reported_not_hung() {
    // 18 concurrent writes and a read of a value none wrote: proving that needs every
    // subset of the writes, far beyond a budget of 1000 steps.
    let mut history: Vec<Op> = (0..18)
        .map(|i| set(i, "k", &format!("v{i}"), (0, 100)))
        .collect();
    history.push(get(99, "k", Some("nope"), (50, 60)));
    history.push(set(1, "other", "x", (0, 1)));
    let report = check_with(&history, &Options { step_budget: 1000 });
    assert!(!report.linearizable);
    assert!(report.violations().is_empty(), "{report}");
    let undecided = report.undecided();
    assert_eq!(undecided.len(), 1, "{report}");
    assert_eq!(undecided[0].0, b"k");
    match undecided[0].1 {
        KeyResult::Unknown(why) => assert!(why.contains("budget"), "{why}"),
        other => panic!("expected Unknown, got {other:?}"),
    }
    assert_eq!(report.keys[b"k".as_slice()].steps, 1000);
    assert_eq!(
        report.keys[b"other".as_slice()].result,
        KeyResult::Linearizable
    );
    assert!(report.to_string().contains("budget"), "{report}");
}

#[test]
fn many_unobserved_unknown_writes_do_not_blow_up() {
    // Forty timed-out writes nobody read, then a garbage read: without dropping the
    // unobserved unknown writes, proving the violation would try their subsets.
    let mut history: Vec<Op> = (0..40)
        .map(|i| unknown(set(i, "k", &format!("lost{i}"), (i, i + 1))))
        .collect();
    history.push(set(99, "k", "a", (50, 51)));
    history.push(get(99, "k", Some("a"), (52, 53)));
    assert_linearizable(&history);
    history.push(get(99, "k", Some("b"), (54, 55)));
    let report = check_with(
        &history,
        &Options {
            step_budget: 10_000,
        },
    );
    assert_eq!(report.violations().len(), 1, "{report}");
    // Observed unknown writes are kept, and still judged right.
    history.pop();
    history.push(get(99, "k", Some("lost7"), (54, 55)));
    assert_linearizable(&history);
    history.push(get(99, "k", Some("lost3"), (56, 57)));
    history.push(get(99, "k", Some("lost7"), (58, 59)));
    assert_violation(&history, "k");
}

#[test]
fn malformed_ops_are_invalid() {
    let mut no_completion = set(1, "k", "a", (0, 1));
    no_completion.complete = None;
    let backwards = set(1, "k", "a", (5, 1));
    let mismatch = op(1, "k", Input::Read, Output::Done, (0, 1));
    for bad in [no_completion, backwards, mismatch] {
        let report = check(&[bad]);
        assert!(!report.linearizable);
        assert!(
            matches!(report.keys[b"k".as_slice()].result, KeyResult::Invalid(_)),
            "{report}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The cheap scans.

#[test]
fn reads_never_written_definition() {
    let history = [
        set(1, "k", "a", (0, 1)),
        unknown(set(1, "k", "u", (2, 3))),
        cas(1, "k", Some("a"), "c", false, (4, 5)),
        get(2, "k", Some("a"), (6, 7)),
        get(2, "k", Some("u"), (8, 9)),
        get(2, "k", Some("c"), (10, 11)),
        get(2, "k", None, (12, 13)),
        get(2, "k", Some("x"), (14, 15)),
        // Written, but on another key.
        get(2, "j", Some("a"), (16, 17)),
        // An integer without any INCR on the key.
        get(2, "k", Some("7"), (18, 19)),
        unknown(get(2, "k", Some("y"), (20, 21))),
    ];
    assert_eq!(reads_never_written(&history), vec![7, 8, 9]);
}

#[test]
fn lost_writes_definition() {
    let finals =
        |v: Option<&str>| HashMap::from([(b"k".to_vec(), v.map(|s| s.as_bytes().to_vec()))]);
    // The last acknowledged write, never seen again and not the final value: lost.
    let history = [
        set(1, "k", "a", (0, 1)),
        set(1, "k", "b", (2, 3)),
        get(2, "k", Some("a"), (0, 1)),
    ];
    assert_eq!(lost_writes(&history, &finals(Some("a"))), vec![1]);
    assert_eq!(lost_writes(&history, &finals(None)), vec![1]);
    assert!(lost_writes(&history, &finals(Some("b"))).is_empty());
    // Keys without a final value are not judged.
    assert!(lost_writes(&history, &HashMap::new()).is_empty());
    // Overwritten by a later or concurrent acknowledged write: not lost. (Concurrent
    // acknowledged writes excuse each other even when the final value is neither: the
    // linearizability check with a final read catches that one.)
    let history = [set(1, "k", "a", (0, 10)), set(2, "k", "b", (5, 6))];
    assert!(lost_writes(&history, &finals(Some("z"))).is_empty());
    assert!(lost_writes(&history, &finals(Some("b"))).is_empty());
    // An unknown later write may have overwritten it: not required to survive.
    let history = [set(1, "k", "a", (0, 1)), unknown(set(2, "k", "b", (2, 3)))];
    assert!(lost_writes(&history, &finals(Some("z"))).is_empty());
    // A failed later write or a failed CAS do not excuse it.
    let history = [
        set(1, "k", "a", (0, 1)),
        failed(set(2, "k", "b", (2, 3))),
        cas(2, "k", Some("b"), "c", false, (4, 5)),
    ];
    assert_eq!(lost_writes(&history, &finals(None)), vec![0]);
    // Observed by a later read: reported by the linearizability check, not here.
    let history = [set(1, "k", "a", (0, 1)), get(2, "k", Some("a"), (2, 3))];
    assert!(lost_writes(&history, &finals(None)).is_empty());
}

// ---------------------------------------------------------------------------------------
// Random histories from a simulated register.

/// xorshift64*: deterministic, dependency-free randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

struct Sim {
    clients: u64,
    ops_per_client: u64,
    keys: u64,
    /// Percent of ops whose outcome is lost (half of them still take effect).
    unknown_percent: u64,
    /// Only GET/SET/DEL with unique values (a Jepsen register workload) when false.
    counters_and_cas: bool,
}

/// Runs `sim.clients` clients against one real (atomic) register per key: each op gets a
/// random interval and takes effect at a random instant inside it, in the order of those
/// instants, so the history is linearizable by construction. Returns the history (in
/// invocation order per client) and the final values.
fn simulate(seed: u64, sim: &Sim) -> (Vec<Op>, FinalValues) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    // (effect instant, client, op, does it take effect if unknown)
    let mut planned: Vec<(u64, u64, Op, bool)> = Vec::new();
    let mut serial = 0u64;
    for client in 0..sim.clients {
        let mut now = rng.below(5);
        for _ in 0..sim.ops_per_client {
            serial += 1;
            let invoke = now + rng.below(5);
            let effect = invoke + rng.below(10);
            let complete = effect + rng.below(10);
            now = complete + 1;
            let key = format!("k{}", rng.below(sim.keys));
            let value = if rng.chance(50) || !sim.counters_and_cas {
                format!("c{client}-{serial}")
            } else {
                rng.below(20).to_string()
            };
            let roll = if sim.counters_and_cas {
                rng.below(100)
            } else {
                // Reads, writes and a few deletes, in the ranges below.
                match rng.below(100) {
                    0..45 => 0,
                    45..95 => 40,
                    _ => 80,
                }
            };
            let input = match roll {
                0..40 => Input::Read,
                40..65 => Input::Write(value.into_bytes()),
                65..80 => Input::Incr,
                80..85 => Input::Delete,
                _ => Input::Cas {
                    expect: match rng.below(3) {
                        0 => None,
                        _ => Some(rng.below(20).to_string().into_bytes()),
                    },
                    new: value.into_bytes(),
                },
            };
            let op = Op {
                client,
                key: key.into_bytes(),
                input,
                output: Outcome::Failed, // filled in below
                invoke,
                complete: Some(complete),
            };
            let unknown = rng.chance(sim.unknown_percent);
            let applies = !unknown || rng.chance(50);
            planned.push((effect, client, op.clone(), applies));
            if unknown {
                let last = planned.last_mut().expect("just pushed");
                last.2.output = Outcome::Unknown;
                last.2.complete = None;
            }
        }
    }
    // Apply in effect order; ties in any order (both intervals contain the instant).
    let mut order: Vec<usize> = (0..planned.len()).collect();
    order.sort_by_key(|&i| (planned[i].0, planned[i].1));
    let mut store = FinalValues::new();
    for i in order {
        let (_, _, op, applies) = &mut planned[i];
        if !*applies {
            continue;
        }
        let cell = store.entry(op.key.clone()).or_insert(None);
        let output = match &op.input {
            Input::Read => Some(Output::Value(cell.clone())),
            Input::Write(v) => {
                *cell = Some(v.clone());
                Some(Output::Done)
            }
            Input::Delete => {
                *cell = None;
                Some(Output::Done)
            }
            Input::Incr => {
                let current = match cell {
                    None => Some(0),
                    Some(b) => std::str::from_utf8(b)
                        .ok()
                        .filter(|s| *s == "0" || !(s.starts_with('0') || s.starts_with("-0")))
                        .and_then(|s| s.parse::<i64>().ok()),
                };
                match current {
                    Some(n) => {
                        *cell = Some((n + 1).to_string().into_bytes());
                        Some(Output::Int(n + 1))
                    }
                    None => None, // Redis: ERR not an integer → Failed
                }
            }
            Input::Cas { expect, new } => {
                let applied = cell == expect;
                if applied {
                    *cell = Some(new.clone());
                }
                Some(Output::Applied(applied))
            }
        };
        if op.output != Outcome::Unknown {
            op.output = match output {
                Some(o) => Outcome::Ok(o),
                None => Outcome::Failed,
            };
        }
    }
    let history = planned.into_iter().map(|(_, _, op, _)| op).collect();
    (history, store)
}

/// Replaces the output of the `n`th completed read (counting from the middle of the
/// history) with a value no op wrote. Returns its index.
fn corrupt_a_read(history: &mut [Op], n: usize) -> usize {
    let reads: Vec<usize> = (0..history.len())
        .filter(|&i| history[i].input == Input::Read && matches!(history[i].output, Outcome::Ok(_)))
        .collect();
    let i = reads[(reads.len() / 2 + n) % reads.len()];
    history[i].output = Outcome::Ok(Output::Value(Some(b"corrupted".to_vec())));
    i
}

#[test]
fn random_register_histories_are_linearizable() {
    let sims = [
        Sim {
            clients: 4,
            ops_per_client: 60,
            keys: 2,
            unknown_percent: 0,
            counters_and_cas: true,
        },
        Sim {
            clients: 5,
            ops_per_client: 80,
            keys: 3,
            unknown_percent: 5,
            counters_and_cas: true,
        },
        Sim {
            clients: 8,
            ops_per_client: 60,
            keys: 1,
            unknown_percent: 3,
            counters_and_cas: true,
        },
    ];
    let register = Sim {
        clients: 5,
        ops_per_client: 100,
        keys: 2,
        unknown_percent: 10,
        counters_and_cas: false,
    };
    let sims = [&sims[0], &sims[1], &sims[2], &register];
    for (s, sim) in sims.into_iter().enumerate() {
        for seed in 0..20 {
            let (history, finals) = simulate(seed * 31 + s as u64, sim);
            let report = check(&history);
            assert!(report.linearizable, "sim {s} seed {seed}:\n{report}");
            assert!(
                reads_never_written(&history).is_empty(),
                "sim {s} seed {seed}"
            );
            assert!(
                lost_writes(&history, &finals).is_empty(),
                "sim {s} seed {seed}"
            );
        }
    }
}

#[test]
fn random_register_history_with_one_corrupted_read_fails() {
    let sims = [
        Sim {
            clients: 4,
            ops_per_client: 60,
            keys: 2,
            unknown_percent: 0,
            counters_and_cas: true,
        },
        Sim {
            clients: 5,
            ops_per_client: 80,
            keys: 3,
            unknown_percent: 5,
            counters_and_cas: true,
        },
        Sim {
            clients: 5,
            ops_per_client: 100,
            keys: 2,
            unknown_percent: 10,
            counters_and_cas: false,
        },
    ];
    for (s, sim) in sims.iter().enumerate() {
        for seed in 0..10 {
            let (mut history, _) = simulate(seed * 31 + s as u64, sim);
            let bad = corrupt_a_read(&mut history, seed as usize);
            let key = String::from_utf8(history[bad].key.clone()).expect("ascii keys");
            let why = assert_violation(&history, &key);
            assert!(why.contains("\"corrupted\""), "sim {s} seed {seed}: {why}");
            assert_eq!(reads_never_written(&history), vec![bad]);
        }
    }
}

#[test]
fn random_register_history_with_a_stale_read_fails() {
    // A subtler corruption than a garbage value: a read returns the value its key had
    // before an acknowledged write that completed before the read was invoked, with no
    // other mutation of the key in between or concurrent. Always a violation.
    let sim = Sim {
        clients: 3,
        ops_per_client: 80,
        keys: 2,
        unknown_percent: 0,
        counters_and_cas: true,
    };
    let mut found = 0;
    for seed in 0..30 {
        let (mut history, _) = simulate(seed, &sim);
        let mutates = |o: &Op| !matches!(o.input, Input::Read);
        // Find a read R and the last acked SET W on its key with W.complete < R.invoke,
        // no other mutation of the key overlapping [W.invoke, R.complete], and a SET P
        // before W (completed before W.invoke) whose value differs from W's.
        let candidate = (0..history.len()).find_map(|r| {
            let ro = &history[r];
            if ro.input != Input::Read || !matches!(ro.output, Outcome::Ok(_)) {
                return None;
            }
            let (w, wo) = history
                .iter()
                .enumerate()
                .filter(|(_, o)| {
                    o.key == ro.key
                        && matches!(o.input, Input::Write(_))
                        && o.complete.is_some_and(|c| c < ro.invoke)
                })
                .max_by_key(|(_, o)| o.complete)?;
            let quiet = history.iter().enumerate().all(|(j, o)| {
                j == w
                    || o.key != ro.key
                    || !mutates(o)
                    || matches!(o.output, Outcome::Failed)
                    || o.complete.is_some_and(|c| c < wo.invoke)
                    || o.invoke > ro.complete.expect("ok")
            });
            let Input::Write(wv) = &wo.input else {
                return None;
            };
            let old = history
                .iter()
                .filter(|o| o.key == ro.key && o.complete.is_some_and(|c| c < wo.invoke))
                .find_map(|o| match &o.input {
                    Input::Write(v) if v != wv => Some(v.clone()),
                    _ => None,
                })?;
            quiet.then_some((r, old))
        });
        let Some((r, old)) = candidate else { continue };
        history[r].output = Outcome::Ok(Output::Value(Some(old)));
        let key = String::from_utf8(history[r].key.clone()).expect("ascii keys");
        assert_violation(&history, &key);
        found += 1;
    }
    assert!(found >= 5, "only {found} seeds had a stale-read candidate");
}
