//! Cluster configuration: who the members are, how they prove they belong, and the
//! timers and replication mode the node runs with.
//!
//! Data enters as the server's command-line values ([`ClusterArgs`], filled by
//! `main.rs` from flags and their `KVSTORE_…` variables) and leaves as one checked
//! [`ClusterConfig`]. Everything a running cluster would trip over later is refused
//! here, before anything is opened: two members with one id, a peer with our own id, id
//! 0, both `--cluster-secret` and `--cluster-secret-file`, a lease that is not shorter
//! than the failure timeout. Parsing is pure (the secret file is read through a closure),
//! so every refusal has a unit test.
//!
//! Ids. A node's id is its Bully priority and the name the others know it by (a link is
//! known by the id it proves, never by its address). The default is the client port: a
//! cluster on one machine has distinct ports, so it needs no ids at all. A peer given as
//! `host:port` gets the default id of that port; `ID@host:port` overrides it, which a
//! cluster behind a proxy or NAT needs (the port a node is reached at is then not the
//! port it listens on, so not its default id).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// One other member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The id it must prove in the handshake.
    pub id: u64,
    /// `host:port` of its client port, as given; resolved each time it is dialed (so a
    /// DNS name that moves is followed).
    pub addr: String,
}

/// When a write is acknowledged (`--replication`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Replication {
    /// After the leader's own log has it (as `--fsync` asks): a failover may lose the
    /// last acknowledged writes.
    Async,
    /// After a majority of the cluster, the leader included, has it on disk.
    #[default]
    Quorum,
    /// After every member has it on disk.
    All,
}

impl FromStr for Replication {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "async" => Ok(Replication::Async),
            "quorum" => Ok(Replication::Quorum),
            "all" => Ok(Replication::All),
            _ => Err(format!(
                "unknown replication mode '{s}' (expected async, quorum or all)"
            )),
        }
    }
}

impl fmt::Display for Replication {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Replication::Async => "async",
            Replication::Quorum => "quorum",
            Replication::All => "all",
        })
    }
}

/// Default `--heartbeat-ms`.
pub const DEFAULT_HEARTBEAT_MS: u64 = 100;
/// Default `--failure-timeout-ms`.
pub const DEFAULT_FAILURE_TIMEOUT_MS: u64 = 400;
/// Default `--lease-ms`.
pub const DEFAULT_LEASE_MS: u64 = 300;
/// A secret file longer than this is refused (it is a password, not a document; and
/// the file is read whole).
pub const MAX_SECRET_LEN: usize = 4096;

/// The checked cluster configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's id (Bully priority). Never 0, except for a cluster of one on port 0,
    /// whose id is the port the OS gives it (the server fills it in).
    pub id: u64,
    /// The other members; empty for a cluster of one.
    pub peers: Vec<Peer>,
    /// The shared cluster secret (HMAC key of the peer handshake); empty when none was
    /// given, which `main.rs` warns about when there are peers.
    pub secret: Vec<u8>,
    pub replication: Replication,
    /// How often the leader sends HEARTBEAT (and an idle peer link a keepalive).
    pub heartbeat: Duration,
    /// A follower that hears no leader for this long starts an election.
    pub failure_timeout: Duration,
    /// A leader that has not heard a majority for this long stops serving. Shorter than
    /// `failure_timeout`, so it stops before the others may elect someone else.
    pub lease: Duration,
}

// By hand, so that `{:?}` never prints the secret.
impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("id", &self.id)
            .field("peers", &self.peers)
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("replication", &self.replication)
            .field("heartbeat", &self.heartbeat)
            .field("failure_timeout", &self.failure_timeout)
            .field("lease", &self.lease)
            .finish()
    }
}

impl ClusterConfig {
    /// A cluster of one with the default timers (tests, the embedded store).
    pub fn single(id: u64) -> ClusterConfig {
        ClusterConfig {
            id,
            peers: Vec::new(),
            secret: Vec::new(),
            replication: Replication::default(),
            heartbeat: Duration::from_millis(DEFAULT_HEARTBEAT_MS),
            failure_timeout: Duration::from_millis(DEFAULT_FAILURE_TIMEOUT_MS),
            lease: Duration::from_millis(DEFAULT_LEASE_MS),
        }
    }

