//! INFO: the server's state as Redis-style `field:value` lines grouped in `# Section`s.
//!
//! Field names are Redis's wherever Redis has the field (clients and monitoring tools
//! parse them: `role`, `connected_clients`, `aof_last_write_status`, `db0:keys=…`); fields
//! only kvstore has are prefixed `log_` or named as DESIGN.md says (`epoch`, `node_id`).
//! The replication section of a cluster member renders one published
//! [`RoleInfo`](crate::cluster::RoleInfo) (see `replication`).
//! Pure formatting over a [`Context`]: it reads counters and the store, changes nothing.

use crate::commands::Context;
use std::fmt::Write;
use std::sync::atomic::Ordering;

/// The Redis version we report (HELLO, INFO): clients gate features on it, and the
/// commands we implement behave as Redis 7.2's do.
pub const REDIS_VERSION: &str = "7.2.0";

const SECTIONS: &[&str] = &[
    "server",
    "clients",
    "memory",
    "persistence",
    "stats",
    "replication",
    "keyspace",
    "commandstats",
    "latencystats",
];

/// Sections `INFO` and `INFO default` leave out, as Redis does (one line per command).
const NOT_DEFAULT: &[&str] = &["commandstats", "latencystats"];

/// Renders the requested sections (`default`, `all`, `everything` or names).
pub fn render(ctx: &Context, args: &[Vec<u8>]) -> String {
    let wanted: Vec<String> = args
        .iter()
        .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
        .collect();
    let all = wanted
        .iter()
        .any(|w| matches!(w.as_str(), "all" | "everything"));
    let default = wanted.is_empty() || wanted.iter().any(|w| w == "default");
    let mut out = String::new();
    for section in SECTIONS {
        let named = wanted.iter().any(|w| w == section);
        if !(all || named || default && !NOT_DEFAULT.contains(section)) {
            continue;
        }
        if !out.is_empty() {
            out.push_str("\r\n");
        }
        let _ = writeln!(out, "# {}\r", capitalise(section));
        let lines = match *section {
            "keyspace" => keyspace(ctx),
            "commandstats" => crate::metrics::commandstats(ctx),
            "latencystats" => crate::metrics::latencystats(ctx),
            _ => Vec::new(),
        };
        for (k, v) in lines {
            let _ = write!(out, "{k}:{v}\r\n");
        }
        for (k, v) in fields(ctx, section) {
            let _ = write!(out, "{k}:{v}\r\n");
        }
    }
    out
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}

fn rss_bytes() -> u64 {
    // /proc/self/statm: size resident shared … in pages.
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2}G", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.2}M", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.2}K", b / 1024.0)
    } else {
        format!("{bytes}B")
    }
}

