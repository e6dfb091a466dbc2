#!/usr/bin/env bash
# Two kvstore binaries head to head (say, before and after a change), both servers up at
# once, the same redis-benchmark run against each in turn, alternating which goes first.
# For differences smaller than bench/compare.sh's run-to-run noise (its ratios against
# Redis come from separate runs).
#
# Usage: bench/ab.sh OLD_BINARY NEW_BINARY [set|get] [ROUNDS]
# Environment: N (requests per run, 1000000), P (pipeline, 16), FSYNC (no).
set -euo pipefail
OLD=$1; NEW=$2; TEST=${3:-set}; ROUNDS=${4:-4}
N=${N:-1000000}; P=${P:-16}; FSYNC=${FSYNC:-no}
tmp=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$tmp"' EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
po=$(port); pn=$(port)
"$OLD" server "$po" --data-dir "$tmp/old" --fsync "$FSYNC" >/dev/null 2>&1 & pids+=($!)
"$NEW" server "$pn" --data-dir "$tmp/new" --fsync "$FSYNC" >/dev/null 2>&1 & pids+=($!)
for p in "$po" "$pn"; do
  for _ in $(seq 100); do redis-cli -p "$p" PING >/dev/null 2>&1 && break; sleep 0.1; done
  # The same key space in both before timing (GET reads it).
  redis-benchmark -p "$p" -c 50 -n 300000 -r 100000 -d 16 -P 16 -t set -q >/dev/null
done
rb() { redis-benchmark -p "$1" -c 50 -n "$N" -r 100000 -d 16 -P "$P" -t "$TEST" --csv | tail -1 | cut -d, -f2 | tr -d '"'; }
echo "# bench/ab.sh $OLD $NEW $TEST $ROUNDS (N=$N P=$P FSYNC=$FSYNC), requests/s"
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then o=$(rb "$po"); n=$(rb "$pn"); else n=$(rb "$pn"); o=$(rb "$po"); fi
  echo "round $r: old $o new $n"
done
