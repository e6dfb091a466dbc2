//! systemd's service notification protocol (`sd_notify(3)`), without libsystemd, and
//! the thread that tells systemd how the node is doing.
//!
//! **What enters:** the environment systemd sets for a `Type=notify` service:
//! `$NOTIFY_SOCKET` (where to send: a path, or `@name` for a Linux abstract socket),
//! `$WATCHDOG_USEC` and `$WATCHDOG_PID` (`WatchdogSec=`: how often to prove we are
//! alive, and for which process). Then the node's state, read by [`Supervisor`]: the
//! cluster's published [`RoleInfo`], the store, the shutdown hook.
//!
//! **What leaves:** datagrams on that socket, each a few `KEY=value` lines:
//! `READY=1` (with `STATUS=`) once the node serves, `STATUS=` lines a person reads in
//! `systemctl status` whenever role, epoch or leader change, `STOPPING=1` when shutdown
//! starts, `WATCHDOG=1` while the node is healthy.
//!
//! **Pure part:** [`parse_notify_socket`], [`watchdog_timeout`], [`format`] and
//! [`describe`] (the STATUS text and whether the node counts as ready) take strings and
//! values and return values; unit tests cover them.
//!
//! **Driver part:** [`Notifier`] sends datagrams from an unbound
//! [`UnixDatagram`] (the kernel attaches our credentials, which is how systemd tells
//! that the main process sent them: `NotifyAccess=main`). Without `$NOTIFY_SOCKET` it
//! does nothing. A send that fails is logged once and never stops the server: being
//! supervised is a convenience, serving is the job. Sends time out after a second, so a
//! hung service manager cannot hang us.
//!
//! **When READY=1 is sent:** after `Server::bind` recovered the log and bound the
//! listener; on a cluster member only once it knows its role: it leads with its lease
//! held, or it follows a known leader. A member that cannot find a majority stays
//! "activating" in systemd (with a STATUS saying it waits for a leader): that is the
//! truth, and the unit sets `TimeoutStartSec=infinity` so systemd does not kill it for
//! waiting (see `dist/README.md`).
//!
//! **The watchdog** (`WATCHDOG=1`) is not a timer that always fires: the [`Supervisor`]
//! thread pings only after checking, at each ping interval (half of `$WATCHDOG_USEC`,
//! as `sd_watchdog_enabled(3)` advises), that the node makes progress:
//!
//! 1. the store's map lock can be taken within a ping interval
//!    (`Store::map_lock_free_within`): if the map is wedged (a deadlock, a thread stuck
//!    holding it; `DEBUG SLEEP` holds it on purpose), the check fails and the pings
//!    stop, so systemd kills and restarts the node;
//! 2. the log writer is not stuck on the disk: no fsync of the log has been running
//!    for longer than the whole watchdog timeout (`Store::fsync_in_progress`; a slow
//!    fsync that finishes is fine, one that hangs is a node that acknowledges nothing);
//! 3. on a cluster member, once its node thread runs, that thread's tick count
//!    (`ClusterState::ticks`, bumped each tick, every 10 ms) advanced since a check at
//!    least `MIN_TICK_WINDOW` (200 ms) earlier: a stuck node thread holds elections and
//!    replication still.
//!
//! A check that fails skips the ping, logs why (once per episode) and says so in
//! STATUS; the next check that passes pings again. The same thread publishes STATUS
//! changes (every [`STATUS_POLL`]) and READY, so those work with no watchdog too.
//! After `STOPPING=1` it sends nothing more (systemd stops watching during a stop).
//!
//! **Children:** the variables are read, not removed: the server spawns no process.
//! Anything that spawns `kvstore server` processes (`kvstore cluster`) must remove
//! [`ENV_VARS`] from their environment ([`scrub_env`]): otherwise each child would
//! report READY/WATCHDOG for itself on its parent's socket, which systemd ignores under
//! `NotifyAccess=main` but takes as the service's word under `NotifyAccess=all`.

