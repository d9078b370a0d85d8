#!/usr/bin/env bash
# bench/bigfile.sh BINARY COUNT OUT: a state file of COUNT settled calls (and a few seconds of the
# benchmark's own), for SEED=OUT bench/threads.sh and SEED_B=OUT bench/drift.sh. BINARY runs 2 s
# at saturation on a fresh file (loopback, as bench/lib.sh) and stops; bench/bigfile.py adds the
# calls; BINARY is started on the file once more, which indexes their upstream ids (the log's
# `upstream ids indexed`), and stopped. 5 000 000 calls: about 2.7 GB and a minute or two.
# Needs wrk, nginx, curl, python3.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${1:?usage: bench/bigfile.sh BINARY COUNT OUT}; COUNT=${2:?usage: bench/bigfile.sh BINARY COUNT OUT}
OUT=${3:?usage: bench/bigfile.sh BINARY COUNT OUT}
T=$(mktemp -d "${TMPDIR:-/tmp}/callgate-bigfile.XXXXXX")
. "$ROOT/bench/lib.sh"
trap bench_cleanup EXIT
prepare
start_callgate "$BIN" "$d"
wait_healthy
load -t2 -c32 -d2s | grep -E "requests in"
kill -INT "$P"; wait "$P" 2>/dev/null || true
python3 "$BENCH/bigfile.py" "$d/state/callgate.db" "$COUNT"
CALLGATE__LOG__LEVEL=info start_callgate "$BIN" "$d"
wait_healthy 12000  # up to 10 minutes: indexing 5 million upstream ids took 4 s here
grep -E "upstream ids indexed" "$d/log" | tail -1 || true
kill -INT "$P"; wait "$P" 2>/dev/null || true
# A clean stop folds the log into the file; a log left behind would be lost by the move.
if [ -e "$d/state/callgate.db-wal" ]; then echo "the gateway left its log behind; see $d/log" >&2; KEEP=1; exit 1; fi
mv "$d/state/callgate.db" "$OUT"
ls -l "$OUT"
