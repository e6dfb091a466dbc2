#!/usr/bin/env bash
# Failover time of a 3-node kvstore cluster, and elections under load with no fault.
#
# Usage:
#   bench/failover.sh                # build kvstore (release) and measure
#   bench/failover.sh > result.md    # progress on stderr, Markdown on stdout
#
# Environment:
#   KVSTORE_BIN     kvstore binary to use; skips `cargo build --release`
#   KVSTORE_COMMIT  what to report as kvstore's commit (default: the repo's HEAD)
#   ROUNDS          failovers to measure (20)
#   DURATION        seconds of redis-benchmark against the leader, no fault (60; 0 skips)
#   REPLICATION     the cluster's --replication (quorum)
#   FSYNC           the nodes' --fsync (always)
#   LOAD_BENCHES    redis-benchmark processes at once in the no-fault run (2)
#   BENCH_TMPDIR    where the data dirs go (default $TMPDIR or /tmp; not tmpfs)
#
# 1. Failover: a 3-node cluster (ids 1-3, default timings: heartbeat 100 ms, failure
#    timeout 400 ms, lease 300 ms). Each round: wait for a stable leader; bench/failover_writer.py
#    SETs a new key every ~1 ms on every node (pipelined raw sockets), SIGKILLs the
#    leader once it has acknowledged 200 writes, and stops at the first write another
#    node acknowledges: kill -> that +OK is the failover time. It then checks that the
#    new leader holds every write any node acknowledged (a lost write fails the run).
#    The killed node is restarted (with its data) and the next round waits for a
#    stable leader again (the restarted node, if it has the highest id, takes over).
# 2. No fault: `redis-benchmark -c 50 -P 16 -t set` for DURATION seconds against the
#    leader (LOAD_BENCHES of them at once), to keep both cores busy; INFO replication of every node is sampled
#    every 0.2 s, and the epochs before/after and the nodes' "leading epoch" /
#    "stepped down" log lines are counted. Any election is reported as a failure.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${ROUNDS:-20}
DURATION=${DURATION:-60}
REPLICATION=${REPLICATION:-quorum}
FSYNC=${FSYNC:-always}
START_DEADLINE=20   # seconds for a node to answer PING
STOP_DEADLINE=5     # seconds for a node to exit after SIGTERM
LEADER_DEADLINE=30  # seconds for a stable leader
STABLE_SAMPLES=5    # agreeing samples, 0.1 s apart, that make a leader stable
LOAD_BENCHES=${LOAD_BENCHES:-2} # redis-benchmark processes in the no-fault run
WRITER_DEADLINE=30  # seconds for another node to acknowledge a write after the kill
COMMAND_LINE="ROUNDS=$ROUNDS DURATION=$DURATION REPLICATION=$REPLICATION FSYNC=$FSYNC${KVSTORE_BIN:+ KVSTORE_BIN=$KVSTORE_BIN}${KVSTORE_COMMIT:+ KVSTORE_COMMIT=$KVSTORE_COMMIT} $0${*:+ $*}"

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

check_positive ROUNDS LOAD_BENCHES
[[ $DURATION =~ ^[0-9]+$ ]] || die "DURATION must be a number of seconds, got '$DURATION'"
case $REPLICATION in async | quorum | all) ;; *) die "REPLICATION: async, quorum or all" ;; esac
trap_cleanup
install_redis redis-server redis-benchmark redis-cli
command -v python3 >/dev/null || die "python3 is needed (free ports, the writer)"
build_kvstore
choose_tmpbase

START_TS=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
FLAGS="--replication $REPLICATION --fsync $FSYNC"
log "kvstore: $KVSTORE_BIN; data dirs under $TMPBASE ($FSTYPE); $FLAGS"
cluster_init kvfailover
for i in 1 2 3; do cluster_start_node "$i" $FLAGS; done
wait_stable_leader
log "leader: node $LEADER (port $LEADER_PORT), epoch $EPOCH"

