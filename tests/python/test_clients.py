"""kvstore with a real Redis client library: redis-py, in RESP2 and RESP3.

redis-py 8 opens every connection with ``HELLO 3`` unless told otherwise, so
each client test runs three times: redis-py with its default settings (which
negotiates RESP3), ``protocol=2`` and ``protocol=3``.

The tests start their own server processes (see ``Server``): a free port on
127.0.0.1, a temp data dir, readiness polled with a deadline, killed and
cleaned up afterwards. Run them with ``bash tests/python/run.sh``.

Environment:

- ``KVSTORE_BIN``: the kvstore binary (default: the newer of
  target/debug/kvstore and target/release/kvstore).
- ``KVSTORE_TEST_REDIS_SERVER``: path of a ``redis-server`` binary; when set,
  the same tests run against real Redis instead of kvstore. That checks the
  tests themselves: kvstore must reply exactly as Redis does.

The server is shared by the tests of a session and there is no FLUSHDB yet:
every test works under its own key prefix (the ``prefix`` fixture).
"""

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

REPO_ROOT = Path(__file__).resolve().parents[2]

START_DEADLINE = 10.0  # seconds for a server to answer its first PING
STOP_DEADLINE = 10.0  # seconds for a server to exit after SIGTERM
POLL = 0.02  # readiness polling interval
IO_TIMEOUT = 10.0  # socket timeout of every client, so a stuck server fails a test
PASSWORD = "s3cret-pw"

# redis-py with its default settings (RESP3 through HELLO 3), then each
# protocol explicitly.
MODES = {
    "default": {},
    "resp2": {"protocol": 2},
    "resp3": {"protocol": 3},
}

# --------------------------------------------------------------------------
# Server processes


def kvstore_bin():
    """The binary under test: $KVSTORE_BIN, else the newest build in target/."""
    env = os.environ.get("KVSTORE_BIN")
    if env:
        return env
    candidates = [
        REPO_ROOT / "target" / "debug" / "kvstore",
        REPO_ROOT / "target" / "release" / "kvstore",
    ]
    built = [p for p in candidates if p.is_file()]
    if not built:
        pytest.exit(
            "no kvstore binary: run `cargo build` or set KVSTORE_BIN", returncode=2
        )
    return str(max(built, key=lambda p: p.stat().st_mtime))


