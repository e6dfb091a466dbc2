#!/usr/bin/env bash
# SCAN against redis-server, in the same run: the latency of one `SCAN 0 COUNT 10`, the
# time of a full `SCAN … COUNT 10` pass (as `redis-cli --scan` does it), and the GET
# latency another client sees meanwhile (issue 10, item 8).
#
# Usage:
#   bench/scan.sh                    # build kvstore (release) and measure
#   bench/scan.sh > result.md        # progress on stderr, Markdown on stdout
#
# Environment:
#   KVSTORE_BIN     kvstore binary to use; skips `cargo build --release`
#   KVSTORE_COMMIT  what to report as kvstore's commit (default: the repo's HEAD)
#   KEYS            distinct keys to load (600000)
#   CALLS           `SCAN 0 COUNT 10` calls timed per server (2000)
#   PASSES          full passes per server, alternating kvstore/redis (3)
#   PASS_DEADLINE   seconds after which a pass is abandoned and reported as such (600;
#                   the O(n)-per-call SCAN of old kvstore builds needs hours)
#   BENCH_TMPDIR    where the data dirs and the load file go (see bench/lib.sh)
#
# Data set: KEYS keys key:000000000000 … with 32-byte values, written once by python3
# as a RESP file and sent to both servers with `redis-cli --pipe`. Servers:
# `kvstore --fsync no` and `redis-server --save '' --appendonly no`.
#
# Latency: one client sends `SCAN 0 COUNT 10` CALLS times, one at a time, and times
# each round trip (median, p99, max). Full pass: one client runs SCAN from cursor 0
# with COUNT 10 until the cursor is 0 again, checks that it saw every key and records
# the largest cursor; meanwhile a second client (its own process) sends GETs of
# random keys one at a time and records their latency (p50, p99, max).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KEYS=${KEYS:-600000}
CALLS=${CALLS:-2000}
PASSES=${PASSES:-3}
PASS_DEADLINE=${PASS_DEADLINE:-600}
START_DEADLINE=20 # seconds for a server to answer PING
STOP_DEADLINE=10  # seconds for a server to exit after SIGTERM (then SIGKILL)
LOAD_DEADLINE=600 # seconds for the redis-cli --pipe load
COMMAND_LINE="KEYS=$KEYS CALLS=$CALLS PASSES=$PASSES PASS_DEADLINE=$PASS_DEADLINE${KVSTORE_BIN:+ KVSTORE_BIN=$KVSTORE_BIN}${KVSTORE_COMMIT:+ KVSTORE_COMMIT=$KVSTORE_COMMIT} $0${*:+ $*}"

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

check_positive KEYS CALLS PASSES PASS_DEADLINE
trap_cleanup
install_redis redis-server redis-cli
command -v python3 >/dev/null || die "python3 is needed (free ports, load file, timing)"
command -v timeout >/dev/null || die "timeout (coreutils) is needed"
build_kvstore
choose_tmpbase
START_TS=$(date -u '+%Y-%m-%d %H:%M:%S UTC')

start() { # start NAME LOGFILE PORT CMD... ; sets STARTED_PID once PING answers
    local name=$1 logfile=$2 port=$3 deadline=$((SECONDS + START_DEADLINE))
    shift 3
    "$@" </dev/null >"$logfile" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    until [[ $(redis-cli -h 127.0.0.1 -p "$port" PING 2>/dev/null) == PONG ]]; do
        kill -0 "$STARTED_PID" 2>/dev/null || { tail -n 30 "$logfile" >&2; die "$name exited"; }
        ((SECONDS < deadline)) || die "$name did not answer PING within ${START_DEADLINE}s"
        sleep 0.05
    done
}

load() { # load NAME PORT FILE: every reply a success, KEYS keys afterwards
    local out n
    out=$(timeout "$LOAD_DEADLINE" redis-cli -h 127.0.0.1 -p "$2" --pipe <"$3" 2>&1) \
        || die "loading $1 failed: $out"
    [[ $out == *"errors: 0, replies: $KEYS"* ]] || die "loading $1: $out"
    n=$(redis-cli -h 127.0.0.1 -p "$2" DBSIZE)
    [[ $n == "$KEYS" ]] || die "$1: DBSIZE is $n after the load, expected $KEYS"
}

