#!/usr/bin/env bash
# bench/threads.sh [BINARY]: where one callgate process spends its time under load, per thread and
# per stage. Starts a private nginx stub and callgate with bench/lib.sh (loopback only, fresh
# state file), runs wrk for $DUR s at $CONNS connections, and prints:
#   - wrk's req/s, p50, p99, and finer percentiles (p90 to p99.9, BENCH_PERCENTILES in calls.lua);
#   - CPU per request of each of callgate's threads (user and system, /proc/PID/task/*/stat);
#   - write and read calls and bytes per request of each thread (/proc/PID/task/*/io: the store
#     thread's are the pages it writes and the pages it reads back);
#   - context switches per request of each thread (/proc/PID/task/*/status);
#   - from callgate's own histograms (scraped from /metrics at the end): the share of requests,
#     upstream requests, store waits and log syncs within each bucket, and the group commit's size.
# It prints first how long callgate took to answer /healthz after it was started, and its RSS then.
# Knobs: CONNS (32), DUR (8), FILL (seconds at saturation first, to leave calls in flight),
#   SEED (a state file to start on instead of a fresh one, e.g. one made by bench/bigfile.sh),
#   PERF=1 (perf record -g of callgate for 4 s, the file's path printed), KEEP=1 (keep the temp dir).
# Needs wrk, nginx, curl, python3 (and perf for PERF=1).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${1:-$ROOT/target/release/callgate}; CONNS=${CONNS:-32}; DUR=${DUR:-8}; FILL=${FILL:-0}
T=$(mktemp -d "${TMPDIR:-/tmp}/callgate-threads.XXXXXX")
. "$ROOT/bench/lib.sh"
trap bench_cleanup EXIT
prepare
seed_state "$d" "${SEED:-}"
started=$(date +%s.%N)
start_callgate "$BIN" "$d"
wait_healthy 1200
echo "first answer after $(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 3))" "$started" "$(date +%s.%N)") s; RSS $(awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$P/status") MiB"
if [ "$FILL" != 0 ]; then load -t2 -c32 -d"${FILL}s" | grep -E "requests in"; sleep 1; fi
snap() { for t in /proc/$P/task/*; do echo "$(basename "$t"):$(tr ' ' _ < "$t/comm") $(awk '{print $14, $15}' "$t/stat") $(awk '/^wchar:/ {w=$2} /^syscw:/ {c=$2} /^rchar:/ {rb=$2} /^syscr:/ {rc=$2} END {print w+0, c+0, rb+0, rc+0}' "$t/io") $(awk '/^voluntary_ctxt_switches:/ {v=$2} /^nonvoluntary_ctxt_switches:/ {n=$2} END {print v+0, n+0}' "$t/status")"; done | sort; }
snap > "$T/t0"
if [ "${PERF:-0}" = 1 ]; then (sleep 2; perf record -F 999 -g -p "$P" -o "$T/perf.data" -- sleep 4 2>/dev/null) & PIDS+=($!); fi
out=$(BENCH_PERCENTILES=1 load -t"$(wrk_threads)" -c"$CONNS" -d"${DUR}s" --latency)
snap > "$T/t1"
curl -s "http://127.0.0.1:$ADMIN/metrics" > "$T/metrics.txt"
echo "$out" | grep -E "Requests/sec|^ +50%|^ +99%|percentiles us|Non-2xx|Socket errors"
reqs=$(awk '/requests in/ {print $1}' <<<"$out")
echo "CPU per request, by thread (thread id:name):"
join "$T/t0" "$T/t1" | awk -v r="$reqs" '{u=$10-$2; s=$11-$3; if (u+s>0) printf "  %-24s user %7.1f us  system %7.1f us\n", $1, u*10000/r, s*10000/r; tu+=u; ts+=s}
  END {printf "  %-24s user %7.1f us  system %7.1f us\n", "all", tu*10000/r, ts*10000/r}'
echo "Writes and reads per request, by thread (calls; bytes, and in 4 KiB pages: the store's thread writes"
echo "its log and the file, and reads pages its cache does not hold; the others' are sockets):"
join "$T/t0" "$T/t1" | awk -v r="$reqs" '{wc=$13-$5; wb=$12-$4; rc=$15-$7; rb=$14-$6; if (wc+rc>0) printf "  %-24s write %6.2f calls %8.0f bytes %5.2f pages  read %6.2f calls %8.0f bytes %5.2f pages\n", $1, wc/r, wb/r, wb/r/4096, rc/r, rb/r, rb/r/4096}'
echo "Context switches per request, by thread (voluntary: it waited; involuntary: it was preempted):"
join "$T/t0" "$T/t1" | awk -v r="$reqs" '{v=$16-$8; n=$17-$9; if (v+n>r/100) printf "  %-24s voluntary %6.3f  involuntary %6.3f\n", $1, v/r, n/r}'
python3 - "$T/metrics.txt" <<'PY'
import collections, re, sys
buckets = collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = re.match(r'(callgate_[a-z_]+)_bucket\{(?:.*,)?le="([^"]+)"\} (\S+)', line)
    if m:
        buckets[m[1]].append((float("inf") if m[2] == "+Inf" else float(m[2]), float(m[3])))
print("callgate's histograms, share within each bucket (cumulative):")
for name in ("request_duration_seconds", "upstream_duration_seconds", "store_wait_seconds",
             "store_sync_seconds", "store_batch_operations"):
    b = sorted(buckets.get("callgate_" + name, []))
    if not b or b[-1][1] == 0:
        print(f"  {name}: none"); continue
    n = b[-1][1]
    print(f"  {name} (n={n:.0f}): " + ", ".join(f"<={le:g} {100 * c / n:.2f}%" for le, c in b if le != float("inf")))
PY
if [ "${PERF:-0}" = 1 ]; then wait "${PIDS[-1]}" 2>/dev/null || true; KEEP=1; echo "perf data: $T/perf.data"; fi