use crate::cluster::{Role, RoleInfo};
use crate::commands::Context;
use parking_lot::Mutex;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The environment variables of the protocol, all of which a spawned child must not
/// inherit.
pub const ENV_VARS: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// How often the supervisor looks at the node's role to update STATUS (and sends READY
/// once it may), when the watchdog asks for nothing more frequent.
pub const STATUS_POLL: Duration = Duration::from_millis(250);

/// The node thread ticks every 10 ms (`driver::TICK`); its tick count is compared over
/// at least this long, so a tick that is merely late is not taken for a stuck thread.
const MIN_TICK_WINDOW: Duration = Duration::from_millis(200);

/// The longest message we send; systemd reads datagrams of a page or more, and a STATUS
/// line longer than this is cut.
const MAX_STATUS: usize = 1024;

/// Removes [`ENV_VARS`] from a command's environment, so that a spawned server does not
/// talk to our service manager as if it were us.
pub fn scrub_env(cmd: &mut std::process::Command) {
    for v in ENV_VARS {
        cmd.env_remove(v);
    }
}

/// Where `$NOTIFY_SOCKET` says to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddr {
    /// A socket file.
    Path(PathBuf),
    /// A Linux abstract socket (`@name`: the name without the `@`).
    Abstract(Vec<u8>),
}

/// Parses `$NOTIFY_SOCKET`: an absolute path, or `@name` (an abstract socket). systemd
/// also knows `vsock:` addresses (for virtual machines); those are refused here, as is
/// anything else, with a reason.
pub fn parse_notify_socket(v: &OsStr) -> Result<NotifyAddr, String> {
    let b = v.as_bytes();
    match b.first() {
        None => Err("NOTIFY_SOCKET is empty".into()),
        Some(b'@') if b.len() > 1 => Ok(NotifyAddr::Abstract(b[1..].to_vec())),
        Some(b'@') => Err("NOTIFY_SOCKET names an abstract socket without a name".into()),
        Some(b'/') => Ok(NotifyAddr::Path(PathBuf::from(v))),
        _ => Err(format!(
            "NOTIFY_SOCKET={} is neither an absolute path nor @name (vsock is not supported)",
            v.to_string_lossy()
        )),
    }
}

/// The watchdog timeout `$WATCHDOG_USEC` asks for, if it is meant for us: as
/// `sd_watchdog_enabled(3)`, `$WATCHDOG_PID`, when set, must be our pid (a variable
/// inherited from a parent is not ours). `Ok(None)`: no watchdog. A value that does not
/// parse (or 0) is an error, to be logged: systemd never sets one.
pub fn watchdog_timeout(
    usec: Option<&str>,
    pid: Option<&str>,
    our_pid: u32,
) -> Result<Option<Duration>, String> {
    let Some(usec) = usec else {
        return Ok(None);
    };
    if let Some(pid) = pid {
        match pid.trim().parse::<u32>() {
            Ok(p) if p == our_pid => {}
            Ok(_) => return Ok(None),
            Err(_) => return Err(format!("WATCHDOG_PID={pid} is not a process id")),
        }
    }
    match usec.trim().parse::<u64>() {
        Ok(0) | Err(_) => Err(format!(
            "WATCHDOG_USEC={usec} is not a positive number of microseconds"
        )),
        Ok(us) => Ok(Some(Duration::from_micros(us))),
    }
}

/// How often to ping for a watchdog `timeout`: half of it, as `sd_watchdog_enabled(3)`
/// advises, so one late ping is not yet a missed deadline.
pub fn ping_interval(timeout: Duration) -> Duration {
    (timeout / 2).max(Duration::from_millis(1))
}

/// One line of a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg<'a> {
    /// Start-up is finished: the service serves.
    Ready,
    /// Free text for `systemctl status`.
    Status(&'a str),
    /// Shutdown has begun.
    Stopping,
    /// The watchdog keep-alive.
    Watchdog,
    /// The service's main process is this pid (for a process that is not the one
    /// systemd started; unused by the server itself).
    MainPid(u32),
}

