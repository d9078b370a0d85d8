#!/usr/bin/env bash
# bench/callgrind.sh [BINARY] [REQUESTS]: instructions per request, counted by valgrind's
# callgrind (repeatable on a noisy machine, where the clock is not). Starts a private nginx stub
# and callgate under callgrind with bench/lib.sh (loopback, fresh state file), sends 200 requests
# to warm up, then counts REQUESTS (1000) of them, one at a time on one keep-alive connection (the
# benchmark's POST /v1/calls), and prints the instructions per request of the whole process and of
# the store's writer thread. The profile is kept (its path printed) for callgrind_annotate.
# CONNS=16 DUR=20 counts a saturated run instead: wrk with CONNS connections for DUR seconds,
# the total divided by the requests wrk completed (batches of several operations, as under
# load; at one connection each batch holds one operation). REQUESTS is then ignored.
# Needs valgrind, nginx, curl, python3 (and wrk with CONNS).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${1:-$ROOT/target/release/callgate}; N=${2:-1000}
T=$(mktemp -d "${TMPDIR:-/tmp}/callgate-callgrind.XXXXXX")
KEEP=1  # the profile is kept
. "$ROOT/bench/lib.sh"
trap bench_cleanup EXIT
prepare
OUT=$T/callgrind.out
start_callgate "$BIN" "$d" valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT"
wait_healthy 1200
# One keep-alive connection, the request of bench/calls.lua; fails on any answer but 200.
send() { python3 - "$CG" "$1" "$BENCH_KEY" <<'PY'
import http.client, sys
port, n, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
body = ('{"phone_number": "+14155551234", "agent_id": "agent_abc123", '
        '"metadata": {"customer_id": "cust_456", "campaign": "follow_up", "email": "ann@example.com"}}')
headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for _ in range(n):
    c.request("POST", "/v1/calls", body, headers)
    r = c.getresponse(); r.read()
    if r.status != 200:
        sys.exit(f"answer {r.status}")
PY
}
send 200
CONNS=${CONNS:-1}
if [ "$CONNS" -gt 1 ]; then load -t1 -c"$CONNS" -d5s >/dev/null; fi
callgrind_control -i on "$P" >/dev/null
if [ "$CONNS" -gt 1 ]; then
  N=$(load -t1 -c"$CONNS" -d"${DUR:-20}s" | awk '/requests in/ {print $1}')
else
  send "$N"
fi
callgrind_control -i off "$P" >/dev/null
kill -INT "$P"; wait "$P" || true
total=$(callgrind_annotate "$OUT" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
# The writer thread's share: its loop's inclusive count (the checkpoint thread's is not in it).
writer=$(callgrind_annotate --inclusive=yes "$OUT" 2>/dev/null | awk '/writer::run \[/ && !w {gsub(",", "", $1); w = $1} END {print w}')
awk -v t="$total" -v w="$writer" -v n="$N" 'BEGIN {
  printf "instructions per request: %.0f", t / n
  if (w == "") print " (the writer thread: its loop, writer::run, is not in the profile)"
  else printf " (of which the store writer thread: %.0f)\n", w / n }'
echo "profile: $OUT (callgrind_annotate [--inclusive=yes] $OUT)"