# --- 1. failover --------------------------------------------------------------
TIMES=()
LOST_TOTAL=0
ACKED_TOTAL=0
for ((r = 1; r <= ROUNDS; r++)); do
    wait_stable_leader
    old=$LEADER
    out=$(python3 "$REPO/bench/failover_writer.py" "${NODE_PID[old]}" "$LEADER_PORT" \
        "${NODE_PORT[1]}" "${NODE_PORT[2]}" "${NODE_PORT[3]}" --round "$r" \
        --deadline "$WRITER_DEADLINE") && rc=0 || rc=$?
    # the writer killed the leader: reap it
    wait "${NODE_PID[old]}" 2>/dev/null || true
    forget_pid "${NODE_PID[old]}"
    NODE_PID[old]=
    ms=$(python3 -c 'import json,sys; v=json.loads(sys.argv[1]).get("failover_ms"); print("" if v is None else v)' "$out" 2>/dev/null) || ms=
    if ((rc != 0)) || [[ -z $ms ]]; then
        log "round $r: the writer failed (exit $rc): $out"
        log "node logs: ${NODE_LOG[*]} (kept: the temp dir is not removed)"
        TMPDIRS=() # keep the logs and data for the reproduction
        exit 1
    fi
    read -r newport acked lost < <(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d["new_leader_port"], d["acked_total"], d["lost"])' "$out")
    TIMES+=("$ms")
    ACKED_TOTAL=$((ACKED_TOTAL + acked))
    LOST_TOTAL=$((LOST_TOTAL + lost))
    log "round $r: node $old killed; port $newport acknowledged a write after $ms ms ($acked writes acknowledged, $lost lost)"
    cluster_start_node "$old"
done
wait_stable_leader

stats=$(printf '%s\n' "${TIMES[@]}" | sort -g | awk '{ v[NR] = $1 } END {
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "%.0f %.0f %.0f", m, v[1], v[NR] }')
read -r MEDIAN MIN MAX <<<"$stats"
log "failover: median $MEDIAN ms, min $MIN ms, max $MAX ms over $ROUNDS rounds"

