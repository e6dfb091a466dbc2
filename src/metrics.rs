//! Metrics: the per-command counters and latency histograms the server keeps, the slow
//! log, and their renderings: Prometheus's text format (`GET /metrics` on the HTTP
//! listener), Redis's INFO `commandstats` / `latencystats`, `SLOWLOG` and
//! `LATENCY HISTOGRAM`.
//!
//! Data enters from the connection threads: [`Metrics::record`] once per executed
//! command with its duration (a read: its execution; a write: from the moment its
//! batch goes to the log until its result is back, fsync and replication included,
//! which is what a client waits for), and from the store ([`Histogram`] of fsync times,
//! `store::Stats`). It leaves when someone asks: [`render`] reads every counter once,
//! without stopping anyone. Counters are relaxed atomics: a scrape may see a command
//! counted in `calls` a moment before its histogram bucket, never a count going down
//! (except across `CONFIG RESETSTAT`, which Prometheus reads as a restart).
//!
//! Histograms have fixed bucket bounds ([`BOUNDS_US`], 10 µs to 10 s, Prometheus's
//! usual 1-2.5-5 steps), so recording is one comparison walk and two atomic adds, and a
//! scrape needs no locks.

use crate::commands::{COMMANDS, CommandSpec, Context};
use crate::protocol::{
    Proto, write_array_len, write_bulk, write_error, write_integer, write_map_len, write_simple,
};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Upper bounds of the histogram buckets, in microseconds; one more bucket holds the
/// rest (+Inf).
pub const BOUNDS_US: [u64; 19] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// A latency histogram: counts per bucket (not cumulative; [`Histogram::cumulative`]
/// sums them) and the sum of every duration.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Cumulative counts per bound (the last is +Inf, so it is the total count), and
    /// the sum in nanoseconds.
    pub fn cumulative(&self) -> ([u64; BOUNDS_US.len() + 1], u64) {
        let mut out = [0u64; BOUNDS_US.len() + 1];
        let mut total = 0u64;
        for (o, b) in out.iter_mut().zip(&self.buckets) {
            total = total.saturating_add(b.load(Ordering::Relaxed));
            *o = total;
        }
        (out, self.sum_ns.load(Ordering::Relaxed))
    }

    pub fn count(&self) -> u64 {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .fold(0, u64::saturating_add)
    }

    /// The bound below which `q` (0..=1) of the durations fall, in microseconds (the
    /// bucket's upper bound: an estimate no finer than the buckets); None when empty.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let (cum, _) = self.cumulative();
        let total = *cum.last()?;
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let i = cum.iter().position(|&c| c >= rank)?;
        Some(BOUNDS_US.get(i).copied().unwrap_or(u64::MAX))
    }

    fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
        self.sum_ns.store(0, Ordering::Relaxed);
    }
}

/// One `SLOWLOG GET` entry.
#[derive(Debug, Clone)]
struct SlowEntry {
    id: u64,
    unix_secs: u64,
    micros: u64,
    /// The command's name and how many arguments followed it. The arguments themselves
    /// are not kept: copying every request's arguments in case it turns out slow would
    /// cost every fast one an allocation.
    name: &'static str,
    argc: usize,
    client_addr: String,
    client_name: String,
}

/// Redis's defaults: log commands slower than 10 ms, keep the last 128.
pub const DEFAULT_SLOWLOG_SLOWER_THAN_US: i64 = 10_000;
pub const DEFAULT_SLOWLOG_MAX_LEN: usize = 128;

/// The server's command metrics and slow log (one per [`Context`]).
#[derive(Debug)]
pub struct Metrics {
    /// One histogram per row of [`COMMANDS`]; its count is the command's calls.
    commands: Vec<Histogram>,
    slow: Mutex<VecDeque<SlowEntry>>,
    next_slow_id: AtomicU64,
    /// `slowlog-log-slower-than` in µs; negative disables the slow log, 0 logs all.
    pub slowlog_slower_than_us: AtomicI64,
    pub slowlog_max_len: AtomicUsize,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            commands: COMMANDS.iter().map(|_| Histogram::default()).collect(),
            slow: Mutex::new(VecDeque::new()),
            next_slow_id: AtomicU64::new(0),
            slowlog_slower_than_us: AtomicI64::new(DEFAULT_SLOWLOG_SLOWER_THAN_US),
            slowlog_max_len: AtomicUsize::new(DEFAULT_SLOWLOG_MAX_LEN),
        }
    }
}