/// The datagram for `msgs`: one `KEY=value` line each. A STATUS is one line: newlines
/// in it become spaces, and it is cut at [`MAX_STATUS`] bytes (on a char boundary).
pub fn format(msgs: &[Msg<'_>]) -> Vec<u8> {
    let mut out = String::new();
    for m in msgs {
        match m {
            Msg::Ready => out.push_str("READY=1\n"),
            Msg::Stopping => out.push_str("STOPPING=1\n"),
            Msg::Watchdog => out.push_str("WATCHDOG=1\n"),
            Msg::MainPid(pid) => out.push_str(&format!("MAINPID={pid}\n")),
            Msg::Status(s) => {
                let mut end = s.len().min(MAX_STATUS);
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                out.push_str("STATUS=");
                out.extend(s[..end].chars().map(|c| if c == '\n' { ' ' } else { c }));
                out.push('\n');
            }
        }
    }
    out.into_bytes()
}

/// The STATUS line for the node's state, and whether the node counts as ready (it
/// serves, or follows a known leader). `cluster` is `None` on a cluster of one, which
/// always serves; `listen` is the client address.
pub fn describe(cluster: Option<&RoleInfo>, listen: &str, now: Instant) -> (String, bool) {
    let Some(info) = cluster else {
        return (format!("single node, serving on {listen}"), true);
    };
    let epoch = info.epoch;
    match (info.role, info.leader) {
        (Role::Leader, _) => {
            let up = info.followers.iter().filter(|f| f.connected).count();
            let all = info.followers.len();
            let leased = info.lease_until.is_some_and(|t| now < t);
            let what = if !leased {
                "leader without a majority (lease lapsed)"
            } else if info.handing_over {
                "leader, handing over to a returning node"
            } else {
                "leader"
            };
            (
                format!("{what}, epoch {epoch}, {up}/{all} followers connected, on {listen}"),
                leased,
            )
        }
        (Role::Follower, Some(l)) if l != info.node_id => {
            let addr = info.leader_addr.as_deref().unwrap_or("address unknown");
            let link = if info.leader_link_up {
                ""
            } else {
                ", link to it down"
            };
            (
                format!("follower of {l} ({addr}), epoch {epoch}{link}, on {listen}"),
                true,
            )
        }
        (Role::Candidate, Some(l)) if l == info.node_id => (
            format!("elected, catching up before serving, epoch {epoch}, on {listen}"),
            false,
        ),
        (Role::Candidate, _) => (format!("electing, epoch {epoch}, on {listen}"), false),
        (Role::Follower, _) => (
            format!("waiting for a leader, epoch {epoch}, on {listen}"),
            false,
        ),
    }
}

/// Sends notifications to the service manager; a no-op without `$NOTIFY_SOCKET`.
/// Keeps the protocol's order: nothing but STATUS before READY, READY once, nothing
/// after STOPPING.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    ready: bool,
    stopping: bool,
    /// The last STATUS sent, so that an unchanged one is not sent again.
    status: String,
    /// A send failed and was logged; later failures are not.
    failed: bool,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            state: Mutex::new(State::default()),
        }
    }

    /// From `$NOTIFY_SOCKET`; disabled when unset. A value we cannot use is logged and
    /// leaves the notifier disabled: the server runs anyway.
    pub fn from_env() -> Notifier {
        let Some(v) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier::disabled();
        };
        match parse_notify_socket(&v).and_then(|a| Notifier::to(&a).map_err(|e| e.to_string())) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("not notifying systemd: {e}");
                Notifier::disabled()
            }
        }
    }

    /// A notifier sending to `addr`.
    pub fn to(addr: &NotifyAddr) -> io::Result<Notifier> {
        let sa = match addr {
            NotifyAddr::Path(p) => SocketAddr::from_pathname(p)?,
            NotifyAddr::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)?
            }
        };
        let sock = UnixDatagram::unbound()?;
        sock.set_write_timeout(Some(Duration::from_secs(1)))?;
        Ok(Notifier {
            target: Some((sock, sa)),
            state: Mutex::new(State::default()),
        })
    }

    /// Whether there is a service manager to tell.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one datagram (the state lock is held by the caller, which orders sends).
    fn send(&self, st: &mut State, msgs: &[Msg<'_>]) {
        let Some((sock, addr)) = &self.target else {
            return;
        };
        if let Err(e) = sock.send_to_addr(&format(msgs), addr) {
            if !st.failed {
                log::warn!("cannot notify systemd (further failures are not logged): {e}");
            }
            st.failed = true;
        }
    }

    /// READY=1 with `status`, the first time only; nothing once stopping.
    pub fn ready(&self, status: &str) {
        let mut st = self.state.lock();
        if st.ready || st.stopping {
            return;
        }
        self.send(&mut st, &[Msg::Ready, Msg::Status(status)]);
        st.ready = true;
        st.status = status.to_string();
    }

    /// STATUS=`status` if it differs from the last one; nothing once stopping.
    pub fn status(&self, status: &str) {
        let mut st = self.state.lock();
        if st.stopping || st.status == status {
            return;
        }
        self.send(&mut st, &[Msg::Status(status)]);
        st.status = status.to_string();
    }

    /// STOPPING=1 (once) with a STATUS saying so.
    pub fn stopping(&self) {
        let mut st = self.state.lock();
        if st.stopping {
            return;
        }
        self.send(&mut st, &[Msg::Stopping, Msg::Status("shutting down")]);
        st.stopping = true;
    }

    /// WATCHDOG=1; nothing before READY (systemd watches only once start-up is
    /// complete) or once stopping.
    pub fn watchdog(&self) {
        let mut st = self.state.lock();
        if st.ready && !st.stopping {
            self.send(&mut st, &[Msg::Watchdog]);
        }
    }

    /// Whether STOPPING=1 was sent.
    pub fn is_stopping(&self) -> bool {
        self.state.lock().stopping
    }
}