# The client: `latency PORT CALLS` or `pass PORT KEYS DEADLINE` (prints one line of
# key=value), or `gets PORT KEYS` (GETs until stdin closes, then prints its line).
CLIENT='
import random, socket, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = s.makefile("rb")
def cmd(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    s.sendall(out)
    return reply()
def reply():
    line = f.readline()
    t, rest = line[:1], line[1:-2]
    if t in (b"+", b":"):
        return rest
    if t == b"-":
        raise SystemExit("server error: %r" % rest)
    if t == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2]
    if t == b"*":
        return [reply() for _ in range(int(rest))]
    raise SystemExit("unexpected reply %r" % line)
def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p))] * 1000
if mode == "latency":
    calls, ts = int(sys.argv[3]), []
    for _ in range(calls):
        t0 = time.perf_counter()
        cmd("SCAN", 0, "COUNT", 10)
        ts.append(time.perf_counter() - t0)
    print("median=%.3f p99=%.3f max=%.3f" % (pct(ts, 0.5), pct(ts, 0.99), max(ts) * 1000))
elif mode == "pass":
    keys, deadline = int(sys.argv[3]), float(sys.argv[4])
    seen, cursor, calls, top, worst = set(), b"0", 0, 0, 0.0
    t0 = time.perf_counter()
    while True:
        t1 = time.perf_counter()
        cursor, batch = cmd("SCAN", cursor, "COUNT", 10)
        worst = max(worst, time.perf_counter() - t1)
        calls += 1
        seen.update(batch)
        top = max(top, int(cursor))
        if cursor == b"0" or time.perf_counter() - t0 > deadline:
            break
    secs = time.perf_counter() - t0
    done = cursor == b"0"
    if done and len(seen) != keys:
        raise SystemExit("a full pass saw %d keys of %d" % (len(seen), keys))
    print("done=%d secs=%.2f calls=%d found=%d maxcursor=%d worst=%.3f" % (done, secs, calls, len(seen), top, worst * 1000))
elif mode == "gets":
    keys, ts = int(sys.argv[3]), []
    import select
    while not select.select([sys.stdin], [], [], 0)[0]:
        k = b"key:%012d" % random.randrange(keys)
        t0 = time.perf_counter()
        cmd("GET", k)
        ts.append(time.perf_counter() - t0)
    print("gets=%d p50=%.3f p99=%.3f max=%.3f" % (len(ts), pct(ts, 0.5), pct(ts, 0.99), max(ts) * 1000))
'

field() { sed -n "s/.*\\b$1=\\([^ |]*\\).*/\\1/p" <<<"$2"; }

new_tmpdir kvscan
DATA=$TMPDIR_NEW
log "writing the load file: $KEYS keys (python3)"
python3 - "$KEYS" "$DATA/load.resp" <<'EOF'
import sys
keys, path = int(sys.argv[1]), sys.argv[2]
val = b"$32\r\n" + b"x" * 32 + b"\r\n"
with open(path, "wb") as out:
    for start in range(0, keys, 10000):
        out.write(b"".join(
            b"*3\r\n$3\r\nSET\r\n$16\r\nkey:%012d\r\n" % i + val
            for i in range(start, min(start + 10000, keys))))
EOF

kv_port=$(free_port)
start kvstore "$DATA/kvstore.log" "$kv_port" \
    "$KVSTORE_BIN" server "$kv_port" --data-dir "$DATA/kv" --fsync no --bind 127.0.0.1
kv_pid=$STARTED_PID
rd_port=$(free_port)
start redis-server "$DATA/redis.log" "$rd_port" \
    redis-server --port "$rd_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$DATA" --daemonize no
rd_pid=$STARTED_PID
log "loading both servers"
load kvstore "$kv_port" "$DATA/load.resp"
load redis-server "$rd_port" "$DATA/load.resp"

log "== SCAN 0 COUNT 10, $CALLS calls each"
kv_lat=$(python3 -c "$CLIENT" latency "$kv_port" "$CALLS")
rd_lat=$(python3 -c "$CLIENT" latency "$rd_port" "$CALLS")
log "   kvstore: $kv_lat"
log "   redis:   $rd_lat"

