//! A client that rides through a failover: a counter incremented in a loop against a
//! kvstore cluster, with the `redis` crate, while you kill the leader.
//!
//! In one terminal, start a local cluster:
//!
//! ```text
//! kvstore cluster --nodes 3
//! ```
//!
//! In another, run this program (it talks to 127.0.0.1:7001-7003 unless given
//! addresses):
//!
//! ```text
//! cargo run --example failover -- --seconds 30
//! ```
//!
//! Then kill the leader's process (`kvstore cluster` prints each node's pid and which
//! node leads; the highest port leads while it is up): `kill -9 <pid>`. The program
//! prints which node serves it, how long the outage lasted, and at the end checks that
//! no acknowledged increment was lost: the counter grew by at least the number of
//! acknowledged `INCR`s, and by no more than those plus the ones whose outcome was
//! unknown. Exit status 0 when that holds.
//!
//! What it does with each kind of answer (README, "In a cluster"):
//! - `-MOVED 0 host:port` (a follower's answer): reconnect there and send again; the
//!   `redis` crate exposes the address as [`redis::RedisError::redirect_node`].
//! - `-CLUSTERDOWN` (no leader yet, or a leader cut off from its majority): nothing was
//!   applied; wait a little (backoff) and try the next node.
//! - `-TIMEOUT`, or a connection that broke after the `INCR` was sent: the increment
//!   may or may not have been applied (possibly later, by the new leader). It is counted
//!   as unknown, never as acknowledged, and the loop moves on.
//! - A node that does not accept connections: try the next one, with backoff.
//!
//! `kvstore cluster --requirepass PW` needs `--password PW` here.

use std::time::{Duration, Instant};

use clap::Parser;
use redis::{ErrorKind, RedisError, ServerErrorKind};

#[derive(Parser, Debug)]
#[command(
    about = "INCR a counter on a kvstore cluster through a failover, then check nothing \
                   acknowledged was lost"
)]
struct Args {
    /// The nodes (host:port); any of them will do, the others are tried when it fails.
    #[arg(default_values_t = ["127.0.0.1:7001".to_string(), "127.0.0.1:7002".into(), "127.0.0.1:7003".into()])]
    nodes: Vec<String>,
    /// How long to keep incrementing.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// The counter's key.
    #[arg(long, default_value = "failover:counter")]
    key: String,
    /// AUTH with this password.
    #[arg(long)]
    password: Option<String>,
    /// Stop early: once a failover was seen and 100 more increments were acknowledged
    /// after it (for tests and demos).
    #[arg(long)]
    stop_after_failover: bool,
}