/// The thread that publishes READY and STATUS and pings the watchdog (module doc).
pub struct Supervisor;

impl Supervisor {
    /// Starts the supervisor thread ("sd-notify") for the server of `ctx`, listening
    /// on `listen`. `watchdog`: the timeout from [`watchdog_timeout`]. Nothing starts
    /// when `notifier` is disabled.
    pub fn start(
        ctx: Arc<Context>,
        notifier: Arc<Notifier>,
        watchdog: Option<Duration>,
        listen: String,
    ) -> io::Result<()> {
        if !notifier.enabled() {
            return Ok(());
        }
        std::thread::Builder::new()
            .name("sd-notify".into())
            .spawn(move || run(&ctx, &notifier, watchdog, &listen))?;
        Ok(())
    }
}

fn run(ctx: &Context, notifier: &Notifier, watchdog: Option<Duration>, listen: &str) {
    let ping_every = watchdog.map(ping_interval);
    let poll = ping_every.map_or(STATUS_POLL, |p| p.min(STATUS_POLL));
    let mut next_ping = Instant::now();
    let mut last_ticks = None;
    // Why the last check failed, so an episode is logged once.
    let mut unhealthy: Option<String> = None;
    loop {
        if notifier.is_stopping() || ctx.is_shutting_down() {
            return;
        }
        let now = Instant::now();
        let info = ctx.cluster().map(|c| c.info());
        let (mut status, ready) = describe(info.as_ref(), listen, now);
        if ready {
            notifier.ready(&status);
        }
        if let Some(timeout) = watchdog
            && now >= next_ping
        {
            next_ping = now + ping_every.unwrap_or(timeout);
            match health(ctx, timeout, &mut last_ticks) {
                Ok(()) => {
                    if let Some(why) = unhealthy.take() {
                        log::info!("healthy again ({why} no longer): pinging systemd's watchdog");
                    }
                    notifier.watchdog();
                }
                Err(why) => {
                    if unhealthy.as_deref() != Some(why.as_str()) {
                        log::warn!("not pinging systemd's watchdog: {why}");
                    }
                    unhealthy = Some(why);
                }
            }
        }
        if let Some(why) = &unhealthy {
            status = format!("{status}; unhealthy: {why}");
        }
        notifier.status(&status);
        let wake = if watchdog.is_some() {
            next_ping.min(now + poll)
        } else {
            now + poll
        };
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
    }
}