pass() { # pass PORT -> "pass-line|gets-line"
    local p out gets
    coproc GETS { python3 -c "$CLIENT" gets "$1" "$KEYS"; }
    p=$GETS_PID
    out=$(python3 -c "$CLIENT" pass "$1" "$KEYS" "$PASS_DEADLINE")
    exec {GETS[1]}>&-
    read -r -u "${GETS[0]}" gets || gets="gets=0"
    wait "$p" 2>/dev/null || true
    printf '%s|%s\n' "$out" "$gets"
}

KV_PASSES=()
RD_PASSES=()
for ((i = 1; i <= PASSES; i++)); do
    log "== full pass $i of $PASSES (COUNT 10), with a GET client alongside"
    KV_PASSES+=("$(pass "$kv_port")")
    log "   kvstore: ${KV_PASSES[-1]}"
    RD_PASSES+=("$(pass "$rd_port")")
    log "   redis:   ${RD_PASSES[-1]}"
done
stop_server "$kv_pid"
stop_server "$rd_pid"

col() { # col FIELD ROWS... -> the field of each row (pass part before | or GET part after)
    local f=$1 r
    shift
    for r in "$@"; do field "$f" "$r"; done
}
med() { # med FIELD ROWS... -> median (3 decimals kept for ms fields)
    col "$@" | sort -g | awk '{ v[NR] = $1 } END {
        if (NR % 2) m = v[(NR + 1) / 2]; else m = (v[NR / 2] + v[NR / 2 + 1]) / 2; print m }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }

kv_done=$(col done "${KV_PASSES[@]}" | sort -u | tr '\n' ' ')
keys_fmt=$(sed ':a; s/\B[0-9]\{3\}\>/,&/; ta' <<<"$KEYS")
{
    echo "### SCAN with $keys_fmt keys: kvstore vs redis-server"
    echo
    echo "| measure | kvstore | redis | kvstore/redis |"
    echo "|---|---:|---:|---:|"
    for f in median p99 max; do
        a=$(field "$f" "$kv_lat") b=$(field "$f" "$rd_lat")
        echo "| \`SCAN 0 COUNT 10\` $f, ms | $a | $b | $(ratio "$a" "$b") |"
    done
    if [[ $kv_done == "1 " ]]; then
        a=$(med secs "${KV_PASSES[@]}") b=$(med secs "${RD_PASSES[@]}")
        echo "| full pass (COUNT 10), s, median of $PASSES | $a | $b | $(ratio "$a" "$b") |"
    else
        echo "| full pass (COUNT 10) | not finished in ${PASS_DEADLINE}s | $(med secs "${RD_PASSES[@]}") s | |"
    fi
    a=$(med calls "${KV_PASSES[@]}") b=$(med calls "${RD_PASSES[@]}")
    echo "| calls in a pass | $a | $b | |"
    a=$(med maxcursor "${KV_PASSES[@]}") b=$(med maxcursor "${RD_PASSES[@]}")
    echo "| largest cursor | $a | $b | |"
    a=$(med worst "${KV_PASSES[@]}") b=$(med worst "${RD_PASSES[@]}")
    echo "| slowest call in a pass, ms | $a | $b | |"
    for f in p50 p99 max; do
        a=$(med "$f" "${KV_PASSES[@]#*|}") b=$(med "$f" "${RD_PASSES[@]#*|}")
        echo "| other client's GET $f during a pass, ms | $a | $b | $(ratio "$a" "$b") |"
    done
    echo
    echo "\`kvstore --fsync no\` vs \`redis-server --save '' --appendonly no\`, $keys_fmt keys"
    echo "\`key:000000000000\` … with 32-byte values. Latency: $CALLS round trips of"
    echo "\`SCAN 0 COUNT 10\` from one python3 client (its own overhead included, same for both)."
    echo "Full pass: SCAN from 0 with COUNT 10 until 0 (as \`redis-cli --scan\`), every key"
    echo "found; a second client sends GETs of random keys meanwhile. Per-pass results:"
    echo
    for ((i = 0; i < PASSES; i++)); do
        echo "- pass $((i + 1)): kvstore \`${KV_PASSES[i]}\`; redis \`${RD_PASSES[i]}\`"
    done
    echo "- latency: kvstore \`$kv_lat\`; redis \`$rd_lat\`"
    echo
    report_footer
}
