#!/usr/bin/env bash
# web-console.sh — runs web-console.js (a headless Chromium steered over stdin/stdout, for
# tests/tests/web.rs), installing playwright-core and Debian's chromium when missing.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/_lib.sh"
NODE_DIR=$PEERS_CACHE/node
command -v node >/dev/null || peers_apt nodejs npm
if [ ! -f "$NODE_DIR/node_modules/playwright-core/package.json" ]; then
  mkdir -p "$NODE_DIR"
  [ -f "$NODE_DIR/package.json" ] || echo '{"name":"edgeport-peers-node","private":true}' >"$NODE_DIR/package.json"
  (cd "$NODE_DIR" && npm install --no-audit --no-fund --loglevel=error playwright-core >&2)
fi
command -v chromium >/dev/null || peers_apt chromium
exec env NODE_PATH="$NODE_DIR/node_modules" node "$HERE/web-console.js"
