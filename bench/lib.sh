# Shared by bench/compare.sh and bench/memory.sh, which source it with
#   source "$(dirname "$0")/lib.sh"
# once REPO (the repository's root) is set. It only defines functions and the
# PIDS / TMPDIRS arrays; each script calls the setup steps in its own order:
#   check_positive VAR...    die unless each VAR is a positive integer
#   trap_cleanup             on exit, stop every process in PIDS, remove TMPDIRS
#   install_redis CMD...     apt-get redis-server and redis-tools unless all CMDs exist
#   build_kvstore            KVSTORE_BIN, or `cargo build --release` (sets it)
#   choose_tmpbase           TMPBASE and FSTYPE (honours BENCH_TMPDIR, avoids tmpfs)
# and then new_tmpdir, free_port, stop_server (its wait: STOP_DEADLINE seconds, set
# by the script), median, report_footer.
# shellcheck shell=bash

log() { printf '%s\n' "$*" >&2; }
die() { log "${0##*/}: $*"; exit 1; }

check_positive() { # check_positive VAR...
    local v
    for v in "$@"; do
        [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
    done
}

# --- cleanup: every process we start and every temp dir we make ------------
PIDS=()
TMPDIRS=()
cleanup() {
    local rc=$? pid i
    set +e
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        for ((i = 0; i < 50; i++)); do # up to 5 s, then SIGKILL
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    for d in "${TMPDIRS[@]}"; do
        rm -rf -- "$d"
    done
    exit "$rc"
}
trap_cleanup() {
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# --- tools --------------------------------------------------------------------
install_redis() { # install_redis CMD...: unless every CMD is on the PATH
    local cmd missing=0 sudo=()
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null || missing=1
    done
    ((missing)) || return 0
    log "installing redis-server and redis-tools with apt-get"
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server redis-tools
}

build_kvstore() { # sets KVSTORE_BIN unless given
    if [[ -z ${KVSTORE_BIN:-} ]]; then
        log "building kvstore (cargo build --release)"
        (cd "$REPO" && cargo build --release >&2)
        KVSTORE_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/kvstore
    fi
    [[ -x $KVSTORE_BIN ]] || die "kvstore binary not found or not executable: $KVSTORE_BIN"
}

choose_tmpbase() { # sets TMPBASE and FSTYPE
    TMPBASE=${BENCH_TMPDIR:-${TMPDIR:-/tmp}}
    if [[ -z ${BENCH_TMPDIR:-} ]]; then
        case $(stat -f -c %T "$TMPBASE" 2>/dev/null || echo unknown) in
        tmpfs | ramfs)
            mkdir -p "$REPO/target"
            TMPBASE=$REPO/target
            ;;
        esac
    fi
    FSTYPE=$(stat -f -c %T "$TMPBASE" 2>/dev/null || echo unknown)
}

new_tmpdir() { # new_tmpdir PREFIX; sets TMPDIR_NEW (not via $(...): the array must grow here)
    TMPDIR_NEW=$(mktemp -d "$TMPBASE/$1.XXXXXX")
    TMPDIRS+=("$TMPDIR_NEW")
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# --- servers ------------------------------------------------------------------
forget_pid() {
    local p keep=()
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

stop_server() { # stop_server PID: SIGTERM, wait (STOP_DEADLINE s), then SIGKILL
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_DEADLINE * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}

# --- report -------------------------------------------------------------------
median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
        if (NR % 2) printf "%.0f", v[(NR + 1) / 2]; else printf "%.0f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

kvstore_commit() { # KVSTORE_COMMIT, or the repo's HEAD, marked if the work tree has changes
    local commit
    if [[ -n ${KVSTORE_COMMIT:-} ]]; then
        commit=$KVSTORE_COMMIT
    else
        commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
        if [[ $commit != unknown && -n $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
            commit="$commit (with uncommitted changes)"
        fi
    fi
    printf '%s\n' "$commit"
}

report_footer() { # the report's last lines: command, date, machine, versions
    echo "- command: \`$COMMAND_LINE\`"
    echo "- date: $START_TS"
    echo "- nproc: $(nproc); $(uname -srm)"
    echo "- $(redis-server --version)"
    echo "- kvstore commit: $(kvstore_commit)"
    echo "- data dirs on: $FSTYPE"
}

cli() { # cli PORT ARGS... (redis-cli, 10 s at most)
    local port=$1
    shift
    timeout 10 redis-cli -h 127.0.0.1 -p "$port" "$@" 2>&1
}

status_kb() { # status_kb PID FIELD -> that /proc/PID/status field in kB (VmRSS, VmHWM)
    awk -v f="$2:" '$1 == f { print $2; exit }' "/proc/$1/status"
}

# settled_rss NAME PID PORT -> VmRSS (kB) once SETTLE_SAMPLES samples 0.5 s apart
# lie within SETTLE_TOLERANCE_KB, or the last sample at SETTLE_DEADLINE (logged).
# A PING goes to the server before each sample: allocators return freed memory
# lazily, on later allocator activity (mimalloc's delayed purge; an idle kvstore
# kept the ~40 MB of a hash table it had outgrown for as long as it stayed idle).
settled_rss() {
    local name=$1 pid=$2 port=$3 deadline=$((SECONDS + SETTLE_DEADLINE)) samples=() v lo hi s
    while :; do
        cli "$port" PING >/dev/null || true
        v=$(status_kb "$pid" VmRSS) || die "$name (pid $pid) is gone"
        samples+=("$v")
        if ((${#samples[@]} >= SETTLE_SAMPLES)); then
            samples=("${samples[@]: -SETTLE_SAMPLES}")
            lo=${samples[0]} hi=${samples[0]}
            for s in "${samples[@]}"; do
                if ((s < lo)); then lo=$s; fi
                if ((s > hi)); then hi=$s; fi
            done
            if ((hi - lo <= SETTLE_TOLERANCE_KB)); then break; fi
        fi
        if ((SECONDS >= deadline)); then
            log "   $name: RSS still changing after ${SETTLE_DEADLINE}s (last samples: ${samples[*]} kB); using $v"
            break
        fi
        sleep 0.5
    done
    printf '%s\n' "$v"
}

# --- a cluster of three on 127.0.0.1 (bench/failover.sh, cluster.sh, catchup.sh) ----
# cluster_init NAME        a temp dir, three free ports, ids 1..3 (3 leads when all are up)
# cluster_start_node I ARGS...  start node I (again: a restart keeps its data dir) with
#                          the server flags ARGS; waits for PING (START_DEADLINE s)
# cluster_kill I           SIGKILL node I and reap it
# info_field PORT FIELD    one field of INFO replication ("" if the node does not answer)
# wait_stable_leader       until every running node names one leader, in one epoch, whose
#                          followers are all online and caught up (commit_index), for
#                          STABLE_SAMPLES samples 0.1 s apart; LEADER_DEADLINE s at most.
#                          Sets LEADER (1..3), LEADER_PORT, EPOCH.
# The script sets START_DEADLINE, STABLE_SAMPLES, LEADER_DEADLINE.
NODE_PORT=()
NODE_PID=()
NODE_DIR=()
NODE_LOG=()
NODE_ARGS=() # the flags each node was last started with, for restarts
CLUSTER_SECRET=bench-secret
cluster_init() {
    local i
    new_tmpdir "$1"
    for i in 1 2 3; do
        NODE_PORT[i]=$(free_port)
        NODE_DIR[i]=$TMPDIR_NEW/node$i
        NODE_LOG[i]=$TMPDIR_NEW/node$i.log
        NODE_PID[i]=
        mkdir -p "${NODE_DIR[i]}"
    done
}

cluster_peers() { # cluster_peers I -> the other two as ID@127.0.0.1:PORT
    local i out=()
    for i in 1 2 3; do
        [[ $i == "$1" ]] || out+=("$i@127.0.0.1:${NODE_PORT[i]}")
    done
    local IFS=,
    printf '%s\n' "${out[*]}"
}

cluster_start_node() { # cluster_start_node I [SERVER FLAGS...]
    local i=$1 deadline=$((SECONDS + START_DEADLINE)) pid
    shift
    if (($# > 0)); then NODE_ARGS[i]="$*"; fi
    # shellcheck disable=SC2086 # NODE_ARGS holds flags without spaces in their values
    "$KVSTORE_BIN" server "${NODE_PORT[i]}" "$(cluster_peers "$i")" --id "$i" \
        --cluster-secret "$CLUSTER_SECRET" --data-dir "${NODE_DIR[i]}" --bind 127.0.0.1 \
        ${NODE_ARGS[i]} </dev/null >>"${NODE_LOG[i]}" 2>&1 &
    pid=$!
    NODE_PID[i]=$pid
    PIDS+=("$pid")
    until [[ $(redis-cli -h 127.0.0.1 -p "${NODE_PORT[i]}" PING 2>/dev/null) == PONG ]]; do
        kill -0 "$pid" 2>/dev/null || { tail -n 30 "${NODE_LOG[i]}" >&2; die "node $i exited at start"; }
        ((SECONDS < deadline)) || { tail -n 30 "${NODE_LOG[i]}" >&2; die "node $i did not answer PING within ${START_DEADLINE}s"; }
        sleep 0.05
    done
}

cluster_kill() { # cluster_kill I: SIGKILL (a crash), reap
    local pid=${NODE_PID[$1]}
    [[ -n $pid ]] || return 0
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
    NODE_PID[$1]=
}

cluster_stop() { # every running node, SIGTERM then SIGKILL
    local i
    for i in 1 2 3; do
        if [[ -n ${NODE_PID[i]} ]]; then
            stop_server "${NODE_PID[i]}"
            NODE_PID[i]=
        fi
    done
}

info_field() { # info_field PORT FIELD
    timeout 5 redis-cli -h 127.0.0.1 -p "$1" INFO replication 2>/dev/null \
        | tr -d '\r' | awk -F: -v f="$2" '$1 == f { print $2; exit }'
}

wait_stable_leader() {
    local deadline=$((SECONDS + LEADER_DEADLINE)) good=0 i l e n info view last_view=
    while ((good < STABLE_SAMPLES)); do
        ((SECONDS < deadline)) || {
            for i in 1 2 3; do
                [[ -n ${NODE_PID[i]} ]] && log "node $i: $(timeout 5 redis-cli -p "${NODE_PORT[i]}" INFO replication | tr -d '\r' | grep -E '^(epoch|leader_id|node_role|commit_index|last_index|connected_slaves|slave[0-9])' | paste -sd' ')"
            done
            die "no stable leader within ${LEADER_DEADLINE}s (logs: ${NODE_LOG[*]})"
        }
        view=ok l= e= n=0
        for i in 1 2 3; do
            [[ -n ${NODE_PID[i]} ]] || continue
            n=$((n + 1))
            info=$(timeout 5 redis-cli -h 127.0.0.1 -p "${NODE_PORT[i]}" INFO replication 2>/dev/null | tr -d '\r') || true
            local lid ep ci
            lid=$(awk -F: '$1 == "leader_id" { print $2 }' <<<"$info")
            ep=$(awk -F: '$1 == "epoch" { print $2 }' <<<"$info")
            ci=$(awk -F: '$1 == "commit_index" { print $2 }' <<<"$info")
            if [[ -z $lid || $lid == 0 ]] || [[ -n $l && ($lid != "$l" || $ep != "$e") ]]; then view=bad; break; fi
            l=$lid e=$ep
            view+=" $i:$lid:$ep:$ci"
        done
        # the leader itself: running, reporting every other running node online with lag 0
        if [[ $view != bad && -n ${NODE_PID[l]:-} ]]; then
            info=$(timeout 5 redis-cli -h 127.0.0.1 -p "${NODE_PORT[l]}" INFO replication 2>/dev/null | tr -d '\r') || true
            if (($(grep -c 'state=online,.*lag=0$' <<<"$info") != n - 1)); then view=bad; fi
        else
            view=bad
        fi
        if [[ $view != bad && $view == "$last_view" ]]; then good=$((good + 1)); else good=0; fi
        last_view=$view
        sleep 0.1
    done
    LEADER=$l
    LEADER_PORT=${NODE_PORT[l]}
    EPOCH=$e
}
