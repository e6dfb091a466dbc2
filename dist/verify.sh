#!/usr/bin/env bash
# Checks the systemd unit and the example environment files, failing on any warning:
#
# 1. `systemd-analyze verify` on an instance of dist/kvstore@.service (copied to a temp
#    dir with ExecStart pointed at the freshly built binary: verify insists that the
#    program exists, and /usr/local/bin/kvstore does not on a build machine). Works
#    without systemd running as PID 1 (a container, CI).
# 2. `systemd-analyze security --offline=yes`: the hardening's exposure score must stay
#    at or below $MAX_EXPOSURE (it is 1.4 "OK" out of 10 as written).
# 3. Every KVSTORE_* variable the unit and dist/env/*.env set is one that
#    `kvstore server --help` documents, so a renamed flag cannot leave them behind.
#
# Usage: bash dist/verify.sh  (builds the binary with cargo unless KVSTORE_BIN is set)
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_EXPOSURE=${MAX_EXPOSURE:-2.0}
command -v systemd-analyze >/dev/null || {
  echo "verify.sh: systemd-analyze not found (apt-get install systemd)" >&2
  exit 1
}

if [ -z "${KVSTORE_BIN:-}" ]; then
  cargo build --quiet --bin kvstore
  KVSTORE_BIN="$(pwd)/${CARGO_TARGET_DIR:-target}/debug/kvstore"
fi
[ -x "$KVSTORE_BIN" ] || { echo "verify.sh: $KVSTORE_BIN is not executable" >&2; exit 1; }
case "$KVSTORE_BIN" in /*) ;; *) KVSTORE_BIN="$(pwd)/$KVSTORE_BIN" ;; esac

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unit=dist/kvstore@.service
grep -q '^ExecStart=/usr/local/bin/kvstore server %i$' "$unit" || {
  echo "verify.sh: $unit: ExecStart is not the expected line; update verify.sh" >&2
  exit 1
}
sed "s|^ExecStart=/usr/local/bin/kvstore |ExecStart=$KVSTORE_BIN |" "$unit" >"$tmp/kvstore@.service"
instance="$tmp/kvstore@7379.service"

failed=0
echo "--- systemd-analyze verify $unit (as kvstore@7379)"
# verify exits 0 on warnings (an unknown key, a value it ignores): any output fails.
if ! out=$(systemd-analyze verify "$instance" 2>&1) || [ -n "$out" ]; then
  echo "$out"
  echo "FAIL: systemd-analyze verify complained about $unit" >&2
  failed=1
fi

echo "--- systemd-analyze security (offline)"
if ! out=$(systemd-analyze security --offline=yes "$instance" 2>&1); then
  echo "$out"
  echo "FAIL: systemd-analyze security could not assess $unit" >&2
  failed=1
fi
score=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
if [ -z "$score" ]; then
  echo "$out"
  echo "FAIL: no exposure score in systemd-analyze security's output" >&2
  failed=1
elif awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s > m) }'; then
  printf '%s\n' "$out" | grep -v '^✓' || true
  echo "FAIL: exposure $score is above $MAX_EXPOSURE: the unit lost some hardening" >&2
  failed=1
else
  echo "exposure $score (at most $MAX_EXPOSURE)"
fi

echo "--- KVSTORE_* variables in $unit and dist/env/*.env"
# --help wraps its lines (sometimes between "[env:" and the name): join them first.
known=$("$KVSTORE_BIN" server --help | tr -s ' \n' '  ' | grep -o 'env: KVSTORE_[A-Z0-9_]*' |
        sed 's/^env: //' | sort -u)
used=$( { sed -n 's/^Environment=\(KVSTORE_[A-Z0-9_]*\)=.*/\1/p' "$unit"
          sed -n 's/^\(KVSTORE_[A-Z0-9_]*\)=.*/\1/p' dist/env/*.env; } | sort -u)
unknown=$(comm -13 <(printf '%s\n' "$known") <(printf '%s\n' "$used"))
if [ -n "$unknown" ]; then
  echo "FAIL: set but not read by \`kvstore server\` (see --help):" >&2
  printf '  %s\n' $unknown >&2
  failed=1
else
  echo "$(printf '%s\n' "$used" | wc -l) variables, all documented by kvstore server --help"
fi

# Every line of an environment file is a comment, blank, or NAME=value.
for f in dist/env/*.env; do
  if bad=$(grep -nvE '^(#.*|[A-Z_][A-Z0-9_]*=.*|)$' "$f"); then
    echo "FAIL: $f: not NAME=value: $bad" >&2
    failed=1
  fi
done

[ "$failed" = 0 ] && echo "OK: dist/ verified"
exit "$failed"
