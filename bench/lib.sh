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