/// Connect timeout, and how long one command may wait for its reply.
const TIMEOUT: Duration = Duration::from_secs(2);
/// First and longest pause between attempts while no node serves.
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How many redirects in a row before pausing (a cluster mid-election can point back
/// and forth for a moment).
const MAX_HOPS: u32 = 5;

/// The client side of the cluster: which node it talks to and its connection.
struct Cluster {
    nodes: Vec<String>,
    /// Where the next command goes: a configured node, or a `-MOVED` target.
    target: String,
    /// Index into `nodes` of the last one tried (for "try the next one").
    next: usize,
    conn: Option<redis::Connection>,
    password: Option<String>,
    backoff: Duration,
}

/// How one attempt ended.
enum Attempt<T> {
    Done(T),
    /// Nothing was applied (refused, redirected, no connection): try again.
    Retry(String),
    /// The command may have been applied: count it as unknown.
    Unknown(String),
}

impl Cluster {
    fn new(nodes: Vec<String>, password: Option<String>) -> Cluster {
        Cluster {
            target: nodes[0].clone(),
            nodes,
            next: 0,
            conn: None,
            password,
            backoff: BACKOFF_MIN,
        }
    }

    /// Drops the connection and moves on to the next configured node.
    fn rotate(&mut self) {
        self.conn = None;
        self.next = (self.next + 1) % self.nodes.len();
        self.target = self.nodes[self.next].clone();
    }

    /// Sleeps the current backoff, then doubles it (up to [`BACKOFF_MAX`]).
    fn pause(&mut self) {
        std::thread::sleep(self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    fn connect(&mut self) -> Result<&mut redis::Connection, RedisError> {
        if self.conn.is_none() {
            let auth = match &self.password {
                Some(p) => format!(":{p}@"),
                None => String::new(),
            };
            let client = redis::Client::open(format!("redis://{auth}{}/", self.target))?;
            let conn = client.get_connection_with_timeout(TIMEOUT)?;
            conn.set_read_timeout(Some(TIMEOUT))?;
            conn.set_write_timeout(Some(TIMEOUT))?;
            self.conn = Some(conn);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| RedisError::from((ErrorKind::Io, "not connected")))
    }

    /// Sends `cmd` to whoever leads, following redirects; `Err` for an error no retry
    /// can fix (a wrong password, a key of another type).
    fn run<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<Attempt<T>, String> {
        let mut hops = 0;
        loop {
            let conn = match self.connect() {
                Ok(c) => c,
                Err(e) => {
                    let msg = format!("{} does not answer ({e})", self.target);
                    self.rotate();
                    return Ok(Attempt::Retry(msg));
                }
            };
            let err = match cmd.query::<T>(conn) {
                Ok(v) => {
                    self.backoff = BACKOFF_MIN;
                    return Ok(Attempt::Done(v));
                }
                Err(e) => e,
            };
            if let Some((addr, _slot)) = err.redirect_node() {
                // `MOVED 0 :7003` would mean "the same host".
                let addr = match addr.strip_prefix(':') {
                    Some(port) => {
                        let host = self.target.rsplit_once(':').map_or("127.0.0.1", |h| h.0);
                        format!("{host}:{port}")
                    }
                    None => addr.to_string(),
                };
                hops += 1;
                self.conn = None;
                self.target = addr;
                if hops >= MAX_HOPS {
                    return Ok(Attempt::Retry("redirected in circles".into()));
                }
                continue;
            }
            return match err.kind() {
                ErrorKind::Server(ServerErrorKind::ClusterDown) => {
                    let msg = format!("{}: {err}", self.target);
                    self.rotate();
                    Ok(Attempt::Retry(msg))
                }
                // kvstore's `-TIMEOUT write outcome unknown`.
                _ if err.code() == Some("TIMEOUT") => {
                    Ok(Attempt::Unknown(format!("{}: {err}", self.target)))
                }
                // The command was sent; the reply never came.
                _ if err.is_io_error() || err.is_connection_dropped() || err.is_timeout() => {
                    let msg = format!("{}: {err}", self.target);
                    self.rotate();
                    Ok(Attempt::Unknown(msg))
                }
                _ => Err(format!("{}: {err}", self.target)),
            };
        }
    }

    /// Runs a command that changes nothing (a read) until it gets an answer or
    /// `deadline` passes.
    fn read<T: redis::FromRedisValue>(
        &mut self,
        cmd: &redis::Cmd,
        deadline: Instant,
    ) -> Result<T, String> {
        loop {
            match self.run(cmd)? {
                Attempt::Done(v) => return Ok(v),
                Attempt::Retry(why) | Attempt::Unknown(why) if Instant::now() >= deadline => {
                    return Err(format!("no node answered in time: {why}"));
                }
                _ => self.pause(),
            }
        }
    }
}

fn main() {
    let args = Args::parse();
    std::process::exit(match run(args) {
        Ok(true) => 0,
        Ok(false) => 2,
        Err(e) => {
            eprintln!("failover: {e}");
            1
        }
    });
}

/// Returns whether the counter checks out.
fn run(args: Args) -> Result<bool, String> {
    if args.nodes.is_empty() {
        return Err("give at least one node address".into());
    }
    let mut cluster = Cluster::new(args.nodes.clone(), args.password.clone());
    let read_deadline = Duration::from_secs(30);
    let start: i64 = cluster
        .read::<Option<i64>>(
            redis::cmd("GET").arg(&args.key),
            Instant::now() + read_deadline,
        )?
        .unwrap_or(0);
    println!(
        "counter {} starts at {start}; incrementing for up to {}s",
        args.key, args.seconds
    );

    let end = Instant::now() + Duration::from_secs(args.seconds);
    let incr = redis::cmd("INCR").arg(&args.key).to_owned();
    let (mut acked, mut unknown, mut failovers) = (0u64, 0u64, 0u64);
    let mut served_by: Option<String> = None;
    // Since when no increment has been acknowledged, and why (the first refusal).
    let mut outage: Option<(Instant, String)> = None;
    let mut longest = Duration::ZERO;
    let mut acked_since_failover = 0u64;
    while Instant::now() < end {
        match cluster.run::<i64>(&incr)? {
            Attempt::Done(value) => {
                acked += 1;
                acked_since_failover += 1;
                if let Some((since, why)) = outage.take() {
                    let took = since.elapsed();
                    longest = longest.max(took);
                    println!("outage over after {} ms (first: {why})", took.as_millis());
                }
                if served_by.as_deref() != Some(cluster.target.as_str()) {
                    if served_by.is_some() {
                        failovers += 1;
                        acked_since_failover = 0;
                    }
                    println!("{} serves (counter = {value})", cluster.target);
                    served_by = Some(cluster.target.clone());
                }
                if args.stop_after_failover && failovers > 0 && acked_since_failover >= 100 {
                    break;
                }
            }
            Attempt::Retry(why) => {
                outage.get_or_insert_with(|| (Instant::now(), why));
                cluster.pause();
            }
            Attempt::Unknown(why) => {
                unknown += 1;
                println!("outcome unknown: {why}");
                outage.get_or_insert_with(|| (Instant::now(), why));
                cluster.pause();
            }
        }
    }

    let last: i64 = cluster
        .read::<Option<i64>>(
            redis::cmd("GET").arg(&args.key),
            Instant::now() + read_deadline,
        )?
        .unwrap_or(0);
    let grew = u64::try_from(last - start).unwrap_or(0);
    println!(
        "acknowledged {acked} increments ({unknown} of unknown outcome), failovers seen: \
         {failovers}, longest outage: {} ms",
        longest.as_millis()
    );
    println!("counter went from {start} to {last}: +{grew}");
    if grew < acked {
        println!("LOST: {} acknowledged increments are missing", acked - grew);
        return Ok(false);
    }
    if grew > acked + unknown {
        println!(
            "EXTRA: the counter grew by {} more than was ever sent",
            grew - acked - unknown
        );
        return Ok(false);
    }
    println!("OK: no acknowledged increment was lost");
    Ok(true)
}
