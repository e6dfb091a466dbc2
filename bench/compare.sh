#!/usr/bin/env bash
# Throughput of kvstore against redis-server, measured in the same run with
# redis-benchmark (see DESIGN.md, "Tests and benchmarks").
#
# Usage:
#   bench/compare.sh                 # build kvstore (release) and compare
#   bench/compare.sh > result.md     # progress on stderr, Markdown on stdout
#
# Environment:
#   KVSTORE_BIN   kvstore binary to use; skips `cargo build --release`
#   KVSTORE_COMMIT  what to report as kvstore's commit (default: the repo's HEAD,
#                 marked if the work tree has uncommitted changes)
#   ROUNDS        runs per server and scenario, alternating kvstore/redis (3)
#   N             requests per run, non-durable scenarios (200000)
#   N_DURABLE     requests per run, durable scenario (20000)
#   SCENARIOS     comma-separated subset, e.g. "SET -P16,SET durable" (all):
#                 SET -P1, GET -P1, SET -P16, GET -P16, SET EX -P1, INCR -P1,
#                 SET durable
#   BENCH_TMPDIR  where the data dirs go (default $TMPDIR or /tmp; if that is
#                 tmpfs, target/ in the repo, so that fsync means something)
#
# Each scenario gets a fresh kvstore and a fresh redis-server on free
# 127.0.0.1 ports with their own temp dirs; each round runs kvstore, then
# redis; the table shows the median requests/s of each and kvstore/redis.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${ROUNDS:-3}
N=${N:-200000}
N_DURABLE=${N_DURABLE:-20000}
KEYSPACE=100000 # -r
DATASIZE=16     # -d
CLIENTS=50      # -c
START_DEADLINE=20 # seconds for a server to answer PING
STOP_DEADLINE=5   # seconds for a server to exit after SIGTERM (then SIGKILL)
COMMAND_LINE="ROUNDS=$ROUNDS N=$N N_DURABLE=$N_DURABLE${KVSTORE_BIN:+ KVSTORE_BIN=$KVSTORE_BIN}${KVSTORE_COMMIT:+ KVSTORE_COMMIT=$KVSTORE_COMMIT}${SCENARIOS:+ SCENARIOS=\"$SCENARIOS\"} $0${*:+ $*}"

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

check_positive ROUNDS N N_DURABLE
trap_cleanup
install_redis redis-server redis-benchmark redis-cli
command -v python3 >/dev/null || die "python3 is needed to pick free ports"
build_kvstore
choose_tmpbase

# --- servers ------------------------------------------------------------------
# start_server NAME LOGFILE CMD... ; sets STARTED_PID. Port must be in PORT.
start_server() {
    local name=$1 logfile=$2
    shift 2
    "$@" </dev/null >"$logfile" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    local deadline=$((SECONDS + START_DEADLINE))
    until [[ $(redis-cli -h 127.0.0.1 -p "$PORT" PING 2>/dev/null) == PONG ]]; do
        if ! kill -0 "$STARTED_PID" 2>/dev/null; then
            log "$name exited before answering PING; its log ($logfile):"
            tail -n 30 "$logfile" >&2 || true
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            log "$name did not answer PING on port $PORT within ${START_DEADLINE}s; its log:"
            tail -n 30 "$logfile" >&2 || true
            exit 1
        fi
        sleep 0.05
    done
}

# start_kvstore FSYNC ; sets KV_PID KV_PORT
start_kvstore() {
    new_tmpdir kvbench
    PORT=$(free_port)
    mkdir -p "$TMPDIR_NEW/data"
    start_server kvstore "$TMPDIR_NEW/kvstore.log" \
        "$KVSTORE_BIN" server "$PORT" --data-dir "$TMPDIR_NEW/data" --fsync "$1" --bind 127.0.0.1
    KV_PID=$STARTED_PID
    KV_PORT=$PORT
}