fn fields(ctx: &Context, section: &str) -> Vec<(&'static str, String)> {
    let st = &ctx.stats;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed).to_string();
    match section {
        "server" => {
            let up = ctx.started.elapsed().as_secs();
            vec![
                ("redis_version", REDIS_VERSION.into()),
                ("kvstore_version", env!("CARGO_PKG_VERSION").into()),
                ("redis_mode", "standalone".into()),
                ("os", std::env::consts::OS.into()),
                ("arch_bits", (usize::BITS).to_string()),
                ("multiplexing_api", "threads".into()),
                ("process_id", std::process::id().to_string()),
                ("tcp_port", ctx.settings.port.to_string()),
                // The HTTP listener's port (`--http-port`), 0 without one.
                ("http_port", ctx.settings.http_port.to_string()),
                ("uptime_in_seconds", up.to_string()),
                ("uptime_in_days", (up / 86400).to_string()),
                (
                    "executable",
                    std::env::current_exe()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                ),
            ]
        }
        "clients" => vec![
            ("connected_clients", get(&st.connected_clients)),
            ("maxclients", ctx.settings.max_clients.to_string()),
            ("cluster_connections", get(&st.peer_connections)),
            ("blocked_clients", "0".into()),
        ],
        "memory" => {
            let used = ctx.store.read_all(|db| db.live_bytes());
            let rss = rss_bytes();
            vec![
                ("used_memory", used.to_string()),
                ("used_memory_human", human(used)),
                ("used_memory_rss", rss.to_string()),
                ("used_memory_rss_human", human(rss)),
                ("maxmemory", "0".into()),
                ("maxmemory_policy", "noeviction".into()),
            ]
        }
        "persistence" => {
            let l = ctx.store.log_info();
            vec![
                ("loading", "0".into()),
                // The last snapshot (LASTSAVE): what tools read to see a save happened.
                (
                    "rdb_last_save_time",
                    crate::admin::last_save(ctx).to_string(),
                ),
                ("aof_enabled", "1".into()),
                (
                    "aof_rewrite_in_progress",
                    u8::from(l.compacting).to_string(),
                ),
                (
                    "aof_last_write_status",
                    if l.write_error.is_some() { "err" } else { "ok" }.into(),
                ),
                ("log_fsync", l.fsync.to_string()),
                ("log_last_index", l.last_index.to_string()),
                ("log_bytes", l.log_bytes.to_string()),
                ("log_fsyncs", l.fsyncs.to_string()),
                (
                    "log_fsync_usec",
                    (ctx.store.fsync_histogram().cumulative().1 / 1000).to_string(),
                ),
                (
                    "log_fsync_p99_usec",
                    ctx.store
                        .fsync_histogram()
                        .quantile_us(0.99)
                        .unwrap_or(0)
                        .to_string(),
                ),
                ("log_compactions", l.compactions.to_string()),
                (
                    "log_recovered_entries",
                    l.recovery.entries_replayed.to_string(),
                ),
                (
                    "log_recovered_snapshot_index",
                    l.recovery.snapshot_index.unwrap_or(0).to_string(),
                ),
                (
                    "log_torn_tail_repaired",
                    u8::from(l.recovery.torn_tail.is_some()).to_string(),
                ),
            ]
        }
        "stats" => vec![
            ("total_connections_received", get(&st.total_connections)),
            ("total_commands_processed", get(&st.total_commands)),
            ("total_net_input_bytes", get(&st.net_input_bytes)),
            ("total_net_output_bytes", get(&st.net_output_bytes)),
            ("rejected_connections", get(&st.rejected_connections)),
            (
                "expired_keys",
                ctx.store.read_all(|db| db.expired_keys()).to_string(),
            ),
            ("evicted_keys", "0".into()),
            ("keyspace_hits", get(&st.keyspace_hits)),
            ("keyspace_misses", get(&st.keyspace_misses)),
            (
                "client_query_buffer_limit_disconnections",
                get(&st.client_qbuf_limit_disconnections),
            ),
            ("acl_access_denied_auth", get(&st.acl_access_denied_auth)),
        ],
        "replication" => replication(ctx),
        _ => vec![],
    }
}

/// `host:port` split for Redis's `ip`/`port` fields (`[::1]:7001` → `::1`, 7001); a
/// malformed address is shown whole with port 0.
pub(crate) fn split_addr(addr: &str) -> (String, u16) {
    match addr.rsplit_once(':') {
        Some((host, port)) => match port.parse() {
            Ok(port) => (host.trim_matches(['[', ']']).to_string(), port),
            Err(_) => (addr.to_string(), 0),
        },
        None => (addr.to_string(), 0),
    }
}

