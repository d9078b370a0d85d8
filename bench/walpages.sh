#!/usr/bin/env bash
# bench/walpages.sh [BINARY]: which tables and indexes a commit writes, under load. Starts a
# private nginx stub and callgate with bench/lib.sh (loopback, fresh state file), runs wrk at
# $CONNS connections (32) for $DUR s (3), stops callgate with `kill -9` so that its write-ahead
# log stays as it was, and reads the log back with bench/walpages.py: pages per commit, in all and
# by b-tree. The log holds the commits since its last checkpoint (at most 1 000 pages), so a
# short run is enough; run it a few times, since one right after a checkpoint holds few commits.
# Needs wrk, nginx, curl, python3 (its sqlite3 module with dbstat, as Debian's and most have).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${1:-$ROOT/target/release/callgate}; CONNS=${CONNS:-32}; DUR=${DUR:-3}
T=$(mktemp -d "${TMPDIR:-/tmp}/callgate-walpages.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$T"; }
trap cleanup EXIT
. "$ROOT/bench/lib.sh"
prepare
env -u RUST_LOG "$BIN" serve --config "$d/config.toml" > "$d/log" 2>&1 & P=$!
wait_healthy
load -t$(( CONNS < 2 ? 1 : 2 )) -c"$CONNS" -d"${DUR}s" | grep -E "Requests/sec|Non-2xx|Socket errors"
kill -9 "$P"; wait "$P" 2>/dev/null || true
ls -la "$d/state/" | grep wal || true
python3 "$BENCH/walpages.py" "$d/state/callgate.db"
