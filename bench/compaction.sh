#!/usr/bin/env bash
# What a compaction costs the clients and the machine: the longest pause a client sees
# while it runs, and the peak memory (RSS) it takes, with KEYS keys of VALUE_SIZE bytes;
# kvstore's compaction (BGSAVE) against redis-server's BGSAVE (a fork) in the same run.
#
# Usage:
#   bench/compaction.sh                 # build kvstore (release) and measure
#   bench/compaction.sh > result.md     # progress on stderr, Markdown on stdout
#
# Environment:
#   KVSTORE_BIN     kvstore binary to use; skips `cargo build --release` (to measure an
#                   older commit, build it apart and point this at its binary)
#   KVSTORE_COMMIT  what to report as kvstore's commit (default: the repo's HEAD)
#   KEYS            distinct keys to load (1000000)
#   VALUE_SIZE      bytes per value (100)
#   BENCH_TMPDIR    where the data dirs and the load file go (default $TMPDIR or /tmp;
#                   if that is tmpfs, target/ in the repo)
#
# Method. Each server is started fresh (`kvstore --fsync no --compact-min-size 1TiB`,
# so that nothing compacts during the load; `redis-server --save '' --appendonly no`)
# and loaded with KEYS keys key:000000000000 ... (`SET key value`, one RESP file sent
# by `redis-cli --pipe`). Then, twice per server:
#   idle         one client sends GETs of random keys back to back (each waits for its
#                reply) while BGSAVE runs;
#   with writes  the same, plus a second client sending SETs of random existing keys
#                back to back (for kvstore: the writes that make it keep pre-images).
# Before each BGSAVE the RSS is read once it stops changing, and the process's peak
# RSS is reset (`echo 5 > /proc/PID/clear_refs`); once the compaction is over (INFO:
# kvstore's aof_rewrite_in_progress 0 and log_compactions one more; Redis's
# rdb_bgsave_in_progress 0), VmHWM is the peak. For Redis the peak is the parent's
# VmHWM plus rdb_last_cow_size (the memory the fork's copy-on-write duplicated; the
# child's other pages are shared, not extra). The clients report their longest round
# trip (the pause they saw), p99.9 and count; "time" is from BGSAVE until the
# compaction is seen done (INFO polled every 50 ms).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KEYS=${KEYS:-1000000}
VALUE_SIZE=${VALUE_SIZE:-100}
START_DEADLINE=20     # seconds for an empty server to answer PING
STOP_DEADLINE=10      # seconds for a server to exit after SIGTERM (then SIGKILL)
LOAD_DEADLINE=600     # seconds for one redis-cli --pipe load
COMPACT_DEADLINE=600  # seconds for one compaction / BGSAVE
SETTLE_DEADLINE=30    # seconds for RSS to stop changing
SETTLE_SAMPLES=5      # ... = this many samples, 0.5 s apart, within SETTLE_TOLERANCE
SETTLE_TOLERANCE_KB=512
COMMAND_LINE="KEYS=$KEYS VALUE_SIZE=$VALUE_SIZE${KVSTORE_BIN:+ KVSTORE_BIN=$KVSTORE_BIN}${KVSTORE_COMMIT:+ KVSTORE_COMMIT=$KVSTORE_COMMIT} $0${*:+ $*}"

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

check_positive KEYS VALUE_SIZE
trap_cleanup
install_redis redis-server redis-cli
command -v python3 >/dev/null || die "python3 is needed (free ports, load file, clients)"
command -v timeout >/dev/null || die "timeout (coreutils) is needed"
build_kvstore
choose_tmpbase


info_field() { # info_field PORT SECTION FIELD -> value, or empty
    cli "$1" INFO "$2" | awk -F: -v f="$3" '$1 == f { sub(/\r$/, "", $2); print $2; exit }' || true
}


# wait_ping NAME PORT PID: until PING answers PONG (START_DEADLINE).
wait_ping() {
    local deadline=$((SECONDS + START_DEADLINE))
    until [[ $(cli "$2" PING 2>/dev/null) == PONG ]]; do
        kill -0 "$3" 2>/dev/null || die "$1 exited at start"
        ((SECONDS < deadline)) || die "$1 did not answer PING within ${START_DEADLINE}s"
        sleep 0.1
    done
}