/// The row of `spec` in [`COMMANDS`] (every spec the server sees is one of its rows).
pub fn command_index(spec: &CommandSpec) -> Option<usize> {
    let base = COMMANDS.as_ptr() as usize;
    let at = spec as *const CommandSpec as usize;
    let off = at.checked_sub(base)?;
    let size = std::mem::size_of::<CommandSpec>();
    let i = off / size;
    (off % size == 0 && i < COMMANDS.len()).then_some(i)
}

impl Metrics {
    /// Counts one execution of `spec` that took `d`; `client` names the connection for
    /// the slow log (called only if it was slow).
    pub fn record(
        &self,
        spec: &CommandSpec,
        argc: usize,
        d: Duration,
        client: impl FnOnce() -> (String, String),
    ) {
        let Some(i) = command_index(spec) else {
            return;
        };
        self.commands[i].record(d);
        let threshold = self.slowlog_slower_than_us.load(Ordering::Relaxed);
        if threshold < 0 {
            return;
        }
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if micros < threshold as u64 {
            return;
        }
        let max = self.slowlog_max_len.load(Ordering::Relaxed);
        let (client_addr, client_name) = client();
        let entry = SlowEntry {
            id: self.next_slow_id.fetch_add(1, Ordering::Relaxed),
            unix_secs: crate::store::now_ms() / 1000,
            micros,
            name: COMMANDS[i].name,
            argc: argc.saturating_sub(1),
            client_addr,
            client_name,
        };
        let mut slow = self.slow.lock();
        slow.push_front(entry);
        slow.truncate(max);
    }

    /// The histogram of one command.
    pub fn command(&self, spec: &CommandSpec) -> Option<&Histogram> {
        command_index(spec).map(|i| &self.commands[i])
    }

    /// Commands called at least once, with their histograms, in table order.
    pub fn called(&self) -> impl Iterator<Item = (&'static str, &Histogram)> {
        COMMANDS
            .iter()
            .zip(&self.commands)
            .filter(|(_, h)| h.count() > 0)
            .map(|(c, h)| (c.name, h))
    }

    /// CONFIG RESETSTAT: forgets the command statistics and the slow log.
    pub fn reset(&self) {
        for h in &self.commands {
            h.reset();
        }
        self.slow.lock().clear();
    }
}

