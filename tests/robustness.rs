//! The server survives what one client does to its own connection: a panic in the
//! connection's thread (DEBUG PANIC), and DEBUG is refused unless enabled.

mod common;

use common::Server;
use std::io::{Read, Write};

fn read_reply(s: &mut std::net::TcpStream) -> String {
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).expect("read a reply");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn panic_in_one_connection_closes_only_that_connection() {
    let server = Server::start(&["--fsync", "no", "--enable-debug-command"]);
    let mut bystander = server.conn();
    redis::cmd("SET")
        .arg("k")
        .arg("before")
        .exec(&mut bystander)
        .expect("SET before the panic");

    let mut victim = server.raw();
    victim
        .write_all(b"DEBUG PANIC\r\n")
        .expect("send DEBUG PANIC");
    let mut buf = [0u8; 64];
    // The connection is closed without a reply (EOF), or reset.
    match victim.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!(
            "expected the connection to close, got {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }

    // Everyone else is served, the data is intact, and new connections work.
    let v: String = redis::cmd("GET")
        .arg("k")
        .query(&mut bystander)
        .expect("GET after the panic");
    assert_eq!(v, "before");
    let mut fresh = server.conn();
    redis::cmd("SET")
        .arg("k")
        .arg("after")
        .exec(&mut fresh)
        .expect("SET on a new connection after the panic");
    // The socket closes while the thread unwinds; unregistering follows just after.
    common::wait_until(
        std::time::Duration::from_secs(10),
        "the panicked connection to be unregistered (connected_clients:2)",
        || {
            let info: String = redis::cmd("INFO")
                .arg("clients")
                .query(&mut fresh)
                .expect("INFO clients");
            info.contains("connected_clients:2\r\n")
        },
    );
    assert!(
        server.log().contains("panicked"),
        "the panic is logged: {}",
        server.log()
    );
}

#[test]
fn debug_is_refused_unless_enabled() {
    let server = Server::start(&["--fsync", "no"]);
    let mut s = server.raw();
    s.write_all(b"DEBUG PANIC\r\n").expect("send");
    let reply = read_reply(&mut s);
    assert!(
        reply.starts_with("-ERR DEBUG command not allowed"),
        "{reply}"
    );
    s.write_all(b"PING\r\n").expect("send");
    assert_eq!(read_reply(&mut s), "+PONG\r\n");
}
