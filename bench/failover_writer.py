#!/usr/bin/env python3
"""One failover round for bench/failover.sh: write, kill the leader, time the failover.

Usage: failover_writer.py LEADER_PID LEADER_PORT PORT... [--round R] [--warmup N]
                          [--interval-ms MS] [--deadline S]

Every --interval-ms (1 ms) it sends `SET fo:R:SEQ SEQ` (SEQ counts up) to every node
in PORT..., pipelined on one raw socket per node, and reads the replies in order
(`+OK`, or an error: MOVED, CLUSTERDOWN, ...). Once the leader (LEADER_PORT) has
acknowledged --warmup writes, it sends SIGKILL to LEADER_PID itself, so that the kill
time and the reply times come from one clock (time.monotonic) with no process start
in between. It stops at the first `+OK` from a node other than the old leader and then
checks, on that node, that every write acknowledged by any node (before or after the
kill) is there (EXISTS over the acknowledged keys): a write the old leader
acknowledged and the new leader lacks is a lost write.

Prints one line of JSON on stdout:
  {"failover_ms": float, "new_leader_port": int, "acked_before_kill": int,
   "acked_total": int, "lost": int, "lost_sample": [keys], "errors": {reply: count}}
and exits 0; exits 2 if no other node acknowledged a write within --deadline seconds
(the JSON then has "failover_ms": null), 3 if writes were lost.
"""

import argparse
import json
import os
import select
import signal
import socket
import sys
import time

MAX_IN_FLIGHT = 1000  # per node: a node that stops answering must not grow the queue forever


class Conn:
    """A pipelined connection to one node: what was sent, in order, and the replies."""

    def __init__(self, port):
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buf = b""
        self.in_flight = []  # keys sent and not yet answered, oldest first
        self.dead = False

    def send(self, key, value):
        if self.dead or len(self.in_flight) >= MAX_IN_FLIGHT:
            return
        cmd = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
            len(key), key, len(value), value)
        try:
            self.sock.sendall(cmd)  # a few dozen bytes: fits the socket buffer
            self.in_flight.append(key)
        except (BlockingIOError, OSError):
            self.close()

    def read(self):
        """Replies now available: a list of (key, reply line)."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return []
        except OSError:
            self.close()
            return []
        if not data:
            self.close()
            return []
        self.buf += data
        out = []
        while b"\r\n" in self.buf and self.in_flight:
            line, self.buf = self.buf.split(b"\r\n", 1)
            out.append((self.in_flight.pop(0), line.decode("utf-8", "replace")))
        return out

    def close(self):
        self.dead = True
        self.in_flight = []
        try:
            self.sock.close()
        except OSError:
            pass


def read_reply(sock):
    """One single-line RESP reply on a blocking socket (an integer or an error)."""
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf.split(b"\r\n", 1)[0].decode("utf-8", "replace")


def missing_keys(port, keys):
    """The keys that node PORT does not have (EXISTS in chunks, then one by one)."""
    missing = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            parts = [b"EXISTS"] + chunk
            cmd = b"*%d\r\n" % len(parts) + b"".join(
                b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
            s.sendall(cmd)
            reply = read_reply(s)
            if reply == ":%d" % len(chunk):
                continue
            if not reply.startswith(":"):
                raise RuntimeError("EXISTS on port %d answered %r" % (port, reply))
            for k in chunk:
                s.sendall(b"*2\r\n$6\r\nEXISTS\r\n$%d\r\n%s\r\n" % (len(k), k))
                if read_reply(s) != ":1":
                    missing.append(k.decode())
    return missing


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("leader_pid", type=int)
    ap.add_argument("leader_port", type=int)
    ap.add_argument("ports", type=int, nargs="+")
    ap.add_argument("--round", default="0")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--interval-ms", type=float, default=1.0)
    ap.add_argument("--deadline", type=float, default=30.0)
    a = ap.parse_args()

    conns = [Conn(p) for p in a.ports]
    interval = a.interval_ms / 1000.0
    seq = 0
    leader_acks = 0
    acked = []          # keys acknowledged by any node
    acked_before_kill = 0
    errors = {}
    t_kill = None
    t_first = None
    new_port = None
    start = time.monotonic()
    next_send = start
    while True:
        now = time.monotonic()
        if now >= next_send:
            for c in conns:
                seq += 1
                c.send(b"fo:%s:%d" % (a.round.encode(), seq), b"%d" % seq)
            next_send += interval
            if next_send < now:  # fell behind (a slow select): do not burst to catch up
                next_send = now + interval
        live = [c for c in conns if not c.dead]
        timeout = max(0.0, next_send - time.monotonic())
        readable, _, _ = select.select([c.sock for c in live], [], [], timeout)
        t_read = time.monotonic()
        for c in live:
            if c.sock not in readable:
                continue
            for key, line in c.read():
                if line == "+OK":
                    acked.append(key)
                    if t_kill is None and c.port == a.leader_port:
                        leader_acks += 1
                    elif t_kill is not None and c.port != a.leader_port and t_first is None:
                        t_first, new_port = t_read, c.port
                else:
                    kind = line.split(" ", 1)[0]
                    errors[kind] = errors.get(kind, 0) + 1
        if t_first is not None:
            break
        if t_kill is None and leader_acks >= a.warmup:
            acked_before_kill = len(acked)
            t_kill = time.monotonic()
            os.kill(a.leader_pid, signal.SIGKILL)
        if t_kill is None and time.monotonic() - start > a.deadline:
            print(json.dumps({"failover_ms": None, "error": "the leader acknowledged only %d "
                              "writes in %.0f s" % (leader_acks, a.deadline)}))
            return 2
        if t_kill is not None and time.monotonic() - t_kill > a.deadline:
            print(json.dumps({"failover_ms": None, "error": "no node acknowledged a write "
                              "within %.0f s of the kill" % a.deadline, "errors": errors}))
            return 2

    for c in conns:
        c.close()
    lost = missing_keys(new_port, acked)
    print(json.dumps({
        "failover_ms": round((t_first - t_kill) * 1000.0, 1),
        "new_leader_port": new_port,
        "acked_before_kill": acked_before_kill,
        "acked_total": len(acked),
        "lost": len(lost),
        "lost_sample": lost[:10],
        "errors": errors,
    }))
    return 3 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
