//! Deterministic simulation of the whole cluster (see `tests/sim/mod.rs` for what is
//! simulated and checked): thousands of seeded runs of the real node state machine
//! under crashes, partitions, message loss, slow disks and drifting clocks, each
//! replayable from its seed.
//!
//! - `cargo test --release --test simulation -- --nocapture --test-threads=1` runs the
//!   CI budget
//!   (`SIM_SEEDS`, default 10,000 seeds in release builds and 300 in debug ones, from
//!   seed `SIM_FIRST`, default 1) and prints, last (one test thread: `simulation` runs
//!   after the others),
//!   `simulation: N seeds, M steps, K faults, 0 violations`.
//! - A failing seed prints itself, the step, the violated invariant and the last
//!   events; `SIM_SEED=<seed> cargo test --release --test simulation replay --
//!   --nocapture` replays it (twice, and checks that both runs are the same), with
//!   `SIM_BUG=<name>` if it was found with a planted bug.
//! - `planted_bugs_are_caught` plants each known bug in turn and fails unless the
//!   simulator finds it within its budget.

mod linearizability;
mod sim;

use kvstore::node::PlantedBug;
use sim::{Bug, Outcome, report, run_seed};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn bug_named(name: &str) -> Option<Bug> {
    Some(match name {
        "skip-noop" => Bug::Node(PlantedBug::SkipNoop),
        "two-coordinators" => Bug::Node(PlantedBug::TwoCoordinators),
        "no-stickiness" => Bug::Node(PlantedBug::NoStickiness),
        "ack-before-fsync" => Bug::AckBeforeFsync,
        "clock-drift" => Bug::ClockDrift,
        _ => return None,
    })
}

/// Each planted bug and the seeds the simulator may take to find it (it stops at the
/// first violation; today each is found within the first 5,000 seeds, most within 1,500).
const BUGS: [(&str, u64); 5] = [
    ("skip-noop", 20_000),
    ("two-coordinators", 20_000),
    ("no-stickiness", 20_000),
    ("ack-before-fsync", 20_000),
    ("clock-drift", 20_000),
];

/// Totals over many seeds, run on every core; stops at the first violation.
#[derive(Default)]
struct Totals {
    seeds: u64,
    steps: u64,
    faults: u64,
    ops: u64,
    acked: u64,
    first_violation: Option<(u64, Outcome)>,
}

fn run_many(first: u64, count: u64, bug: Option<Bug>) -> Totals {
    let next = AtomicU64::new(first);
    let end = first + count;
    let totals = Mutex::new(Totals::default());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    if totals.lock().unwrap().first_violation.is_some() {
                        return;
                    }
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end {
                        return;
                    }
                    let out = run_seed(seed, bug, false);
                    let mut t = totals.lock().unwrap();
                    t.seeds += 1;
                    t.steps += out.steps;
                    t.faults += out.faults;
                    t.ops += out.ops;
                    t.acked += out.acked_writes;
                    if out.violation.is_some()
                        && t.first_violation.as_ref().is_none_or(|(s, _)| seed < *s)
                    {
                        t.first_violation = Some((seed, out));
                    }
                }
            });
        }
    });
    totals.into_inner().unwrap()
}

#[test]
fn simulation() {
    let default = if cfg!(debug_assertions) { 300 } else { 10_000 };
    let count = env_u64("SIM_SEEDS").unwrap_or(default);
    let first = env_u64("SIM_FIRST").unwrap_or(1);
    let started = std::time::Instant::now();
    let t = run_many(first, count, None);
    if let Some((seed, _)) = &t.first_violation {
        let traced = run_seed(*seed, None, true);
        panic!("{}", report(*seed, None, &traced));
    }
    println!(
        "({} client operations, {} acknowledged writes, {:.1} s)",
        t.ops,
        t.acked,
        started.elapsed().as_secs_f64()
    );
    println!(
        "simulation: {} seeds, {} steps, {} faults, 0 violations",
        t.seeds, t.steps, t.faults
    );
    assert_eq!(t.seeds, count);
}

#[test]
fn replay() {
    let bug = std::env::var("SIM_BUG").ok().and_then(|b| bug_named(&b));
    let seed = env_u64("SIM_SEED").unwrap_or(42);
    let a = run_seed(seed, bug, true);
    let b = run_seed(seed, bug, true);
    assert_eq!(a.trace, b.trace, "seed {seed} did not replay the same");
    assert_eq!(a.steps, b.steps);
    assert_eq!(a.violation, b.violation);
    match &a.violation {
        Some(_) => println!("{}", report(seed, bug, &a)),
        None => println!(
            "seed {seed}: {} steps, {} faults, {} operations, no violation; last events:\n  {}",
            a.steps,
            a.faults,
            a.ops,
            a.trace.join("\n  ")
        ),
    }
    if env_u64("SIM_SEED").is_some() && bug.is_none() {
        assert!(a.violation.is_none(), "{}", report(seed, bug, &a));
    }
}

/// The simulator must be able to fail: each planted bug is found within its budget.
#[test]
fn planted_bugs_are_caught() {
    let mut missed = Vec::new();
    for (name, budget) in BUGS {
        let bug = bug_named(name);
        let t = run_many(1, budget, bug);
        match &t.first_violation {
            Some((seed, out)) => {
                let (step, what) = out.violation.clone().unwrap_or_default();
                println!("planted {name}: caught by seed {seed} at step {step}: {what}");
            }
            None => missed.push(format!("{name} ({} seeds, {} steps)", t.seeds, t.steps)),
        }
    }
    assert!(missed.is_empty(), "planted bugs not caught: {missed:?}");
}
