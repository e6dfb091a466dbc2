#!/usr/bin/env bash
# Runs the redis-py compatibility tests (tests/python/test_clients.py) against a
# kvstore process they start themselves.
#
#   bash tests/python/run.sh [PYTEST ARGS...]
#
# Creates a virtualenv in target/pyenv with redis==8.1.0 and pytest (once),
# builds the debug binary (cargo build: a no-op when up to date) and runs
# pytest, then tests/node/run.sh (ioredis and node-redis). Exits non-zero when a test
# fails. With KVSTORE_BIN set, tests that
# binary and builds nothing; with KVSTORE_TEST_REDIS_SERVER=/path/to/redis-server,
# runs the same tests against real Redis (to check the tests themselves).
set -euo pipefail
cd "$(dirname "$0")/../.."

REDIS_PY_VERSION=8.1.0
VENV=target/pyenv
PY="$VENV/bin/python"

# A missing tool fails the run with its name and how to get it, never a silent pass.
if [ ! -x "$PY" ]; then
  if ! command -v python3 >/dev/null 2>&1; then
    echo "python3 not found: install python3 and python3-venv (apt-get install python3 python3-venv)" >&2
    exit 1
  fi
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "python3's venv module not found: install python3-venv (apt-get install python3-venv)" >&2
    exit 1
  fi
  echo "--- creating $VENV"
  mkdir -p target
  python3 -m venv "$VENV"
fi

if ! "$PY" - "$REDIS_PY_VERSION" >/dev/null 2>&1 <<'EOF'
import sys
import pytest  # noqa: F401
import redis
sys.exit(redis.__version__ != sys.argv[1])
EOF
then
  echo "--- installing redis==$REDIS_PY_VERSION and pytest into $VENV"
  "$PY" -m pip install -q --disable-pip-version-check "redis==$REDIS_PY_VERSION" pytest
fi

if [ -z "${KVSTORE_BIN:-}" ] && [ -z "${KVSTORE_TEST_REDIS_SERVER:-}" ]; then
  cargo build --quiet
  KVSTORE_BIN="$PWD/target/debug/kvstore"
  export KVSTORE_BIN
fi

# No .pytest_cache or __pycache__ left in the source tree.
export PYTHONDONTWRITEBYTECODE=1
"$PY" -m pytest -q -p no:cacheprovider tests/python "$@"

# The Node.js clients' transactions (ioredis, node-redis): they need node and npm, and
# fail, naming them, when they are missing.
if [ -z "${KVSTORE_TEST_REDIS_SERVER:-}" ]; then
  echo "--- tests/node/run.sh"
  bash tests/node/run.sh
fi