def free_port():
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ping_ready(port):
    """True when a raw PING gets +PONG (or -NOAUTH: up, but wants AUTH)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.settimeout(1.0)
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            got = b""
            while b"\n" not in got:
                chunk = s.recv(64)
                if not chunk:
                    return False
                got += chunk
            return got.startswith(b"+PONG") or got.startswith(b"-NOAUTH")
    except OSError:
        return False


class Server:
    """One server process on 127.0.0.1 with its own temp dir."""

    def __init__(self, extra_args=()):
        self.extra_args = list(extra_args)
        self.root = Path(tempfile.mkdtemp(prefix="kvstore-pytest-"))
        self.proc = None
        self.port = None
        self.log_path = None
        self.redis_server = os.environ.get("KVSTORE_TEST_REDIS_SERVER")
        self.binary = self.redis_server or kvstore_bin()

    def command(self, port):
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        if self.redis_server:
            args = [self.binary, "--port", str(port), "--bind", "127.0.0.1"]
            args += ["--save", "", "--appendonly", "no", "--dir", str(data)]
            for i in range(0, len(self.extra_args), 2):
                args += self.extra_args[i : i + 2]
            return args
        return [
            self.binary,
            "server",
            str(port),
            "--data-dir",
            str(data),
            "--fsync",
            "no",
        ] + self.extra_args

    def start(self):
        # A port from free_port() can be taken before the server binds it:
        # then try another one.
        for attempt in range(3):
            port = free_port()
            self.log_path = self.root / f"server-{attempt}-port{port}.log"
            # Every kvstore flag also reads a KVSTORE_* variable: keep the
            # developer's shell out of what the server sees.
            env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    self.command(port),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.root,
                )
            self.port = port
            deadline = time.monotonic() + START_DEADLINE
            while True:
                if self.proc.poll() is not None:
                    log = self.log()
                    if "in use" in log and attempt < 2:
                        break  # next attempt
                    raise RuntimeError(
                        f"server exited ({self.proc.returncode}) before answering "
                        f"PING: {self.command(port)}\n{log}"
                    )
                if ping_ready(port):
                    return self
                if time.monotonic() >= deadline:
                    self.kill()
                    raise RuntimeError(
                        f"server did not answer PING on port {port} within "
                        f"{START_DEADLINE}s\n{self.log()}"
                    )
                time.sleep(POLL)
        raise RuntimeError("could not find a free port for the server")

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"<cannot read {self.log_path}: {e}>"

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self):
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def running_server(extra_args=()):
    srv = Server(extra_args)
    try:
        srv.start()  # its errors carry the server's log
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def server():
    yield from running_server()


@pytest.fixture(scope="session")
def auth_server():
    yield from running_server(["--requirepass", PASSWORD])


# --------------------------------------------------------------------------
# Clients


@pytest.fixture(params=list(MODES))
def mode(request):
    return request.param


def make_client(port, mode, **kwargs):
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=IO_TIMEOUT,
        socket_connect_timeout=IO_TIMEOUT,
        **MODES[mode],
        **kwargs,
    )


@pytest.fixture
def connect(server, mode):
    """Makes redis-py clients for the server in this test's mode; closes them."""
    clients = []

    def make(**kwargs):
        client = make_client(server.port, mode, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def r(connect):
    return connect()


@pytest.fixture
def prefix(request):
    """A key prefix that no other test (or run) uses, free of glob characters."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)
    return f"{name}:{uuid.uuid4().hex[:8]}:"


def as_str(value):
    return value.decode() if isinstance(value, bytes) else value


# --------------------------------------------------------------------------
# Protocol negotiation


def test_protocol_negotiated(r, mode):
    """Default redis-py and protocol=3 negotiate RESP3 (HELLO 3); protocol=2 stays on RESP2."""
    info = r.client_info()
    assert info["resp"] == ("2" if mode == "resp2" else "3")


def test_hello_reply(r, mode):
    reply = r.execute_command("HELLO")
    if mode == "resp2":
        # RESP2: a flat array of 14 (name, value) elements; HELLO with no
        # argument keeps the protocol, so proto is 2.
        assert isinstance(reply, list) and len(reply) == 14
        reply = dict(zip(reply[::2], reply[1::2]))
        assert reply[b"proto"] == 2
    else:
        assert isinstance(reply, dict)
        assert reply[b"proto"] == 3
    assert set(reply) == {
        b"server",
        b"version",
        b"proto",
        b"id",
        b"mode",
        b"role",
        b"modules",
    }
    assert reply[b"server"] == b"redis"
    assert reply[b"role"] == b"master"
    assert reply[b"mode"] == b"standalone"
    assert reply[b"modules"] == []
    assert reply[b"id"] == r.client_id()


# --------------------------------------------------------------------------
# Strings and keys


def test_set_get_del_exists(r, prefix):
    a, b, missing = prefix + "a", prefix + "b", prefix + "missing"
    assert r.set(a, "1") is True
    assert r.set(b, b"two") is True
    assert r.get(a) == b"1"
    assert r.get(b) == b"two"
    assert r.exists(a) == 1
    assert r.exists(a, b, missing, a) == 3
    assert r.exists(missing) == 0
    assert r.delete(a, missing) == 1
    assert r.get(a) is None
    assert r.delete(a) == 0
    assert r.exists(a, b) == 1


def test_missing_key_is_none(r, prefix):
    assert r.get(prefix + "nope") is None
    assert r.mget([prefix + "nope", prefix + "nope2"]) == [None, None]


def test_mset_mget(r, prefix):
    keys = [f"{prefix}{i}" for i in range(10)]
    assert r.mset({k: f"v{i}" for i, k in enumerate(keys)}) is True
    assert r.mget(keys) == [f"v{i}".encode() for i in range(10)]
    assert r.mget(keys[0], prefix + "missing", keys[9]) == [b"v0", None, b"v9"]


def test_incr_decrby(r, prefix):
    n = prefix + "n"
    assert r.incr(n) == 1  # a missing key counts from 0
    assert r.incr(n) == 2
    assert r.incrby(n, 10) == 12
    assert r.decrby(n, 5) == 7
    assert r.decr(n) == 6
    assert r.decrby(n, 100) == -94
    assert r.get(n) == b"-94"
    assert r.decrby(prefix + "fresh", 3) == -3


def test_setnx_msetnx(r, prefix):
    a, b, c = prefix + "a", prefix + "b", prefix + "c"
    assert r.setnx(a, "first") is True
    assert r.setnx(a, "second") is False
    assert r.get(a) == b"first"
    assert r.msetnx({b: "1", c: "2"}) is True
    assert r.msetnx({c: "x", prefix + "d": "y"}) is False  # all or nothing
    assert r.mget(b, c, prefix + "d") == [b"1", b"2", None]


def test_strlen_type(r, prefix):
    k = prefix + "k"
    r.set(k, "hello")
    assert r.strlen(k) == 5
    assert r.strlen(prefix + "missing") == 0
    assert r.type(k) == b"string"
    assert r.type(prefix + "missing") == b"none"


def test_dbsize(r, prefix):
    # Tests run one at a time, so nothing else writes between the two counts.
    before = r.dbsize()
    assert isinstance(before, int)
    r.mset({prefix + "1": "a", prefix + "2": "b", prefix + "3": "c"})
    assert r.dbsize() == before + 3
    r.delete(prefix + "1")
    assert r.dbsize() == before + 2


def test_keys(r, prefix):
    names = [f"{prefix}{c}" for c in "abc"] + [prefix + "other"]
    r.mset({k: "1" for k in names})
    assert sorted(r.keys(prefix + "*")) == sorted(k.encode() for k in names)
    assert sorted(r.keys(prefix + "?")) == sorted(k.encode() for k in names[:3])
    assert r.keys(prefix + "zz*") == []


def test_scan_iter_500_keys(r, prefix):
    keys = {f"{prefix}{i}".encode() for i in range(500)}
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.set(k, "x")
    pipe.execute()

    # With MATCH: every key exactly once.
    found = list(r.scan_iter(match=prefix + "*", count=37))
    assert len(found) == len(keys)
    assert set(found) == keys

    # The whole keyspace (other tests' keys too): ours each exactly once.
    ours = [k for k in r.scan_iter(count=50) if k.startswith(prefix.encode())]
    assert len(ours) == len(keys)
    assert set(ours) == keys


def test_scan_cursor_shape(r, prefix):
    r.set(prefix + "k", "v")
    cursor, page = r.scan(0, match=prefix + "*", count=10)
    assert isinstance(cursor, int)
    assert isinstance(page, list)


def test_ping_echo_time(r):
    assert r.ping() is True
    assert r.echo("hello") == b"hello"
    assert r.echo(b"\x00\xff") == b"\x00\xff"
    seconds, micros = r.time()
    assert isinstance(seconds, int) and isinstance(micros, int)
    assert abs(seconds - time.time()) < 60
    assert 0 <= micros < 1_000_000


def test_info(r):
    info = r.info()
    assert isinstance(info, dict)
    assert info["role"] == "master"
    assert isinstance(info["connected_clients"], int)
    assert info["connected_clients"] >= 1
    server = r.info("server")
    assert "redis_version" in server
    assert "connected_clients" not in server  # only the section asked for


def test_config_get(r):
    maxclients = r.config_get("maxclients")
    assert isinstance(maxclients, dict)
    assert set(maxclients) == {"maxclients"}
    assert int(maxclients["maxclients"]) > 0
    assert r.config_get("no-such-setting-xyz") == {}


def test_client_setname_getname_id(r):
    assert r.client_getname() is None
    name = "kvtest-" + uuid.uuid4().hex[:8]
    assert r.client_setname(name) is True
    # redis-py returns bytes under protocol=3 and str otherwise (its own quirk;
    # real Redis gives the same).
    assert as_str(r.client_getname()) == name
    client_id = r.client_id()
    assert isinstance(client_id, int) and client_id > 0
    assert r.client_id() == client_id  # same connection


def test_command_count(r):
    count = r.command_count()
    assert isinstance(count, int)
    assert count > 0


def test_set_ex_sets_ttl(r, prefix):
    k = prefix + "k"
    assert r.set(k, "v", ex=100) is True
    assert 0 < r.ttl(k) <= 100
    assert r.set(k, "v", px=100_000) is True
    assert 0 < r.pttl(k) <= 100_000
    assert r.set(k, "v2", keepttl=True) is True
    assert 0 < r.pttl(k) <= 100_000
    assert r.set(k, "v3") is True  # a plain SET clears the TTL
    assert r.ttl(k) == -1
    assert r.ttl(prefix + "missing") == -2


def test_set_options(r, prefix):
    k, missing = prefix + "k", prefix + "missing"
    assert r.set(k, "v1", ex=100) is True
    assert r.get(k) == b"v1"
    assert r.set(k, "v2", px=100_000) is True
    assert r.get(k) == b"v2"
    assert r.set(k, "no", nx=True) is None  # exists: not set
    assert r.get(k) == b"v2"
    assert r.set(missing, "no", xx=True) is None  # missing: not set
    assert r.get(missing) is None
    assert r.set(k, "v3", xx=True) is True
    assert r.get(k) == b"v3"
    assert r.set(k, "v4", get=True) == b"v3"  # GET: the old value
    assert r.set(prefix + "new", "n", get=True) is None
    assert r.get(prefix + "new") == b"n"
    assert r.set(k, "v5", keepttl=True) is True
    assert r.get(k) == b"v5"
    assert r.set(k, "v6", xx=True, get=True) == b"v5"
    assert r.get(k) == b"v6"
    assert r.set(prefix + "nx", "1", nx=True, ex=100) is True
    assert r.get(prefix + "nx") == b"1"


def test_set_option_errors(r, prefix):
    k = prefix + "k"
    with pytest.raises(redis.ResponseError) as e:
        r.set(k, "v", ex=0)
    assert str(e.value) == "invalid expire time in 'set' command"
    with pytest.raises(redis.ResponseError) as e:
        r.execute_command("SET", k, "v", "NX", "XX")
    assert str(e.value) == "syntax error"
    assert r.get(k) is None


# --------------------------------------------------------------------------
# Values and decoding


def test_binary_values_round_trip(r, prefix):
    values = {
        "all-bytes": bytes(range(256)),
        "crlf": b"a\r\nb\r\n$3\r\n*1\r\n",
        "nul": b"\x00",
        "empty": b"",
        "big": os.urandom(1 << 20),
    }
    for name, value in values.items():
        assert r.set(prefix + name, value) is True
        assert r.get(prefix + name) == value, name
        assert r.strlen(prefix + name) == len(value)
    assert r.mget([prefix + n for n in values]) == list(values.values())
    binary_key = prefix.encode() + b"\x00\xff\r\n"
    assert r.set(binary_key, b"v") is True
    assert r.get(binary_key) == b"v"
    assert r.keys(prefix.encode() + b"\x00*") == [binary_key]


def test_decode_responses(connect, prefix):
    r = connect(decode_responses=True)
    k = prefix + "k"
    assert r.set(k, "héllo ✓") is True
    assert r.get(k) == "héllo ✓"
    assert r.mget(k, prefix + "missing") == ["héllo ✓", None]
    assert r.type(k) == "string"
    assert r.echo("x") == "x"
    assert r.keys(prefix + "*") == [k]
    assert r.set(k, "new", get=True) == "héllo ✓"
    assert r.client_setname("dec") is True
    assert r.client_getname() == "dec"
    config = r.config_get("maxclients")
    assert list(config) == ["maxclients"]
    assert isinstance(config["maxclients"], str)


# --------------------------------------------------------------------------
# Pipelines


def test_pipeline_1000_commands(r, prefix):
    pipe = r.pipeline(transaction=False)
    for i in range(1000):
        pipe.set(f"{prefix}{i}", i)
    results = pipe.execute()
    assert results == [True] * 1000

    pipe = r.pipeline(transaction=False)
    for i in range(1000):
        pipe.get(f"{prefix}{i}")
    assert pipe.execute() == [str(i).encode() for i in range(1000)]

    # Mixed commands, a missing key and an error in the middle.
    pipe = r.pipeline(transaction=False)
    for _ in range(997):
        pipe.incr(prefix + "counter")
    pipe.get(prefix + "missing")
    pipe.execute_command("GET")  # wrong number of arguments
    pipe.get(prefix + "counter")
    results = pipe.execute(raise_on_error=False)
    assert len(results) == 1000
    assert results[:997] == list(range(1, 998))
    assert results[997] is None
    assert isinstance(results[998], redis.ResponseError)
    assert str(results[998]) == "wrong number of arguments for 'get' command"
    assert results[999] == b"997"


# --------------------------------------------------------------------------
# Transactions (redis-py's default pipeline is MULTI ... EXEC)


def test_default_pipeline_is_an_atomic_transaction(r, prefix):
    k, n = prefix + "k", prefix + "n"
    pipe = r.pipeline()  # transaction=True by default
    pipe.set(k, "v").get(k).incr(n).incrby(n, 4).mget(k, n).exists(k, n)
    assert pipe.execute() == [True, b"v", 1, 5, [b"v", b"5"], 2]

    # A runtime error is one result; the rest applies (as Redis).
    pipe = r.pipeline()
    pipe.incr(k).set(prefix + "after", "1")
    results = pipe.execute(raise_on_error=False)
    assert isinstance(results[0], redis.ResponseError)
    assert str(results[0]) == "value is not an integer or out of range"
    assert results[1] is True
    assert r.get(prefix + "after") == b"1"

    # A command refused while queueing: EXECABORT, nothing applied.
    pipe = r.pipeline()
    pipe.set(prefix + "never", "1").execute_command("GET")
    with pytest.raises(redis.ResponseError) as e:
        pipe.execute()
    # redis-py answers EXECABORT by raising the first queueing error.
    assert "wrong number of arguments for 'get' command" in str(e.value)
    assert r.exists(prefix + "never") == 0
    # The connection is usable afterwards.
    assert r.ping() is True


def test_watch_transaction(connect, prefix):
    """redis-py's optimistic locking: WATCH, read, MULTI, write, EXEC; WatchError when
    the key changed in between."""
    r, other = connect(), connect()
    k = prefix + "balance"
    r.set(k, 10)

    def add(pipe):
        value = int(pipe.get(k))
        pipe.multi()
        pipe.set(k, value + 5)

    assert r.transaction(add, k) == [True]
    assert r.get(k) == b"15"

    with r.pipeline() as pipe:
        pipe.watch(k)
        other.set(k, 100)
        pipe.multi()
        pipe.set(k, 0)
        with pytest.raises(redis.WatchError):
            pipe.execute()
    assert r.get(k) == b"100"


# --------------------------------------------------------------------------
# Errors


def test_error_replies(r, prefix):
    with pytest.raises(redis.ResponseError) as e:
        r.execute_command("GET")
    assert str(e.value) == "wrong number of arguments for 'get' command"

    r.set(prefix + "s", "not a number")
    with pytest.raises(redis.ResponseError) as e:
        r.incr(prefix + "s")
    assert str(e.value) == "value is not an integer or out of range"
    with pytest.raises(redis.ResponseError) as e:
        r.decrby(prefix + "n", "x")
    assert str(e.value) == "value is not an integer or out of range"

    with pytest.raises(redis.ResponseError) as e:
        r.execute_command("NOSUCHCMD", "a", "b")
    assert str(e.value) == (
        "unknown command 'NOSUCHCMD', with args beginning with: 'a' 'b' "
    )

    # The connection is still usable after errors.
    assert r.set(prefix + "after", "ok") is True
    assert r.get(prefix + "after") == b"ok"


# --------------------------------------------------------------------------
# AUTH (--requirepass)


def test_requirepass_password_works(auth_server, mode, prefix):
    """RESP3 sends HELLO 3 AUTH default PW; RESP2 sends AUTH PW."""
    r = make_client(auth_server.port, mode, password=PASSWORD)
    try:
        assert r.set(prefix + "k", "v") is True
        assert r.get(prefix + "k") == b"v"
        assert r.client_info()["resp"] == ("2" if mode == "resp2" else "3")
    finally:
        r.close()


def test_requirepass_with_username_default(auth_server, mode, prefix):
    r = make_client(auth_server.port, mode, username="default", password=PASSWORD)
    try:
        assert r.ping() is True
    finally:
        r.close()


# No retries for the failing logins: redis-py retries connection errors
# (AuthenticationError is one) with backoff sleeps by default.
NO_RETRY = Retry(NoBackoff(), 0)


def test_requirepass_wrong_password(auth_server, mode):
    r = make_client(auth_server.port, mode, password="wrong", retry=NO_RETRY)
    try:
        with pytest.raises(redis.AuthenticationError) as e:
            r.ping()
        assert str(e.value) == "invalid username-password pair or user is disabled."
    finally:
        r.close()


def test_requirepass_no_password(auth_server, mode):
    r = make_client(auth_server.port, mode, retry=NO_RETRY)
    try:
        # RESP2: the command itself gets -NOAUTH; RESP3: HELLO 3 does.
        with pytest.raises(redis.AuthenticationError):
            r.get("k")
    finally:
        r.close()


def test_requirepass_url(auth_server, prefix):
    r = redis.Redis.from_url(
        f"redis://:{PASSWORD}@127.0.0.1:{auth_server.port}/0",
        socket_timeout=IO_TIMEOUT,
    )
    try:
        assert r.set(prefix + "k", "v") is True
        assert r.get(prefix + "k") == b"v"
    finally:
        r.close()


# --------------------------------------------------------------------------
# URLs


@pytest.mark.parametrize("query", ["", "?protocol=2", "?protocol=3"])
def test_from_url(server, prefix, query):
    r = redis.Redis.from_url(
        f"redis://127.0.0.1:{server.port}/0{query}", socket_timeout=IO_TIMEOUT
    )
    try:
        assert r.set(prefix + "k", "v") is True
        assert r.get(prefix + "k") == b"v"
        assert r.get(prefix + "missing") is None
        assert r.client_info()["resp"] == ("2" if query.endswith("2") else "3")
    finally:
        r.close()


# --------------------------------------------------------------------------
# Databases


@pytest.mark.parametrize("db", [1, 15])
def test_db_option_reads_and_writes_that_database(server, mode, prefix, db):
    """redis-py's ``db=N`` (SELECT N on connect) reaches database N, never 0."""
    other = make_client(server.port, mode, db=db)
    zero = make_client(server.port, mode)
    url = redis.Redis.from_url(
        f"redis://127.0.0.1:{server.port}/{db}", socket_timeout=IO_TIMEOUT
    )
    try:
        assert other.set(prefix + "k", "in-db") is True
        assert zero.get(prefix + "k") is None
        assert zero.set(prefix + "k", "in-zero") is True
        assert other.get(prefix + "k") == b"in-db"
        assert url.get(prefix + "k") == b"in-db"
        assert str(as_str(other.client_info()["db"])) == str(db)
    finally:
        other.delete(prefix + "k")
        zero.delete(prefix + "k")
        for c in (other, zero, url):
            c.close()


# --------------------------------------------------------------------------
# Raw sockets: the exact bytes


def encode(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def read_reply(f):
    """Reads one whole RESP2/RESP3 reply from a binary file; returns its bytes."""
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise AssertionError(f"truncated reply line: {line!r}")
    kind, rest = line[:1], line[1:-2]
    if kind in b"+-:_,#(":
        return line
    if kind in b"$!=":
        n = int(rest)
        if n < 0:
            return line
        body = f.read(n + 2)
        return line + body
    if kind in b"*~>":
        n = int(rest)
        return line + b"".join(read_reply(f) for _ in range(max(n, 0)))
    if kind in b"%|":
        n = int(rest)
        return line + b"".join(read_reply(f) for _ in range(2 * n))
    raise AssertionError(f"unknown reply type: {line!r}")


class Raw:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.sock.settimeout(IO_TIMEOUT)
        self.file = self.sock.makefile("rb")

    def call(self, *args):
        self.sock.sendall(encode(*args))
        return read_reply(self.file)

    def close(self):
        self.file.close()
        self.sock.close()


@pytest.fixture
def raw(server):
    conn = Raw(server.port)
    yield conn
    conn.close()


def bulk(s):
    s = s if isinstance(s, bytes) else s.encode()
    return b"$%d\r\n%s\r\n" % (len(s), s)


def test_raw_hello3_map_and_null(raw, prefix):
    reply = raw.call("HELLO", "3")
    assert reply.startswith(b"%7\r\n" + bulk("server") + bulk("redis") + bulk("version"))
    assert bulk("proto") + b":3\r\n" + bulk("id") + b":" in reply
    assert reply.endswith(
        bulk("mode")
        + bulk("standalone")
        + bulk("role")
        + bulk("master")
        + bulk("modules")
        + b"*0\r\n"
    )
    assert raw.call("GET", prefix + "missing") == b"_\r\n"
    raw.call("SET", prefix + "k", "v")
    assert raw.call("MGET", prefix + "k", prefix + "missing") == (
        b"*2\r\n" + bulk("v") + b"_\r\n"
    )
    assert raw.call("CONFIG", "GET", "maxclients").startswith(
        b"%1\r\n" + bulk("maxclients")
    )
    # Back to RESP2 on the same connection.
    assert raw.call("HELLO", "2").startswith(b"*14\r\n")
    assert raw.call("GET", prefix + "missing") == b"$-1\r\n"


def test_raw_resp2_null(raw, prefix):
    assert raw.call("GET", prefix + "missing") == b"$-1\r\n"
    assert raw.call("MGET", prefix + "missing") == b"*1\r\n$-1\r\n"
    assert raw.call("CONFIG", "GET", "maxclients").startswith(
        b"*2\r\n" + bulk("maxclients")
    )
