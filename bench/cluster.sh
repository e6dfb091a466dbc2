#!/usr/bin/env bash
# Write throughput of a 3-node kvstore cluster against one kvstore node, in the same
# run, alternating, with redis-benchmark against the leader.
#
# Usage:
#   bench/cluster.sh                 # build kvstore (release) and measure
#   bench/cluster.sh > result.md     # progress on stderr, Markdown on stdout
#
# Environment:
#   KVSTORE_BIN     kvstore binary to use; skips `cargo build --release`
#   KVSTORE_COMMIT  what to report as kvstore's commit (default: the repo's HEAD)
#   ROUNDS          runs per setup and scenario, alternating cluster/single (5)
#   N               requests per run (50000)
#   SCENARIOS       comma-separated subset of: quorum,async (both)
#   BENCH_TMPDIR    where the data dirs go (default $TMPDIR or /tmp; not tmpfs)
#
# Scenarios (`redis-benchmark -c 50 -n N -r 100000 -d 16 -P 1 -t set` each):
#   quorum  3 nodes `--replication quorum --fsync always` (a SET is acknowledged once
#           a majority has it on disk) against one node `--fsync always`; target
#           cluster/single >= 0.7
#   async   3 nodes `--replication async --fsync everysec` against one node
#           `--fsync everysec`
# Each scenario gets a fresh cluster and a fresh single node, both up during the
# rounds; each round runs the cluster's leader, then the single node.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${ROUNDS:-5}
N=${N:-50000}
KEYSPACE=100000 # -r
DATASIZE=16     # -d
CLIENTS=50      # -c
START_DEADLINE=20
STOP_DEADLINE=5
LEADER_DEADLINE=30
STABLE_SAMPLES=5
COMMAND_LINE="ROUNDS=$ROUNDS N=$N${SCENARIOS:+ SCENARIOS=$SCENARIOS}${KVSTORE_BIN:+ KVSTORE_BIN=$KVSTORE_BIN}${KVSTORE_COMMIT:+ KVSTORE_COMMIT=$KVSTORE_COMMIT} $0${*:+ $*}"

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

check_positive ROUNDS N
trap_cleanup
install_redis redis-server redis-benchmark redis-cli
command -v python3 >/dev/null || die "python3 is needed to pick free ports"
build_kvstore
choose_tmpbase

start_single() { # start_single FSYNC; sets SINGLE_PID SINGLE_PORT
    local deadline=$((SECONDS + START_DEADLINE))
    new_tmpdir kvsingle
    SINGLE_PORT=$(free_port)
    mkdir -p "$TMPDIR_NEW/data"
    "$KVSTORE_BIN" server "$SINGLE_PORT" --data-dir "$TMPDIR_NEW/data" --fsync "$1" \
        --bind 127.0.0.1 </dev/null >"$TMPDIR_NEW/kvstore.log" 2>&1 &
    SINGLE_PID=$!
    PIDS+=("$SINGLE_PID")
    until [[ $(redis-cli -h 127.0.0.1 -p "$SINGLE_PORT" PING 2>/dev/null) == PONG ]]; do
        kill -0 "$SINGLE_PID" 2>/dev/null || die "the single node exited at start ($TMPDIR_NEW/kvstore.log)"
        ((SECONDS < deadline)) || die "the single node did not answer PING"
        sleep 0.05
    done
}

REFUSED=0 # runs stopped by a refused write (see BENCHMARKS.md, the lease lapse)
bench() { # bench PORT N -> requests per second of SET; runs again (3 tries) on CLUSTERDOWN
    local out rps try
    for try in 1 2 3; do
        out=$(redis-benchmark -h 127.0.0.1 -p "$1" -c "$CLIENTS" -n "$2" -r "$KEYSPACE" \
            -d "$DATASIZE" -P 1 --csv -t set 2>&1) && break
        if [[ $out == *CLUSTERDOWN* && $try -lt 3 ]]; then
            echo "$1" >>"$REFUSED_FILE"
            log "   port $1 refused a write (CLUSTERDOWN), run again"
            continue
        fi
        log "redis-benchmark failed on port $1:"
        log "$out"
        exit 1
    done
    rps=$(awk -F'"' '$2 == "SET" { print $4; exit }' <<<"$out")
    [[ $rps =~ ^[0-9]+(\.[0-9]+)?$ ]] || { log "no requests/s in redis-benchmark output:"; log "$out"; exit 1; }
    printf '%s\n' "$rps"
}