/// `SLOWLOG GET [count] | LEN | RESET | HELP`, as Redis answers them. An entry's
/// arguments show as Redis shows arguments it left out: `... (N more arguments)`.
pub fn slowlog_command(ctx: &Context, proto: Proto, args: &[Vec<u8>], out: &mut Vec<u8>) {
    let m = &ctx.metrics;
    let sub = args
        .get(1)
        .map(|a| a.to_ascii_uppercase())
        .unwrap_or_default();
    match (&sub[..], args.len()) {
        (b"LEN", 2) => write_integer(out, m.slow.lock().len() as i64),
        (b"RESET", 2) => {
            m.slow.lock().clear();
            write_simple(out, "OK");
        }
        (b"GET", 2 | 3) => {
            let count = match args.get(2) {
                None => 10,
                Some(a) => match std::str::from_utf8(a)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                {
                    Some(-1) => usize::MAX,
                    Some(n) if n >= 0 => n as usize,
                    _ => {
                        write_error(out, "ERR count should be greater than or equal to -1");
                        return;
                    }
                },
            };
            let entries: Vec<SlowEntry> = m.slow.lock().iter().take(count).cloned().collect();
            write_array_len(out, entries.len());
            for e in entries {
                write_array_len(out, 6);
                write_integer(out, e.id as i64);
                write_integer(out, e.unix_secs as i64);
                write_integer(out, e.micros.min(i64::MAX as u64) as i64);
                if e.argc == 0 {
                    write_array_len(out, 1);
                    write_bulk(out, e.name.as_bytes());
                } else {
                    write_array_len(out, 2);
                    write_bulk(out, e.name.as_bytes());
                    write_bulk(out, format!("... ({} more arguments)", e.argc).as_bytes());
                }
                write_bulk(out, e.client_addr.as_bytes());
                write_bulk(out, e.client_name.as_bytes());
            }
        }
        (b"HELP", 2) => help(
            out,
            &[
                "SLOWLOG <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "GET [<count>]",
                "    Return top <count> entries from the slowlog (default: 10, -1 mean all).",
                "    Entries are made of: id, timestamp, time in microseconds, the command's",
                "    name and argument count, client IP and port, client name.",
                "LEN",
                "    Return the length of the slowlog.",
                "RESET",
                "    Reset the slowlog.",
            ],
        ),
        _ => unknown_subcommand(out, "SLOWLOG", args.get(1)),
    }
    let _ = proto;
}

/// `LATENCY HISTOGRAM [command ...] | HELP`: Redis 7's reply shape, a map of command
/// name to `calls` and `histogram_usec` (bucket upper bound in µs → cumulative count),
/// with our fixed buckets where Redis has powers of two. Redis's latency monitor
/// (LATEST, HISTORY, DOCTOR) is not kept: it is off by default there too.
pub fn latency_command(ctx: &Context, proto: Proto, args: &[Vec<u8>], out: &mut Vec<u8>) {
    let sub = args
        .get(1)
        .map(|a| a.to_ascii_uppercase())
        .unwrap_or_default();
    match &sub[..] {
        b"HISTOGRAM" => {
            let wanted: Vec<(&'static str, &Histogram)> = if args.len() > 2 {
                args[2..]
                    .iter()
                    .filter_map(|n| crate::commands::lookup(n))
                    .filter_map(|spec| Some((spec.name, ctx.metrics.command(spec)?)))
                    .filter(|(_, h)| h.count() > 0)
                    .collect()
            } else {
                ctx.metrics.called().collect()
            };
            write_map_len(out, wanted.len(), proto);
            for (name, h) in wanted {
                let (cum, _) = h.cumulative();
                write_bulk(out, name.as_bytes());
                write_map_len(out, 2, proto);
                write_bulk(out, b"calls");
                write_integer(out, cum[BOUNDS_US.len()] as i64);
                write_bulk(out, b"histogram_usec");
                // Buckets up to the last one that holds anything, as Redis trims its own.
                let last = cum
                    .iter()
                    .position(|&c| c == cum[BOUNDS_US.len()])
                    .unwrap_or(0);
                let shown = (last + 1).min(BOUNDS_US.len());
                let overflow = cum[BOUNDS_US.len()] > cum[BOUNDS_US.len() - 1];
                write_map_len(out, shown + usize::from(overflow), proto);
                for (bound, c) in BOUNDS_US.iter().zip(cum).take(shown) {
                    write_integer(out, *bound as i64);
                    write_integer(out, c as i64);
                }
                if overflow {
                    write_integer(out, i64::MAX);
                    write_integer(out, cum[BOUNDS_US.len()] as i64);
                }
            }
        }
        b"HELP" if args.len() == 2 => help(
            out,
            &[
                "LATENCY <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "HISTOGRAM [COMMAND ...]",
                "    Return a cumulative distribution of latencies in the format of a histogram",
                "    for the specified command names. If no commands are specified then all",
                "    histograms are replied.",
            ],
        ),
        _ => unknown_subcommand(out, "LATENCY", args.get(1)),
    }
}

fn help(out: &mut Vec<u8>, lines: &[&str]) {
    write_array_len(out, lines.len());
    for l in lines {
        write_simple(out, l);
    }
}

