#!/usr/bin/env bash
# Memory held (RSS) by 1,000,000 keys, and the time to restart after a kill -9 with
# them, kvstore against redis-server in the same run (see DESIGN.md, "Tests and
# benchmarks": "the memory held (RSS) and the time to replay it after a kill -9").
#
# Usage:
#   bench/memory.sh                  # build kvstore (release) and measure
#   bench/memory.sh > result.md      # progress on stderr, Markdown on stdout
#
# Environment:
#   KVSTORE_BIN     kvstore binary to use; skips `cargo build --release`
#   KVSTORE_COMMIT  what to report as kvstore's commit (default: the repo's HEAD,
#                   marked if the work tree has uncommitted changes)
#   KEYS            distinct keys to load (1000000)
#   VALUE_SIZE      bytes per value (32)
#   TTL             seconds, for the data set with expiry (3600)
#   RESTARTS        kill -9 + restart rounds per server and mode (3)
#   BENCH_TMPDIR    where the data dirs and load files go (default $TMPDIR or /tmp;
#                   if that is tmpfs, target/ in the repo: its files would count
#                   as memory, and fsync would mean nothing)
#
# The data sets are exactly KEYS distinct keys key:000000000000, key:000000000001,
# ... (redis-benchmark's __rand_int__ format), each with a VALUE_SIZE-byte value:
# one as `SET key value EX TTL`, one as plain `SET key value`. python3 writes them
# once as RESP files, and `redis-cli --pipe` sends the same bytes to both servers.
#
# Memory: per data set, a fresh `kvstore --fsync no` and a fresh `redis-server
# --save '' --appendonly no`; RSS (VmRSS of /proc/PID/status) is read once it has
# stopped changing (or after a deadline), before and after the load.
#
# Restart: a fresh kvstore (--fsync no) and a fresh redis-server (--appendonly yes
# --appendfsync everysec) load the data set with expiry; then, RESTARTS times,
# alternating: kill -9, start again on the same data, and time from the start of
# the process until PING answers PONG (Redis answers -LOADING until its data is
# in); DBSIZE must then be KEYS again. Two modes:
#   log replay  no log compaction (kvstore --compact-min-size 1 TiB) and no AOF
#               rewrite (redis --auto-aof-rewrite-percentage 0): both replay
#               every command of the load;
#   defaults    each server's default compaction/rewrite policy; whatever
#               snapshot (kvstore) or RDB preamble (Redis) it wrote during the
#               load is what the restart reads. The kill comes after any
#               compaction/rewrite in progress has finished.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KEYS=${KEYS:-1000000}
VALUE_SIZE=${VALUE_SIZE:-32}
TTL=${TTL:-3600}
RESTARTS=${RESTARTS:-3}
START_DEADLINE=20     # seconds for an empty server to answer PING
STOP_DEADLINE=10      # seconds for a server to exit after SIGTERM (then SIGKILL)
LOAD_DEADLINE=600     # seconds for one redis-cli --pipe load
RESTART_DEADLINE=600  # seconds for a restarted server to answer PONG
SETTLE_DEADLINE=30    # seconds for RSS to stop changing
SETTLE_SAMPLES=5      # ... = this many samples, 0.5 s apart, within SETTLE_TOLERANCE
SETTLE_TOLERANCE_KB=512
BACKGROUND_DEADLINE=300 # seconds for a compaction / AOF rewrite to finish
COMMAND_LINE="KEYS=$KEYS VALUE_SIZE=$VALUE_SIZE TTL=$TTL RESTARTS=$RESTARTS${KVSTORE_BIN:+ KVSTORE_BIN=$KVSTORE_BIN}${KVSTORE_COMMIT:+ KVSTORE_COMMIT=$KVSTORE_COMMIT} $0${*:+ $*}"

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

check_positive KEYS VALUE_SIZE TTL RESTARTS
trap_cleanup
install_redis redis-server redis-cli
command -v python3 >/dev/null || die "python3 is needed (free ports, load files, timing)"
command -v timeout >/dev/null || die "timeout (coreutils) is needed"
build_kvstore
choose_tmpbase


info_field() { # info_field PORT SECTION FIELD -> value, or empty
    cli "$1" INFO "$2" | awk -F: -v f="$3" '$1 == f { sub(/\r$/, "", $2); print $2; exit }' || true
}

