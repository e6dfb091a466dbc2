#!/usr/bin/env bash
# Runs the Node.js client tests (tests/node/test_clients.cjs): ioredis's and
# node-redis's `multi().exec()` against a kvstore process the tests start themselves.
#
#   bash tests/node/run.sh
#
# Installs ioredis and node-redis (pinned below) into target/nodeenv with npm (once),
# builds the debug binary (cargo build: a no-op when up to date) and runs the tests.
# Fails, naming the tool, when node or npm is missing. With KVSTORE_BIN set, tests that
# binary and builds nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."

IOREDIS_VERSION=5.11.1
NODE_REDIS_VERSION=4.7.1
ENV_DIR=target/nodeenv

for tool in node npm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "tests/node/run.sh: '$tool' is not on PATH: install Node.js 18 or newer (with npm)" >&2
    exit 1
  fi
done

want="ioredis@$IOREDIS_VERSION redis@$NODE_REDIS_VERSION"
if [ "$(cat "$ENV_DIR/.installed" 2>/dev/null)" != "$want" ]; then
  echo "--- installing $want into $ENV_DIR"
  mkdir -p "$ENV_DIR"
  [ -f "$ENV_DIR/package.json" ] || echo '{"private": true}' > "$ENV_DIR/package.json"
  npm install --prefix "$ENV_DIR" --no-audit --no-fund --silent \
    "ioredis@$IOREDIS_VERSION" "redis@$NODE_REDIS_VERSION"
  echo "$want" > "$ENV_DIR/.installed"
fi

if [ -z "${KVSTORE_BIN:-}" ]; then
  cargo build --quiet
  KVSTORE_BIN="$PWD/target/debug/kvstore"
  export KVSTORE_BIN
fi

NODE_PATH="$PWD/$ENV_DIR/node_modules" exec node tests/node/test_clients.cjs