    /// The number of members, this node included.
    pub fn size(&self) -> usize {
        self.peers.len() + 1
    }

    /// The peer with this id.
    pub fn peer(&self, id: u64) -> Option<&Peer> {
        self.peers.iter().find(|p| p.id == id)
    }

    /// Checks and assembles the configuration. `read_file` reads the secret file (the
    /// binary passes `std::fs::read`; tests pass a closure).
    pub fn from_args(
        a: &ClusterArgs,
        read_file: impl FnOnce(&Path) -> std::io::Result<Vec<u8>>,
    ) -> Result<ClusterConfig, ConfigError> {
        let mut peers = match &a.peers {
            Some(s) => parse_peers(s)?,
            None => Vec::new(),
        };
        let id = match (a.id, a.port) {
            (Some(0), _) => return Err(ConfigError::ZeroId),
            (Some(id), _) => id,
            // Port 0: the OS picks one at bind. A cluster of one may (its id is then the
            // port it got, filled in by the server); a member of a cluster may not, as
            // its peers must know its id in advance.
            (None, 0) if !peers.is_empty() => return Err(ConfigError::EphemeralPort),
            (None, port) => u64::from(port),
        };
        if a.id.is_some()
            && let Some(list) = &a.peers
        {
            // This node's id is not its port, so a peer given as plain host:port need
            // not have its port as id either: it is learned at start (`peer::learn_ids`),
            // and proved in every handshake after.
            let plain = list.split(',').map(str::trim).filter(|e| !e.is_empty());
            for (p, entry) in peers.iter_mut().zip(plain) {
                if !entry.contains('@') {
                    p.id = UNKNOWN_ID;
                }
            }
        }
        for (i, p) in peers.iter().enumerate() {
            if p.id == UNKNOWN_ID {
                if peers[..i].iter().any(|q| q.addr == p.addr) {
                    return Err(ConfigError::DuplicateAddr(p.addr.clone()));
                }
                continue;
            }
            if p.id == id {
                return Err(ConfigError::OwnId {
                    peer: p.addr.clone(),
                    id,
                });
            }
            if let Some(q) = peers[..i].iter().find(|q| q.id == p.id) {
                return Err(ConfigError::DuplicateId {
                    id: p.id,
                    first: q.addr.clone(),
                    second: p.addr.clone(),
                });
            }
            if peers[..i].iter().any(|q| q.addr == p.addr) {
                return Err(ConfigError::DuplicateAddr(p.addr.clone()));
            }
        }
        // An empty value (say KVSTORE_CLUSTER_SECRET= in an env file) means "not given",
        // as for --requirepass.
        let secret = a.secret.as_ref().filter(|s| !s.is_empty());
        let secret = match (secret, &a.secret_file) {
            (Some(_), Some(_)) => return Err(ConfigError::TwoSecrets),
            (Some(s), None) => s.as_bytes().to_vec(),
            (None, Some(path)) => {
                read_secret_file(path, read_file).map_err(|why| ConfigError::SecretFile {
                    path: path.clone(),
                    why,
                })?
            }
            (None, None) => Vec::new(),
        };
        let ms = Duration::from_millis;
        let (heartbeat, failure_timeout, lease) =
            (ms(a.heartbeat_ms), ms(a.failure_timeout_ms), ms(a.lease_ms));
        if heartbeat.is_zero() {
            return Err(ConfigError::Timers(
                "--heartbeat-ms must be at least 1".into(),
            ));
        }
        // The lease must run out before the others may give up on the leader, or a
        // deposed leader could still serve while a new one does (DESIGN.md, rule 6).
        if lease >= failure_timeout {
            return Err(ConfigError::Timers(format!(
                "--lease-ms ({}) must be shorter than --failure-timeout-ms ({})",
                a.lease_ms, a.failure_timeout_ms
            )));
        }
        // A lease is renewed by heartbeat acknowledgements: one no longer than the
        // heartbeat would lapse between two of them even on a healthy cluster.
        if lease <= heartbeat {
            return Err(ConfigError::Timers(format!(
                "--lease-ms ({}) must be longer than --heartbeat-ms ({})",
                a.lease_ms, a.heartbeat_ms
            )));
        }
        Ok(ClusterConfig {
            id,
            peers,
            secret,
            replication: a.replication,
            heartbeat,
            failure_timeout,
            lease,
        })
    }
}