# --- servers ------------------------------------------------------------------
# Command lines; the data dir / port go in as arguments.
kvstore_cmd() { # kvstore_cmd PORT DIR EXTRA...
    local port=$1 dir=$2
    shift 2
    KV_CMD=("$KVSTORE_BIN" server "$port" --data-dir "$dir" --fsync no --bind 127.0.0.1 "$@")
}
redis_cmd() { # redis_cmd PORT DIR EXTRA...
    local port=$1 dir=$2
    shift 2
    RD_CMD=(redis-server --port "$port" --bind 127.0.0.1 --save '' --dir "$dir" --daemonize no "$@")
}

# The poller for timed_start: started before the server (python3 alone takes ~0.1 s
# to start), it says "ready", reads the server's pid, then sends PING every 2 ms
# until the answer is +PONG (an error such as -LOADING, or a refused connection,
# is retried), and prints "pong TIME" (epoch seconds) or "fail REASON".
POLLER='
import socket, sys, time
port, deadline = int(sys.argv[1]), float(sys.argv[2])
print("ready", flush=True)
pid = int(sys.stdin.readline())
end = time.time() + deadline
sock, f, last = None, None, "no connection"
def alive():
    try:
        with open("/proc/%d/stat" % pid) as st:
            return st.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
while time.time() < end:
    if not alive():
        print("fail process %d exited (last: %s)" % (pid, last), flush=True)
        sys.exit(0)
    try:
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            f = sock.makefile("rb")
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        line = f.readline()
        if line.startswith(b"+PONG"):
            print("pong %.6f" % time.time(), flush=True)
            sys.exit(0)
        if not line:
            raise OSError("connection closed")
        last = line.decode(errors="replace").strip()
    except OSError as e:
        last = str(e)
        if sock is not None:
            sock.close()
        sock = None
    time.sleep(0.002)
print("fail no PONG within %.0f s (last: %s)" % (deadline, last), flush=True)
'

# timed_start NAME LOGFILE PORT DEADLINE CMD... : starts the server (its output
# appended to LOGFILE); sets STARTED_PID, and STARTED_MS, the milliseconds from
# its start until it answered PONG. Fails if it exits or misses the deadline.
timed_start() {
    local name=$1 logfile=$2 port=$3 deadline=$4 line="" t0 poller
    shift 4
    coproc POLL { python3 -c "$POLLER" "$port" "$deadline"; }
    poller=$POLL_PID
    PIDS+=("$poller")
    read -r -u "${POLL[0]}" line || true
    [[ $line == ready ]] || die "the PING poller did not start"
    t0=$EPOCHREALTIME
    "$@" </dev/null >>"$logfile" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    printf '%s\n' "$STARTED_PID" >&"${POLL[1]}"
    read -r -u "${POLL[0]}" line || line="fail the poller exited"
    wait "$poller" 2>/dev/null || true
    forget_pid "$poller"
    if [[ $line != "pong "* ]]; then
        log "$name on port $port: ${line#fail }; its log ($logfile):"
        tail -n 30 "$logfile" >&2 || true
        exit 1
    fi
    STARTED_MS=$(awk -v a="$t0" -v b="${line#pong }" 'BEGIN { printf "%.0f", (b - a) * 1000 }')
}

kill9() { # kill9 PID: SIGKILL and reap
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    forget_pid "$1"
}

# --- measuring ----------------------------------------------------------------


# load NAME PORT FILE: sends FILE with redis-cli --pipe; every reply must be a
# success and there must be KEYS of them.
load() {
    local name=$1 port=$2 file=$3 out errors replies t0 t1
    t0=$EPOCHREALTIME
    out=$(timeout "$LOAD_DEADLINE" redis-cli -h 127.0.0.1 -p "$port" --pipe <"$file" 2>&1) \
        || { log "loading $name failed (or took over ${LOAD_DEADLINE}s):"; log "$out"; exit 1; }
    t1=$EPOCHREALTIME
    errors=$(sed -n 's/.*errors: \([0-9]*\), replies: \([0-9]*\).*/\1/p' <<<"$out")
    replies=$(sed -n 's/.*errors: \([0-9]*\), replies: \([0-9]*\).*/\2/p' <<<"$out")
    [[ $errors == 0 && $replies == "$KEYS" ]] \
        || { log "loading $name: expected 0 errors and $KEYS replies:"; log "$out"; exit 1; }
    log "   $name: loaded $KEYS keys in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
}

check_dbsize() { # check_dbsize NAME PORT -> prints DBSIZE; dies unless it is KEYS
    local n
    n=$(cli "$2" DBSIZE) || true
    [[ $n == "$KEYS" ]] || die "$1: DBSIZE is '$n', expected $KEYS"
    printf '%s\n' "$n"
}