fn unknown_subcommand(out: &mut Vec<u8>, cmd: &str, sub: Option<&Vec<u8>>) {
    let sub = sub
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .unwrap_or_default();
    write_error(
        out,
        &format!(
            "ERR unknown subcommand or wrong number of arguments for '{sub:.128}'. Try {cmd} HELP."
        ),
    );
}

/// INFO `commandstats` lines (`cmdstat_get:calls=…,usec=…,usec_per_call=…`).
pub fn commandstats(ctx: &Context) -> Vec<(String, String)> {
    ctx.metrics
        .called()
        .map(|(name, h)| {
            let (cum, sum_ns) = h.cumulative();
            let calls = cum[BOUNDS_US.len()];
            let usec = sum_ns / 1000;
            (
                format!("cmdstat_{name}"),
                format!(
                    "calls={calls},usec={usec},usec_per_call={:.2},rejected_calls=0,failed_calls=0",
                    usec as f64 / calls.max(1) as f64
                ),
            )
        })
        .collect()
}

/// INFO `latencystats` lines (`latency_percentiles_usec_get:p50=…,p99=…,p99.9=…`): the
/// bucket bounds the percentiles fall under.
pub fn latencystats(ctx: &Context) -> Vec<(String, String)> {
    ctx.metrics
        .called()
        .map(|(name, h)| {
            let q = |q| h.quantile_us(q).unwrap_or(0);
            (
                format!("latency_percentiles_usec_{name}"),
                format!(
                    "p50={}.000,p99={}.000,p99.9={}.000",
                    q(0.5),
                    q(0.99),
                    q(0.999)
                ),
            )
        })
        .collect()
}

/// Prometheus text format: `# HELP`, `# TYPE`, then samples.
struct Prom(String);

impl Prom {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.header(name, kind, help);
        let _ = writeln!(self.0, "{name} {value}");
    }

    fn histogram(&mut self, name: &str, labels: &str, h: &Histogram) {
        let (cum, sum_ns) = h.cumulative();
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, c) in BOUNDS_US.iter().zip(cum) {
            let le = *bound as f64 / 1e6;
            let _ = writeln!(self.0, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {c}");
        }
        let total = cum[BOUNDS_US.len()];
        let _ = writeln!(self.0, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(self.0, "{name}_sum{braces} {}", sum_ns as f64 / 1e9);
        let _ = writeln!(self.0, "{name}_count{braces} {total}");
    }
}

