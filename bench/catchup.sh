#!/usr/bin/env bash
# Catch-up time of a kvstore follower that is ENTRIES log entries behind its leader.
#
# Usage:
#   bench/catchup.sh                 # build kvstore (release), both modes
#   bench/catchup.sh > result.md     # progress on stderr, Markdown on stdout
#
# Environment:
#   KVSTORE_BIN     kvstore binary to use; skips `cargo build --release`
#   KVSTORE_COMMIT  what to report as kvstore's commit (default: the repo's HEAD)
#   ENTRIES         SETs written while the follower is down (1000000)
#   MODES           comma-separated subset of: log,snapshot (both)
#   FSYNC           the nodes' --fsync (always); the cluster is --replication quorum
#   BENCH_TMPDIR    where the data dirs go (default $TMPDIR or /tmp; not tmpfs)
#
# Each mode: a fresh 3-node cluster (node 3 leads); node 1 is killed (SIGKILL), ENTRIES
# SETs go to the leader (`redis-benchmark -c 50 -P 32 -t set -r ENTRIES -d 16`), node 1
# is restarted with its data, and the script polls its INFO replication every 50 ms
# until its last_index and commit_index reach the leader's (taken once the writes are
# done; nothing is written during the catch-up). Reported: restart -> PING answered (its
# own log's recovery), and restart -> caught up.
#   log       every node runs with --compact-min-size 4 GiB, so the leader still has
#             every entry the follower lacks: catch-up from the log.
#   snapshot  after the writes, SAVE on the two running nodes compacts their logs: the
#             follower's next entry is below the leader's snapshot and it must fetch the
#             snapshot first (needs snapshot transfer; skipped, with a message, by a
#             binary that logs that it does not implement it).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENTRIES=${ENTRIES:-1000000}
MODES=${MODES:-log,snapshot}
FSYNC=${FSYNC:-always}
START_DEADLINE=60     # seconds for a node to answer PING (a restart replays its log)
STOP_DEADLINE=10
LEADER_DEADLINE=30
STABLE_SAMPLES=5
CATCHUP_DEADLINE=600  # seconds for the follower to catch up
STALL_DEADLINE=30     # seconds with no progress of its last_index: a stall
COMMAND_LINE="ENTRIES=$ENTRIES MODES=$MODES FSYNC=$FSYNC${KVSTORE_BIN:+ KVSTORE_BIN=$KVSTORE_BIN}${KVSTORE_COMMIT:+ KVSTORE_COMMIT=$KVSTORE_COMMIT} $0${*:+ $*}"

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

check_positive ENTRIES
trap_cleanup
install_redis redis-server redis-benchmark redis-cli
command -v python3 >/dev/null || die "python3 is needed to pick free ports"
build_kvstore
choose_tmpbase

NO_TRANSFER='snapshot transfer is not implemented'
now_ms() { printf '%s\n' "${EPOCHREALTIME/./}" | cut -c1-13; } # wall clock, ms

