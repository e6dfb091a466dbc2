//! The command table: every command the server knows, with Redis's arity and key positions.
//!
//! One table serves `COMMAND` (COUNT, INFO, DOCS, LIST), the client's completion and hints,
//! and the README's command list, so the three cannot disagree.

/// One row of the command table.
#[derive(Debug, Clone, Copy)]
pub struct CommandSpec {
    /// Lower-case name, as `COMMAND` reports it.
    pub name: &'static str,
    /// Redis arity: positive = exact argument count (name included), negative = at least.
    pub arity: i32,
    /// Redis command flags (`write`, `readonly`, `fast`, …).
    pub flags: &'static [&'static str],
    pub first_key: i32,
    pub last_key: i32,
    pub step: i32,
    /// Argument synopsis shown as a hint in the client, e.g. `key value [NX|XX] [EX seconds]`.
    pub args: &'static str,
    /// One-line description.
    pub summary: &'static str,
}

const W: &[&str] = &["write", "denyoom"];
const WF: &[&str] = &["write", "denyoom", "fast"];
const WD: &[&str] = &["write", "fast"];
const R: &[&str] = &["readonly"];
const RF: &[&str] = &["readonly", "fast"];
const F: &[&str] = &["fast"];
const NS: &[&str] = &["noscript", "loading", "stale", "fast"];
const AUTHF: &[&str] = &["noscript", "loading", "stale", "fast", "no_auth", "allow_busy"];

macro_rules! cmd {
    ($name:expr, $arity:expr, $flags:expr, $fk:expr, $lk:expr, $st:expr, $args:expr, $sum:expr) => {
        CommandSpec {
            name: $name,
            arity: $arity,
            flags: $flags,
            first_key: $fk,
            last_key: $lk,
            step: $st,
            args: $args,
            summary: $sum,
        }
    };
}

/// Every command, sorted by name.
pub static COMMANDS: &[CommandSpec] = &[
    cmd!("auth", -2, AUTHF, 0, 0, 0, "[username] password", "Authenticates the connection."),
    cmd!("client", -2, NS, 0, 0, 0, "ID|GETNAME|SETNAME name|INFO|LIST|SETINFO …", "Connection introspection and naming."),
    cmd!("command", -1, NS, 0, 0, 0, "[COUNT|DOCS|INFO|LIST [name …]]", "Describes the commands this server knows."),
    cmd!("config", -2, NS, 0, 0, 0, "GET parameter [parameter …]|SET|RESETSTAT", "Reads server settings."),
    cmd!("dbsize", 1, RF, 0, 0, 0, "", "Returns the number of keys."),
    cmd!("decr", 2, WF, 1, 1, 1, "key", "Decrements the integer value of a key by one."),
    cmd!("decrby", 3, WF, 1, 1, 1, "key decrement", "Decrements the integer value of a key by a number."),
    cmd!("del", -2, W, 1, -1, 1, "key [key …]", "Deletes keys; returns how many existed."),
    cmd!("echo", 2, F, 0, 0, 0, "message", "Returns the message."),
    cmd!("exists", -2, RF, 1, -1, 1, "key [key …]", "Counts how many of the keys exist."),
    cmd!("get", 2, RF, 1, 1, 1, "key", "Returns the value of a key, or nil."),
    cmd!("hello", -1, AUTHF, 0, 0, 0, "[protover [AUTH username password] [SETNAME name]]", "Handshakes with the server."),
    cmd!("incr", 2, WF, 1, 1, 1, "key", "Increments the integer value of a key by one."),
    cmd!("incrby", 3, WF, 1, 1, 1, "key increment", "Increments the integer value of a key by a number."),
    cmd!("info", -1, NS, 0, 0, 0, "[section …]", "Returns server information and statistics."),
    cmd!("keys", 2, R, 0, 0, 0, "pattern", "Returns all keys matching a glob pattern."),
    cmd!("mget", -2, RF, 1, -1, 1, "key [key …]", "Returns the values of several keys."),
    cmd!("mset", -3, W, 1, -1, 2, "key value [key value …]", "Sets several keys at once (atomically)."),
    cmd!("ping", -1, F, 0, 0, 0, "[message]", "Returns PONG, or the message."),
    cmd!("quit", -1, AUTHF, 0, 0, 0, "", "Closes the connection."),
    cmd!("readonly", 1, F, 0, 0, 0, "", "Allows reads from a follower on this connection."),
    cmd!("readwrite", 1, F, 0, 0, 0, "", "Ends READONLY on this connection."),
    cmd!("scan", -2, R, 0, 0, 0, "cursor [MATCH pattern] [COUNT count] [TYPE type]", "Iterates over the keys."),
    cmd!("select", 2, NS, 0, 0, 0, "index", "Selects a database (only 0 exists)."),
    cmd!("set", -3, W, 1, 1, 1, "key value [NX|XX] [GET] [EX seconds|PX milliseconds|EXAT unix-time-seconds|PXAT unix-time-milliseconds|KEEPTTL]", "Sets the value of a key."),
    cmd!("strlen", 2, RF, 1, 1, 1, "key", "Returns the length of a value."),
    cmd!("time", 1, F, 0, 0, 0, "", "Returns the server time."),
    cmd!("type", 2, RF, 1, 1, 1, "key", "Returns the type of a key."),
    cmd!("unlink", -2, WD, 1, -1, 1, "key [key …]", "Deletes keys (same as DEL here)."),
    cmd!("wait", 3, NS, 0, 0, 0, "numreplicas timeout", "Waits until writes reach this many replicas."),
];

/// Looks a command up by name, case-insensitively.
pub fn lookup(name: &[u8]) -> Option<&'static CommandSpec> {
    COMMANDS.iter().find(|c| c.name.as_bytes().eq_ignore_ascii_case(name))
}

/// True if `argc` (name included) satisfies the command's arity.
pub fn arity_ok(spec: &CommandSpec, argc: usize) -> bool {
    let a = spec.arity;
    if a >= 0 {
        argc == a as usize
    } else {
        argc >= (-a) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_unique() {
        for w in COMMANDS.windows(2) {
            assert!(w[0].name < w[1].name, "{} before {}", w[0].name, w[1].name);
        }
    }

    #[test]
    fn lookup_ignores_case() {
        assert_eq!(lookup(b"GeT").map(|c| c.name), Some("get"));
        assert!(lookup(b"nosuch").is_none());
    }
}