# start_redis durable|volatile ; sets RD_PID RD_PORT
start_redis() {
    local persistence=(--appendonly no)
    [[ $1 == durable ]] && persistence=(--appendonly yes --appendfsync always)
    new_tmpdir kvbench
    PORT=$(free_port)
    start_server redis-server "$TMPDIR_NEW/redis.log" \
        redis-server --port "$PORT" --bind 127.0.0.1 --save '' "${persistence[@]}" \
        --dir "$TMPDIR_NEW" --daemonize no
    RD_PID=$STARTED_PID
    RD_PORT=$PORT
}

# --- measuring ----------------------------------------------------------------
# bench PORT TEST N PIPELINE -> prints requests per second
# TEST is a redis-benchmark test name (-t set, get, incr, ...) or a whole command
# with spaces ("SET key:__rand_int__ val EX 60"), run as redis-benchmark's
# trailing command; -r makes it replace __rand_int__.
bench() {
    local port=$1 test=$2 n=$3 pipeline=$4 out rps title what=()
    if [[ $test == *' '* ]]; then
        read -r -a what <<<"$test" # the command's words (none may contain spaces)
        title=$test                # redis-benchmark names the run by its command line
    else
        what=(-t "$test")
        title=${test^^}
    fi
    out=$(redis-benchmark -h 127.0.0.1 -p "$port" -c "$CLIENTS" -n "$n" -r "$KEYSPACE" \
        -d "$DATASIZE" -P "$pipeline" --csv "${what[@]}" 2>&1) \
        || { log "redis-benchmark failed on port $port:"; log "$out"; exit 1; }
    # CSV: "test","rps",... (a header line first on redis >= 7)
    rps=$(awk -F'"' -v t="$title" '$2 == t { print $4; exit }' <<<"$out")
    [[ $rps =~ ^[0-9]+(\.[0-9]+)?$ ]] \
        || { log "no requests/s for '$title' in redis-benchmark output:"; log "$out"; exit 1; }
    printf '%s\n' "$rps"
}

# probe PORT TEST REGEX: sends TEST once with redis-cli (__rand_int__ -> "probe";
# a -t name -> its command) and fails unless the reply matches REGEX. redis-benchmark
# counts error replies as requests, so a server answering -ERR would look fast.
probe() {
    local port=$1 test=$2 re=$3 cmd=() reply
    case $test in
    *' '*) read -r -a cmd <<<"${test//__rand_int__/probe}" ;;
    set) cmd=(SET key:probe xxx) ;;
    get) cmd=(GET key:probe) ;;
    incr) cmd=(INCR counter:probe) ;;
    *) die "no probe command for -t $test" ;;
    esac
    reply=$(redis-cli -h 127.0.0.1 -p "$port" "${cmd[@]}" 2>&1) || true
    [[ $reply =~ $re ]] \
        || die "port $port answered '${cmd[*]}' with '$reply' (expected /$re/): not benchmarking an error"
    redis-cli -h 127.0.0.1 -p "$port" DEL "${cmd[1]}" >/dev/null 2>&1 || true
}

prefill() { # every key of the keyspace gets a value before GET runs (untimed)
    bench "$1" set $((KEYSPACE * 5)) 32 >/dev/null
}

# name | test (-t name, or a command) | pipeline | durable|volatile | probe reply regex
ALL_SCENARIOS=(
    "SET -P1|set|1|volatile|^OK$"
    "GET -P1|get|1|volatile|^$"
    "SET -P16|set|16|volatile|^OK$"
    "GET -P16|get|16|volatile|^$"
    "SET EX -P1|SET key:__rand_int__ val EX 60|1|volatile|^OK$"
    "INCR -P1|incr|1|volatile|^[0-9]+$"
    "SET durable|set|1|durable|^OK$"
)

what() { # how a TEST is given to redis-benchmark, for the log and the report
    if [[ $1 == *' '* ]]; then printf '%s' "$1"; else printf -- '-t %s' "$1"; fi
}

