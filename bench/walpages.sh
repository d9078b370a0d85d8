#!/usr/bin/env bash
# bench/walpages.sh [BINARY]: which tables and indexes a commit writes, under load. Starts a
# private nginx stub and callgate with bench/lib.sh (loopback, fresh state file), runs wrk at
# $CONNS connections (32) for $DUR s (3), stops callgate with `kill -9` so that its write-ahead
# log stays as it was, and reads the log back with bench/walpages.py: pages per commit, in all and
# by b-tree, and the log file's size. The log holds the commits since it last started over
# (about 1 000 pages, up to 4 000 at saturation), so a short run is enough; run it a few times,
# since one right after the log started over holds few commits.
# Needs wrk, nginx, curl, python3 (its sqlite3 module with dbstat, as Debian's and most have).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${1:-$ROOT/target/release/callgate}; CONNS=${CONNS:-32}; DUR=${DUR:-3}
T=$(mktemp -d "${TMPDIR:-/tmp}/callgate-walpages.XXXXXX")
. "$ROOT/bench/lib.sh"
trap bench_cleanup EXIT
prepare
start_callgate "$BIN" "$d"
wait_healthy
load -t"$(wrk_threads)" -c"$CONNS" -d"${DUR}s" | grep -E "Requests/sec|Non-2xx|Socket errors"
kill -9 "$P"; wait "$P" 2>/dev/null || true
echo "log file: $(stat -c %s "$d/state/callgate.db-wal") bytes (the largest it has been)"
python3 "$BENCH/walpages.py" "$d/state/callgate.db"