/// The raw values of the cluster flags, as given (`main.rs` fills it).
#[derive(Debug, Clone)]
pub struct ClusterArgs {
    /// The client port (the default id).
    pub port: u16,
    /// The PEERS argument: comma-separated `host:port` or `ID@host:port`.
    pub peers: Option<String>,
    pub id: Option<u64>,
    pub secret: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub replication: Replication,
    pub heartbeat_ms: u64,
    pub failure_timeout_ms: u64,
    pub lease_ms: u64,
}

impl ClusterArgs {
    /// The defaults for a node on `port` with these peers.
    pub fn new(port: u16, peers: Option<&str>) -> ClusterArgs {
        ClusterArgs {
            port,
            peers: peers.map(str::to_string),
            id: None,
            secret: None,
            secret_file: None,
            replication: Replication::default(),
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            failure_timeout_ms: DEFAULT_FAILURE_TIMEOUT_MS,
            lease_ms: DEFAULT_LEASE_MS,
        }
    }
}

/// A peer's id before it is learned (a plain `host:port` peer of a node given `--id`).
pub const UNKNOWN_ID: u64 = 0;

/// Parses the PEERS argument: comma-separated entries, blanks around them ignored, an
/// empty string meaning no peers.
pub fn parse_peers(s: &str) -> Result<Vec<Peer>, ConfigError> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(parse_peer)
        .collect()
}