probe() { # probe PORT: a SET must answer OK (redis-benchmark counts errors as requests)
    local reply
    reply=$(redis-cli -h 127.0.0.1 -p "$1" SET key:probe xxx 2>&1) || true
    [[ $reply == OK ]] || die "port $1 answered SET with '$reply': not benchmarking an error"
}

# name | cluster flags | single node's --fsync
ALL_SCENARIOS=(
    "quorum|--replication quorum --fsync always|always"
    "async|--replication async --fsync everysec|everysec"
)

new_tmpdir kvrefused
REFUSED_FILE=$TMPDIR_NEW/refused # bench runs in $(...): it counts in a file
: >"$REFUSED_FILE"
ROWS=()
START_TS=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
log "kvstore: $KVSTORE_BIN; data dirs under $TMPBASE ($FSTYPE); rounds: $ROUNDS"
for spec in "${ALL_SCENARIOS[@]}"; do
    IFS='|' read -r name flags single_fsync <<<"$spec"
    if [[ -n ${SCENARIOS:-} && ",$SCENARIOS," != *",$name,"* ]]; then continue; fi
    log "== $name: cluster $flags vs one node --fsync $single_fsync"
    cluster_init kvcluster
    for i in 1 2 3; do
        # shellcheck disable=SC2086 # flags without spaces in their values
        cluster_start_node "$i" $flags
    done
    wait_stable_leader
    start_single "$single_fsync"
    probe "$LEADER_PORT"
    probe "$SINGLE_PORT"
    bench "$LEADER_PORT" $((N / 10)) >/dev/null # warm-up: connections, allocator, page cache
    bench "$SINGLE_PORT" $((N / 10)) >/dev/null
    epoch0=$EPOCH
    c_runs=()
    s_runs=()
    for ((r = 1; r <= ROUNDS; r++)); do
        c=$(bench "$LEADER_PORT" "$N")
        s=$(bench "$SINGLE_PORT" "$N")
        c_runs+=("$c")
        s_runs+=("$s")
        log "   round $r: cluster $c rps, single node $s rps"
    done
    [[ $(info_field "$LEADER_PORT" epoch) == "$epoch0" && $(info_field "$LEADER_PORT" node_role) == leader ]] \
        || die "the leader changed during the runs: see ${NODE_LOG[*]}"
    cluster_stop
    stop_server "$SINGLE_PID"
    c_med=$(median "${c_runs[@]}")
    s_med=$(median "${s_runs[@]}")
    ratio=$(awk -v a="$c_med" -v b="$s_med" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
    ROWS+=("$name|$flags|$single_fsync|$c_med|$s_med|$ratio|${c_runs[*]}|${s_runs[*]}")
done
[[ ${#ROWS[@]} -gt 0 ]] || die "no scenario selected (SCENARIOS='${SCENARIOS:-}')"

for row in "${ROWS[@]}"; do
    IFS='|' read -r name _ _ c s ratio _ <<<"$row"
    log "$(printf '%-8s cluster %10s rps  single %10s rps  cluster/single %s' "$name" "$c" "$s" "$ratio")"
done

{
    echo "### 3-node cluster vs one node: SET throughput"
    echo
    echo "| scenario | cluster (3 nodes) | single node | cluster rps | single rps | cluster/single |"
    echo "|---|---|---|---:|---:|---:|"
    for row in "${ROWS[@]}"; do
        IFS='|' read -r name flags sf c s ratio _ <<<"$row"
        echo "| $name | \`$flags\` | \`--fsync $sf\` | $c | $s | $ratio |"
    done
    echo
    echo "Median of $ROUNDS alternating runs each (cluster leader, single node, ...), after one"
    echo "untimed warm-up run each; \`redis-benchmark -h 127.0.0.1 -c $CLIENTS -n $N -r $KEYSPACE"
    echo "-d $DATASIZE -P 1 -t set --csv\`; the three nodes and the client share the machine."
    echo
    echo "Runs (requests/s):"
    echo
    for row in "${ROWS[@]}"; do
        IFS='|' read -r name _ _ _ _ _ cr sr <<<"$row"
        echo "- $name: cluster ${cr// /, }; single ${sr// /, }"
    done
    echo
    echo "- runs stopped by \`-CLUSTERDOWN\` from the leader and run again: $(wc -l <"$REFUSED_FILE")"
    report_footer
}