load() { # load NAME PORT FILE: redis-cli --pipe; every reply a success, KEYS of them
    local out
    out=$(timeout "$LOAD_DEADLINE" redis-cli -h 127.0.0.1 -p "$2" --pipe <"$3" 2>&1) \
        || { log "loading $1 failed (or took over ${LOAD_DEADLINE}s):"; log "$out"; exit 1; }
    grep -q "errors: 0, replies: $KEYS" <<<"$out" \
        || { log "loading $1: expected 0 errors and $KEYS replies:"; log "$out"; exit 1; }
    [[ $(cli "$2" DBSIZE) == "$KEYS" ]] || die "$1: DBSIZE is not $KEYS after the load"
}

# The client: connects, creates the ready file, then sends GETs (or SETs) of random keys
# back to back, each waiting for its reply, until the stop file exists; prints
# "longest_ms p999_ms count" or "fail REASON".
CLIENT='
import os, random, socket, sys, time
port, mode, ready, stop, keys, size = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
try:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    rnd = random.Random(mode)
    value = b"y" * size
    open(ready, "w").close()
    lat, n = [], 0
    while n % 64 or not os.path.exists(stop):
        k = b"key:%012d" % rnd.randrange(keys)
        if mode == "get":
            req = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k)
        else:
            req = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, size, value)
        t = time.perf_counter()
        s.sendall(req)
        line = f.readline()
        if line.startswith(b"$") and not line.startswith(b"$-"):
            f.read(int(line[1:]) + 2)
        elif not line.startswith(b"+"):
            raise OSError("unexpected reply %r" % line[:80])
        lat.append(time.perf_counter() - t)
        n += 1
except OSError as e:
    open(ready, "w").close()
    print("fail %s" % e, flush=True)
    sys.exit(0)
lat.sort()
print("%.2f %.2f %d" % (lat[-1] * 1000, lat[int(len(lat) * 0.999)] * 1000, len(lat)), flush=True)
'

# start_client PORT MODE DIR: starts a client writing to DIR/MODE.out; returns once it
# is connected (sets CLIENT_PID).
start_client() {
    local deadline=$((SECONDS + START_DEADLINE))
    python3 -c "$CLIENT" "$1" "$2" "$3/$2.ready" "$3/stop" "$KEYS" "$VALUE_SIZE" >"$3/$2.out" 2>&1 &
    CLIENT_PID=$!
    PIDS+=("$CLIENT_PID")
    until [[ -e $3/$2.ready ]]; do
        kill -0 "$CLIENT_PID" 2>/dev/null || die "the $2 client exited: $(cat "$3/$2.out")"
        ((SECONDS < deadline)) || die "the $2 client did not connect within ${START_DEADLINE}s"
        sleep 0.05
    done
}

# client_result PID OUTFILE: waits for the client to stop; sets RESULT to its
# "longest p999 count". (Not in a $(...): the client is this shell's child.)
client_result() {
    wait "$1" 2>/dev/null || true
    forget_pid "$1"
    RESULT=$(head -n 1 "$2")
    [[ -n $RESULT && $RESULT != fail* ]] || die "a client failed: $(cat "$2")"
}

# compaction_round NAME KIND PORT PID SCENARIO: one BGSAVE with the clients running;
# appends a row to ROWS.
ROWS=() # server|scenario|rss kB|peak kB|get longest|get p999|gets|set longest|sets|time ms
compaction_round() {
    local name=$1 kind=$2 port=$3 pid=$4 scenario=$5 rss peak before=0 t0 t1 n get set="" cow=0
    rss=$(settled_rss "$name" "$pid" "$port")
    echo 5 >"/proc/$pid/clear_refs" || die "cannot reset the peak RSS of $name (/proc/$pid/clear_refs)"
    new_tmpdir kvcompact
    local cdir=$TMPDIR_NEW
    start_client "$port" get "$cdir"
    local get_pid=$CLIENT_PID set_pid=""
    if [[ $scenario == "with writes" ]]; then
        start_client "$port" set "$cdir"
        set_pid=$CLIENT_PID
    fi
    if [[ $kind == kvstore ]]; then
        before=$(info_field "$port" persistence log_compactions)
    fi
    t0=$EPOCHREALTIME
    [[ $(cli "$port" BGSAVE) == "Background saving started" ]] || die "$name: BGSAVE refused"
    local deadline=$((SECONDS + COMPACT_DEADLINE))
    while :; do
        if [[ $kind == kvstore ]]; then
            # aof_rewrite_in_progress is kvstore's "a compaction runs".
            n=$(info_field "$port" persistence log_compactions)
            [[ $(info_field "$port" persistence aof_rewrite_in_progress) == 0 ]] \
                && ((${n:-0} > before)) && break
        else
            [[ $(info_field "$port" persistence rdb_bgsave_in_progress) == 0 ]] && break
        fi
        ((SECONDS < deadline)) || die "$name: compaction still running after ${COMPACT_DEADLINE}s"
        sleep 0.05
    done
    t1=$EPOCHREALTIME
    touch "$cdir/stop"
    client_result "$get_pid" "$cdir/get.out"
    get=$RESULT
    if [[ -n $set_pid ]]; then
        client_result "$set_pid" "$cdir/set.out"
        set=$RESULT
    fi
    peak=$(status_kb "$pid" VmHWM)
    if [[ $kind == redis ]]; then
        [[ $(info_field "$port" persistence rdb_last_bgsave_status) == ok ]] || die "$name: BGSAVE failed"
        cow=$(info_field "$port" persistence rdb_last_cow_size)
        peak=$((peak + ${cow:-0} / 1024))
        log "   $name: fork took $(info_field "$port" stats latest_fork_usec) us, copy-on-write ${cow:-?} B"
    fi
    read -r gl gp gn <<<"$get"
    read -r sl _ sn <<<"${set:-- - -}"
    local ms
    ms=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", (b - a) * 1000 }')
    log "   $name, $scenario: RSS $rss kB, peak $peak kB; GET longest $gl ms (p99.9 $gp, $gn GETs); SET longest $sl ms ($sn SETs); $ms ms"
    ROWS+=("$name|$scenario|$rss|$peak|$gl|$gp|$gn|$sl|$sn|$ms")
}