ROWS=()
START_TS=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
log "kvstore: $KVSTORE_BIN; data dirs under $TMPBASE ($FSTYPE); $ENTRIES entries"
for mode in log snapshot; do
    [[ ",$MODES," == *",$mode,"* ]] || continue
    flags="--replication quorum --fsync $FSYNC"
    [[ $mode == log ]] && flags+=" --compact-min-size 4294967296"
    log "== $mode: $flags"
    cluster_init kvcatchup
    for i in 1 2 3; do
        # shellcheck disable=SC2086 # flags without spaces in their values
        cluster_start_node "$i" $flags
    done
    wait_stable_leader
    [[ $LEADER == 3 ]] || die "node 3 should lead, node $LEADER does"
    cluster_kill 1
    behind_from=$(info_field "$LEADER_PORT" last_index)
    log "   node 1 killed at index $behind_from; writing $ENTRIES SETs (-P 32)"
    t=$(now_ms)
    # redis-benchmark stops at the first error reply: a leader that refuses writes
    # under load (CLUSTERDOWN) ends a run early; run again (the entries behind are
    # counted from the indices, not from ENTRIES) and report the refusals
    refusals=0
    for ((attempt = 1; ; attempt++)); do
        out=$(redis-benchmark -h 127.0.0.1 -p "$LEADER_PORT" -c 50 -n "$ENTRIES" -r "$ENTRIES" \
            -d 16 -P 32 -t set -q 2>&1) && ! grep -q '^Error from server' <<<"$(tr '\r' '\n' <<<"$out")" && break
        refusals=$((refusals + 1))
        log "   redis-benchmark stopped: $(tr '\r' '\n' <<<"$out" | grep -v 'rps=' | tail -n1)"
        ((attempt < 5)) || die "redis-benchmark failed 5 times"
        wait_stable_leader
    done
    write_s=$(awk -v ms=$(($(now_ms) - t)) 'BEGIN { printf "%.1f", ms / 1000 }')
    if [[ $mode == snapshot ]]; then
        for i in 2 3; do
            [[ $(cli "${NODE_PORT[i]}" SAVE) == OK ]] || die "SAVE on node $i failed"
        done
    fi
    target_last=$(info_field "$LEADER_PORT" last_index)
    target_commit=$(info_field "$LEADER_PORT" commit_index)
    log "   written in ${write_s}s; leader at last_index $target_last, commit_index $target_commit; restarting node 1"
    t0=$(now_ms)
    cluster_start_node 1
    t_ping=$(now_ms)
    port=${NODE_PORT[1]}
    deadline=$((SECONDS + CATCHUP_DEADLINE))
    skipped= prev_last= stall_from=$SECONDS
    while :; do
        last=$(info_field "$port" last_index)
        commit=$(info_field "$port" commit_index)
        if [[ -n $last && -n $commit ]] && ((last >= target_last && commit >= target_commit)); then
            break
        fi
        if grep -q "$NO_TRANSFER" "${NODE_LOG[@]}"; then
            skipped="this binary does not transfer snapshots (its log: \"$(grep -h -m1 -o "[^]]*$NO_TRANSFER[^\"]*" "${NODE_LOG[@]}" | head -n1 | sed 's/^ *//')\")"
            break
        fi
        if [[ $last != "${prev_last:-}" ]]; then prev_last=$last stall_from=$SECONDS; fi
        if ((SECONDS - stall_from >= STALL_DEADLINE)); then
            TMPDIRS=() # keep the logs and data for the reproduction
            die "node 1 STALLED: last_index $last, commit_index $commit for ${STALL_DEADLINE}s, leader's $target_last/$target_commit; no '$NO_TRANSFER' in the logs (kept: ${NODE_LOG[*]})"
        fi
        ((SECONDS < deadline)) || die "node 1 did not catch up within ${CATCHUP_DEADLINE}s: last_index $last, commit_index $commit, leader's $target_last/$target_commit (logs: ${NODE_LOG[*]})"
        sleep 0.05
    done
    t1=$(now_ms)
    if [[ -n $skipped ]]; then
        log "   SKIPPED: $skipped"
        ROWS+=("$mode|$((target_last - behind_from))|||skipped: $skipped")
    else
        ping_ms=$((t_ping - t0))
        catch_ms=$((t1 - t0))
        log "   node 1: PING after $ping_ms ms, caught up ($last/$commit) after $catch_ms ms"
        ROWS+=("$mode|$((target_last - behind_from))|$ping_ms|$catch_ms|written in ${write_s}s; writes refused: $refusals runs")
    fi
    cluster_stop
done
[[ ${#ROWS[@]} -gt 0 ]] || die "no mode selected (MODES='$MODES')"

{
    echo "### Catch-up of a follower $ENTRIES SETs behind (3 nodes, \`--replication quorum --fsync $FSYNC\`)"
    echo
    echo "| from | entries behind | restart -> PING | restart -> caught up | note |"
    echo "|---|---:|---:|---:|---|"
    for row in "${ROWS[@]}"; do
        IFS='|' read -r mode behind ping catch note <<<"$row"
        if [[ -n $ping ]]; then
            echo "| $mode | $behind | $ping ms | $catch ms | $note |"
        else
            echo "| $mode | $behind | | | $note |"
        fi
    done
    echo
    echo "The follower (node 1) was killed with SIGKILL; the SETs (\`redis-benchmark -c 50"
    echo "-n $ENTRIES -r $ENTRIES -d 16 -P 32 -t set\`) went to the leader while it was down;"
    echo "caught up: its last_index and commit_index reached the leader's."
    echo
    report_footer
}
