//! The test harness's TCP proxy (tests/common/proxy.rs) cuts and heals links for real:
//! the cluster tests rely on it to partition nodes; its tap records what a connection
//! forwarded (tests/hostile.rs replays a real peer session from it).

mod common;

use common::proxy::Proxy;
use common::{Server, wait_until};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn ping_through(port: u16) -> Result<Vec<u8>, std::io::Error> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf)?;
    Ok(buf[..n].to_vec())
}

#[test]
fn a_proxy_forwards_cuts_blackholes_and_heals() {
    let server = Server::start(&[]);
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], server.port)));
    assert_eq!(ping_through(proxy.port()).unwrap(), b"+PONG\r\n");

    // A connection open across the cut is closed by it; new ones get nothing.
    let mut open = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    proxy.cut();
    let mut buf = [0u8; 16];
    let _ = open.write_all(b"PING\r\n");
    assert_eq!(
        open.read(&mut buf).unwrap_or(0),
        0,
        "a cut connection must close"
    );
    assert!(!matches!(
        ping_through(proxy.port()).as_deref(),
        Ok(b"+PONG\r\n")
    ));

    proxy.heal();
    wait_until(
        Duration::from_secs(10),
        "PING through the healed proxy",
        || matches!(ping_through(proxy.port()).as_deref(), Ok(b"+PONG\r\n")),
    );

    // Blackholed one way: the request vanishes, the connection stays open.
    proxy.blackhole(true, false);
    let err = ping_through(proxy.port()).expect_err("a blackholed request gets no reply");
    assert!(matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
    proxy.heal();
    assert_eq!(ping_through(proxy.port()).unwrap(), b"+PONG\r\n");
}

#[test]
fn a_proxy_records_what_new_connections_forward() {
    let server = Server::start(&[]);
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], server.port)));
    assert_eq!(ping_through(proxy.port()).unwrap(), b"+PONG\r\n");
    assert!(
        proxy.recordings().is_empty(),
        "nothing is recorded before record()"
    );

    proxy.record(8);
    assert_eq!(ping_through(proxy.port()).unwrap(), b"+PONG\r\n");
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"ECHO 0123456789\r\n").unwrap();
    let mut buf = [0u8; 64];
    assert!(
        s.read(&mut buf).unwrap() > 0,
        "the request was forwarded whole"
    );
    // One tape per connection, in accept order, each cut at the cap.
    assert_eq!(
        proxy.recordings(),
        [b"PING\r\n".to_vec(), b"ECHO 012".to_vec()]
    );
}