START_TS=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
log "kvstore: $KVSTORE_BIN; files under $TMPBASE ($FSTYPE); $KEYS keys, ${VALUE_SIZE}-byte values"
new_tmpdir kvcompact
DATA=$TMPDIR_NEW
python3 - "$KEYS" "$VALUE_SIZE" "$DATA/load.resp" <<'EOF'
import sys
keys, size = int(sys.argv[1]), int(sys.argv[2])
val = b"$%d\r\n%s\r\n" % (size, b"x" * size)
with open(sys.argv[3], "wb") as out:
    for start in range(0, keys, 10000):
        out.write(b"".join(
            b"*3\r\n$3\r\nSET\r\n$16\r\nkey:%012d\r\n" % i + val
            for i in range(start, min(start + 10000, keys))))
EOF

for kind in kvstore redis; do
    new_tmpdir kvcompact
    dir=$TMPDIR_NEW
    port=$(free_port)
    if [[ $kind == kvstore ]]; then
        name=kvstore
        "$KVSTORE_BIN" server "$port" --data-dir "$dir/data" --fsync no --bind 127.0.0.1 \
            --compact-min-size $((1 << 40)) </dev/null >>"$dir/server.log" 2>&1 &
    else
        name=redis-server
        redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
            --daemonize no </dev/null >>"$dir/server.log" 2>&1 &
    fi
    pid=$!
    PIDS+=("$pid")
    wait_ping "$name" "$port" "$pid"
    log "== $name: loading $KEYS keys"
    load "$name" "$port" "$DATA/load.resp"
    for scenario in idle "with writes"; do
        compaction_round "$name" "$kind" "$port" "$pid" "$scenario"
    done
    stop_server "$pid"
done

keys_fmt=$(sed ':a; s/\B[0-9]\{3\}\>/,&/; ta' <<<"$KEYS") # 1000000 -> 1,000,000
{
    echo "### Compaction (BGSAVE) of $keys_fmt keys of $VALUE_SIZE bytes: pause and peak memory"
    echo
    echo "| server | clients during it | RSS before | peak RSS | peak / RSS | longest GET | GET p99.9 | longest SET | time |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    for row in "${ROWS[@]}"; do
        IFS='|' read -r name scenario rss peak gl gp gn sl sn ms <<<"$row"
        printf '| %s | %s | %s MiB | %s MiB | %s | %s ms | %s ms | %s | %s ms |\n' \
            "$name" "$scenario" "$(awk -v k="$rss" 'BEGIN { printf "%.0f", k / 1024 }')" \
            "$(awk -v k="$peak" 'BEGIN { printf "%.0f", k / 1024 }')" \
            "$(awk -v a="$peak" -v b="$rss" 'BEGIN { printf "%.2f", a / b }')" \
            "$gl" "$gp" "$([[ $sl == - ]] && echo - || echo "$sl ms")" "$ms"
    done
    echo
    echo "GET/SET: random existing keys, one client each, back to back (each waits for its"
    echo "reply); longest = the longest round trip during the compaction, i.e. the pause a"
    echo "client saw. Peak: VmHWM after resetting it just before BGSAVE (Redis: the parent's,"
    echo "plus rdb_last_cow_size). Time: BGSAVE until INFO shows it done (50 ms polls)."
    echo
    report_footer
}
