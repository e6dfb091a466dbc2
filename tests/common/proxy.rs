//! A TCP proxy the test controls, put in front of a peer address so a test can cut the
//! link between two nodes for real: the nodes keep running and keep dialling, and only
//! the bytes between them stop.
//!
//! [`Proxy::start`] listens on a free 127.0.0.1 port and forwards every connection to
//! its target, one thread per direction. [`Proxy::cut`] closes every connection it
//! carries and refuses new ones (closed at once after accept, as a dead route looks to a
//! dialler); [`Proxy::blackhole`] keeps connections open but discards what flows one
//! way (a one-way partition: a node's messages vanish, the replies to it do not);
//! [`Proxy::heal`] goes back to forwarding. Dropping the proxy stops it.
//!
//! [`Proxy::record`] turns on a tap: from then on, the first bytes each new connection
//! forwards from the dialler to the target (what one node sent another: a handshake and
//! its frames) are kept, and [`Proxy::recordings`] hands them out, so a test can replay a
//! real session. Recording changes nothing about what is forwarded.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use parking_lot::Mutex;

/// How often a pump thread looks at the proxy's state when no bytes flow.
const PUMP_POLL: Duration = Duration::from_millis(20);

#[derive(Default)]
struct State {
    /// Connections are closed and refused.
    cut: AtomicBool,
    /// Bytes from the dialler to the target are discarded.
    drop_forward: AtomicBool,
    /// Bytes from the target back to the dialler are discarded.
    drop_back: AtomicBool,
    stop: AtomicBool,
    /// Both sockets of every live connection, so `cut` can close them at once.
    live: Mutex<Vec<(TcpStream, TcpStream)>>,
    /// Bytes forwarded (both ways), for tests that want to see traffic.
    forwarded: AtomicU64,
    /// Bytes of each connection [`Proxy::record`] keeps; 0 while not recording.
    tape_cap: AtomicUsize,
    /// What each connection accepted while recording forwarded, dialler to target.
    tapes: Mutex<Vec<Tape>>,
}

/// The recording of one connection.
type Tape = Arc<Mutex<Vec<u8>>>;

/// A controllable TCP forwarder.
pub struct Proxy {
    port: u16,
    target: SocketAddr,
    state: Arc<State>,
}

impl Proxy {
    /// Listens on a free 127.0.0.1 port and forwards to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy: bind 127.0.0.1:0");
        let port = listener.local_addr().expect("proxy: local addr").port();
        let state = Arc::new(State::default());
        let st = state.clone();
        thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || accept_loop(listener, target, st))
            .expect("proxy: spawn");
        Proxy {
            port,
            target,
            state,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Closes every connection and refuses new ones until [`Proxy::heal`].
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        for (a, b) in self.state.live.lock().drain(..) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    /// Discards the bytes flowing from the dialler to the target (`forward`) or back,
    /// keeping the connections open.
    pub fn blackhole(&self, forward: bool, back: bool) {
        self.state.drop_forward.store(forward, Ordering::SeqCst);
        self.state.drop_back.store(back, Ordering::SeqCst);
    }

    /// Forwards again (new connections; a blackholed one carries bytes again).
    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
        self.blackhole(false, false);
    }

    pub fn is_cut(&self) -> bool {
        self.state.cut.load(Ordering::SeqCst)
    }

    /// Bytes forwarded so far, both directions.
    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::Relaxed)
    }

    /// Records the connections accepted from now on: the first `cap` bytes each forwards
    /// from the dialler to the target. Connections already open are not recorded.
    pub fn record(&self, cap: usize) {
        self.state.tape_cap.store(cap, Ordering::SeqCst);
    }

    /// What each connection recorded so far forwarded to the target, in accept order.
    pub fn recordings(&self) -> Vec<Vec<u8>> {
        self.state
            .tapes
            .lock()
            .iter()
            .map(|t| t.lock().clone())
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_millis(200),
        );
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, state: Arc<State>) {
    for conn in listener.incoming() {
        if state.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        if state.cut.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(1)) else {
            // The target is down: the dialler sees its connection close.
            continue;
        };
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        state.live.lock().push((c2, s2));
        let tape: Option<Tape> = (state.tape_cap.load(Ordering::SeqCst) > 0).then(|| {
            let tape = Tape::default();
            state.tapes.lock().push(tape.clone());
            tape
        });
        for (from, to, forward) in [
            (client.try_clone(), server.try_clone(), true),
            (server.try_clone(), client.try_clone(), false),
        ] {
            let (Ok(from), Ok(to)) = (from, to) else {
                continue;
            };
            let st = state.clone();
            let tape = if forward { tape.clone() } else { None };
            let _ = thread::Builder::new()
                .name("proxy-pump".into())
                .spawn(move || pump(from, to, forward, st, tape));
        }
    }
}

/// Copies `from` to `to` until either closes or the proxy is cut; keeps what it forwarded
/// on `tape`, up to the proxy's recording cap.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    forward: bool,
    state: Arc<State>,
    tape: Option<Tape>,
) {
    let _ = from.set_read_timeout(Some(PUMP_POLL));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if state.cut.load(Ordering::SeqCst) || state.stop.load(Ordering::SeqCst) {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let drop_it = if forward {
                    state.drop_forward.load(Ordering::SeqCst)
                } else {
                    state.drop_back.load(Ordering::SeqCst)
                };
                if drop_it || state.cut.load(Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                state.forwarded.fetch_add(n as u64, Ordering::Relaxed);
                if let Some(tape) = &tape {
                    let mut t = tape.lock();
                    let cap = state.tape_cap.load(Ordering::SeqCst);
                    let take = n.min(cap.saturating_sub(t.len()));
                    t.extend_from_slice(&buf[..take]);
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            }
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