check_expires() { # check_expires NAME PORT WANT: INFO keyspace db0 expires= (if reported)
    local e
    e=$(info_field "$2" keyspace db0 | sed -n 's/.*expires=\([0-9]*\).*/\1/p')
    if [[ -z $e ]]; then
        log "   $1: INFO keyspace reports no expires count; not checked"
    elif [[ $e != "$3" ]]; then
        die "$1: INFO keyspace says expires=$e, expected $3"
    fi
}

# wait_background NAME PORT: until neither a kvstore compaction nor a Redis AOF
# rewrite runs or is scheduled (INFO persistence), at most BACKGROUND_DEADLINE.
wait_background() {
    local deadline=$((SECONDS + BACKGROUND_DEADLINE)) a b
    while :; do
        a=$(info_field "$2" persistence aof_rewrite_in_progress)
        b=$(info_field "$2" persistence aof_rewrite_scheduled)
        [[ ${a:-0} == 0 && ${b:-0} == 0 ]] && return 0
        ((SECONDS < deadline)) || die "$1: compaction/rewrite still running after ${BACKGROUND_DEADLINE}s"
        sleep 0.2
    done
}

mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
per_key() { awk -v k="$1" -v n="$KEYS" 'BEGIN { printf "%.0f", k * 1024 / n }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
disk_usage() { # bytes in the files under DIR
    find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f", s }'
}
files_of() { # a short listing "name (size B), ..." of the files under DIR
    (cd "$1" && find . -type f -printf '%P %s\n' | sort \
        | awk '{ printf "%s%s (%s B)", (NR > 1 ? ", " : ""), $1, $2 }')
}

# --- data sets ------------------------------------------------------------------
START_TS=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
log "kvstore: $KVSTORE_BIN; files under $TMPBASE ($FSTYPE); $KEYS keys, ${VALUE_SIZE}-byte values"
new_tmpdir kvmem
DATA=$TMPDIR_NEW
log "writing the load files (python3)"
python3 - "$KEYS" "$VALUE_SIZE" "$TTL" "$DATA/ex.resp" "$DATA/plain.resp" <<'EOF'
import sys
keys, size, ttl = int(sys.argv[1]), int(sys.argv[2]), str(sys.argv[3]).encode()
value = b"x" * size
head_ex = b"*5\r\n$3\r\nSET\r\n"
head_plain = b"*3\r\n$3\r\nSET\r\n"
val = b"$%d\r\n%s\r\n" % (len(value), value)
tail_ex = b"$2\r\nEX\r\n$%d\r\n%s\r\n" % (len(ttl), ttl)
with open(sys.argv[4], "wb") as ex, open(sys.argv[5], "wb") as plain:
    step = 10000
    for start in range(0, keys, step):
        a, b = [], []
        for i in range(start, min(start + step, keys)):
            k = b"key:%012d" % i
            kb = b"$%d\r\n%s\r\n" % (len(k), k)
            a.append(head_ex + kb + val + tail_ex)
            b.append(head_plain + kb + val)
        ex.write(b"".join(a))
        plain.write(b"".join(b))
EOF
log "   $(du -h "$DATA/ex.resp" | cut -f1) with expiry, $(du -h "$DATA/plain.resp" | cut -f1) plain"

# --- memory ---------------------------------------------------------------------
MEM_ROWS=() # label|kv empty|kv loaded|rd empty|rd loaded|kv compactions
for set in ex plain; do
    if [[ $set == ex ]]; then label="SET EX $TTL"; else label="SET"; fi
    log "== memory, $label: kvstore --fsync no vs redis-server --appendonly no"
    new_tmpdir kvmem
    kv_dir=$TMPDIR_NEW
    kv_port=$(free_port)
    kvstore_cmd "$kv_port" "$kv_dir/data"
    timed_start kvstore "$kv_dir/kvstore.log" "$kv_port" "$START_DEADLINE" "${KV_CMD[@]}"
    kv_pid=$STARTED_PID
    new_tmpdir kvmem
    rd_dir=$TMPDIR_NEW
    rd_port=$(free_port)
    redis_cmd "$rd_port" "$rd_dir" --appendonly no
    timed_start redis-server "$rd_dir/redis.log" "$rd_port" "$START_DEADLINE" "${RD_CMD[@]}"
    rd_pid=$STARTED_PID

    kv_empty=$(settled_rss kvstore "$kv_pid" "$kv_port")
    rd_empty=$(settled_rss redis-server "$rd_pid" "$rd_port")
    load kvstore "$kv_port" "$DATA/$set.resp"
    load redis-server "$rd_port" "$DATA/$set.resp"
    check_dbsize kvstore "$kv_port" >/dev/null
    check_dbsize redis-server "$rd_port" >/dev/null
    want=$KEYS
    [[ $set == ex ]] || want=0
    check_expires kvstore "$kv_port" "$want"
    check_expires redis-server "$rd_port" "$want"
    wait_background kvstore "$kv_port" # a compaction's snapshot is not the data set
    kv_compactions=$(info_field "$kv_port" persistence log_compactions)
    kv_loaded=$(settled_rss kvstore "$kv_pid" "$kv_port")
    rd_loaded=$(settled_rss redis-server "$rd_pid" "$rd_port")
    log "   RSS kB: kvstore $kv_empty -> $kv_loaded (log compactions: ${kv_compactions:-?}); redis $rd_empty -> $rd_loaded"
    MEM_ROWS+=("$label|$kv_empty|$kv_loaded|$rd_empty|$rd_loaded|${kv_compactions:-?}")
    stop_server "$kv_pid"
    stop_server "$rd_pid"
done

# --- restart after kill -9 ---------------------------------------------------------
RESTART_ROWS=() # mode|kv median|rd median|kv runs|rd runs|kv disk|rd disk|kv files|rd files|kv empty ms|rd empty ms
for mode in "log replay" defaults; do
    kv_extra=()
    rd_extra=()
    if [[ $mode == "log replay" ]]; then
        kv_extra=(--compact-min-size $((1 << 40)))
        rd_extra=(--auto-aof-rewrite-percentage 0)
    fi
    log "== restart after kill -9 ($mode), data set SET EX $TTL"
    new_tmpdir kvmem
    kv_dir=$TMPDIR_NEW
    kv_port=$(free_port)
    kvstore_cmd "$kv_port" "$kv_dir/data" "${kv_extra[@]}"
    kv_cmd=("${KV_CMD[@]}")
    timed_start kvstore "$kv_dir/kvstore.log" "$kv_port" "$START_DEADLINE" "${kv_cmd[@]}"
    kv_pid=$STARTED_PID
    kv_empty_ms=$STARTED_MS
    new_tmpdir kvmem
    rd_dir=$TMPDIR_NEW
    rd_port=$(free_port)
    redis_cmd "$rd_port" "$rd_dir" --appendonly yes --appendfsync everysec "${rd_extra[@]}"
    rd_cmd=("${RD_CMD[@]}")
    timed_start redis-server "$rd_dir/redis.log" "$rd_port" "$START_DEADLINE" "${rd_cmd[@]}"
    rd_pid=$STARTED_PID
    rd_empty_ms=$STARTED_MS

    load kvstore "$kv_port" "$DATA/ex.resp"
    load redis-server "$rd_port" "$DATA/ex.resp"
    wait_background kvstore "$kv_port"
    wait_background redis-server "$rd_port"
    kv_compactions=$(info_field "$kv_port" persistence log_compactions)
    rd_rewrites=$(info_field "$rd_port" persistence aof_rewrites)
    log "   kvstore compactions: ${kv_compactions:-?}; redis AOF rewrites: ${rd_rewrites:-?}"
    if [[ $mode == "log replay" && ( ${kv_compactions:-0} != 0 || ${rd_rewrites:-0} != 0 ) ]]; then
        die "log replay mode: a compaction or AOF rewrite ran anyway"
    fi

    kv_runs=()
    rd_runs=()
    for ((r = 1; r <= RESTARTS; r++)); do
        kill9 "$kv_pid"
        timed_start kvstore "$kv_dir/kvstore.log" "$kv_port" "$RESTART_DEADLINE" "${kv_cmd[@]}"
        kv_pid=$STARTED_PID
        kv_ms=$STARTED_MS
        check_dbsize kvstore "$kv_port" >/dev/null

        kill9 "$rd_pid"
        timed_start redis-server "$rd_dir/redis.log" "$rd_port" "$RESTART_DEADLINE" "${rd_cmd[@]}"
        rd_pid=$STARTED_PID
        rd_ms=$STARTED_MS
        check_dbsize redis-server "$rd_port" >/dev/null

        kv_runs+=("$kv_ms")
        rd_runs+=("$rd_ms")
        log "   round $r: kvstore $kv_ms ms, redis $rd_ms ms (DBSIZE $KEYS both)"
    done
    # What the restarts read (a restart may itself compact or rewrite: wait first).
    wait_background kvstore "$kv_port"
    wait_background redis-server "$rd_port"
    kv_disk=$(disk_usage "$kv_dir/data")
    rd_disk=$(disk_usage "$rd_dir/appendonlydir")
    kv_files=$(files_of "$kv_dir/data")
    rd_files=$(files_of "$rd_dir/appendonlydir")
    stop_server "$kv_pid"
    stop_server "$rd_pid"
    RESTART_ROWS+=("$mode|$(median "${kv_runs[@]}")|$(median "${rd_runs[@]}")|${kv_runs[*]}|${rd_runs[*]}|$kv_disk|$rd_disk|$kv_files|$rd_files|$kv_empty_ms|$rd_empty_ms")
done

# --- report -------------------------------------------------------------------
keys_fmt=$(sed ':a; s/\B[0-9]\{3\}\>/,&/; ta' <<<"$KEYS") # 1000000 -> 1,000,000
{
    echo "### kvstore vs redis-server: memory of $keys_fmt keys"
    echo
    echo "| data set | kvstore RSS | redis RSS | kvstore bytes/key | redis bytes/key | kvstore/redis |"
    echo "|---|---:|---:|---:|---:|---:|"
    for row in "${MEM_ROWS[@]}"; do
        IFS='|' read -r label kve kvl rde rdl _ <<<"$row"
        echo "| \`$label\` | $(mib "$kvl") MiB | $(mib "$rdl") MiB | $(per_key "$kvl") | $(per_key "$rdl") | $(ratio "$kvl" "$rdl") |"
    done
    if ((${#MEM_ROWS[@]} == 2)); then
        IFS='|' read -r _ _ kv_ex _ rd_ex _ <<<"${MEM_ROWS[0]}"
        IFS='|' read -r _ _ kv_pl _ rd_pl _ <<<"${MEM_ROWS[1]}"
        echo "| expiry overhead (EX − plain) | $(mib $((kv_ex - kv_pl))) MiB | $(mib $((rd_ex - rd_pl))) MiB | $(per_key $((kv_ex - kv_pl))) | $(per_key $((rd_ex - rd_pl))) | |"
    fi
    echo
    echo "RSS is VmRSS of the server process once it stopped changing after the load (a PING"
    echo "between samples, so that allocators' delayed purges run);"
    echo "bytes/key = RSS / $KEYS (the empty servers' RSS included; it is listed below)."
    echo "DBSIZE was $KEYS on both servers after every load and every restart."
    echo "Keys \`key:000000000000\` ... (16 bytes), ${VALUE_SIZE}-byte values, loaded with"
    echo "\`redis-cli --pipe\` from one RESP file; \`kvstore --fsync no\` vs"
    echo "\`redis-server --save '' --appendonly no\`, fresh servers per data set."
    echo
    for row in "${MEM_ROWS[@]}"; do
        IFS='|' read -r label kve kvl rde rdl kvc <<<"$row"
        echo "- \`$label\`: RSS empty → loaded: kvstore $kve → $kvl kB ($kvc log compactions"
        echo "  during the load, finished before the reading); redis $rde → $rdl kB"
    done
    echo
    echo "### kvstore vs redis-server: restart after kill -9 with $keys_fmt keys (\`SET EX $TTL\`)"
    echo
    echo "| mode | kvstore ms | redis ms | kvstore/redis | kvstore on disk | redis on disk |"
    echo "|---|---:|---:|---:|---:|---:|"
    for row in "${RESTART_ROWS[@]}"; do
        IFS='|' read -r mode kvm rdm _ _ kvd rdd _ <<<"$row"
        echo "| $mode | $kvm | $rdm | $(ratio "$kvm" "$rdm") | $(mib $((kvd / 1024))) MiB | $(mib $((rdd / 1024))) MiB |"
    done
    echo
    echo "Milliseconds from the start of the process until PING answers PONG (Redis answers"
    echo "-LOADING while it loads), median of $RESTARTS kill -9 + restart rounds, alternating."
    echo "\`kvstore --fsync no\` vs \`redis-server --appendonly yes --appendfsync everysec\`."
    echo "log replay: \`kvstore --compact-min-size $((1 << 40))\` and \`redis-server"
    echo "--auto-aof-rewrite-percentage 0\`, so both replay all $KEYS commands; defaults: each"
    echo "server's own compaction / AOF rewrite policy during the load (killed after it finished)."
    echo
    for row in "${RESTART_ROWS[@]}"; do
        IFS='|' read -r mode _ _ kvr rdr _ _ kvf rdf kve rde <<<"$row"
        echo "- $mode: kvstore ${kvr// /, } ms; redis ${rdr// /, } ms (empty, before the load:"
        echo "  kvstore $kve ms, redis $rde ms)"
        echo "  - kvstore files: $kvf"
        echo "  - redis files: $rdf"
    done
    echo
    report_footer
}