/// A label value, escaped as the text format asks (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of `ctx`'s numbers (`GET /metrics`).
pub fn render(ctx: &Context) -> String {
    use crate::cluster::Role;
    let st = &ctx.stats;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut p = Prom(String::with_capacity(16 * 1024));

    p.header(
        "kvstore_build_info",
        "gauge",
        "Version of this kvstore binary (always 1).",
    );
    let _ = writeln!(
        p.0,
        "kvstore_build_info{{version=\"{}\",redis_version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        crate::info::REDIS_VERSION
    );
    p.one(
        "kvstore_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
        ctx.started.elapsed().as_secs(),
    );

    // Commands.
    let called: Vec<_> = ctx.metrics.called().collect();
    p.header(
        "kvstore_commands_total",
        "counter",
        "Commands executed, by name (refused ones included: wrong arguments, redirects).",
    );
    for (name, h) in &called {
        let _ = writeln!(
            p.0,
            "kvstore_commands_total{{cmd=\"{name}\"}} {}",
            h.count()
        );
    }
    p.header(
        "kvstore_command_duration_seconds",
        "histogram",
        "Time to execute a command: a read's execution; a write's from logging to result \
         (fsync and replication included).",
    );
    for (name, h) in &called {
        p.histogram(
            "kvstore_command_duration_seconds",
            &format!("cmd=\"{name}\""),
            h,
        );
    }
    p.one(
        "kvstore_commands_processed_total",
        "counter",
        "Requests received, unknown commands included (INFO total_commands_processed).",
        get(&st.total_commands),
    );

    // Clients, auth, traffic and key space counters: (name, type, help, value).
    let simple: [(&str, &str, &str, u64); 10] = [
        (
            "kvstore_connected_clients",
            "gauge",
            "Client connections open (INFO connected_clients).",
            get(&st.connected_clients),
        ),
        (
            "kvstore_max_clients",
            "gauge",
            "The --max-clients limit in force.",
            ctx.settings.max_clients as u64,
        ),
        (
            "kvstore_cluster_connections",
            "gauge",
            "Inbound links from other nodes (INFO cluster_connections).",
            get(&st.peer_connections),
        ),
        (
            "kvstore_connections_received_total",
            "counter",
            "Connections accepted.",
            get(&st.total_connections),
        ),
        (
            "kvstore_rejected_connections_total",
            "counter",
            "Connections refused over --max-clients.",
            get(&st.rejected_connections),
        ),
        (
            "kvstore_auth_failures_total",
            "counter",
            "Failed authentications: AUTH, HELLO AUTH and HTTP bearer tokens.",
            get(&st.acl_access_denied_auth),
        ),
        (
            "kvstore_net_input_bytes_total",
            "counter",
            "Bytes read from clients.",
            get(&st.net_input_bytes),
        ),
        (
            "kvstore_net_output_bytes_total",
            "counter",
            "Bytes written to clients.",
            get(&st.net_output_bytes),
        ),
        (
            "kvstore_keyspace_hits_total",
            "counter",
            "Reads that found their key.",
            get(&st.keyspace_hits),
        ),
        (
            "kvstore_keyspace_misses_total",
            "counter",
            "Reads that did not find their key.",
            get(&st.keyspace_misses),
        ),
    ];
    for (name, kind, help, value) in simple {
        p.one(name, kind, help, value);
    }
    let (expired, used, per_db) = ctx.store.read_all(|db| {
        let per_db: Vec<(usize, usize, usize)> = db
            .keyspaces()
            .iter()
            .enumerate()
            .filter(|(_, ks)| !ks.is_empty())
            .map(|(i, ks)| (i, ks.len(), ks.expiring()))
            .collect();
        (db.expired_keys(), db.live_bytes(), per_db)
    });
    p.one(
        "kvstore_expired_keys_total",
        "counter",
        "Keys deleted because their time to live ran out.",
        expired,
    );
    p.header(
        "kvstore_keys",
        "gauge",
        "Keys, by database (databases with keys only).",
    );
    for (db, keys, _) in &per_db {
        let _ = writeln!(p.0, "kvstore_keys{{db=\"{db}\"}} {keys}");
    }
    p.header(
        "kvstore_keys_expiring",
        "gauge",
        "Keys with a time to live, by database.",
    );
    for (db, _, expiring) in &per_db {
        let _ = writeln!(p.0, "kvstore_keys_expiring{{db=\"{db}\"}} {expiring}");
    }
    p.one(
        "kvstore_memory_used_bytes",
        "gauge",
        "Bytes of keys and values held (INFO used_memory).",
        used,
    );

    // The log.
    let l = ctx.store.log_info();
    p.one(
        "kvstore_log_bytes",
        "gauge",
        "Bytes of log on disk (snapshots excluded).",
        l.log_bytes,
    );
    p.one(
        "kvstore_log_last_index",
        "gauge",
        "Index of the last entry in the log.",
        l.last_index,
    );
    p.one(
        "kvstore_log_fsyncs_total",
        "counter",
        "fsyncs of the log.",
        l.fsyncs,
    );
    p.header(
        "kvstore_log_fsync_duration_seconds",
        "histogram",
        "Time to make the log durable: under --fsync always a batch's write and fsync, \
         otherwise the fsync alone.",
    );
    p.histogram(
        "kvstore_log_fsync_duration_seconds",
        "",
        ctx.store.fsync_histogram(),
    );
    p.one(
        "kvstore_log_compactions_total",
        "counter",
        "Snapshots taken to compact the log.",
        l.compactions,
    );
    p.one(
        "kvstore_log_write_ok",
        "gauge",
        "1 while the log takes writes, 0 after a write or fsync failed (the node then \
         refuses writes until restarted).",
        u8::from(l.write_error.is_none()),
    );

    // The cluster.
    let cluster = ctx.cluster().map(|c| c.info());
    let (role, epoch, leader, commit, serving) = match &cluster {
        None => ("leader", 0, ctx.settings.node_id, l.last_index, true),
        Some(i) => (
            match i.role {
                Role::Leader => "leader",
                Role::Follower => "follower",
                Role::Candidate => "candidate",
            },
            i.epoch,
            i.leader.unwrap_or(0),
            i.commit,
            i.lease_until.is_some_and(|t| std::time::Instant::now() < t),
        ),
    };
    p.header(
        "kvstore_role",
        "gauge",
        "This node's role: 1 on the line of its current role.",
    );
    for r in ["leader", "follower", "candidate"] {
        let _ = writeln!(p.0, "kvstore_role{{role=\"{r}\"}} {}", u8::from(r == role));
    }
    p.one(
        "kvstore_node_id",
        "gauge",
        "This node's id (its Bully priority).",
        ctx.settings.node_id,
    );
    p.one(
        "kvstore_epoch",
        "gauge",
        "The epoch this node is in.",
        epoch,
    );
    p.one(
        "kvstore_leader_id",
        "gauge",
        "The leader's id as this node knows it (0: none known).",
        leader,
    );
    p.one(
        "kvstore_serving",
        "gauge",
        "1 when this node leads and its lease holds (it serves reads and writes).",
        u8::from(serving),
    );
    p.one(
        "kvstore_commit_index",
        "gauge",
        "The highest log index known committed.",
        commit,
    );
    let (started, won) = ctx.cluster().map_or((0, 0), |c| c.elections());
    p.one(
        "kvstore_elections_started_total",
        "counter",
        "Elections this node started (a follower that stopped hearing a leader).",
        started,
    );
    p.one(
        "kvstore_elections_won_total",
        "counter",
        "Times this node became leader.",
        won,
    );
    p.header(
        "kvstore_follower_lag_entries",
        "gauge",
        "On the leader: log entries each follower is behind.",
    );
    let followers = cluster
        .as_ref()
        .map(|i| i.followers.clone())
        .unwrap_or_default();
    for f in &followers {
        let _ = writeln!(
            p.0,
            "kvstore_follower_lag_entries{{follower=\"{}\",addr=\"{}\"}} {}",
            f.id,
            label(&f.addr),
            f.lag
        );
    }
    p.header(
        "kvstore_follower_acked_index",
        "gauge",
        "On the leader: the log index each follower has on disk.",
    );
    for f in &followers {
        let _ = writeln!(
            p.0,
            "kvstore_follower_acked_index{{follower=\"{}\",addr=\"{}\"}} {}",
            f.id,
            label(&f.addr),
            f.acked
        );
    }
    p.header(
        "kvstore_follower_connected",
        "gauge",
        "On the leader: 1 when the link to each follower is up.",
    );
    for f in &followers {
        let _ = writeln!(
            p.0,
            "kvstore_follower_connected{{follower=\"{}\",addr=\"{}\"}} {}",
            f.id,
            label(&f.addr),
            u8::from(f.connected)
        );
    }
    p.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_bucket_by_upper_bound_and_accumulate() {
        let h = Histogram::default();
        h.record(Duration::from_micros(10)); // on a bound: that bucket
        h.record(Duration::from_micros(11));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60)); // past the last bound: +Inf
        let (cum, sum) = h.cumulative();
        assert_eq!(cum[0], 1);
        assert_eq!(cum[1], 2);
        // 2.5 ms < 3 ms <= 5 ms: the bucket bounded by 5 ms (index 8).
        assert_eq!(cum[7], 2);
        assert_eq!(cum[8], 3);
        assert_eq!(cum[BOUNDS_US.len() - 1], 3);
        assert_eq!(cum[BOUNDS_US.len()], 4);
        assert_eq!(h.count(), 4);
        assert_eq!(sum, 10_000 + 11_000 + 3_000_000 + 60_000_000_000);
        assert_eq!(h.quantile_us(0.5), Some(25));
        assert_eq!(h.quantile_us(0.75), Some(5_000));
        assert_eq!(h.quantile_us(1.0), Some(u64::MAX));
        assert_eq!(Histogram::default().quantile_us(0.5), None);
    }

    #[test]
    fn every_command_has_its_row() {
        for (i, c) in COMMANDS.iter().enumerate() {
            assert_eq!(command_index(c), Some(i));
        }
        let stray = COMMANDS[0];
        assert_eq!(command_index(&stray), None);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label("a\nb"), "a\\nb");
    }

    /// Every line of the exposition is a comment or `name{labels} value` with a family
    /// declared before it, and each histogram's buckets only grow, ending at its count.
    #[test]
    fn render_is_valid_prometheus_text() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::open(dir.path(), crate::store::Options::default()).unwrap();
        store.set(b"k", b"v").unwrap();
        let ctx = Context::new(store, crate::commands::Settings::default());
        let get = crate::commands::lookup(b"get").unwrap();
        ctx.metrics
            .record(get, 2, Duration::from_micros(40), Default::default);
        ctx.metrics
            .record(get, 2, Duration::from_millis(30), Default::default);
        let text = render(&ctx);
        check_exposition(&text);
        assert!(
            text.contains("kvstore_commands_total{cmd=\"get\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "kvstore_command_duration_seconds_bucket{cmd=\"get\",le=\"0.00005\"} 1\n"
            )
        );
        assert!(text.contains("kvstore_command_duration_seconds_count{cmd=\"get\"} 2\n"));
        assert!(text.contains("kvstore_keys{db=\"0\"} 1\n"), "{text}");
        assert!(text.contains("kvstore_role{role=\"leader\"} 1\n"));
        assert!(text.contains("kvstore_serving 1\n"));
        // The 30 ms GET is in the slow log (over 10 ms), the 40 µs one is not.
        let mut out = Vec::new();
        slowlog_command(
            &ctx,
            Proto::Resp2,
            &[b"SLOWLOG".to_vec(), b"LEN".to_vec()],
            &mut out,
        );
        assert_eq!(out, b":1\r\n");
    }

    /// Checks the text format's rules that a scraper enforces.
    pub(crate) fn check_exposition(text: &str) {
        use std::collections::{HashMap, HashSet};
        let mut declared: HashMap<String, String> = HashMap::new();
        let mut helped: HashSet<String> = HashSet::new();
        let mut last_bucket: HashMap<String, f64> = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(helped.insert(name.to_string()), "HELP twice for {name}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut w = rest.split(' ');
                let (name, kind) = (w.next().unwrap(), w.next().unwrap());
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(
                    declared.insert(name.into(), kind.into()).is_none(),
                    "{line}"
                );
                continue;
            }
            assert!(!line.starts_with('#'), "stray comment: {line}");
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(
                value == "+Inf" || value.parse::<f64>().is_ok(),
                "value: {line}"
            );
            let name = series.split('{').next().unwrap();
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "name: {line}"
            );
            if let Some(labels) = series.strip_prefix(name)
                && !labels.is_empty()
            {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            }
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suf| {
                    name.strip_suffix(suf)
                        .filter(|f| declared.get(*f).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(name);
            assert!(declared.contains_key(family), "undeclared: {line}");
            if name.ends_with("_bucket") {
                let key = series
                    .split(",le=")
                    .next()
                    .unwrap()
                    .split("{le=")
                    .next()
                    .unwrap();
                let v: f64 = value.parse().unwrap();
                let prev = last_bucket.insert(key.to_string(), v).unwrap_or(0.0);
                assert!(v >= prev, "buckets must grow: {line}");
            }
        }
    }
}