ROWS=()    # name|kv|redis|ratio|kv runs|redis runs|n|redis-benchmark arguments
START_TS=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
log "kvstore: $KVSTORE_BIN; data dirs under $TMPBASE ($FSTYPE); rounds: $ROUNDS"
for spec in "${ALL_SCENARIOS[@]}"; do
    IFS='|' read -r name test pipeline mode probe_re <<<"$spec"
    if [[ -n ${SCENARIOS:-} && ",$SCENARIOS," != *",$name,"* ]]; then continue; fi
    n=$N
    fsync=no
    if [[ $mode == durable ]]; then n=$N_DURABLE; fsync=always; fi

    args="-c $CLIENTS -n $n -r $KEYSPACE -d $DATASIZE -P $pipeline $(what "$test")"
    log "== $name: $args (kvstore --fsync $fsync)"
    start_kvstore "$fsync"
    start_redis "$mode"
    probe "$KV_PORT" "$test" "$probe_re"
    probe "$RD_PORT" "$test" "$probe_re"
    if [[ $test == get ]]; then
        log "   prefilling $KEYSPACE keys"
        prefill "$KV_PORT"
        prefill "$RD_PORT"
    fi
    # one untimed warm-up run each (connections, allocator, page cache)
    bench "$KV_PORT" "$test" $((n / 10)) "$pipeline" >/dev/null
    bench "$RD_PORT" "$test" $((n / 10)) "$pipeline" >/dev/null
    kv_runs=()
    rd_runs=()
    for ((r = 1; r <= ROUNDS; r++)); do
        kv=$(bench "$KV_PORT" "$test" "$n" "$pipeline")
        rd=$(bench "$RD_PORT" "$test" "$n" "$pipeline")
        kv_runs+=("$kv")
        rd_runs+=("$rd")
        log "   round $r: kvstore $kv rps, redis $rd rps"
    done
    stop_server "$KV_PID"
    stop_server "$RD_PID"

    kv_med=$(median "${kv_runs[@]}")
    rd_med=$(median "${rd_runs[@]}")
    ratio=$(awk -v a="$kv_med" -v b="$rd_med" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
    ROWS+=("$name|$kv_med|$rd_med|$ratio|${kv_runs[*]}|${rd_runs[*]}|$n|$args")
done
[[ ${#ROWS[@]} -gt 0 ]] || die "no scenario selected (SCENARIOS='${SCENARIOS:-}')"

# --- report -------------------------------------------------------------------
log ""
log "$(printf '%-12s %14s %14s %16s' scenario 'kvstore rps' 'redis rps' 'kvstore/redis')"
for row in "${ROWS[@]}"; do
    IFS='|' read -r name kv rd ratio _ <<<"$row"
    log "$(printf '%-12s %14s %14s %16s' "$name" "$kv" "$rd" "$ratio")"
done
log ""

{
    echo "### kvstore vs redis-server: throughput"
    echo
    echo "| scenario | kvstore rps | redis rps | kvstore/redis |"
    echo "|---|---:|---:|---:|"
    for row in "${ROWS[@]}"; do
        IFS='|' read -r name kv rd ratio _ <<<"$row"
        echo "| $name | $kv | $rd | $ratio |"
    done
    echo
    echo "Median of $ROUNDS alternating runs each (kvstore, redis, kvstore, redis, ...), after one"
    echo "untimed warm-up run each; fresh servers for every scenario."
    echo "\`redis-benchmark -h 127.0.0.1 --csv\` with the arguments below; GET runs on a"
    echo "prefilled keyspace."
    echo "Non-durable: \`kvstore --fsync no\` vs \`redis-server --save '' --appendonly no\`."
    echo "Durable: \`kvstore --fsync always\` vs \`redis-server --appendonly yes --appendfsync always\`."
    echo
    echo "Runs (requests/s):"
    echo
    for row in "${ROWS[@]}"; do
        IFS='|' read -r name _ _ _ kvr rdr n args <<<"$row"
        echo "- $name (\`$args\`): kvstore ${kvr// /, }; redis ${rdr// /, }"
    done
    echo
    report_footer
}