# --- 2. no fault, under load ----------------------------------------------------
cpu_ticks() { # utime + stime of PID, in clock ticks
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}
log_events() { # "leading epoch" and "stepped down" lines in every node's log
    cat "${NODE_LOG[@]}" | grep -c -E 'leading epoch|stepped down' || true
}
if ((DURATION > 0)); then
    wait_stable_leader
    load_leader=$LEADER
    epochs_before=()
    for i in 1 2 3; do epochs_before[i]=$(info_field "${NODE_PORT[i]}" epoch); done
    events_before=$(log_events)
    idx_before=$(info_field "$LEADER_PORT" commit_index)
    ticks_before=()
    for i in 1 2 3; do ticks_before[i]=$(cpu_ticks "${NODE_PID[i]}"); done
    wall_before=$EPOCHREALTIME
    log "no fault: $LOAD_BENCHES x redis-benchmark -c 50 -P 16 -t set against node $LEADER for ${DURATION}s"
    # Each load process restarts redis-benchmark if it exits (it stops at the first
    # error reply) and keeps its output: an exit is a refused write, counted below.
    BENCH_PIDS=()
    BENCH_OUTS=()
    for ((b = 0; b < LOAD_BENCHES; b++)); do
        new_tmpdir kvload
        BENCH_OUTS+=("$TMPDIR_NEW/out")
        (
            bp=
            trap 'kill -TERM $bp 2>/dev/null; exit 0' TERM
            while :; do
                redis-benchmark -h 127.0.0.1 -p "$LEADER_PORT" -c 50 -P 16 -t set -r 100000 \
                    -d 16 -n 2000000000 -q 2>&1 | tr '\r' '\n' | grep -v 'rps=' >>"$TMPDIR_NEW/out" &
                bp=$(jobs -p)
                wait
                echo "redis-benchmark exited at $(date -u +%T.%N)" >>"$TMPDIR_NEW/out"
            done
        ) &
        BENCH_PIDS+=($!)
        PIDS+=($!)
    done
    read -r _ c1 c2 c3 idle0 rest <<<"$(head -n1 /proc/stat)"
    cpu_before=$((c1 + c2 + c3))
    total_before=$((c1 + c2 + c3 + idle0))
    t_end=$((SECONDS + DURATION))
    samples=0 changes=0 no_leader=0
    last=()
    while ((SECONDS < t_end)); do
        for i in 1 2 3; do
            l=$(info_field "${NODE_PORT[i]}" leader_id)
            [[ -n $l && $l != 0 ]] || no_leader=$((no_leader + 1))
            if [[ -n ${last[i]:-} && $l != "${last[i]}" ]]; then
                changes=$((changes + 1))
                log "   node $i: leader ${last[i]} -> ${l:-?} at +$((SECONDS - t_end + DURATION))s"
            fi
            last[i]=$l
        done
        samples=$((samples + 1))
        sleep 0.2
    done
    # the node CPU and the wall time first, while the load still runs
    ticks_after=()
    for i in 1 2 3; do ticks_after[i]=$(cpu_ticks "${NODE_PID[i]}"); done
    wall=$(awk -v a="$wall_before" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    read -r _ c1 c2 c3 idle0 rest <<<"$(head -n1 /proc/stat)"
    busy=$(awk -v b=$((c1 + c2 + c3 - cpu_before)) -v t=$((c1 + c2 + c3 + idle0 - total_before)) \
        -v n="$(nproc)" 'BEGIN { printf "%.2f", (t > 0 ? b / t * n : 0) }')
    for b in "${BENCH_PIDS[@]}"; do
        kill -TERM "$b" 2>/dev/null || true
        wait "$b" 2>/dev/null || true
        forget_pid "$b"
    done
    refused=$(cat "${BENCH_OUTS[@]}" | grep -c '^Error from server' || true)
    refusals=$(cat "${BENCH_OUTS[@]}" | grep '^Error from server' | sort | uniq -c | sed 's/^ *//' | paste -sd';' || true)
    hz=$(getconf CLK_TCK)
    cpu=()
    for i in 1 2 3; do
        cpu[i]=$(awk -v a="${ticks_before[i]}" -v b="${ticks_after[i]}" -v hz="$hz" -v d="$wall" \
            'BEGIN { printf "%.2f", (b - a) / hz / d }')
    done
    idx_after=$(info_field "${NODE_PORT[load_leader]}" commit_index)
    epoch_changes=0
    for i in 1 2 3; do
        e=$(info_field "${NODE_PORT[i]}" epoch)
        [[ $e == "${epochs_before[i]}" ]] || epoch_changes=$((epoch_changes + 1))
        epochs_after[i]=$e
    done
    events=$(($(log_events) - events_before))
    log "no fault: $samples samples x 3 nodes; leader changes seen $changes, samples with no leader $no_leader; nodes whose epoch changed $epoch_changes; election log lines $events; commit index $idx_before -> $idx_after; node CPU (cores) ${cpu[*]:1}, machine busy $busy of $(nproc) cores over ${wall}s; redis-benchmark stopped by an error reply $refused times${refusals:+ ($refusals)}"
fi

# --- report -------------------------------------------------------------------
{
    echo "### Failover: 3 nodes, \`--replication $REPLICATION --fsync $FSYNC\`, default timings"
    echo
    echo "| measure | value |"
    echo "|---|---:|"
    echo "| kill -9 of the leader -> first write acknowledged by another node, median | $MEDIAN ms |"
    echo "| same, min / max | $MIN / $MAX ms |"
    echo "| rounds | $ROUNDS |"
    echo "| writes acknowledged (all rounds) / missing on the new leader | $ACKED_TOTAL / $LOST_TOTAL |"
    if ((DURATION > 0)); then
        echo "| no fault, ${DURATION} s of $LOAD_BENCHES x \`redis-benchmark -c 50 -P 16 -t set\` on the leader: epoch changes (nodes) | $epoch_changes |"
        echo "| same: leader changes seen (INFO every 0.2 s on each node, $samples rounds) | $changes |"
        echo "| same: samples in which a node named no leader | $no_leader |"
        echo "| same: election log lines (\"leading epoch\", \"stepped down\") | $events |"
        echo "| same: commit index before -> after | $idx_before -> $idx_after |"
        echo "| same: CPU of nodes 1, 2, 3 (cores over ${wall} s; node $load_leader led) | ${cpu[1]}, ${cpu[2]}, ${cpu[3]} |"
        echo "| same: whole machine busy (cores of $(nproc), /proc/stat) | $busy |"
        echo "| same: writes refused by the leader (redis-benchmark stops at an error reply) | $refused${refusals:+ ($refusals)} |"
    fi
    echo
    echo "Failover times (ms, in round order): ${TIMES[*]}"
    echo
    report_footer
}
if ((DURATION > 0 && (epoch_changes > 0 || changes > 0 || events > 0 || no_leader > 0 || refused > 0))); then
    log "ELECTION OR REFUSED WRITES UNDER LOAD with no fault injected: see the node logs (kept): ${NODE_LOG[*]}"
    TMPDIRS=()
    exit 1
fi