/// The watchdog's checks (module doc). Waits up to a ping interval for the store's map
/// lock: a node wedged there fails the check (and so stops pinging) and says why in the
/// journal and the status line, instead of blocking the check silently.
fn health(
    ctx: &Context,
    timeout: Duration,
    last_ticks: &mut Option<(u64, Instant)>,
) -> Result<(), String> {
    let wait = ping_interval(timeout);
    if !ctx.store.map_lock_free_within(wait) {
        return Err(format!(
            "the store's map has been locked for over {:.1}s",
            wait.as_secs_f64()
        ));
    }
    if let Some(t) = ctx.store.fsync_in_progress()
        && t > timeout
    {
        return Err(format!(
            "an fsync of the log has been running for {:.1}s",
            t.as_secs_f64()
        ));
    }
    if let Some(c) = ctx.cluster() {
        let now = Instant::now();
        let ticks = c.ticks();
        match *last_ticks {
            // 0: the node thread has not started (the node still learns its peers' ids).
            // Within a few ticks' time of the last look, no tick may be due yet.
            Some((seen, at)) if ticks > 0 && now.duration_since(at) >= MIN_TICK_WINDOW => {
                if ticks == seen {
                    return Err("the cluster node thread is not ticking".into());
                }
                *last_ticks = Some((ticks, now));
            }
            Some(_) => {}
            None => *last_ticks = Some((ticks, now)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::FollowerInfo;

    #[test]
    fn notify_socket_paths_and_abstract_names() {
        assert_eq!(
            parse_notify_socket(OsStr::new("/run/systemd/notify")),
            Ok(NotifyAddr::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            parse_notify_socket(OsStr::new("@/org/freedesktop/systemd1/notify/123")),
            Ok(NotifyAddr::Abstract(
                b"/org/freedesktop/systemd1/notify/123".to_vec()
            ))
        );
        for bad in ["", "@", "relative/path", "vsock:2:1234"] {
            assert!(parse_notify_socket(OsStr::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn watchdog_is_ours_only_when_the_pid_matches_or_is_unset() {
        let s = Some("10000000");
        assert_eq!(watchdog_timeout(None, None, 7), Ok(None));
        assert_eq!(watchdog_timeout(None, Some("7"), 7), Ok(None));
        assert_eq!(
            watchdog_timeout(s, None, 7),
            Ok(Some(Duration::from_secs(10)))
        );
        assert_eq!(
            watchdog_timeout(s, Some("7"), 7),
            Ok(Some(Duration::from_secs(10)))
        );
        assert_eq!(watchdog_timeout(s, Some("8"), 7), Ok(None));
        assert!(watchdog_timeout(s, Some("x"), 7).is_err());
        assert!(watchdog_timeout(Some("0"), None, 7).is_err());
        assert!(watchdog_timeout(Some("-5"), None, 7).is_err());
        assert!(watchdog_timeout(Some("ten"), None, 7).is_err());
        assert_eq!(
            ping_interval(Duration::from_secs(10)),
            Duration::from_secs(5)
        );
        assert_eq!(
            ping_interval(Duration::from_micros(1)),
            Duration::from_millis(1)
        );
    }

    #[test]
    fn messages_are_key_value_lines() {
        assert_eq!(
            format(&[Msg::Ready, Msg::Status("leader, epoch 7")]),
            b"READY=1\nSTATUS=leader, epoch 7\n"
        );
        assert_eq!(format(&[Msg::Stopping]), b"STOPPING=1\n");
        assert_eq!(format(&[Msg::Watchdog]), b"WATCHDOG=1\n");
        assert_eq!(format(&[Msg::MainPid(42)]), b"MAINPID=42\n");
        // A STATUS stays one line, and a long one is cut on a char boundary.
        assert_eq!(format(&[Msg::Status("a\nb")]), b"STATUS=a b\n");
        let long = "é".repeat(MAX_STATUS);
        let out = String::from_utf8(format(&[Msg::Status(&long)])).unwrap();
        assert!(out.len() <= MAX_STATUS + "STATUS=\n".len());
        assert!(out.ends_with("é\n"));
    }

    fn member(role: Role, leader: Option<u64>) -> RoleInfo {
        let mut i = RoleInfo::starting(3, 7);
        i.role = role;
        i.leader = leader;
        i
    }

    #[test]
    fn status_names_role_epoch_and_leader_and_ready_needs_a_leader() {
        let now = Instant::now();
        let on = "127.0.0.1:7003";
        assert_eq!(
            describe(None, "127.0.0.1:7379", now),
            ("single node, serving on 127.0.0.1:7379".into(), true)
        );
        let (s, ready) = describe(Some(&member(Role::Follower, None)), on, now);
        assert_eq!(s, "waiting for a leader, epoch 7, on 127.0.0.1:7003");
        assert!(!ready);
        let (s, ready) = describe(Some(&member(Role::Candidate, None)), on, now);
        assert_eq!(s, "electing, epoch 7, on 127.0.0.1:7003");
        assert!(!ready);
        let (s, ready) = describe(Some(&member(Role::Candidate, Some(3))), on, now);
        assert!(s.starts_with("elected, catching up"), "{s}");
        assert!(!ready);

        let mut f = member(Role::Follower, Some(5));
        f.leader_addr = Some("127.0.0.1:7005".into());
        f.leader_link_up = true;
        assert_eq!(
            describe(Some(&f), on, now),
            (
                "follower of 5 (127.0.0.1:7005), epoch 7, on 127.0.0.1:7003".into(),
                true
            )
        );
        f.leader_link_up = false;
        assert!(describe(Some(&f), on, now).0.contains("link to it down"));

        let mut l = member(Role::Leader, Some(3));
        let follower = |id, connected| FollowerInfo {
            id,
            addr: format!("127.0.0.1:700{id}"),
            connected,
            acked: 0,
            lag: 0,
        };
        l.followers = vec![follower(1, true), follower(2, false)];
        l.lease_until = Some(now + Duration::from_secs(1));
        assert_eq!(
            describe(Some(&l), on, now),
            (
                "leader, epoch 7, 1/2 followers connected, on 127.0.0.1:7003".into(),
                true
            )
        );
        l.lease_until = Some(now - Duration::from_millis(1));
        let (s, ready) = describe(Some(&l), on, now);
        assert!(s.starts_with("leader without a majority"), "{s}");
        assert!(!ready);
    }

    #[test]
    fn notifier_keeps_the_protocol_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_nonblocking(true).unwrap();
        let n = Notifier::to(&NotifyAddr::Path(path)).unwrap();
        n.status("starting");
        n.status("starting"); // unchanged: not sent again
        n.watchdog(); // before READY: not sent
        n.ready("leader");
        n.ready("leader"); // once
        n.watchdog();
        n.stopping();
        n.ready("x");
        n.status("y");
        n.watchdog();
        n.stopping();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(len) = rx.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
        assert_eq!(
            got,
            [
                "STATUS=starting\n",
                "READY=1\nSTATUS=leader\n",
                "WATCHDOG=1\n",
                "STOPPING=1\nSTATUS=shutting down\n"
            ]
        );
        // Unset: nothing happens, nothing fails.
        let off = Notifier::disabled();
        off.ready("x");
        off.stopping();
        assert!(!off.enabled());
    }

    #[test]
    fn a_missing_socket_is_logged_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::to(&NotifyAddr::Path(dir.path().join("absent"))).unwrap();
        n.ready("x");
        n.watchdog();
        assert!(n.state.lock().failed);
    }
}
