//! INFO: the server's state as Redis-style `field:value` lines grouped in `# Section`s.
//!
//! Field names are Redis's wherever Redis has the field (clients and monitoring tools
//! parse them: `role`, `connected_clients`, `aof_last_write_status`, `db0:keys=…`); fields
//! only kvstore has are prefixed `log_` or named as DESIGN.md says (`epoch`, `node_id`).
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
];

/// Renders the requested sections (`default`, `all`, `everything` or names).
pub fn render(ctx: &Context, args: &[Vec<u8>]) -> String {
    let wanted: Vec<String> = args
        .iter()
        .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
        .collect();
    let all = wanted.is_empty()
        || wanted
            .iter()
            .any(|w| matches!(w.as_str(), "all" | "everything" | "default"));
    let mut out = String::new();
    for section in SECTIONS {
        if !all && !wanted.iter().any(|w| w == section) {
            continue;
        }
        if !out.is_empty() {
            out.push_str("\r\n");
        }
        let _ = writeln!(out, "# {}\r", capitalise(section));
        if *section == "keyspace" {
            for (k, v) in keyspace(ctx) {
                let _ = write!(out, "{k}:{v}\r\n");
            }
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
        "replication" => {
            let last = ctx.store.log_info().last_index;
            vec![
                ("role", "master".into()),
                ("connected_slaves", "0".into()),
                ("master_repl_offset", last.to_string()),
                ("epoch", "0".into()),
                ("node_id", ctx.settings.node_id.to_string()),
                ("leader_id", ctx.settings.node_id.to_string()),
            ]
        }
        _ => vec![],
    }
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
