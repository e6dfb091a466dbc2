//! `kvstore cluster` (src/local_cluster.rs), run for real: the command starts its nodes,
//! tags their output, says who leads, serves, stops every node on SIGINT and exits 0;
//! refuses a taken port before starting anything; reports a node that dies while the
//! others keep serving. And examples/failover.rs, run against it while the leader is
//! killed, the way its doc comment (and the README) tells a user to.
//!
//! Every wait polls with a deadline; the processes are killed when a test ends, even by
//! a panic ([`Proc`]'s `Drop`).

mod common;

use common::{KVSTORE_BIN, free_port, redis_conn, wait_until};
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long the cluster may take to elect its first leader (generous: the machine is
/// shared with other tests).
const LEADER_DEADLINE: Duration = Duration::from_secs(30);
/// How long `kvstore cluster` may take to exit after SIGINT (its own SIGKILL comes
/// after 10 s).
const EXIT_DEADLINE: Duration = Duration::from_secs(30);

/// A child process whose stdout and stderr are collected line by line (stderr lines
/// start with `stderr: `), killed on drop.
struct Proc {
    child: Child,
    what: String,
    lines: Arc<Mutex<Vec<String>>>,
    /// The threads reading stdout and stderr: they end at end of output.
    pumps: Vec<thread::JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Proc {
    #[track_caller]
    fn spawn(mut cmd: Command, what: &str) -> Proc {
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("KVSTORE_") {
                cmd.env_remove(&key);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let pump = |from: Box<dyn Read + Send>, prefix: &'static str| {
            let lines = lines.clone();
            thread::spawn(move || {
                for line in BufReader::new(from).lines() {
                    let Ok(line) = line else { return };
                    lines.lock().unwrap().push(format!("{prefix}{line}"));
                }
            })
        };
        let pumps = vec![
            pump(Box::new(child.stdout.take().unwrap()), ""),
            pump(Box::new(child.stderr.take().unwrap()), "stderr: "),
        ];
        Proc {
            child,
            what: what.to_string(),
            lines,
            pumps,
            status: None,
        }
    }

    fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn output_text(&self) -> String {
        self.output().join("\n")
    }

    /// Waits for a line for which `f` gives Some, and returns that.
    #[track_caller]
    fn wait_for<T>(
        &mut self,
        deadline: Duration,
        what: &str,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> T {
        let end = Instant::now() + deadline;
        loop {
            if let Some(t) = self.output().iter().find_map(|l| f(l)) {
                return t;
            }
            if let Some(status) = self.try_wait() {
                // Its last lines may still be in the pipe: read to the end.
                self.drain();
                if let Some(t) = self.output().iter().find_map(|l| f(l)) {
                    return t;
                }
                panic!(
                    "{} exited ({status}) before {what}:\n{}",
                    self.what,
                    self.output_text()
                );
            }
            if Instant::now() >= end {
                panic!(
                    "timed out after {deadline:?} waiting for {what} from {}:\n{}",
                    self.what,
                    self.output_text()
                );
            }
            thread::sleep(common::POLL);
        }
    }

    /// Once the process has exited: waits for the readers to reach the end of its
    /// output (nothing else holds the pipes: `kvstore cluster` gives its nodes pipes of
    /// their own).
    fn drain(&mut self) {
        for p in self.pumps.drain(..) {
            let _ = p.join();
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    #[track_caller]
    fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let mut status = None;
        wait_until(deadline, &format!("{} to exit", self.what), || {
            status = self.try_wait();
            status.is_some()
        });
        self.drain();
        status.unwrap()
    }

    fn signal(&mut self, sig: libc::c_int) {
        if self.try_wait().is_none() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("--- output of {} ---\n{}", self.what, self.output_text());
        }
        if self.try_wait().is_none() {
            // SIGTERM first: `kvstore cluster` then stops its nodes (they would also
            // get SIGTERM when it dies, from PR_SET_PDEATHSIG).
            self.signal(libc::SIGTERM);
            let end = Instant::now() + EXIT_DEADLINE;
            while self.try_wait().is_none() && Instant::now() < end {
                thread::sleep(common::POLL);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `n` consecutive ports from a base that were all free a moment ago.
fn free_ports(n: u16) -> u16 {
    for _ in 0..100 {
        let base = free_port();
        let Some(top) = base.checked_add(n - 1) else {
            continue;
        };
        if (base..=top).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no run of {n} free ports found");
}

/// A running `kvstore cluster`.
struct LocalCluster {
    proc: Proc,
    base: u16,
    nodes: u16,
    /// Holds the data directories.
    _dir: tempfile::TempDir,
}

impl LocalCluster {
    /// Starts `kvstore cluster --nodes n` on free ports, in a temp dir. A port taken
    /// between our check and the command's (it refuses then) means another try.
    #[track_caller]
    fn start(n: u16) -> LocalCluster {
        LocalCluster::start_with(n, None, false)
    }

    /// [`LocalCluster::start`] with `NOTIFY_SOCKET` set for the command, and with
    /// `--http-port-base` on free ports if `http`.
    #[track_caller]
    fn start_with(n: u16, notify: Option<&Path>, http: bool) -> LocalCluster {
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("temp dir");
            let base = free_ports(n);
            let http_base = if http {
                free_ports(n).to_string()
            } else {
                String::new()
            };
            let extra: &[&str] = if http {
                &["--http-port-base", &http_base]
            } else {
                &[]
            };
            let mut proc = run_cluster(n, base, &dir.path().join("data"), notify, extra);
            // Wait for the first line that tells: started, or refused.
            let started = proc.wait_for(LEADER_DEADLINE, "the first node to start", |l| {
                if l.contains("is not available") {
                    Some(false)
                } else if l.contains(" started (pid ") {
                    Some(true)
                } else {
                    None
                }
            });
            if started {
                return LocalCluster {
                    proc,
                    base,
                    nodes: n,
                    _dir: dir,
                };
            }
        }
        panic!("could not start kvstore cluster on free ports in 3 tries");
    }

    fn ports(&self) -> Vec<u16> {
        (self.base..self.base + self.nodes).collect()
    }

    /// Waits for the "node P leads" line; returns P.
    #[track_caller]
    fn wait_for_leader(&mut self) -> u16 {
        self.proc.wait_for(LEADER_DEADLINE, "a leader", |l| {
            leader_in(l, " leads (epoch ")
        })
    }

    /// The pid the command printed for the node on `port`.
    #[track_caller]
    fn pid(&mut self, port: u16) -> libc::pid_t {
        let marker = format!("node {port} started (pid ");
        self.proc.wait_for(LEADER_DEADLINE, "the node's pid", |l| {
            let rest = l.split(&marker).nth(1)?;
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
    }
}

/// The port P of a `kvstore cluster: node P<marker>` line.
fn leader_in(line: &str, marker: &str) -> Option<u16> {
    let rest = line.strip_prefix("kvstore cluster: node ")?;
    let (port, tail) = rest.split_once(' ')?;
    (format!(" {tail}").starts_with(marker)).then_some(())?;
    port.parse().ok()
}

/// Runs `kvstore cluster`, with `NOTIFY_SOCKET` set to `notify` (as under systemd)
/// when given: the command's, never its nodes'.
fn run_cluster(n: u16, base: u16, data: &Path, notify: Option<&Path>, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(KVSTORE_BIN);
    cmd.args(["cluster", "--nodes", &n.to_string()])
        .args(["--base-port", &base.to_string()])
        .arg("--data-dir")
        .arg(data)
        .args(extra);
    match notify {
        Some(path) => cmd.env("NOTIFY_SOCKET", path),
        None => cmd.env_remove("NOTIFY_SOCKET"),
    };
    Proc::spawn(cmd, "kvstore cluster")
}

fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

#[test]
fn the_cluster_serves_tags_its_output_and_stops_on_sigint() {
    // Started as a systemd service would start it: the readiness socket is the
    // command's, and no node may take it for its own.
    let sock_dir = tempfile::tempdir().unwrap();
    let sock_path = sock_dir.path().join("notify");
    let notify = UnixDatagram::bind(&sock_path).unwrap();
    notify.set_nonblocking(true).unwrap();
    let mut c = LocalCluster::start_with(3, Some(&sock_path), false);
    let leader = c.wait_for_leader();
    assert!(c.ports().contains(&leader), "{leader}");
    let out = c.proc.output_text();
    assert!(
        out.contains(&format!("kvstore client -p {leader}")),
        "how to connect:\n{out}"
    );

    let mut conn = redis_conn(leader);
    let _: () = redis::cmd("SET")
        .arg("greeting")
        .arg("hello")
        .query(&mut conn)
        .unwrap();
    let got: String = redis::cmd("GET").arg("greeting").query(&mut conn).unwrap();
    assert_eq!(got, "hello");

    // Every node's lines carry its tag (and no colour: stdout is a pipe).
    for port in c.ports() {
        let tag = format!("[{port}] ");
        c.proc
            .wait_for(LEADER_DEADLINE, &format!("a line tagged {tag}"), |l| {
                l.starts_with(&tag).then_some(())
            });
    }
    assert!(
        !c.proc.output_text().contains('\x1b'),
        "no colour into a pipe"
    );
    let mut buf = [0u8; 256];
    let got = notify
        .recv(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    assert!(
        got.is_err(),
        "a node wrote to the command's NOTIFY_SOCKET: {got:?}"
    );

    c.proc.signal(libc::SIGINT);
    let status = c.proc.wait_exit(EXIT_DEADLINE);
    assert!(status.success(), "{status}\n{}", c.proc.output_text());
    for port in c.ports() {
        wait_until(EXIT_DEADLINE, &format!("port {port} to close"), || {
            !accepts(port)
        });
    }
    let out = c.proc.output_text();
    assert!(out.contains("kvstore cluster: stopped: "), "{out}");
    // Each node stopped on our SIGTERM, cleanly.
    for port in c.ports() {
        assert!(out.contains(&format!("{port} (exit code 0)")), "{out}");
    }
}

#[test]
fn a_taken_port_is_refused_before_anything_starts() {
    let base = free_ports(3);
    let _taken = TcpListener::bind(("127.0.0.1", base + 1)).expect("bind the middle port");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut p = run_cluster(3, base, &data, None, &[]);
    let status = p.wait_exit(EXIT_DEADLINE);
    let out = p.output_text();
    assert_eq!(status.code(), Some(1), "{out}");
    let taken = format!("port {} is not available", base + 1);
    assert!(
        out.lines()
            .any(|l| l.starts_with("stderr: ") && l.contains(&taken)),
        "{out}"
    );
    assert!(!out.contains(" started (pid "), "nothing may start:\n{out}");
    assert!(!data.exists(), "nothing is created either");
    assert!(!accepts(base));
}

#[test]
fn the_failover_example_loses_nothing_when_the_leader_is_killed() {
    let example = common::example_binary("failover");
    let mut c = LocalCluster::start(3);
    let leader = c.wait_for_leader();
    let leader_pid = c.pid(leader);

    let mut cmd = Command::new(&example);
    cmd.args(["--seconds", "120", "--stop-after-failover"])
        .args(["--key", "test:failover"])
        .args(c.ports().iter().map(|p| format!("127.0.0.1:{p}")));
    let mut ex = Proc::spawn(cmd, "examples/failover");
    let first = ex.wait_for(LEADER_DEADLINE, "the first served increment", |l| {
        l.strip_suffix(')')?
            .split_once(" serves (counter = ")
            .map(|(addr, _)| addr.to_string())
    });
    assert_eq!(first, format!("127.0.0.1:{leader}"));

    // As a user would: kill -9 the pid `kvstore cluster` printed.
    // SAFETY: kill(2); the pid is a live node (the cluster reaps it only after this).
    assert_eq!(unsafe { libc::kill(leader_pid, libc::SIGKILL) }, 0);
    let exited = format!("node {leader} exited (killed by signal 9");
    c.proc
        .wait_for(LEADER_DEADLINE, "the node's death to be reported", |l| {
            l.contains(&exited).then_some(())
        });
    let new = c.proc.wait_for(LEADER_DEADLINE, "a new leader", |l| {
        leader_in(l, " now leads (epoch ")
    });
    assert_ne!(new, leader);

    let status = ex.wait_exit(Duration::from_secs(150));
    let out = ex.output_text();
    assert!(status.success(), "{status}\n{out}");
    assert!(
        out.contains("OK: no acknowledged increment was lost"),
        "{out}"
    );
    assert!(
        out.contains(&format!("127.0.0.1:{new} serves")),
        "served by the new leader:\n{out}"
    );
    let failovers: u64 = out
        .split("failovers seen: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no failover count:\n{out}"));
    assert!(failovers >= 1, "{out}");

    // The survivors stop cleanly on SIGTERM too.
    c.proc.signal(libc::SIGTERM);
    let status = c.proc.wait_exit(EXIT_DEADLINE);
    assert!(status.success(), "{status}");
}

#[test]
fn the_printed_curl_commands_work() {
    common::require_tool("curl", "apt-get install curl");
    let mut c = LocalCluster::start_with(3, None, true);
    let hint = c.proc.wait_for(LEADER_DEADLINE, "the HTTP hint", |l| {
        l.strip_prefix("kvstore cluster: HTTP on the leader: ")
            .map(str::to_string)
    });
    // "curl … PUT …   then: curl … GET   and: curl …/metrics (every node …)"
    let hint = hint.split(" (").next().unwrap_or_default();
    let commands: Vec<&str> = hint
        .split("   then: ")
        .flat_map(|p| p.split("   and: "))
        .collect();
    assert_eq!(commands.len(), 3, "{hint}");
    let run = |cmd: &str| {
        let out = Command::new("sh")
            .args([
                "-c",
                &format!("{cmd} --fail --silent --show-error --max-time 10"),
            ])
            .output()
            .expect("run curl");
        assert!(out.status.success(), "{cmd}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(run(commands[0]), "");
    assert_eq!(run(commands[1]), "hello");
    let metrics = run(commands[2]);
    assert!(
        metrics.contains("kvstore_role{role=\"leader\"} 1"),
        "{metrics}"
    );
}