/// Parses one peer: `host:port` (id = port) or `ID@host:port`. IPv6 hosts in brackets
/// (`[::1]:7002`).
pub fn parse_peer(s: &str) -> Result<Peer, ConfigError> {
    let bad = |why: &str| ConfigError::BadPeer {
        entry: s.to_string(),
        why: why.to_string(),
    };
    let (id, addr) = match s.split_once('@') {
        Some((id, addr)) => {
            let id: u64 = id
                .parse()
                .map_err(|_| bad("the id before '@' is not a number"))?;
            (Some(id), addr)
        }
        None => (None, s),
    };
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port"))?;
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(bad("an IPv6 address goes in brackets: [::1]:7002"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| bad("the port is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err(bad("the port is not a number from 1 to 65535"));
    }
    let id = id.unwrap_or(u64::from(port));
    if id == 0 {
        return Err(bad("id 0 is reserved (ids start at 1)"));
    }
    Ok(Peer {
        id,
        addr: addr.to_string(),
    })
}

/// Why a configuration was refused; `Display` says what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    ZeroId,
    EphemeralPort,
    BadPeer {
        entry: String,
        why: String,
    },
    OwnId {
        peer: String,
        id: u64,
    },
    DuplicateId {
        id: u64,
        first: String,
        second: String,
    },
    DuplicateAddr(String),
    TwoSecrets,
    SecretFile {
        path: PathBuf,
        why: String,
    },
    Timers(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::ZeroId => f.write_str("--id 0 is reserved: ids start at 1"),
            ConfigError::EphemeralPort => f.write_str(
                "port 0 (any free port) cannot be a node's id: with peers, give a fixed PORT \
                 or an --id",
            ),
            ConfigError::BadPeer { entry, why } => write!(
                f,
                "bad peer '{entry}': {why} (peers are host:port or ID@host:port, \
                 comma-separated)"
            ),
            ConfigError::OwnId { peer, id } => write!(
                f,
                "peer {peer} has this node's own id {id}: every member needs its own id \
                 (set --id, or write the peer as ID@host:port)"
            ),
            ConfigError::DuplicateId { id, first, second } => write!(
                f,
                "peers {first} and {second} have the same id {id}: every member needs its \
                 own id (write them as ID@host:port)"
            ),
            ConfigError::DuplicateAddr(a) => write!(f, "peer {a} is listed twice"),
            ConfigError::TwoSecrets => {
                f.write_str("give --cluster-secret or --cluster-secret-file, not both")
            }
            ConfigError::SecretFile { path, why } => write!(
                f,
                "cannot use --cluster-secret-file {}: {why}",
                path.display()
            ),
            ConfigError::Timers(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Reads a secret (the cluster secret, the client password) from a file, through
/// `read` (so tests need no files). One trailing newline (`\n` or `\r\n`) is not part
/// of it: editors and `echo` end a file with one. Refused: longer than
/// [`MAX_SECRET_LEN`], or empty. The error is the reason, for the caller to name the flag.
pub fn read_secret_file(
    path: &Path,
    read: impl FnOnce(&Path) -> std::io::Result<Vec<u8>>,
) -> Result<Vec<u8>, String> {
    let mut bytes = read(path).map_err(|e| e.to_string())?;
    if bytes.len() > MAX_SECRET_LEN {
        return Err(format!("longer than {MAX_SECRET_LEN} bytes"));
    }
    if bytes.ends_with(b"\r\n") {
        bytes.truncate(bytes.len() - 2);
    } else if bytes.ends_with(b"\n") {
        bytes.truncate(bytes.len() - 1);
    }
    if bytes.is_empty() {
        return Err("it is empty".into());
    }
    Ok(bytes)
}

/// The client password from `--requirepass` or `--requirepass-file` (at most one;
/// an empty `--requirepass`, say `KVSTORE_REQUIREPASS=` in an env file, means none).
/// AUTH compares bytes, but the password is kept as text (CONFIG GET shows it): a file
/// that is not UTF-8 is refused.
pub fn client_password(
    flag: Option<&str>,
    file: Option<&Path>,
    read: impl FnOnce(&Path) -> std::io::Result<Vec<u8>>,
) -> Result<Option<String>, String> {
    match (flag.filter(|p| !p.is_empty()), file) {
        (Some(_), Some(_)) => Err("give --requirepass or --requirepass-file, not both".into()),
        (Some(p), None) => Ok(Some(p.to_string())),
        (None, Some(path)) => {
            let why =
                |why: String| format!("cannot use --requirepass-file {}: {why}", path.display());
            let bytes = read_secret_file(path, read).map_err(why)?;
            String::from_utf8(bytes)
                .map(Some)
                .map_err(|_| why("it is not UTF-8 text".into()))
        }
        (None, None) => Ok(None),
    }
}

/// Protected mode: Redis's, made explicit. A node bound only to loopback addresses is
/// reachable from this machine alone, so it may run open. Bound anywhere else (given
/// `addrs`, what `--bind` resolved to; `0.0.0.0` and `::` are every interface), it
/// refuses to start unless a password (`--requirepass`) or a cluster secret protects
/// it, or `--insecure` says the operator accepts an open node. Redis instead starts and
/// answers every outside client with a DENIED error, which looks like a broken server
/// from afar; refusing at start tells the operator, on the spot, what to change.
///
/// `Ok(Some(warning))`: allowed, but worth a line in the log (open on purpose, or a
/// cluster secret without a client password: the secret guards the links between
/// nodes, not the clients).
pub fn protected_mode(
    bind: &str,
    addrs: &[std::net::IpAddr],
    password: bool,
    secret: bool,
    insecure: bool,
) -> Result<Option<String>, String> {
    if !addrs.is_empty() && addrs.iter().all(|a| a.is_loopback()) {
        return Ok(None);
    }
    if password {
        return Ok(None);
    }
    if secret {
        return Ok(Some(format!(
            "listening on {bind} with no client password: the cluster secret guards the links \
             between nodes, but any client that reaches this address can read and write every \
             key (set --requirepass-file to require AUTH)"
        )));
    }
    if insecure {
        return Ok(Some(format!(
            "listening on {bind} with no password (--insecure): any client that reaches this \
             address can read and write every key"
        )));
    }
    Err(format!(
        "refusing to listen on {bind}, which other machines can reach, with neither a password \
         (--requirepass / --requirepass-file) nor a cluster secret (--cluster-secret / \
         --cluster-secret-file): anyone who reaches it could read and write every key. Set a \
         password, bind 127.0.0.1 (the default), or pass --insecure to run open on purpose \
         (protected mode)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_file(_: &Path) -> std::io::Result<Vec<u8>> {
        panic!("no secret file expected")
    }

    fn build(a: &ClusterArgs) -> Result<ClusterConfig, ConfigError> {
        ClusterConfig::from_args(a, no_file)
    }

    fn peer(id: u64, addr: &str) -> Peer {
        Peer {
            id,
            addr: addr.into(),
        }
    }

    #[test]
    fn the_seed_form_needs_no_ids() {
        let a = ClusterArgs::new(7001, Some("127.0.0.1:7002,127.0.0.1:7003"));
        let c = build(&a).unwrap();
        assert_eq!(c.id, 7001);
        assert_eq!(
            c.peers,
            vec![peer(7002, "127.0.0.1:7002"), peer(7003, "127.0.0.1:7003")]
        );
        assert_eq!(c.replication, Replication::Quorum);
        assert_eq!(c.heartbeat, Duration::from_millis(100));
        assert_eq!(c.failure_timeout, Duration::from_millis(400));
        assert_eq!(c.lease, Duration::from_millis(300));
        assert!(c.secret.is_empty());
        assert_eq!(c.size(), 3);
        assert_eq!(c.peer(7003), Some(&peer(7003, "127.0.0.1:7003")));
    }

    #[test]
    fn no_peers_is_a_cluster_of_one() {
        for peers in [None, Some(""), Some(" , ")] {
            let c = build(&ClusterArgs::new(7379, peers)).unwrap();
            assert!(c.peers.is_empty(), "{peers:?}");
            assert_eq!(c.id, 7379);
        }
    }

    #[test]
    fn peer_entries() {
        assert_eq!(parse_peer("10.0.0.2:7001"), Ok(peer(7001, "10.0.0.2:7001")));
        assert_eq!(parse_peer("3@proxy:9000"), Ok(peer(3, "proxy:9000")));
        assert_eq!(parse_peer("db-2.internal:7001").unwrap().id, 7001);
        assert_eq!(parse_peer("[::1]:7002"), Ok(peer(7002, "[::1]:7002")));
        assert_eq!(parse_peer("5@[::1]:7002"), Ok(peer(5, "[::1]:7002")));
        assert_eq!(
            parse_peers(" 1@a:1 ,2@b:2,, "),
            Ok(vec![peer(1, "a:1"), peer(2, "b:2")])
        );
        for bad in [
            "host",
            ":7002",
            "host:",
            "host:0",
            "host:65536",
            "host:x",
            "x@host:1",
            "0@host:1",
            "-1@host:1",
            "::1:7002",
            "@host:1",
        ] {
            let e = parse_peer(bad).unwrap_err();
            assert!(
                matches!(&e, ConfigError::BadPeer { entry, .. } if entry == bad),
                "{bad}: {e:?}"
            );
            assert!(e.to_string().contains("host:port"), "{e}");
        }
    }

    #[test]
    fn refusals() {
        let mut a = ClusterArgs::new(7001, Some("127.0.0.1:7002"));
        a.id = Some(0);
        assert_eq!(build(&a), Err(ConfigError::ZeroId));

        // With --id, a plain host:port peer's id is learned at start, not its port.
        a.id = Some(7002);
        let c = build(&a).unwrap();
        assert_eq!(c.peers[0].id, UNKNOWN_ID);
        // A peer with our own id: explicit --id, or a peer written with it.
        let mut a = ClusterArgs::new(7001, Some("7002@127.0.0.1:7002"));
        a.id = Some(7002);
        assert!(matches!(
            build(&a),
            Err(ConfigError::OwnId { id: 7002, .. })
        ));
        let a = ClusterArgs::new(7001, Some("7001@10.0.0.2:7001"));
        let e = build(&a).unwrap_err();
        assert!(e.to_string().contains("own id 7001"), "{e}");

        // Port 0 (any free port): fine alone (the server sets the id to the port it
        // gets), not in a cluster unless an id is given.
        assert_eq!(build(&ClusterArgs::new(0, None)).unwrap().id, 0);
        assert_eq!(
            build(&ClusterArgs::new(0, Some("h:2"))),
            Err(ConfigError::EphemeralPort)
        );
        let mut a = ClusterArgs::new(0, Some("h:2"));
        a.id = Some(1);
        assert_eq!(build(&a).unwrap().id, 1);

        // Two members with one id: the same port on two hosts needs ID@.
        let a = ClusterArgs::new(7001, Some("10.0.0.2:7002,10.0.0.3:7002"));
        let e = build(&a).unwrap_err();
        assert_eq!(
            e,
            ConfigError::DuplicateId {
                id: 7002,
                first: "10.0.0.2:7002".into(),
                second: "10.0.0.3:7002".into()
            }
        );
        assert!(e.to_string().contains("ID@host:port"), "{e}");
        let a = ClusterArgs::new(1, Some("2@h:1,2@h:3"));
        assert!(matches!(
            build(&a),
            Err(ConfigError::DuplicateId { id: 2, .. })
        ));
        let a = ClusterArgs::new(1, Some("2@h:7,3@h:7"));
        assert_eq!(build(&a), Err(ConfigError::DuplicateAddr("h:7".into())));
        // Ids from ports are fine when they differ.
        assert!(build(&ClusterArgs::new(1, Some("2@h:7,3@i:7"))).is_ok());
    }

    #[test]
    fn timers() {
        let mut a = ClusterArgs::new(7001, None);
        a.heartbeat_ms = 50;
        a.failure_timeout_ms = 300;
        a.lease_ms = 200;
        let c = build(&a).unwrap();
        assert_eq!(
            (c.heartbeat, c.failure_timeout, c.lease),
            (
                Duration::from_millis(50),
                Duration::from_millis(300),
                Duration::from_millis(200)
            )
        );
        a.lease_ms = 300;
        let e = build(&a).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--lease-ms (300) must be shorter than --failure-timeout-ms (300)"
        );
        a.lease_ms = 50;
        assert!(
            build(&a)
                .unwrap_err()
                .to_string()
                .contains("--heartbeat-ms")
        );
        a.lease_ms = 200;
        a.heartbeat_ms = 0;
        assert!(build(&a).unwrap_err().to_string().contains("at least 1"));
    }

    #[test]
    fn replication_modes() {
        assert_eq!("async".parse(), Ok(Replication::Async));
        assert_eq!("QUORUM".parse(), Ok(Replication::Quorum));
        assert_eq!("all".parse(), Ok(Replication::All));
        assert!(
            "most"
                .parse::<Replication>()
                .unwrap_err()
                .contains("async, quorum or all")
        );
        assert_eq!(Replication::All.to_string(), "all");
    }

    #[test]
    fn secrets() {
        let mut a = ClusterArgs::new(7001, Some("127.0.0.1:7002"));
        a.secret = Some("s3cret".into());
        assert_eq!(build(&a).unwrap().secret, b"s3cret");
        // Debug never shows it.
        assert!(!format!("{:?}", build(&a).unwrap()).contains("s3cret"));

        // Empty means not given.
        a.secret = Some(String::new());
        assert!(build(&a).unwrap().secret.is_empty());

        // From a file: one trailing newline is not part of it.
        a.secret = None;
        a.secret_file = Some("/etc/kvstore/secret".into());
        let from = |content: &'static [u8]| {
            let a = a.clone();
            ClusterConfig::from_args(&a, move |p| {
                assert_eq!(p, Path::new("/etc/kvstore/secret"));
                Ok(content.to_vec())
            })
        };
        assert_eq!(from(b"s3cret\n").unwrap().secret, b"s3cret");
        assert_eq!(from(b"s3cret\r\n").unwrap().secret, b"s3cret");
        assert_eq!(from(b"s3cret\n\n").unwrap().secret, b"s3cret\n");
        assert_eq!(from(b"s3cret").unwrap().secret, b"s3cret");
        assert!(from(b"\n").unwrap_err().to_string().contains("empty"));
        let e =
            ClusterConfig::from_args(&a, |_| Err(std::io::ErrorKind::NotFound.into())).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot use --cluster-secret-file /etc/kvstore/secret:"),
            "{e}"
        );
        let big = vec![b'x'; MAX_SECRET_LEN + 1];
        let e = ClusterConfig::from_args(&a, move |_| Ok(big)).unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");

        // Both: refused.
        a.secret = Some("s3cret".into());
        assert_eq!(
            ClusterConfig::from_args(&a, |_| Ok(b"x".to_vec())),
            Err(ConfigError::TwoSecrets)
        );
    }

    #[test]
    fn protected_mode_refuses_an_open_node_reachable_from_elsewhere() {
        use std::net::IpAddr;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let lo = [ip("127.0.0.1")];
        let lo6 = [ip("::1"), ip("127.0.0.1")];
        let any = [ip("0.0.0.0")];
        let lan = [ip("10.0.0.5")];
        // Loopback only: open is fine, whatever else.
        assert_eq!(
            protected_mode("127.0.0.1", &lo, false, false, false),
            Ok(None)
        );
        assert_eq!(
            protected_mode("localhost", &lo6, false, false, false),
            Ok(None)
        );
        // Elsewhere, open: refused, naming the ways out.
        for addrs in [
            &any[..],
            &lan[..],
            &[ip("127.0.0.1"), ip("10.0.0.5")][..],
            &[][..],
        ] {
            let e = protected_mode("0.0.0.0", addrs, false, false, false).unwrap_err();
            for needle in [
                "refusing",
                "--requirepass-file",
                "--cluster-secret",
                "--insecure",
            ] {
                assert!(e.contains(needle), "{e}");
            }
        }
        // A password, a secret (with a warning), or --insecure (with a warning) let it start.
        assert_eq!(
            protected_mode("0.0.0.0", &any, true, false, false),
            Ok(None)
        );
        assert_eq!(protected_mode("0.0.0.0", &any, true, true, true), Ok(None));
        let w = protected_mode("10.0.0.5", &lan, false, true, false)
            .unwrap()
            .unwrap();
        assert!(w.contains("no client password"), "{w}");
        let w = protected_mode("::", &[ip("::")], false, false, true)
            .unwrap()
            .unwrap();
        assert!(w.contains("--insecure"), "{w}");
    }

    #[test]
    fn client_password_from_flag_or_file() {
        let p = Path::new("/etc/kvstore/password");
        let file = |c: &'static [u8]| move |_: &Path| Ok(c.to_vec());
        let none = |_: &Path| -> std::io::Result<Vec<u8>> { unreachable!("no file to read") };
        assert_eq!(client_password(None, None, none), Ok(None));
        assert_eq!(client_password(Some(""), None, none), Ok(None));
        assert_eq!(
            client_password(Some("pw"), None, none),
            Ok(Some("pw".into()))
        );
        assert_eq!(
            client_password(None, Some(p), file(b"pw\n")),
            Ok(Some("pw".into()))
        );
        assert_eq!(
            client_password(None, Some(p), file(b"p w\r\n")),
            Ok(Some("p w".into()))
        );
        let e = client_password(Some("pw"), Some(p), file(b"x")).unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let e = client_password(None, Some(p), file(b"\n")).unwrap_err();
        assert_eq!(
            e,
            "cannot use --requirepass-file /etc/kvstore/password: it is empty"
        );
        let e = client_password(None, Some(p), file(b"\xff\xfe")).unwrap_err();
        assert!(e.ends_with("it is not UTF-8 text"), "{e}");
        let e = client_password(None, Some(p), |_| {
            Err(std::io::ErrorKind::PermissionDenied.into())
        })
        .unwrap_err();
        assert!(
            e.starts_with("cannot use --requirepass-file /etc/kvstore/password: "),
            "{e}"
        );
    }
}