/// The replication section. A cluster of one is a master with no replicas that leads
/// itself. A cluster member shows what its node last published (one [`RoleInfo`]
/// read, so role and epoch agree), with Redis's fields:
/// - `role:master` on the leader (also while its lease is lapsed or it hands over: it
///   is still the leader of its epoch), `role:slave` otherwise (a candidate too;
///   `node_role` says which: leader, follower or candidate);
/// - on the leader, `connected_slaves` (followers whose link is up) and one `slaveK`
///   per follower: `ip`, `port` (its client address), `state=online` when its link is
///   up, `wait_bgsave` when down (it needs a catch-up before it streams again; Redis
///   forgets such a replica, we keep showing its acknowledged index), `offset` = the
///   log index it has acknowledged, and `lag` = entries behind our last index (Redis's
///   `lag` is seconds since the last acknowledgement; entries say how much a failover
///   to it would have to replay);
/// - on a follower, `master_host` and `master_port` (the leader's client address, when
///   one is known) and `master_link_status:up|down`;
/// - ours: `epoch`, `leader_id` (0 when none), `node_id`, `commit_index`, `last_index`.
///
/// [`RoleInfo`]: crate::cluster::RoleInfo
fn replication(ctx: &Context) -> Vec<(&'static str, String)> {
    use crate::cluster::Role;
    let Some(cluster) = ctx.cluster() else {
        let last = ctx.store.log_info().last_index;
        let me = ctx.settings.node_id.to_string();
        return vec![
            ("role", "master".into()),
            ("connected_slaves", "0".into()),
            ("master_repl_offset", last.to_string()),
            ("epoch", "0".into()),
            ("node_id", me.clone()),
            ("leader_id", me),
            ("node_role", "leader".into()),
            ("commit_index", last.to_string()),
            ("last_index", last.to_string()),
        ];
    };
    let info = cluster.info();
    let mut f: Vec<(&'static str, String)> = Vec::new();
    if info.role == Role::Leader {
        f.push(("role", "master".into()));
        let connected = info.followers.iter().filter(|x| x.connected).count();
        f.push(("connected_slaves", connected.to_string()));
        for (k, fl) in info.followers.iter().enumerate() {
            let (ip, port) = split_addr(&fl.addr);
            let state = if fl.connected {
                "online"
            } else {
                "wait_bgsave"
            };
            f.push((
                slave_field(k),
                format!(
                    "ip={ip},port={port},state={state},offset={},lag={}",
                    fl.acked, fl.lag
                ),
            ));
        }
    } else {
        f.push(("role", "slave".into()));
        if let Some(addr) = &info.leader_addr {
            let (host, port) = split_addr(addr);
            f.push(("master_host", host));
            f.push(("master_port", port.to_string()));
        }
        let up = info.leader.is_some() && info.leader_link_up;
        f.push(("master_link_status", if up { "up" } else { "down" }.into()));
        f.push(("master_sync_in_progress", "0".into()));
        f.push(("slave_repl_offset", info.commit.to_string()));
        f.push(("slave_read_only", "1".into()));
        f.push(("connected_slaves", "0".into()));
    }
    f.push(("master_repl_offset", info.last_index.to_string()));
    f.push(("epoch", info.epoch.to_string()));
    f.push(("node_id", info.node_id.to_string()));
    f.push(("leader_id", info.leader.unwrap_or(0).to_string()));
    let node_role = match info.role {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
    };
    f.push(("node_role", node_role.into()));
    f.push(("commit_index", info.commit.to_string()));
    f.push(("last_index", info.last_index.to_string()));
    let (started, won) = cluster.elections();
    f.push(("elections_started", started.to_string()));
    f.push(("elections_won", won.to_string()));
    f
}

/// `slaveK` as a `&'static str` (INFO's field names are static): the first 64 are
/// made once; followers past those (a cluster far bigger than Bully is meant for)
/// would all show as `slave_more`.
fn slave_field(k: usize) -> &'static str {
    static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| (0..64).map(|i| format!("slave{i}")).collect());
    names.get(k).map_or("slave_more", |n| n.as_str())
}

/// The keyspace section: one line per database that has keys, as Redis
/// (`dbN:keys=…,expires=…,avg_ttl=…`; avg_ttl in ms, Redis's a sampled estimate, ours
/// exact).
fn keyspace(ctx: &Context) -> Vec<(String, String)> {
    let now = ctx.store.now_ms();
    ctx.store.read_all(|db| {
        db.keyspaces()
            .iter()
            .enumerate()
            .filter(|(_, ks)| !ks.is_empty())
            .map(|(i, ks)| {
                let (keys, expires, ttl) = (ks.len(), ks.expiring(), ks.avg_ttl(now));
                (
                    format!("db{i}"),
                    format!("keys={keys},expires={expires},avg_ttl={ttl}"),
                )
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::split_addr;

    #[test]
    fn addresses_split_into_redis_ip_and_port() {
        assert_eq!(split_addr("127.0.0.1:7001"), ("127.0.0.1".into(), 7001));
        assert_eq!(split_addr("[::1]:7002"), ("::1".into(), 7002));
        assert_eq!(
            split_addr("node-3.example:7003"),
            ("node-3.example".into(), 7003)
        );
        assert_eq!(split_addr("nonsense"), ("nonsense".into(), 0));
        assert_eq!(split_addr("host:notaport"), ("host:notaport".into(), 0));
    }
}
